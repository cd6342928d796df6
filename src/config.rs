//! Settings: every one a flag, an env var (`FLAGGATE_*`) and a TOML key; precedence flag > env > file >
//! default. Resolution yields one immutable [`Config`]; anything wrong is a [`ConfigError`] that names
//! where the value came from, the key, and the reason, before any socket is opened.

mod settings;
mod table;
mod upstream_url;

pub use settings::Settings;
pub use table::{default_of, Apply, Meta, SETTINGS};
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

/// A secret setting (the upstream token, an egress proxy's credentials): held in a `secrecy` box that
/// zeroes it when dropped; its `Debug`/`Display` show only a fingerprint.
#[derive(Clone)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(secrecy::SecretString::from(s))
    }
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
}

/// Compared for reloads (a changed token needs a restart); in constant time is not needed here.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {}>", Digest::of(self.expose()).fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How requests reach Unleash: as the environment says, directly, or through this proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressProxy {
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY` (and their lowercase forms).
    FromEnv,
    Direct,
    /// An `http://` proxy URL, credentials included (shown redacted).
    Url(Secret),
}

pub(crate) fn parse_egress_proxy(s: &str) -> Result<EgressProxy, String> {
    match s.trim() {
        "env" => Ok(EgressProxy::FromEnv),
        "none" | "off" | "direct" => Ok(EgressProxy::Direct),
        url => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("`{url}` is not env, none or a proxy URL ({e})"))?;
            match uri.scheme_str() {
                Some("http") if uri.host().is_some() => Ok(EgressProxy::Url(Secret::new(url.to_string()))),
                _ => Err("the egress proxy must be an http:// URL (https:// upstreams are tunnelled through it with CONNECT)".to_string()),
            }
        }
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
    pub listen_backlog: u32,
    pub admin_listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub upstream_proxy: EgressProxy,
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
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::net::Cidr>,
    pub shield: bool,
    pub shield_ttl: Duration,
    pub shield_revalidate_wait: Duration,
    /// Zero: nothing is served stale.
    pub shield_max_stale: Duration,
    pub shield_idle_ttl: Duration,
    pub shield_max_bytes: u64,
    pub shield_max_entry_bytes: usize,
    pub shield_max_query_variants: usize,
    pub shield_persist: bool,
    /// Each setting as `check-config` shows it (secrets redacted), by key: what a reload compares.
    pub shown: std::collections::BTreeMap<&'static str, String>,
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
    /// Only these networks may use the route (decided on the client address).
    pub sources: Option<Vec<String>>,
    /// Open without a token: an explicit opt-in (the Unleash UI and its login, Edge's `/edge/validate`).
    #[serde(default)]
    pub public: bool,
}

/// TOML values may be written as strings or bare numbers/booleans (`max_connections = 10000`); all are
/// read as text and parsed by the key's own parser, so every origin reports errors the same way.
pub(crate) fn scalar<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
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

/// `IP:port`, `host:port` (resolved once, now) or `:port` (every interface), as people write them.
pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(addr) = t.parse() {
        return Ok(addr);
    }
    let bad = || format!("`{s}` is not a socket address like 0.0.0.0:4243, localhost:4243 or :4243");
    if let Some(port) = t.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad());
    }
    use std::net::ToSocketAddrs;
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("`{s}`: cannot resolve {host}: {e}"))?
        .collect();
    // Prefer IPv4, as a listener on `localhost` usually means 127.0.0.1.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| format!("`{s}`: {host} resolves to no address"))
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

/// Sizes as people write them: a byte count, or a number (fractions allowed) with an IEC unit
/// (`KiB`, `MiB`, `GiB`, or nginx's `k`, `m`, `g`: powers of 1024) or an SI unit (`KB`, `MB`, `GB`:
/// powers of 1000). Anything else is refused with the list of what is accepted.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 65536, 16KiB, 10MiB, 1.5MB"))?;
    let mult: f64 = match unit.trim() {
        "" | "b" | "B" => 1.0,
        "k" | "K" | "KiB" | "kib" => 1024.0,
        "m" | "M" | "MiB" | "mib" => 1024.0 * 1024.0,
        "g" | "G" | "GiB" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" | "kb" => 1e3,
        "MB" | "mb" => 1e6,
        "GB" | "gb" => 1e9,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KiB/MiB/GiB or k/m/g for powers of 1024, KB/MB/GB for powers of 1000)"
            ))
        }
    };
    let bytes = (n * mult).round();
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok(bytes as u64)
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`).
pub(crate) fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("`{s}` is not on or off")),
    }
}

pub fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(format!("`{s}` is not one of json, pretty")),
    }
}

pub(crate) fn parse_rule(file: &Path, index: usize, r: &FileRule) -> Result<Rule, ConfigError> {
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
        // Unleash's API-token routes, by whole segment (`/api/clientx` is not one of them).
        None if crate::path::canonicalize(&r.prefix).is_ok_and(|p| {
            ["/api/client", "/api/frontend", "/api/proxy"]
                .iter()
                .any(|api| p.starts_with_segments(api))
        }) =>
        {
            DenialStyle::ApiToken
        }
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
    let sources = match &r.sources {
        None => None,
        Some(list) => {
            let mut nets = Vec::with_capacity(list.len());
            for n in list {
                nets.push(
                    n.parse::<crate::net::Cidr>()
                        .map_err(|e| ConfigError::new(origin.clone(), key("sources"), e))?,
                );
            }
            Some(nets)
        }
    };
    if r.public && !r.allow.is_empty() {
        return Err(ConfigError::new(
            origin,
            key("allow"),
            "a public route admits everyone; leave `allow` empty (limit it with `sources`)",
        ));
    }
    let mut rule = Rule::new(&r.name, &r.prefix, &kinds, r.preflight, denial);
    rule.sources = sources.map(std::sync::Arc::from);
    rule.public = r.public;
    Ok(rule)
}

impl Config {
    /// One token's (and all anonymous requests') share of the upstream slots: as set, else a quarter of
    /// the pool, so that at least four owners must collude to take it all.
    pub fn upstream_max_inflight_per_token(&self) -> u32 {
        self.upstream_max_inflight_per_token
            .unwrap_or_else(|| u32::try_from(self.upstream_max_inflight / 4).unwrap_or(u32::MAX).max(1))
    }

    /// Human-readable effective configuration with secrets redacted, for `check-config`: every setting
    /// of the table in its order, then the named-token limits and the route rules.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: &str| out.push_str(&format!("{k} = {v}\n"));
        let config = self.config_file.as_ref().map(|p| p.display().to_string());
        line("config", config.as_deref().unwrap_or("(none)"));
        for m in SETTINGS {
            line(m.key, self.shown.get(m.key).map_or(m.unset, String::as_str));
        }
        let mut named: Vec<_> = self.rate_limits.per_name.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        for (name, rate) in named {
            line(
                &format!("rate_limit_tokens {name}"),
                &format!("{}:{}", rate.per_second, rate.burst),
            );
        }
        let policy = crate::policy::Policy::new(self.routes.clone());
        for r in policy.rules() {
            let kinds: Vec<_> = r.allow.kinds().map(|k| k.as_str()).collect();
            let reach = if r.public {
                "PUBLIC (no token)".to_string()
            } else {
                format!("[{}]", kinds.join(", "))
            };
            let sources = r.sources.as_ref().map_or(String::new(), |s| {
                format!(
                    " from {}",
                    s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                )
            });
            let preflight = if r.preflight {
                " (+ token-less CORS preflight)"
            } else {
                ""
            };
            line(
                &format!("route {}", r.name),
                &format!("{} -> {reach}{sources}{preflight}", r.prefix),
            );
        }
        out.push_str("route unmatched = (any other path) -> [admin]\n");
        out
    }

    /// The settings that differ between two configurations and need a restart to apply.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        SETTINGS
            .iter()
            .filter(|m| m.apply == Apply::Restart && self.shown.get(m.key) != new.shown.get(m.key))
            .map(|m| m.key)
            .collect()
    }
}
