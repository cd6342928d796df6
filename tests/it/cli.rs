//! The binary as operators and newcomers meet it: config errors, `check-config`, `token explain`, and
//! `flaggate demo` whose printed curl lines must give the statuses they promise.

use crate::support::binary::{flaggate, spawn_command};
use crate::support::patience;
use std::process::{Command, Stdio};
use std::time::Duration;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn config_errors_name_the_file_the_key_and_the_reason_and_exit_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let cases = [
        (
            format!("token_file = {tokens:?}\nlisen = \"0.0.0.0:1\"\n"),
            "lisen",
            "unknown field",
        ),
        (
            format!("token_file = {tokens:?}\nlisten = \"not-an-address\"\n"),
            "listen",
            "socket address",
        ),
        (
            format!("token_file = {tokens:?}\nupstream = \"ftp://unleash\"\n"),
            "upstream",
            "scheme",
        ),
        (
            format!("token_file = {tokens:?}\nadmin_listen = \"1.2.3.4\"\n"),
            "admin_listen",
            "socket address",
        ),
        (
            format!("token_file = {tokens:?}\nlog_format = \"xml\"\n"),
            "log_format",
            "json, pretty",
        ),
    ];
    for (text, key, reason) in cases {
        let cfg = write(&dir, "flaggate.toml", &text);
        for sub in [&["check-config"][..], &["run"][..]] {
            let out = flaggate().args(sub).args(["--config", &cfg]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{sub:?} {key}: exited 0");
            assert!(
                err.contains(&cfg) && err.contains(&format!("`{key}`")) && err.contains(reason),
                "{sub:?}: {err}"
            );
        }
    }
    // The same key from a flag or env var is named by its flag/env names.
    let out = flaggate()
        .args(["check-config", "--token-file", &tokens, "--listen", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen / FLAGGATE_LISTEN"));
    let out = flaggate()
        .args(["check-config", "--token-file", &tokens])
        .env("FLAGGATE_UPSTREAM", "unleash:4242")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`upstream`"));
    // A broken token file is named with the entry and key.
    let bad = write(
        &dir,
        "bad-tokens.yaml",
        "tokens:\n  - secret: abc\n    type: superuser\n",
    );
    let out = flaggate()
        .args(["check-config", "--token-file", &bad])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad-tokens.yaml") && err.contains("tokens[0].type"),
        "{err}"
    );
}

#[test]
fn precedence_is_flag_over_env_over_file_and_check_config_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let cfg = write(
        &dir,
        "flaggate.toml",
        &format!("token_file = {tokens:?}\nlisten = \"127.0.0.1:1001\"\nadmin_listen = \"127.0.0.1:2001\"\nsync_interval = \"1m\"\nupstream_token = \"*:*.file-secret-value\"\n"),
    );
    let out = flaggate()
        .args(["check-config", "--config", &cfg, "--listen", "127.0.0.1:1002"])
        .env("FLAGGATE_LISTEN", "127.0.0.1:1003")
        .env("FLAGGATE_ADMIN_LISTEN", "127.0.0.1:2003")
        .env("FLAGGATE_UPSTREAM_TOKEN", "*:*.env-secret-value")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("listen = 127.0.0.1:1002"), "flag wins: {text}");
    assert!(text.contains("admin_listen = 127.0.0.1:2003"), "env beats file: {text}");
    assert!(text.contains("sync_interval = 1m"), "file beats default: {text}");
    assert!(text.contains("upstream_token = <redacted"), "{text}");
    assert!(!text.contains("secret-value"), "secret printed: {text}");
}

#[test]
fn upstream_with_api_suffix_is_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let out = flaggate()
        .args([
            "check-config",
            "--token-file",
            &tokens,
            "--upstream",
            "http://127.0.0.1:4242/api",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("upstream = http://127.0.0.1:4242\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/api"));
}

#[test]
fn token_explain_shows_kind_and_reach_but_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        &dir,
        "tokens.yaml",
        "tokens:\n  - secret: \"default:production.s3cr3t-value\"\n    type: frontend\n    environment: production\n    projects: [default]\n    name: web\n",
    );
    let out = flaggate()
        .args([
            "token",
            "explain",
            "default:production.s3cr3t-value",
            "--token-file",
            &tokens,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("kind:        frontend"), "{text}");
    assert!(text.contains("environment: production"), "{text}");
    assert!(
        text.contains("frontend (/api/frontend)") && !text.contains("client (/api/client)"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "secret echoed: {text}");
    let fp = &flaggate::internals::Digest::of("default:production.s3cr3t-value")
        .fingerprint()
        .to_string();
    assert!(text.contains(fp));

    // From stdin, and without any config: the label is read, the rest is said to depend on the store.
    let mut child = flaggate()
        .args(["token", "explain", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"user:abcdef-pat-secret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("personal access token") && text.contains("admin-api"),
        "{text}"
    );
    assert!(!text.contains("abcdef-pat-secret"));
}

/// Runs `flaggate demo` on ephemeral ports and executes each printed curl line with real curl.
#[test]
fn demo_prints_curl_lines_that_give_the_statuses_they_claim() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required for this test (CI installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = spawn_command(flaggate().arg("demo").current_dir(dir.path()));
    let lines = demo.stdout_until(patience(Duration::from_secs(30)), |l| l.contains("press Ctrl-C"));
    let curls: Vec<(String, u16)> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("curl "))
        .map(|l| {
            let (cmd, rest) = l.split_once("   # expect ").expect("curl line has an expectation");
            (cmd.trim().to_string(), rest[..3].parse().unwrap())
        })
        .collect();
    assert!(curls.len() >= 8, "demo printed: {lines:#?}");
    for want in [200, 401, 403, 400] {
        assert!(curls.iter().any(|(_, s)| *s == want), "no line shows {want}");
    }
    let mut failures = Vec::new();
    for (cmd, want) in &curls {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} -o /dev/null -w '%{{http_code}}'"))
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got != want.to_string() {
            failures.push(format!("{cmd}: got {got}, demo promised {want}"));
        }
    }
    // The sample server answers feature polls as Unleash does, so the shield keeps them: the first
    // line's poll again is answered from memory.
    let (first, _) = &curls[0];
    assert!(first.ends_with("/api/client/features'"), "{first}");
    Command::new("sh")
        .arg("-c")
        .arg(format!("{first} -o /dev/null"))
        .output()
        .unwrap();
    let metrics_url = lines
        .iter()
        .find_map(|l| l.split("(admin: ").nth(1).and_then(|r| r.strip_suffix(')')))
        .expect("the demo prints its metrics URL");
    let scrape = Command::new("curl").args(["-s", metrics_url]).output().unwrap();
    let scrape = String::from_utf8_lossy(&scrape.stdout);
    let hits = scrape
        .lines()
        .find_map(|l| l.strip_prefix("flaggate_shield_requests_total{result=\"hit\"} "))
        .unwrap_or("0");
    assert!(
        hits.parse::<f64>().unwrap() >= 1.0,
        "no shield hit in the demo: {scrape}"
    );
    drop(demo);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn check_config_prints_every_limit_in_effect() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let cfg = write(
        &dir,
        "flaggate.toml",
        &format!("token_file = {tokens:?}\nupstream_max_inflight = 64\nmax_request_body = \"1MiB\"\n\n[[rate_limit_tokens]]\nname = \"ci\"\nrate = \"5:10\"\n"),
    );
    let out = flaggate()
        .args(["check-config", "--config", &cfg, "--rate-limit-frontend", "50:100"])
        .env("FLAGGATE_IDLE_TIMEOUT", "30s")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "upstream_max_inflight = 64\n",
        "max_request_body = 1MiB\n",
        "idle_timeout = 30s\n",
        "max_connections = 10000\n",
        "max_header_bytes = 16KiB\n",
        "h2_max_streams = 128\n",
        "shutdown_grace = 15s\n",
        "tls_cert = (none)\n",
        "pat_rate_limit = 10/s\n",
        "rate_limit_client = off\n",
        "rate_limit_frontend = 50:100\n",
        "rate_limit_tokens ci = 5:10\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn token_explain_is_a_clean_report_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        &dir,
        "tokens.yaml",
        "tokens:\n  - secret: \"*:development.explain-expiring\"\n    type: client\n    expires_at: 2030-01-02T03:04:05Z\n",
    );
    let run = |args: &[&str]| {
        let out = flaggate().args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // `Bearer x` is read as the gateway reads Authorization; expiry is a date; no Rust debug values.
    let text = run(&[
        "token",
        "explain",
        "Bearer *:development.explain-expiring",
        "--token-file",
        &tokens,
    ]);
    assert!(text.contains("kind:        client"), "{text}");
    assert!(text.contains("expires at:  2030-01-02T03:04:05Z"), "{text}");
    assert!(
        !text.contains("One(") && !text.contains("Bearer") && !text.contains("explain-expiring"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&run(&[
        "token",
        "explain",
        "--json",
        "*:development.explain-expiring",
        "--token-file",
        &tokens,
    ]))
    .unwrap();
    assert_eq!(json["kind"], "client");
    assert_eq!(json["expires_at"], "2030-01-02T03:04:05Z");
    assert_eq!(json["expired"], false);
    assert!(json["may_reach"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "client (/api/client)"));
    // A PAT nothing has validated: no claim beyond "if Unleash accepts it".
    let pat = run(&["token", "explain", "user:explain-pat"]);
    assert!(pat.contains("only Unleash can say"), "{pat}");
    assert!(pat.contains("(if Unleash accepts it)"), "{pat}");
}

#[test]
fn messages_say_where_and_what_and_take_what_people_write() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let check = |toml: &str| {
        let cfg = write(&dir, "flaggate.toml", &format!("token_file = {tokens:?}\n{toml}"));
        flaggate().args(["check-config", "--config", &cfg]).output().unwrap()
    };
    // A TOML syntax error: line and column, and the real problem.
    let out = check("listen = \"127.0.0.1:1\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("line 2, column"), "{err}");
    // A misspelt key: which, and the likely one.
    let err = String::from_utf8_lossy(&check("sync_intervall = \"5s\"\n").stderr).into_owned();
    assert!(
        err.contains("`sync_intervall`") && err.contains("did you mean `sync_interval`"),
        "{err}"
    );
    // Sizes as people write them: SI is powers of 1000, fractions are fine; a wrong unit says what works.
    let out = check("max_request_body = \"1.5MiB\"\nrequest_body_buffer = \"10KB\"\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_request_body = 1.5MiB"), "{text}");
    let err = String::from_utf8_lossy(&check("max_request_body = \"10 furlongs\"\n").stderr).into_owned();
    assert!(err.contains("KiB/MiB/GiB") && err.contains("KB/MB/GB"), "{err}");
    // Addresses as people type them.
    for listen in ["localhost:4243", ":4243"] {
        let out = check(&format!("listen = \"{listen}\"\n"));
        assert!(
            out.status.success(),
            "{listen}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An SDK URL given as the upstream: a warning, not silence.
    let out = flaggate()
        .args([
            "check-config",
            "--token-file",
            &tokens,
            "--upstream",
            "https://flags.example.com/api/client/features",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/api/"));
}

#[test]
fn a_port_in_use_is_said_once_and_the_demo_leaves_no_temp_directory() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let out = flaggate()
        .args([
            "run",
            "--token-file",
            &tokens,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");

    // The demo, run away from the repository, writes its token file to a temp directory: gone after.
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = flaggate();
    cmd.arg("demo").current_dir(cwd.path()).env("TMPDIR", tmp.path());
    let mut demo = spawn_command(&mut cmd);
    let made: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert_eq!(made.len(), 1, "the demo's token directory: {made:?}");
    demo.sigterm();
    assert!(demo.wait_exit(patience(Duration::from_secs(20))).is_some());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `config/flaggate.toml` documents every setting of the table, and is a working configuration both as
/// shipped (all commented) and with every setting line uncommented.
#[test]
fn the_example_config_names_every_setting_and_passes_check_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example = std::fs::read_to_string(format!("{root}/config/flaggate.toml")).unwrap();
    for m in flaggate::config::SETTINGS {
        assert!(
            example.contains(&format!("\n# {} = ", m.key)),
            "config/flaggate.toml does not show `{}`",
            m.key
        );
        assert!(example.contains(m.env), "config/flaggate.toml does not name {}", m.env);
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    let as_shipped = write(&dir, "shipped.toml", &example);
    let uncommented: String = example
        .lines()
        .filter_map(|l| {
            let setting = l.strip_prefix("# ")?;
            let key = setting.split(" = ").next()?;
            flaggate::config::SETTINGS
                .iter()
                .any(|m| m.key == key)
                .then(|| format!("{setting}\n"))
        })
        .collect();
    assert_eq!(uncommented.lines().count(), flaggate::config::SETTINGS.len());
    let everything = write(&dir, "everything.toml", &uncommented);
    for cfg in [as_shipped, everything] {
        let out = flaggate()
            .args(["check-config", "--config", &cfg, "--token-file", &tokens])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cfg}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_logs_have_no_colour_codes_off_a_terminal_and_the_listen_backlog_is_what_was_set() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(&dir, "tokens.yaml", "tokens: []\n");
    // stderr is a pipe here, as it is for files, journald and log shippers.
    let mut cmd = flaggate();
    cmd.args(["run", "--token-file", &tokens, "--listen-backlog", "77"]);
    let gw = spawn_command(&mut cmd);
    // The spawn helper asks for JSON; a second process shows the pretty format.
    let mut pretty = flaggate();
    pretty.args([
        "run",
        "--token-file",
        &tokens,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "pretty",
    ]);
    pretty.stderr(Stdio::piped()).stdout(Stdio::null());
    let mut child = pretty.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(10));
    while !String::from_utf8_lossy(&seen).contains("flaggate started") && std::time::Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        use std::io::Read;
        match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("flaggate started"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a piped log: {text:?}");

    // The proxy listener's accept queue: the Send-Q of a listening socket, as `ss` (iproute2, installed
    // by .ci/run) shows it.
    let ss = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", gw.proxy.port())])
        .output()
        .expect("ss (iproute2) is needed for this test");
    let line = String::from_utf8_lossy(&ss.stdout).into_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.get(2).copied(), Some("77"), "ss: {line}");
}
