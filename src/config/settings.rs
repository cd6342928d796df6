//! Resolution: each setting's text from flag/env, else the config file, else the table's default
//! (`table.rs`), parsed by its key's one parser into one immutable [`Config`]. Anything wrong is a
//! [`ConfigError`] that names where the value came from, the key and the reason, before any socket is
//! opened.

use super::table::{meta, FileSettings, SETTINGS};
use super::*;
use std::cell::RefCell;
use std::collections::BTreeMap;

pub use super::table::Settings;

/// Flag/env names of each key, for error messages.
fn cli_names(key: &str) -> String {
    format!("--{} / {}", key.replace('_', "-"), meta(key).env)
}

struct Layers<'a> {
    cli: &'a Settings,
    file: &'a FileSettings,
    path: Option<&'a Path>,
    /// What `check-config` shows for each key, and what a reload compares.
    shown: RefCell<BTreeMap<&'static str, String>>,
}

impl Layers<'_> {
    fn file_origin(&self) -> String {
        format!(
            "config file {}",
            self.path.map(|p| p.display().to_string()).unwrap_or_default()
        )
    }

    /// The text given for `key` and where it came from: flag/env, else the file, else the default.
    fn text(&self, key: &'static str) -> Option<(String, String, bool)> {
        let m = meta(key);
        match (self.cli.raw(key), self.file.raw(key)) {
            (Some(v), _) => Some((v.clone(), cli_names(key), false)),
            (None, Some(v)) => Some((v.clone(), self.file_origin(), true)),
            (None, None) => m.default.map(|d| (d.to_string(), "default".to_string(), false)),
        }
    }

    /// Parses `key`'s text (if any) with its parser, naming the origin on error.
    fn get<T>(&self, key: &'static str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        let Some((text, origin, _)) = self.text(key) else {
            return Ok(None);
        };
        let value = parse(&text).map_err(|reason| ConfigError::new(origin, key, reason))?;
        let shown = if meta(key).secret {
            Secret::new(text).to_string()
        } else {
            text
        };
        self.shown.borrow_mut().insert(key, shown);
        Ok(Some(value))
    }

    /// Like [`Layers::get`], for a key the table gives a default.
    fn req<T>(&self, key: &'static str, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        self.get(key, parse)?
            .ok_or_else(|| ConfigError::new("settings", key, "has no value and the table gives it no default"))
    }

    /// A file or directory: relative paths in the config file are relative to the file, not to the
    /// working directory.
    fn path(&self, key: &'static str) -> Option<PathBuf> {
        let (text, _, from_file) = self.text(key)?;
        let p = PathBuf::from(text);
        let p = match self.path.and_then(Path::parent) {
            Some(dir) if from_file && p.is_relative() => dir.join(p),
            _ => p,
        };
        self.show(key, p.display().to_string());
        Some(p)
    }

    /// Overrides what `check-config` shows for `key` (a normalised form of what was written).
    fn show(&self, key: &'static str, text: String) {
        self.shown.borrow_mut().insert(key, text);
    }
}

/// Reads the config file, with errors that say where and what: an unknown key by name, a syntax error
/// by line and column.
fn read_file(p: &Path) -> Result<FileSettings, ConfigError> {
    let origin = format!("config file {}", p.display());
    let text =
        std::fs::read_to_string(p).map_err(|e| ConfigError::new(&origin, "config", format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        if let Some(key) = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field")) {
            let hint = closest_key(key).map_or(String::new(), |k| format!("; did you mean `{k}`?"));
            return ConfigError::new(
                origin,
                key,
                format!("unknown field{hint} (`flaggate run --help` lists every setting; each flag is a key)"),
            );
        }
        let at = e.span().map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}")
        });
        ConfigError::new(
            origin,
            at.unwrap_or_else(|| "(file)".into()),
            msg.trim_end().to_string(),
        )
    })
}

/// A URL without its `user:password@`.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://<redacted>@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The known key nearest to a misspelt one (at most two edits away), for the error's hint.
fn closest_key(wrong: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    let keys = SETTINGS.iter().map(|m| m.key).chain(["routes", "rate_limit_tokens"]);
    keys.map(|k| (distance(wrong, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

impl Settings {
    /// Reads the config file (if any) and merges everything into one validated [`Config`].
    pub fn resolve(&self) -> Result<(Config, Vec<String>), ConfigError> {
        let file_path = self.config.as_deref();
        let file = match file_path {
            Some(p) => read_file(p)?,
            None => FileSettings::default(),
        };
        let l = Layers {
            cli: self,
            file: &file,
            path: file_path,
            shown: RefCell::new(BTreeMap::new()),
        };
        let mut warnings = Vec::new();

        let upstream = l.req("upstream", UpstreamUrl::parse)?;
        warnings.extend(upstream.warning);
        l.show("upstream", upstream.upstream.to_string());
        let upstream_proxy = l.req("upstream_proxy", parse_egress_proxy)?;
        if let EgressProxy::Url(u) = &upstream_proxy {
            // The URL may carry credentials: shown without them.
            l.show("upstream_proxy", redact_userinfo(u.expose()));
        }
        let upstream_token = l.get("upstream_token", |v| match v.trim() {
            "" => Err("is empty".to_string()),
            t => Ok(Secret::new(t.to_string())),
        })?;
        let token_file = l.path("token_file");
        if token_file.is_none() && upstream_token.is_none() {
            return Err(ConfigError::new(
                "settings",
                "token_file",
                "no token source: set --token-file (FLAGGATE_TOKEN_FILE) and/or --upstream-token (FLAGGATE_UPSTREAM_TOKEN)",
            ));
        }
        let mut routes = Vec::with_capacity(file.routes.len());
        for (i, r) in file.routes.iter().enumerate() {
            routes.push(parse_rule(file_path.unwrap_or(Path::new("")), i, r)?);
        }
        for (i, r) in routes.iter().enumerate() {
            if routes[..i]
                .iter()
                .any(|o: &Rule| o.name == r.name || o.prefix == r.prefix)
            {
                return Err(ConfigError::new(
                    l.file_origin(),
                    format!("routes[{i}]"),
                    "duplicate rule name or prefix",
                ));
            }
        }
        let listen = l.req("listen", parse_addr)?;
        l.show("listen", listen.to_string());
        let admin_listen = l.req("admin_listen", parse_addr)?;
        l.show("admin_listen", admin_listen.to_string());
        let tls = {
            let cert = l.path("tls_cert");
            let key = l.path("tls_key");
            let client_ca = l.path("tls_client_ca");
            match (cert, key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca }),
                (None, None) if client_ca.is_none() => None,
                (None, None) => {
                    return Err(ConfigError::new(
                        cli_names("tls_client_ca"),
                        "tls_client_ca",
                        "needs tls_cert and tls_key",
                    ))
                }
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        cli_names("tls_key"),
                        "tls_key",
                        "tls_cert is set but tls_key is not",
                    ))
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        cli_names("tls_cert"),
                        "tls_cert",
                        "tls_key is set but tls_cert is not",
                    ))
                }
            }
        };
        let upstream_client_cert = l.path("upstream_client_cert");
        let upstream_client_key = l.path("upstream_client_key");
        if upstream_client_cert.is_some() != upstream_client_key.is_some() {
            let (missing, given) = if upstream_client_cert.is_some() {
                ("upstream_client_key", "upstream_client_cert")
            } else {
                ("upstream_client_cert", "upstream_client_key")
            };
            return Err(ConfigError::new(
                cli_names(missing),
                missing,
                format!("{given} is set but {missing} is not"),
            ));
        }
        let rate_limits = {
            use crate::ratelimit::Rate;
            let mut limits = crate::ratelimit::RateLimits::default();
            for (kind, key) in [
                (TokenKind::Client, "rate_limit_client"),
                (TokenKind::Frontend, "rate_limit_frontend"),
                (TokenKind::Admin, "rate_limit_admin"),
                (TokenKind::Pat, "rate_limit_pat"),
            ] {
                if let Some(r) = l
                    .get(key, |v| {
                        if v.trim() == "off" {
                            Ok(None)
                        } else {
                            Rate::parse(v).map(Some)
                        }
                    })?
                    .flatten()
                {
                    limits.per_kind.insert(kind, r);
                }
            }
            for (i, t) in file.rate_limit_tokens.iter().enumerate() {
                let rate = Rate::parse(&t.rate)
                    .map_err(|r| ConfigError::new(l.file_origin(), format!("rate_limit_tokens[{i}].rate"), r))?;
                if t.name.is_empty() || limits.per_name.insert(t.name.clone(), rate).is_some() {
                    return Err(ConfigError::new(
                        l.file_origin(),
                        format!("rate_limit_tokens[{i}].name"),
                        "must be a non-empty token name, listed once",
                    ));
                }
            }
            limits
        };
        let upstream_max_inflight = l.req("upstream_max_inflight", parse_count)?;
        let upstream_max_inflight_per_token = l.get("upstream_max_inflight_per_token", parse_count)?;
        let min_request_body_rate = l.req("min_request_body_rate", |v| match v.trim() {
            "0" | "off" => Ok(0),
            v => parse_bytes(v.trim_end_matches("/s")),
        })?;
        let pat_rate_limit = l.req("pat_rate_limit", parse_count)?;
        l.show("pat_rate_limit", format!("{pat_rate_limit}/s"));
        let cfg = Config {
            config_file: file_path.map(Path::to_path_buf),
            listen,
            listen_backlog: l.req("listen_backlog", parse_count)?,
            admin_listen,
            upstream: upstream.upstream,
            upstream_proxy,
            token_file,
            upstream_token,
            sync_interval: l.req("sync_interval", parse_duration)?,
            state_dir: l.path("state_dir"),
            log_format: l.req("log_format", parse_log_format)?,
            log_level: l.get("log_level", crate::telemetry::valid_log_level)?,
            upstream_connect_timeout: l.req("upstream_connect_timeout", parse_duration)?,
            upstream_timeout: l.req("upstream_timeout", parse_duration)?,
            header_read_timeout: l.req("header_read_timeout", parse_duration)?,
            idle_timeout: l.req("idle_timeout", parse_duration)?,
            max_connections: l.req("max_connections", parse_count)?,
            upstream_max_inflight,
            upstream_max_inflight_per_connection: l.req("upstream_max_inflight_per_connection", parse_count)?,
            upstream_max_inflight_per_token,
            max_header_bytes: l.req("max_header_bytes", |v| match parse_bytes(v)? {
                n if n < 8192 => Err(format!("`{v}` is below the minimum of 8KiB")),
                n if n > 1 << 20 => Err(format!("`{v}` is above the maximum of 1MiB")),
                n => Ok(n as usize),
            })?,
            max_request_body: l.req("max_request_body", parse_bytes)?,
            request_body_buffer: l.req("request_body_buffer", |v| match parse_bytes(v)? {
                n if n > 16 << 20 => Err(format!("`{v}` is above the maximum of 16MiB")),
                n => Ok(n as usize),
            })?,
            min_request_body_rate,
            h2_max_streams: l.req("h2_max_streams", parse_count)?,
            shutdown_grace: l.req("shutdown_grace", parse_duration)?,
            tls,
            upstream_ca: l.path("upstream_ca"),
            upstream_client_cert,
            upstream_client_key,
            pat_rate_limit,
            pat_negative_cache_size: l.req("pat_negative_cache_size", parse_count)?,
            pat_negative_ttl: l.req("pat_negative_ttl", parse_duration)?,
            rate_limits,
            routes,
            trusted_proxies: l.get("trusted_proxies", crate::net::parse_list)?.unwrap_or_default(),
            shield: l.req("shield", parse_switch)?,
            shield_ttl: l.req("shield_ttl", |v| match parse_duration(v)? {
                d if d < Duration::from_secs(1) || d > Duration::from_secs(60) => {
                    Err(format!("`{v}` is outside 1s-60s"))
                }
                d => Ok(d),
            })?,
            shield_revalidate_wait: l.req("shield_revalidate_wait", parse_duration)?,
            shield_max_stale: l.req("shield_max_stale", |v| match v.trim() {
                "0" | "off" => Ok(Duration::ZERO),
                v => parse_duration(v),
            })?,
            shield_idle_ttl: l.req("shield_idle_ttl", parse_duration)?,
            shield_max_bytes: l.req("shield_max_bytes", parse_bytes)?,
            shield_max_entry_bytes: l.req("shield_max_entry_bytes", |v| parse_bytes(v).map(|n| n as usize))?,
            shield_max_query_variants: l.req("shield_max_query_variants", parse_count)?,
            shield_persist: l.req("shield_persist", parse_switch)?,
            shown: BTreeMap::new(),
        };
        if cfg.shield_persist && cfg.state_dir.is_none() {
            return Err(ConfigError::new(
                cli_names("shield_persist"),
                "shield_persist",
                "needs state_dir (where the documents are kept)",
            ));
        }
        if cfg.listen == cfg.admin_listen && cfg.listen.port() != 0 {
            return Err(ConfigError::new("settings", "admin_listen", "must differ from listen"));
        }
        if min_request_body_rate == 0 {
            l.show("min_request_body_rate", "off".into());
        }
        if upstream_max_inflight_per_token.is_none() {
            l.show(
                "upstream_max_inflight_per_token",
                format!(
                    "{} (a quarter of upstream_max_inflight)",
                    cfg.upstream_max_inflight_per_token()
                ),
            );
        }
        let cfg = Config {
            shown: l.shown.into_inner(),
            ..cfg
        };
        Ok((cfg, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str) -> (tempfile::TempDir, Settings) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("flaggate.toml");
        std::fs::write(&p, text).unwrap();
        let s = Settings {
            config: Some(p),
            ..Settings::default()
        };
        (dir, s)
    }

    #[test]
    fn precedence_is_flag_then_file_then_default() {
        let (_d, mut s) = with_file("listen = \"127.0.0.1:1111\"\ntoken_file = \"tokens.yaml\"\n");
        let (cfg, _) = s.resolve().unwrap();
        assert_eq!(cfg.listen.port(), 1111);
        assert_eq!(cfg.admin_listen.to_string(), super::default_of("admin_listen"));
        assert!(
            cfg.token_file.unwrap().starts_with(_d.path()),
            "relative to the config file"
        );
        s.listen = Some("127.0.0.1:2222".into());
        assert_eq!(s.resolve().unwrap().0.listen.port(), 2222);
    }

    #[test]
    fn errors_name_origin_and_key() {
        let cases = [
            ("lisen = \"x\"\n", "`lisen`"),
            ("token_file = \"t\"\nlisten = \"nope\"\n", "`listen`"),
            ("token_file = \"t\"\nupstream = \"ftp://x\"\n", "`upstream`"),
            ("token_file = \"t\"\nsync_interval = \"soon\"\n", "`sync_interval`"),
            (
                "token_file = \"t\"\n[[routes]]\nname = \"x\"\nprefix = \"/a/../b\"\nallow = [\"admin\"]\n",
                "`routes[0].prefix`",
            ),
            (
                "token_file = \"t\"\n[[routes]]\nname = \"x\"\nprefix = \"/a\"\nallow = [\"root\"]\n",
                "`routes[0].allow`",
            ),
        ];
        for (text, want) in cases {
            let (_d, s) = with_file(text);
            let err = s.resolve().unwrap_err().to_string();
            assert!(err.contains("flaggate.toml") && err.contains(want), "{err}");
        }
        let s = Settings {
            token_file: Some("t".into()),
            listen: Some("bad".into()),
            ..Settings::default()
        };
        assert!(s
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("--listen / FLAGGATE_LISTEN"));
    }

    #[test]
    fn numbers_in_the_file_are_accepted_where_a_count_or_size_is_expected() {
        let (_d, s) =
            with_file("token_file = \"t\"\nmax_connections = 500\nmax_request_body = 1048576\npat_rate_limit = 3\n");
        let (cfg, _) = s.resolve().unwrap();
        assert_eq!(
            (cfg.max_connections, cfg.max_request_body, cfg.pat_rate_limit),
            (500, 1 << 20, 3)
        );
        let (_d, s) = with_file("token_file = \"t\"\nmax_connections = -1\n");
        assert!(s.resolve().unwrap_err().to_string().contains("`max_connections`"));
    }

    #[test]
    fn upstream_token_is_redacted() {
        let s = Settings {
            upstream_token: Some("*:*.topsecret".into()),
            ..Settings::default()
        };
        let (cfg, _) = s.resolve().unwrap();
        assert!(!cfg.render().contains("topsecret"));
        assert!(!format!("{cfg:?}").contains("topsecret"));
    }
}
