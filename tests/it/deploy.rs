//! The deployment files (deploy/Dockerfile, deploy/docker-compose.yml, deploy/kubernetes/*.yaml,
//! deploy/systemd/*, docs/operations.md) checked against the binary they deploy: every FLAGGATE_* variable
//! they name is one `flaggate run --help` lists, the ports and probe paths are the binary's defaults and
//! real admin endpoints, the health check and entrypoint use real subcommands, the configuration they ship
//! passes `flaggate check-config`, the Kubernetes objects refer to each other correctly, and every stop
//! timeout leaves room for the drain. Renaming a variable, a port, an endpoint or a subcommand on either
//! side fails here.
//!
//! The files are also checked against each other and against what operators route and read: every alert
//! has a `critical`/`warning` severity and a runbook_url whose anchor is a runbook section of
//! docs/operations.md, no alert fires on the -1 sync-age sentinel alone, the PrometheusRule carries exactly
//! alerts.yml's groups, every dashboard query uses `$__rate_interval` and the `$job`/`$namespace`/`$instance`
//! variables (and never plots the sentinel), every Kubernetes object has the five `app.kubernetes.io/*`
//! labels while selectors use only name and instance, the namespace enforces Pod Security `restricted` and
//! the pod meets it, the Ingress examples publish only the browser SDK paths, the sizing arithmetic in the
//! docs is the manifests', and the Dockerfile pins its base images by digest and sets the OCI labels.
//! (deploy/lint.sh lints the same files with hadolint, yamllint, kubernetes-validate, compose, promtool —
//! check and test — and systemd-analyze.)

use crate::support::binary::{flaggate, refusing_port, spawn};
use crate::support::patience;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(patience(Duration::from_secs(5)))).ok()?;
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
    let gw = spawn(&[
        "run",
        "--token-file",
        tokens.to_str().unwrap(),
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    let admin = gw.admin;
    let limit = patience(Duration::from_secs(20));
    let deadline = Instant::now() + limit;
    while get(admin, "/ready") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the gateway's /ready did not answer 200 within {limit:?}"
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
    let probe_addr = format!("{}:{}", image_admin.rsplit_once(':').unwrap().0, admin.port());
    let out = output(flaggate().args(&hc[1..]).env(&admin_env, &probe_addr));
    assert!(
        out.status.success(),
        "HEALTHCHECK {hc:?} with {admin_env}={probe_addr} failed: {out:?}"
    );
    // A port held by a socket that does not listen: connections are refused, and no other process can
    // start answering there meanwhile.
    let (_held, refusing) = refusing_port();
    let out = output(flaggate().args(&hc[1..]).env(&admin_env, refusing.to_string()));
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

// ---------------------------------------------------------------- alert rules, runbooks, PrometheusRule

/// The alert rules of deploy/prometheus/alerts.yml: (group, rule) for every rule with an `alert`.
fn alert_rules() -> Vec<Value> {
    let doc = yaml_docs("deploy/prometheus/alerts.yml").remove(0);
    let mut out = vec![];
    for g in doc["groups"].as_sequence().expect("alerts.yml: groups") {
        for r in g["rules"].as_sequence().expect("alerts.yml: rules") {
            if !r["alert"].is_null() {
                out.push(r.clone());
            }
        }
    }
    assert!(out.len() >= 10, "read too few alert rules: {}", out.len());
    out
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation other than `-` and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// docs/operations.md's headings: anchor → (heading text, the section's text up to the next heading).
fn doc_sections() -> BTreeMap<String, (String, String)> {
    let text = read("docs/operations.md");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let heading = (!in_code && line.starts_with('#'))
            .then(|| line.trim_start_matches('#'))
            .filter(|h| h.starts_with(' '));
        if let Some(h) = heading {
            if let Some((title, body)) = current.take() {
                out.insert(slug(&title), (title, body));
            }
            current = Some((h.trim().to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((title, body)) = current {
        out.insert(slug(&title), (title, body));
    }
    out
}

#[test]
fn every_alert_has_a_routable_severity_and_a_runbook_that_exists() {
    let sections = doc_sections();
    let severities = BTreeSet::from(["critical", "warning"]);
    let mut names = BTreeSet::new();
    for r in alert_rules() {
        let name = s(&r["alert"]);
        assert!(names.insert(name.clone()), "alert {name} defined twice");
        let sev = r["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            severities.contains(sev),
            "{name}: severity `{sev}`; Alertmanager routes expect one of {severities:?}"
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|t| !t.trim().is_empty()),
                "{name}: no {a} annotation"
            );
        }
        let url = r["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no runbook_url annotation"));
        let (page, anchor) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} has no #anchor"));
        assert!(
            page == "docs/operations.md" || (page.starts_with("https://") && page.ends_with("/docs/operations.md")),
            "{name}: runbook_url {url} must point into docs/operations.md"
        );
        assert_eq!(
            anchor,
            name.to_lowercase(),
            "{name}: the anchor is the alert's name, so it stays stable"
        );
        let (title, body) = sections
            .get(anchor)
            .unwrap_or_else(|| panic!("{name}: docs/operations.md has no heading for #{anchor}"));
        assert_eq!(title, &name, "{name}: the runbook heading is the alert's name");
        for part in ["**Means:**", "**Check:**", "**Do:**"] {
            assert!(
                body.contains(part),
                "{name}: its runbook section in docs/operations.md has no {part} paragraph"
            );
        }
        assert!(
            sections["alerts"].1.contains(&format!("[`{name}`](#{anchor})")),
            "{name}: missing from the table at the top of docs/operations.md's Alerts section"
        );
    }
    // Every runbook section under "Alerts" belongs to a rule that exists.
    let text = read("docs/operations.md");
    let alerts_part = &text[text.find("\n## Alerts").expect("an Alerts section")..];
    let alerts_part = &alerts_part[..alerts_part[1..].find("\n## ").map_or(alerts_part.len(), |i| i + 1)];
    for line in alerts_part.lines().filter(|l| l.starts_with("### ")) {
        let h = line.trim_start_matches("### ").trim();
        assert!(
            names.contains(h),
            "docs/operations.md has a runbook for `{h}`, which no rule defines"
        );
    }

    // The alerts the operators asked for are there and mean what they say.
    let by_name: BTreeMap<String, Value> = alert_rules().into_iter().map(|r| (s(&r["alert"]), r)).collect();
    let expr = |n: &str| s(&by_name.get(n).unwrap_or_else(|| panic!("no alert {n}"))["expr"]);
    let prom = yaml_docs("deploy/prometheus/prometheus.yml").remove(0);
    let job = prom["scrape_configs"][0]["job_name"].as_str().unwrap().to_string();
    let kube = Kube::load();
    let sm = kube.one("ServiceMonitor");
    let sm_job = sm["spec"]["jobLabel"]
        .as_str()
        .map(|l| s(&kube.one("Service")["metadata"]["labels"][l]))
        .unwrap_or_else(|| s(&kube.one("Service")["metadata"]["name"]));
    assert_eq!(
        sm_job, job,
        "the ServiceMonitor's job label (the Service's name) = the compose job"
    );
    let up = format!("up{{job=\"{job}\"}}");
    assert!(
        expr("FlaggateTargetDown").contains(&format!("{up} == 0")),
        "FlaggateTargetDown: {up} == 0"
    );
    assert!(
        expr("FlaggateTargetMissing").contains(&format!("absent({up})")),
        "FlaggateTargetMissing: absent({up})"
    );
    assert!(expr("FlaggateConfigReloadFailed").contains("flaggate_config_last_reload_success == 0"));
}

#[test]
fn no_alert_fires_on_the_sync_age_sentinel_alone() {
    // flaggate_token_sync_age_seconds is -1 while no sync has succeeded since start, and always without
    // Unleash-sync mode. Every comparison on it must be false for -1, or handle -1 explicitly together with
    // evidence of failing syncs. (alerts.test.yml checks the behaviour with promtool.)
    let metric = "flaggate_token_sync_age_seconds";
    let mut seen = 0;
    for r in alert_rules() {
        let name = s(&r["alert"]);
        let e = s(&r["expr"]);
        let mut rest = e.as_str();
        while let Some(i) = rest.find(metric) {
            seen += 1;
            let mut after = &rest[i + metric.len()..];
            if after.starts_with('{') {
                after = &after[after.find('}').unwrap() + 1..];
            }
            let after = after.trim_start();
            let (op, num) = [">=", ">", "=="]
                .iter()
                .find_map(|op| after.strip_prefix(op).map(|n| (*op, n.trim_start())))
                .unwrap_or_else(|| panic!("{name}: {metric} must be compared right away (>, >= or == -1): {e}"));
            let n: f64 = num
                .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {metric} {op} <number>: {e}"));
            match op {
                ">" => assert!(n >= -1.0, "{name}: `{metric} > {n}` is true for the -1 sentinel"),
                ">=" => assert!(n > -1.0, "{name}: `{metric} >= {n}` is true for the -1 sentinel"),
                _ => {
                    assert_eq!(
                        n, -1.0,
                        "{name}: only `== -1` (the sentinel, handled on purpose) is allowed"
                    );
                    assert!(
                        e.contains("flaggate_token_sync_total") && e.contains(" and "),
                        "{name}: `{metric} == -1` must be joined (`and`) with failing syncs, or every \
                         token-file-only gateway fires it"
                    );
                }
            }
            rest = &rest[i + metric.len()..];
        }
    }
    assert!(
        seen > 0,
        "no alert reads {metric}: the token sync age is not alerted on"
    );
    let t = yaml_docs("deploy/prometheus/alerts.test.yml").remove(0);
    assert_eq!(
        t["rule_files"][0].as_str(),
        Some("alerts.yml"),
        "alerts.test.yml tests alerts.yml"
    );
    assert!(
        read("deploy/lint.sh").contains("promtool test rules deploy/prometheus/alerts.test.yml"),
        "deploy/lint.sh runs the rules' unit tests"
    );
}

#[test]
fn the_prometheus_rule_carries_exactly_the_alert_rules() {
    let kube = Kube::load();
    let pr = kube.one("PrometheusRule");
    assert_eq!(pr["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    let rules = yaml_docs("deploy/prometheus/alerts.yml").remove(0);
    assert!(
        pr["spec"]["groups"] == rules["groups"],
        "deploy/kubernetes/prometheusrule.yaml spec.groups differs from deploy/prometheus/alerts.yml groups: \
         regenerate it with the command in its header comment"
    );
    let sm = kube.one("ServiceMonitor");
    assert_eq!(
        labels(&pr["metadata"]["labels"]),
        labels(&sm["metadata"]["labels"]),
        "PrometheusRule and ServiceMonitor carry the same labels (a Prometheus selecting one finds the other)"
    );
}

// ---------------------------------------------------------------- the dashboard

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/flaggate.json")).expect("the dashboard is JSON")
}

/// Every label-matcher block `{…}` of a PromQL expression, with the identifier in front of it.
fn selectors(expr: &str) -> Vec<(String, String)> {
    let b = expr.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while let Some(off) = expr[i..].find('{') {
        let open = i + off;
        let close = open + expr[open..].find('}').expect("unclosed {");
        let mut start = open;
        while start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_' || b[start - 1] == b':') {
            start -= 1;
        }
        out.push((expr[start..open].to_string(), expr[open + 1..close].to_string()));
        i = close + 1;
    }
    out
}

#[test]
fn every_dashboard_query_uses_rate_interval_and_the_job_and_namespace_variables() {
    let d = dashboard();
    let vars: BTreeMap<String, &serde_json::Value> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect();
    for (name, filtered_by) in [
        ("job", vec![]),
        ("namespace", vec!["job"]),
        ("instance", vec!["job", "namespace"]),
    ] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no `{name}` template variable"));
        assert_eq!(v["type"], "query", "${name} is a query variable");
        let q = v["query"].as_str().unwrap();
        assert!(
            q.starts_with("label_values(flaggate_build_info") && q.ends_with(&format!(", {name})")),
            "${name} lists the {name} label of flaggate targets: {q}"
        );
        for f in filtered_by {
            assert!(
                q.contains(&format!("{f}=~\"${f}\"")),
                "${name}'s values follow ${f}: {q}"
            );
        }
        assert_eq!(v["includeAll"], true, "${name} offers All");
        // A missing label (no namespace outside Kubernetes) matches `.*`, so All works there too.
        assert_eq!(v["allValue"], ".*", "${name}: All is .*");
    }

    let mut ids = BTreeSet::new();
    let mut rects: Vec<(String, [i64; 4])> = vec![];
    let mut all = String::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap().to_string();
        assert!(ids.insert(p["id"].as_i64().unwrap()), "panel id of `{title}` reused");
        let g = &p["gridPos"];
        let r = ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap());
        assert!(r[0] + r[2] <= 24, "`{title}` is wider than the dashboard");
        for (other, o) in &rects {
            let overlap = r[0] < o[0] + o[2] && o[0] < r[0] + r[2] && r[1] < o[1] + o[3] && o[1] < r[1] + r[3];
            assert!(!overlap, "panels `{title}` and `{other}` overlap");
        }
        rects.push((title.clone(), r));
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            all.push_str(e);
            all.push('\n');
            // Ranges: only $__rate_interval (follows the scrape interval; a fixed [5m] hides spikes when
            // zoomed in and breaks with a scrape interval above 75 s).
            let mut rest = e;
            while let Some(i) = rest.find('[') {
                let close = rest[i..].find(']').unwrap() + i;
                assert_eq!(&rest[i..=close], "[$__rate_interval]", "`{title}`: range in {e}");
                rest = &rest[close + 1..];
            }
            for f in ["rate(", "increase("] {
                if e.contains(f) {
                    assert!(
                        e.contains("[$__rate_interval]"),
                        "`{title}`: {f} without $__rate_interval: {e}"
                    );
                }
            }
            // Every series selector is scoped by the variables.
            let sels = selectors(e);
            assert!(!sels.is_empty(), "`{title}`: a query without a selector: {e}");
            for (metric, matchers) in &sels {
                assert!(!metric.is_empty(), "`{title}`: a selector without a metric name: {e}");
                for v in ["job", "namespace", "instance"] {
                    assert!(
                        matchers.contains(&format!("{v}=~\"${v}\"")),
                        "`{title}`: {metric}{{{matchers}}} is not scoped by ${v}"
                    );
                }
            }
            // Every metric name has a selector (no bare `flaggate_x` or `process_x` that ignores the variables).
            for prefix in ["flaggate_", "process_"] {
                let mut rest = e;
                while let Some(i) = rest.find(prefix) {
                    let tail = &rest[i..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    let boundary =
                        i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
                    if boundary {
                        assert!(
                            tail[end..].starts_with('{'),
                            "`{title}`: {} without a selector: {e}",
                            &tail[..end]
                        );
                    }
                    rest = &tail[end..];
                }
            }
            // The sync age's -1 sentinel (no successful sync since start) is never plotted.
            let age = "flaggate_token_sync_age_seconds{";
            let mut rest = e;
            while let Some(i) = rest.find(age) {
                let after = &rest[i..];
                let after = after[after.find('}').unwrap() + 1..].trim_start();
                assert!(
                    after.starts_with(">= 0"),
                    "`{title}`: plots the -1 sentinel of the sync age: {e}"
                );
                rest = after;
            }
        }
    }
    for (what, needle) in [
        ("memory", "process_resident_memory_bytes{"),
        ("CPU", "process_cpu_seconds_total{"),
        ("config reload status", "flaggate_config_last_reload_success{"),
        ("config reloads", "flaggate_config_reloads_total{"),
        ("rate-limited requests", "decision=\"rate_limited\""),
        ("dropped log lines", "flaggate_log_lines_dropped_total{"),
        ("token set age", "flaggate_token_sync_age_seconds{"),
    ] {
        assert!(all.contains(needle), "the dashboard has no {what} panel ({needle})");
    }
}

#[test]
fn process_metrics_go_by_their_standard_names() {
    // The standard process_* names (process_resident_memory_bytes, process_cpu_seconds_total), as every
    // other exporter has them, never a flaggate_process_ prefix.
    for f in [
        "deploy/grafana/flaggate.json",
        "deploy/prometheus/alerts.yml",
        "deploy/kubernetes/prometheusrule.yaml",
        "docs/operations.md",
        "deploy/README.md",
    ] {
        assert!(
            !read(f).contains("flaggate_process_"),
            "{f} names a flaggate_process_* metric"
        );
    }
}

// ---------------------------------------------------------------- Kubernetes labels and Pod Security

const LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
];
/// The labels a selector may use: stable for the life of an installation.
const SELECTOR_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app.kubernetes.io/instance"];

#[test]
fn every_kubernetes_object_has_the_recommended_labels_and_selectors_use_only_stable_ones() {
    let kube = Kube::load();
    let version = env!("CARGO_PKG_VERSION");
    let mut common: Option<BTreeMap<String, String>> = None;
    let mut check = |what: String, l: BTreeMap<String, String>| {
        let mine: BTreeMap<String, String> = LABELS
            .iter()
            .filter_map(|k| l.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        assert_eq!(mine.len(), LABELS.len(), "{what}: needs all of {LABELS:?}, has {l:?}");
        assert_eq!(
            mine["app.kubernetes.io/version"], version,
            "{what}: version label = Cargo.toml's version"
        );
        match &common {
            None => common = Some(mine),
            Some(c) => assert_eq!(
                &mine, c,
                "{what}: the recommended labels differ from the other objects'"
            ),
        }
    };
    let api_objects = kube.objects.iter().filter(|(_, o)| {
        !o["apiVersion"]
            .as_str()
            .unwrap_or("")
            .starts_with("kustomize.config.k8s.io/")
    });
    let mut n = 0;
    for (file, o) in api_objects {
        n += 1;
        let what = format!("{file}: {} {}", s(&o["kind"]), s(&o["metadata"]["name"]));
        check(what.clone(), labels(&o["metadata"]["labels"]));
        if !o["spec"]["template"]["metadata"].is_null() {
            check(
                format!("{what} pod template"),
                labels(&o["spec"]["template"]["metadata"]["labels"]),
            );
        }
    }
    assert!(n >= 14, "read too few Kubernetes objects: {n}");
    let k = yaml_docs("deploy/kubernetes/kustomization.yaml").remove(0);
    let tags: Vec<String> = k["images"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| s(&i["newTag"]))
        .collect();
    assert_eq!(tags, [version], "kustomization.yaml images: newTag = the version label");

    // Selectors: only name and instance, and both (two installations must not select each other's pods).
    let d = kube.one("Deployment");
    let spec = &d["spec"]["template"]["spec"];
    let mut sels: Vec<(String, &Value)> = vec![
        ("Deployment selector".into(), &d["spec"]["selector"]["matchLabels"]),
        ("Service selector".into(), &kube.one("Service")["spec"]["selector"]),
        (
            "PodDisruptionBudget selector".into(),
            &kube.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        ),
        (
            "NetworkPolicy podSelector".into(),
            &kube.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        ),
        (
            "ServiceMonitor selector".into(),
            &kube.one("ServiceMonitor")["spec"]["selector"]["matchLabels"],
        ),
    ];
    for (i, t) in spec["topologySpreadConstraints"]
        .as_sequence()
        .unwrap()
        .iter()
        .enumerate()
    {
        sels.push((
            format!("topologySpreadConstraints[{i}]"),
            &t["labelSelector"]["matchLabels"],
        ));
    }
    for (what, sel) in sels {
        let keys: BTreeSet<String> = labels(sel).into_keys().collect();
        let want: BTreeSet<String> = SELECTOR_LABELS.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            keys, want,
            "{what} selects on {keys:?}: use exactly name and instance, never version"
        );
    }
    assert!(
        d["spec"]["selector"]["matchExpressions"].is_null(),
        "the Deployment selects by matchLabels only"
    );
}

#[test]
fn the_namespace_enforces_pod_security_restricted_and_the_pod_meets_it() {
    let kube = Kube::load();
    let ns = labels(&kube.one("Namespace")["metadata"]["labels"]);
    assert_eq!(
        ns.get("pod-security.kubernetes.io/enforce").map(String::as_str),
        Some("restricted"),
        "namespace.yaml: pod-security.kubernetes.io/enforce: restricted"
    );
    let k = yaml_docs("deploy/kubernetes/kustomization.yaml").remove(0);
    assert_eq!(
        s(&k["namespace"]),
        s(&kube.one("Namespace")["metadata"]["name"]),
        "everything lands in it"
    );

    // The `restricted` profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
    // rule by rule, for every pod template.
    for (file, o) in &kube.objects {
        let pod = &o["spec"]["template"]["spec"];
        if pod.is_null() {
            continue;
        }
        let what = format!("{file}: {}", s(&o["metadata"]["name"]));
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host].as_bool(), Some(true), "{what}: {host}");
        }
        let allowed_volumes = [
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        ];
        for v in pod["volumes"].as_sequence().into_iter().flatten() {
            for key in v.as_mapping().unwrap().keys().map(s).filter(|k| k != "name") {
                assert!(
                    allowed_volumes.contains(&key.as_str()),
                    "{what}: volume type {key} is not allowed"
                );
            }
        }
        let psc = &pod["securityContext"];
        assert!(psc["sysctls"].is_null(), "{what}: sysctls");
        assert_ne!(psc["runAsUser"].as_u64(), Some(0), "{what}: runAsUser 0");
        let containers = ["containers", "initContainers", "ephemeralContainers"]
            .iter()
            .flat_map(|k| pod[*k].as_sequence().into_iter().flatten());
        for c in containers {
            let cw = format!("{what} container {}", s(&c["name"]));
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"].as_bool(), Some(true), "{cw}: privileged");
            assert_eq!(
                sc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{cw}: allowPrivilegeEscalation"
            );
            let drop: Vec<String> = sc["capabilities"]["drop"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            assert!(
                drop.iter().any(|d| d == "ALL"),
                "{cw}: capabilities.drop must contain ALL"
            );
            for add in sc["capabilities"]["add"].as_sequence().into_iter().flatten() {
                assert_eq!(s(add), "NET_BIND_SERVICE", "{cw}: only NET_BIND_SERVICE may be added");
            }
            let non_root = sc["runAsNonRoot"].as_bool().or(psc["runAsNonRoot"].as_bool());
            assert_eq!(non_root, Some(true), "{cw}: runAsNonRoot (container or pod)");
            assert_ne!(sc["runAsUser"].as_u64(), Some(0), "{cw}: runAsUser 0");
            let seccomp = sc["seccompProfile"]["type"]
                .as_str()
                .or(psc["seccompProfile"]["type"].as_str());
            assert!(
                matches!(seccomp, Some("RuntimeDefault" | "Localhost")),
                "{cw}: seccompProfile RuntimeDefault or Localhost (container or pod), got {seccomp:?}"
            );
            assert!(
                sc["procMount"].as_str().is_none_or(|p| p == "Default"),
                "{cw}: procMount"
            );
            assert!(
                sc["windowsOptions"]["hostProcess"].as_bool() != Some(true),
                "{cw}: windowsOptions.hostProcess"
            );
            for p in c["ports"].as_sequence().into_iter().flatten() {
                assert!(p["hostPort"].as_u64().unwrap_or(0) == 0, "{cw}: hostPort");
            }
        }
    }
}

#[test]
fn the_ingress_examples_publish_only_the_browser_sdk_paths_to_the_proxy_port() {
    let kube = Kube::load();
    let svc = kube.one("Service");
    let svc_name = s(&svc["metadata"]["name"]);
    let proxy_port = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("proxy"))
        .map(|p| p["port"].as_u64().unwrap())
        .expect("a Service port named proxy");
    let frontend_paths = BTreeSet::from(["/api/frontend".to_string(), "/api/proxy".to_string()]);

    let ing = kube.one("Ingress");
    assert_eq!(ing["apiVersion"].as_str(), Some("networking.k8s.io/v1"));
    let mut paths = BTreeSet::new();
    for rule in ing["spec"]["rules"].as_sequence().unwrap() {
        for p in rule["http"]["paths"].as_sequence().unwrap() {
            assert_eq!(p["pathType"].as_str(), Some("Prefix"), "Ingress path {:?}", p["path"]);
            let b = &p["backend"]["service"];
            assert_eq!(s(&b["name"]), svc_name, "Ingress backend Service");
            let port_ok =
                b["port"]["name"].as_str() == Some("proxy") || b["port"]["number"].as_u64() == Some(proxy_port);
            assert!(
                port_ok,
                "Ingress backend port must be the Service's proxy port: {:?}",
                b["port"]
            );
            paths.insert(s(&p["path"]));
        }
    }
    assert_eq!(
        paths, frontend_paths,
        "the Ingress publishes the browser SDK paths and nothing else"
    );

    let route = kube.one("HTTPRoute");
    assert_eq!(route["apiVersion"].as_str(), Some("gateway.networking.k8s.io/v1"));
    let mut paths = BTreeSet::new();
    for rule in route["spec"]["rules"].as_sequence().unwrap() {
        for m in rule["matches"].as_sequence().unwrap() {
            assert_eq!(m["path"]["type"].as_str(), Some("PathPrefix"));
            paths.insert(s(&m["path"]["value"]));
        }
        for b in rule["backendRefs"].as_sequence().unwrap() {
            assert_eq!(s(&b["name"]), svc_name, "HTTPRoute backendRef");
            assert_eq!(
                b["port"].as_u64(),
                Some(proxy_port),
                "HTTPRoute backendRef port = the proxy port"
            );
        }
    }
    assert_eq!(
        paths, frontend_paths,
        "the HTTPRoute publishes the browser SDK paths and nothing else"
    );
    for f in [
        "deploy/kubernetes/ingress.example.yaml",
        "deploy/kubernetes/httproute.example.yaml",
    ] {
        assert!(
            kube_files().contains(&f.to_string()),
            "{f} exists (and, as an .example., is not in the kustomization)"
        );
    }
}

// ---------------------------------------------------------------- sizing arithmetic

/// Kubernetes CPU quantity in millicores: `250m`, `1`, `0.5`.
fn millicores(q: &str) -> u64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => (q.parse::<f64>().unwrap() * 1000.0).round() as u64,
    }
}

#[test]
fn the_hpa_arithmetic_in_the_docs_is_the_manifests() {
    // The HPA's averageUtilization is a percentage of the CPU *request*: the docs and hpa.yaml must size
    // with the request and the target the manifests really have.
    let kube = Kube::load();
    let res = &kube.container()["resources"];
    let request = s(&res["requests"]["cpu"]);
    let req_m = millicores(&request);
    let hpa = kube.one("HorizontalPodAutoscaler");
    let metric = hpa["spec"]["metrics"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["resource"]["name"].as_str() == Some("cpu"))
        .expect("the HPA scales on CPU");
    assert_eq!(metric["resource"]["target"]["type"].as_str(), Some("Utilization"));
    let util = metric["resource"]["target"]["averageUtilization"].as_u64().unwrap();
    let per_pod = req_m * util / 100;
    let max = hpa["spec"]["maxReplicas"].as_u64().unwrap();
    let u = format!("{}", util as f64 / 100.0);
    let lines = [
        format!("{request} × {u} = {per_pod}m"),
        format!("{} × {per_pod}m", max - 1),
    ];
    let docs = read("docs/operations.md");
    let hpa_text = read("deploy/kubernetes/hpa.yaml");
    for l in &lines {
        assert!(docs.contains(l.as_str()), "docs/operations.md (Sizing) must show `{l}`");
        assert!(hpa_text.contains(l.as_str()), "the comment in hpa.yaml must show `{l}`");
    }
    let limit_m = millicores(&s(&res["limits"]["cpu"]));
    assert!(
        limit_m > per_pod,
        "the CPU limit leaves burst headroom above the HPA's target"
    );
}

// ---------------------------------------------------------------- the image: pins and labels

/// `key=value` pairs of a LABEL instruction (values may be quoted and contain spaces).
fn label_pairs(rest: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            value = chars.by_ref().take_while(|c| *c != '"').collect();
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| !c.is_whitespace()) {
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_string(), value);
    }
    out
}

#[test]
fn base_images_are_pinned_by_digest_and_the_image_carries_oci_labels() {
    let text = read("deploy/Dockerfile");
    let all = dockerfile();
    let stages: BTreeSet<String> = all
        .iter()
        .filter(|(i, _)| i == "FROM")
        .filter_map(|(_, r)| {
            r.split_whitespace()
                .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
                .nth(1)
        })
        .map(str::to_string)
        .collect();
    let mut runtime = String::new();
    for (_, rest) in all.iter().filter(|(i, _)| i == "FROM") {
        let image = rest
            .split_whitespace()
            .find(|w| !w.starts_with("--"))
            .expect("FROM <image>")
            .to_string();
        runtime = image.clone();
        if stages.contains(&image) {
            continue; // a previous stage
        }
        match image.split_once("@sha256:") {
            Some((name, digest)) => {
                assert!(
                    name.contains(':'),
                    "FROM {image}: keep the tag in front of the digest, for readers"
                );
                assert!(
                    digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                    "FROM {image}: a sha256 digest is 64 lower-case hex digits"
                );
                // Where the digest came from is written down next to it (its first 8 digits name it).
                let comments: String = text.lines().filter(|l| l.trim_start().starts_with('#')).collect();
                assert!(
                    comments.contains(&format!("sha256:{}", &digest[..8])),
                    "FROM {image}: the comments must say where sha256:{}... came from",
                    &digest[..8]
                );
            }
            None => {
                // Allowed only when the comment right above it explains how to pin it.
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with("FROM") && l.contains(&image))
                    .unwrap();
                let above: Vec<&str> = text.lines().take(line).collect();
                let doc: String = above
                    .iter()
                    .rev()
                    .take_while(|l| l.trim_start().starts_with('#'))
                    .copied()
                    .collect();
                assert!(
                    doc.contains("imagetools inspect") && doc.contains("digest"),
                    "FROM {image} is neither pinned by digest (image:tag@sha256:...) nor documented right above"
                );
            }
        }
    }
    assert!(
        text.contains("docker buildx imagetools inspect"),
        "the Dockerfile says how to refresh the pins"
    );

    // OCI labels on the runtime image, from build arguments declared in its stage.
    let labels: BTreeMap<String, String> = docker_runtime_instr("LABEL")
        .iter()
        .flat_map(|r| label_pairs(r))
        .collect();
    let args: BTreeMap<String, Option<String>> = docker_runtime_instr("ARG")
        .iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().trim_matches('"').to_string())),
            None => (a.trim().to_string(), None),
        })
        .collect();
    for key in ["source", "version", "revision"] {
        let full = format!("org.opencontainers.image.{key}");
        let v = labels
            .get(&full)
            .unwrap_or_else(|| panic!("the runtime image has no {full} label"));
        let arg = v
            .strip_prefix("${")
            .and_then(|a| a.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{full} comes from a build ARG (\"${{NAME}}\"), got {v}"));
        assert!(
            args.contains_key(arg),
            "{full}: ARG {arg} is not declared in the runtime stage"
        );
    }
    let version_arg = labels["org.opencontainers.image.version"]
        .trim_start_matches("${")
        .trim_end_matches('}');
    assert_eq!(
        args[version_arg].as_deref(),
        Some(env!("CARGO_PKG_VERSION")),
        "ARG {version_arg} defaults to Cargo.toml's version"
    );
    if let Some(base) = labels.get("org.opencontainers.image.base.name") {
        assert!(
            runtime.starts_with(&format!("{base}@")) || runtime == *base,
            "base.name = the runtime FROM"
        );
    }
    if let Some(digest) = labels.get("org.opencontainers.image.base.digest") {
        assert!(
            runtime.ends_with(&format!("@{digest}")),
            "base.digest = the runtime FROM's digest"
        );
    }
}
