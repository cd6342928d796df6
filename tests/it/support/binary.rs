//! The flaggate binary itself, for tests that drive it as operators do.
//!
//! [`spawn`] starts it on port 0 and learns the real ports from its `flaggate started` log line, so no
//! test has to guess a free port (and race another process for it); the child is killed when the
//! [`Process`] is dropped, also when the test fails half-way.

use super::patience;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `flaggate` with none of the caller's `FLAGGATE_*` or `RUST_LOG` variables: only what a test passes
/// configures it, and its log lines are the ones the test expects.
pub fn flaggate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flaggate"));
    for (k, _) in std::env::vars() {
        // Proxy variables too: a machine's egress proxy must not carry the tests' loopback traffic.
        let proxy = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"].contains(&k.to_ascii_lowercase().as_str());
        if k.starts_with("FLAGGATE_") || k == "RUST_LOG" || proxy {
            c.env_remove(k);
        }
    }
    c
}

/// A running flaggate child process. Dropping it kills the process (and reaps it).
pub struct Process {
    child: Child,
    /// The proxy listener's real address.
    pub proxy: SocketAddr,
    /// The admin listener's real address.
    pub admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

/// Starts `flaggate <args> --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json` (`args`
/// begins with the subcommand: `run` or `demo`) and waits for its `flaggate started` line.
pub fn spawn(args: &[&str]) -> Process {
    spawn_command(flaggate().args(args))
}

/// Like [`spawn`] for a command the test prepared (environment, working directory, arguments after
/// [`flaggate`]): adds the port-0 listeners and JSON logs, pipes stdout and stderr, and waits for the
/// `flaggate started` line on stderr. Panics, showing what the process wrote, if it exits first or no
/// such line comes within 20 s (times the patience).
pub fn spawn_command(cmd: &mut Command) -> Process {
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the flaggate binary");
    let stdout = collect(child.stdout.take().unwrap(), None);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = collect(
        child.stderr.take().unwrap(),
        Some(Box::new(move |line: &str| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return;
            };
            if v["message"] == "flaggate started" {
                let addr = |k: &str| -> Option<SocketAddr> { v[k].as_str()?.parse().ok() };
                let _ = tx.send((addr("listen"), addr("admin_listen"), line.to_string()));
            }
        })),
    );
    let limit = patience(Duration::from_secs(20));
    let mut process = Process {
        child,
        proxy: ([0, 0, 0, 0], 0).into(),
        admin: ([0, 0, 0, 0], 0).into(),
        stderr,
        stdout,
    };
    match rx.recv_timeout(limit) {
        Ok((Some(proxy), Some(admin), _)) => {
            process.proxy = proxy;
            process.admin = admin;
            process
        }
        Ok((_, _, line)) => panic!("the started line lacks `listen` or `admin_listen`: {line}"),
        Err(_) => {
            let exited = process.child.try_wait().ok().flatten();
            panic!(
                "flaggate did not log `flaggate started` within {limit:?} (exit status: {exited:?})\n--- stderr ---\n{}\n--- stdout ---\n{}",
                process.stderr(),
                process.stdout_lines().join("\n")
            )
        }
    }
}

type OnLine = Box<dyn FnMut(&str) + Send>;

/// Reads `from` line by line on a thread, keeping every line (and showing it to `on_line`).
fn collect(from: impl Read + Send + 'static, mut on_line: Option<OnLine>) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Some(f) = on_line.as_mut() {
                f(&line);
            }
            l.lock().unwrap().push(line);
        }
    });
    lines
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far (its log).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The lines the process wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until a stdout line satisfies `pred` and returns the lines before it; panics after `limit`
    /// (pass it through [`patience`]).
    pub fn stdout_until(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let started = Instant::now();
        loop {
            let lines = self.stdout_lines();
            if let Some(i) = lines.iter().position(|l| pred(l)) {
                return lines[..i].to_vec();
            }
            assert!(
                started.elapsed() < limit,
                "the awaited stdout line did not come within {limit:?}; stdout so far:\n{}\n--- stderr ---\n{}",
                lines.join("\n"),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (what a container runtime or systemd sends to stop it).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit on its own; `None` if it still runs after `limit`. Blocking: in an
    /// async test, call it from `spawn_blocking`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that refuses connections: a bound socket that does not listen. While the socket
/// lives, no other process can take the port (unlike "bind port 0, note it, close it"); call
/// `listen` on the socket to start answering on that very port.
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(([127, 0, 0, 1], 0).into()).expect("bind a loopback port");
    let addr = s.local_addr().expect("local_addr");
    (s, addr)
}
