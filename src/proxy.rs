//! The request's way through the gateway, in phases, each a function with one job and a contract:
//!
//! 1. [`validate`] — head → [`Head`] (origin form, a forwarded method, [`CanonicalPath`], one `Host`,
//!    a declared length within the limit, no `Connection` naming a protected field), or 400/405/413.
//!    Everything refusable from the head alone is refused here, before any token work;
//! 2. authenticate — `Authorization` → [`Credential`] ([`Authenticator`](crate::token::auth::Authenticator) owns the miss handling:
//!    early sync, PAT check), or 400/502;
//! 3. [`authorize`] — rule × credential → [`Grant`], then the token's rate limit: 401/403/429 end here
//!    and never reach upstream;
//! 4. [`prepare`] — hop-by-hop, Connection-listed and client copies of our headers out; `X-Forwarded-*`,
//!    `Host` and the canonical target in;
//! 5. [`forward`] — body read up to the buffer, an upstream slot, then [`Upstream`](crate::upstream::Upstream): bodies streamed
//!    both ways, upstream failures → 502/503/504;
//! 6. record — one access-log line and the metrics, for every request whatever its fate ([`Pending`]).

pub mod body;
pub mod conn;
pub mod headers;
pub mod metrics;
pub mod record;
pub mod server;
pub mod state;

pub use state::{ConnCtx, Gateway, Live};

use crate::error::{Blame, Decision, Rejection};
use crate::path::{canonicalize, CanonicalPath, PathError};
use crate::policy::{decide, forwarded_method, Rule, Verdict};
use crate::token::auth::Credential;
use crate::token::{now_unix, Digest, Fingerprint, TokenKind};
use crate::upstream::{Owner, Slot};
use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use metrics::method_label;
use record::LoggedBody;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What the phases learn about a request, for the record phase.
struct Outcome {
    route_class: Arc<str>,
    /// The route serves browsers (token-less preflight allowed): denials must be readable cross-origin.
    browser_route: bool,
    token: Option<(Fingerprint, Option<TokenKind>)>,
    upstream_time: Option<Duration>,
    path: Option<String>,
    /// The upstream slot this request holds, passed on to its response body.
    slot: Option<Slot>,
    /// How the shield answered, if it did.
    cache: Option<crate::shield::Note>,
    /// The client's address as decided (the peer, or a trusted proxy's client), once known.
    client: Option<std::net::IpAddr>,
    /// Forwarded on a public route (its own decision in the log and metrics).
    public: bool,
}

/// A request between its head and its response: owns what the record phase needs, so that a request
/// whose client leaves mid-way (hyper drops the service future) is still logged, counted and given back
/// to its connection's watchdog — as status 499, decision `client_gone`.
struct Pending<'a> {
    gw: &'a Gateway,
    ctx: &'a ConnCtx,
    started: Instant,
    method: http::Method,
    request_id: http::HeaderValue,
    app: Option<HeaderValue>,
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
        if let (Some(a), true) = (self.app.as_ref().and_then(record::app_name), authenticated) {
            m.sdk_requests.with_label_values(&[m.app_label(a)]).inc();
        }
        record::Record {
            started: self.started,
            client: out.client.unwrap_or_else(|| self.ctx.peer.ip()),
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
            cache: out.cache,
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

/// The service function: never fails, every error becomes a response in [`Rejection::to_response`].
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
    let request_id = record::request_id(req.headers().get(headers::X_REQUEST_ID));
    let mut pending = Pending {
        gw: &gw,
        ctx: &ctx,
        started: Instant::now(),
        method: req.method().clone(),
        request_id: request_id.clone(),
        app: req.headers().get("unleash-appname").cloned(),
        out: Outcome {
            browser_route: false,
            route_class: gw.unrouted.clone(),
            token: None,
            upstream_time: None,
            path: None,
            slot: None,
            cache: None,
            client: None,
            public: false,
        },
        open: true,
    };
    let result = run_phases(&gw, req, &ctx, request_id.clone(), &mut pending.out).await;
    let (mut resp, decision, rejection) = match result {
        Ok(resp) if pending.out.public => (resp, Decision::Public, None),
        Ok(resp) => (resp, Decision::Allowed, None),
        Err(rej) => {
            let mut r = rej.to_response();
            if pending.out.browser_route {
                headers::allow_cross_origin_read(r.headers_mut());
            }
            (r.map(Either::Right), rej.decision(), Some(rej))
        }
    };
    resp.headers_mut().insert(headers::X_REQUEST_ID, request_id);

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
    request_id: HeaderValue,
    out: &mut Outcome,
) -> Result<Response<ProxyBody>, Rejection> {
    let (mut parts, body) = req.into_parts();
    let uri = std::mem::take(&mut parts.uri);
    let live = gw.live.load();

    let head = validate(&parts, &uri, &live, ctx, out)?;
    if record::wanted() {
        out.path = Some(head.path.as_str().to_owned());
    }
    out.route_class = head.rule.name.clone();
    out.browser_route = head.rule.preflight;

    let credential = gw.auth.authenticate(&parts.headers).await.map_err(|e| {
        if let crate::token::auth::AuthError::Unverifiable { token, .. } = &e {
            out.token = Some((*token, None));
        }
        Rejection::from(e)
    })?;
    out.token = credential
        .as_ref()
        .map(|c| (c.digest.fingerprint(), c.info.as_ref().map(|i| i.kind)));

    let grant = authorize(gw, &head, &parts, credential.as_ref())?;
    out.public = matches!(grant, Grant::Public);
    let cached = shield(
        gw,
        &parts,
        &head,
        &grant,
        credential.as_ref(),
        uri.query(),
        ctx,
        &request_id,
        out,
    );
    if let Some(resp) = cached.await? {
        return Ok(resp);
    }
    prepare(gw, &mut parts, &head, &grant, uri.query(), ctx, request_id)?;
    let (limits, timeout) = (live.body, live.upstream_timeout);
    drop(live);
    forward(gw, parts, body, &grant, limits, timeout, ctx, out).await
}

/// What phase 1 established about a request from its head alone.
struct Head<'a> {
    path: CanonicalPath<'a>,
    rule: &'a Rule,
    /// The client's `Host` (or `:authority`), for `X-Forwarded-Host`.
    host: Option<HeaderValue>,
    /// `X-Forwarded-For` to send, when a trusted proxy's chain replaces the connection's own.
    forwarded_for: Option<HeaderValue>,
}

/// Phase 1. Contract: returns only for an origin-form request with a forwarded method, a canonical
/// path, at most one `Host`, a declared length within the limit, no `Connection` naming a field we
/// authorize or frame by, and a client address the route admits; touches no token and no I/O. Records
/// the decided client address in `out`.
fn validate<'a>(
    parts: &Parts,
    uri: &'a Uri,
    live: &'a Live,
    ctx: &ConnCtx,
    out: &mut Outcome,
) -> Result<Head<'a>, Rejection> {
    // A raw `#` in an HTTP/1 target: the URI parser dropped it with the rest of the target, only the
    // connection's reader saw it (asked for every request, so that no mark outlives its request).
    let fragment = ctx.activity.as_ref().is_some_and(|a| a.take_fragment());
    if fragment && parts.version < Version::HTTP_2 {
        return Err(Rejection::BadPath(PathError::Fragment));
    }
    // HTTP/2 always carries scheme and authority; HTTP/1 only in absolute-form, which names a host the
    // client wants and is refused rather than silently re-targeted.
    if parts.version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(Rejection::NotOriginForm);
    }
    if forwarded_method(&parts.method).is_none() {
        return Err(Rejection::MethodNotAllowed);
    }
    let path = canonicalize(uri.path()).map_err(Rejection::BadPath)?;
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts
        .next()
        .cloned()
        .or_else(|| uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if hosts.next().is_some() {
        return Err(Rejection::DuplicateHost);
    }
    if let Some(name) = headers::connection_names_protected(&parts.headers) {
        return Err(Rejection::ConnectionNamesProtected(name));
    }
    // A declared length over the limit is refused before anything is read or sent; an undeclared one
    // is cut when it crosses the limit.
    let max = live.body.max;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Rejection::BodyTooLarge(max));
    }
    let rule = live.policy.route(&path);
    let origin = crate::net::origin(&parts.headers, ctx.peer.ip(), &live.trusted);
    out.client = Some(origin.client);
    if !rule.admits_source(origin.client) {
        return Err(Rejection::SourceNotAllowed);
    }
    Ok(Head {
        path,
        rule,
        host,
        forwarded_for: origin.forwarded_for,
    })
}

/// Who the request goes to Unleash as.
enum Grant {
    /// A known token the route admits (its digest: the key of its share of the upstream slots).
    Token(Digest),
    /// A token-less CORS preflight: forwarded bare, counted with the other anonymous requests.
    Preflight,
    /// A public route: forwarded as it came, without a token check, counted as anonymous.
    Public,
}

/// Phase 3. Contract: returns only when the route admits this credential (or this is a real CORS
/// preflight on a route that takes them) and the token is within its rate limit.
fn authorize(
    gw: &Gateway,
    head: &Head<'_>,
    parts: &Parts,
    credential: Option<&Credential>,
) -> Result<Grant, Rejection> {
    let cors_preflight = headers::is_cors_preflight(&parts.method, &parts.headers);
    let info = credential.and_then(|c| c.info.as_deref());
    let verdict = decide(head.rule, cors_preflight, credential.is_some(), info, now_unix());
    if let Some(rej) = Rejection::from_verdict(verdict, head.rule.denial) {
        return Err(rej);
    }
    match (verdict, credential, info) {
        (Verdict::Preflight, _, _) => Ok(Grant::Preflight),
        (Verdict::Public, _, _) => Ok(Grant::Public),
        (Verdict::Allow, Some(c), Some(info)) => {
            gw.limiter.check(&c.digest, info).map_err(Rejection::RateLimited)?;
            Ok(Grant::Token(c.digest))
        }
        // `decide` allows only a known token; anything else here is a bug, refused rather than forwarded.
        _ => Err(Rejection::Internal(format!("authorized without a token: {verdict:?}"))),
    }
}

/// Phase 4. Contract: the request carries no hop-by-hop field, nothing the client named in
/// `Connection`, no client copy of a header we set, override or forwarding claim; our `X-Forwarded-*`,
/// `Host` and request id; and the canonical path (plus the untouched query) as its target.
fn prepare(
    gw: &Gateway,
    parts: &mut Parts,
    head: &Head<'_>,
    grant: &Grant,
    query: Option<&str>,
    ctx: &ConnCtx,
    request_id: HeaderValue,
) -> Result<(), Rejection> {
    parts.uri = prepare_head(gw, &mut parts.headers, head, grant, query, ctx, request_id)?;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Phase 4 on a request's headers; returns the upstream target (also for the shield's fills).
fn prepare_head(
    gw: &Gateway,
    h: &mut http::HeaderMap,
    head: &Head<'_>,
    grant: &Grant,
    query: Option<&str>,
    ctx: &ConnCtx,
    request_id: HeaderValue,
) -> Result<Uri, Rejection> {
    headers::strip_hop_by_hop(h);
    headers::strip_gateway_set(h);
    headers::strip_consumed(h);
    if matches!(grant, Grant::Preflight) {
        headers::strip_for_preflight(h);
    }
    h.insert(HOST, gw.upstream.host().clone());
    let forwarded_for = head.forwarded_for.clone().unwrap_or_else(|| ctx.forwarded_for.clone());
    headers::set_forwarded(h, forwarded_for, ctx.proto, head.host.clone());
    h.insert(headers::X_REQUEST_ID, request_id);
    gw.upstream
        .uri(head.path.as_str(), query)
        .map_err(|e| Rejection::Internal(format!("forward URI: {e}")))
}

/// Phase 3½, shield. Contract: answers an SDK feature poll (authorized, rate-limited) from the shield's
/// cache when it is cacheable and the shield has an answer; `None` to prepare and forward as usual. A
/// fill or revalidation sends the request as phase 4 would prepare it — made only when one starts, so
/// a hit pays nothing for it.
#[allow(clippy::too_many_arguments)]
async fn shield(
    gw: &Gateway,
    parts: &Parts,
    head: &Head<'_>,
    grant: &Grant,
    credential: Option<&Credential>,
    query: Option<&str>,
    ctx: &ConnCtx,
    request_id: &HeaderValue,
    out: &mut Outcome,
) -> Result<Option<Response<ProxyBody>>, Rejection> {
    let (Grant::Token(digest), Some(info)) = (grant, credential.and_then(|c| c.info.as_ref())) else {
        return Ok(None);
    };
    if !gw.shield.enabled() {
        return Ok(None);
    }
    let key = match crate::shield::classify(
        &parts.method,
        head.path.as_str(),
        query,
        &parts.headers,
        info.kind,
        *digest,
    ) {
        None => return Ok(None),
        Some(crate::shield::Class::Bypass(reason)) => {
            gw.shield.bypassed(reason);
            return Ok(None);
        }
        Some(crate::shield::Class::Cacheable(key)) => key,
    };
    let client_etag = parts.headers.get(http::header::IF_NONE_MATCH);
    let gzip = crate::shield::accepts_gzip(&parts.headers);
    let asked = Instant::now();
    let fill = || {
        let mut h = parts.headers.clone();
        let uri = prepare_head(gw, &mut h, head, grant, query, ctx, request_id.clone()).ok()?;
        let mut req = Request::new(crate::upstream::Body::Empty);
        *req.uri_mut() = uri;
        *req.headers_mut() = h;
        Some(req)
    };
    let served = gw.shield.serve(key, &fill, client_etag, gzip).await;
    let waited = |out: &mut Outcome, note: &crate::shield::Note| {
        out.cache = Some(*note);
        if note.asked {
            out.upstream_time = Some(asked.elapsed());
        }
    };
    match served {
        crate::shield::Served::Answer(resp, note) => {
            waited(out, &note);
            Ok(Some(resp.map(Either::Right)))
        }
        crate::shield::Served::Failed(e, note) => {
            waited(out, &note);
            Err(Rejection::Upstream(e))
        }
        crate::shield::Served::Forward(_) => Ok(None),
    }
}

/// Phase 5. Contract: the body (up to the buffer) is read before a slot is taken, so a slow client
/// costs its own connection and never one of Unleash's slots; a preflight goes without one. Records
/// the slot and the upstream time in `out` as it goes.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gw: &Gateway,
    parts: Parts,
    body: Incoming,
    grant: &Grant,
    limits: body::BodyLimits,
    timeout: Duration,
    ctx: &ConnCtx,
    out: &mut Outcome,
) -> Result<Response<ProxyBody>, Rejection> {
    let fault = body::FaultCell::default();
    let body = match grant {
        Grant::Preflight => crate::upstream::Body::Empty,
        Grant::Token(_) | Grant::Public => body::read_head(body, limits, fault.clone())
            .await
            .map_err(|f| f.rejection(limits.max))?,
    };
    let owner = Owner {
        connection: Some(&ctx.share),
        token: match grant {
            Grant::Token(d) => Some(&d.0),
            Grant::Preflight | Grant::Public => None,
        },
    };
    // Queueing for a slot counts as upstream time: it is Unleash's pace that makes requests wait.
    let sent = Instant::now();
    let slot = gw.upstream.slot(owner).await;
    out.upstream_time = Some(sent.elapsed());
    let (result, slot) = gw.upstream.send(Request::from_parts(parts, body), slot?, timeout).await;
    out.upstream_time = Some(sent.elapsed());
    out.slot = slot;
    // The client's own body broke the exchange: its fault, not the upstream's.
    let resp = result.map_err(|e| match fault.get() {
        Some(f) => f.rejection(limits.max),
        None => Rejection::Upstream(e),
    })?;
    let (mut rparts, rbody) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    Ok(Response::from_parts(rparts, Either::Left(rbody)))
}
