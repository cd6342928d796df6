//! Wiring: turns a [`Config`] into running listeners, token sources and watchers; reloads what can be
//! reloaded; stops everything.

use crate::admin::{self, AdminState, Readiness};
use crate::config::{Config, Settings};
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::server::{serve_proxy, serve_simple, ServeOpts};
use crate::proxy::Gateway;
use crate::telemetry::{must, register};
use crate::tls::{Acceptor, TlsError};
use crate::token::auth::{Authenticator, UnleashMode};
use crate::token::file::{apply_token_file, watch_token_file, TokenFileError};
use crate::token::metrics::TokenMetrics;
use crate::token::pat::{PatLimits, PatValidator};
use crate::token::store::TokenStore;
use crate::token::unleash::UnleashSync;
use crate::token::TokenSource;
use crate::upstream::{self, Upstream};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The cause is the error's source: `{:#}` prints it once, after this.
    #[error("cannot listen on {addr} (`{key}`)")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    #[error("TLS")]
    Tls(#[from] TlsError),
    #[error("Unleash sync: {0}")]
    Unleash(String),
    #[error("cannot watch {path}")]
    Watch { path: String, source: notify::Error },
}

/// A started gateway. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    admin: Arc<AdminState>,
    stop: watch::Sender<bool>,
    /// The admin listener outlives the drain, so probes see `/ready` 503 while connections finish.
    admin_stop: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    reload: mpsc::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

/// A listener with an explicit accept backlog (the kernel caps it at `net.core.somaxconn`): at the
/// connection cap, new clients wait there instead of being refused.
async fn bind(key: &'static str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { key, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

/// The token-file source: loaded once (errors stop the start), then watched. Replaced whole when a
/// reload names another file.
struct FileSource {
    _watcher: notify::RecommendedWatcher,
}

fn start_file_source(store: &Arc<TokenStore>, metrics: &TokenMetrics, path: PathBuf) -> Result<FileSource, StartError> {
    let applied = apply_token_file(store, &path)?;
    metrics.source_updates.with_label_values(&["file", "ok"]).inc();
    let updates = metrics.source_updates.clone();
    let on_result = Arc::new(move |r: Result<(), &TokenFileError>| {
        let result = if r.is_ok() { "ok" } else { "error" };
        updates.with_label_values(&["file", result]).inc();
    });
    let watcher =
        watch_token_file(store.clone(), path.clone(), applied, on_result).map_err(|source| StartError::Watch {
            path: path.display().to_string(),
            source,
        })?;
    Ok(FileSource { _watcher: watcher })
}

/// Starts the gateway. With `settings`, the config file is watched and [`Running::reload`] works: the
/// settings are resolved again (re-reading the file) and the reloadable part is swapped in.
pub async fn start(cfg: Config, settings: Option<Settings>) -> Result<Running, StartError> {
    let registry = crate::telemetry::registry();
    let store = Arc::new(TokenStore::new());
    let token_metrics = TokenMetrics::register(&registry);
    let reloads = ReloadMetrics::register(&registry);
    let mut watchers = Vec::new();
    let file_source = match &cfg.token_file {
        Some(p) => Some(start_file_source(&store, &token_metrics, p.clone())?),
        None => None,
    };

    let tls = match &cfg.tls {
        Some(files) => {
            let acceptor = Acceptor::new(files)?;
            watchers.push(acceptor.watch(files.clone()).map_err(|source| StartError::Watch {
                path: files.cert.display().to_string(),
                source,
            })?);
            Some(acceptor)
        }
        None => None,
    };

    let proxy_listener = bind("listen", cfg.listen, cfg.listen_backlog).await?;
    let admin_listener = bind("admin_listen", cfg.admin_listen, 128).await?;
    let local = |l: &TcpListener, key, addr| l.local_addr().map_err(|source| StartError::Bind { key, addr, source });
    let proxy_addr = local(&proxy_listener, "listen", cfg.listen)?;
    let admin_addr = local(&admin_listener, "admin_listen", cfg.admin_listen)?;

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut unleash = None;
    // The one client for everything that talks to Unleash: forwarding, token sync, PAT checks.
    let upstream = Arc::new(Upstream::new(upstream::Settings::from_config(&cfg), &registry)?);
    if let Some(token) = &cfg.upstream_token {
        let sync = Arc::new(
            UnleashSync::new(
                upstream.clone(),
                token,
                cfg.sync_interval,
                store.clone(),
                token_metrics.clone(),
                cfg.state_dir.clone(),
            )
            .map_err(StartError::Unleash)?,
        );
        let limits = PatLimits {
            positive_ttl: cfg.sync_interval,
            negative_capacity: cfg.pat_negative_cache_size,
            negative_ttl: cfg.pat_negative_ttl,
            rate_per_sec: cfg.pat_rate_limit,
        };
        let pat = PatValidator::new(upstream.clone(), limits, token_metrics.clone());
        tasks.push(tokio::spawn(sync.clone().run(stop_rx.clone())));
        unleash = Some(UnleashMode { sync, pat });
    }
    let sync_status = unleash.as_ref().map(|u| u.sync.status.clone());
    TokenMetrics::watch(&registry, store.clone(), sync_status.clone());
    let auth = Authenticator::new(store.clone(), unleash, token_metrics.clone());
    let gateway = Arc::new(Gateway::new(
        &cfg,
        auth,
        upstream,
        ProxyMetrics::register(&registry),
        &registry,
    ));
    let readiness = Readiness {
        store: store.clone(),
        draining: Default::default(),
        sync: sync_status,
        required: [
            cfg.token_file.as_ref().map(|_| TokenSource::File),
            cfg.upstream_token.as_ref().map(|_| TokenSource::Unleash),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    readiness.register(&registry);
    let admin = Arc::new(AdminState { registry, readiness });
    let opts = ServeOpts {
        max_connections: cfg.max_connections,
        shutdown_grace: cfg.shutdown_grace,
        tls,
    };
    tasks.push(tokio::spawn(serve_proxy(
        proxy_listener,
        gateway.clone(),
        opts,
        stop_rx.clone(),
    )));
    let a = admin.clone();
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(serve_simple(
        admin_listener,
        move |req| admin::handle(a.clone(), req),
        admin::MAX_CONNECTIONS,
        admin_stop_rx,
    ));

    // Reloads: asked for by SIGHUP (main) or by a change of the config file.
    let (reload, reload_rx) = mpsc::channel::<()>(1);
    let (file_changed, file_rx) = mpsc::channel::<()>(1);
    if let (Some(_), Some(file)) = (&settings, &cfg.config_file) {
        let w = crate::watch::watch_files(std::slice::from_ref(file), file_changed).map_err(|source| {
            StartError::Watch {
                path: file.display().to_string(),
                source,
            }
        })?;
        watchers.push(w);
    }
    let reloader = Reloader {
        settings,
        current: cfg,
        gateway: gateway.clone(),
        store,
        token_metrics,
        metrics: reloads,
        file_source: Mutex::new(file_source),
    };
    tasks.push(tokio::spawn(reloader.run(reload_rx, file_rx, stop_rx)));

    tracing::info!(listen = %proxy_addr, admin_listen = %admin_addr, upstream = %gateway.upstream.url(), "flaggate started");
    Ok(Running {
        proxy_addr,
        admin_addr,
        gateway,
        admin,
        stop,
        admin_stop,
        admin_task,
        reload,
        tasks,
        _watchers: watchers,
    })
}

/// The app's own metrics: configuration reloads.
struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: IntGauge,
}

impl ReloadMetrics {
    fn register(registry: &Registry) -> ReloadMetrics {
        let reloads = register(
            registry,
            must(IntCounterVec::new(
                Opts::new(
                    "flaggate_config_reloads_total",
                    "Configuration reloads (SIGHUP or file change) by result",
                ),
                &["result"],
            )),
        );
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        let last_success = register(
            registry,
            must(IntGauge::new(
                "flaggate_config_last_reload_success",
                "1 if the last configuration reload applied (or none was tried), 0 if it was rejected",
            )),
        );
        last_success.set(1);
        ReloadMetrics { reloads, last_success }
    }
}

struct Reloader {
    settings: Option<Settings>,
    current: Config,
    gateway: Arc<Gateway>,
    store: Arc<TokenStore>,
    token_metrics: TokenMetrics,
    metrics: ReloadMetrics,
    file_source: Mutex<Option<FileSource>>,
}

impl Reloader {
    /// `asked`: explicit reloads (SIGHUP), always done. `file`: config-file events, done only when the
    /// file really changed, so a busy directory does not turn into a reload loop.
    async fn run(
        mut self,
        mut asked: mpsc::Receiver<()>,
        mut file: mpsc::Receiver<()>,
        mut stop: watch::Receiver<bool>,
    ) {
        let path = self.current.config_file.clone();
        let mut seen = path.as_deref().and_then(crate::watch::stamp);
        loop {
            let forced = tokio::select! {
                r = asked.recv() => match r { Some(()) => true, None => break },
                Some(()) = file.recv() => false,
                _ = stop.wait_for(|s| *s) => break,
            };
            // Editors write, rename and chmod in a burst: reload once it settles.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while asked.try_recv().is_ok() || file.try_recv().is_ok() {}
            let now = path.as_deref().and_then(crate::watch::stamp);
            if !forced && now == seen {
                continue;
            }
            seen = now;
            self.reload();
        }
    }

    fn reload(&mut self) {
        let Some(settings) = &self.settings else {
            tracing::warn!("reload requested, but this instance was started without reloadable settings");
            return;
        };
        let (new, warnings) = match settings.resolve() {
            Ok(x) => x,
            Err(e) => return self.failed(&e.to_string()),
        };
        for w in warnings {
            tracing::warn!("{w}");
        }
        if new.token_file != self.current.token_file {
            let mut slot = self.file_source.lock().unwrap_or_else(|e| e.into_inner());
            match &new.token_file {
                Some(p) => match start_file_source(&self.store, &self.token_metrics, p.clone()) {
                    Ok(src) => *slot = Some(src),
                    Err(e) => return self.failed(&e.to_string()),
                },
                None => {
                    self.store.replace_source(TokenSource::File, Default::default());
                    *slot = None;
                }
            }
        }
        for key in self.current.restart_only_changes(&new) {
            tracing::warn!(
                key,
                "setting changed in the config but needs a restart to apply; keeping the running value"
            );
        }
        crate::telemetry::set_log_level(new.log_level.as_deref());
        self.gateway.apply(&new);
        self.metrics.reloads.with_label_values(&["ok"]).inc();
        self.metrics.last_success.set(1);
        tracing::info!(routes = new.routes.len(), "configuration reloaded");
        self.current = new;
    }

    fn failed(&self, reason: &str) {
        self.metrics.reloads.with_label_values(&["error"]).inc();
        self.metrics.last_success.set(0);
        tracing::error!(
            error = reason,
            "configuration reload rejected; the running configuration stays"
        );
    }
}

impl Running {
    /// Flips readiness to 503, stops accepting, and lets in-flight requests finish.
    pub fn shutdown(&self) {
        self.admin.readiness.draining.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }

    /// Asks for a configuration reload (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.reload.try_send(());
    }

    /// A handle that can ask for reloads from elsewhere (a signal task).
    pub fn reload_handle(&self) -> mpsc::Sender<()> {
        self.reload.clone()
    }

    /// Waits until the drain is over and every task has ended (after [`Running::shutdown`]), then
    /// stops the admin listener.
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.admin_stop.send(true);
        let _ = self.admin_task.await;
    }
}
