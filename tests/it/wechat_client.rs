//! The WeChat client on its own, against the in-process simulator: no broker,
//! no service. What one call sends, how a failure is classified, that a slow
//! reply becomes a timeout after `WECHAT_CALL_TIMEOUT`, that no error detail
//! carries the secret or a token, and that the token is fetched once and reused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wechat_notifier::event::parse;
use wechat_notifier::metrics::Metrics;
use wechat_notifier::notice::Notice;
use wechat_notifier::settings::Settings;
use wechat_notifier::sim::{Api, Call, Fault, FaultAction, Sim, SimConfig};
use wechat_notifier::wechat::{CallResult, Outcome, WeChat};

async fn sim() -> Sim {
    Sim::start_local(SimConfig::default())
        .await
        .expect("simulator starts")
}

/// Settings that point at `sim`, plus `extra` (later pairs win).
fn settings(sim: &Sim, extra: &[(&str, &str)]) -> Settings {
    let mut pairs: Vec<(String, String)> = vec![
        ("WECHAT_API_BASE".into(), sim.url()),
        ("WECHAT_APPID".into(), sim.config().appid.clone()),
        ("WECHAT_APPSECRET".into(), sim.config().secret.clone()),
        ("WECHAT_CLOUD_ENV".into(), sim.config().cloud_env.clone()),
    ];
    for (k, v) in extra {
        pairs.retain(|(key, _)| key != k);
        pairs.push((k.to_string(), v.to_string()));
    }
    Settings::from_pairs(pairs).expect("test settings are valid")
}

fn client(settings: &Settings) -> WeChat {
    WeChat::new(settings, Arc::new(Metrics::new()))
}

/// A one-event notice for `user`.
fn notice(user: &str) -> Notice {
    let event = parse(
        json!({
            "event_id": format!("ev-{user}"),
            "event_type": "customer.assigned",
            "occurred_at": "2026-11-25T14:03:27+08:00",
            "source": "web",
            "assignee": { "user_id": user, "name": "张三" },
            "customer": { "id": "88231", "name": "上海某某贸易有限公司" },
            "assigned_by": { "user_id": "7", "name": "李经理" }
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid event");
    Notice::from_events(&[&event])
}

fn fault(api: Api, action: FaultAction, times: u32) -> Fault {
    Fault {
        api: Some(api),
        user_id: None,
        action,
        times: Some(times),
    }
}

fn calls_of(sim: &Sim, api: Api) -> Vec<Call> {
    sim.calls().into_iter().filter(|c| c.api == api).collect()
}

#[tokio::test]
async fn a_notice_is_posted_with_env_and_name_and_a_body_of_type_and_notice() {
    let sim = sim().await;
    let wechat = client(&settings(&sim, &[]));
    let n = notice("u1");
    let result = wechat.send(&n).await;
    assert_eq!(result.outcome, Outcome::Delivered, "{}", result.detail);

    let calls = sim.notice_calls();
    assert_eq!(calls.len(), 1);
    // The simulator answers -501005 / -501000 unless the query names its env and function.
    assert_eq!((calls[0].http_status, calls[0].errcode), (200, 0));
    assert_eq!(
        calls[0].body,
        json!({
            "type": "sendCustomerAssignNotification",
            "notice": serde_json::to_value(&n).unwrap(),
        })
    );
}

#[tokio::test]
async fn the_env_and_function_name_come_from_the_settings() {
    let sim = sim().await;
    let wrong_env = client(&settings(&sim, &[("WECHAT_CLOUD_ENV", "other-env")]));
    let r = wrong_env.send(&notice("u1")).await;
    assert_eq!(
        (r.outcome, r.errcode),
        (Outcome::ConfigFault, Some(-501005))
    );

    let wrong_name = client(&settings(&sim, &[("WECHAT_CLOUD_FUNCTION", "otherFn")]));
    let r = wrong_name.send(&notice("u1")).await;
    assert_eq!(
        (r.outcome, r.errcode),
        (Outcome::ConfigFault, Some(-501000))
    );
    assert!(sim.delivered().is_empty());
}

#[tokio::test]
async fn an_http_500_is_transient_and_names_the_status() {
    let sim = sim().await;
    let wechat = client(&settings(&sim, &[]));
    sim.push_fault(fault(Api::InvokeCloudFunction, FaultAction::Http(500), 1));
    let r = wechat.send(&notice("u1")).await;
    assert_eq!((r.outcome, r.errcode), (Outcome::Transient, None));
    assert!(r.detail.contains("500"), "{}", r.detail);
    assert!(sim.delivered().is_empty());
    // The next call goes through: nothing in the client stuck.
    assert_eq!(wechat.send(&notice("u1")).await.outcome, Outcome::Delivered);
}

/// WeChat's API never redirects; a redirect is not followed (the URL carries
/// the access token) and counts as transient.
#[tokio::test]
async fn a_redirect_is_not_followed_and_is_transient() {
    let sim = sim().await;
    let wechat = client(&settings(&sim, &[]));
    sim.push_fault(fault(Api::InvokeCloudFunction, FaultAction::Http(302), 1));
    let r = wechat.send(&notice("u1")).await;
    assert_eq!((r.outcome, r.errcode), (Outcome::Transient, None));
    assert!(r.detail.contains("302"), "not followed: {}", r.detail);
    assert!(sim.delivered().is_empty());
}

#[tokio::test]
async fn a_reply_slower_than_the_call_timeout_is_a_transient_timeout() {
    let sim = sim().await;
    let wechat = client(&settings(&sim, &[("WECHAT_CALL_TIMEOUT", "1s")]));
    // Fetch the token first, so only the notice call meets the delay.
    assert_eq!(wechat.send(&notice("u0")).await.outcome, Outcome::Delivered);
    sim.push_fault(fault(
        Api::InvokeCloudFunction,
        FaultAction::DelayMs(60_000),
        1,
    ));
    let started = Instant::now();
    let r = wechat.send(&notice("u1")).await;
    let took = started.elapsed();
    assert_eq!((r.outcome, r.errcode), (Outcome::Transient, None));
    assert!(r.detail.contains("timed out"), "{}", r.detail);
    // The behaviour is about time: the client gives up at its timeout (1 s),
    // not when WeChat answers (60 s) nor at the default (15 s).
    assert!(
        took >= Duration::from_millis(1000),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
}

#[tokio::test]
async fn no_error_detail_carries_the_secret_or_a_token() {
    let sim = sim().await;
    // Classic mode puts the secret in the token request's query string, and
    // every notice call carries the token in its query string.
    let wechat = client(&settings(
        &sim,
        &[
            ("WECHAT_TOKEN_MODE", "classic"),
            ("WECHAT_CALL_TIMEOUT", "1s"),
        ],
    ));
    let mut results: Vec<CallResult> = Vec::new();
    // Token fetch failures: a 502, a timeout.
    sim.push_fault(fault(Api::Token, FaultAction::Http(502), 1));
    results.push(wechat.send(&notice("u1")).await);
    sim.push_fault(fault(Api::Token, FaultAction::DelayMs(60_000), 1));
    results.push(wechat.send(&notice("u1")).await);
    // Notice call failures with a token in the URL: 503, timeout, expired token, rejection.
    sim.push_fault(fault(Api::InvokeCloudFunction, FaultAction::Http(503), 1));
    results.push(wechat.send(&notice("u1")).await);
    sim.push_fault(fault(
        Api::InvokeCloudFunction,
        FaultAction::DelayMs(60_000),
        1,
    ));
    results.push(wechat.send(&notice("u1")).await);
    sim.expire_tokens();
    results.push(wechat.send(&notice("u1")).await);
    sim.push_fault(fault(
        Api::InvokeCloudFunction,
        FaultAction::FunctionErrcode(43101),
        1,
    ));
    results.push(wechat.send(&notice("u1")).await);
    // A wrong secret, from the probe.
    let wrong = client(&settings(
        &sim,
        &[
            ("WECHAT_TOKEN_MODE", "classic"),
            ("WECHAT_APPSECRET", "wrong-secret-value"),
        ],
    ));
    results.push(wrong.probe().await.expect_err("a wrong secret fails"));
    // A connection refused (nothing listens on port 1).
    let nowhere = client(&settings(
        &sim,
        &[
            ("WECHAT_TOKEN_MODE", "classic"),
            ("WECHAT_API_BASE", "http://127.0.0.1:1"),
        ],
    ));
    results.push(nowhere.send(&notice("u1")).await);

    let outcomes: Vec<Outcome> = results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Transient,
            Outcome::Transient,
            Outcome::Transient,
            Outcome::Transient,
            Outcome::TokenInvalid,
            Outcome::Rejected,
            Outcome::ConfigFault,
            Outcome::Transient,
        ],
        "{results:#?}"
    );
    let tokens = sim.issued_tokens();
    assert!(tokens.len() >= 2, "the token was replaced during the run");
    let secrets = [sim.config().secret.clone(), "wrong-secret-value".into()];
    for r in &results {
        for needle in secrets.iter().chain(tokens.iter()) {
            assert!(
                !r.detail.contains(needle.as_str()),
                "a secret or token in {:?}",
                r.detail
            );
        }
        assert!(!r.detail.contains("access_token="), "{:?}", r.detail);
        assert!(!r.detail.contains("secret="), "{:?}", r.detail);
    }
}

#[tokio::test]
async fn the_token_is_fetched_once_and_reused_until_wechat_rejects_it() {
    let sim = sim().await;
    let wechat = client(&settings(&sim, &[]));
    for user in ["u1", "u2", "u3"] {
        assert_eq!(wechat.send(&notice(user)).await.outcome, Outcome::Delivered);
    }
    assert_eq!(calls_of(&sim, Api::StableToken).len(), 1, "one fetch");

    // WeChat says the token expired: the client drops it, the next call fetches again.
    sim.expire_tokens();
    assert_eq!(
        wechat.send(&notice("u4")).await.outcome,
        Outcome::TokenInvalid
    );
    assert_eq!(wechat.send(&notice("u4")).await.outcome, Outcome::Delivered);
    // Again within 30 s: fetched again, but a stable token is force-refreshed
    // at most once per 30 s (the rest of that rule is a unit test of the token cache).
    sim.expire_tokens();
    assert_eq!(
        wechat.send(&notice("u5")).await.outcome,
        Outcome::TokenInvalid
    );
    assert_eq!(wechat.send(&notice("u5")).await.outcome, Outcome::Delivered);
    let forced: Vec<Value> = calls_of(&sim, Api::StableToken)
        .iter()
        .map(|c| c.body["force_refresh"].clone())
        .collect();
    assert_eq!(forced, vec![json!(false), json!(true), json!(false)]);
    assert_eq!(sim.delivered().len(), 5);
}

#[tokio::test]
async fn a_failed_refresh_ahead_of_expiry_keeps_the_cached_token_but_a_stale_one_is_fetched() {
    // A token that lives 6 s: refreshed ahead of its expiry, seconds before it.
    let sim = Sim::start_local(SimConfig {
        token_ttl: 6,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let wechat = client(&settings(&sim, &[]));
    let fetched = tokio::time::Instant::now();
    assert_eq!(wechat.send(&notice("u0")).await.outcome, Outcome::Delivered);
    // From now on the token endpoint fails.
    sim.push_fault(Fault {
        api: Some(Api::StableToken),
        user_id: None,
        action: FaultAction::Http(500),
        times: None,
    });
    let failed_fetches = |sim: &Sim| {
        calls_of(sim, Api::StableToken)
            .iter()
            .filter(|c| c.http_status == 500)
            .count()
    };
    // Send until the client tries to refresh (its token reached the refresh
    // instant); every send, that one included, is delivered.
    let mut sent = 1;
    while failed_fetches(&sim) == 0 {
        assert!(
            fetched.elapsed() < Duration::from_secs(5),
            "a refresh was tried before the token's expiry"
        );
        let r = wechat.send(&notice(&format!("u{sent}"))).await;
        assert_eq!(r.outcome, Outcome::Delivered, "send {sent}: {}", r.detail);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fetched.elapsed() < Duration::from_secs(5),
        "all of that before the token's expiry"
    );
    assert_eq!(sim.delivered().len(), sent);
    assert_eq!(
        sim.issued_tokens().len(),
        1,
        "the one token served them all"
    );

    // A token WeChat rejected is not used again, even while no new one can be had.
    sim.expire_tokens();
    assert_eq!(
        wechat.send(&notice("u-stale")).await.outcome,
        Outcome::TokenInvalid
    );
    let before = sim.notice_calls().len();
    let r = wechat.send(&notice("u-stale")).await;
    assert_eq!(r.outcome, Outcome::Transient, "{}", r.detail);
    assert!(r.detail.contains("token"), "{}", r.detail);
    assert_eq!(
        sim.notice_calls().len(),
        before,
        "no call with the stale token"
    );
    sim.clear_faults();
    assert_eq!(
        wechat.send(&notice("u-stale")).await.outcome,
        Outcome::Delivered
    );
}

/// A client whose token (it lives 6 s) is due for its refresh ahead of
/// expiry, and a send (u1) that makes that refresh, slowed by `delay_ms` at
/// the simulator, in flight.
async fn a_slow_refresh_in_flight(
    delay_ms: u64,
) -> (Sim, Arc<WeChat>, tokio::task::JoinHandle<CallResult>) {
    let sim = Sim::start_local(SimConfig {
        token_ttl: 6,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let wechat = Arc::new(client(&settings(&sim, &[])));
    assert_eq!(wechat.send(&notice("u0")).await.outcome, Outcome::Delivered);
    sim.push_fault(Fault {
        api: Some(Api::StableToken),
        user_id: None,
        action: FaultAction::DelayMs(delay_ms),
        times: Some(1),
    });
    // Refreshed at half its life (3 s).
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let refreshing = {
        let wechat = wechat.clone();
        tokio::spawn(async move { wechat.send(&notice("u1")).await })
    };
    (sim, wechat, refreshing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refresh_ahead_of_expiry_delays_no_call() {
    // The refresh takes 3 s.
    let (sim, wechat, refreshing) = a_slow_refresh_in_flight(3000).await;
    // The refresh is held 3 s at the simulator (which logs a call when it
    // answers): well inside that, another send.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = wechat.send(&notice("u2")).await;
    assert_eq!(r.outcome, Outcome::Delivered, "{}", r.detail);
    assert_eq!(refreshing.await.unwrap().outcome, Outcome::Delivered);
    let refresh_asked = calls_of(&sim, Api::StableToken)[1].at_ms;
    let sent = sim
        .notice_calls()
        .iter()
        .find(|c| c.body["notice"]["assignee"]["user_id"] == "u2")
        .map(|c| c.at_ms)
        .expect("u2's notice reached WeChat");
    assert!(
        sent < refresh_asked + 3000.0,
        "the call went with the cached token while the refresh was in flight \
         (refresh asked at {refresh_asked} ms, call at {sent} ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_outlives_its_token_s_rejection_serves_the_token_it_fetched() {
    // The refresh takes 2 s, and meanwhile WeChat rejects the old token
    // (another call gets 40001).
    let (sim, wechat, refreshing) = a_slow_refresh_in_flight(2000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.expire_tokens();
    assert_eq!(
        wechat.send(&notice("u2")).await.outcome,
        Outcome::TokenInvalid
    );
    // The refresh answers with a new token (asked for after nothing but the
    // old one was rejected): its caller is served with it, and so is the next.
    let r = refreshing.await.unwrap();
    assert_eq!(r.outcome, Outcome::Delivered, "{}", r.detail);
    assert_eq!(wechat.send(&notice("u2")).await.outcome, Outcome::Delivered);
    assert_eq!(
        sim.issued_tokens().len(),
        2,
        "one token fetched by the refresh served both, no third fetch"
    );
}
