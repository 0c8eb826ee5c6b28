//! Session control beyond replacement (SPEC §8): atomic patches, rotation, absolute
//! timeout, signed cookies, the per-user index and revocation — each rule run against
//! the memory store and against a real redis-server.

mod support;

#[path = "support/redis.rs"]
#[allow(dead_code)]
mod redis_harness;

use std::time::Duration;

use serde_json::json;
use session_proxy::config::{Config, StoreType};
use support::{App, Browser, Client, Proxy, q};

/// Where the proxy under test keeps its sessions.
enum Backend {
    Memory,
    Redis(redis_harness::RedisServer),
}

impl Backend {
    fn memory() -> Backend {
        Backend::Memory
    }

    fn redis() -> Backend {
        Backend::Redis(redis_harness::RedisServer::start())
    }

    fn apply(&self, c: &mut Config) {
        if let Backend::Redis(server) = self {
            c.store.kind = StoreType::Redis;
            c.store.url = Some(server.url());
        }
    }

    async fn proxy(&self, app: &App, tweak: impl FnOnce(&mut Config)) -> Proxy {
        Proxy::with(app, |c| {
            self.apply(c);
            tweak(c);
        })
        .await
    }
}

/// Runs each listed test body against both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::memory()).await } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::redis()).await } )*
        }
    };
}

on_both_stores!(
    concurrent_patches_of_different_keys_all_land,
    concurrent_full_updates_are_last_write_wins,
    patch_without_a_session_creates_one_and_empty_result_destroys,
    rotation_moves_the_session_and_keeps_the_old_id_for_the_grace_period,
    requests_in_flight_during_a_rotation_never_hand_back_the_old_cookie,
    a_rotation_whose_patch_is_refused_leaves_the_session_as_it_was,
    a_patch_refused_after_its_rotation_still_moves_the_cookie,
    two_logins_at_once_leave_the_browser_a_session_that_lasts,
    a_logout_through_the_old_id_leaves_the_new_session_alone,
    writes_through_the_old_id_that_outlive_its_grace_period_leave_the_cookie_alone,
    rotation_on_its_own_moves_the_session,
    destroying_while_rotating_ends_the_session_under_both_ids,
    ending_a_session_ends_the_ids_its_rotations_left_behind,
    a_rotation_that_logs_the_user_out_leaves_the_old_id_logged_out,
    a_change_the_application_answered_holds_when_the_client_left_first,
    requests_left_by_their_clients_are_capped,
    a_shutdown_waits_for_requests_left_by_their_clients,
    absolute_timeout_ends_a_session_whatever_its_activity,
    forged_or_truncated_signed_cookies_cost_no_store_access,
    fallback_signed_cookies_are_accepted_and_resigned,
    revoke_all_ends_every_session_of_the_user_and_no_other,
    a_write_in_flight_does_not_bring_back_a_revoked_session,
    revoke_by_handle_ends_one_session,
    a_session_that_left_the_index_is_not_revoked_by_its_handle,
    admin_token_guards_sessions_but_not_probes,
);

/// A login through `browser`: patches in `{"user":"ann"}` and rotates the session.
/// Returns the new session cookie, which the answer must carry.
async fn log_in(proxy: &Proxy, browser: &mut Browser) -> String {
    let login = format!("/login?rotate=1&patch={}", q(r#"{"user":"ann"}"#));
    let r = browser.get(&proxy.url(&login)).await;
    r.session_cookie().expect("the login sends the new cookie")
}

/// Sends a GET for `path` with `cookie` on a connection of its own, without waiting for
/// the answer.
fn send(proxy: &Proxy, path: &str, cookie: &str) -> tokio::task::JoinHandle<support::Reply> {
    let (url, cookie) = (proxy.url(path), cookie.to_string());
    tokio::spawn(async move { Client::new().get(&url, &[("cookie", &cookie)]).await })
}

/// 50 concurrent requests on one session, each answering with `header` (`patch` or
/// `update`) setting its own key; returns the session afterwards.
async fn fifty_concurrent_writes(backend: Backend, header: &str) -> serde_json::Value {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"start":true}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let client = Client::new();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (client, cookie) = (client.clone(), cookie.clone());
            let url = proxy.url(&format!(
                "/?delay_ms=20&{header}={}",
                q(&format!(r#"{{"k{i}":{i}}}"#))
            ));
            tokio::spawn(async move { client.get(&url, &[("cookie", &cookie)]).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    browser.get(&proxy.url("/")).await.session_seen()
}

async fn concurrent_patches_of_different_keys_all_land(backend: Backend) {
    let session = fifty_concurrent_writes(backend, "patch").await;
    assert_eq!(session.as_object().unwrap().len(), 51, "{session}");
    for i in 0..50 {
        assert_eq!(session[format!("k{i}")], i, "k{i} lost: {session}");
    }
}

async fn concurrent_full_updates_are_last_write_wins(backend: Backend) {
    // Documents why Patch exists: full replacements from concurrent requests overwrite
    // each other, so only one writer's key survives.
    let session = fifty_concurrent_writes(backend, "update").await;
    assert_eq!(session.as_object().unwrap().len(), 1, "{session}");
}

async fn patch_without_a_session_creates_one_and_empty_result_destroys(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |_| {}).await;
    let r = Client::new()
        .get(
            &proxy.url(&format!("/?patch={}", q(r#"{"gone":null}"#))),
            &[],
        )
        .await;
    assert!(
        r.set_cookies().is_empty(),
        "an empty result creates nothing"
    );
    let mut browser = Browser::new();
    let r = browser
        .get(&proxy.url(&format!(
            "/?patch={}",
            q(r#"{"cart":[1,2],"n":12345678901234567890}"#)
        )))
        .await;
    assert!(r.session_cookie().is_some());
    let r = browser.get(&proxy.url("/")).await;
    assert!(String::from_utf8_lossy(&r.body).contains("12345678901234567890"));
    assert_eq!(r.session_seen()["cart"], json!([1, 2]));
    let r = browser
        .get(&proxy.url(&format!("/?patch={}", q(r#"{"cart":null,"n":null}"#))))
        .await;
    assert!(r.clears_session_cookie());
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({}));
}

async fn rotation_moves_the_session_and_keeps_the_old_id_for_the_grace_period(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.session.rotate_grace = 1).await;
    let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let old = browser.cookie.clone().unwrap();
    let old_cookie = format!("session={old}");
    // A slow request on the old ID is in flight while the login rotates the session.
    let slow_url = proxy.url("/slow?delay_ms=500");
    let slow = {
        let cookie = old_cookie.clone();
        tokio::spawn(async move { Client::new().get(&slow_url, &[("cookie", &cookie)]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new = log_in(&proxy, &mut browser).await;
    assert_ne!(new, old);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(slow.session_seen(), json!({"cart": 1}));
    assert!(
        slow.set_cookies().is_empty(),
        "the old ID's request must not clear or move the cookie"
    );
    // Within the grace period the old ID still reads the session as it was before the
    // login; only the new ID has the login.
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &old_cookie)])
        .await;
    assert_eq!(r.session_seen(), json!({"cart": 1}));
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({"cart": 1, "user": "ann"}));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &old_cookie)])
        .await;
    assert_eq!(
        r.session_seen(),
        json!({}),
        "old ID gone after the grace period"
    );
    assert!(r.clears_session_cookie());
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen()["user"], "ann");
}

/// With renew_on_access, every answer on a session sets its cookie again. Requests that
/// started on the old ID before a login rotated it must not: the browser would take the
/// old cookie back in place of the new one, and lose the session with the grace period.
async fn requests_in_flight_during_a_rotation_never_hand_back_the_old_cookie(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| {
            c.session.renew_on_access = true;
            c.session.rotate_grace = 5;
        })
        .await;
    let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let old_cookie = format!("session={}", browser.cookie.clone().unwrap());
    let in_flight = [
        "/slow?delay_ms=500".to_string(),
        format!("/slow?delay_ms=500&patch={}", q(r#"{"seen":1}"#)),
        format!("/slow?delay_ms=500&update={}", q(r#"{"cart":2}"#)),
    ];
    let slow: Vec<_> = in_flight
        .iter()
        .map(|path| send(&proxy, path, &old_cookie))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    log_in(&proxy, &mut browser).await;
    for (path, task) in in_flight.iter().zip(slow) {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.set_cookies().is_empty(),
            "{path}: answered after the rotation, it set {:?}",
            r.set_cookies()
        );
    }
    // A request on the old ID after the rotation, within the grace period: read, but its
    // cookie is not renewed either.
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &old_cookie)])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());
    // The browser keeps the new session, which renews as usual.
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({"cart": 1, "user": "ann"}));
    assert!(
        r.session_cookie().is_some(),
        "renewal re-sends the new cookie"
    );
}

/// A patch whose result would be too large is refused before the rotation it came with:
/// the session stays under its ID, as it was, and no second session is left behind.
async fn a_rotation_whose_patch_is_refused_leaves_the_session_as_it_was(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| {
            c.session.max_bytes = 100;
            c.session.rotate_grace = 1;
            c.session.user_key = Some("user".into());
        })
        .await;
    let session = json!({"user": "ann", "pad": "x".repeat(60)});
    let mut browser = Browser::with_session(&proxy, &session.to_string()).await;
    // Small on its own, too large merged into the session.
    let more = json!({"more": "y".repeat(30)}).to_string();
    let r = browser
        .get(&proxy.url(&format!("/login?rotate=1&patch={}", q(&more))))
        .await;
    assert_eq!(r.status, 502);
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), session);
    let listed = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(listed.json()["sessions"].as_array().unwrap().len(), 1);
}

/// When the patch that came with a rotation turns out too large only once merged into
/// what is stored by then (another request grew the session meanwhile), the session has
/// already moved: the 502 sets the new ID's cookie, where the session is, unpatched.
async fn a_patch_refused_after_its_rotation_still_moves_the_cookie(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.session.max_bytes = 100).await;
    let browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let more = json!({"login": "y".repeat(50)}).to_string();
    let login = send(
        &proxy,
        &format!("/login?delay_ms=400&rotate=1&patch={}", q(&more)),
        &cookie,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grow = json!({"cart": "z".repeat(50)}).to_string();
    let r = Client::new()
        .get(
            &proxy.url(&format!("/cart?patch={}", q(&grow))),
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = login.await.unwrap();
    assert_eq!(r.status, 502);
    let moved = r
        .session_cookie()
        .expect("the 502 follows the session to its new ID");
    assert_ne!(format!("session={moved}"), cookie);
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &format!("session={moved}"))])
        .await;
    assert_eq!(r.session_seen(), json!({"a": 1, "cart": "z".repeat(50)}));
}

/// Two logins on one session at once (a double click): the first to answer moves the
/// session; the second finds it moved and leaves the browser with the first one's ID,
/// which outlives the grace period (a second copy would inherit the old ID's shortened
/// end, and its cookie, arriving last, would log the user out).
async fn two_logins_at_once_leave_the_browser_a_session_that_lasts(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.session.rotate_grace = 1).await;
    let browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let login = |delay_ms: u64| {
        let path = format!(
            "/login?delay_ms={delay_ms}&rotate=1&patch={}",
            q(r#"{"user":"ann"}"#)
        );
        send(&proxy, &path, &cookie)
    };
    let slow = login(400);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fast = login(0).await.unwrap();
    let slow = slow.await.unwrap();
    assert_eq!(fast.status, 200);
    assert_eq!(slow.status, 200);
    // What the browser keeps: the last cookie it was sent.
    let kept = slow
        .session_cookie()
        .or(fast.session_cookie())
        .expect("a login cookie");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &format!("session={kept}"))])
        .await;
    assert_eq!(r.session_seen(), json!({"cart": 1, "user": "ann"}));
}

/// A logout whose request started before a login rotated the session ends only the copy
/// the old ID keeps: the old ID has no say over the session under the new one (which a
/// planted ID must not be able to end either), and its answer leaves the browser's new
/// cookie alone.
async fn a_logout_through_the_old_id_leaves_the_new_session_alone(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.session.rotate_grace = 5).await;
    let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let old_cookie = format!("session={}", browser.cookie.clone().unwrap());
    let logout = send(
        &proxy,
        &format!("/logout?delay_ms=400&update={}", q("{}")),
        &old_cookie,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    log_in(&proxy, &mut browser).await;
    let out = logout.await.unwrap();
    assert_eq!(out.status, 200);
    assert!(out.set_cookies().is_empty(), "{:?}", out.set_cookies());
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({"cart": 1, "user": "ann"}));
    let r = Client::new()
        .get(&proxy.url("/"), &[("cookie", &old_cookie)])
        .await;
    assert_eq!(r.session_seen(), json!({}), "the old copy is gone");
}

/// Requests that loaded the session before a login rotated it, and answer with a write
/// after the old ID's grace period ran out: the old copy is gone, but the session lives
/// on under the new ID, so they change nothing and set no cookie (no fresh session in
/// the browser's place, no cleared cookie).
async fn writes_through_the_old_id_that_outlive_its_grace_period_leave_the_cookie_alone(
    backend: Backend,
) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.session.rotate_grace = 1).await;
    let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let old_cookie = format!("session={}", browser.cookie.clone().unwrap());
    let writes = [
        format!("update={}", q(r#"{"cart":2}"#)),
        format!("patch={}", q(r#"{"seen":1}"#)),
        format!("patch={}", q(r#"{"cart":null}"#)),
        format!("update={}", q("{}")),
        "rotate=1".to_string(),
        format!("rotate=1&update={}", q(r#"{"cart":3}"#)),
    ];
    let slow: Vec<_> = writes
        .iter()
        .map(|write| send(&proxy, &format!("/slow?delay_ms=2500&{write}"), &old_cookie))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    log_in(&proxy, &mut browser).await;
    for (write, task) in writes.iter().zip(slow) {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200, "{write}");
        assert!(
            r.set_cookies().is_empty(),
            "{write}: set {:?}",
            r.set_cookies()
        );
    }
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({"cart": 1, "user": "ann"}));
}

async fn rotation_on_its_own_moves_the_session(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let old = browser.cookie.clone().unwrap();
    let r = browser.get(&proxy.url("/privilege?rotate=1")).await;
    let new = r.session_cookie().expect("new cookie");
    assert_ne!(new, old);
    assert_eq!(
        browser.get(&proxy.url("/")).await.session_seen(),
        json!({"a": 1})
    );
}

/// A logout that also asks for rotation (`{}` by update, or a patch that leaves `{}`)
/// ends the session at once: the old ID gets no grace period.
async fn destroying_while_rotating_ends_the_session_under_both_ids(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.user_key = Some("user_id".into()))
        .await;
    let empty_patch = q(r#"{"user_id":null,"role":null}"#);
    let logouts = [
        format!("/logout?rotate=1&update={}", q("{}")),
        format!("/logout?rotate=1&patch={empty_patch}"),
    ];
    for logout in logouts {
        let mut browser =
            Browser::with_session(&proxy, r#"{"user_id":"ann","role":"admin"}"#).await;
        let old_cookie = format!("session={}", browser.cookie.clone().unwrap());
        let r = browser.get(&proxy.url(&logout)).await;
        assert!(r.clears_session_cookie(), "{logout}");
        assert!(r.session_cookie().is_none(), "{logout}: no new cookie");
        let r = Client::new()
            .get(&proxy.url("/"), &[("cookie", &old_cookie)])
            .await;
        assert_eq!(
            r.session_seen(),
            json!({}),
            "{logout}: the old ID still reads"
        );
        assert!(r.clears_session_cookie(), "{logout}");
        let listed = proxy.admin_request("GET", "/sessions?user=ann", None).await;
        assert_eq!(listed.json()["sessions"], json!([]), "{logout}");
    }
}

/// What the application sees of the session under `cookie`, sent by a client other than
/// the browser (an old ID: planted, logged, sniffed).
async fn seen_under(proxy: &Proxy, cookie: &str) -> serde_json::Value {
    let cookie = format!("session={cookie}");
    Client::new()
        .get(&proxy.url("/"), &[("cookie", &cookie)])
        .await
        .session_seen()
}

/// A proxy whose old IDs outlast the test (a minute's grace), indexing `user`.
async fn with_long_grace(backend: &Backend, app: &App) -> Proxy {
    backend
        .proxy(app, |c| {
            c.session.rotate_grace = 60;
            c.session.user_key = Some("user".into());
        })
        .await
}

/// The IDs rotations left readable for their grace period end with the session they moved
/// to: a logout (`{}`), or a revocation by handle, on the session under its latest ID
/// leaves nothing readable under the earlier ones.
async fn ending_a_session_ends_the_ids_its_rotations_left_behind(backend: Backend) {
    let app = App::scripted().await;
    let proxy = with_long_grace(&backend, &app).await;
    for ending in ["logout", "revocation"] {
        let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
        let first = browser.cookie.clone().unwrap();
        let second = log_in(&proxy, &mut browser).await;
        let r = browser.get(&proxy.url("/privilege?rotate=1")).await;
        let third = r.session_cookie().expect("new cookie");
        // Each earlier ID reads the session as it was when it was rotated away.
        assert_eq!(seen_under(&proxy, &first).await, json!({"cart": 1}));
        assert_eq!(
            seen_under(&proxy, &second).await,
            json!({"cart": 1, "user": "ann"})
        );
        match ending {
            "logout" => {
                let r = browser
                    .get(&proxy.url(&format!("/logout?update={}", q("{}"))))
                    .await;
                assert!(r.clears_session_cookie());
            }
            _ => {
                let handle = handle_of(&proxy, &mut browser, "/").await;
                assert_eq!(revoke_handle(&proxy, &handle).await.status, 200);
            }
        }
        for (name, id) in [("first", &first), ("second", &second), ("third", &third)] {
            assert_eq!(
                seen_under(&proxy, id).await,
                json!({}),
                "after the {ending}, the {name} ID still reads"
            );
        }
    }
}

/// A logout that keeps the rest of the session (a patch that removes the user, with a
/// rotation) leaves the old ID the session without its user, not the logged-in one.
async fn a_rotation_that_logs_the_user_out_leaves_the_old_id_logged_out(backend: Backend) {
    let app = App::scripted().await;
    let proxy = with_long_grace(&backend, &app).await;
    let mut browser = Browser::with_session(&proxy, r#"{"cart":1}"#).await;
    let anonymous = browser.cookie.clone().unwrap();
    let logged_in = log_in(&proxy, &mut browser).await;
    let logout = format!(
        "/logout?rotate=1&patch={}",
        q(r#"{"user":null,"role":null}"#)
    );
    let r = browser.get(&proxy.url(&logout)).await;
    let after = r.session_cookie().expect("the logout moves the session");
    assert_ne!(after, logged_in);
    assert_eq!(
        seen_under(&proxy, &logged_in).await,
        json!({"cart": 1}),
        "the logged-in ID still reads the user"
    );
    assert_eq!(
        browser.get(&proxy.url("/")).await.session_seen(),
        json!({"cart": 1})
    );
    // The login's old ID kept the session as it was before the login: no user either.
    assert_eq!(seen_under(&proxy, &anonymous).await, json!({"cart": 1}));
    // A login as another user over a logged-in session (one planted by its owner, say)
    // leaves the old ID as it was: never the new user's session.
    let mut planted = Browser::with_session(&proxy, r#"{"user":"mallory"}"#).await;
    let mallorys = planted.cookie.clone().unwrap();
    let login = format!(
        "/login?rotate=1&update={}",
        q(r#"{"user":"bob","secret":"bob's"}"#)
    );
    let r = planted.get(&proxy.url(&login)).await;
    assert!(r.session_cookie().is_some());
    assert_eq!(
        seen_under(&proxy, &mallorys).await,
        json!({"user": "mallory"}),
        "the old ID reads the new user's session"
    );
    // A privilege change that keeps the user keeps the usual grace copy.
    let login_again = log_in(&proxy, &mut browser).await;
    let r = browser
        .get(&proxy.url(&format!("/mfa?rotate=1&patch={}", q(r#"{"mfa":true}"#))))
        .await;
    assert!(r.session_cookie().is_some());
    assert_eq!(
        seen_under(&proxy, &login_again).await,
        json!({"cart": 1, "user": "ann"})
    );
}

/// Sends a logout for session `id` that the application answers after `delay_ms`, on a
/// connection of its own, and hangs up before the answer.
async fn hang_up_during_logout(proxy: &Proxy, id: &str, delay_ms: u64) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "GET /logout?delay_ms={delay_ms}&update={} HTTP/1.1\r\nhost: x\r\ncookie: session={id}\r\n\r\n",
        q("{}")
    );
    s.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The client hangs up while the application works on its logout: the application has
/// acted on it, so the proxy still applies its answer.
async fn a_change_the_application_answered_holds_when_the_client_left_first(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |_| {}).await;
    let mut browser = Browser::with_session(&proxy, r#"{"user":"ann"}"#).await;
    hang_up_during_logout(&proxy, &browser.cookie.clone().unwrap(), 300).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = browser.get(&proxy.url("/")).await;
        if r.session_seen() == json!({}) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the logout was lost: {}",
            r.session_seen()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests left by their clients are bounded by `limits.max_connections`: clients that
/// ask and hang up in a loop cannot pile up work.
async fn requests_left_by_their_clients_are_capped(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend.proxy(&app, |c| c.limits.max_connections = 3).await;
    // One kept-alive connection creates and checks the sessions.
    let client = Client::new();
    let mut ids = Vec::new();
    for n in 0..6 {
        let r = client
            .get(
                &proxy.url(&format!("/?update={}", q(&format!(r#"{{"n":{n}}}"#)))),
                &[],
            )
            .await;
        ids.push(r.session_cookie().expect("a session"));
    }
    for id in &ids {
        hang_up_during_logout(&proxy, id, 1500).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut alive = 0;
    for id in &ids {
        let cookie = format!("session={id}");
        let r = client.get(&proxy.url("/"), &[("cookie", &cookie)]).await;
        if r.session_seen() != json!({}) {
            alive += 1;
        }
    }
    assert_eq!(
        alive, 3,
        "three logouts ran to their end, three ended with their clients"
    );
}

/// The shutdown waits for a request its client left, as for one still connected.
async fn a_shutdown_waits_for_requests_left_by_their_clients(backend: Backend) {
    let app = App::scripted().await;
    let mut proxy = backend.proxy(&app, |c| c.shutdown.drain_delay = 0.0).await;
    let browser = Browser::with_session(&proxy, r#"{"user":"ann"}"#).await;
    let id = browser.cookie.clone().unwrap();
    drop(browser);
    hang_up_during_logout(&proxy, &id, 1000).await;
    let started = std::time::Instant::now();
    proxy.shutdown.begin_drain();
    tokio::time::timeout(Duration::from_secs(10), proxy.stopped())
        .await
        .expect("the proxy stops");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "stopped after {:?}, before the application answered",
        started.elapsed()
    );
    if let Backend::Redis(server) = &backend {
        assert_eq!(
            server.cli::<i64>(&["EXISTS", &format!("session:{id}")]),
            0,
            "the logout was applied before the proxy stopped"
        );
    }
}

async fn absolute_timeout_ends_a_session_whatever_its_activity(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| {
            c.session.absolute_timeout = Some(3);
            c.session.renew_on_access = true;
            c.session.max_age = 60;
        })
        .await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let started = std::time::Instant::now();
    // Activity and a rotation do not extend it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = browser.get(&proxy.url("/?rotate=1")).await;
    assert!(r.session_cookie().is_some());
    while started.elapsed() < Duration::from_millis(2000) {
        let r = browser.get(&proxy.url("/")).await;
        assert_eq!(r.session_seen(), json!({"a": 1}));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(4200).saturating_sub(started.elapsed())).await;
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(r.session_seen(), json!({}), "ended after absolute_timeout");
}

const SECRET: &str = "current-secret-0123456789abcdef";
const OLD_SECRET: &str = "previous-secret-0123456789abcdef";

async fn forged_or_truncated_signed_cookies_cost_no_store_access(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.secret = Some(SECRET.into()))
        .await;
    let mut browser = Browser::new();
    let r = browser
        .get(&proxy.url(&format!("/?update={}", q(r#"{"a":1}"#))))
        .await;
    let signed = r.session_cookie().unwrap();
    let (id, mac) = signed.split_once('.').expect("<id>.<mac>");
    assert_eq!((id.len(), mac.len()), (43, 43));
    assert_eq!(
        browser.get(&proxy.url("/")).await.session_seen(),
        json!({"a": 1})
    );
    let loads = proxy
        .metric("session_proxy_store_operations_total{op=\"load\"}")
        .await;
    let forged_mac = format!("{id}.{}", "A".repeat(43));
    let other_id = format!("{}.{mac}", "B".repeat(42) + "A");
    for value in [
        forged_mac.as_str(),
        &signed[..signed.len() - 3],
        id,
        &other_id,
    ] {
        let r = Client::new()
            .get(&proxy.url("/"), &[("cookie", &format!("session={value}"))])
            .await;
        assert_eq!(r.session_seen(), json!({}), "{value}");
        assert!(r.set_cookies().is_empty(), "{value}");
    }
    assert_eq!(
        proxy
            .metric("session_proxy_store_operations_total{op=\"load\"}")
            .await,
        loads
    );
}

async fn fallback_signed_cookies_are_accepted_and_resigned(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| {
            c.session.secret = Some(SECRET.into());
            c.session.secret_fallbacks = vec![OLD_SECRET.into()];
        })
        .await;
    let mut browser = Browser::with_session(&proxy, r#"{"a":1}"#).await;
    let current = browser.cookie.clone().unwrap();
    let id = current.split_once('.').unwrap().0.to_string();
    assert_eq!(current, sign_with(SECRET, &id));
    // The cookie as a proxy still on the previous secret signed it.
    let presented = sign_with(OLD_SECRET, &id);
    browser.cookie = Some(presented.clone());
    let r = browser.get(&proxy.url("/")).await;
    assert_eq!(
        r.session_seen(),
        json!({"a": 1}),
        "fallback-signed cookie accepted"
    );
    let resigned = r
        .session_cookie()
        .expect("re-signed with the current secret");
    assert_eq!(resigned, sign_with(SECRET, &id));
    // Once re-signed, reads send no cookie again.
    let r = browser.get(&proxy.url("/")).await;
    assert!(r.set_cookies().is_empty());
}

fn sign_with(secret: &str, id: &str) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(id.as_bytes());
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{id}.{tag}")
}

/// The `X-Session-Handle` the application sees on a request of `browser`'s to `path`.
async fn handle_of(proxy: &Proxy, browser: &mut Browser, path: &str) -> String {
    browser
        .get(&proxy.url(path))
        .await
        .header_seen("x-session-handle")
        .remove(0)
}

/// `DELETE /sessions/HANDLE` on the admin port.
async fn revoke_handle(proxy: &Proxy, handle: &str) -> support::Reply {
    proxy
        .admin_request("DELETE", &format!("/sessions/{handle}"), None)
        .await
}

async fn login(proxy: &Proxy, user: &str) -> Browser {
    let mut b = Browser::new();
    b.get(&proxy.url(&format!(
        "/login?rotate=1&update={}",
        q(&format!(r#"{{"user_id":"{user}"}}"#))
    )))
    .await;
    assert!(b.cookie.is_some());
    b
}

async fn revoke_all_ends_every_session_of_the_user_and_no_other(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.user_key = Some("user_id".into()))
        .await;
    let mut ann_laptop = login(&proxy, "ann").await;
    let mut ann_phone = login(&proxy, "ann").await;
    let mut bob = login(&proxy, "bob").await;
    let handle = ann_laptop
        .get(&proxy.url("/"))
        .await
        .header_seen("x-session-handle");
    assert_eq!(handle.len(), 1, "the app gets the session's handle");

    let listed = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(listed.status, 200);
    let sessions = listed.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2, "{}", listed.json());
    assert!(sessions.iter().any(|s| s["handle"] == handle[0].as_str()));
    for s in &sessions {
        assert!(s["created"].as_u64().unwrap() > 1_700_000_000);
        assert!(s["last_seen"].as_u64().unwrap() >= s["created"].as_u64().unwrap());
    }

    let revoked = proxy
        .admin_request("DELETE", "/sessions?user=ann", None)
        .await;
    assert_eq!(revoked.json()["revoked"], 2);
    for browser in [&mut ann_laptop, &mut ann_phone] {
        assert_eq!(browser.get(&proxy.url("/")).await.session_seen(), json!({}));
    }
    assert_eq!(
        bob.get(&proxy.url("/")).await.session_seen(),
        json!({"user_id": "bob"})
    );
    let listed = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(listed.json()["sessions"], json!([]));

    // A user or handle that is not percent-encoded UTF-8 names nobody: it is refused,
    // never decoded into another name (`%ff` is not U+FFFD).
    let mut odd = login(&proxy, "\u{fffd}").await;
    for (method, path) in [
        ("GET", "/sessions?user=%ff"),
        ("DELETE", "/sessions?user=%ff"),
        ("GET", "/sessions?user=%zz"),
        ("DELETE", "/sessions?user=a%2"),
        ("DELETE", "/sessions/%ff"),
    ] {
        let r = proxy.admin_request(method, path, None).await;
        assert_eq!(r.status, 400, "{method} {path}");
        assert!(r.json()["detail"].as_str().unwrap().contains("UTF-8"));
    }
    assert_eq!(
        odd.get(&proxy.url("/")).await.session_seen(),
        json!({"user_id": "\u{fffd}"})
    );
    let listed = proxy
        .admin_request("GET", "/sessions?user=%EF%BF%BD", None)
        .await;
    assert_eq!(listed.json()["sessions"].as_array().map(Vec::len), Some(1));
}

/// "Log out everywhere" while requests are in flight whose answers write the session (as
/// the application saw it, user and all), also with a rotation (a login, a privilege
/// change): no answer may bring the session back under a new ID, or a stolen cookie with
/// a slow request outlives the revocation.
async fn a_write_in_flight_does_not_bring_back_a_revoked_session(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.user_key = Some("user".into()))
        .await;
    let browser = Browser::with_session(&proxy, r#"{"user":"ann","cart":1}"#).await;
    let cookie = format!("session={}", browser.cookie.clone().unwrap());
    let writes = [
        format!("update={}", q(r#"{"user":"ann","cart":2}"#)),
        format!("patch={}", q(r#"{"cart":3}"#)),
        format!("rotate=1&update={}", q(r#"{"user":"ann","cart":4}"#)),
        format!("rotate=1&patch={}", q(r#"{"cart":5}"#)),
        "rotate=1".to_string(),
    ];
    let slow: Vec<_> = writes
        .iter()
        .map(|write| send(&proxy, &format!("/slow?delay_ms=500&{write}"), &cookie))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = proxy
        .admin_request("DELETE", "/sessions?user=ann", None)
        .await;
    assert_eq!(r.status, 200);
    for (write, task) in writes.iter().zip(slow) {
        let r = task.await.unwrap();
        // Changed nothing: no session of its own, and the dead cookie is left for the
        // next request to clear.
        assert!(r.set_cookies().is_empty(), "{write}: {:?}", r.set_cookies());
    }
    let listed = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(listed.json()["sessions"], json!([]));
}

async fn revoke_by_handle_ends_one_session(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.user_key = Some("user_id".into()))
        .await;
    let mut a = login(&proxy, "ann").await;
    let mut b = login(&proxy, "ann").await;
    let handle = handle_of(&proxy, &mut a, "/").await;
    assert_eq!(revoke_handle(&proxy, &handle).await.status, 200);
    assert_eq!(a.get(&proxy.url("/")).await.session_seen(), json!({}));
    assert_eq!(
        b.get(&proxy.url("/")).await.session_seen(),
        json!({"user_id": "ann"})
    );
    assert_eq!(revoke_handle(&proxy, &handle).await.status, 404);
}

/// Handles name indexed sessions only: once a session's data names no user (its user key
/// removed), its old handle revokes nothing, on either store.
async fn a_session_that_left_the_index_is_not_revoked_by_its_handle(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| c.session.user_key = Some("user_id".into()))
        .await;
    let mut a = login(&proxy, "ann").await;
    let handle = handle_of(&proxy, &mut a, &format!("/?patch={}", q(r#"{"x":1}"#))).await;
    a.get(&proxy.url(&format!("/logout?patch={}", q(r#"{"user_id":null}"#))))
        .await;
    let r = revoke_handle(&proxy, &handle).await;
    assert_eq!(r.status, 404, "{:?}", r.json());
    assert_eq!(a.get(&proxy.url("/")).await.session_seen(), json!({"x": 1}));
}

async fn admin_token_guards_sessions_but_not_probes(backend: Backend) {
    let app = App::scripted().await;
    let proxy = backend
        .proxy(&app, |c| {
            c.session.user_key = Some("user_id".into());
            c.admin_token = Some("s3cret-token".into());
        })
        .await;
    login(&proxy, "ann").await;
    // The answer says whether a token was missing or wrong, and never repeats it.
    let missing = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.json()["detail"],
        "admin_token required: send Authorization: Bearer <token>"
    );
    let wrong = proxy
        .admin_request("GET", "/sessions?user=ann", Some("wr0ng-guess"))
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.headers["www-authenticate"], "Bearer");
    let detail = wrong.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.starts_with("wrong admin token"), "{detail}");
    assert!(!String::from_utf8_lossy(&wrong.body).contains("wr0ng-guess"));
    let ok = proxy
        .admin_request("GET", "/sessions?user=ann", Some("s3cret-token"))
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["sessions"].as_array().unwrap().len(), 1);
    let refused = proxy.admin_request("GET", "/sessions?user=ann", None).await;
    assert_eq!(refused.headers["www-authenticate"], "Bearer");
    // The scheme's name is case-insensitive.
    let url = format!("http://{}/sessions?user=ann", proxy.admin.unwrap());
    let lower = Client::new()
        .get(&url, &[("authorization", "bearer s3cret-token")])
        .await;
    assert_eq!(lower.status, 200);
    for probe in ["/healthz", "/readyz", "/metrics"] {
        for method in ["GET", "HEAD"] {
            let r = proxy.admin_request(method, probe, None).await;
            assert_eq!(r.status, 200, "{method} {probe}");
        }
        let r = proxy.admin_request("POST", probe, None).await;
        assert_eq!(r.status, 405, "POST {probe}");
        assert_eq!(r.headers["allow"], "GET, HEAD");
    }
    let r = proxy
        .admin_request("PUT", "/sessions?user=ann", Some("s3cret-token"))
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, DELETE");
}
