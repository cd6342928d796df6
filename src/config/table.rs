//! Every setting, declared once: its key (the TOML key; `--key-with-dashes` as a flag), environment
//! variable, value name, default, whether a reload applies it live or needs a restart, and help text.
//! From this one table come the command line and environment (clap), the TOML file's shape (serde,
//! unknown keys refused), the defaults `resolve` falls back to, `check-config`'s listing and the reload
//! decision. The typed value of each is parsed in `settings.rs`, one parser per key.

use serde::Deserialize;
use std::path::PathBuf;

/// What a config reload does with a changed setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Swapped in by a reload.
    Live,
    /// Kept as it is until a restart; a reload that changes it says so.
    Restart,
}

/// One setting's declaration.
#[derive(Debug)]
pub struct Meta {
    pub key: &'static str,
    pub env: &'static str,
    pub default: Option<&'static str>,
    /// What `check-config` shows when it is unset (and has no default).
    pub unset: &'static str,
    pub apply: Apply,
    /// Shown redacted (by fingerprint), never in clear.
    pub secret: bool,
    /// A file or directory: relative paths in the config file are relative to the file.
    pub path: bool,
    pub help: &'static str,
}

macro_rules! settings {
    ($(
        $key:ident {
            env: $env:literal, value: $vn:literal,
            $(default: $default:literal,)?
            $(shown: $shown:literal,)?
            $(unset: $unset:literal,)?
            apply: $apply:ident,
            $(secret: $secret:literal,)?
            $(path: $path:literal,)?
            help: $help:literal $(,)?
        }
    )*) => {
        /// Every setting as a flag and an env var. Values stay strings here so that one parser per key
        /// reports errors the same way whether the value came from a flag, the environment or the file.
        #[derive(clap::Args, Debug, Default, Clone)]
        pub struct Settings {
            /// TOML config file (any key below, plus [[routes]] and [[rate_limit_tokens]])
            #[arg(long, env = "FLAGGATE_CONFIG", value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[arg(
                    long,
                    env = $env,
                    value_name = $vn,
                    hide_env_values = settings!(@flag $($secret)?),
                    help = concat!($help $(, " [default: ", $default, "]")? $(, " [default: ", $shown, "]")?),
                )]
                pub $key: Option<String>,
            )*
        }

        /// The TOML file's shape. Unknown keys are errors: a misspelt key silently ignored is a setting
        /// lost.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct FileSettings {
            $(
                #[serde(default, deserialize_with = "super::scalar")]
                pub $key: Option<String>,
            )*
            #[serde(default)]
            pub rate_limit_tokens: Vec<super::FileTokenRate>,
            #[serde(default)]
            pub routes: Vec<super::FileRule>,
        }

        /// The table, in the order settings are listed.
        pub static SETTINGS: &[Meta] = &[$(
            Meta {
                key: stringify!($key),
                env: $env,
                default: settings!(@opt $($default)?),
                unset: settings!(@unset $($unset)?),
                apply: settings!(@apply $apply),
                secret: settings!(@flag $($secret)?),
                path: settings!(@flag $($path)?),
                help: $help,
            },
        )*];

        impl Settings {
            /// The value given on the command line or in the environment.
            pub(crate) fn raw(&self, key: &str) -> Option<&String> {
                match key {
                    $(stringify!($key) => self.$key.as_ref(),)*
                    _ => None,
                }
            }
        }

        impl FileSettings {
            /// The value given in the config file.
            pub(crate) fn raw(&self, key: &str) -> Option<&String> {
                match key {
                    $(stringify!($key) => self.$key.as_ref(),)*
                    _ => None,
                }
            }
        }
    };
    (@opt) => { None };
    (@opt $v:literal) => { Some($v) };
    (@unset) => { "(none)" };
    (@unset $v:literal) => { $v };
    (@apply live) => { Apply::Live };
    (@apply restart) => { Apply::Restart };
    (@flag) => { false };
    (@flag $v:literal) => { $v };
}

settings! {
    listen {
        env: "FLAGGATE_LISTEN", value: "ADDR", default: "0.0.0.0:4243", apply: restart,
        help: "Proxy listener address (host:port, or :port for every interface)",
    }
    admin_listen {
        env: "FLAGGATE_ADMIN_LISTEN", value: "ADDR", default: "0.0.0.0:9243", apply: restart,
        help: "Admin listener for /health, /ready, /metrics",
    }
    listen_backlog {
        env: "FLAGGATE_LISTEN_BACKLOG", value: "N", default: "1024", apply: restart,
        help: "Connections the kernel queues for the proxy listener while the gateway is at max_connections (capped by net.core.somaxconn)",
    }
    upstream {
        env: "FLAGGATE_UPSTREAM", value: "URL", default: "http://127.0.0.1:4242", apply: restart,
        help: "Unleash base URL, without /api",
    }
    token_file {
        env: "FLAGGATE_TOKEN_FILE", value: "FILE", apply: live, path: true,
        help: "YAML token file, watched for changes",
    }
    upstream_proxy {
        env: "FLAGGATE_UPSTREAM_PROXY", value: "env|none|URL", default: "env", apply: restart,
        help: "Egress proxy for every request to Unleash (forwarding, token sync, PAT checks, shield fills): env honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and lowercase); none connects directly; an http:// URL (user:password@ allowed) overrides the environment. https:// upstreams are tunnelled with CONNECT",
    }
    upstream_token {
        env: "FLAGGATE_UPSTREAM_TOKEN", value: "TOKEN", apply: restart, secret: true,
        help: "Admin token or PAT used to sync the token list from Unleash",
    }
    sync_interval {
        env: "FLAGGATE_SYNC_INTERVAL", value: "DURATION", default: "5s", apply: restart,
        help: "How often to sync tokens from Unleash (500ms, 5s, 1m)",
    }
    state_dir {
        env: "FLAGGATE_STATE_DIR", value: "DIR", apply: restart, path: true,
        help: "Directory for the token snapshot used when Unleash is down at start",
    }
    log_format {
        env: "FLAGGATE_LOG_FORMAT", value: "FORMAT", default: "json", apply: restart,
        help: "Log format: json or pretty (colour only on a terminal)",
    }
    log_level {
        env: "FLAGGATE_LOG_LEVEL", value: "FILTER", shown: "RUST_LOG, else info", unset: "(RUST_LOG, else info)", apply: live,
        help: "Log filter, e.g. info, debug, flaggate=debug,hyper=warn; reloadable",
    }
    upstream_connect_timeout {
        env: "FLAGGATE_UPSTREAM_CONNECT_TIMEOUT", value: "DURATION", default: "2s", apply: restart,
        help: "Upstream TCP connect timeout, and how long a request may queue for an upstream slot",
    }
    upstream_timeout {
        env: "FLAGGATE_UPSTREAM_TIMEOUT", value: "DURATION", default: "30s", apply: live,
        help: "Time allowed for Unleash's response headers (streams are exempt once started)",
    }
    header_read_timeout {
        env: "FLAGGATE_HEADER_READ_TIMEOUT", value: "DURATION", default: "10s", apply: live,
        help: "Time a client has to send its request headers, to complete the TLS handshake, and to send the first request_body_buffer bytes of a body; the longest pause inside a longer body",
    }
    idle_timeout {
        env: "FLAGGATE_IDLE_TIMEOUT", value: "DURATION", default: "75s", apply: live,
        help: "Idle keep-alive connections are closed after this, and so is a client that stops reading its response for as long (on HTTP/2: takes less than 16 KiB of a stream's response)",
    }
    max_connections {
        env: "FLAGGATE_MAX_CONNECTIONS", value: "N", default: "10000", apply: restart,
        help: "Most open client connections; more wait in the listen backlog",
    }
    upstream_max_inflight {
        env: "FLAGGATE_UPSTREAM_MAX_INFLIGHT", value: "N", default: "1024", apply: live,
        help: "Most requests forwarded to Unleash at once (each holds an upstream connection until its response ends, event streams included); more wait up to the connect timeout, then get 503",
    }
    upstream_max_inflight_per_connection {
        env: "FLAGGATE_UPSTREAM_MAX_INFLIGHT_PER_CONNECTION", value: "N", default: "32", apply: live,
        help: "One client connection's share of the upstream slots: more of its requests at Unleash at once get 503 (HTTP/2 multiplexes many on one connection)",
    }
    upstream_max_inflight_per_token {
        env: "FLAGGATE_UPSTREAM_MAX_INFLIGHT_PER_TOKEN", value: "N", shown: "a quarter of upstream_max_inflight", unset: "(a quarter of upstream_max_inflight)", apply: live,
        help: "One token's share of the upstream slots (requests without a token share one such share); more of its requests at Unleash at once get 503",
    }
    max_header_bytes {
        env: "FLAGGATE_MAX_HEADER_BYTES", value: "SIZE", default: "16KiB", apply: live,
        help: "Largest request head (request line + headers), 8KiB-1MiB; larger → 431",
    }
    max_request_body {
        env: "FLAGGATE_MAX_REQUEST_BODY", value: "SIZE", default: "10MiB", apply: live,
        help: "Largest request body, counted as it streams; larger → 413",
    }
    request_body_buffer {
        env: "FLAGGATE_REQUEST_BODY_BUFFER", value: "SIZE", default: "64KiB", apply: live,
        help: "A request body is read into memory up to this size before the request takes an upstream slot; longer bodies stream on from there (at most 16MiB)",
    }
    min_request_body_rate {
        env: "FLAGGATE_MIN_REQUEST_BODY_RATE", value: "SIZE", default: "4KiB", apply: live,
        help: "Slowest average rate a streamed request body may keep (after header_read_timeout), per second; slower → 408. `0` turns it off",
    }
    h2_max_streams {
        env: "FLAGGATE_H2_MAX_STREAMS", value: "N", default: "128", apply: live,
        help: "Most concurrent HTTP/2 streams per connection (new connections)",
    }
    shutdown_grace {
        env: "FLAGGATE_SHUTDOWN_GRACE", value: "DURATION", default: "15s", apply: restart,
        help: "On SIGTERM/SIGINT, how long in-flight requests may take to finish",
    }
    tls_cert {
        env: "FLAGGATE_TLS_CERT", value: "FILE", apply: restart, path: true,
        help: "Serve HTTPS with this certificate chain (PEM); reloaded when the file changes",
    }
    tls_key {
        env: "FLAGGATE_TLS_KEY", value: "FILE", apply: restart, path: true,
        help: "Private key for --tls-cert (PEM)",
    }
    tls_client_ca {
        env: "FLAGGATE_TLS_CLIENT_CA", value: "FILE", apply: restart, path: true,
        help: "Require client certificates signed by this CA (PEM) — mTLS",
    }
    upstream_ca {
        env: "FLAGGATE_UPSTREAM_CA", value: "FILE", apply: restart, path: true,
        help: "Extra CA (PEM) trusted for an https:// upstream, besides the platform roots",
    }
    upstream_client_cert {
        env: "FLAGGATE_UPSTREAM_CLIENT_CERT", value: "FILE", apply: restart, path: true,
        help: "Client certificate (PEM) presented to an https:// upstream (mTLS)",
    }
    upstream_client_key {
        env: "FLAGGATE_UPSTREAM_CLIENT_KEY", value: "FILE", apply: restart, path: true,
        help: "Private key (PEM) for --upstream-client-cert",
    }
    rate_limit_client {
        env: "FLAGGATE_RATE_LIMIT_CLIENT", value: "RATE[:BURST]", shown: "off", unset: "off", apply: live,
        help: "Per-token rate limit for client/backend tokens, RATE[:BURST] per token",
    }
    rate_limit_frontend {
        env: "FLAGGATE_RATE_LIMIT_FRONTEND", value: "RATE[:BURST]", shown: "off", unset: "off", apply: live,
        help: "Per-token rate limit for frontend tokens, e.g. 50:100",
    }
    rate_limit_admin {
        env: "FLAGGATE_RATE_LIMIT_ADMIN", value: "RATE[:BURST]", shown: "off", unset: "off", apply: live,
        help: "Per-token rate limit for admin tokens",
    }
    rate_limit_pat {
        env: "FLAGGATE_RATE_LIMIT_PAT", value: "RATE[:BURST]", shown: "off", unset: "off", apply: live,
        help: "Per-token rate limit for personal access tokens",
    }
    trusted_proxies {
        env: "FLAGGATE_TRUSTED_PROXIES", value: "CIDR[,CIDR...]", unset: "(none: the peer is the client)", apply: live,
        help: "Load balancers and ingresses whose X-Forwarded-For is believed: from them the client is the rightmost address not in these networks, and the chain is passed on with the peer appended; from anyone else X-Forwarded-For is replaced by the peer",
    }
    shield {
        env: "FLAGGATE_SHIELD", value: "on|off", default: "on", apply: live,
        help: "Answer SDK feature polls (GET /api/client/features, client/backend tokens) from a per-token cache revalidated with Unleash's ETag; off forwards every poll",
    }
    shield_ttl {
        env: "FLAGGATE_SHIELD_TTL", value: "DURATION", default: "5s", apply: live,
        help: "A cached feature document younger than this is served without asking Unleash (1s-60s); SDKs see changes within this plus their poll interval",
    }
    shield_revalidate_wait {
        env: "FLAGGATE_SHIELD_REVALIDATE_WAIT", value: "DURATION", default: "2s", apply: live,
        help: "How long a poll waits for a revalidation with Unleash before it is served the document in hand",
    }
    shield_max_stale {
        env: "FLAGGATE_SHIELD_MAX_STALE", value: "DURATION", default: "1h", apply: live,
        help: "While Unleash fails (transport errors, timeouts, 5xx, 429), a document confirmed at most this long ago is served; 0 serves nothing stale",
    }
    shield_idle_ttl {
        env: "FLAGGATE_SHIELD_IDLE_TTL", value: "DURATION", default: "10m", apply: restart,
        help: "A cached document nobody polled for this long is dropped",
    }
    shield_max_bytes {
        env: "FLAGGATE_SHIELD_MAX_BYTES", value: "SIZE", default: "256MiB", apply: restart,
        help: "Memory for cached feature documents (bodies, gzip copies, headers, keys); beyond it the least useful are evicted",
    }
    shield_max_entry_bytes {
        env: "FLAGGATE_SHIELD_MAX_ENTRY_BYTES", value: "SIZE", default: "32MiB", apply: restart,
        help: "A feature document larger than this is not cached (forwarded as without the shield)",
    }
    shield_max_query_variants {
        env: "FLAGGATE_SHIELD_MAX_QUERY_VARIANTS", value: "N", default: "8", apply: live,
        help: "Distinct queries (?project=, ?namePrefix=, ?tag=) one token may have cached; more are forwarded",
    }
    shield_persist {
        env: "FLAGGATE_SHIELD_PERSIST", value: "on|off", default: "off", apply: restart,
        help: "Keep the shield's feature documents in state_dir (0600), so a restart while Unleash is down still serves SDKs; off by default: documents can hold user ids and emails from constraints",
    }
    pat_rate_limit {
        env: "FLAGGATE_PAT_RATE_LIMIT", value: "N", default: "10", apply: restart,
        help: "Most PAT checks per second sent to Unleash (Unleash-sync mode)",
    }
    pat_negative_cache_size {
        env: "FLAGGATE_PAT_NEGATIVE_CACHE_SIZE", value: "N", default: "10000", apply: restart,
        help: "How many refused PATs are remembered",
    }
    pat_negative_ttl {
        env: "FLAGGATE_PAT_NEGATIVE_TTL", value: "DURATION", default: "60s", apply: restart,
        help: "How long a refused PAT is remembered",
    }
}

/// The declaration of `key`. Keys are the table's own, so a miss is a programming error.
pub fn meta(key: &str) -> &'static Meta {
    SETTINGS
        .iter()
        .find(|m| m.key == key)
        .unwrap_or_else(|| panic!("`{key}` is not in the settings table"))
}

/// The default of `key` (for flags outside `run`, like `health --admin-listen`).
pub fn default_of(key: &str) -> &'static str {
    meta(key).default.unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_flag_env_and_file_key_of_the_same_name() {
        let file: FileSettings = toml::from_str(
            &SETTINGS
                .iter()
                .map(|m| format!("{} = \"v\"\n", m.key))
                .collect::<String>(),
        )
        .expect("every key is a TOML key");
        for m in SETTINGS {
            assert_eq!(m.env, format!("FLAGGATE_{}", m.key.to_uppercase()), "{}", m.key);
            assert_eq!(file.raw(m.key).map(String::as_str), Some("v"), "{}", m.key);
        }
        let cmd = <Settings as clap::Args>::augment_args(clap::Command::new("t"));
        for m in SETTINGS {
            let flag = m.key.replace('_', "-");
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()))
                .unwrap_or_else(|| panic!("no --{flag}"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(m.env));
            if let Some(d) = m.default {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(help.ends_with(&format!("[default: {d}]")), "{}: {help}", m.key);
            }
        }
    }
}
