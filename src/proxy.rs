//! The request's way through the gateway, in phases (each a small step with one job):
//!
//! 1. **canonicalize** — origin-form target → [`CanonicalPath`] or 400;
//! 2. **authenticate** — `Authorization` → digest → store entry (or none);
//! 3. **authorize** — rule × method × entry → [`Verdict`]; denials end here and never reach upstream;
//! 4. **prepare** — hop-by-hop and client copies of our headers removed, `X-Forwarded-*` set;
//! 5. **forward** — pooled client, bodies streamed both ways, upstream failures → 502/504;
//! 6. **record** — one access-log line and the metrics, for every request whatever its fate.

pub mod body;
pub mod conn;
pub mod connector;
pub mod forward;
pub mod headers;
pub mod record;
pub mod server;
pub mod slots;

use crate::config::{Config, Upstream};
use crate::error::{Blame, Decision, Rejection};
use crate::path::canonicalize;
use crate::policy::{decide, Policy, Verdict};
use crate::telemetry::{method_label, Metrics};
use crate::token::extract::extract;
use crate::token::pat::PatValidator;
use crate::token::store::TokenStore;
use crate::token::unleash::UnleashSync;
use crate::token::{now_unix, Digest, Fingerprint, TokenInfo, TokenKind};
use arc_swap::ArcSwap;
use bytes::Bytes;
use forward::UpstreamClient;
use http::header::HOST;
use http::{Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use record::LoggedBody;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Everything a request handler needs, shared by all connections.
pub struct Gateway {
    /// The reloadable part of the configuration, swapped whole on reload.
    pub live: ArcSwap<Live>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    client: UpstreamClient,
    slots: Arc<slots::Slots>,
    upstream: Upstream,
    unleash: Option<UnleashMode>,
    /// Route class of requests refused before routing (`none`), shared instead of allocated each time.
    unrouted: Arc<str>,
    /// `Host` for every forwarded request, made once instead of formatted per request by the client.
    upstream_host: http::HeaderValue,
}

/// Settings a config reload may change without a restart. Connections read them when they start,
/// requests when they arrive.
pub struct Live {
    pub policy: Policy,
    pub body: body::BodyLimits,
    pub upstream_timeout: Duration,
    pub conn: server::ConnLimits,
    pub limiter: Option<crate::ratelimit::RateLimiter>,
    /// Each connection's and token's share of the upstream slots.
    pub shares: slots::Shares,
}

impl Live {
    pub fn from_config(cfg: &Config) -> Live {
        Live {
            policy: Policy::new(cfg.routes.clone()),
            body: body::BodyLimits {
                max: cfg.max_request_body,
                buffer: cfg.request_body_buffer,
                stall: cfg.header_read_timeout,
                min_rate: cfg.min_request_body_rate,
            },
            upstream_timeout: cfg.upstream_timeout,
            conn: server::ConnLimits::from_config(cfg),
            limiter: (!cfg.rate_limits.is_empty()).then(|| crate::ratelimit::RateLimiter::new(cfg.rate_limits.clone())),
            shares: slots::Shares {
                per_connection: cfg.upstream_max_inflight_per_connection,
                per_token: cfg.upstream_max_inflight_per_token(),
            },
        }
    }
}

/// What a request knows about its connection.
#[derive(Clone)]
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// `X-Forwarded-For` for this peer, made once per connection.
    pub forwarded_for: http::HeaderValue,
    pub proto: &'static str,
    pub activity: Option<Arc<conn::Activity>>,
    /// The upstream slots this connection holds, against its share.
    pub share: slots::ConnShare,
    /// Turns true at shutdown: open event streams are ended cleanly.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}

/// What a store miss may still consult in Unleash-sync mode.
pub struct UnleashMode {
    pub sync: Arc<UnleashSync>,
    pub pat: PatValidator,
}

impl UnleashMode {
    /// A PAT is asked about (rate-capped, coalesced, negatively cached); any other unknown token may pull
    /// the next token sync forward (debounced) and is then looked up once more.
    async fn resolve_miss(
        &self,
        store: &TokenStore,
        token: &str,
        digest: Digest,
    ) -> Result<Option<Arc<TokenInfo>>, Rejection> {
        if token.starts_with("user:") {
            // A PAT Unleash cannot be asked about is not "unknown": say the flag server is unreachable.
            self.pat.check(token, digest).await.map_err(|_| {
                Rejection::UpstreamConnect("personal access token could not be validated: Unleash unavailable".into())
            })
        } else {
            self.sync.on_miss().await;
            Ok(store.lookup(&digest))
        }
    }
}

impl Gateway {
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Applies a reloaded configuration's live part, and the upstream slots' new sizes.
    pub fn apply(&self, cfg: &Config) {
        let live = Live::from_config(cfg);
        self.metrics.show_shares(live.shares);
        self.live.store(Arc::new(live));
        self.slots.resize(cfg.upstream_max_inflight);
    }

    pub fn new(
        cfg: &Config,
        store: Arc<TokenStore>,
        metrics: Arc<Metrics>,
        unleash: Option<UnleashMode>,
    ) -> Result<Gateway, crate::tls::TlsError> {
        let slots = slots::Slots::new(cfg.upstream_max_inflight, cfg.upstream_connect_timeout);
        metrics.watch_upstream_slots(slots.clone());
        let live = Live::from_config(cfg);
        metrics.show_shares(live.shares);
        Ok(Gateway {
            client: forward::build_client(cfg, metrics.upstream_connections.clone())?,
            slots,
            unleash,
            live: ArcSwap::from_pointee(live),
            store,
            metrics,
            upstream: cfg.upstream.clone(),
            unrouted: Arc::from("none"),
            upstream_host: cfg.upstream.host_header(),
        })
    }
}

/// What the phases learn about a request, for the record phase.
struct Outcome {
    route_class: Arc<str>,
    /// The route serves browsers (token-less preflight allowed): denials must be readable cross-origin.
    browser_route: bool,
    token: Option<(Fingerprint, Option<TokenKind>)>,
    upstream_time: Option<Duration>,
    path: Option<String>,
    /// The upstream slot this request holds, passed on to its response body.
    slot: Option<slots::Slot>,
}

/// Bounded app-name label values: the first [`APP_LABEL_CAP`] names seen, then `other`.
pub const APP_LABEL_CAP: usize = 100;

/// A request between its head and its response: owns what the record phase needs, so that a request
/// whose client leaves mid-way (hyper drops the service future) is still logged, counted and given back
/// to its connection's watchdog — as status 499, decision `client_gone`.
struct Pending<'a> {
    gw: &'a Gateway,
    ctx: &'a ConnCtx,
    started: Instant,
    method: http::Method,
    request_id: http::HeaderValue,
    app: Option<String>,
    out: Outcome,
    /// Cleared once the response head is handed to hyper (the body then owns the rest).
    open: bool,
}

impl Pending<'_> {
    /// Counts the request in the metrics and builds its log line.
    fn close(&mut self, status: http::StatusCode, decision: Decision, rejection: Option<&Rejection>) -> record::Record {
        self.open = false;
        self.gw.metrics.inflight.dec();
        let out = &mut self.out;
        let gateway_time = self
            .started
            .elapsed()
            .saturating_sub(out.upstream_time.unwrap_or_default());
        let m = &self.gw.metrics;
        m.requests
            .with_label_values(&[
                &out.route_class,
                method_label(&self.method),
                status.as_str(),
                decision.as_str(),
            ])
            .inc();
        m.request_duration
            .with_label_values(&[&out.route_class])
            .observe(gateway_time.as_secs_f64());
        if let Some(t) = out.upstream_time {
            m.upstream_duration
                .with_label_values(&[&out.route_class])
                .observe(t.as_secs_f64());
        }
        // Only a known token may name an app: the label set is bounded, and junk must not fill it.
        let authenticated = out.token.is_some_and(|(_, kind)| kind.is_some());
        if let (Some(a), true) = (&self.app, authenticated) {
            m.sdk_requests.with_label_values(&[m.app_label(a)]).inc();
        }
        record::Record {
            started: self.started,
            method: self.method.clone(),
            path: out.path.take(),
            route_class: out.route_class.clone(),
            status: status.as_u16(),
            decision,
            reason: rejection
                .map(|r| r.code())
                .or((decision == Decision::ClientGone).then_some("client_gone")),
            token: out.token,
            app: self.app.take(),
            request_id: self.request_id.clone(),
            gateway_time,
            upstream_time: out.upstream_time,
            error: rejection
                .filter(|r| r.blame() != Blame::Downstream)
                .map(|r| r.to_string()),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // The client left before its response head: hyper dropped the request mid-way.
        let forwarded = self.out.upstream_time.is_some();
        self.close(CLIENT_GONE, Decision::ClientGone, None).emit(0, false);
        if let Some(a) = &self.ctx.activity {
            a.end();
            if forwarded {
                a.cancelled();
            }
        }
    }
}

/// nginx's "client closed request": no response was sent, the status exists only in logs and metrics.
const CLIENT_GONE: http::StatusCode = match http::StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => http::StatusCode::BAD_REQUEST,
};

/// The service function: never fails, every error becomes a response in [`Rejection::into_response`].
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    ctx: ConnCtx,
) -> Result<Response<LoggedBody>, Infallible> {
    if let Some(a) = &ctx.activity {
        a.begin();
    }
    let h2 = req.version() == Version::HTTP_2;
    gw.metrics.inflight.inc();
    let request_id = record::request_id(req.headers().get(REQUEST_ID));
    let mut pending = Pending {
        gw: &gw,
        ctx: &ctx,
        started: Instant::now(),
        method: req.method().clone(),
        request_id: request_id.clone(),
        app: req
            .headers()
            .get("unleash-appname")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(64).collect::<String>()),
        out: Outcome {
            browser_route: false,
            route_class: gw.unrouted.clone(),
            token: None,
            upstream_time: None,
            path: None,
            slot: None,
        },
        open: true,
    };
    let result = run_phases(&gw, req, &ctx, request_id.clone(), &mut pending.out).await;
    let (mut resp, decision, rejection) = match result {
        Ok(resp) => (resp, Decision::Allowed, None),
        Err(rej) => {
            let mut r = rej.into_response();
            if pending.out.browser_route {
                headers::allow_cross_origin_read(r.headers_mut());
            }
            (r.map(Either::Right), rej.decision(), Some(rej))
        }
    };
    resp.headers_mut().insert(REQUEST_ID, request_id);

    // 6. record: metrics now, the log line when the body is done.
    let rec = pending.close(resp.status(), decision, rejection.as_ref());
    let slot = pending.out.slot.take();
    drop(pending);
    let streaming = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let guards = match (streaming, &ctx.stop) {
        (true, Some(stop)) => Some(record::StreamGuards {
            stop: stop.clone(),
            idle: gw.live.load().conn.idle_timeout,
        }),
        _ => None,
    };
    let clock = ctx.activity.as_ref().filter(|_| h2).map(|a| a.stream_clock());
    Ok(resp.map(|b| LoggedBody::new(b, rec, ctx.activity.clone(), clock, slot, guards)))
}

async fn run_phases(
    gw: &Gateway,
    req: Request<Incoming>,
    ctx: &ConnCtx,
    request_id: http::HeaderValue,
    out: &mut Outcome,
) -> Result<Response<ProxyBody>, Rejection> {
    let (mut parts, body) = req.into_parts();
    let uri = std::mem::take(&mut parts.uri);
    let live = gw.live.load();

    // 1. validate: everything that can be refused from the request head alone, before any token work.
    // A raw `#` in an HTTP/1 target: the URI parser dropped it with the rest of the target, only the
    // connection's reader saw it.
    if ctx.activity.as_ref().is_some_and(|a| a.take_fragment()) && parts.version < Version::HTTP_2 {
        return Err(Rejection::BadPath(crate::path::PathError::Fragment));
    }
    // HTTP/2 always carries scheme and authority; HTTP/1 only in absolute-form, which names a host the
    // client wants and is refused rather than silently re-targeted.
    if parts.version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(Rejection::NotOriginForm);
    }
    use http::Method;
    if !matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::OPTIONS
    ) {
        return Err(Rejection::MethodNotAllowed);
    }
    let path = canonicalize(uri.path()).map_err(Rejection::BadPath)?;
    out.path = Some(path.as_str().to_owned());
    let rule = live.policy.route(&path);
    out.route_class = rule.name.clone();
    out.browser_route = rule.preflight;
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next().cloned().or_else(|| {
        uri.authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    });
    if hosts.next().is_some() {
        return Err(Rejection::DuplicateHost);
    }
    if let Some(name) = headers::connection_names_protected(&parts.headers) {
        return Err(Rejection::ConnectionNamesProtected(name));
    }
    // A declared length over the limit is refused before anything is read or sent; an undeclared one
    // is cut when it crosses the limit.
    let limits = live.body;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max) {
        return Err(Rejection::BodyTooLarge(limits.max));
    }

    // 2. authenticate
    let token = extract(&parts.headers).map_err(Rejection::BadAuthorization)?;
    let presented = token.is_some();
    let mut entry = None;
    let mut digest = None;
    if let Some(t) = token {
        let digest = *digest.insert(Digest::of(t));
        entry = gw.store.lookup(&digest);
        let result = if entry.is_some() { "hit" } else { "miss" };
        gw.metrics.token_cache_lookups.with_label_values(&[result]).inc();
        if let (None, Some(unleash)) = (&entry, &gw.unleash) {
            out.token = Some((digest.fingerprint(), None));
            entry = unleash.resolve_miss(&gw.store, t, digest).await?;
        }
        out.token = Some((digest.fingerprint(), entry.as_ref().map(|e| e.kind)));
    }

    // 3. authorize
    let cors_preflight = headers::is_cors_preflight(&parts.method, &parts.headers);
    let verdict = decide(rule, cors_preflight, presented, entry.as_deref(), now_unix());
    if let Some(rej) = Rejection::from_verdict(verdict, rule.denial) {
        return Err(rej);
    }
    debug_assert!(matches!(verdict, Verdict::Allow | Verdict::Preflight));
    if let (Some(limiter), Some(info), Some(d)) = (&live.limiter, &entry, &digest) {
        limiter.check(d, info).map_err(Rejection::RateLimited)?;
    }
    let anonymous = verdict == Verdict::Preflight;

    // 4. prepare
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_gateway_set(&mut parts.headers);
    headers::strip_consumed(&mut parts.headers);
    if anonymous {
        headers::strip_for_preflight(&mut parts.headers);
    }
    parts.headers.insert(HOST, gw.upstream_host.clone());
    headers::set_forwarded(&mut parts.headers, ctx.forwarded_for.clone(), ctx.proto, host);
    parts.headers.insert(REQUEST_ID, request_id);
    parts.uri = forward::upstream_uri(&gw.upstream, &path, uri.query())?;
    parts.version = Version::HTTP_11;

    // 5. forward. The body (up to the buffer) is read before a slot is taken: a slow client costs its
    // own connection, never one of Unleash's slots. A preflight goes without one.
    let fault = body::FaultCell::default();
    let body = if anonymous {
        body::UpstreamBody::Empty
    } else {
        body::read_head(body, limits, fault.clone())
            .await
            .map_err(|f| forward::body_rejection(f, limits.max))?
    };
    let upstream_timeout = live.upstream_timeout;
    let shares = live.shares;
    drop(live);
    let sent = Instant::now();
    // Queueing for a slot counts as upstream time: it is Unleash's pace that makes requests wait.
    let owner = slots::Owner {
        connection: &ctx.share,
        token: if anonymous { None } else { digest.as_ref().map(|d| &d.0) },
    };
    let slot = gw.slots.take_for(owner, shares).await;
    out.upstream_time = Some(sent.elapsed());
    let slot = slot.map_err(|s| {
        gw.metrics
            .upstream_slot_refusals
            .with_label_values(&[s.scope.as_str()])
            .inc();
        Rejection::UpstreamSaturated(s)
    })?;
    let detachable = !matches!(body, body::UpstreamBody::Streaming { .. });
    let req = Request::from_parts(parts, body);
    let (result, slot) = forward::exchange(&gw.client, req, slot, upstream_timeout, detachable).await;
    out.upstream_time = Some(sent.elapsed());
    out.slot = slot;
    let resp = result.map_err(|e| match e {
        forward::Failed::Timeout => Rejection::UpstreamTimeout(upstream_timeout),
        forward::Failed::Client(e) => forward::classify(e, limits.max, fault.get()),
    })?;
    let (mut rparts, rbody) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    Ok(Response::from_parts(rparts, Either::Left(rbody)))
}
