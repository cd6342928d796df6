//! The command-line/env layer and the merge with the TOML file and defaults.

use super::*;

/// Every setting as a flag and an env var. Values stay strings here so that one parser per key reports
/// errors the same way whether the value came from a flag, the environment or the file.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Settings {
    /// TOML config file (any key below, plus [[routes]])
    #[arg(long, env = "FLAGGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Proxy listener address [default: 0.0.0.0:4243]
    #[arg(long, env = "FLAGGATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listener for /health, /ready, /metrics [default: 0.0.0.0:9243]
    #[arg(long, env = "FLAGGATE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Unleash base URL, without /api [default: http://127.0.0.1:4242]
    #[arg(long, env = "FLAGGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// YAML token file, watched for changes
    #[arg(long, env = "FLAGGATE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<String>,
    /// Admin token or PAT used to sync the token list from Unleash
    #[arg(long, env = "FLAGGATE_UPSTREAM_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub upstream_token: Option<String>,
    /// How often to sync tokens from Unleash (500ms, 5s, 1m) [default: 5s]
    #[arg(long, env = "FLAGGATE_SYNC_INTERVAL", value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Directory for the token snapshot used when Unleash is down at start
    #[arg(long, env = "FLAGGATE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<String>,
    /// Log format: json or pretty [default: json]
    #[arg(long, env = "FLAGGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info, debug, flaggate=debug,hyper=warn [default: RUST_LOG, else info]; reloadable
    #[arg(long, env = "FLAGGATE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Upstream TCP connect timeout [default: 2s]
    #[arg(long, env = "FLAGGATE_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub upstream_connect_timeout: Option<String>,
    /// Time allowed for Unleash's response headers (streams are exempt once started) [default: 30s]
    #[arg(long, env = "FLAGGATE_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    pub upstream_timeout: Option<String>,
    /// Time a client has to send its request headers, to complete the TLS handshake, and the longest
    /// pause inside a request body [default: 10s]
    #[arg(long, env = "FLAGGATE_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// Idle keep-alive connections are closed after this, and so is a client that stops reading its
    /// response for as long (on HTTP/2: takes less than 16 KiB of a stream's response) [default: 75s]
    #[arg(long, env = "FLAGGATE_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Most open client connections; more wait in the listen backlog [default: 10000]
    #[arg(long, env = "FLAGGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<String>,
    /// Most requests forwarded to Unleash at once (each holds an upstream connection until its response
    /// ends, event streams included); more wait up to the connect timeout, then get 503 [default: 1024]
    #[arg(long, env = "FLAGGATE_UPSTREAM_MAX_INFLIGHT", value_name = "N")]
    pub upstream_max_inflight: Option<String>,
    /// One client connection's share of the upstream slots: more of its requests at Unleash at once get
    /// 503 (HTTP/2 multiplexes many on one connection) [default: 32]
    #[arg(long, env = "FLAGGATE_UPSTREAM_MAX_INFLIGHT_PER_CONNECTION", value_name = "N")]
    pub upstream_max_inflight_per_connection: Option<String>,
    /// One token's share of the upstream slots (requests without a token share one such share); more of
    /// its requests at Unleash at once get 503 [default: a quarter of upstream_max_inflight]
    #[arg(long, env = "FLAGGATE_UPSTREAM_MAX_INFLIGHT_PER_TOKEN", value_name = "N")]
    pub upstream_max_inflight_per_token: Option<String>,
    /// Largest request head (request line + headers); larger → 431 [default: 16KiB]
    #[arg(long, env = "FLAGGATE_MAX_HEADER_BYTES", value_name = "SIZE")]
    pub max_header_bytes: Option<String>,
    /// Largest request body, counted as it streams; larger → 413 [default: 10MiB]
    #[arg(long, env = "FLAGGATE_MAX_REQUEST_BODY", value_name = "SIZE")]
    pub max_request_body: Option<String>,
    /// A request body is read into memory up to this size before the request takes an upstream slot;
    /// longer bodies stream on from there [default: 64KiB]
    #[arg(long, env = "FLAGGATE_REQUEST_BODY_BUFFER", value_name = "SIZE")]
    pub request_body_buffer: Option<String>,
    /// Slowest average rate a streamed request body may keep (after header_read_timeout), per second;
    /// slower → 408. `0` turns it off [default: 4KiB]
    #[arg(long, env = "FLAGGATE_MIN_REQUEST_BODY_RATE", value_name = "SIZE")]
    pub min_request_body_rate: Option<String>,
    /// Most concurrent HTTP/2 streams per connection [default: 128]
    #[arg(long, env = "FLAGGATE_H2_MAX_STREAMS", value_name = "N")]
    pub h2_max_streams: Option<String>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish [default: 15s]
    #[arg(long, env = "FLAGGATE_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); reloaded when the file changes
    #[arg(long, env = "FLAGGATE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// Private key for --tls-cert (PEM)
    #[arg(long, env = "FLAGGATE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// Require client certificates signed by this CA (PEM) — mTLS
    #[arg(long, env = "FLAGGATE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<String>,
    /// Extra CA (PEM) trusted for an https:// upstream, besides the platform roots
    #[arg(long, env = "FLAGGATE_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<String>,
    /// Client certificate (PEM) presented to an https:// upstream (mTLS)
    #[arg(long, env = "FLAGGATE_UPSTREAM_CLIENT_CERT", value_name = "FILE")]
    pub upstream_client_cert: Option<String>,
    /// Private key (PEM) for --upstream-client-cert
    #[arg(long, env = "FLAGGATE_UPSTREAM_CLIENT_KEY", value_name = "FILE")]
    pub upstream_client_key: Option<String>,
    /// Per-token rate limit for client/backend tokens, RATE[:BURST] per token [default: off]
    #[arg(long, env = "FLAGGATE_RATE_LIMIT_CLIENT", value_name = "RATE[:BURST]")]
    pub rate_limit_client: Option<String>,
    /// Per-token rate limit for frontend tokens, e.g. 50:100 [default: off]
    #[arg(long, env = "FLAGGATE_RATE_LIMIT_FRONTEND", value_name = "RATE[:BURST]")]
    pub rate_limit_frontend: Option<String>,
    /// Per-token rate limit for admin tokens [default: off]
    #[arg(long, env = "FLAGGATE_RATE_LIMIT_ADMIN", value_name = "RATE[:BURST]")]
    pub rate_limit_admin: Option<String>,
    /// Per-token rate limit for personal access tokens [default: off]
    #[arg(long, env = "FLAGGATE_RATE_LIMIT_PAT", value_name = "RATE[:BURST]")]
    pub rate_limit_pat: Option<String>,
    /// Most PAT checks per second sent to Unleash (Unleash-sync mode) [default: 10]
    #[arg(long, env = "FLAGGATE_PAT_RATE_LIMIT", value_name = "N")]
    pub pat_rate_limit: Option<String>,
    /// How many refused PATs are remembered [default: 10000]
    #[arg(long, env = "FLAGGATE_PAT_NEGATIVE_CACHE_SIZE", value_name = "N")]
    pub pat_negative_cache_size: Option<String>,
    /// How long a refused PAT is remembered [default: 60s]
    #[arg(long, env = "FLAGGATE_PAT_NEGATIVE_TTL", value_name = "DURATION")]
    pub pat_negative_ttl: Option<String>,
}

/// Flag/env names of each key, for error messages.
fn cli_names(key: &str) -> String {
    format!("--{} / FLAGGATE_{}", key.replace('_', "-"), key.to_uppercase())
}

struct Layers<'a> {
    file: Option<&'a Path>,
}

impl Layers<'_> {
    /// Picks flag/env, else file, else default, and parses it, naming the origin on error.
    fn pick<T>(
        &self,
        key: &'static str,
        cli: &Option<String>,
        file: &Option<String>,
        default: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let (value, origin) = match (cli, file) {
            (Some(v), _) => (v.as_str(), cli_names(key)),
            (None, Some(v)) => (v.as_str(), self.file_origin()),
            (None, None) => match default {
                Some(d) => (d, "default".to_string()),
                None => return Ok(None),
            },
        };
        parse(value)
            .map(Some)
            .map_err(|reason| ConfigError::new(origin, key, reason))
    }

    fn file_origin(&self) -> String {
        format!(
            "config file {}",
            self.file.map(|p| p.display().to_string()).unwrap_or_default()
        )
    }

    /// Relative paths in the config file are relative to the file, not to the working directory.
    fn path_from(&self, cli: &Option<String>, file: &Option<String>) -> Option<PathBuf> {
        match (cli, file) {
            (Some(v), _) => Some(PathBuf::from(v)),
            (None, Some(v)) => {
                let p = PathBuf::from(v);
                Some(match self.file.and_then(Path::parent) {
                    Some(dir) if p.is_relative() => dir.join(p),
                    _ => p,
                })
            }
            (None, None) => None,
        }
    }
}

fn must<T>(v: Option<T>) -> T {
    // Only called where a default was supplied, so `pick` always returns Some.
    v.unwrap_or_else(|| unreachable!("setting with a default resolved to nothing"))
}

impl Settings {
    /// Reads the config file (if any) and merges everything into one validated [`Config`].
    pub fn resolve(&self) -> Result<(Config, Vec<String>), ConfigError> {
        let file_path = self.config.as_deref();
        let file: FileSettings = match file_path {
            Some(p) => {
                let origin = format!("config file {}", p.display());
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::new(&origin, "config", format!("cannot read: {e}")))?;
                toml::from_str(&text).map_err(|e| {
                    let msg = e.message().to_string();
                    let key = msg
                        .split('`')
                        .nth(1)
                        .filter(|_| msg.starts_with("unknown field"))
                        .map(str::to_string)
                        .or_else(|| {
                            e.span()
                                .map(|s| text[s].lines().next().unwrap_or("").trim().to_string())
                        })
                        .unwrap_or_else(|| "(file)".into());
                    ConfigError::new(origin, key, msg)
                })?
            }
            None => FileSettings::default(),
        };
        let l = Layers { file: file_path };
        let mut warnings = Vec::new();

        let upstream = must(l.pick(
            "upstream",
            &self.upstream,
            &file.upstream,
            Some(DEFAULT_UPSTREAM),
            UpstreamUrl::parse,
        )?);
        warnings.extend(upstream.warning);
        let upstream_token = match (&self.upstream_token, &file.upstream_token) {
            (Some(v), _) | (None, Some(v)) if v.trim().is_empty() => {
                return Err(ConfigError::new(
                    cli_names("upstream_token"),
                    "upstream_token",
                    "is empty",
                ))
            }
            (Some(v), _) | (None, Some(v)) => Some(Secret::new(v.trim().to_string())),
            (None, None) => None,
        };
        let token_file = l.path_from(&self.token_file, &file.token_file);
        if token_file.is_none() && upstream_token.is_none() {
            return Err(ConfigError::new(
                "settings",
                "token_file",
                "no token source: set --token-file (FLAGGATE_TOKEN_FILE) and/or --upstream-token (FLAGGATE_UPSTREAM_TOKEN)",
            ));
        }
        let file_rules = file.routes;
        let mut routes = Vec::with_capacity(file_rules.len());
        for (i, r) in file_rules.into_iter().enumerate() {
            routes.push(parse_rule(file_path.unwrap_or(Path::new("")), i, r)?);
        }
        for (i, r) in routes.iter().enumerate() {
            if routes[..i].iter().any(|o| o.name == r.name || o.prefix == r.prefix) {
                return Err(ConfigError::new(
                    l.file_origin(),
                    format!("routes[{i}]"),
                    "duplicate rule name or prefix",
                ));
            }
        }
        let cfg = Config {
            config_file: file_path.map(Path::to_path_buf),
            listen: must(l.pick("listen", &self.listen, &file.listen, Some(DEFAULT_LISTEN), parse_addr)?),
            admin_listen: must(l.pick(
                "admin_listen",
                &self.admin_listen,
                &file.admin_listen,
                Some(DEFAULT_ADMIN_LISTEN),
                parse_addr,
            )?),
            upstream: upstream.upstream,
            token_file,
            upstream_token,
            sync_interval: must(l.pick(
                "sync_interval",
                &self.sync_interval,
                &file.sync_interval,
                Some("5s"),
                parse_duration,
            )?),
            state_dir: l.path_from(&self.state_dir, &file.state_dir),
            log_format: must(l.pick(
                "log_format",
                &self.log_format,
                &file.log_format,
                Some("json"),
                parse_log_format,
            )?),
            log_level: l.pick(
                "log_level",
                &self.log_level,
                &file.log_level,
                None,
                crate::telemetry::valid_log_level,
            )?,
            upstream_connect_timeout: must(l.pick(
                "upstream_connect_timeout",
                &self.upstream_connect_timeout,
                &file.upstream_connect_timeout,
                Some("2s"),
                parse_duration,
            )?),
            upstream_timeout: must(l.pick(
                "upstream_timeout",
                &self.upstream_timeout,
                &file.upstream_timeout,
                Some("30s"),
                parse_duration,
            )?),
            header_read_timeout: must(l.pick(
                "header_read_timeout",
                &self.header_read_timeout,
                &file.header_read_timeout,
                Some("10s"),
                parse_duration,
            )?),
            idle_timeout: must(l.pick(
                "idle_timeout",
                &self.idle_timeout,
                &file.idle_timeout,
                Some("75s"),
                parse_duration,
            )?),
            max_connections: must(l.pick(
                "max_connections",
                &self.max_connections,
                &file.max_connections,
                Some("10000"),
                parse_count,
            )?),
            upstream_max_inflight: must(l.pick(
                "upstream_max_inflight",
                &self.upstream_max_inflight,
                &file.upstream_max_inflight,
                Some("1024"),
                parse_count,
            )?),
            upstream_max_inflight_per_connection: must(l.pick(
                "upstream_max_inflight_per_connection",
                &self.upstream_max_inflight_per_connection,
                &file.upstream_max_inflight_per_connection,
                Some("32"),
                parse_count,
            )?),
            upstream_max_inflight_per_token: l.pick(
                "upstream_max_inflight_per_token",
                &self.upstream_max_inflight_per_token,
                &file.upstream_max_inflight_per_token,
                None,
                parse_count,
            )?,
            max_header_bytes: must(l.pick(
                "max_header_bytes",
                &self.max_header_bytes,
                &file.max_header_bytes,
                Some("16KiB"),
                |v| match parse_bytes(v)? {
                    n if n < 8192 => Err(format!("`{v}` is below the minimum of 8KiB")),
                    n if n > 1 << 20 => Err(format!("`{v}` is above the maximum of 1MiB")),
                    n => Ok(n as usize),
                },
            )?),
            max_request_body: must(l.pick(
                "max_request_body",
                &self.max_request_body,
                &file.max_request_body,
                Some("10MiB"),
                parse_bytes,
            )?),
            request_body_buffer: must(l.pick(
                "request_body_buffer",
                &self.request_body_buffer,
                &file.request_body_buffer,
                Some("64KiB"),
                |v| match parse_bytes(v)? {
                    n if n > 16 << 20 => Err(format!("`{v}` is above the maximum of 16MiB")),
                    n => Ok(n as usize),
                },
            )?),
            min_request_body_rate: must(l.pick(
                "min_request_body_rate",
                &self.min_request_body_rate,
                &file.min_request_body_rate,
                Some("4KiB"),
                |v| {
                    if v.trim() == "0" {
                        Ok(0)
                    } else {
                        parse_bytes(v.trim().trim_end_matches("/s"))
                    }
                },
            )?),
            h2_max_streams: must(l.pick(
                "h2_max_streams",
                &self.h2_max_streams,
                &file.h2_max_streams,
                Some("128"),
                parse_count,
            )?),
            shutdown_grace: must(l.pick(
                "shutdown_grace",
                &self.shutdown_grace,
                &file.shutdown_grace,
                Some("15s"),
                parse_duration,
            )?),
            tls: {
                let cert = l.path_from(&self.tls_cert, &file.tls_cert);
                let key = l.path_from(&self.tls_key, &file.tls_key);
                let client_ca = l.path_from(&self.tls_client_ca, &file.tls_client_ca);
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
            },
            upstream_ca: l.path_from(&self.upstream_ca, &file.upstream_ca),
            upstream_client_cert: l.path_from(&self.upstream_client_cert, &file.upstream_client_cert),
            upstream_client_key: l.path_from(&self.upstream_client_key, &file.upstream_client_key),
            pat_rate_limit: must(l.pick(
                "pat_rate_limit",
                &self.pat_rate_limit,
                &file.pat_rate_limit,
                Some("10"),
                parse_count,
            )?),
            pat_negative_cache_size: must(l.pick(
                "pat_negative_cache_size",
                &self.pat_negative_cache_size,
                &file.pat_negative_cache_size,
                Some("10000"),
                parse_count,
            )?),
            pat_negative_ttl: must(l.pick(
                "pat_negative_ttl",
                &self.pat_negative_ttl,
                &file.pat_negative_ttl,
                Some("60s"),
                parse_duration,
            )?),
            rate_limits: {
                use crate::ratelimit::Rate;
                use crate::token::TokenKind;
                let mut limits = crate::ratelimit::RateLimits::default();
                let kinds = [
                    (
                        TokenKind::Client,
                        "rate_limit_client",
                        &self.rate_limit_client,
                        &file.rate_limit_client,
                    ),
                    (
                        TokenKind::Frontend,
                        "rate_limit_frontend",
                        &self.rate_limit_frontend,
                        &file.rate_limit_frontend,
                    ),
                    (
                        TokenKind::Admin,
                        "rate_limit_admin",
                        &self.rate_limit_admin,
                        &file.rate_limit_admin,
                    ),
                    (
                        TokenKind::Pat,
                        "rate_limit_pat",
                        &self.rate_limit_pat,
                        &file.rate_limit_pat,
                    ),
                ];
                for (kind, key, cli, f) in kinds {
                    if let Some(r) = l.pick(key, cli, f, None, Rate::parse)? {
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
            },
            routes,
        };
        if cfg.listen == cfg.admin_listen && cfg.listen.port() != 0 {
            return Err(ConfigError::new("settings", "admin_listen", "must differ from listen"));
        }
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
        assert_eq!(cfg.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
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
