//! Settings: every one a flag, an env var (`FLAGGATE_*`) and a TOML key; precedence flag > env > file >
//! default. Resolution yields one immutable [`Config`]; anything wrong is a [`ConfigError`] that names
//! where the value came from, the key, and the reason, before any socket is opened.

mod settings;
mod upstream_url;

pub use settings::Settings;
pub use upstream_url::UpstreamUrl;

use crate::policy::{DenialStyle, Rule};
use crate::token::{Digest, TokenKind};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{origin}: `{key}`: {reason}")]
pub struct ConfigError {
    pub origin: String,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(origin: impl Into<String>, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: origin.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

/// A secret setting: its `Debug`/`Display` show only a fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {}>", Digest::of(&self.0).fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Certificate files for TLS termination (PEM), re-read when they change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// The effective configuration. Immutable; a reload builds a new one.
#[derive(Clone, Debug)]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub token_file: Option<PathBuf>,
    pub upstream_token: Option<Secret>,
    pub sync_interval: Duration,
    pub state_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub upstream_max_inflight: usize,
    pub upstream_max_inflight_per_connection: u32,
    /// `None`: a quarter of `upstream_max_inflight` (see [`Config::upstream_max_inflight_per_token`]).
    pub upstream_max_inflight_per_token: Option<u32>,
    pub max_header_bytes: usize,
    pub max_request_body: u64,
    pub request_body_buffer: usize,
    /// Bytes a second; 0 turns the minimum off.
    pub min_request_body_rate: u64,
    pub h2_max_streams: u32,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsFiles>,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
    pub pat_rate_limit: u32,
    pub pat_negative_cache_size: u64,
    pub pat_negative_ttl: Duration,
    pub rate_limits: crate::ratelimit::RateLimits,
    pub routes: Vec<Rule>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:4243";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9243";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:4242";

/// The TOML file's shape. Unknown keys are errors: a misspelt key silently ignored is a setting lost.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSettings {
    #[serde(default, deserialize_with = "scalar")]
    pub listen: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub admin_listen: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub token_file: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_token: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub sync_interval: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub state_dir: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub log_format: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub log_level: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_connect_timeout: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_timeout: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub header_read_timeout: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub max_connections: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_max_inflight: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_max_inflight_per_connection: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_max_inflight_per_token: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub max_header_bytes: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub max_request_body: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub request_body_buffer: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub min_request_body_rate: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub h2_max_streams: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub shutdown_grace: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub tls_cert: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub tls_key: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub tls_client_ca: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_ca: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_client_cert: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub upstream_client_key: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub pat_rate_limit: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub pat_negative_cache_size: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub pat_negative_ttl: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub rate_limit_client: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub rate_limit_frontend: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub rate_limit_admin: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub rate_limit_pat: Option<String>,
    #[serde(default)]
    pub rate_limit_tokens: Vec<FileTokenRate>,
    #[serde(default)]
    pub routes: Vec<FileRule>,
}

/// `[[rate_limit_tokens]]`: a limit for one named token (the `name` in the token file or Unleash's
/// `tokenName`), overriding its kind's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileTokenRate {
    pub name: String,
    pub rate: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileRule {
    pub name: String,
    pub prefix: String,
    pub allow: Vec<String>,
    #[serde(default)]
    pub preflight: bool,
    pub denial: Option<String>,
}

/// TOML values may be written as strings or bare numbers/booleans (`max_connections = 10000`); all are
/// read as text and parsed by the key's own parser, so every origin reports errors the same way.
fn scalar<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Str(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|v| match v {
        Scalar::Str(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Bool(b) => b.to_string(),
    }))
}

pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP:port socket address (e.g. 0.0.0.0:4243)"))
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 500ms, 5s, 1m ({e})"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

pub(crate) fn parse_count<T: std::str::FromStr + PartialOrd + Default>(s: &str) -> Result<T, String> {
    match s.trim().parse::<T>() {
        Ok(v) if v > T::default() => Ok(v),
        _ => Err(format!("`{s}` is not a positive whole number")),
    }
}

/// Sizes: a plain byte count or a number with KiB/MiB/GiB (or KB/MB/GB, also powers of two).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 65536, 16KiB, 10MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit (use KiB, MiB or GiB)")),
    };
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(format!("`{s}` must be a positive size")),
    }
}

pub fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(format!("`{s}` is not one of json, pretty")),
    }
}

pub(crate) fn parse_rule(file: &Path, index: usize, r: FileRule) -> Result<Rule, ConfigError> {
    let origin = format!("config file {}", file.display());
    let key = |k: &str| format!("routes[{index}].{k}");
    if r.name.is_empty()
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::new(
            origin,
            key("name"),
            "use letters, digits, '-' and '_' (it becomes a metric label)",
        ));
    }
    if !crate::path::is_rule_prefix(&r.prefix) {
        return Err(ConfigError::new(
            origin,
            key("prefix"),
            format!(
                "`{}` must be a canonical path of unreserved characters and '/', starting with '/'",
                r.prefix
            ),
        ));
    }
    let mut kinds = Vec::new();
    for k in &r.allow {
        kinds.push(TokenKind::parse_name(k).ok_or_else(|| {
            ConfigError::new(
                origin.clone(),
                key("allow"),
                format!("`{k}` is not one of client, backend, frontend, admin, pat"),
            )
        })?);
    }
    let denial = match r.denial.as_deref() {
        None if r.prefix.starts_with("/api/client") || r.prefix.starts_with("/api/frontend") => DenialStyle::ApiToken,
        None | Some("session") => DenialStyle::Session,
        Some("api-token") => DenialStyle::ApiToken,
        Some(other) => {
            return Err(ConfigError::new(
                origin,
                key("denial"),
                format!("`{other}` is not one of api-token, session"),
            ))
        }
    };
    Ok(Rule::new(&r.name, &r.prefix, &kinds, r.preflight, denial))
}

/// `16KiB`, `10MiB`, or a plain byte count: as the settings are written.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

/// `RATE:BURST` per second, as the settings are written.
fn rate_text(r: &crate::ratelimit::Rate) -> String {
    format!("{}:{}", r.per_second, r.burst)
}

impl Config {
    /// One token's (and all anonymous requests') share of the upstream slots: as set, else a quarter of
    /// the pool, so that at least four owners must collude to take it all.
    pub fn upstream_max_inflight_per_token(&self) -> u32 {
        self.upstream_max_inflight_per_token
            .unwrap_or_else(|| u32::try_from(self.upstream_max_inflight / 4).unwrap_or(u32::MAX).max(1))
    }

    /// Human-readable effective configuration with secrets redacted, for `check-config`.
    pub fn render(&self) -> String {
        let opt = |p: &Option<PathBuf>| p.as_ref().map_or("(none)".to_string(), |p| p.display().to_string());
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("config", opt(&self.config_file));
        line("listen", self.listen.to_string());
        line("admin_listen", self.admin_listen.to_string());
        line("upstream", self.upstream.to_string());
        line("token_file", opt(&self.token_file));
        line(
            "upstream_token",
            self.upstream_token.as_ref().map_or("(none)".into(), |s| s.to_string()),
        );
        line(
            "sync_interval",
            humantime::format_duration(self.sync_interval).to_string(),
        );
        line("state_dir", opt(&self.state_dir));
        line("log_format", format!("{:?}", self.log_format).to_lowercase());
        line(
            "upstream_connect_timeout",
            humantime::format_duration(self.upstream_connect_timeout).to_string(),
        );
        line(
            "upstream_timeout",
            humantime::format_duration(self.upstream_timeout).to_string(),
        );
        line(
            "header_read_timeout",
            humantime::format_duration(self.header_read_timeout).to_string(),
        );
        line(
            "log_level",
            self.log_level.clone().unwrap_or_else(|| "(RUST_LOG, else info)".into()),
        );
        line(
            "idle_timeout",
            humantime::format_duration(self.idle_timeout).to_string(),
        );
        line("max_connections", self.max_connections.to_string());
        line("upstream_max_inflight", self.upstream_max_inflight.to_string());
        line(
            "upstream_max_inflight_per_connection",
            self.upstream_max_inflight_per_connection.to_string(),
        );
        line(
            "upstream_max_inflight_per_token",
            match self.upstream_max_inflight_per_token {
                Some(n) => n.to_string(),
                None => format!(
                    "{} (a quarter of upstream_max_inflight)",
                    self.upstream_max_inflight_per_token()
                ),
            },
        );
        line("max_header_bytes", bytes(self.max_header_bytes as u64));
        line("max_request_body", bytes(self.max_request_body));
        line("request_body_buffer", bytes(self.request_body_buffer as u64));
        line(
            "min_request_body_rate",
            match self.min_request_body_rate {
                0 => "off".into(),
                n => format!("{}/s", bytes(n)),
            },
        );
        line("h2_max_streams", self.h2_max_streams.to_string());
        line(
            "shutdown_grace",
            humantime::format_duration(self.shutdown_grace).to_string(),
        );
        let tls = self.tls.as_ref();
        line("tls_cert", opt(&tls.map(|t| t.cert.clone())));
        line("tls_key", opt(&tls.map(|t| t.key.clone())));
        line("tls_client_ca", opt(&tls.and_then(|t| t.client_ca.clone())));
        line("upstream_ca", opt(&self.upstream_ca));
        line("upstream_client_cert", opt(&self.upstream_client_cert));
        line("upstream_client_key", opt(&self.upstream_client_key));
        line("pat_rate_limit", format!("{}/s", self.pat_rate_limit));
        line("pat_negative_cache_size", self.pat_negative_cache_size.to_string());
        line(
            "pat_negative_ttl",
            humantime::format_duration(self.pat_negative_ttl).to_string(),
        );
        for kind in [TokenKind::Client, TokenKind::Frontend, TokenKind::Admin, TokenKind::Pat] {
            let rate = self.rate_limits.per_kind.get(&kind);
            line(
                &format!("rate_limit_{}", kind.as_str()),
                rate.map_or("off".into(), rate_text),
            );
        }
        let mut named: Vec<_> = self.rate_limits.per_name.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        for (name, rate) in named {
            line(&format!("rate_limit_tokens {name}"), rate_text(rate));
        }
        let policy = crate::policy::Policy::new(self.routes.clone());
        for r in policy.rules() {
            let kinds: Vec<_> = r.allow.kinds().map(|k| k.as_str()).collect();
            line(
                &format!("route {}", r.name),
                format!(
                    "{} -> [{}]{}",
                    r.prefix,
                    kinds.join(", "),
                    if r.preflight { " (+ token-less OPTIONS)" } else { "" }
                ),
            );
        }
        out.push_str("route unmatched = (any other path) -> [admin]\n");
        out
    }
}
