//! The simulator's subscription credits (`sim --credits`, `SimConfig::credits`):
//! a notice for a recipient and template with no credit left is answered
//! 43101 and recorded; a grant (in process or over `POST /sim/credits`) lets
//! the next notice through, which takes the credit. Calls go over real HTTP,
//! as the service's client makes them.

use serde_json::{json, Value};
use wechat_notifier::sim::{Api, Sim, SimConfig};

async fn sim(credits: bool) -> (Sim, reqwest::Client, String) {
    let sim = Sim::start_local(SimConfig {
        credits,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let http = reqwest::Client::new();
    let c = sim.config();
    let token: Value = http
        .post(format!("{}/cgi-bin/stable_token", sim.url()))
        .json(&json!({"grant_type": "client_credential", "appid": c.appid, "secret": c.secret}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    (sim, http, token)
}

/// A cloud-function notice for `user_id` (with `openid` if given) and `template`;
/// the function's own errcode (inside `resp_data`).
async fn invoke(
    sim: &Sim,
    http: &reqwest::Client,
    token: &str,
    user_id: &str,
    openid: Option<&str>,
    template: Option<&str>,
) -> i64 {
    let mut notice = json!({
        "notice_id": format!("n-{}", fastrand::u32(..)),
        "assignee": {"user_id": user_id},
        "customers": [{"id": "1", "name": "c"}],
        "event_ids": ["e-1"],
    });
    if let Some(o) = openid {
        notice["assignee"]["openid"] = json!(o);
    }
    if let Some(t) = template {
        notice["template_id"] = json!(t);
    }
    let c = sim.config();
    let answer: Value = http
        .post(format!(
            "{}/tcb/invokecloudfunction?access_token={token}&env={}&name={}",
            sim.url(),
            c.cloud_env,
            c.cloud_function
        ))
        .json(&json!({"type": "sendCustomerAssignNotification", "notice": notice}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["errcode"], 0, "the platform call itself succeeds");
    let inner: Value = serde_json::from_str(answer["resp_data"].as_str().unwrap()).unwrap();
    inner["errcode"].as_i64().unwrap()
}

/// A direct-mode send to `openid` with `template`: WeChat's errcode.
async fn send(sim: &Sim, http: &reqwest::Client, token: &str, openid: &str, template: &str) -> i64 {
    let answer: Value = http
        .post(format!(
            "{}/cgi-bin/message/subscribe/send?access_token={token}",
            sim.url()
        ))
        .json(&json!({
            "touser": openid,
            "template_id": template,
            "data": {"thing1": {"value": "上海某某贸易"}},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["errcode"].as_i64().unwrap()
}

#[tokio::test]
async fn a_cloud_function_notice_spends_a_credit_and_is_refused_43101_without_one() {
    let (sim, http, token) = sim(true).await;
    assert_eq!(sim.credits("oAlice", "tpl"), 0);
    assert_eq!(
        invoke(&sim, &http, &token, "u1", Some("oAlice"), Some("tpl")).await,
        43101
    );
    sim.grant("oAlice", "tpl", 1);
    assert_eq!(sim.credits("oAlice", "tpl"), 1);
    // Another template's credits, or another user's, are not this one's.
    assert_eq!(
        invoke(&sim, &http, &token, "u1", Some("oAlice"), Some("other")).await,
        43101
    );
    assert_eq!(
        invoke(&sim, &http, &token, "u2", Some("oBob"), Some("tpl")).await,
        43101
    );
    assert_eq!(
        invoke(&sim, &http, &token, "u1", Some("oAlice"), Some("tpl")).await,
        0
    );
    assert_eq!(sim.credits("oAlice", "tpl"), 0);
    assert_eq!(
        invoke(&sim, &http, &token, "u1", Some("oAlice"), Some("tpl")).await,
        43101
    );
    // Every refusal is recorded with its errcode; only the accepted notice is delivered.
    let codes: Vec<i64> = sim.notice_calls().iter().map(|c| c.errcode).collect();
    assert_eq!(codes, vec![43101, 43101, 43101, 0, 43101]);
    assert_eq!(sim.delivered().len(), 1);
    assert_eq!(sim.delivered_event_count(), 1);
}

#[tokio::test]
async fn a_notice_without_openid_or_template_is_keyed_by_its_user_id_and_the_empty_template() {
    let (sim, http, token) = sim(true).await;
    sim.grant("u7", "", 2);
    assert_eq!(invoke(&sim, &http, &token, "u7", None, None).await, 0);
    assert_eq!(sim.credits("u7", ""), 1);
    // The probe never spends a credit.
    let c = sim.config();
    let probe: Value = http
        .post(format!(
            "{}/tcb/invokecloudfunction?access_token={token}&env={}&name={}",
            sim.url(),
            c.cloud_env,
            c.cloud_function
        ))
        .json(&json!({"type": "wechatNotifierProbe"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(probe["errcode"], 0);
    assert_eq!(sim.credits("u7", ""), 1);
}

#[tokio::test]
async fn the_direct_mode_is_keyed_by_touser_and_template_id() {
    let (sim, http, token) = sim(true).await;
    assert_eq!(send(&sim, &http, &token, "oCarol", "tpl").await, 43101);
    sim.grant("oCarol", "tpl", 1);
    assert_eq!(send(&sim, &http, &token, "oCarol", "tpl").await, 0);
    assert_eq!(send(&sim, &http, &token, "oCarol", "tpl").await, 43101);
    // A body WeChat refuses anyway spends nothing.
    sim.grant("oCarol", "tpl", 1);
    assert_eq!(send(&sim, &http, &token, "oCarol", "").await, 40037);
    assert_eq!(sim.credits("oCarol", "tpl"), 1);
    let calls: Vec<(Api, i64)> = sim
        .notice_calls()
        .iter()
        .map(|c| (c.api, c.errcode))
        .collect();
    assert_eq!(calls.last(), Some(&(Api::SubscribeSend, 40037)));
}

#[tokio::test]
async fn credits_are_granted_and_listed_over_http() {
    let (sim, http, token) = sim(true).await;
    let grant = |body: Value| {
        let http = http.clone();
        let url = format!("{}/sim/credits", sim.url());
        async move { http.post(url).json(&body).send().await.unwrap().status() }
    };
    assert_eq!(
        grant(json!({"openid": "oDan", "template_id": "tpl", "count": 2})).await,
        204
    );
    assert_eq!(
        grant(json!({"user_id": "u9", "template_id": "tpl", "count": 1})).await,
        204
    );
    assert_eq!(grant(json!({"template_id": "tpl", "count": 1})).await, 400);
    assert_eq!(
        invoke(&sim, &http, &token, "u4", Some("oDan"), Some("tpl")).await,
        0
    );
    assert_eq!(
        invoke(&sim, &http, &token, "u9", None, Some("tpl")).await,
        0
    );
    let listed: Value = http
        .get(format!("{}/sim/credits", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed,
        json!([
            {"recipient": "oDan", "template_id": "tpl", "count": 1},
            {"recipient": "u9", "template_id": "tpl", "count": 0},
        ])
    );
}

#[tokio::test]
async fn without_the_flag_credits_are_not_modelled() {
    let (sim, http, token) = sim(false).await;
    assert_eq!(
        invoke(&sim, &http, &token, "u1", Some("oAlice"), Some("tpl")).await,
        0
    );
    assert_eq!(send(&sim, &http, &token, "oAlice", "tpl").await, 0);
}
