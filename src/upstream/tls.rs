//! The client side of TLS to an `https://` upstream: the platform's roots plus `--upstream-ca`, and an
//! optional client identity (mTLS). There is no "skip verification".

use crate::tls::{provider, read_certs, read_key, TlsError};
use rustls::RootCertStore;
use std::path::Path;

/// Client config for an `https://` upstream: platform roots plus `extra_ca`, optional client identity.
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(ca) = extra_ca {
        for c in read_certs(ca)? {
            roots.add(c).map_err(|e| TlsError::File {
                path: ca.to_owned(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| TlsError::Config(e.to_string())),
        None => Ok(builder.with_no_client_auth()),
    }
}
