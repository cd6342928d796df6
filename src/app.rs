//! Wiring: turns a [`Config`] into running listeners, token sources and watchers, and stops them.

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::proxy::server::{serve_proxy, serve_simple, ConnLimits};
use crate::proxy::{Gateway, UnleashMode};
use crate::telemetry::Metrics;
use crate::token::file::{apply_token_file, watch_token_file, TokenFileError};
use crate::token::pat::{PatLimits, PatValidator};
use crate::token::store::TokenStore;
use crate::token::unleash::{control_client, UnleashSync};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    #[error("Unleash sync: {0}")]
    Unleash(String),
    #[error("cannot watch token file {path}: {source}")]
    Watch { path: String, source: notify::Error },
}

/// A started gateway. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    admin: Arc<AdminState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let store = Arc::new(TokenStore::new());
    let metrics = Arc::new(Metrics::new());
    let mut watchers = Vec::new();

    if let Some(path) = &cfg.token_file {
        apply_token_file(&store, path)?;
        metrics.token_source_updates.with_label_values(&["file", "ok"]).inc();
        let m = metrics.clone();
        let on_result = Arc::new(move |r: Result<(), &TokenFileError>| {
            let result = if r.is_ok() { "ok" } else { "error" };
            m.token_source_updates.with_label_values(&["file", result]).inc();
        });
        let w = watch_token_file(store.clone(), path.clone(), on_result).map_err(|source| StartError::Watch {
            path: path.display().to_string(),
            source,
        })?;
        watchers.push(w);
    }

    let proxy_listener = bind("listen", cfg.listen).await?;
    let admin_listener = bind("admin_listen", cfg.admin_listen).await?;
    let proxy_addr = proxy_listener.local_addr().map_err(|source| StartError::Bind {
        key: "listen",
        addr: cfg.listen,
        source,
    })?;
    let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind {
        key: "admin_listen",
        addr: cfg.admin_listen,
        source,
    })?;

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut unleash = None;
    if let Some(token) = &cfg.upstream_token {
        let client = control_client(cfg.upstream_connect_timeout);
        let bad = |reason: String| StartError::Unleash(reason);
        let sync = Arc::new(
            UnleashSync::new(
                client.clone(),
                &cfg.upstream,
                token,
                cfg.sync_interval,
                store.clone(),
                metrics.clone(),
                cfg.state_dir.clone(),
            )
            .map_err(bad)?,
        );
        let limits = PatLimits {
            positive_ttl: cfg.sync_interval,
            negative_capacity: cfg.pat_negative_cache_size,
            negative_ttl: cfg.pat_negative_ttl,
            rate_per_sec: cfg.pat_rate_limit,
        };
        let pat = PatValidator::new(client, &cfg.upstream, limits, metrics.clone()).map_err(bad)?;
        tasks.push(tokio::spawn(sync.clone().run(stop_rx.clone())));
        unleash = Some(UnleashMode { sync, pat });
    }
    let sync_status = unleash.as_ref().map(|u| u.sync.status.clone());
    let gateway = Arc::new(Gateway::new(&cfg, store.clone(), metrics.clone(), unleash));
    let admin = Arc::new(AdminState {
        store: store.clone(),
        metrics: metrics.clone(),
        draining: Default::default(),
        sync: sync_status,
    });
    let limits = ConnLimits {
        header_read_timeout: cfg.header_read_timeout,
    };
    let mut tasks = vec![tokio::spawn(serve_proxy(
        proxy_listener,
        gateway.clone(),
        limits,
        stop_rx.clone(),
    ))];
    let a = admin.clone();
    tasks.push(tokio::spawn(serve_simple(
        admin_listener,
        move |req| admin::handle(a.clone(), req),
        stop_rx,
    )));
    tracing::info!(listen = %proxy_addr, admin_listen = %admin_addr, upstream = %cfg.upstream, "flaggate started");
    Ok(Running {
        proxy_addr,
        admin_addr,
        gateway,
        admin,
        stop,
        tasks,
        _watchers: watchers,
    })
}

impl Running {
    /// Flips readiness to 503, stops accepting, and lets in-flight requests finish.
    pub fn shutdown(&self) {
        self.admin.draining.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }

    /// Waits until every listener task has ended (after [`Running::shutdown`]).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
