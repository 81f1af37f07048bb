//! The thin WeChat API client: one call per notice, in the configured delivery
//! mode, with the answer classified into an `Outcome`. It does not retry, wait
//! or ack; `dispatch` decides what an outcome means for the messages.
//!
//! Tokens travel in the query string, so every transport error is stripped of
//! its URL before it becomes a detail: no token reaches a log line.

pub mod outcome;
pub mod template;
pub mod token;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::settings::{DeliveryMode, Secret, Settings, TemplateSettings};
pub use outcome::{classify, CallResult, Outcome};
use token::TokenProvider;

/// The `type` of the probe call; the cloud function answers it without sending anything.
pub const PROBE_TYPE: &str = "wechatNotifierProbe";

/// The `type` of the cloud function's event for a notice (contract section 4).
pub const NOTICE_TYPE: &str = "sendCustomerAssignNotification";

/// WeChat's envelope. Fields of an unexpected type read as absent, so a
/// reply that is JSON but not WeChat's is classified, not a parse error.
#[derive(Deserialize)]
struct ApiReply {
    #[serde(default, deserialize_with = "lenient")]
    errcode: Option<i64>,
    #[serde(default, deserialize_with = "lenient")]
    errmsg: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    resp_data: Option<String>,
}

fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

#[derive(Deserialize)]
struct FunctionReply {
    errcode: Option<i64>,
    #[serde(rename = "errCode")]
    err_code: Option<i64>,
    errmsg: Option<String>,
    #[serde(rename = "errMsg")]
    err_msg: Option<String>,
}

/// The cloud function's `event` for a notice (contract section 4), written
/// straight from the notice (no intermediate JSON tree).
#[derive(Serialize)]
struct InvokeBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    notice: NoticeOut<'a>,
}

/// The notice as the cloud function reads it: with the grant ledger on, it
/// also names the template the function sends (the ledger counts credits
/// per template).
#[derive(Serialize)]
struct NoticeOut<'a> {
    #[serde(flatten)]
    notice: &'a Notice,
    #[serde(skip_serializing_if = "Option::is_none")]
    template_id: Option<&'a str>,
}

/// A notice that passed the local checks, with its request body where the
/// mode needs one built (the direct mode's `subscribe/send`).
pub struct Prepared<'a> {
    notice: &'a Notice,
    subscribe: Option<Value>,
}

/// An endpoint under the API base.
fn endpoint(base: &str, path: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(&format!("{base}{path}")).ok()
}

/// Sends notices to WeChat.
pub struct WeChat {
    http: reqwest::Client,
    /// The two endpoints, parsed once (not on every call); `None` only if
    /// `WECHAT_API_BASE` was not checked at start.
    invoke_url: Option<reqwest::Url>,
    send_url: Option<reqwest::Url>,
    mode: DeliveryMode,
    cloud_env: String,
    cloud_function: String,
    template: Option<TemplateSettings>,
    /// With the grant ledger on: the template the cloud function sends.
    ledger_template: Option<String>,
    tokens: TokenProvider,
    metrics: Arc<Metrics>,
}

/// The HTTP client every WeChat call uses (rustls, a whole-call timeout:
/// `WECHAT_CALL_TIMEOUT`, after which the call counts as transient). Redirects
/// are not followed: WeChat's API never redirects, and a URL carrying the
/// access token must not be sent on to another address (a 3xx is transient).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a TLS backend is compiled in")
}

impl WeChat {
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let http = http_client(settings.call_timeout);
        WeChat {
            tokens: TokenProvider::new(settings, http.clone(), metrics.clone()),
            http,
            invoke_url: endpoint(&settings.wechat_api_base, "/tcb/invokecloudfunction"),
            send_url: endpoint(&settings.wechat_api_base, "/cgi-bin/message/subscribe/send"),
            mode: settings.delivery_mode,
            cloud_env: settings.cloud_env.clone(),
            cloud_function: settings.cloud_function.clone(),
            template: settings.template.clone(),
            ledger_template: settings.ledger.as_ref().map(|l| l.template_id.clone()),
            metrics,
        }
    }

    pub fn api_name(&self) -> &'static str {
        match self.mode {
            DeliveryMode::CloudFunction => "invokecloudfunction",
            DeliveryMode::SubscribeMessage => "subscribe_send",
        }
    }

    /// Reaches WeChat without sending a notice, to find configuration faults
    /// before consuming: a token fetch, and in cloud-function mode a probe call
    /// whose platform-level errcode tells a wrong env or a missing permission.
    ///
    /// # Errors
    /// The classified failure (the caller decides which outcomes matter).
    pub async fn probe(&self) -> Result<(), CallResult> {
        let token = self.token().await?;
        self.probe_with(&token).await
    }

    /// A valid access token (fetched if none is cached or it is due). The
    /// dispatcher takes it before its rate slot, so that no call holds a slot
    /// while another fetches the token.
    ///
    /// # Errors
    /// The classified failure of the fetch.
    pub async fn token(&self) -> Result<Secret, CallResult> {
        self.tokens.get().await
    }

    /// The token for a call made after waiting for its rate slot, without
    /// waiting for a fetch: the freshest cached one (another call may have
    /// replaced `taken` meanwhile), else `taken` only while it is still the
    /// newest token and WeChat has not rejected it (`None`: the call must
    /// take a token again). A token WeChat rejected is never sent again, nor
    /// one it replaced, however many refreshes the call waited through.
    pub fn token_after_wait(&self, taken: &Secret) -> Option<Secret> {
        self.tokens.after_wait(taken)
    }

    /// As `probe`, with a token already taken.
    ///
    /// # Errors
    /// The classified failure.
    pub async fn probe_with(&self, token: &Secret) -> Result<(), CallResult> {
        if self.mode != DeliveryMode::CloudFunction {
            return Ok(());
        }
        let query = [
            ("access_token", token.expose()),
            ("env", self.cloud_env.as_str()),
            ("name", self.cloud_function.as_str()),
        ];
        let reply = self
            .post(
                self.invoke_url.as_ref(),
                &query,
                &serde_json::json!({ "type": PROBE_TYPE }),
            )
            .await?;
        // The platform's answer first (env, function name, token), then the
        // function's own check of its settings inside `resp_data`.
        let result = match platform_result(&reply) {
            Some(failed) => failed,
            None => function_result(reply.resp_data.as_deref()),
        };
        match result.outcome {
            Outcome::Delivered => Ok(()),
            Outcome::TokenInvalid => {
                self.tokens.invalidate(token).await;
                Err(result)
            }
            _ => Err(result),
        }
    }

    /// What can be decided about `notice` without WeChat: in the direct mode
    /// it needs an openid and a template. Decided before any token or rate
    /// slot is taken, and never an answer from WeChat (so it proves nothing
    /// about the settings).
    ///
    /// # Errors
    /// The local verdict (`NoOpenid`, or a configuration fault).
    pub fn prepare<'a>(&self, notice: &'a Notice) -> Result<Prepared<'a>, CallResult> {
        let subscribe = match self.mode {
            DeliveryMode::CloudFunction => None,
            DeliveryMode::SubscribeMessage => match &self.template {
                Some(t) => Some(template::subscribe_body(t, notice)?),
                None => {
                    return Err(CallResult {
                        outcome: Outcome::ConfigFault,
                        errcode: None,
                        detail: "subscribe_message mode without a template".into(),
                    })
                }
            },
        };
        Ok(Prepared { notice, subscribe })
    }

    /// One attempt to deliver `notice` (prepare, token, call), outside any
    /// rate budget: for tools and tests.
    pub async fn send(&self, notice: &Notice) -> CallResult {
        let prepared = match self.prepare(notice) {
            Ok(p) => p,
            Err(e) => return e,
        };
        match self.token().await {
            Ok(token) => self.call(&prepared, &token).await,
            Err(e) => e,
        }
    }

    /// One call to WeChat with a prepared notice. A token WeChat calls invalid
    /// is dropped from the cache before this returns `TokenInvalid`.
    pub async fn call(&self, prepared: &Prepared<'_>, token: &Secret) -> CallResult {
        let api = self.api_name();
        let started = Instant::now();
        let call = async {
            match &prepared.subscribe {
                None => self.invoke(prepared.notice, token.expose()).await,
                Some(body) => self.subscribe_send(body, token.expose()).await,
            }
        };
        // A client span (HTTP semantic conventions) under the notice's; its
        // `url.full` is the endpoint without the query that holds the token.
        let url = match &prepared.subscribe {
            None => self.invoke_url.as_ref(),
            Some(_) => self.send_url.as_ref(),
        };
        let span = url.and_then(|u| crate::trace::http_client_span("POST", u));
        let result = match &span {
            Some(cx) => {
                use opentelemetry::context::FutureExt;
                call.with_context(cx.clone()).await
            }
            None => call.await,
        };
        if span.is_some() {
            let mut attrs = vec![
                opentelemetry::KeyValue::new("notifier.outcome", result.outcome.as_str()),
                opentelemetry::KeyValue::new("wechat.api", api),
            ];
            if let Some(code) = result.errcode {
                attrs.push(opentelemetry::KeyValue::new("wechat.errcode", code));
            }
            if result.outcome != Outcome::Delivered {
                attrs.push(opentelemetry::KeyValue::new(
                    "error.type",
                    result.outcome.as_str(),
                ));
            }
            crate::trace::set(span.as_ref(), attrs);
            crate::trace::end(span);
        }
        self.metrics.wechat_call(
            api,
            result.outcome.as_str(),
            result.errcode,
            started.elapsed().as_secs_f64(),
        );
        if result.outcome == Outcome::TokenInvalid {
            self.tokens.invalidate(token).await;
        }
        result
    }

    async fn post<B: Serialize + ?Sized>(
        &self,
        url: Option<&reqwest::Url>,
        query: &[(&str, &str)],
        body: &B,
    ) -> Result<ApiReply, CallResult> {
        let Some(url) = url else {
            return Err(CallResult::transient(
                "WECHAT_API_BASE is not an http(s) URL".to_string(),
            ));
        };
        let mut request = self.http.post(url.clone()).query(query).json(body);
        // The client span's context, for the function (and its logs) to continue.
        if let Some(tc) = crate::trace::current() {
            request = request.header(crate::trace::TRACEPARENT, tc.header());
        }
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            CallResult::transient(format!("request {kind}: {}", e.without_url()))
        })?;
        let status = response.status();
        crate::trace::set_current(vec![opentelemetry::KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        )]);
        if !status.is_success() {
            return Err(CallResult::transient(format!(
                "WeChat answered HTTP {status}"
            )));
        }
        response
            .json::<ApiReply>()
            .await
            .map_err(|e| CallResult::transient(format!("unreadable reply: {}", e.without_url())))
    }

    async fn invoke(&self, notice: &Notice, token: &str) -> CallResult {
        let body = InvokeBody {
            kind: NOTICE_TYPE,
            notice: NoticeOut {
                notice,
                template_id: self.ledger_template.as_deref(),
            },
        };
        let query = [
            ("access_token", token),
            ("env", self.cloud_env.as_str()),
            ("name", self.cloud_function.as_str()),
        ];
        let reply = match self.post(self.invoke_url.as_ref(), &query, &body).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        match platform_result(&reply) {
            Some(failed) => failed,
            None => function_result(reply.resp_data.as_deref()),
        }
    }

    async fn subscribe_send(&self, body: &Value, token: &str) -> CallResult {
        match self
            .post(self.send_url.as_ref(), &[("access_token", token)], body)
            .await
        {
            Ok(reply) => {
                platform_result(&reply).unwrap_or_else(|| CallResult::from_errcode(0, "ok"))
            }
            Err(e) => e,
        }
    }
}

/// The platform's verdict: `None` for errcode 0, else the failure. A reply
/// without a numeric errcode (a gateway's `{}`, JSON that is not WeChat's)
/// is never a success: it is transient.
fn platform_result(reply: &ApiReply) -> Option<CallResult> {
    match reply.errcode {
        Some(0) => None,
        Some(code) => Some(CallResult::from_errcode(
            code,
            reply.errmsg.as_deref().unwrap_or(""),
        )),
        None => Some(CallResult::transient(
            "WeChat answered HTTP 200 without an errcode",
        )),
    }
}

/// Reads the cloud function's own answer out of `resp_data`.
fn function_result(resp_data: Option<&str>) -> CallResult {
    let parsed = resp_data.and_then(|d| serde_json::from_str::<FunctionReply>(d).ok());
    match parsed {
        Some(r) => match r.errcode.or(r.err_code) {
            Some(code) => {
                let msg = r.errmsg.or(r.err_msg).unwrap_or_default();
                let mut result = CallResult::from_errcode(code, &msg);
                result.detail = format!("cloud function: {}", result.detail);
                result
            }
            // Never a success: an answer without a numeric errcode is transient.
            None => CallResult::transient("cloud function answered without errcode"),
        },
        None => CallResult::transient("cloud function answered no JSON resp_data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_answers_in_both_spellings() {
        assert_eq!(
            function_result(Some(r#"{"errcode":0,"errmsg":"ok"}"#)).outcome,
            Outcome::Delivered
        );
        let r = function_result(Some(r#"{"errCode":43101,"errMsg":"user refuse"}"#));
        assert_eq!((r.outcome, r.errcode), (Outcome::Rejected, Some(43101)));
        assert_eq!(function_result(Some("null")).outcome, Outcome::Transient);
        assert_eq!(function_result(Some("{}")).outcome, Outcome::Transient);
        assert_eq!(function_result(None).outcome, Outcome::Transient);
    }

    fn reply(json: &str) -> ApiReply {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_reply_without_a_numeric_errcode_is_never_a_success() {
        for body in [
            r#"{}"#,
            r#"{"errcode":"0"}"#,
            r#"{"ok":true}"#,
            r#"{"errcode":null}"#,
        ] {
            let r = platform_result(&reply(body)).expect("not a success");
            assert_eq!(r.outcome, Outcome::Transient, "{body}");
        }
        assert!(platform_result(&reply(r#"{"errcode":0,"errmsg":"ok"}"#)).is_none());
        let r = platform_result(&reply(r#"{"errcode":-501000,"errmsg":"no such function"}"#));
        assert_eq!(r.map(|r| r.outcome), Some(Outcome::ConfigFault));
    }
}
