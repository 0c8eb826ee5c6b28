//! The answers the proxy gives itself: `application/problem+json` (RFC 9457).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use serde_json::json;

use crate::upstream::ProxyBody;

/// An error answer: what went wrong, in a form a client and an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    /// A stable identifier of the kind of problem (`store-unavailable`).
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// For the log only: what an operator needs beyond `detail` (a Redis error and what to
    /// check), which is no business of the client's.
    pub cause: Option<String>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            status,
            kind,
            title,
            detail: detail.into(),
            cause: None,
        }
    }

    pub fn bad_gateway(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-unavailable",
            "Upstream unavailable",
            detail,
        )
    }

    pub fn protocol_violation(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "session-protocol-violation",
            "The application answered with an invalid session header",
            detail,
        )
    }

    pub fn store_unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "Session store unavailable",
            detail,
        )
    }

    /// The store failed for a reason of its own: the client learns that, the log why.
    pub fn store_failed(cause: String) -> Problem {
        Problem {
            cause: Some(cause),
            ..Problem::store_unavailable(
                "the session store could not be used; the proxy's log says why",
            )
        }
    }

    pub fn timeout() -> Problem {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "Upstream timed out",
            "the application did not answer within timeouts.upstream_response",
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Malformed request",
            detail,
        )
    }

    pub fn headers_too_large(max: usize) -> Problem {
        Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
            format!("the request head is larger than {max} bytes (limits.max_header_bytes)"),
        )
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = json!({
            "type": format!("urn:session-proxy:problem:{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}
