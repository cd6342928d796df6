//! `gateway().upstream(&mock).token(..).start().await`: the real gateway, in process, on port 0.

use flaggate::app::Running;
use flaggate::config::Settings;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub secret: String,
    pub kind: String,
    pub expires_at: Option<String>,
}

impl TokenSpec {
    pub fn new(secret: &str, kind: &str) -> TokenSpec {
        TokenSpec {
            secret: secret.into(),
            kind: kind.into(),
            expires_at: None,
        }
    }
    pub fn expires(mut self, at: &str) -> TokenSpec {
        self.expires_at = Some(at.into());
        self
    }
}

/// Renders a token file in the documented YAML format.
pub fn token_yaml(tokens: &[TokenSpec]) -> String {
    if tokens.is_empty() {
        return "tokens: []\n".into();
    }
    let mut s = String::from("tokens:\n");
    for t in tokens {
        s.push_str(&format!("  - secret: {:?}\n    type: {}\n", t.secret, t.kind));
        if let Some(e) = &t.expires_at {
            s.push_str(&format!("    expires_at: {e}\n"));
        }
    }
    s
}

pub struct Builder {
    upstream: Option<String>,
    tokens: Vec<TokenSpec>,
    config_toml: Option<String>,
    settings: Settings,
    token_file: bool,
    state_dir: Option<PathBuf>,
}

pub fn gateway() -> Builder {
    Builder {
        token_file: true,
        state_dir: None,
        upstream: None,
        tokens: Vec::new(),
        config_toml: None,
        settings: Settings::default(),
    }
}

impl Builder {
    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.upstream = Some(url.into());
        self
    }
    pub fn token(mut self, secret: &str, kind: &str) -> Self {
        self.tokens.push(TokenSpec::new(secret, kind));
        self
    }
    pub fn token_spec(mut self, t: TokenSpec) -> Self {
        self.tokens.push(t);
        self
    }
    /// Extra TOML for the config file (e.g. `[[routes]]`).
    pub fn config(mut self, toml: &str) -> Self {
        self.config_toml = Some(toml.into());
        self
    }
    pub fn settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.settings);
        self
    }
    /// Serve HTTPS with this certificate and key (PEM files).
    pub fn tls(mut self, cert: &std::path::Path, key: &std::path::Path) -> Self {
        self.settings.tls_cert = Some(cert.display().to_string());
        self.settings.tls_key = Some(key.display().to_string());
        self
    }
    /// Require client certificates issued by this CA (PEM file): mTLS.
    pub fn tls_client_ca(mut self, ca: &std::path::Path) -> Self {
        self.settings.tls_client_ca = Some(ca.display().to_string());
        self
    }

    /// Unleash-sync mode only: no token file, so readiness depends on the sync.
    pub fn without_token_file(mut self) -> Self {
        self.token_file = false;
        self
    }
    /// Without the shield (`shield = off`): every feature poll is forwarded, for tests about forwarding.
    pub fn shield_off(mut self) -> Self {
        self.settings.shield = Some("off".into());
        self
    }
    /// Sync from a mock Unleash with its admin token, every `interval`.
    pub fn unleash_sync(mut self, interval: &str) -> Self {
        self.settings.upstream_token = Some(super::unleash::SYNC_TOKEN.into());
        self.settings.sync_interval = Some(interval.into());
        self
    }
    pub fn state_dir(mut self, dir: &std::path::Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    pub async fn start(self) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("tokens.yaml");
        std::fs::write(&token_file, token_yaml(&self.tokens)).unwrap();
        let mut s = self.settings;
        if !self.token_file {
            s.token_file = None;
        } else {
            s.token_file.get_or_insert_with(|| token_file.display().to_string());
        }
        if let Some(d) = &self.state_dir {
            s.state_dir = Some(d.display().to_string());
        }
        s.listen.get_or_insert_with(|| "127.0.0.1:0".into());
        // Hermetic: the machine's HTTP(S)_PROXY must not carry loopback traffic (tests/it/egress.rs
        // sets a proxy explicitly).
        s.upstream_proxy.get_or_insert_with(|| "none".into());
        s.admin_listen.get_or_insert_with(|| "127.0.0.1:0".into());
        s.upstream = Some(self.upstream.unwrap_or_else(|| "http://127.0.0.1:9".into()));
        if let Some(toml) = self.config_toml {
            let p = dir.path().join("flaggate.toml");
            std::fs::write(&p, toml).unwrap();
            s.config = Some(p);
        }
        let (cfg, _) = s.resolve().expect("test config is valid");
        let running = flaggate::app::start(cfg, Some(s)).await.expect("gateway starts");
        TestGateway {
            addr: running.proxy_addr,
            admin: running.admin_addr,
            token_file,
            running: Some(running),
            dir,
        }
    }
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub token_file: PathBuf,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            // Let the drain finish in the background so the admin listener closes too.
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(r.wait());
            }
        }
    }
}
