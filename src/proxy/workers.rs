//! The proxy's worker threads: one single-worker runtime per core, each serving the connections handed to
//! it with its own upstream pool — nginx's worker model instead of one work-stealing runtime for all.
//!
//! Why: on one shared runtime a request's downstream task, its pooled upstream connection's task and the
//! parked sibling worker wake each other across threads, and each wake-up is a context switch that also
//! preempts whatever else runs on that core (on a box shared with Unleash, Unleash). Keeping a connection
//! and every upstream connection its requests use on one thread measured 5-12% more requests/s on 2 cores,
//! and the upstream's own CPU per request fell by 2-4 µs (BENCHMARKS.md). The accept loop, the admin
//! listener and the token sync stay on the main runtime.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The worker threads; dropping this stops them (each runtime is dropped on its own thread).
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections this worker serves now: new ones go to the least loaded worker, since SDK
    /// connections are long-lived and round-robin would drift as they close.
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
}

/// Counts a connection against its worker until dropped.
pub struct Assigned {
    pub index: usize,
    pub handle: Handle,
    open: Arc<AtomicUsize>,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    pub async fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let (ready, started) = oneshot::channel::<std::io::Result<Handle>>();
            let (stop, stopped) = oneshot::channel::<()>();
            // The runtime is built, run and dropped on its owner thread, never in async context: it lives
            // until `Workers` is dropped (after the drain), and whatever still runs then was cut by the
            // grace period and is cancelled with it. If a later worker fails to start, the earlier ones
            // end the same way, when `workers` is dropped.
            std::thread::Builder::new()
                .name(format!("flaggate-proxy-{i}-owner"))
                .spawn(move || {
                    // A one-worker multi-thread runtime: it keeps tokio's LIFO-slot scheduling for a
                    // request's freshly woken tasks. (Current-thread runtimes measured no better.)
                    let rt = Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name(format!("flaggate-proxy-{i}"))
                        .enable_all()
                        .build();
                    match rt {
                        Ok(rt) => {
                            let _ = ready.send(Ok(rt.handle().clone()));
                            let _ = rt.block_on(stopped);
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })?;
            let handle = started
                .await
                .map_err(|_| std::io::Error::other("proxy worker thread ended while starting"))??;
            workers.push(Worker {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
            });
        }
        Ok(Workers { workers })
    }

    /// The least loaded worker, charged with one more connection.
    pub fn assign(&self) -> Option<Assigned> {
        let (index, w) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.open.load(Ordering::Relaxed))?;
        w.open.fetch_add(1, Ordering::Relaxed);
        Some(Assigned {
            index,
            handle: w.handle.clone(),
            open: w.open.clone(),
        })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            drop(w.stop.take());
        }
    }
}

/// One worker per available core (honouring cgroup CPU quotas).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
