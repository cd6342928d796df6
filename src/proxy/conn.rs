//! Per-connection timing: which phase a client connection is in, so one watchdog can enforce both the
//! header-read timeout (slowloris: bytes trickle in but no complete request) and the idle keep-alive
//! timeout (nothing at all), without hyper's own header timer, which also runs while a keep-alive
//! connection is simply idle and so would cut SDK connections between polls. While a request is being
//! served, the one client stall left is a client that stops reading its response: the same idle timeout
//! applies to a write that stays blocked, and, on HTTP/2, where a client stalls one stream by granting
//! no flow-control window while the socket stays writable, to a chunk of a response the client has not
//! taken (see [`StreamClock`]).

use crate::io::Sensor;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

const IDLE: u64 = 0;
const READING_HEAD: u64 = 1;
const BUSY: u64 = 2;

/// Phase (top 2 bits) and the millisecond it began (rest), in one atomic.
pub struct Activity {
    state: AtomicU64,
    inflight: AtomicU32,
    /// Millisecond + 1 at which a write to the client found its socket full, 0 while writes go through.
    write_blocked: AtomicU64,
    /// HTTP/2 only: the clocks of the streams served on this connection (dead ones pruned as we go).
    /// Locked once per stream and by the watchdog's tick, never per frame.
    streams: Mutex<Vec<Weak<StreamClock>>>,
    epoch: Instant,
    /// Forwarded requests the client abandoned: the window's second (top 32 bits) and its count.
    cancels: AtomicU64,
    /// Woken when the client abandons more than [`CANCEL_BUDGET`] forwarded requests in a window.
    over_budget: tokio::sync::Notify,
    /// The HTTP/1 request line being read had a raw `#` in its target.
    fragment: std::sync::atomic::AtomicBool,
}

/// Forwarded requests a client may abandon per [`CANCEL_WINDOW`] on one connection. h2's own rapid-reset
/// guard counts only streams reset before the server accepted them; a client that waits a moment and
/// then resets gets each request forwarded and cancelled, so every reset would cost Unleash a request.
/// Past the budget the connection is shut down (GOAWAY, then closed).
pub const CANCEL_BUDGET: u32 = 100;
pub const CANCEL_WINDOW: Duration = Duration::from_secs(10);

/// One HTTP/2 response stream: when it handed the connection a chunk that the client has not yet taken.
/// hyper polls a response body again only once the stream has flow-control window, so a chunk that
/// stays handed means the client stopped granting window; chunks are at most [`STREAM_CHUNK`] long,
/// which makes "no chunk taken for the idle timeout" mean "less than 16 KiB taken in that time".
pub struct StreamClock {
    epoch: Instant,
    /// Millisecond + 1 since `epoch` at which the chunk was handed, 0 once it was taken.
    handed: AtomicU64,
}

/// The largest chunk an HTTP/2 response body hands over at once (one frame at the default frame size).
pub const STREAM_CHUNK: usize = 16 * 1024;

impl StreamClock {
    pub fn handed(&self) {
        self.handed
            .store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Polled again: the client made room for the last chunk.
    pub fn taken(&self) {
        if self.handed.load(Ordering::Relaxed) != 0 {
            self.handed.store(0, Ordering::Relaxed);
        }
    }

    fn stalled(&self, now_ms: u64, limit_ms: u64) -> bool {
        let h = self.handed.load(Ordering::Relaxed);
        h != 0 && now_ms + 1 >= h + limit_ms
    }
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
            streams: Mutex::new(Vec::new()),
            epoch: Instant::now(),
            cancels: AtomicU64::new(0),
            over_budget: tokio::sync::Notify::new(),
            fragment: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn pack(phase: u64, ms: u64) -> u64 {
        phase << 62 | (ms & ((1 << 62) - 1))
    }

    /// Bytes arrived: an idle connection starts reading a request head (true when this read began one).
    pub fn on_read(&self) -> bool {
        let cur = self.state.load(Ordering::Relaxed);
        // Lost race = a request began meanwhile, which is the more advanced phase: nothing to do.
        cur >> 62 == IDLE
            && self
                .state
                .compare_exchange(
                    cur,
                    Self::pack(READING_HEAD, self.now_ms()),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether the request line just read carried a raw `#` in its target (and forgets it). The URI
    /// parser cuts a fragment off silently, query and all, so only the raw bytes can tell.
    pub fn take_fragment(&self) -> bool {
        self.fragment.swap(false, Ordering::AcqRel)
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

    /// The client abandoned a request that had been forwarded (or was waiting for an upstream slot).
    pub fn cancelled(&self) {
        let window = (self.epoch.elapsed().as_secs() / CANCEL_WINDOW.as_secs()) as u32;
        let mut cur = self.cancels.load(Ordering::Relaxed);
        loop {
            let count = if (cur >> 32) as u32 == window { cur as u32 } else { 0 };
            let next = (u64::from(window) << 32) | u64::from(count.saturating_add(1));
            match self
                .cancels
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) if count + 1 > CANCEL_BUDGET => {
                    self.over_budget.notify_one();
                    return;
                }
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Resolves once the client has abandoned more forwarded requests than the budget allows.
    pub async fn over_cancel_budget(&self) {
        self.over_budget.notified().await;
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

    /// A clock for one HTTP/2 response stream, watched by [`Activity::check`] while the connection is busy.
    pub fn stream_clock(&self) -> Arc<StreamClock> {
        let clock = Arc::new(StreamClock {
            epoch: self.epoch,
            handed: AtomicU64::new(0),
        });
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        // The watchdog prunes on every tick; this keeps a burst of short streams between ticks bounded
        // too, at amortised O(1) however many streams are open.
        if streams.len() >= 64 && streams.len().is_power_of_two() {
            streams.retain(|w| w.strong_count() > 0);
        }
        streams.push(Arc::downgrade(&clock));
        clock
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

    /// While busy, the idle timeout runs only for a write that stays blocked or an HTTP/2 stream whose
    /// client has not taken its last chunk.
    fn check_write(&self, limit: Duration) -> Expiry {
        let now_ms = self.now_ms();
        let limit_ms = limit.as_millis() as u64;
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if blocked != 0 && now_ms + 1 >= blocked + limit_ms {
            return Expiry::WriteTimeout;
        }
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut stalled = false;
        streams.retain(|w| match w.upgrade() {
            Some(c) => {
                stalled |= c.stalled(now_ms, limit_ms);
                true
            }
            None => false,
        });
        if stalled {
            Expiry::WriteTimeout
        } else {
            Expiry::Busy
        }
    }
}

/// What the client socket tells its [`Activity`]: reads (and a raw `#` in a request line), and writes
/// that find the client's window full.
pub struct Watch {
    activity: Arc<Activity>,
    line: LineScan,
}

impl Watch {
    pub fn new(activity: Arc<Activity>) -> Watch {
        Watch {
            activity,
            line: LineScan::default(),
        }
    }
}

impl Sensor for Watch {
    fn read(&mut self, bytes: &[u8]) {
        if self.activity.on_read() {
            self.line.start();
        }
        if self.line.state != Line::Off && self.line.scan(bytes) {
            self.activity.fragment.store(true, Ordering::Release);
        }
    }

    fn write(&mut self, blocked: bool) {
        self.activity.on_write(blocked);
    }
}

/// Reads the target of each HTTP/1 request line as it arrives, for the one thing the parsed URI no
/// longer shows: a raw `#` (RFC 9112 §3.2 allows none in a request target; the URI parser would drop it
/// with everything after it). Only heads that start on an idle connection are read (a pipelined request
/// is parsed as usual, its fragment dropped, never forwarded); an HTTP/2 connection is recognised by its
/// preface and never scanned.
#[derive(Default)]
pub struct LineScan {
    state: Line,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Not inside a request line.
    #[default]
    Off,
    /// Leading empty lines, then the method.
    Method,
    Target,
    /// HTTP/2 (the preface's `PRI * HTTP/2.0`): never scanned again.
    Never,
}

impl LineScan {
    fn start(&mut self) {
        if self.state != Line::Never {
            self.state = Line::Method;
        }
    }

    /// Scans bytes of a request line; true when its target holds a `#`.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        let mut method_len = 0usize;
        for (i, &b) in bytes.iter().enumerate() {
            match self.state {
                Line::Off | Line::Never => return false,
                Line::Method => match b {
                    b'\r' | b'\n' if method_len == 0 => {}
                    b' ' => {
                        if bytes[..i].ends_with(b"PRI") {
                            self.state = Line::Never;
                            return false;
                        }
                        self.state = Line::Target;
                    }
                    _ => method_len += 1,
                },
                Line::Target => match b {
                    b'#' => {
                        self.state = Line::Off;
                        return true;
                    }
                    b' ' | b'\r' | b'\n' => self.state = Line::Off,
                    _ => {}
                },
            }
        }
        false
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

    #[test]
    fn an_h2_chunk_not_taken_expires_a_busy_connection_until_it_is_taken_or_its_stream_ends() {
        let a = Activity::new();
        let (h, i) = (Duration::from_secs(10), Duration::ZERO);
        a.begin();
        let quiet = a.stream_clock();
        let clock = a.stream_clock();
        assert_eq!(a.check(h, i), Expiry::Busy, "nothing handed yet");
        clock.handed();
        assert_eq!(a.check(h, i), Expiry::WriteTimeout);
        assert_eq!(
            a.check(h, Duration::from_secs(60)),
            Expiry::Busy,
            "not before the limit"
        );
        clock.taken();
        assert_eq!(a.check(h, i), Expiry::Busy, "the client took it");
        clock.handed();
        drop(clock);
        assert_eq!(a.check(h, i), Expiry::Busy, "the stream is gone");
        assert_eq!(a.streams.lock().unwrap().len(), 1, "dead clocks are pruned");
        drop(quiet);
    }

    #[test]
    fn the_line_scan_finds_a_raw_fragment_in_a_request_target_across_reads_and_never_scans_http2() {
        let mut l = LineScan::default();
        l.start();
        assert!(!l.scan(b"GET /api/cli"));
        assert!(l.scan(b"ent#x HTTP/1.1\r\n"), "split across two reads");
        l.start();
        assert!(
            !l.scan(b"\r\nGET /api/client?a=1 HTTP/1.1\r\nX-A: #\r\n"),
            "a '#' in a header is not the target's"
        );
        l.start();
        assert!(!l.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        l.start();
        assert!(
            !l.scan(b"\x00\x00\x12\x01 /#"),
            "an HTTP/2 connection is never scanned again"
        );
    }
}
