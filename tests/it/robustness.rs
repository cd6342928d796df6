//! Nothing a client can put on the wire makes the gateway panic, hang, answer 5xx, or forward a
//! non-canonical path: hundreds of random requests over raw TCP, then a normal request still works.
use crate::support;
use crate::support::patience;

use crate::support::client::raw_status;
use crate::support::upstream::ok_json;
use crate::support::{gateway, raw, upstream};
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: &str = "*:development.robustness-client-0123456789abcdef";
const OTHER: &str = "*:development.robustness-other-0123456789abcdef";

/// Panics raised anywhere but in this test file (i.e. in the gateway or the libraries under it).
fn foreign_panics() -> &'static Mutex<Vec<String>> {
    static P: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    P.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let loc = info.location().map(|l| l.to_string()).unwrap_or_default();
            if !loc.starts_with("tests/") {
                foreign_panics().lock().unwrap().push(format!("{loc}: {info}"));
            }
            default(info);
        }));
        Mutex::new(Vec::new())
    })
}

#[derive(Debug)]
enum Outcome {
    Status(u16),
    Closed,
    Garbage(String),
    Hung,
}

/// Writes `bytes` (tolerating the server hanging up mid-write) and reads until the server closes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    match tokio::time::timeout(patience(Duration::from_secs(5)), s.read_to_end(&mut out)).await {
        Err(_) => Outcome::Hung,
        Ok(_) if out.is_empty() => Outcome::Closed,
        Ok(_) => {
            let text = String::from_utf8_lossy(&out);
            let status = text
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| text.strip_prefix("HTTP/1.0 "))
                .and_then(|r| r.get(..3))
                .and_then(|s| s.parse().ok());
            match status {
                Some(s) => Outcome::Status(s),
                None => Outcome::Garbage(text.chars().take(200).collect()),
            }
        }
    }
}

const PIECES: &[&str] = &[
    "/",
    "//",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    ";x=1",
    "%",
    "%0",
    "%00",
    "%252e",
    "%25",
    "?",
    "?a=%2e%2e/..",
    "#",
    "#/../admin",
    "&",
    "=",
    " ",
    "\t",
    "\0",
    "\r",
    "\n",
    "\r\n",
    "é",
    "\u{202e}",
    "~",
    "a",
    "api",
    "admin",
    "client",
    "features",
    "%41",
    "%20",
    "%3b",
    "%23",
    "*",
    "http://evil/",
    "@",
    ":",
    "%c0%ae",
    "\u{ff0e}",
    "%u002e",
    "\x7f",
    "\x01",
];

const NAMES: &[&str] = &[
    "authorization",
    "Authorization",
    "host",
    "x-forwarded-for",
    "x_forwarded_for",
    "forwarded",
    "x-real-ip",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "x-request-id",
    "unleash-appname",
    "accept-encoding",
    "if-none-match",
    "content-type",
    "x-custom",
];

fn random_bytes(rng: &mut fastrand::Rng, len: std::ops::Range<usize>) -> Vec<u8> {
    let len = rng.usize(len);
    const SPICY: &[u8] = b"\0\r\n\t :;,\"\\/%.\x7f\x80\xff\xc3\xa9";
    (0..len)
        .map(|_| {
            if rng.bool() {
                SPICY[rng.usize(..SPICY.len())]
            } else {
                rng.u8(..)
            }
        })
        .collect()
}

/// Path pieces a client may legitimately send (Unleash flag names, encoded spaces, and so on).
const BENIGN: &[&str] = &[
    "/features",
    "/",
    "//",
    "/anchor.flag-on",
    "/a~b",
    "/x%20y",
    "/%3A",
    "/@me",
    "/a:b",
    "/(1)",
    "/*",
    "/$!'+,=",
];

fn target(rng: &mut fastrand::Rng, wild: bool) -> Vec<u8> {
    match rng.u8(..12) {
        0 if wild => random_bytes(rng, 0..40),
        1 => {
            let mut t = b"/api/client/".to_vec();
            t.extend(std::iter::repeat_n(b'a', rng.usize(1000..70_000)));
            t
        }
        _ => {
            let mut t = String::from(if rng.u8(..6) == 0 { "" } else { "/api/client" });
            for _ in 0..rng.usize(0..6) {
                if wild || rng.u8(..4) == 0 {
                    t.push_str(PIECES[rng.usize(..PIECES.len())]);
                } else {
                    t.push_str(BENIGN[rng.usize(..BENIGN.len())]);
                }
            }
            if rng.u8(..4) == 0 {
                t.push_str("?project=default&namePrefix=a%20b&x=%2e%2e/../");
            }
            t.into_bytes()
        }
    }
}

/// A header name: valid `token` characters (including `_`), or when `wild`, any bytes at all.
fn header_name(rng: &mut fastrand::Rng, wild: bool) -> Vec<u8> {
    const TCHAR: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~";
    match rng.u8(..3) {
        0 => NAMES[rng.usize(..NAMES.len())].as_bytes().to_vec(),
        1 if wild => random_bytes(rng, 0..20),
        _ => (0..rng.usize(1..20)).map(|_| TCHAR[rng.usize(..TCHAR.len())]).collect(),
    }
}

/// A header value: legal field content (visible ASCII, space, tab, obs-text), or when `wild`, anything.
fn header_value(rng: &mut fastrand::Rng, wild: bool) -> Vec<u8> {
    match rng.u8(..10) {
        0 => vec![b'v'; rng.usize(10_000..100_000)],
        1..=4 if wild => random_bytes(rng, 0..100),
        1..=4 => (0..rng.usize(0..100))
            .map(|_| match rng.u8(..4) {
                0 => rng.u8(0x80..=0xff),
                1 => b"\t \"'"[rng.usize(..4)],
                _ => rng.u8(0x21..0x7f),
            })
            .collect(),
        _ => format!("{OTHER}{}", rng.u32(..)).into_bytes(),
    }
}

fn request(rng: &mut fastrand::Rng) -> Vec<u8> {
    // A third of the cases are wild (any bytes anywhere); the rest stay parseable so that they exercise
    // the gateway's own checks and forwarding rather than only the HTTP parser.
    let wild = rng.u8(..3) == 0;
    let method: &[u8] = match rng.u8(..12) {
        0 => b"POST",
        1 => b"OPTIONS",
        2 => b"HEAD",
        7 => b"CONNECT",
        3 => b"TRACE",
        6 => b"DELETE",
        4 if wild => b"G\0T",
        5 => b"get",
        _ => b"GET",
    };
    let version: &[u8] = match rng.u8(..12) {
        0 => b"HTTP/1.0",
        1 if wild => b"HTTP/2.0",
        2 if wild => b"HTTP/9.9",
        3 if wild => b"HTTP/1.1\0",
        _ => b"HTTP/1.1",
    };
    let mut r = Vec::new();
    r.extend_from_slice(method);
    r.push(b' ');
    r.extend(target(rng, wild));
    r.push(b' ');
    r.extend_from_slice(version);
    r.extend_from_slice(b"\r\nHost: gw\r\nConnection: close\r\n");
    if rng.u8(..10) < 7 {
        r.extend_from_slice(format!("Authorization: {CLIENT}\r\n").as_bytes());
    }
    for _ in 0..rng.usize(0..6) {
        r.extend(header_name(rng, wild));
        r.extend_from_slice(b": ");
        r.extend(header_value(rng, wild));
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// What a forwarded path must look like, checked without the gateway's own canonicalizer.
fn is_plainly_canonical(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    (path == "/api/client" || path.starts_with("/api/client/"))
        && path.bytes().all(|b| (0x21..0x7f).contains(&b))
        && !path.split('/').any(|s| s == "." || s == "..")
        && !["%2e", "%2f", "%5c", "%25", "%00", "%3b", "%23", "\\", "//", ";", "#"]
            .iter()
            .any(|bad| lower.contains(bad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_crash_hang_or_smuggle_a_path_upstream() {
    foreign_panics();
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.header_read_timeout = Some("1s".into()))
        .start()
        .await;
    let seed = std::env::var("FLAGGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let cases: Vec<Vec<u8>> = (0..400).map(|_| request(&mut rng)).collect();

    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for batch in cases.chunks(16) {
        let mut set = tokio::task::JoinSet::new();
        for (i, case) in batch.iter().enumerate() {
            let case = case.clone();
            let addr = gw.addr;
            set.spawn(async move { (i, exchange(addr, &case).await) });
        }
        while let Some(done) = set.join_next().await {
            let (i, outcome) = done.unwrap();
            let shown = String::from_utf8_lossy(&batch[i][..batch[i].len().min(300)]).into_owned();
            match &outcome {
                Outcome::Status(s) => {
                    assert!(*s < 500 || *s == 502 || *s == 504, "seed {seed}: {s} for {shown:?}");
                    *tally.entry(s.to_string()).or_default() += 1;
                }
                Outcome::Closed => *tally.entry("closed".into()).or_default() += 1,
                Outcome::Garbage(g) => panic!("seed {seed}: not an HTTP response: {g:?} for {shown:?}"),
                Outcome::Hung => panic!("seed {seed}: no answer and no close within 5 s for {shown:?}"),
            }
        }
    }
    eprintln!("seed {seed}: outcomes {tally:?}");

    let panics = foreign_panics().lock().unwrap().clone();
    assert!(panics.is_empty(), "seed {seed}: the gateway panicked: {panics:#?}");

    let seen = up.seen();
    for r in &seen {
        assert!(
            is_plainly_canonical(r.path()),
            "seed {seed}: upstream received a non-canonical path {:?} ({:?})",
            r.target,
            r
        );
        assert_eq!(
            flaggate::internals::canonicalize(r.path()).map(|c| c.as_str().to_string()),
            Ok(r.path().to_string()),
            "seed {seed}: forwarded path is not a fixed point of canonicalization"
        );
    }

    // Still healthy and serving.
    up.clear();
    let ok = support::get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(ok.status, 200, "seed {seed}: {}", ok.text());
    assert_eq!(up.count(), 1);
    assert_eq!(support::get(gw.admin, "/health", None).await.status, 200);
}

fn body_json(reply: &str) -> serde_json::Value {
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {reply}"))
}

#[tokio::test]
async fn two_authorization_headers_are_refused_before_upstream() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(OTHER, "client")
        .start()
        .await;
    for (first, second) in [
        (CLIENT, OTHER),
        (CLIENT, CLIENT),
        (CLIENT, "nonsense"),
        ("nonsense", CLIENT),
    ] {
        for spelling in ["Authorization", "authorization", "AUTHORIZATION"] {
            let req = format!(
                "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {first}\r\n{spelling}: {second}\r\nConnection: close\r\n\r\n"
            );
            let reply = raw(gw.addr, req.as_bytes()).await;
            assert_eq!(raw_status(&reply), 400, "{reply}");
            assert_eq!(body_json(&reply)["code"], "duplicate_authorization", "{reply}");
        }
    }
    assert_eq!(up.count(), 0, "upstream saw {:?}", up.seen());
}

#[tokio::test]
async fn two_host_headers_are_refused_before_upstream() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    for auth in [format!("Authorization: {CLIENT}\r\n"), String::new()] {
        for (h1, h2) in [("gw", "evil.example"), ("gw", "gw")] {
            let req = format!(
                "GET /api/client/features HTTP/1.1\r\nHost: {h1}\r\nHost: {h2}\r\n{auth}Connection: close\r\n\r\n"
            );
            let reply = raw(gw.addr, req.as_bytes()).await;
            let status = raw_status(&reply);
            if auth.is_empty() {
                // Refused either way; which refusal comes first is not the point.
                assert!(status == 400 || status == 401, "{reply}");
            } else {
                assert_eq!(status, 400, "{reply}");
            }
        }
    }
    assert_eq!(up.count(), 0, "upstream saw {:?}", up.seen());
}

/// A CONNECT whose target is a path passes the path checks, but an HTTP client turns a forwarded
/// CONNECT into authority-form (`CONNECT host:port`): the upstream would get a request for something
/// other than the path that was authorized. Either refuse it or forward exactly the authorized path.
#[tokio::test]
async fn connect_with_a_path_is_never_forwarded_as_something_else() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let req = format!(
        "CONNECT /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"
    );
    let reply = raw(gw.addr, req.as_bytes()).await;
    let status = raw_status(&reply);
    assert!(status != 0 && status < 500, "{reply}");
    for r in up.seen() {
        assert_eq!(
            (r.method.as_str(), r.target.as_str()),
            ("CONNECT", "/api/client/features"),
            "authorized /api/client/features but upstream received {} {:?}",
            r.method,
            r.target
        );
    }
    // Authority-form CONNECT (a real tunnel request) is refused outright.
    let req = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {}\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n",
        up.addr, up.addr
    );
    let reply = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&reply), 400, "{reply}");
}
