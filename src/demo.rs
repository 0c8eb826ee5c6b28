//! The built-in application that `session-proxy demo` runs behind the proxy, so a newcomer
//! sees sessions working in a browser.
//!
//! It plays the part of any application: it never sees a cookie or a session ID, only the
//! session the proxy hands it in `X-Session`, and it changes the session through response
//! headers — a visit counter and the login name with `X-Session-Patch`, a fresh ID at login
//! with `X-Session-Rotate`, logout with `X-Session-Update: e30=` (`{}`).

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::session::codec;

// The demo runs with the default header names, so it can name them here.
const SESSION: HeaderName = HeaderName::from_static("x-session");
const SESSION_UPDATE: HeaderName = HeaderName::from_static("x-session-update");
const SESSION_PATCH: HeaderName = HeaderName::from_static("x-session-patch");
const SESSION_ROTATE: HeaderName = HeaderName::from_static("x-session-rotate");

/// The largest login form body read; a username needs far less.
const MAX_FORM_BYTES: usize = 4096;
/// The longest username accepted, in characters.
const MAX_USER_CHARS: usize = 64;

/// Serves the demo application on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener) {
    // The set owns the connection tasks, so dropping this future ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "demo app: accepting a connection failed");
                    // Errors such as running out of file descriptors come back at once;
                    // pausing keeps the loop from spinning on them.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reaps finished connections so the set does not grow with every one served.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Answers the requests of one connection.
async fn serve_connection(stream: TcpStream) {
    let io = TokioIo::new(stream);
    if let Err(e) = http1::Builder::new()
        .serve_connection(io, service_fn(handle))
        .await
    {
        tracing::debug!(error = %e, "demo app: connection ended with an error");
    }
}

/// Routes one request.
async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let received = Received::from_headers(request.headers());
    let method = request.method().clone();
    let response = match (method, request.uri().path()) {
        (Method::GET, "/") => home(received),
        (Method::POST, "/login") => login(request).await,
        (Method::POST, "/logout") => logout(),
        (Method::GET, "/static/style.css") => stylesheet(&received),
        (Method::GET, "/api/session") => api_session(received),
        (_, "/" | "/static/style.css" | "/api/session") => method_not_allowed("GET"),
        (_, "/login" | "/logout") => method_not_allowed("POST"),
        _ => message_page(
            StatusCode::NOT_FOUND,
            "The demo has no page here; start from the home page.",
        ),
    };
    Ok(response)
}

/// The session as this request carried it in `X-Session`.
struct Received {
    /// The session; `{}` when there is none, the header is absent or it is malformed.
    session: Map<String, Value>,
    header: SessionHeader,
}

/// What the request's `X-Session` header looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionHeader {
    Valid,
    /// No header: the request did not come through the proxy, or its path is excluded.
    Absent,
    /// Not base64 of one JSON object, or sent more than once.
    Malformed,
}

impl Received {
    /// Reads `X-Session`; a malformed one counts as `{}`, so no request can make the app fail.
    fn from_headers(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(SESSION).iter();
        let decoded = match (values.next(), values.next()) {
            (None, _) => return Self::empty(SessionHeader::Absent),
            (Some(value), None) => decode_session(value),
            (Some(_), Some(_)) => None,
        };
        match decoded {
            Some(session) => Self {
                session,
                header: SessionHeader::Valid,
            },
            None => Self::empty(SessionHeader::Malformed),
        }
    }

    /// No session, for the given reason.
    fn empty(header: SessionHeader) -> Self {
        Self {
            session: Map::new(),
            header,
        }
    }
}

/// The JSON object in an `X-Session` value, if it is one.
fn decode_session(value: &HeaderValue) -> Option<Map<String, Value>> {
    let json = STANDARD.decode(value.as_bytes()).ok()?;
    match serde_json::from_slice(&json).ok()? {
        Value::Object(session) => Some(session),
        _ => None,
    }
}

/// A session control header's value: standard base64 of `value` as JSON.
fn session_header(value: &Value) -> HeaderValue {
    codec::encode(value.to_string().as_bytes())
}

/// `GET /`: the page, and one more visit counted in the session.
fn home(received: Received) -> Response<Full<Bytes>> {
    let visits = received
        .session
        .get("visits")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_add(1);
    let body = home_page(&received, visits);
    let mut response = html(StatusCode::OK, body);
    // A patch, not an update: only this key changes, whatever else the session holds now.
    response
        .headers_mut()
        .insert(SESSION_PATCH, session_header(&json!({ "visits": visits })));
    response
}

/// `POST /login`: puts the form's `user` in the session under a fresh session ID.
async fn login(request: Request<Incoming>) -> Response<Full<Bytes>> {
    if !is_form(request.headers()) {
        return message_page(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send the login form as application/x-www-form-urlencoded.",
        );
    }
    let body = match Limited::new(request.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return message_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("The login form may be at most {MAX_FORM_BYTES} bytes."),
            );
        }
        Err(_) => {
            return message_page(
                StatusCode::BAD_REQUEST,
                "The login form did not arrive whole.",
            );
        }
    };
    let user = match user_from_form(&body) {
        Ok(user) => user,
        Err(e) => return message_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut response = redirect_home();
    let headers = response.headers_mut();
    headers.insert(SESSION_PATCH, session_header(&json!({ "user": user })));
    // A fresh ID at login, so an ID planted or seen before cannot ride on the new login.
    headers.insert(SESSION_ROTATE, HeaderValue::from_static("1"));
    response
}

/// `POST /logout`: ends the session.
fn logout() -> Response<Full<Bytes>> {
    let mut response = redirect_home();
    response
        .headers_mut()
        .insert(SESSION_UPDATE, session_header(&json!({})));
    response
}

/// `GET /static/style.css`: the page's stylesheet, saying whether the request carried a
/// session; the demo config excludes this path, so it should not.
fn stylesheet(received: &Received) -> Response<Full<Bytes>> {
    let note = match received.header {
        SessionHeader::Absent => {
            "no X-Session header: the proxy's config excludes this path, so the proxy \
             neither read nor wrote a session for it (or the request did not come \
             through the proxy at all)"
        }
        SessionHeader::Valid | SessionHeader::Malformed => {
            "an X-Session header: this path is not excluded in the proxy's config"
        }
    };
    respond(
        StatusCode::OK,
        "text/css; charset=utf-8",
        format!("/* This request carried {note}. */\n\n{STYLE}"),
    )
}

/// `GET /api/session`: the session as JSON, for scripts and curl.
fn api_session(received: Received) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        format!("{:#}\n", Value::Object(received.session)),
    )
}

/// 405 for a known path asked with the wrong method.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = message_page(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("This page only answers {allow}."),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// Whether the request body is declared as an HTML form.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Why a login form was refused; the message tells the user what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FormError {
    MissingUser,
    EmptyUser,
    UserTooLong,
    NotUtf8,
}

impl fmt::Display for FormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormError::MissingUser => f.write_str("The form has no user field."),
            FormError::EmptyUser => f.write_str("Enter a username."),
            FormError::UserTooLong => write!(
                f,
                "A username may be at most {MAX_USER_CHARS} characters long."
            ),
            FormError::NotUtf8 => f.write_str("The form is not valid UTF-8."),
        }
    }
}

/// The username in an `application/x-www-form-urlencoded` body: the first `user` field,
/// trimmed, 1 to 64 characters.
fn user_from_form(body: &[u8]) -> Result<String, FormError> {
    for pair in body.split(|&b| b == b'&') {
        let mut parts = pair.splitn(2, |&b| b == b'=');
        let name = parts.next().unwrap_or_default();
        if form_decode(name)? != "user" {
            continue;
        }
        let value = form_decode(parts.next().unwrap_or_default())?;
        let user = value.trim();
        if user.is_empty() {
            return Err(FormError::EmptyUser);
        }
        if user.chars().count() > MAX_USER_CHARS {
            return Err(FormError::UserTooLong);
        }
        return Ok(user.to_owned());
    }
    Err(FormError::MissingUser)
}

/// Decodes one form name or value: `+` is a space, `%XX` a byte.
fn form_decode(encoded: &[u8]) -> Result<String, FormError> {
    // `+` must become a space before percent-decoding, so that `%2B` stays a `+`.
    let spaced: Vec<u8> = encoded
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| FormError::NotUtf8)
}

/// `text` with the characters HTML gives meaning to replaced by entities, safe inside
/// elements and quoted attributes.
fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

/// A response with a body; never stored by caches, since every answer depends on the session.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An HTML response.
fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/html; charset=utf-8", body)
}

/// 303 to the home page, so that reloading after a form does not post it again.
fn redirect_home() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A short HTML page for an error, with a way back home.
fn message_page(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let title = format!(
        "{} {}",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<section class=\"card\"><h2>{title}</h2><p>{message}</p>\
         <p><a href=\"/\">Back to the demo</a></p></section>",
        title = escape_html(&title),
        message = escape_html(message),
    );
    html(status, page(&title, &body))
}

/// The HTML document around `body`.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · session-proxy demo</title>\n<style>\n{STYLE}</style>\n</head>\n\
         <body>\n<main>\n<h1>session-proxy demo</h1>\n{body}\n</main>\n</body>\n</html>\n",
        title = escape_html(title),
    )
}

/// The home page's HTML for a request that carried `received`, on visit number `visits`.
fn home_page(received: &Received, visits: u64) -> String {
    let notice = match received.header {
        SessionHeader::Valid => String::new(),
        SessionHeader::Absent => notice_card(
            "This request carried no <code>X-Session</code> header, so it did not come \
             through session-proxy and nothing here will be remembered. Open the proxy's \
             address (the one <code>session-proxy demo</code> printed), not the app's.",
        ),
        SessionHeader::Malformed => notice_card(
            "The <code>X-Session</code> header was not base64 of one JSON object, so the \
             app treats the session as <code>{}</code>.",
        ),
    };
    let user = match received.session.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(user)) => Some(user.clone()),
        Some(other) => Some(other.to_string()),
    };
    let you = match user {
        Some(user) => format!(
            "<p>Signed in as <strong>{user}</strong>.</p>\n\
             <p class=\"muted\">At login the app answered with <code>X-Session-Rotate: 1</code>, \
             so the proxy moved your session to a fresh ID: compare the cookie before and \
             after in your browser's developer tools.</p>\n\
             <form method=\"post\" action=\"/logout\"><button type=\"submit\">Log out</button></form>\n\
             <p class=\"muted\">Logging out answers <code>X-Session-Update: e30=</code> \
             (<code>{{}}</code>): the proxy deletes the session and clears the cookie.</p>",
            user = escape_html(&user),
        ),
        None => format!(
            "<p>Not signed in. Any name will do; there is no password.</p>\n\
             <form method=\"post\" action=\"/login\">\
             <input name=\"user\" required maxlength=\"{MAX_USER_CHARS}\" \
             autocomplete=\"username\" placeholder=\"Your name\" aria-label=\"Username\">\
             <button type=\"submit\">Log in</button></form>\n\
             <p class=\"muted\">Logging in answers <code>X-Session-Patch</code> with \
             <code>{{\"user\": …}}</code> and <code>X-Session-Rotate: 1</code>.</p>"
        ),
    };
    let session = escape_html(&format!("{:#}", Value::Object(received.session.clone())));
    let body = format!(
        "<p class=\"lead\">A tiny app behind session-proxy. It never sees a cookie; it \
         reads the session from one request header and changes it with response headers.</p>\n\
         {notice}\
         <section class=\"card\">\n<h2>You</h2>\n{you}\n</section>\n\
         <section class=\"card\">\n<h2>Visits</h2>\n<p class=\"count\">{visits}</p>\n\
         <p class=\"muted\">Each load of this page answers \
         <code>X-Session-Patch: {{\"visits\": {visits}}}</code>; the proxy merges it into \
         the session as stored, so other keys are left alone. Reload to count up.</p>\n\
         </section>\n\
         <section class=\"card\">\n<h2>The session this request carried</h2>\n\
         <pre>{session}</pre>\n\
         <p class=\"muted\">Decoded from <code>X-Session</code>, before this page's patch. \
         Also as JSON: <a href=\"/api/session\">/api/session</a>.</p>\n</section>\n\
         <section class=\"card\">\n<h2>What is happening</h2>\n<ol>\n\
         <li>Your browser holds one cookie with a random session ID. The proxy owns that \
         cookie and the session store; this app never sees either.</li>\n\
         <li>On every request the proxy loads the session and passes it to the app as \
         <code>X-Session</code>: standard base64 of a JSON object (<code>e30=</code> is \
         <code>{{}}</code>, no session).</li>\n\
         <li>The app answers with headers: <code>X-Session-Patch</code> merges keys into \
         the session, <code>X-Session-Update</code> replaces it (<code>{{}}</code> destroys \
         it), <code>X-Session-Rotate: 1</code> moves it to a fresh ID. The proxy strips \
         them before the response reaches you.</li>\n\
         <li>No session is stored until the app first writes one, so the cookie appears \
         after your first visit.</li>\n\
         <li>Excluded paths get no session at all: the demo config excludes \
         <a href=\"/static/style.css\">/static/style.css</a>, and that stylesheet says \
         whether its request carried <code>X-Session</code>.</li>\n</ol>\n</section>",
    );
    page("Home", &body)
}

/// A highlighted card for something the visitor should know before reading on.
fn notice_card(html: &str) -> String {
    format!("<section class=\"card notice\">\n<p>{html}</p>\n</section>\n")
}

/// The demo's stylesheet, inlined in every page and also served at `/static/style.css`.
const STYLE: &str = r#":root { color-scheme: light dark; --accent: #2563eb; --muted: #6b7280; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 44rem; margin: 0 auto; padding: 2rem 1rem 4rem; }
h1 { margin: 0 0 .25rem; font-size: 1.75rem; }
h2 { margin: 0 0 .75rem; font-size: 1.1rem; }
p { margin: 0 0 .75rem; }
p:last-child { margin-bottom: 0; }
.lead { margin-bottom: 1.5rem; color: var(--muted); }
.muted { color: var(--muted); font-size: .9rem; }
.card { background: rgba(127, 127, 127, .08); border-radius: .75rem; padding: 1.25rem 1.5rem; margin-bottom: 1rem; }
.notice { border-left: 4px solid #d97706; background: rgba(217, 119, 6, .12); }
.count { font-size: 2.5rem; font-weight: 700; line-height: 1; }
pre { margin: 0 0 .75rem; padding: .75rem 1rem; border-radius: .5rem; background: rgba(127, 127, 127, .15); overflow-x: auto; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .875rem; }
form { display: flex; flex-wrap: wrap; gap: .5rem; margin: 0 0 .75rem; }
input { flex: 1; min-width: 10rem; padding: .5rem .75rem; border: 1px solid rgba(127, 127, 127, .5); border-radius: .5rem; font: inherit; color: inherit; background: transparent; }
button { padding: .5rem 1rem; border: 0; border-radius: .5rem; font: inherit; color: #fff; background: var(--accent); cursor: pointer; }
a { color: var(--accent); }
ol { margin: 0; padding-left: 1.25rem; }
li + li { margin-top: .5rem; }
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    #[test]
    fn form_plus_is_a_space_and_percent_escapes_are_bytes() {
        assert_eq!(user_from_form(b"user=Ann+Lee"), Ok("Ann Lee".into()));
        assert_eq!(user_from_form(b"user=a%2Bb%26c%3Dd"), Ok("a+b&c=d".into()));
        assert_eq!(user_from_form(b"user=Z%C3%BCrich"), Ok("Zürich".into()));
    }

    #[test]
    fn form_user_is_found_among_other_fields() {
        assert_eq!(user_from_form(b"a=1&user=ann&b=2"), Ok("ann".into()));
        assert_eq!(user_from_form(b"us%65r=ann"), Ok("ann".into()));
        assert_eq!(user_from_form(b"user=ann&user=bob"), Ok("ann".into()));
        assert_eq!(user_from_form(b"username=ann"), Err(FormError::MissingUser));
        assert_eq!(user_from_form(b""), Err(FormError::MissingUser));
    }

    #[test]
    fn form_user_must_not_be_empty() {
        assert_eq!(user_from_form(b"user="), Err(FormError::EmptyUser));
        assert_eq!(user_from_form(b"user"), Err(FormError::EmptyUser));
        assert_eq!(user_from_form(b"user=+%20+"), Err(FormError::EmptyUser));
    }

    #[test]
    fn form_user_is_at_most_64_characters() {
        let longest = "ü".repeat(MAX_USER_CHARS);
        let encoded = "%C3%BC".repeat(MAX_USER_CHARS);
        assert_eq!(
            user_from_form(format!("user={encoded}").as_bytes()),
            Ok(longest)
        );
        assert_eq!(
            user_from_form(format!("user={encoded}x").as_bytes()),
            Err(FormError::UserTooLong)
        );
    }

    #[test]
    fn form_must_be_utf8() {
        assert_eq!(user_from_form(b"user=%FF"), Err(FormError::NotUtf8));
        assert_eq!(user_from_form(b"user=\xff"), Err(FormError::NotUtf8));
    }

    #[test]
    fn malformed_percent_escapes_pass_through() {
        assert_eq!(user_from_form(b"user=100%"), Ok("100%".into()));
        assert_eq!(user_from_form(b"user=%zz"), Ok("%zz".into()));
    }

    #[test]
    fn html_escaping_neutralises_markup() {
        assert_eq!(
            escape_html(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(escape_html("Zürich"), "Zürich");
        assert_eq!(escape_html("&amp;"), "&amp;amp;");
    }

    #[test]
    fn malformed_session_header_is_treated_as_empty() {
        for bad in ["%%%", "WzFd" /* [1] */, "e30"] {
            let mut headers = HeaderMap::new();
            headers.insert(SESSION, HeaderValue::from_static(bad));
            let received = Received::from_headers(&headers);
            assert_eq!(received.header, SessionHeader::Malformed, "{bad}");
            assert!(received.session.is_empty());
        }
        let mut repeated = HeaderMap::new();
        repeated.append(SESSION, HeaderValue::from_static("e30="));
        repeated.append(SESSION, HeaderValue::from_static("e30="));
        assert_eq!(
            Received::from_headers(&repeated).header,
            SessionHeader::Malformed
        );
        assert_eq!(
            Received::from_headers(&HeaderMap::new()).header,
            SessionHeader::Absent
        );
    }

    /// The demo app on a loopback port, and a client for it.
    async fn start() -> (
        String,
        Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener));
        (base, Client::builder(TokioExecutor::new()).build_http())
    }

    fn session_of(json: &str) -> HeaderValue {
        HeaderValue::try_from(STANDARD.encode(json)).unwrap()
    }

    fn decoded(response: &Response<Incoming>, name: HeaderName) -> Value {
        let value = response.headers().get(name).unwrap();
        serde_json::from_slice(&STANDARD.decode(value.as_bytes()).unwrap()).unwrap()
    }

    async fn body_of(response: Response<Incoming>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn home_counts_visits_with_a_patch_and_escapes_the_user() {
        let (base, client) = start().await;
        let request = Request::get(format!("{base}/"))
            .header(SESSION, session_of(r#"{"visits":41,"user":"<b>ann</b>"}"#))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(decoded(&response, SESSION_PATCH), json!({"visits": 42}));
        let body = body_of(response).await;
        assert!(body.contains("Signed in as <strong>&lt;b&gt;ann&lt;/b&gt;</strong>"));
        assert!(!body.contains("<b>ann"));
    }

    #[tokio::test]
    async fn home_without_the_header_says_it_is_not_behind_the_proxy() {
        let (base, client) = start().await;
        let response = client
            .get(format!("{base}/").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(decoded(&response, SESSION_PATCH), json!({"visits": 1}));
        let body = body_of(response).await;
        assert!(body.contains("did not come through session-proxy"));
        assert!(body.contains("action=\"/login\""));
    }

    #[tokio::test]
    async fn login_patches_the_user_and_rotates() {
        let (base, client) = start().await;
        let request = Request::post(format!("{base}/login"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(SESSION, session_of("{}"))
            .body(Full::new(Bytes::from_static(b"user=Ann+Lee")))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(response.headers()[LOCATION], "/");
        assert_eq!(
            decoded(&response, SESSION_PATCH),
            json!({"user": "Ann Lee"})
        );
        assert_eq!(response.headers()[SESSION_ROTATE], "1");
    }

    #[tokio::test]
    async fn login_refuses_empty_long_and_oversized_forms() {
        let (base, client) = start().await;
        let too_long = format!("user={}", "a".repeat(MAX_USER_CHARS + 1));
        let oversized = format!("user=a&pad={}", "x".repeat(MAX_FORM_BYTES));
        for (body, status) in [
            ("user=".to_owned(), StatusCode::BAD_REQUEST),
            (too_long, StatusCode::BAD_REQUEST),
            (oversized, StatusCode::PAYLOAD_TOO_LARGE),
        ] {
            let request = Request::post(format!("{base}/login"))
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), status);
            assert!(response.headers().get(SESSION_PATCH).is_none());
        }
    }

    #[tokio::test]
    async fn logout_destroys_the_session() {
        let (base, client) = start().await;
        let request = Request::post(format!("{base}/logout"))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(response.headers()[SESSION_UPDATE], "e30=");
    }

    #[tokio::test]
    async fn stylesheet_says_whether_the_request_carried_a_session() {
        let (base, client) = start().await;
        let response = client
            .get(format!("{base}/static/style.css").parse().unwrap())
            .await
            .unwrap();
        assert!(
            body_of(response)
                .await
                .contains("carried no X-Session header")
        );
    }

    #[tokio::test]
    async fn api_session_returns_the_decoded_session() {
        let (base, client) = start().await;
        let request = Request::get(format!("{base}/api/session"))
            .header(SESSION, session_of(r#"{"user":"ann"}"#))
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body: Value = serde_json::from_str(&body_of(response).await).unwrap();
        assert_eq!(body, json!({"user": "ann"}));
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_are_refused() {
        let (base, client) = start().await;
        let missing = client
            .get(format!("{base}/nope").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let wrong = client
            .get(format!("{base}/login").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(wrong.headers()[ALLOW], "POST");
    }
}
