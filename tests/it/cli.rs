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
