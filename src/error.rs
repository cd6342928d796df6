//! Every way a request can end without an upstream response, and the **one** function that turns it
//! into HTTP. Each rejection knows who caused it (downstream client, upstream, or us): that drives the
//! status, the `decision` label in metrics and the log level.

use crate::path::PathError;
use crate::policy::{DenialStyle, Verdict};
use crate::token::auth::AuthError;
use crate::token::extract::ExtractError;
use crate::upstream::{Saturated, Scope, UpstreamError};
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Downstream,
    Upstream,
    Gateway,
}

/// The `decision` label: bounded, stable, documented in README.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Unauthenticated,
    Forbidden,
    BadRequest,
    RateLimited,
    UpstreamError,
    /// The gateway itself failed (a bug): never charged to Unleash or the client.
    InternalError,
    /// The client left before its response began (status 499 in logs and metrics).
    ClientGone,
    /// Forwarded on a public route, without a token check.
    Public,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Unauthenticated => "unauthenticated",
            Decision::Forbidden => "forbidden",
            Decision::BadRequest => "bad_request",
            Decision::RateLimited => "rate_limited",
            Decision::UpstreamError => "upstream_error",
            Decision::InternalError => "internal_error",
            Decision::ClientGone => "client_gone",
            Decision::Public => "public",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("non-canonical path: {0}")]
    BadPath(PathError),
    #[error("request target must be origin-form (a path), not absolute-form or '*'")]
    NotOriginForm,
    #[error("{0}")]
    BadAuthorization(ExtractError),
    #[error("more than one Host header")]
    DuplicateHost,
    /// `Connection` names a field the gateway authorizes or frames by (it would be stripped after the
    /// request was authorized).
    #[error("Connection header names {0}, which cannot be hop-by-hop")]
    ConnectionNamesProtected(&'static http::HeaderName),
    #[error("method not allowed through the gateway")]
    MethodNotAllowed,
    #[error("malformed request body")]
    MalformedBody,
    #[error("rate limit exceeded for this token")]
    RateLimited(std::time::Duration),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("no token")]
    NoToken(DenialStyle),
    #[error("unknown token")]
    UnknownToken(DenialStyle),
    #[error("expired token")]
    Expired(DenialStyle),
    #[error("token kind may not reach this route")]
    WrongScope,
    /// The route admits only some networks, and the client is in none of them.
    #[error("this route is not open to the client's network")]
    SourceNotAllowed,
    /// Unleash failed us, or its slots are taken (see [`UpstreamError`]).
    #[error("{}", .0.detail())]
    Upstream(UpstreamError),
    /// A PAT Unleash could not be asked about.
    #[error("{}", crate::upstream::chain(.0))]
    Unverifiable(AuthError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<UpstreamError> for Rejection {
    fn from(e: UpstreamError) -> Rejection {
        Rejection::Upstream(e)
    }
}

impl From<AuthError> for Rejection {
    fn from(e: AuthError) -> Rejection {
        match e {
            AuthError::Malformed(e) => Rejection::BadAuthorization(e),
            e @ AuthError::Unverifiable { .. } => Rejection::Unverifiable(e),
        }
    }
}

const API_TOKEN_MSG: &str =
    "This endpoint requires an API token. Please add an authorization header to your request with a valid token";
const NO_HEADER_MSG: &str = "You must log in to use Unleash. Your request had no authorization header, so we could not authorize you. Try logging in at /auth/simple/login";
const BAD_TOKEN_MSG: &str = "You must log in to use Unleash.";
const WRONG_TYPE_MSG: &str = "invalid token: expected a different token type for this endpoint";

impl Rejection {
    /// Maps a non-allowing verdict; `Allow`/`Preflight` are not rejections.
    pub fn from_verdict(v: Verdict, style: DenialStyle) -> Option<Rejection> {
        match v {
            Verdict::Allow | Verdict::Preflight | Verdict::Public => None,
            Verdict::NoToken => Some(Rejection::NoToken(style)),
            Verdict::UnknownToken => Some(Rejection::UnknownToken(style)),
            Verdict::Expired => Some(Rejection::Expired(style)),
            Verdict::WrongScope => Some(Rejection::WrongScope),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadPath(_)
            | Rejection::NotOriginForm
            | Rejection::BadAuthorization(_)
            | Rejection::DuplicateHost
            | Rejection::ConnectionNamesProtected(_)
            | Rejection::MalformedBody => StatusCode::BAD_REQUEST,
            Rejection::NoToken(_) | Rejection::UnknownToken(_) | Rejection::Expired(_) => StatusCode::UNAUTHORIZED,
            Rejection::WrongScope | Rejection::SourceNotAllowed => StatusCode::FORBIDDEN,
            Rejection::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::Upstream(e) => upstream_status(e),
            // As the failure that kept Unleash from being asked (502 when Unleash answered 5xx).
            Rejection::Unverifiable(e) => pat_cause(e).map_or(StatusCode::BAD_GATEWAY, upstream_status),
            Rejection::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Who caused it. Every variant is named: a new one must be classed here, not by a wildcard.
    pub fn blame(&self) -> Blame {
        match self {
            Rejection::BadPath(_)
            | Rejection::NotOriginForm
            | Rejection::BadAuthorization(_)
            | Rejection::DuplicateHost
            | Rejection::ConnectionNamesProtected(_)
            | Rejection::MethodNotAllowed
            | Rejection::MalformedBody
            | Rejection::RateLimited(_)
            | Rejection::BodyTooLarge(_)
            | Rejection::BodyTimeout
            | Rejection::NoToken(_)
            | Rejection::UnknownToken(_)
            | Rejection::Expired(_)
            | Rejection::WrongScope
            | Rejection::SourceNotAllowed => Blame::Downstream,
            // Over its own share of the slots: the client's excess, not Unleash's trouble.
            Rejection::Upstream(UpstreamError::Saturated(Saturated { scope, .. })) if *scope != Scope::Pool => {
                Blame::Downstream
            }
            Rejection::Upstream(_) | Rejection::Unverifiable(_) => Blame::Upstream,
            Rejection::Internal(_) => Blame::Gateway,
        }
    }

    pub fn decision(&self) -> Decision {
        match self {
            Rejection::BadPath(_)
            | Rejection::NotOriginForm
            | Rejection::BadAuthorization(_)
            | Rejection::DuplicateHost
            | Rejection::ConnectionNamesProtected(_)
            | Rejection::BodyTooLarge(_)
            | Rejection::BodyTimeout
            | Rejection::MethodNotAllowed
            | Rejection::MalformedBody => Decision::BadRequest,
            Rejection::NoToken(_) | Rejection::UnknownToken(_) | Rejection::Expired(_) => Decision::Unauthenticated,
            Rejection::WrongScope | Rejection::SourceNotAllowed => Decision::Forbidden,
            Rejection::RateLimited(_) => Decision::RateLimited,
            Rejection::Upstream(_) | Rejection::Unverifiable(_) => match self.blame() {
                Blame::Downstream => Decision::RateLimited,
                Blame::Upstream | Blame::Gateway => Decision::UpstreamError,
            },
            Rejection::Internal(_) => Decision::InternalError,
        }
    }

    /// Stable machine-readable reason, also used as the log's rejection reason.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::BadPath(e) => e.code(),
            Rejection::NotOriginForm => "not_origin_form",
            Rejection::BadAuthorization(ExtractError::Duplicate) => "duplicate_authorization",
            Rejection::BadAuthorization(ExtractError::NotText) => "malformed_authorization",
            Rejection::DuplicateHost => "duplicate_host",
            Rejection::ConnectionNamesProtected(_) => "connection_names_protected",
            Rejection::BodyTooLarge(_) => "body_too_large",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::MalformedBody => "malformed_body",
            Rejection::RateLimited(_) => "rate_limited",
            Rejection::NoToken(_) => "no_token",
            Rejection::UnknownToken(_) => "unknown_token",
            Rejection::Expired(_) => "expired_token",
            Rejection::WrongScope => "wrong_token_type",
            Rejection::SourceNotAllowed => "source_not_allowed",
            Rejection::Upstream(e) => upstream_code(e),
            Rejection::Unverifiable(e) => pat_cause(e).map_or("upstream_unreachable", upstream_code),
            Rejection::Internal(_) => "internal",
        }
    }

    /// The JSON body: Unleash's own shape for denials (so SDK error handling sees what it knows) plus
    /// our stable `code`. Upstream error detail stays in our log, not in the client's body.
    pub fn body(&self) -> serde_json::Value {
        use serde_json::json;
        let code = self.code();
        match self {
            Rejection::NoToken(DenialStyle::ApiToken)
            | Rejection::UnknownToken(DenialStyle::ApiToken)
            | Rejection::Expired(DenialStyle::ApiToken) => {
                json!({ "message": API_TOKEN_MSG, "code": code })
            }
            Rejection::NoToken(DenialStyle::Session) => {
                json!({ "name": "AuthenticationRequired", "message": NO_HEADER_MSG, "code": code })
            }
            Rejection::UnknownToken(DenialStyle::Session) | Rejection::Expired(DenialStyle::Session) => {
                json!({ "name": "UnauthorizedError", "message": BAD_TOKEN_MSG, "code": code })
            }
            Rejection::WrongScope => json!({ "message": WRONG_TYPE_MSG, "code": code }),
            Rejection::Upstream(UpstreamError::Saturated(Saturated { scope, max })) => {
                let message = match scope {
                    Scope::Pool => "The flag server is busy; retry shortly.",
                    Scope::Connection => {
                        "This connection already has its share of requests at the flag server; retry shortly."
                    }
                    Scope::Token => "This token already has its share of requests at the flag server; retry shortly.",
                    Scope::Anonymous => {
                        "Requests without a token already have their share of the flag server; retry shortly."
                    }
                };
                json!({ "message": message, "code": code, "limit": scope.as_str(), "max_inflight": max })
            }
            Rejection::Upstream(UpstreamError::Connect(_)) | Rejection::Unverifiable(_) => {
                json!({ "message": "The flag server could not be reached.", "code": code })
            }
            Rejection::Upstream(UpstreamError::Tls(_)) => {
                json!({ "message": "The flag server's TLS connection failed.", "code": code })
            }
            Rejection::Upstream(UpstreamError::ConnectTimeout(_) | UpstreamError::Timeout(_)) => {
                json!({ "message": "The flag server did not answer in time.", "code": code })
            }
            Rejection::Upstream(UpstreamError::Protocol(_)) => {
                json!({ "message": "The flag server connection failed.", "code": code })
            }
            Rejection::Internal(_) => json!({ "message": "Internal gateway error.", "code": code }),
            Rejection::BadPath(_)
            | Rejection::NotOriginForm
            | Rejection::BadAuthorization(_)
            | Rejection::DuplicateHost
            | Rejection::ConnectionNamesProtected(_)
            | Rejection::MethodNotAllowed
            | Rejection::MalformedBody
            | Rejection::RateLimited(_)
            | Rejection::BodyTooLarge(_)
            | Rejection::BodyTimeout
            | Rejection::SourceNotAllowed => json!({ "message": self.to_string(), "code": code }),
        }
    }

    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut r = json_response(self.status(), &self.body());
        match self {
            Rejection::MethodNotAllowed => {
                r.headers_mut()
                    .insert(http::header::ALLOW, crate::policy::ALLOW.clone());
            }
            Rejection::RateLimited(wait) => {
                // RFC 9110 §10.2.3: whole seconds; round up so a client that obeys is let through.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            Rejection::Upstream(UpstreamError::Saturated(_)) => {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        r
    }
}

/// What a PAT check that could not be made ran into, if it was a transport failure.
fn pat_cause(e: &AuthError) -> Option<&UpstreamError> {
    match e {
        AuthError::Unverifiable { source, .. } => source.0.as_deref(),
        AuthError::Malformed(_) => None,
    }
}

fn upstream_status(e: &UpstreamError) -> StatusCode {
    match e {
        UpstreamError::Connect(_) | UpstreamError::Tls(_) | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
        UpstreamError::ConnectTimeout(_) | UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Saturated(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn upstream_code(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect(_) => "upstream_unreachable",
        UpstreamError::Tls(_) => "upstream_tls",
        UpstreamError::ConnectTimeout(_) | UpstreamError::Timeout(_) => "upstream_timeout",
        UpstreamError::Protocol(_) => "upstream_failed",
        UpstreamError::Saturated(_) => "upstream_saturated",
    }
}

/// A small JSON response; `no-store` because denials must not be cached by anything in between.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
