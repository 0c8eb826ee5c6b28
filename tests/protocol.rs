//! The session protocol, the cookie and exclusions (SPEC §3–§5), black-box over loopback:
//! a real app, the real proxy, a real client. One test per rule, named after it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;

use support::{App, Browser, Client, Proxy, b64, q};

/// The store operations requests made: all but the health checks (`ping`), one of which
/// runs at start-up.
async fn session_operations(proxy: &Proxy) -> f64 {
    let text = support::get_text(&format!("http://{}/metrics", proxy.admin.unwrap())).await;
    text.lines()
        .filter(|l| l.starts_with("session_proxy_store_operations_total{"))
        .filter(|l| !l.contains("op=\"ping\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn app_gets_empty_session_header_without_a_session() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let r = Client::new().get(&proxy.url("/"), &[]).await;
    assert_eq!(r.header_seen("x-session"), vec!["e30="]);
    assert!(r.set_cookies().is_empty(), "anonymous request got a cookie");
}

#[tokio::test]
async fn update_stores_session_and_next_request_reads_it() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::new();
    let r = browser
        .get(&proxy.url(&format!("/login?update={}", q(r#"{"user":"ann","n":1}"#))))
        .await;
    assert_eq!(r.status, 200);
    let cookie = r.cookie("session").expect("session cookie set");
    assert!(cookie.contains("Max-Age=1209600"), "{cookie}");
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), serde_json::json!({"user": "ann", "n": 1}));
    assert_eq!(proxy.metric("session_proxy_active_sessions").await, 1.0);
}

/// A protocol header the application's `Connection` names is still the proxy's to read:
/// the proxy is the hop such a header is meant for. It neither reaches the client nor
/// goes unapplied.
#[tokio::test]
async fn protocol_headers_named_in_the_responses_connection_are_applied() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::new();
    let r = browser
        .get(&proxy.url(&format!(
            "/login?update={}&connection={}",
            q(r#"{"n":1}"#),
            q("x-session-update, x-session-rotate")
        )))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.cookie("session").is_some(), "{:?}", r.headers);
    assert!(!r.headers.contains_key("x-session-update"));
    let r = browser
        .get(&proxy.url(&format!(
            "/?patch={}&connection=x-session-patch",
            q(r#"{"m":2}"#)
        )))
        .await;
    assert_eq!(r.status, 200);
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), serde_json::json!({"n": 1, "m": 2}));
}

#[tokio::test]
async fn session_id_has_the_generated_shape() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let id = browser.cookie.clone().unwrap();
    assert_eq!(id.len(), 43);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{id}"
    );
}

#[tokio::test]
async fn session_id_is_stable_across_requests_and_updates() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let first = browser.cookie.clone().unwrap();
    let r = browser
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":2}"#))))
        .await;
    assert_eq!(r.session_cookie().as_deref(), Some(first.as_str()));
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), serde_json::json!({"a": 2}));
    assert_eq!(browser.cookie.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn empty_update_destroys_session_and_clears_cookie() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let id = browser.cookie.clone().unwrap();
    let r = browser.get(&proxy.url("/logout?update=%7B%7D")).await;
    assert!(r.clears_session_cookie(), "{:?}", r.set_cookies());
    assert_eq!(proxy.metric("session_proxy_active_sessions").await, 0.0);
    // The old ID no longer reads anything.
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &format!("session={id}"))])
        .await;
    assert_eq!(r.session_seen(), serde_json::json!({}));
}

#[tokio::test]
async fn destroying_twice_is_harmless() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let id = browser.cookie.clone().unwrap();
    let cookie = format!("session={id}");
    for _ in 0..2 {
        let r = Client::new()
            .get(&proxy.url("/?update=%7B%7D"), &[("cookie", &cookie)])
            .await;
        assert_eq!(r.status, 200);
        assert!(r.clears_session_cookie());
    }
    let r = Client::new().get(&proxy.url("/?update=%7B%7D"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.set_cookies().is_empty());
}

#[tokio::test]
async fn reads_do_not_write_the_store() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let replaces = "session_proxy_store_operations_total{op=\"replace\"}";
    let before = proxy.metric(replaces).await;
    for _ in 0..3 {
        let r = browser.get(&proxy.url("/")).await;
        assert!(
            r.set_cookies().is_empty(),
            "a read re-sent the cookie: {:?}",
            r.set_cookies()
        );
    }
    assert_eq!(proxy.metric(replaces).await, before);
    assert_eq!(
        proxy
            .metric("session_proxy_store_operations_total{op=\"create\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn anonymous_traffic_never_writes_the_store() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    for _ in 0..5 {
        let r = Client::new().get(&proxy.url("/"), &[]).await;
        assert!(r.set_cookies().is_empty());
    }
    assert_eq!(session_operations(&proxy).await, 0.0);
}

async fn assert_violation(update_query: &str) {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.max_bytes = 64).await;
    let mut browser = Browser::with_session(&proxy, r#"{"keep":true}"#).await;
    let r = browser.get(&proxy.url(&format!("/?{update_query}"))).await;
    assert_eq!(r.status, 502, "{update_query}");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.json()["status"], 502);
    assert!(
        r.set_cookies().is_empty(),
        "{update_query}: {:?}",
        r.set_cookies()
    );
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(
        r.session_seen(),
        serde_json::json!({"keep": true}),
        "{update_query}"
    );
    assert!(
        proxy
            .metric("session_proxy_protocol_violations_total")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn update_that_is_not_base64_is_a_502_and_the_session_stays() {
    assert_violation(&format!("raw={}", q("not base64!"))).await;
}

#[tokio::test]
async fn update_that_is_not_json_is_a_502_and_the_session_stays() {
    assert_violation(&format!("raw={}", q(&b64("{nope")))).await;
}

#[tokio::test]
async fn update_that_is_not_an_object_is_a_502_and_the_session_stays() {
    assert_violation(&format!("raw={}", q(&b64("[1,2]")))).await;
    assert_violation(&format!("raw={}", q(&b64("\"text\"")))).await;
}

#[tokio::test]
async fn update_larger_than_max_bytes_is_a_502_and_the_session_stays() {
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(100));
    assert_violation(&format!("update={}", q(&big))).await;
}

/// `session.max_bytes` goes up to 1 MiB: an update that large (a third longer in
/// base64) is taken, over the proxy's own HTTP/1.1 and over hyper's (a request with a
/// body), though it makes the application's response head longer than usual.
#[tokio::test]
async fn an_update_as_large_as_max_bytes_allows_is_taken() {
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(600_000));
    let update = b64(&big);
    let app = App::start(std::sync::Arc::new(move |_req| {
        let update = update.clone();
        Box::pin(async move {
            let mut response = http::Response::new(support::full("ok"));
            let value = http::HeaderValue::try_from(update).unwrap();
            response.headers_mut().insert("x-session-update", value);
            response
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |c| c.session.max_bytes = 1 << 20).await;
    let client = Client::new();
    for (method, body) in [("GET", ""), ("POST", "a body")] {
        let r = client
            .request(method, &proxy.url("/"), &[], Bytes::from(body))
            .await;
        assert_eq!(
            r.status,
            200,
            "{method}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.session_cookie().is_some(),
            "{method}: no session was created"
        );
    }
}

#[tokio::test]
async fn repeated_update_header_is_a_502_and_the_session_stays() {
    let one = q(&b64(r#"{"a":1}"#));
    assert_violation(&format!("raw={one}&update={}", q(r#"{"b":2}"#))).await;
}

#[tokio::test]
async fn update_and_patch_together_are_a_502_and_the_session_stays() {
    assert_violation(&format!(
        "update={}&patch={}",
        q(r#"{"a":1}"#),
        q(r#"{"b":2}"#)
    ))
    .await;
}

#[tokio::test]
async fn client_cannot_inject_protocol_headers_on_any_route() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    let injected = [
        ("x-session", b64(r#"{"admin":true}"#)),
        ("x-session-update", b64(r#"{"admin":true}"#)),
        ("x-session-patch", b64(r#"{"admin":true}"#)),
        ("x-session-rotate", "1".to_string()),
        ("x-session-handle", "forged".to_string()),
    ];
    let headers: Vec<(&str, &str)> = injected.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for path in ["/account", "/static/app.js"] {
        let r = Client::new().get(&proxy.url(path), &headers).await;
        for (name, _) in &injected {
            let seen = r.header_seen(name);
            if *name == "x-session" && path == "/account" {
                assert_eq!(seen, vec!["e30="], "{path}");
            } else {
                assert!(seen.is_empty(), "{path}: {name} reached the app: {seen:?}");
            }
        }
        assert!(r.set_cookies().is_empty(), "{path}");
    }
    assert_eq!(session_operations(&proxy).await, 0.0);
}

/// Servers that read header names the CGI way (WSGI, PHP) take `X_Session` or `X.Session`
/// for `X-Session`: such look-alikes of the protocol headers, and of the `X-Forwarded-*`
/// the proxy sets, never reach the application; other names with `_` pass.
#[tokio::test]
async fn look_alikes_of_the_proxys_headers_are_stripped_too() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    let forged = b64(r#"{"admin":true}"#);
    let injected = [
        "X_Session",
        "x.session",
        "X_Session_Update",
        "x_session.patch",
        "X_SESSION_ROTATE",
        "X_Session_Handle",
        "X_Forwarded_Host",
        "X.Forwarded.Proto",
        "X_Forwarded_For",
        // Some servers (lighttpd's CGI and FastCGI) read any punctuation as `_`.
        "X~Session",
        "x+session'update",
        "X*Session*Handle",
        "X|Forwarded|Host",
    ];
    let mut headers: Vec<(&str, &str)> = injected.iter().map(|n| (*n, forged.as_str())).collect();
    headers.push(("X_Custom_Thing", "kept"));
    headers.push(("X-Forwarded-For", "192.0.2.7"));
    for path in ["/account", "/static/app.js"] {
        // Without a body (the proxy's own HTTP/1.1) and with one (hyper's).
        for (method, body) in [("GET", ""), ("POST", "a body")] {
            let r = Client::new()
                .request(method, &proxy.url(path), &headers, Bytes::from(body))
                .await;
            for name in injected {
                let seen = r.header_seen(&name.to_ascii_lowercase());
                assert!(seen.is_empty(), "{method} {path}: {name} reached the app");
            }
            assert_eq!(r.header_seen("x_custom_thing"), vec!["kept"]);
            // The real `X-Forwarded-For` is still appended to.
            assert_eq!(
                r.header_seen("x-forwarded-for"),
                vec!["192.0.2.7, 127.0.0.1"]
            );
            if path == "/account" {
                assert_eq!(r.header_seen("x-session"), vec!["e30="]);
            }
        }
    }
}

/// A configured name with punctuation (`X_Session`) has look-alikes too, `X-Session`
/// among them: a server that reads `_` as `-` takes either for the other.
#[tokio::test]
async fn a_configured_name_with_punctuation_is_guarded_against_its_look_alikes() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.request_header = "X_Session".into()).await;
    let forged = b64(r#"{"admin":true}"#);
    let headers = [
        ("X-Session", forged.as_str()),
        ("x.session", forged.as_str()),
    ];
    let r = Client::new().get(&proxy.url("/"), &headers).await;
    assert!(r.header_seen("x-session").is_empty());
    assert!(r.header_seen("x.session").is_empty());
    assert_eq!(r.header_seen("x_session"), vec!["e30="]);
}

#[tokio::test]
async fn protocol_headers_never_reach_the_client() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.exclude = vec!["/static/**".into()]).await;
    for path in ["/a", "/static/a"] {
        let url = proxy.url(&format!("{path}?update={}&rotate=1", q(r#"{"a":1}"#)));
        let r = Client::new().get(&url, &[]).await;
        for name in [
            "x-session",
            "x-session-update",
            "x-session-patch",
            "x-session-rotate",
            "x-session-handle",
        ] {
            assert!(
                !r.headers.contains_key(name),
                "{path}: {name} reached the client"
            );
        }
    }
}

#[tokio::test]
async fn session_cookie_is_hidden_from_the_app_other_cookies_pass() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let id = browser.cookie.clone().unwrap();
    let cookie = format!("theme=dark; session={id}; lang=\"en gb\"");
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &cookie)])
        .await;
    assert_eq!(r.header_seen("cookie"), vec!["theme=dark; lang=\"en gb\""]);
    assert_eq!(r.session_seen(), serde_json::json!({"a": 1}));
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &format!("session={id}"))])
        .await;
    assert!(r.header_seen("cookie").is_empty());
}

#[tokio::test]
async fn unknown_id_is_never_adopted() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let planted = "A".repeat(42) + "A";
    let url = proxy.url(&format!("/login?update={}", q(r#"{"user":"ann"}"#)));
    let r = Client::new()
        .get(&url, &[("cookie", &format!("session={planted}"))])
        .await;
    let issued = r.session_cookie().expect("a new session cookie");
    assert_ne!(issued, planted);
    let r = Client::new()
        .get(
            &proxy.url("/"),
            &[("cookie", &format!("session={planted}"))],
        )
        .await;
    assert_eq!(r.session_seen(), serde_json::json!({}));
}

#[tokio::test]
async fn malformed_cookie_is_no_cookie_and_costs_no_store_access() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    for value in [
        "short",
        "\"quoted\"",
        &"A".repeat(44),
        &("A".repeat(42) + "+"),
        &("A".repeat(42) + "B"),
    ] {
        let r = Client::new()
            .get(&proxy.url("/"), &[("cookie", &format!("session={value}"))])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header_seen("x-session"), vec!["e30="]);
        assert!(r.set_cookies().is_empty(), "{value}: {:?}", r.set_cookies());
    }
    assert_eq!(session_operations(&proxy).await, 0.0);
}

#[tokio::test]
async fn first_well_formed_session_cookie_is_used() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let id = browser.cookie.clone().unwrap();
    let cookie = format!("session=junk; session={id}; session={}", "B".repeat(43));
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &cookie)])
        .await;
    assert_eq!(r.session_seen(), serde_json::json!({"a": 1}));
}

#[tokio::test]
async fn stale_cookie_is_cleared() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let stale = "C".repeat(42) + "A";
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &format!("session={stale}"))])
        .await;
    assert_eq!(r.header_seen("x-session"), vec!["e30="]);
    assert!(r.clears_session_cookie(), "{:?}", r.set_cookies());
    assert!(
        r.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("private")
    );
}

#[tokio::test]
async fn stale_cookie_is_replaced_when_the_app_creates_a_session() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let stale = "C".repeat(42) + "A";
    let url = proxy.url(&format!("/?update={}", q(r#"{"a":1}"#)));
    let r = Client::new()
        .get(&url, &[("cookie", &format!("session={stale}"))])
        .await;
    assert!(!r.clears_session_cookie());
    let fresh = r.session_cookie().expect("new session cookie");
    assert_ne!(fresh, stale);
    assert_eq!(r.set_cookies().len(), 1);
}

#[tokio::test]
async fn session_expires_after_max_age() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| c.session.max_age = 1).await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    assert_eq!(
        browser.get(&proxy.url("/")).await.session_seen(),
        serde_json::json!({"a": 1})
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), serde_json::json!({}));
    assert!(r.clears_session_cookie());
}

#[tokio::test]
async fn renew_on_access_keeps_a_session_alive_and_resends_the_cookie() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.max_age = 2;
        c.session.renew_on_access = true;
    })
    .await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let r = browser.get(&proxy.url("/")).await;
        assert_eq!(r.session_seen(), serde_json::json!({"a": 1}));
        assert!(r.cookie("session").unwrap().contains("Max-Age=2"));
    }
    // Renewal did not rewrite the data.
    assert_eq!(
        proxy
            .metric("session_proxy_store_operations_total{op=\"replace\"}")
            .await,
        0.0
    );
    assert_eq!(
        proxy
            .metric("session_proxy_store_operations_total{op=\"load_renew\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn apps_own_cookies_pass_untouched() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let url = proxy.url(&format!(
        "/?update={}&cookie={}",
        q(r#"{"a":1}"#),
        q("theme=dark; Path=/prefs; Max-Age=5")
    ));
    let r = Client::new().get(&url, &[]).await;
    let cookies = r.set_cookies();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies.contains(&"theme=dark; Path=/prefs; Max-Age=5".to_string()));
    assert!(r.session_cookie().is_some());
}

#[tokio::test]
async fn cookie_attributes_are_exactly_as_configured() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.cookie_name = "sid".into();
        c.session.max_age = 3600;
        c.session.path = "/app".into();
        c.session.domain = Some("example.test".into());
        c.session.secure = true;
        c.session.http_only = false;
        c.session.same_site = session_proxy::config::SameSite::Strict;
    })
    .await;
    let r = Client::new()
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))), &[])
        .await;
    let cookie = r.cookie("sid").expect("sid cookie");
    let (value, attrs) = cookie.split_once(';').unwrap();
    assert_eq!(value.len(), "sid=".len() + 43);
    assert_eq!(
        attrs,
        " Max-Age=3600; Path=/app; Domain=example.test; Secure; SameSite=Strict"
    );
    let id = &value["sid=".len()..];
    let r = Client::new()
        .get(
            &proxy.url("/?update=%7B%7D"),
            &[("cookie", &format!("sid={id}"))],
        )
        .await;
    assert_eq!(
        r.cookie("sid").unwrap(),
        "sid=; Max-Age=0; Path=/app; Domain=example.test; Secure; SameSite=Strict"
    );
}

#[tokio::test]
async fn same_site_none_forces_secure() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.same_site = session_proxy::config::SameSite::None
    })
    .await;
    let r = Client::new()
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))), &[])
        .await;
    let cookie = r.cookie("session").unwrap();
    assert!(
        cookie.ends_with("; Secure; HttpOnly; SameSite=None"),
        "{cookie}"
    );
}

#[tokio::test]
async fn cookie_responses_are_kept_out_of_shared_caches() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let url = proxy.url(&format!(
        "/?update={}&cache={}",
        q(r#"{"a":1}"#),
        q("public, max-age=600, s-maxage=600")
    ));
    let r = Client::new().get(&url, &[]).await;
    let cc = r.headers["cache-control"].to_str().unwrap();
    assert!(
        cc.contains("private") && !cc.contains("public") && !cc.contains("s-maxage"),
        "{cc}"
    );
    assert!(cc.contains("max-age=600"), "{cc}");
    // Without a cookie change the application's Cache-Control passes unchanged.
    let r = Client::new()
        .get(
            &proxy.url(&format!("/?cache={}", q("public, max-age=600"))),
            &[],
        )
        .await;
    assert_eq!(r.headers["cache-control"], "public, max-age=600");
}

/// The fields CDNs obey in place of `Cache-Control` (RFC 9213's targeted fields and
/// `Surrogate-Control`) would let them keep an answer that sets or clears the cookie.
#[tokio::test]
async fn cookie_responses_lose_the_cache_fields_cdns_obey() {
    const CDN_FIELDS: [&str; 4] = [
        "cdn-cache-control",
        "cloudflare-cdn-cache-control",
        "fastly-cache-control",
        "surrogate-control",
    ];
    let app = App::start(Arc::new(|req| {
        Box::pin(async move {
            let mut r = support::scripted(req).await;
            for name in CDN_FIELDS {
                r.headers_mut()
                    .insert(name, HeaderValue::from_static("max-age=600"));
            }
            r
        })
    }))
    .await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::new();
    let set = browser
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))))
        .await;
    assert!(set.session_cookie().is_some());
    let cleared = browser.get(&proxy.url("/?update=%7B%7D")).await;
    assert!(cleared.clears_session_cookie());
    for r in [&set, &cleared] {
        assert_eq!(r.headers["cache-control"], "private");
        for name in CDN_FIELDS {
            assert!(r.headers.get(name).is_none(), "{name}: {:?}", r.headers);
        }
    }
    // Without a cookie change they pass.
    let r = Client::new().get(&proxy.url("/"), &[]).await;
    for name in CDN_FIELDS {
        assert_eq!(r.headers[name], "max-age=600");
    }
}

#[tokio::test]
async fn excluded_path_gets_no_session_header_cookie_or_store_access() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.exclude = vec!["/static/**".into(), "/health".into()]
    })
    .await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let ops = session_operations(&proxy).await;
    let id = browser.cookie.clone().unwrap();
    let cookie = format!("session={id}");
    for path in ["/static/a/b.css", "/health"] {
        let url = proxy.url(&format!("{path}?update={}", q(r#"{"b":2}"#)));
        let r = Client::new().get(&url, &[("cookie", &cookie)]).await;
        assert!(r.header_seen("x-session").is_empty(), "{path}");
        assert!(r.set_cookies().is_empty(), "{path}");
        // Even here the application never sees the session ID.
        assert!(
            r.header_seen("cookie").is_empty(),
            "{path}: {:?}",
            r.header_seen("cookie")
        );
    }
    assert_eq!(session_operations(&proxy).await, ops);
    assert_eq!(
        proxy
            .metric("session_proxy_requests_total{status=\"2xx\",session=\"excluded\"}")
            .await,
        2.0
    );
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), serde_json::json!({"a": 1}));
}

#[tokio::test]
async fn exclusions_match_the_normalised_path() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |c| {
        c.session.exclude = vec!["/static/**".into(), "/img/*.png".into()]
    })
    .await;
    let client = Client::new();
    let excluded = |r: &support::Reply| r.header_seen("x-session").is_empty();
    assert!(!excluded(
        &client.get(&proxy.url("/static/../account"), &[]).await
    ));
    assert!(!excluded(
        &client.get(&proxy.url("/static/%2e%2e/account"), &[]).await
    ));
    assert!(excluded(
        &client.get(&proxy.url("/%73tatic/app.js"), &[]).await
    ));
    assert!(excluded(&client.get(&proxy.url("/img/a.png"), &[]).await));
    assert!(!excluded(
        &client.get(&proxy.url("/img/deep/a.png"), &[]).await
    ));
}

#[tokio::test]
async fn patch_merges_into_the_stored_session() {
    let app = App::scripted().await;
    let proxy = Proxy::with(&app, |_| {}).await;
    let mut browser = Browser::new();
    browser
        .get(&proxy.url(&format!("/?patch={}", q(r#"{"a":1,"b":{"c":2}}"#))))
        .await;
    browser
        .get(&proxy.url(&format!(
            "/?patch={}",
            q(r#"{"b":{"c":null,"d":3},"e":[]}"#)
        )))
        .await;
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(
        r.session_seen(),
        serde_json::json!({"a": 1, "b": {"d": 3}, "e": []})
    );
    let r = browser
        .get(&proxy.url(&format!("/?patch={}", q(r#"{"a":null,"b":null,"e":null}"#))))
        .await;
    assert!(r.clears_session_cookie());
}
