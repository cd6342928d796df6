//! The deployment files (deploy/Dockerfile, deploy/docker-compose.yml, deploy/kubernetes/*.yaml,
//! deploy/systemd/*, docs/operations.md) checked against the binary they deploy: every FLAGGATE_* variable
//! they name is one `flaggate run --help` lists, the ports and probe paths are the binary's defaults and
//! real admin endpoints, the health check and entrypoint use real subcommands, the configuration they ship
//! passes `flaggate check-config`, the Kubernetes objects refer to each other correctly, and every stop
//! timeout leaves room for the drain. Renaming a variable, a port, an endpoint or a subcommand on either
//! side fails here. (deploy/lint.sh lints the same files with hadolint, yamllint, kubernetes-validate,
//! compose, promtool and systemd-analyze.)

mod support;

use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::binary::flaggate;

// ---------------------------------------------------------------- the binary

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run flaggate")
}

fn stdout_of(args: &[&str]) -> String {
    let out = output(flaggate().args(args));
    assert!(
        out.status.success(),
        "flaggate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One option of a clap help text: `--flag`, its `[env: NAME]` and `[default: VALUE]`.
#[derive(Debug, Clone, Default)]
struct Opt {
    env: Option<String>,
    default: Option<String>,
}

struct Help {
    /// By long flag name without dashes (`listen`, `admin-listen`).
    opts: BTreeMap<String, Opt>,
}

impl Help {
    fn parse(text: &str) -> Help {
        let mut opts = BTreeMap::new();
        let mut current: Option<(String, String)> = None; // (flag, text of its block)
        fn flush(cur: Option<(String, String)>, opts: &mut BTreeMap<String, Opt>) {
            if let Some((flag, body)) = cur {
                let env = bracket(&body, "[env: ").map(|s| s.split('=').next().unwrap().trim().to_string());
                let default = bracket(&body, "[default: ").map(str::to_string);
                opts.insert(flag, Opt { env, default });
            }
        }
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with('-') {
                flush(current.take(), &mut opts);
                let flag = t
                    .split(|c: char| c.is_whitespace() || c == ',')
                    .find(|w| w.starts_with("--"))
                    .map(|w| w.trim_start_matches("--").to_string());
                if let Some(flag) = flag {
                    current = Some((flag, t.to_string()));
                }
            } else if let Some((_, body)) = current.as_mut() {
                body.push(' ');
                body.push_str(t);
            }
        }
        flush(current.take(), &mut opts);
        Help { opts }
    }

    fn env_names(&self) -> BTreeSet<String> {
        self.opts.values().filter_map(|o| o.env.clone()).collect()
    }

    fn default_of(&self, flag: &str) -> String {
        self.opts
            .get(flag)
            .and_then(|o| o.default.clone())
            .unwrap_or_else(|| panic!("`flaggate run --help` shows no [default: …] for --{flag}"))
    }

    /// The env var of a flag (`listen` → FLAGGATE_LISTEN), as the help prints it.
    fn env_of(&self, flag: &str) -> String {
        self.opts
            .get(flag)
            .and_then(|o| o.env.clone())
            .unwrap_or_else(|| panic!("`flaggate run --help` shows no [env: …] for --{flag}"))
    }
}

fn bracket<'a>(text: &'a str, open: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(']')? + start;
    Some(&text[start..end])
}

fn run_help() -> Help {
    Help::parse(&stdout_of(&["run", "--help"]))
}

/// The subcommands `flaggate --help` lists.
fn subcommands() -> BTreeSet<String> {
    let text = stdout_of(&["--help"]);
    let mut lines = text.lines().skip_while(|l| l.trim() != "Commands:").skip(1);
    let mut out = BTreeSet::new();
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
        out.insert(l.split_whitespace().next().unwrap().to_string());
    }
    assert!(
        out.contains("help"),
        "could not read the Commands: section of `flaggate --help`:\n{text}"
    );
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("`{addr}` has no port"))
}

/// `500ms`, `15s`, `1m`, `2m30s` or a bare number of seconds (systemd, Kubernetes).
fn seconds(s: &str) -> f64 {
    let s = s.trim().trim_matches('"');
    if let Ok(n) = s.parse::<f64>() {
        return n;
    }
    let (mut total, mut num) = (0.0, String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let n: f64 = num.parse().unwrap_or_else(|_| panic!("bad duration `{s}`"));
        num.clear();
        total += n * match unit.as_str() {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => panic!("bad duration unit in `{s}`"),
        };
    }
    assert!(num.is_empty(), "bad duration `{s}`");
    total
}

// ---------------------------------------------------------------- the deploy files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kube_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("deploy/kubernetes/{n}"))
        .collect();
    v.sort();
    v
}

/// Every text file this test covers (docs/operations.md only if it exists).
fn deploy_texts() -> Vec<(String, String)> {
    let mut files = vec![
        "deploy/Dockerfile".to_string(),
        "deploy/docker-compose.yml".to_string(),
        "deploy/systemd/flaggate.service".to_string(),
        "deploy/systemd/flaggate.env.example".to_string(),
        "deploy/prometheus/prometheus.yml".to_string(),
        "deploy/README.md".to_string(),
    ];
    files.extend(kube_files());
    if root().join("docs/operations.md").exists() {
        files.push("docs/operations.md".into());
    }
    files.into_iter().map(|f| (read(&f), f)).map(|(t, f)| (f, t)).collect()
}

/// Kubernetes objects by kind and name, from every manifest in deploy/kubernetes.
struct Kube {
    objects: Vec<(String, Value)>, // (file, object)
}

impl Kube {
    fn load() -> Kube {
        let mut objects = vec![];
        for f in kube_files() {
            for doc in yaml_docs(&f) {
                objects.push((f.clone(), doc));
            }
        }
        Kube { objects }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "expected exactly one {kind} in deploy/kubernetes");
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes"))
    }

    fn container(&self) -> &Value {
        let d = self.one("Deployment");
        let cs = d["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
        cs.iter()
            .find(|c| c["name"].as_str() == Some("flaggate"))
            .expect("Deployment has a container named flaggate")
    }

    /// The ConfigMap holding flaggate.toml.
    fn config_map(&self) -> &Value {
        self.all("ConfigMap")
            .into_iter()
            .find(|c| !c["data"]["flaggate.toml"].is_null())
            .expect("a ConfigMap with a flaggate.toml key")
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (s(k), s(v))).collect())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped: (INSTRUCTION, rest).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = vec![];
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, rest) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((ins.to_ascii_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

/// The last stage's instructions only (what the runtime image has).
fn docker_runtime_instr(name: &str) -> Vec<String> {
    let all = dockerfile();
    let last_from = all.iter().rposition(|(i, _)| i == "FROM").unwrap();
    all[last_from..]
        .iter()
        .filter(|(i, _)| i == name)
        .map(|(_, r)| r.clone())
        .collect()
}

fn docker_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for rest in docker_runtime_instr("ENV") {
        for pair in rest.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV without key=value: {rest}"));
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    env
}

fn exec_form(rest: &str, what: &str) -> Vec<String> {
    serde_json::from_str(rest.trim())
        .unwrap_or_else(|e| panic!("{what} must be in exec (JSON array) form: {rest} ({e})"))
}

fn docker_entrypoint() -> Vec<String> {
    let e = docker_runtime_instr("ENTRYPOINT");
    assert_eq!(e.len(), 1, "one ENTRYPOINT in the runtime stage");
    exec_form(&e[0], "ENTRYPOINT")
}

fn docker_healthcheck() -> Vec<String> {
    let h = docker_runtime_instr("HEALTHCHECK");
    assert_eq!(h.len(), 1, "one HEALTHCHECK in the runtime stage");
    let (_, cmd) = h[0].split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
    exec_form(cmd, "HEALTHCHECK CMD")
}

fn compose() -> Value {
    let docs = yaml_docs("deploy/docker-compose.yml");
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(m) => m.iter().map(|(k, v)| (s(k), s(v))).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let i = s(i);
                let (k, v) = i.split_once('=').unwrap_or((&i, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The systemd unit's `[Service]` settings; repeated keys keep every value.
fn unit() -> Vec<(String, String)> {
    read("deploy/systemd/flaggate.service")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line without `=`: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn unit_values(key: &str) -> Vec<String> {
    unit().into_iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect()
}

fn unit_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for v in unit_values("Environment") {
        for pair in v.split_whitespace() {
            let pair = pair.trim_matches('"');
            let (k, v) = pair.split_once('=').unwrap();
            env.insert(k.to_string(), v.to_string());
        }
    }
    env
}

fn env_file(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{rel}: not KEY=VALUE: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Identifiers that start with FLAGGATE_ in a text (a trailing `_`, as in `FLAGGATE_*`, is a prefix, skipped).
fn flaggate_vars(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("FLAGGATE_") {
        let start = i + off;
        let before_ok = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        if before_ok && !name.ends_with('_') {
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

// ---------------------------------------------------------------- (a) environment variables

#[test]
fn every_flaggate_variable_in_the_deploy_files_exists_in_the_binary() {
    let help = run_help();
    let known = help.env_names();
    assert!(
        known.len() > 20,
        "read too few [env: …] from `flaggate run --help`: {known:?}"
    );

    let mut unknown = vec![];
    for (file, text) in deploy_texts() {
        for var in flaggate_vars(&text) {
            if !known.contains(&var) {
                unknown.push(format!("{file}: {var}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not in `flaggate run --help` [env: …]:\n  {}\nknown: {known:?}",
        unknown.join("\n  ")
    );

    // The structured places really are read (the scan above is not vacuous), each with what it must set.
    let docker = docker_env();
    for flag in ["listen", "admin-listen", "state-dir", "log-format"] {
        assert!(
            docker.contains_key(&help.env_of(flag)),
            "Dockerfile ENV sets no {}",
            help.env_of(flag)
        );
    }
    let c = compose();
    let fg = compose_env(&c["services"]["flaggate"]);
    for flag in ["upstream", "upstream-token"] {
        assert!(
            fg.contains_key(&help.env_of(flag)),
            "compose flaggate sets no {}",
            help.env_of(flag)
        );
    }
    let kube = Kube::load();
    let env = &kube.container()["env"];
    let token = env
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(help.env_of("upstream-token").as_str()))
        .unwrap_or_else(|| panic!("the Deployment sets no {}", help.env_of("upstream-token")));
    assert!(
        !token["valueFrom"]["secretKeyRef"].is_null(),
        "the upstream token must come from a Secret (secretKeyRef), not a literal"
    );
    for cm in kube.all("ConfigMap") {
        for key in labels(&cm["data"]).keys().filter(|k| k.starts_with("FLAGGATE_")) {
            assert!(
                known.contains(key),
                "ConfigMap {}: {key} is not a flaggate variable",
                s(&cm["metadata"]["name"])
            );
        }
    }
    assert!(
        unit_env().contains_key(&help.env_of("state-dir")),
        "the unit sets no {}",
        help.env_of("state-dir")
    );
    for k in env_file("deploy/systemd/flaggate.env.example").keys() {
        assert!(
            known.contains(k),
            "flaggate.env.example: {k} is not a flaggate variable"
        );
    }
}

// ---------------------------------------------------------------- (b) ports and paths

#[test]
fn ports_and_probe_paths_are_the_binarys_defaults_and_endpoints() {
    let help = run_help();
    let listen = help.default_of("listen");
    let admin = help.default_of("admin-listen");
    let (proxy_port, admin_port) = (port_of(&listen), port_of(&admin));
    let upstream_port = port_of(&help.default_of("upstream"));
    let endpoints = BTreeSet::from(["/health", "/ready", "/metrics"]);

    // Dockerfile: EXPOSE and ENV listeners.
    let exposed: BTreeSet<u16> = docker_runtime_instr("EXPOSE")
        .iter()
        .flat_map(|r| {
            r.split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").parse::<u16>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(exposed, BTreeSet::from([proxy_port, admin_port]), "Dockerfile EXPOSE");
    let denv = docker_env();
    assert_eq!(
        denv[&help.env_of("listen")],
        listen,
        "Dockerfile ENV {}",
        help.env_of("listen")
    );
    assert_eq!(
        denv[&help.env_of("admin-listen")],
        admin,
        "Dockerfile ENV {}",
        help.env_of("admin-listen")
    );

    // Compose: published container ports, Prometheus target, Unleash upstream.
    let c = compose();
    let fg = &c["services"]["flaggate"];
    let container_ports: BTreeSet<u16> = fg["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            s(p).split('/')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        container_ports,
        BTreeSet::from([proxy_port, admin_port]),
        "compose flaggate ports"
    );
    let fenv = compose_env(fg);
    let up = &fenv[&help.env_of("upstream")];
    let up_host = up.trim_start_matches("http://").split(':').next().unwrap();
    assert!(
        !c["services"][up_host].is_null(),
        "compose upstream {up} is not a service of the file"
    );
    assert_eq!(
        port_of(up),
        upstream_port,
        "compose upstream port (Unleash listens on {upstream_port})"
    );

    let prom = yaml_docs("deploy/prometheus/prometheus.yml").remove(0);
    let job = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some("flaggate"))
        .expect("a flaggate scrape job");
    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
    assert_eq!(path, "/metrics");
    for t in job["static_configs"][0]["targets"].as_sequence().unwrap() {
        let t = s(t);
        assert_eq!(port_of(&t), admin_port, "Prometheus target {t}");
        let host = t.split(':').next().unwrap();
        assert!(
            !c["services"][host].is_null(),
            "Prometheus target host {host} is not a compose service"
        );
    }

    // Kubernetes: container ports, probes, Service, ServiceMonitor, NetworkPolicy.
    let kube = Kube::load();
    let ct = kube.container();
    let named: BTreeMap<String, u16> = ct["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (s(&p["name"]), p["containerPort"].as_u64().unwrap() as u16))
        .collect();
    assert_eq!(named.get("proxy"), Some(&proxy_port), "containerPort named proxy");
    assert_eq!(named.get("admin"), Some(&admin_port), "containerPort named admin");
    let resolve = |p: &Value| -> u16 {
        match p {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => *named
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}")),
            other => panic!("bad port {other:?}"),
        }
    };
    for (probe, want) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let g = &ct[probe]["httpGet"];
        assert_eq!(g["path"].as_str(), Some(want), "{probe} path");
        assert_eq!(resolve(&g["port"]), admin_port, "{probe} port");
    }
    if !ct["startupProbe"].is_null() {
        let g = &ct["startupProbe"]["httpGet"];
        assert!(endpoints.contains(g["path"].as_str().unwrap()), "startupProbe path");
        assert_eq!(resolve(&g["port"]), admin_port, "startupProbe port");
    }
    let svc = kube.one("Service");
    let mut svc_ports = BTreeMap::new();
    for p in svc["spec"]["ports"].as_sequence().unwrap() {
        let target = resolve(&p["targetPort"]);
        assert_eq!(
            p["port"].as_u64().unwrap() as u16,
            target,
            "Service port {} = the container's",
            s(&p["name"])
        );
        svc_ports.insert(s(&p["name"]), target);
    }
    assert_eq!(svc_ports.get("proxy"), Some(&proxy_port));
    assert_eq!(svc_ports.get("admin"), Some(&admin_port));
    let sm = kube.one("ServiceMonitor");
    for e in sm["spec"]["endpoints"].as_sequence().unwrap() {
        let port = s(&e["port"]);
        assert_eq!(
            svc_ports.get(&port),
            Some(&admin_port),
            "ServiceMonitor port {port} must be the Service's admin port"
        );
        assert_eq!(e["path"].as_str().unwrap_or("/metrics"), "/metrics");
    }
    let np = kube.one("NetworkPolicy");
    let mut ingress_ports = BTreeSet::new();
    for rule in np["spec"]["ingress"].as_sequence().unwrap() {
        for p in rule["ports"].as_sequence().unwrap() {
            ingress_ports.insert(resolve(&p["port"]));
        }
    }
    assert_eq!(
        ingress_ports,
        BTreeSet::from([proxy_port, admin_port]),
        "NetworkPolicy ingress ports"
    );
    let egress: BTreeSet<u16> = np["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap() as u16)
                .collect::<Vec<_>>()
        })
        .collect();
    let toml: toml::Table = kube.config_map()["data"]["flaggate.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let upstream = toml
        .get("upstream")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or(help.default_of("upstream"));
    let up_port = upstream
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
    let up_port = up_port.unwrap_or(if upstream.starts_with("https") { 443 } else { 80 });
    assert!(
        egress.contains(&up_port),
        "NetworkPolicy egress must allow the upstream port {up_port}: {egress:?}"
    );
    assert!(egress.contains(&53), "NetworkPolicy egress must allow DNS");
}

// ---------------------------------------------------------------- the endpoints are real

struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(port: u16, path: &str) -> Option<u16> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    c.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_probe_and_scrape_paths_answer_on_a_running_gateway() {
    // Every path the deploy files probe or scrape.
    let kube = Kube::load();
    let ct = kube.container();
    let mut paths = BTreeSet::new();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(p) = ct[probe]["httpGet"]["path"].as_str() {
            paths.insert(p.to_string());
        }
    }
    for e in kube.one("ServiceMonitor")["spec"]["endpoints"].as_sequence().unwrap() {
        paths.insert(e["path"].as_str().unwrap_or("/metrics").to_string());
    }
    let prom = yaml_docs("deploy/prometheus/prometheus.yml").remove(0);
    for j in prom["scrape_configs"].as_sequence().unwrap() {
        paths.insert(j["metrics_path"].as_str().unwrap_or("/metrics").to_string());
    }
    assert!(
        ["/ready", "/health", "/metrics"].iter().all(|p| paths.contains(*p)),
        "probes and scrapes should cover /ready, /health and /metrics: {paths:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, "tokens: []\n").unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let child = flaggate()
        .args(["run", "--token-file"])
        .arg(&tokens)
        .args([
            "--listen",
            &format!("127.0.0.1:{proxy}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(["--upstream", "http://127.0.0.1:9", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(admin, "/ready") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the gateway's /ready did not answer 200 within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &paths {
        assert_eq!(get(admin, p), Some(200), "GET {p} on the admin port");
    }
    assert_eq!(
        get(admin, "/readyz"),
        Some(404),
        "an unknown admin path must not answer 200"
    );

    // The HEALTHCHECK exactly as the image runs it: argv from the Dockerfile, env from its ENV (an
    // unspecified admin address probes loopback), only the port moved to this test's.
    let hc = docker_healthcheck();
    let help = run_help();
    let admin_env = help.env_of("admin-listen");
    let image_admin = &docker_env()[&admin_env];
    let probe_addr = format!("{}:{admin}", image_admin.rsplit_once(':').unwrap().0);
    let out = output(flaggate().args(&hc[1..]).env(&admin_env, &probe_addr));
    assert!(
        out.status.success(),
        "HEALTHCHECK {hc:?} with {admin_env}={probe_addr} failed: {out:?}"
    );
    let out = output(
        flaggate()
            .args(&hc[1..])
            .env(&admin_env, format!("127.0.0.1:{}", free_port())),
    );
    assert!(!out.status.success(), "HEALTHCHECK must fail when nothing answers");
}

// ---------------------------------------------------------------- (c) subcommands

#[test]
fn healthcheck_entrypoint_and_execstart_use_real_subcommands() {
    let subs = subcommands();
    let copy_dest = docker_runtime_instr("COPY")
        .iter()
        .filter_map(|r| {
            let words: Vec<&str> = r.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            (words.len() == 2 && words[0].ends_with("/flaggate")).then(|| words[1].to_string())
        })
        .next()
        .expect("the runtime stage COPYs the flaggate binary");

    let hc = docker_healthcheck();
    assert_eq!(hc[0], copy_dest, "HEALTHCHECK runs the binary the image ships");
    assert_eq!(
        hc.get(1).map(String::as_str),
        Some("health"),
        "HEALTHCHECK uses `flaggate health`"
    );
    assert!(
        subs.contains("health"),
        "`flaggate --help` lists no `health` subcommand: {subs:?}"
    );
    // `flaggate health` must follow the image's admin address (FLAGGATE_ADMIN_LISTEN).
    let health_help = Help::parse(&stdout_of(&["health", "--help"]));
    let help = run_help();
    assert_eq!(
        health_help.opts.get("admin-listen").and_then(|o| o.env.clone()),
        Some(help.env_of("admin-listen")),
        "`flaggate health` reads the admin address from the same variable as `run`"
    );
    assert_eq!(health_help.default_of("admin-listen"), help.default_of("admin-listen"));

    let ep = docker_entrypoint();
    assert_eq!(ep[0], copy_dest, "ENTRYPOINT runs the binary the image ships");
    assert_eq!(ep.get(1).map(String::as_str), Some("run"));
    assert!(subs.contains("run"));

    let c = compose();
    let test: Vec<String> = c["services"]["flaggate"]["healthcheck"]["test"]
        .as_sequence()
        .expect("compose flaggate healthcheck.test as a list")
        .iter()
        .map(s)
        .collect();
    assert_eq!(test[0], "CMD");
    assert_eq!(test[1..], hc[..], "compose healthcheck = the image's HEALTHCHECK");

    let exec = unit_values("ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert!(argv[0].ends_with("/flaggate"), "ExecStart runs flaggate: {exec:?}");
    assert!(
        subs.contains(argv[1]),
        "ExecStart subcommand {} not in `flaggate --help`",
        argv[1]
    );
}

// ---------------------------------------------------------------- (d) configuration accepted

fn check_config(env: &BTreeMap<String, String>, args: &[&str]) -> Output {
    let mut cmd = flaggate();
    cmd.arg("check-config").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(&mut cmd)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: `flaggate check-config` failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_configuration_passes_check_config() {
    let help = run_help();
    let kube = Kube::load();
    let data = &kube.config_map()["data"];
    let toml_text = data["flaggate.toml"].as_str().unwrap();
    let table: toml::Table = toml_text.parse().expect("the ConfigMap's flaggate.toml is TOML");
    let keys: BTreeSet<String> = help.opts.keys().map(|k| k.replace('-', "_")).collect();
    for k in table.keys() {
        assert!(
            keys.contains(k) || k == "routes",
            "flaggate.toml key `{k}` is no `flaggate run` flag"
        );
    }
    for secret in ["upstream_token", "tls_key", "upstream_client_key"] {
        assert!(
            !table.contains_key(secret),
            "flaggate.toml is a ConfigMap: `{secret}` belongs in a Secret"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flaggate.toml");
    std::fs::write(&cfg, toml_text).unwrap();
    let empty = dir.path().join("empty-tokens.yaml");
    std::fs::write(&empty, "tokens: []\n").unwrap();
    let cfg_s = cfg.display().to_string();

    // (d) as specified: the file alone, with an empty token file.
    let out = check_config(
        &BTreeMap::new(),
        &["--config", &cfg_s, "--token-file", &empty.display().to_string()],
    );
    assert_ok(&out, "ConfigMap flaggate.toml + empty token file");

    // The pod's effective configuration: image ENV, then the env ConfigMap, then the Secret (a dummy value),
    // config file where the Deployment mounts it (here: the temp copy).
    let token_var = help.env_of("upstream-token");
    let config_var = help.env_of("config");
    let mut env = docker_env();
    for cm in kube.all("ConfigMap") {
        for (k, v) in labels(&cm["data"])
            .into_iter()
            .filter(|(k, _)| k.starts_with("FLAGGATE_"))
        {
            env.insert(k, v);
        }
    }
    env.insert(config_var.clone(), cfg_s.clone());
    env.insert(token_var.clone(), "*:*.deploy-test-dummy".into());
    let out = check_config(&env, &[]);
    assert_ok(&out, "pod environment + ConfigMap flaggate.toml");

    // The optional token file: sha256 entries only, and valid.
    if let Some(tokens) = data["tokens.yaml"].as_str() {
        let parsed: Value = serde_yaml_ng::from_str(tokens).unwrap();
        for t in parsed["tokens"].as_sequence().expect("tokens.yaml: a `tokens:` list") {
            assert!(
                t["secret"].is_null() && !t["sha256"].is_null(),
                "ConfigMap tokens.yaml: sha256 entries only: {t:?}"
            );
        }
        let f = dir.path().join("tokens.yaml");
        std::fs::write(&f, tokens).unwrap();
        let out = check_config(
            &BTreeMap::new(),
            &["--config", &cfg_s, "--token-file", &f.display().to_string()],
        );
        assert_ok(&out, "ConfigMap flaggate.toml + ConfigMap tokens.yaml");
    }

    // Compose: the image ENV plus the service's environment.
    let c = compose();
    let mut env = docker_env();
    env.extend(compose_env(&c["services"]["flaggate"]));
    assert_ok(&check_config(&env, &[]), "compose flaggate environment");

    // systemd: the unit's Environment= (with %S = /var/lib) then the example EnvironmentFile.
    let mut env: BTreeMap<String, String> = unit_env()
        .into_iter()
        .map(|(k, v)| (k, v.replace("%S", "/var/lib")))
        .collect();
    env.extend(env_file("deploy/systemd/flaggate.env.example"));
    assert_ok(&check_config(&env, &[]), "systemd unit + flaggate.env.example");
}

// ---------------------------------------------------------------- Kubernetes cross-references

#[test]
fn kubernetes_objects_refer_to_each_other() {
    let kube = Kube::load();

    // kustomization.yaml lists every manifest but the examples, and nothing else.
    let k = yaml_docs("deploy/kubernetes/kustomization.yaml").remove(0);
    let listed: BTreeSet<String> = k["resources"].as_sequence().unwrap().iter().map(s).collect();
    let present: BTreeSet<String> = kube_files()
        .iter()
        .map(|f| f.trim_start_matches("deploy/kubernetes/").to_string())
        .filter(|f| f != "kustomization.yaml" && !f.contains(".example."))
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs the manifests in deploy/kubernetes"
    );
    assert!(
        !listed.iter().any(|f| f.contains("secret")),
        "no Secret in the kustomization"
    );

    let d = kube.one("Deployment");
    let pod = &d["spec"]["template"];
    let pod_labels = labels(&pod["metadata"]["labels"]);
    assert!(
        selects(&labels(&d["spec"]["selector"]["matchLabels"]), &pod_labels),
        "Deployment selector"
    );
    assert_eq!(d["spec"]["replicas"].as_u64(), Some(2));
    for kind in ["Service", "PodDisruptionBudget", "NetworkPolicy"] {
        let o = kube.one(kind);
        let sel = match kind {
            "Service" => labels(&o["spec"]["selector"]),
            "NetworkPolicy" => labels(&o["spec"]["podSelector"]["matchLabels"]),
            _ => labels(&o["spec"]["selector"]["matchLabels"]),
        };
        assert!(
            selects(&sel, &pod_labels),
            "{kind} selector {sel:?} does not select the pods {pod_labels:?}"
        );
    }
    let svc = kube.one("Service");
    let sm = kube.one("ServiceMonitor");
    assert!(
        selects(
            &labels(&sm["spec"]["selector"]["matchLabels"]),
            &labels(&svc["metadata"]["labels"])
        ),
        "ServiceMonitor selector does not select the Service"
    );
    let hpa = kube.one("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"].as_str(), Some("Deployment"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], d["metadata"]["name"]);
    assert_eq!(
        kube.one("PodDisruptionBudget")["spec"]["minAvailable"].as_u64(),
        Some(1)
    );

    let spec = &pod["spec"];
    let ct = kube.container();
    if let Some(sa) = spec["serviceAccountName"].as_str() {
        kube.named("ServiceAccount", sa);
    }
    // Security context.
    assert_eq!(spec["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &ct["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    let user: u64 = docker_runtime_instr("USER")[0]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER");
    assert!(user != 0);
    if let Some(u) = spec["securityContext"]["runAsUser"].as_u64() {
        assert_eq!(u, user, "runAsUser = the image's USER");
    }

    // The Secret, the ConfigMaps and the mounts the Deployment names exist and line up.
    let help = run_help();
    let example = yaml_docs("deploy/kubernetes/secret.example.yaml").remove(0);
    for e in ct["env"].as_sequence().unwrap() {
        let r = &e["valueFrom"]["secretKeyRef"];
        if !r.is_null() {
            assert_eq!(
                r["name"], example["metadata"]["name"],
                "secretKeyRef vs secret.example.yaml"
            );
            assert!(
                !example["stringData"][s(&r["key"])].is_null(),
                "secret.example.yaml lacks key {:?}",
                r["key"]
            );
        }
    }
    let mut env: BTreeMap<String, String> = docker_env();
    for from in ct["envFrom"].as_sequence().into_iter().flatten() {
        let cm = kube.named("ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        env.extend(labels(&cm["data"]));
    }
    let volumes: BTreeMap<String, &Value> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (s(&v["name"]), v))
        .collect();
    let mounts: BTreeMap<String, String> = ct["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["subPath"].is_null(), "subPath mounts never see ConfigMap updates");
            (s(&m["mountPath"]), s(&m["name"]))
        })
        .collect();
    let config_path = env.get(&help.env_of("config")).expect("the pod sets FLAGGATE_CONFIG");
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let vol = volumes[mounts.get(dir).unwrap_or_else(|| panic!("nothing mounted at {dir}"))];
    let cm = kube.named(
        "ConfigMap",
        vol["configMap"]["name"].as_str().expect("a ConfigMap volume"),
    );
    assert!(
        !cm["data"][file].is_null(),
        "ConfigMap {} has no {file}",
        s(&cm["metadata"]["name"])
    );
    let state_dir = env
        .get(&help.env_of("state-dir"))
        .expect("the pod sets FLAGGATE_STATE_DIR");
    let vol = volumes[mounts
        .get(state_dir)
        .unwrap_or_else(|| panic!("nothing mounted at {state_dir}"))];
    assert!(
        !vol["emptyDir"].is_null(),
        "the state dir is an emptyDir (the root filesystem is read-only)"
    );
    assert!(
        docker_runtime_instr("VOLUME")
            .iter()
            .any(|v| v.contains(state_dir.as_str())),
        "Dockerfile VOLUME"
    );

    let tsc = &spec["topologySpreadConstraints"];
    assert!(
        tsc.as_sequence().is_some_and(|t| !t.is_empty()),
        "topologySpreadConstraints"
    );
}

// ---------------------------------------------------------------- stop budgets

#[test]
fn every_stop_timeout_leaves_room_for_the_drain() {
    let help = run_help();
    let grace_var = help.env_of("shutdown-grace");
    let default_grace = seconds(&help.default_of("shutdown-grace"));

    // Kubernetes: preStop sleep + shutdown_grace < terminationGracePeriodSeconds.
    let kube = Kube::load();
    let table: toml::Table = kube.config_map()["data"]["flaggate.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = table
        .get("shutdown_grace")
        .and_then(|v| v.as_str())
        .map(seconds)
        .unwrap_or(default_grace);
    let spec = &kube.one("Deployment")["spec"]["template"]["spec"];
    let ct = kube.container();
    let sleep = ct["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0) as f64;
    let tgps = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds") as f64;
    assert!(
        tgps > sleep + grace,
        "terminationGracePeriodSeconds {tgps} <= preStop {sleep} + shutdown_grace {grace}"
    );
    assert!(
        ct["lifecycle"]["preStop"]["exec"].is_null(),
        "no exec hooks: the image has no shell"
    );

    // Compose: stop_grace_period > the service's grace.
    let c = compose();
    let fg = &c["services"]["flaggate"];
    let grace = compose_env(fg)
        .get(&grace_var)
        .map(|g| seconds(g))
        .unwrap_or(default_grace);
    let stop = fg["stop_grace_period"].as_str().map(seconds).unwrap_or(10.0);
    assert!(
        stop > grace,
        "compose stop_grace_period {stop}s <= {grace_var} {grace}s"
    );
    assert_eq!(fg["read_only"].as_bool(), Some(true), "compose flaggate read_only");
    // Bind mounts point at files that exist.
    for (name, svc) in c["services"].as_mapping().unwrap() {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let src = s(v).split(':').next().unwrap().to_string();
            if src.starts_with('.') || src.starts_with('/') {
                let p = root().join("deploy").join(&src);
                assert!(
                    Path::new(&p).exists(),
                    "compose {}: bind mount source {src} does not exist",
                    s(name)
                );
            }
        }
    }

    // systemd: TimeoutStopSec > the grace the example env file sets.
    let grace = env_file("deploy/systemd/flaggate.env.example")
        .get(&grace_var)
        .map(|g| seconds(g))
        .unwrap_or(default_grace);
    let stop = unit_values("TimeoutStopSec");
    let stop = seconds(stop.last().expect("TimeoutStopSec"));
    assert!(stop > grace, "TimeoutStopSec {stop}s <= {grace_var} {grace}s");
    assert_eq!(unit_values("KillSignal").last().map(String::as_str), Some("SIGTERM"));
    assert_eq!(
        unit_values("ExecReload").last().map(String::as_str),
        Some("/bin/kill -HUP $MAINPID")
    );
}
