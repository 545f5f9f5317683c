//! Last stable offsets as seen in fetch responses: the read_committed lag per partition (high watermark
//! minus last stable offset) and partitions whose LSO stays put while their high watermark moves (a
//! hanging transaction holding read_committed consumers back). No clock reads: the caller passes `now`.

use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Seen {
    /// The exported lag gauge of this partition, looked up once.
    gauge: Option<prometheus::IntGauge>,
    high_watermark: i64,
    last_stable_offset: i64,
    /// When the LSO last moved, and the high watermark then.
    lso_since: Instant,
    hw_when_lso_moved: i64,
    stuck: bool,
}

/// A change worth an audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LsoChange {
    /// The LSO has not moved for `for_how_long` while the high watermark advanced; `lag` records behind.
    Stuck { lag: i64, for_how_long: Duration },
    /// A stuck partition's LSO moved again.
    Cleared,
}

pub struct LsoTracker {
    parts: DashMap<(Arc<str>, i32), Seen>,
    cap: usize,
    stuck_after: Duration,
}

impl LsoTracker {
    pub fn new(cap: usize, stuck_after: Duration) -> Self {
        LsoTracker {
            parts: DashMap::new(),
            cap: cap.max(1),
            stuck_after,
        }
    }

    /// Records one partition's offsets; returns the lag (None: not tracked) and a change. The partition's
    /// lag gauge, made by `gauge` the first time the partition is seen, is kept up to date here.
    pub fn observe(
        &self,
        topic: &Arc<str>,
        partition: i32,
        high_watermark: i64,
        last_stable_offset: i64,
        now: Instant,
        gauge: impl FnOnce() -> Option<prometheus::IntGauge>,
    ) -> (Option<i64>, Option<LsoChange>) {
        if high_watermark < 0 || last_stable_offset < 0 {
            return (None, None);
        }
        let lag = (high_watermark - last_stable_offset).max(0);
        let key = (topic.clone(), partition);
        let Some(mut seen) = self.parts.get_mut(&key) else {
            if self.parts.len() >= self.cap {
                return (None, None);
            }
            let gauge = gauge();
            if let Some(g) = &gauge {
                g.set(lag);
            }
            self.parts.insert(
                key,
                Seen {
                    gauge,
                    high_watermark,
                    last_stable_offset,
                    lso_since: now,
                    hw_when_lso_moved: high_watermark,
                    stuck: false,
                },
            );
            return (Some(lag), None);
        };
        seen.high_watermark = high_watermark;
        if let Some(g) = &seen.gauge {
            g.set(lag);
        }
        if last_stable_offset != seen.last_stable_offset {
            seen.last_stable_offset = last_stable_offset;
            seen.lso_since = now;
            seen.hw_when_lso_moved = high_watermark;
            let was = std::mem::replace(&mut seen.stuck, false);
            return (Some(lag), was.then_some(LsoChange::Cleared));
        }
        let held = now.saturating_duration_since(seen.lso_since);
        if !seen.stuck
            && lag > 0
            && high_watermark > seen.hw_when_lso_moved
            && held >= self.stuck_after
        {
            seen.stuck = true;
            return (
                Some(lag),
                Some(LsoChange::Stuck {
                    lag,
                    for_how_long: held,
                }),
            );
        }
        (Some(lag), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_when_lso_holds_while_hw_moves_and_cleared_when_it_moves() {
        let t = LsoTracker::new(10, Duration::from_secs(5));
        let topic: Arc<str> = Arc::from("t");
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            t.observe(&topic, 0, 10, 10, at(0), || None),
            (Some(0), None)
        );
        // LSO stays at 10 (an open transaction), HW moves on: not yet stuck
        assert_eq!(
            t.observe(&topic, 0, 20, 10, at(3), || None),
            (Some(10), None)
        );
        // after the threshold: stuck, once
        let (lag, change) = t.observe(&topic, 0, 30, 10, at(6), || None);
        assert_eq!(lag, Some(20));
        assert!(matches!(change, Some(LsoChange::Stuck { lag: 20, .. })));
        assert_eq!(t.observe(&topic, 0, 31, 10, at(7), || None).1, None);
        // the LSO moves: cleared
        assert_eq!(
            t.observe(&topic, 0, 31, 31, at(8), || None),
            (Some(0), Some(LsoChange::Cleared))
        );
        // an idle partition (HW does not move either) is not stuck
        assert_eq!(t.observe(&topic, 1, 5, 5, at(0), || None).1, None);
        assert_eq!(t.observe(&topic, 1, 5, 5, at(60), || None).1, None);
        // unknown offsets are ignored
        assert_eq!(t.observe(&topic, 2, -1, -1, at(0), || None), (None, None));
    }

    #[test]
    fn capped() {
        let t = LsoTracker::new(1, Duration::from_secs(5));
        let topic: Arc<str> = Arc::from("t");
        let now = Instant::now();
        assert!(t.observe(&topic, 0, 1, 1, now, || None).0.is_some());
        assert!(t.observe(&topic, 1, 1, 1, now, || None).0.is_none());
    }
}
