#![forbid(unsafe_code)]
// A command-line tool: printing its reports and errors is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flaggate::config::{parse_log_format, Config, Settings};
use flaggate::internals::Policy;
use flaggate::internals::{self as token, Digest, Shape, TokenKind};
use std::io::Read;
use std::path::PathBuf;

/// A token-checking reverse proxy for Unleash. Without a subcommand, `run` is assumed.
#[derive(Parser)]
#[command(name = "flaggate", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default)
    Run(Settings),
    /// Run the gateway in front of a built-in sample flag server, with demo tokens
    Demo(DemoArgs),
    /// Validate the configuration and print it with secrets redacted
    CheckConfig(Settings),
    /// Inspect tokens
    #[command(subcommand)]
    Token(TokenCmd),
    /// Probe this instance's admin /ready endpoint: exit 0 when ready (container HEALTHCHECK)
    Health(HealthArgs),
}

#[derive(Args)]
struct HealthArgs {
    /// Admin address to probe; an unspecified address (0.0.0.0, ::) probes loopback
    #[arg(long, env = "FLAGGATE_ADMIN_LISTEN", default_value = flaggate::config::default_of("admin_listen"))]
    admin_listen: String,
    /// Probe /health (alive) instead of /ready
    #[arg(long)]
    live: bool,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Show how the gateway sees a token (kind, projects, reachable routes); never prints the secret.
    /// Pass `-` to read the token from stdin and keep it out of shell history.
    Explain {
        token: String,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Gateway address for the demo
    #[arg(long, default_value = "127.0.0.1:4243")]
    listen: String,
    /// Admin address for the demo
    #[arg(long, default_value = "127.0.0.1:9243")]
    admin_listen: String,
    /// Demo token file [default: config/demo-tokens.yaml if present, else the built-in copy]
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Log format: json or pretty
    #[arg(long, default_value = "pretty")]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => run(cli.settings),
        Some(Cmd::Run(s)) => run(s),
        Some(Cmd::Demo(d)) => demo(d),
        Some(Cmd::CheckConfig(s)) => check_config(s),
        Some(Cmd::Token(TokenCmd::Explain { token, json, settings })) => explain(&token, json, settings),
        Some(Cmd::Health(h)) => health(h),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flaggate: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

type LogGuard = tracing_appender::non_blocking::WorkerGuard;

fn resolve(settings: &Settings) -> anyhow::Result<(Config, LogGuard)> {
    let (cfg, warnings) = settings.resolve()?;
    let guard = flaggate::telemetry::init_logging(cfg.log_format, cfg.log_level.as_deref());
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok((cfg, guard))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("flaggate")
        .build()
        .context("starting the async runtime")
}

fn run(settings: Settings) -> anyhow::Result<()> {
    let (cfg, _log) = resolve(&settings)?;
    runtime()?.block_on(async move {
        let running = flaggate::app::start(cfg, Some(settings)).await?;
        spawn_sighup(running.reload_handle());
        wait_for_signal().await;
        tracing::info!("shutdown requested: readiness is now 503, no new connections, draining in-flight requests");
        running.shutdown();
        running.wait().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGHUP → configuration reload (the config file is also watched).
fn spawn_sighup(reload: tokio::sync::mpsc::Sender<()>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration");
            let _ = reload.try_send(());
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn health(args: HealthArgs) -> anyhow::Result<()> {
    let mut addr: std::net::SocketAddr = args.admin_listen.parse().map_err(|_| {
        anyhow::anyhow!(
            "--admin-listen / FLAGGATE_ADMIN_LISTEN: `{}` is not IP:port",
            args.admin_listen
        )
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let path = if args.live { "/health" } else { "/ready" };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // One request on one connection to our own admin port: hyper's connection-level client, not the
    // pooled one (which belongs to the upstream room, for Unleash).
    let status = rt.block_on(async {
        let probe = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, addr.to_string())
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            anyhow::Ok(send.send_request(req).await?.status())
        };
        tokio::time::timeout(std::time::Duration::from_secs(3), probe)
            .await
            .map_err(|_| anyhow::anyhow!("{addr}{path}: no answer within 3 s"))?
    })?;
    if status.is_success() {
        println!("{path}: {status}");
        Ok(())
    } else {
        bail!("{path}: {status}")
    }
}

fn check_config(settings: Settings) -> anyhow::Result<()> {
    let (cfg, warnings) = settings.resolve()?;
    for w in warnings {
        eprintln!("flaggate: warning: {w}");
    }
    if let Some(p) = &cfg.token_file {
        let set = token::load_token_file(p)?;
        println!("# token file {} OK: {} tokens", p.display(), set.len());
    }
    print!("{}", cfg.render());
    Ok(())
}

fn explain(token_arg: &str, json: bool, settings: Settings) -> anyhow::Result<()> {
    let mut buf = String::new();
    let raw = if token_arg == "-" {
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("reading the token from stdin")?;
        buf.trim()
    } else {
        token_arg
    };
    // As the gateway reads Authorization: `Bearer <token>` is the token, not a project named "Bearer".
    let Some(tok) = flaggate::internals::token_from_value(raw) else {
        bail!("empty token");
    };
    let digest = Digest::of(tok);
    let shape = match token::parse(tok) {
        Shape::Pat => serde_json::json!({"form": "personal access token (user:…)"}),
        Shape::Api { projects, environment } => {
            let projects = match projects {
                token::ProjectLabel::All => "all projects (*)".to_string(),
                token::ProjectLabel::Several => "several projects ([])".to_string(),
                token::ProjectLabel::One(p) => p.to_string(),
            };
            serde_json::json!({"form": "API token", "projects_label": projects, "environment_label": environment})
        }
        Shape::Legacy => serde_json::json!({"form": "legacy token without a project:environment label"}),
    };
    // Without a config we can still say what the label suggests; with one we say what the store says.
    let (entry, policy) = match settings.resolve() {
        Ok((cfg, _)) => {
            let entry = match &cfg.token_file {
                Some(p) => token::load_token_file(p)?.get(&digest).cloned(),
                None => None,
            };
            (entry, Policy::new(cfg.routes))
        }
        Err(_) if settings.config.is_none() && settings.token_file.is_none() => (None, Policy::default()),
        Err(e) => return Err(e.into()),
    };
    let rfc3339 = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| t.to_string())
    };
    let reach = |k| -> Vec<String> {
        policy
            .reachable(k)
            .iter()
            .map(|r| format!("{} ({})", r.name, r.prefix))
            .collect()
    };
    let mut report = serde_json::json!({
        "fingerprint": digest.fingerprint().to_string(),
        "shape": shape,
        "note": "the label is informational; Unleash and flaggate authorize by the whole token",
    });
    match &entry {
        Some(info) => {
            let expired = info.is_expired_at(token::now_unix());
            report["found"] = "in the token file".into();
            report["kind"] = info.kind.as_str().into();
            report["projects"] = info.projects.to_vec().into();
            report["environment"] = info.environment.as_deref().unwrap_or("(any)").into();
            report["name"] = info.name.as_deref().unwrap_or("(none)").into();
            if let Some(t) = info.expires_at {
                report["expires_at"] = rfc3339(t).into();
                report["expired"] = expired.into();
            }
            report["may_reach"] = if expired { Vec::new() } else { reach(info.kind) }.into();
        }
        None => {
            report["found"] =
                "not in the configured token file (tokens synced from Unleash are checked at runtime)".into();
            match token::parse(tok).kind_hint() {
                Some(TokenKind::Pat) => {
                    report["kind"] = "pat (by its label; only Unleash can say whether it is valid)".into();
                    report["may_reach_if_unleash_accepts_it"] = reach(TokenKind::Pat).into();
                }
                Some(k) => {
                    report["kind"] = format!("{k} (by its label; not in the token file)").into();
                    report["may_reach_if_unleash_lists_it"] = reach(k).into();
                }
                None => {
                    report["may_reach"] =
                        "depends on its type in the store (client → /api/client, frontend → /api/frontend)".into();
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    let line = |label: &str, v: &serde_json::Value| println!("{:<12} {}", format!("{label}:"), text(v));
    line("fingerprint", &report["fingerprint"]);
    let sh = &report["shape"];
    let mut shape_text = text(&sh["form"]);
    if sh.get("projects_label").is_some() {
        shape_text.push_str(&format!(
            ", projects label {}, environment label {}",
            text(&sh["projects_label"]),
            text(&sh["environment_label"])
        ));
    }
    line("shape", &shape_text.into());
    line("note", &report["note"]);
    line("found", &report["found"]);
    for (key, label) in [
        ("kind", "kind"),
        ("projects", "projects"),
        ("environment", "environment"),
        ("name", "name"),
        ("expires_at", "expires at"),
    ] {
        if let Some(v) = report.get(key) {
            line(label, v);
        }
    }
    if report["expired"] == true {
        line("status", &"EXPIRED: will be denied".into());
    }
    for (key, label) in [
        ("may_reach", "may reach"),
        ("may_reach_if_unleash_accepts_it", "may reach"),
        ("may_reach_if_unleash_lists_it", "may reach"),
    ] {
        if let Some(v) = report.get(key) {
            let mut t = text(v);
            if key != "may_reach" {
                t.push_str(if key.ends_with("accepts_it") {
                    "  (if Unleash accepts it)"
                } else {
                    "  (if Unleash lists it with that kind)"
                });
            }
            line(label, &t.into());
        }
    }
    Ok(())
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let format = parse_log_format(&args.log_format).map_err(|e| anyhow::anyhow!("--log-format: {e}"))?;
    let _log = flaggate::telemetry::init_logging(format, None);
    runtime()?.block_on(async move {
        // The sample flag server: loopback, ephemeral port, clearly not Unleash.
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo upstream")?;
        let upstream_addr = upstream.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(flaggate::internals::serve_simple(
            upstream,
            flaggate::demo::sample_upstream,
            flaggate::demo::UPSTREAM_MAX_CONNECTIONS,
            stop_rx,
        ));
        tracing::info!(addr = %upstream_addr, "DEMO upstream started: a built-in sample flag server, not Unleash");

        // The built-in token file's temporary directory goes when the demo ends, however it ends.
        let mut _cleanup = None;
        let token_file = match args.token_file {
            Some(p) => p,
            None if std::path::Path::new(flaggate::demo::DEMO_TOKENS_PATH).exists() => {
                PathBuf::from(flaggate::demo::DEMO_TOKENS_PATH)
            }
            None => {
                let dir = std::env::temp_dir().join(format!("flaggate-demo-{}", std::process::id()));
                std::fs::create_dir_all(&dir)?;
                let p = dir.join("demo-tokens.yaml");
                std::fs::write(&p, flaggate::demo::DEMO_TOKENS)?;
                _cleanup = Some(RemoveOnDrop(dir));
                p
            }
        };
        let settings = Settings {
            listen: Some(args.listen),
            admin_listen: Some(args.admin_listen),
            upstream: Some(format!("http://{upstream_addr}")),
            token_file: Some(token_file.display().to_string()),
            log_format: Some(args.log_format),
            ..Default::default()
        };
        let (cfg, _) = settings.resolve()?;
        let running = flaggate::app::start(cfg, None).await?;
        println!(
            "flaggate demo: gateway on http://{}  (admin: http://{}/metrics)",
            running.proxy_addr, running.admin_addr
        );
        println!("flaggate demo: upstream is a built-in SAMPLE flag server on http://{upstream_addr}, not Unleash");
        println!(
            "flaggate demo: tokens from {} (public demo secrets)",
            token_file.display()
        );
        println!("Try these:");
        for l in flaggate::demo::curl_lines(running.proxy_addr) {
            println!("  {}   # expect {}: {}", l.command, l.expect, l.why);
        }
        println!("flaggate demo: press Ctrl-C to stop");
        wait_for_signal().await;
        running.shutdown();
        let _ = stop_tx.send(true);
        running.wait().await;
        Ok(())
    })
}
