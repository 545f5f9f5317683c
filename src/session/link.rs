//! The session's two write halves, each bounded by `limits.write_timeout_ms`, and the activity clock that
//! `limits.idle_timeout_ms` is measured on.
//!
//! A peer that stops reading (a client that pipelines requests and never takes its answers, a broker that
//! stalls) would otherwise hold its connection, and its slot under `limits.max_connections`, for ever: a
//! write that cannot finish within the write timeout closes the session instead.

use super::Close;
use crate::tls::stream::WriteHalf;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufWriter};

/// When a byte last moved on the session, in either direction.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long nothing has moved.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// A buffered write half whose writes and flushes must finish within the write timeout.
pub struct Writer<'a> {
    inner: BufWriter<WriteHalf>,
    limit: Duration,
    side: Side,
    activity: &'a Activity,
}

impl<'a> Writer<'a> {
    pub fn new(
        half: WriteHalf,
        capacity: usize,
        limit: Duration,
        side: Side,
        activity: &'a Activity,
    ) -> Writer<'a> {
        Writer {
            inner: BufWriter::with_capacity(capacity, half),
            limit,
            side,
            activity,
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), Close> {
        let done = within(self.limit, self.inner.write_all(bytes)).await;
        self.settle(done)
    }

    pub async fn flush(&mut self) -> Result<(), Close> {
        if self.inner.buffer().is_empty() {
            return Ok(());
        }
        let done = within(self.limit, self.inner.flush()).await;
        self.settle(done)
    }

    fn settle(&self, done: Option<io::Result<()>>) -> Result<(), Close> {
        match (done, self.side) {
            (Some(Ok(())), _) => {
                self.activity.touch();
                Ok(())
            }
            (Some(Err(e)), Side::Client) => Err(Close::ClientIo(e)),
            (Some(Err(e)), Side::Upstream) => Err(Close::UpstreamIo(e)),
            (None, side) => Err(Close::WriteTimeout {
                peer: match side {
                    Side::Client => "client",
                    Side::Upstream => "upstream",
                },
                after: self.limit,
            }),
        }
    }
}

/// `fut`'s output, or `None` if it does not finish within `limit`. Most writes land in the buffer (or
/// the socket's) at once: the timer is only armed for one that has to wait, so the common case costs no
/// timer-wheel entry.
async fn within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let std::task::Poll::Ready(out) = futures::poll!(fut.as_mut()) {
        return Some(out);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_write_needs_no_timer_and_a_stuck_one_times_out() {
        assert_eq!(within(Duration::from_millis(1), async { 7 }).await, Some(7));
        let stuck = std::future::pending::<()>();
        assert_eq!(within(Duration::from_millis(20), stuck).await, None);
    }
}
