//! Per-connection timing: which phase a client connection is in, so one watchdog can enforce both the
//! header-read timeout (slowloris: bytes trickle in but no complete request) and the idle keep-alive
//! timeout (nothing at all), without hyper's own header timer, which also runs while a keep-alive
//! connection is simply idle and so would cut SDK connections between polls. While a request is being
//! served, the one client stall left is a client that stops reading its response: the same idle timeout
//! applies to a write that stays blocked.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const IDLE: u64 = 0;
const READING_HEAD: u64 = 1;
const BUSY: u64 = 2;

/// Phase (top 2 bits) and the millisecond it began (rest), in one atomic.
pub struct Activity {
    state: AtomicU64,
    inflight: AtomicU32,
    /// Millisecond + 1 at which a write to the client found its socket full, 0 while writes go through.
    write_blocked: AtomicU64,
    epoch: Instant,
}

/// What the watchdog should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Not yet: check again at this instant (or when the phase changes).
    At(Instant),
    /// A request is being served: only upstream timeouts apply.
    Busy,
    HeaderTimeout,
    IdleTimeout,
    /// The client has not read its response for the idle timeout (a stopped or malicious reader), which
    /// would otherwise hold the connection and the upstream connection behind it for good.
    WriteTimeout,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            state: AtomicU64::new(IDLE << 62),
            inflight: AtomicU32::new(0),
            write_blocked: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn pack(phase: u64, ms: u64) -> u64 {
        phase << 62 | (ms & ((1 << 62) - 1))
    }

    /// Bytes arrived: an idle connection starts reading a request head.
    pub fn on_read(&self) {
        let cur = self.state.load(Ordering::Relaxed);
        if cur >> 62 == IDLE {
            // Lost race = a request began meanwhile, which is the more advanced phase: nothing to do.
            let _ = self.state.compare_exchange(
                cur,
                Self::pack(READING_HEAD, self.now_ms()),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A complete request head was parsed and handed to the service.
    pub fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.state.store(Self::pack(BUSY, self.now_ms()), Ordering::Release);
    }

    /// A response finished (or was abandoned).
    pub fn end(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.store(Self::pack(IDLE, self.now_ms()), Ordering::Release);
        }
    }

    /// A write found the client's socket full (or went through again). Called on every write, so the
    /// common case is one relaxed load.
    fn on_write(&self, blocked: bool) {
        let cur = self.write_blocked.load(Ordering::Relaxed);
        if blocked && cur == 0 {
            self.write_blocked.store(self.now_ms() + 1, Ordering::Relaxed);
        } else if !blocked && cur != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    pub fn check(&self, header_timeout: Duration, idle_timeout: Duration) -> Expiry {
        let s = self.state.load(Ordering::Acquire);
        let since = self.epoch + Duration::from_millis(s & ((1 << 62) - 1));
        let (limit, expired) = match s >> 62 {
            READING_HEAD => (header_timeout, Expiry::HeaderTimeout),
            IDLE => (idle_timeout, Expiry::IdleTimeout),
            _ => return self.check_write(idle_timeout),
        };
        let deadline = since + limit;
        if Instant::now() >= deadline {
            expired
        } else {
            Expiry::At(deadline)
        }
    }

    /// While busy, the idle timeout runs only for a write that stays blocked.
    fn check_write(&self, limit: Duration) -> Expiry {
        match self.write_blocked.load(Ordering::Relaxed) {
            0 => Expiry::Busy,
            ms if Instant::now() >= self.epoch + Duration::from_millis(ms - 1) + limit => Expiry::WriteTimeout,
            _ => Expiry::Busy,
        }
    }
}

/// The client socket, reporting reads to its [`Activity`] (wrapped in `TokioIo` for hyper).
pub struct Watched<T> {
    pub io: T,
    pub activity: std::sync::Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.on_write(r.is_pending());
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.on_write(r.is_pending());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_drive_the_deadlines() {
        let a = Activity::new();
        let (h, i) = (Duration::from_secs(10), Duration::from_secs(60));
        assert!(matches!(a.check(h, i), Expiry::At(d) if d > Instant::now() + Duration::from_secs(50)));
        a.on_read();
        assert!(matches!(a.check(h, i), Expiry::At(d) if d < Instant::now() + Duration::from_secs(11)));
        a.begin();
        a.on_read();
        assert_eq!(a.check(h, i), Expiry::Busy);
        a.end();
        assert!(matches!(a.check(h, i), Expiry::At(d) if d > Instant::now() + Duration::from_secs(50)));
        assert_eq!(a.check(Duration::ZERO, Duration::ZERO), Expiry::IdleTimeout);
        a.on_read();
        assert_eq!(a.check(Duration::ZERO, Duration::ZERO), Expiry::HeaderTimeout);
    }

    #[test]
    fn a_blocked_write_expires_a_busy_connection_only_while_it_stays_blocked() {
        let a = Activity::new();
        let (h, i) = (Duration::from_secs(10), Duration::ZERO);
        a.begin();
        assert_eq!(a.check(h, i), Expiry::Busy);
        a.on_write(true);
        assert_eq!(a.check(h, i), Expiry::WriteTimeout);
        assert_eq!(
            a.check(h, Duration::from_secs(60)),
            Expiry::Busy,
            "not before the limit"
        );
        a.on_write(false);
        assert_eq!(a.check(h, i), Expiry::Busy, "the client read again");
    }
}
