//! New producer ids per client per minute (the producer-id explosion of KIP-936: a client that creates
//! a producer per message fills the broker's producer-state maps until it runs out of memory).
//!
//! A sliding-window counter per client: the current minute's count plus the previous minute's, weighted
//! by how much of it still lies inside the window. Constant memory per client (no timestamp list), and
//! the number of clients tracked is bounded.

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MAX_CLIENTS: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Counter {
    window_start: Instant,
    current: u32,
    previous: u32,
}

impl Counter {
    /// Moves the window up to `now`; returns the sliding estimate and how far into its minute `now` is.
    fn roll(&mut self, now: Instant) -> (f64, Duration) {
        let mut elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let windows = elapsed.as_secs() / WINDOW.as_secs();
            self.previous = if windows == 1 { self.current } else { 0 };
            self.current = 0;
            self.window_start += WINDOW * windows as u32;
            elapsed = now.saturating_duration_since(self.window_start);
        }
        let remaining = 1.0 - elapsed.as_secs_f64() / WINDOW.as_secs_f64();
        (
            f64::from(self.previous) * remaining + f64::from(self.current),
            elapsed,
        )
    }
}

impl Counter {
    /// How long from `elapsed` into the current minute until one more fits under `limit`, if nothing
    /// else is counted meanwhile: the hint a throttled client waits for, so it must not be early (a
    /// client that retries when told would be throttled again).
    fn room_in(&self, limit: u32, elapsed: Duration) -> Duration {
        let window = WINDOW.as_secs_f64();
        let spare = f64::from(limit) - 1.0; // what the estimate may be, counting the one asked for
                                            // When, `into` the minute with `previous` before it and `current` in it, the estimate falls to
                                            // `spare` (the previous minute's weight shrinks linearly as the window slides).
        let at = |previous: u32, current: u32| -> Option<f64> {
            let room = spare - f64::from(current);
            if room < 0.0 {
                return None; // not within this minute
            }
            if f64::from(previous) <= room {
                return Some(0.0);
            }
            Some(window * (1.0 - room / f64::from(previous)))
        };
        let secs = match at(self.previous, self.current) {
            Some(into) => (into - elapsed.as_secs_f64()).max(0.0),
            // Only in the next minute, where this minute's count becomes the weighted one.
            None => {
                let next = at(self.current, 0).unwrap_or(window);
                window - elapsed.as_secs_f64() + next
            }
        };
        // Rounded up to whole milliseconds, so that the hint is never early.
        Duration::from_millis((secs * 1000.0).ceil() as u64 + 1)
    }
}

pub struct PerMinute {
    clients: DashMap<String, Counter>,
    max_clients: usize,
    evicted: AtomicU64,
}

/// The outcome of asking for one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over the limit: how long until the window has room again (a hint for the client's back-off).
    Over {
        retry_after: Duration,
        count: u32,
    },
}

impl PerMinute {
    pub fn new(max_clients: usize) -> Self {
        PerMinute {
            clients: DashMap::new(),
            max_clients,
            evicted: AtomicU64::new(0),
        }
    }

    /// Counts one more for `client` if it stays within `limit` per minute.
    /// Whether one more would be within `limit` for `client`; counts nothing (see [`PerMinute::count`]).
    pub fn check(&self, client: &str, limit: u32, now: Instant) -> Admission {
        let Some(mut c) = self.clients.get_mut(client) else {
            return if limit >= 1 {
                Admission::Admitted
            } else {
                Admission::Over {
                    retry_after: WINDOW,
                    count: 0,
                }
            };
        };
        let (estimate, elapsed) = c.roll(now);
        if estimate + 1.0 > f64::from(limit) {
            return Admission::Over {
                retry_after: c.room_in(limit, elapsed),
                count: estimate.round() as u32,
            };
        }
        Admission::Admitted
    }

    /// Counts one for `client` (a producer id the broker handed out).
    pub fn count(&self, client: &str, now: Instant) {
        if self.clients.len() >= self.max_clients && !self.clients.contains_key(client) {
            // Forget clients idle for two windows; if none are, start over rather than grow.
            let before = self.clients.len();
            self.clients
                .retain(|_, c| now.duration_since(c.window_start) < 2 * WINDOW);
            if self.clients.len() >= self.max_clients {
                self.clients.clear();
            }
            let gone = before.saturating_sub(self.clients.len());
            self.evicted.fetch_add(gone as u64, Ordering::Relaxed);
        }
        let mut entry = self.clients.entry(client.to_string()).or_insert(Counter {
            window_start: now,
            current: 0,
            previous: 0,
        });
        entry.value_mut().roll(now);
        entry.value_mut().current += 1;
    }

    /// [`check`](Self::check) then [`count`](Self::count), for callers that count at admission.
    pub fn admit(&self, client: &str, limit: u32, now: Instant) -> Admission {
        let admission = self.check(client, limit, now);
        if admission == Admission::Admitted {
            self.count(client, now);
        }
        admission
    }

    /// Windows dropped to stay within the bound.
    pub fn evictions(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn tracked(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_per_minute_then_room_again() {
        let r = PerMinute::new(10);
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(
                r.admit("a", 5, t0 + Duration::from_millis(i)),
                Admission::Admitted
            );
        }
        assert!(matches!(
            r.admit("a", 5, t0 + Duration::from_secs(1)),
            Admission::Over { .. }
        ));
        // Another client has its own budget.
        assert_eq!(r.admit("b", 5, t0), Admission::Admitted);
        // Half-way through the next minute, half of the previous minute still counts (2.5 of 5).
        let t = t0 + Duration::from_secs(90);
        assert_eq!(r.admit("a", 5, t), Admission::Admitted);
        assert_eq!(r.admit("a", 5, t), Admission::Admitted);
        assert!(matches!(r.admit("a", 5, t), Admission::Over { .. }));
        // Two idle minutes later the slate is clean.
        let t = t0 + Duration::from_secs(200);
        for _ in 0..5 {
            assert_eq!(r.admit("a", 5, t), Admission::Admitted);
        }
    }

    /// The wait a throttled client is told is exactly long enough: asking again then is admitted, a
    /// little earlier is not.
    #[test]
    fn the_retry_hint_is_never_early() {
        for limit in [1u32, 2, 5] {
            for filled_at in [0u64, 30, 59] {
                for asked in [filled_at, filled_at + 1, 61, 90] {
                    // Checks move the window forward: a fresh counter for each question.
                    let r = PerMinute::new(10);
                    let t0 = Instant::now();
                    for _ in 0..limit {
                        r.count("a", t0 + Duration::from_secs(filled_at));
                    }
                    let now = t0 + Duration::from_secs(asked);
                    let Admission::Over { retry_after, .. } = r.check("a", limit, now) else {
                        continue;
                    };
                    // The earlier question first.
                    let early = now + retry_after.saturating_sub(Duration::from_millis(50));
                    assert!(
                        matches!(r.check("a", limit, early), Admission::Over { .. }),
                        "limit {limit}, filled at {filled_at} s, asked at {asked} s: not tight"
                    );
                    assert_eq!(
                        r.check("a", limit, now + retry_after),
                        Admission::Admitted,
                        "limit {limit}, filled at {filled_at} s, asked at {asked} s: {retry_after:?}"
                    );
                }
            }
        }
        // Limit 1, filled at the start of a minute: the sliding estimate frees room two minutes on.
        let r = PerMinute::new(10);
        let t0 = Instant::now();
        r.count("a", t0);
        let Admission::Over { retry_after, .. } = r.check("a", 1, t0) else {
            panic!("over");
        };
        assert!(retry_after > Duration::from_secs(119) && retry_after <= Duration::from_secs(121));
    }

    #[test]
    fn client_count_is_bounded() {
        let r = PerMinute::new(100);
        let t0 = Instant::now();
        for i in 0..1000 {
            r.admit(&format!("c{i}"), 5, t0);
        }
        assert!(r.tracked() <= 100);
    }
}
