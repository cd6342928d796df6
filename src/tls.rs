//! TLS termination (rustls): TLS 1.2+ only, ALPN h2 and http/1.1, optional client-certificate
//! verification, and the certificate pair re-read from disk when it changes — a bad new pair keeps the
//! old one serving and says why. The PEM readers here serve the upstream side too (`upstream::tls`).

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("certificate and key do not make a usable TLS config: {0}")]
    Config(String),
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path)? {
        roots.add(c).map_err(|e| TlsError::File {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Builds the server config from the files as they are now.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A TLS acceptor whose certificate can be swapped while connections are open: each handshake uses
/// the config current at its start; established connections keep theirs.
#[derive(Clone)]
pub struct Acceptor {
    current: Arc<ArcSwap<TlsAcceptor>>,
}

impl Acceptor {
    pub fn new(files: &TlsFiles) -> Result<Acceptor, TlsError> {
        let cfg = server_config(files)?;
        Ok(Acceptor {
            current: Arc::new(ArcSwap::from_pointee(TlsAcceptor::from(Arc::new(cfg)))),
        })
    }

    /// The handshake, with the config current now. Its time limit is the caller's (the header timeout).
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.current.load_full().accept(stream).await
    }

    /// Re-reads the files; on error the current config stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let cfg = server_config(files)?;
        self.current.store(Arc::new(TlsAcceptor::from(Arc::new(cfg))));
        Ok(())
    }

    /// Watches the certificate files' directories and reloads on change. Keep the watcher alive.
    pub fn watch(&self, files: TlsFiles) -> notify::Result<notify::RecommendedWatcher> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let paths: Vec<PathBuf> = [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let watcher = crate::watch::watch_files(&paths, tx)?;
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = fingerprint(&files);
            while rx.recv().await.is_some() {
                // Cert and key are usually written one after the other: let both land.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                let now = fingerprint(&files);
                if now == last {
                    continue;
                }
                match me.reload(&files) {
                    Ok(()) => {
                        last = now;
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, "new TLS certificate rejected; keeping the current one"),
                }
            }
        });
        Ok(watcher)
    }
}

fn fingerprint(files: &TlsFiles) -> Vec<Option<Vec<u8>>> {
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
        .into_iter()
        .map(|p| p.and_then(|p| std::fs::read(p).ok()))
        .collect()
}
