//! A WeChat API simulator speaking real HTTP: `stable_token`, `token`,
//! `invokecloudfunction` and `subscribe/send`, checking appid, secret, token,
//! env, function name and message bodies the way WeChat does, recording every
//! call with its time, and answering with scripted faults (errcodes, HTTP
//! status, delays, token expiry). Tests drive it in-process; the `sim`
//! subcommand and docker-compose drive it over `/sim/*`.
//!
//! With `credits` on it also models one-time subscriptions (contract section
//! 8): a count per (openid, template), granted through `/sim/credits` or
//! `Sim::grant` as a user's "allow" would, taken by each accepted notice, and
//! `43101` once it is 0, as WeChat answers when no credit is left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::settings::keyword_type;
use crate::wechat::{NOTICE_TYPE, PROBE_TYPE};

/// What the simulated mini program is.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub appid: String,
    pub secret: String,
    pub cloud_env: String,
    pub cloud_function: String,
    /// Seconds a token lives.
    pub token_ttl: u64,
    /// Model subscription credits: a notice for a recipient and template with
    /// none left is answered 43101 (the `sim --credits` flag).
    pub credits: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            appid: "wx-sim-appid".into(),
            secret: "sim-secret-do-not-log".into(),
            cloud_env: "sim-env".into(),
            cloud_function: "quickstartFunctions".into(),
            token_ttl: 7200,
            credits: false,
        }
    }
}

/// The APIs the simulator answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    StableToken,
    Token,
    InvokeCloudFunction,
    SubscribeSend,
}

/// What a fault does to a matching call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum FaultAction {
    /// The platform's top-level errcode.
    Errcode(i64),
    /// The cloud function's own answer (inside `resp_data`).
    FunctionErrcode(i64),
    /// An HTTP status with no WeChat body.
    Http(u16),
    /// Hold the call this many milliseconds, then answer normally.
    DelayMs(u64),
    /// As `FunctionErrcode`, but the start-up probe passes: a fault only a
    /// real send finds (a template or permission problem inside the function).
    NoticeFunctionErrcode(i64),
    /// HTTP 200 with this body as it is (`{}`, a gateway's HTML page).
    Body(String),
}

/// A scripted fault: applies to calls of `api` (any if `None`), for the
/// assignee `user_id` (any if `None`), `times` times (forever if `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub api: Option<Api>,
    #[serde(default)]
    pub user_id: Option<String>,
    pub action: FaultAction,
    #[serde(default)]
    pub times: Option<u32>,
}

/// One call the simulator answered.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    /// Since the simulator started, when the request arrived.
    pub at_ms: f64,
    pub api: Api,
    pub body: Value,
    pub http_status: u16,
    pub errcode: i64,
    /// Since the simulator started, when the answer was sent (after any delay).
    pub answered_ms: f64,
    /// The access token a notice call carried (`None` for token requests):
    /// tests check that no token is sent after WeChat rejected it.
    pub token: Option<String>,
}

struct Token {
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, Token>,
    stable: Option<String>,
    calls: Vec<Call>,
    faults: Vec<Fault>,
    serial: u64,
    /// Notice calls received and not yet answered.
    in_flight: usize,
    /// The most notice calls that were in flight at once.
    peak_in_flight: usize,
    /// Notice calls in flight per assignee, and how often a call came while
    /// another for the same assignee was still in flight (WeChat's 43108).
    in_flight_by_user: HashMap<String, usize>,
    overlaps: usize,
    /// Events covered by accepted cloud-function notices (cheap to poll).
    delivered_events: usize,
    /// Subscription credits left per (recipient, template id), with `credits`
    /// on; a key never granted holds 0.
    credits: HashMap<(String, String), i64>,
}

/// The simulator's shared state.
pub struct SimState {
    config: SimConfig,
    started: Instant,
    inner: Mutex<Inner>,
}

/// A running simulator.
#[derive(Clone)]
pub struct Sim {
    state: Arc<SimState>,
    addr: SocketAddr,
}

impl Sim {
    /// Starts on `addr` (port 0 picks one) in the current runtime.
    ///
    /// # Errors
    /// The bind failure.
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Sim> {
        let state = Arc::new(SimState {
            config,
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sim { state, addr })
    }

    /// On 127.0.0.1 with a free port.
    pub async fn start_local(config: SimConfig) -> std::io::Result<Sim> {
        Self::start(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub fn config(&self) -> &SimConfig {
        &self.state.config
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give the service as `WECHAT_API_BASE`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn push_fault(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// Replaces every scripted fault at once (no call sees a state between).
    pub fn replace_faults(&self, faults: Vec<Fault>) {
        self.state.lock().faults = faults;
    }

    /// Every token issued so far is expired from now on (WeChat then answers 42001).
    pub fn expire_tokens(&self) {
        let mut inner = self.state.lock();
        let now = Instant::now();
        for t in inner.tokens.values_mut() {
            t.expires = now;
        }
    }

    /// Every token the simulator ever issued (to search logs for leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.lock().tokens.keys().cloned().collect()
    }

    /// Notice calls received and not answered yet (held by a delay fault).
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// The most notice calls that were in flight at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.state.lock().peak_in_flight
    }

    /// How many notice calls arrived while another call for the same
    /// assignee was still in flight (the service promises none).
    pub fn overlapping_calls(&self) -> usize {
        self.state.lock().overlaps
    }

    /// How many events accepted cloud-function notices covered (with repeats),
    /// without copying the call log: for polling under load.
    pub fn delivered_event_count(&self) -> usize {
        self.state.lock().delivered_events
    }

    /// When the simulator started: `Call::at_ms` counts from here.
    pub fn started(&self) -> Instant {
        self.state.started
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().calls.clone()
    }

    /// The notices WeChat accepted (errcode 0), in arrival order.
    pub fn delivered(&self) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.errcode == 0 && c.http_status == 200)
            .filter_map(|c| match c.api {
                Api::InvokeCloudFunction => c.body.get("notice").cloned(),
                Api::SubscribeSend => Some(c.body),
                _ => None,
            })
            .collect()
    }

    /// Adds `n` credits (a negative `n` takes some away, never below 0) for
    /// the recipient (an openid, or the user id of a notice without one) and
    /// the template, as `n` taps of "allow" would.
    pub fn grant(&self, openid_or_user: &str, template_id: &str, n: i64) {
        self.state.grant(openid_or_user, template_id, n);
    }

    /// The credits left for the recipient and template (0 if never granted).
    pub fn credits(&self, openid_or_user: &str, template_id: &str) -> i64 {
        let key = (openid_or_user.to_string(), template_id.to_string());
        self.state.lock().credits.get(&key).copied().unwrap_or(0)
    }

    /// Notice calls (accepted or not), excluding probes.
    pub fn notice_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c.api, Api::InvokeCloudFunction | Api::SubscribeSend))
            .filter(|c| c.body.get("type").and_then(Value::as_str) != Some(PROBE_TYPE))
            .collect()
    }
}

impl SimState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn elapsed_ms(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64() * 1000.0
    }

    /// The first matching fault, consumed once. A probe meets neither the
    /// faults meant for one assignee nor those meant for notices only.
    fn take_fault(&self, api: Api, user_id: Option<&str>, probe: bool) -> Option<FaultAction> {
        let mut inner = self.lock();
        let i = inner.faults.iter().position(|f| {
            f.api.is_none_or(|a| a == api)
                && f.user_id.as_deref().is_none_or(|u| Some(u) == user_id)
                && f.times != Some(0)
                && !(probe && matches!(f.action, FaultAction::NoticeFunctionErrcode(_)))
        })?;
        let fault = &mut inner.faults[i];
        if let Some(t) = fault.times.as_mut() {
            *t -= 1;
        }
        Some(fault.action.clone())
    }

    fn record(&self, at: Instant, api: Api, body: Value, http_status: u16, errcode: i64) {
        self.record_call(at, api, body, http_status, errcode, None);
    }

    /// As `record`, for a call that carried `token`.
    fn record_call(
        &self,
        at: Instant,
        api: Api,
        body: Value,
        http_status: u16,
        errcode: i64,
        token: Option<&str>,
    ) {
        let at_ms = self.elapsed_ms(at);
        let answered_ms = self.elapsed_ms(Instant::now());
        let events = match (api, http_status, errcode) {
            (Api::InvokeCloudFunction, 200, 0) => body
                .pointer("/notice/event_ids")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
            _ => 0,
        };
        let mut inner = self.lock();
        inner.delivered_events += events;
        inner.calls.push(Call {
            at_ms,
            api,
            body,
            http_status,
            errcode,
            answered_ms,
            token: token.map(str::to_string),
        });
    }

    fn grant(&self, recipient: &str, template_id: &str, n: i64) {
        let mut inner = self.lock();
        let count = inner
            .credits
            .entry((recipient.to_string(), template_id.to_string()))
            .or_insert(0);
        *count = count.saturating_add(n).max(0);
    }

    /// With credits on, takes one credit for `key`: 0 when it had one, else
    /// 43101. Checked and taken under one lock, so two calls racing for the
    /// last credit cannot both have it.
    fn take_credit(&self, key: (String, String)) -> i64 {
        if !self.config.credits {
            return 0;
        }
        let mut inner = self.lock();
        match inner.credits.get_mut(&key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                0
            }
            _ => 43101,
        }
    }

    fn new_token(&self, inner: &mut Inner) -> String {
        inner.serial += 1;
        let token = format!("SIMTOKEN{:04}x{:016x}", inner.serial, fastrand::u64(..));
        inner.tokens.insert(
            token.clone(),
            Token {
                expires: expiry(self.config.token_ttl),
            },
        );
        token
    }

    /// 0 when the token is good, else WeChat's errcode for it.
    fn check_token(&self, token: Option<&str>) -> i64 {
        let inner = self.lock();
        match token.and_then(|t| inner.tokens.get(t)) {
            None if token.is_none_or(str::is_empty) => 41001,
            None => 40001,
            Some(t) if t.expires <= Instant::now() => 42001,
            Some(_) => 0,
        }
    }
}

/// A token lifetime the clock can hold: a huge `token_ttl` (to test a
/// client against a hostile `expires_in`) lives a century here.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn expiry(ttl: u64) -> Instant {
    Instant::now() + Duration::from_secs(ttl).min(CENTURY)
}

/// What a token's `expires_in` says: the time left, or the configured
/// lifetime itself when it is longer than the clock can hold.
fn expires_in(config: &SimConfig, remaining: Duration) -> u64 {
    if Duration::from_secs(config.token_ttl) > CENTURY {
        config.token_ttl
    } else {
        remaining.as_secs().max(1)
    }
}

/// Counts a notice call as in flight until it is answered or abandoned.
struct InFlight<'a>(&'a SimState, Option<String>);

impl<'a> InFlight<'a> {
    fn enter(s: &'a SimState, user: Option<String>) -> Self {
        let mut inner = s.lock();
        inner.in_flight += 1;
        inner.peak_in_flight = inner.peak_in_flight.max(inner.in_flight);
        if let Some(u) = &user {
            let n = inner.in_flight_by_user.entry(u.clone()).or_default();
            *n += 1;
            if *n > 1 {
                inner.overlaps += 1;
            }
        }
        drop(inner);
        InFlight(s, user)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.in_flight -= 1;
        if let Some(u) = &self.1 {
            if let Some(n) = inner.in_flight_by_user.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    inner.in_flight_by_user.remove(u);
                }
            }
        }
    }
}

fn wechat_error(code: i64, msg: &str) -> Response {
    Json(json!({ "errcode": code, "errmsg": msg })).into_response()
}

/// Applies a fault that short-circuits the call; `Ok(())` to answer normally.
async fn apply_fault(
    action: Option<FaultAction>,
    function: bool,
) -> Result<Option<i64>, (u16, i64, Response)> {
    match action {
        None => Ok(None),
        Some(FaultAction::DelayMs(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(None)
        }
        Some(FaultAction::Http(status)) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (code, "simulated failure").into_response();
            if code.is_redirection() {
                // Somewhere else on this server, which answers 404 if followed.
                response.headers_mut().insert(
                    axum::http::header::LOCATION,
                    axum::http::HeaderValue::from_static("/redirected"),
                );
            }
            Err((status, -1, response))
        }
        Some(FaultAction::Errcode(code)) => {
            Err((200, code, wechat_error(code, "simulated errcode")))
        }
        Some(FaultAction::FunctionErrcode(code) | FaultAction::NoticeFunctionErrcode(code))
            if function =>
        {
            Ok(Some(code))
        }
        Some(FaultAction::FunctionErrcode(code) | FaultAction::NoticeFunctionErrcode(code)) => {
            Err((200, code, wechat_error(code, "simulated errcode")))
        }
        Some(FaultAction::Body(body)) => {
            let kind = if body.trim_start().starts_with('<') {
                "text/html"
            } else {
                "application/json"
            };
            let resp = ([(axum::http::header::CONTENT_TYPE, kind)], body).into_response();
            // Recorded as errcode -2: no WeChat errcode in the answer.
            Err((200, -2, resp))
        }
    }
}

#[derive(Deserialize)]
struct StableTokenBody {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    force_refresh: bool,
}

async fn stable_token(
    State(s): State<Arc<SimState>>,
    body: Option<Json<StableTokenBody>>,
) -> Response {
    let at = Instant::now();
    let recorded = json!({ "force_refresh": body.as_ref().map(|b| b.force_refresh) });
    if let Err((status, code, resp)) =
        apply_fault(s.take_fault(Api::StableToken, None, false), false).await
    {
        s.record(at, Api::StableToken, recorded, status, code);
        return resp;
    }
    let Some(Json(b)) = body else {
        s.record(at, Api::StableToken, recorded, 200, 47001);
        return wechat_error(47001, "data format error");
    };
    let code = if b.grant_type.as_deref() != Some("client_credential") {
        40002
    } else if b.appid.as_deref() != Some(s.config.appid.as_str()) {
        40013
    } else if b.secret.as_deref() != Some(s.config.secret.as_str()) {
        40125
    } else {
        0
    };
    if code != 0 {
        s.record(at, Api::StableToken, recorded, 200, code);
        return wechat_error(code, "invalid credential");
    }
    let (token, remaining) = {
        let mut inner = s.lock();
        let current = inner.stable.clone().filter(|t| {
            inner
                .tokens
                .get(t)
                .is_some_and(|x| x.expires > Instant::now())
        });
        let token = match current {
            Some(t) if !b.force_refresh => t,
            _ => {
                let t = s.new_token(&mut inner);
                inner.stable = Some(t.clone());
                t
            }
        };
        let remaining = inner.tokens[&token]
            .expires
            .saturating_duration_since(Instant::now());
        (token, remaining)
    };
    s.record(at, Api::StableToken, recorded, 200, 0);
    Json(json!({ "access_token": token, "expires_in": expires_in(&s.config, remaining) }))
        .into_response()
}

async fn classic_token(
    State(s): State<Arc<SimState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let at = Instant::now();
    if let Err((status, code, resp)) =
        apply_fault(s.take_fault(Api::Token, None, false), false).await
    {
        s.record(at, Api::Token, json!({}), status, code);
        return resp;
    }
    let code = if q.get("grant_type").map(String::as_str) != Some("client_credential") {
        40002
    } else if q.get("appid") != Some(&s.config.appid) {
        40013
    } else if q.get("secret") != Some(&s.config.secret) {
        40125
    } else {
        0
    };
    if code != 0 {
        s.record(at, Api::Token, json!({}), 200, code);
        return wechat_error(code, "invalid credential");
    }
    let token = s.new_token(&mut s.lock());
    s.record(at, Api::Token, json!({}), 200, 0);
    Json(json!({ "access_token": token, "expires_in": s.config.token_ttl })).into_response()
}

async fn invoke(
    State(s): State<Arc<SimState>>,
    Query(q): Query<HashMap<String, String>>,
    body: Option<Json<Value>>,
) -> Response {
    let at = Instant::now();
    let body = body.map(|Json(v)| v).unwrap_or(Value::Null);
    let probe = body.get("type").and_then(Value::as_str) == Some(PROBE_TYPE);
    let user_id = body
        .pointer("/notice/assignee/user_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let token = q.get("access_token").map(String::as_str);
    let token_code = s.check_token(token);
    if token_code != 0 {
        s.record_call(at, Api::InvokeCloudFunction, body, 200, token_code, token);
        return wechat_error(token_code, "access_token invalid");
    }
    if q.get("env") != Some(&s.config.cloud_env) {
        s.record_call(at, Api::InvokeCloudFunction, body, 200, -501005, token);
        return wechat_error(-501005, "env not found");
    }
    if q.get("name") != Some(&s.config.cloud_function) {
        s.record_call(at, Api::InvokeCloudFunction, body, 200, -501000, token);
        return wechat_error(-501000, "function not found");
    }
    let fault = s.take_fault(Api::InvokeCloudFunction, user_id.as_deref(), probe);
    let applied = {
        let _held = InFlight::enter(&s, user_id.clone());
        apply_fault(fault, true).await
    };
    let function_code = match applied {
        Ok(code) => code,
        Err((status, code, resp)) => {
            s.record_call(at, Api::InvokeCloudFunction, body, status, code, token);
            return resp;
        }
    };
    let function_code = match (probe, function_code) {
        (true, None) => 0,
        (true, Some(c)) => c,
        (false, Some(c)) => c,
        (false, None) if body.get("type").and_then(Value::as_str) != Some(NOTICE_TYPE) => -1,
        (false, None) => 0,
    };
    let function_code = match (probe, function_code) {
        (false, 0) => s.take_credit(credit_key(Api::InvokeCloudFunction, &body)),
        _ => function_code,
    };
    s.record_call(
        at,
        Api::InvokeCloudFunction,
        body,
        200,
        function_code,
        token,
    );
    let resp_data = json!({ "errcode": function_code, "errmsg": if function_code == 0 { "ok" } else { "simulated" } });
    Json(json!({ "errcode": 0, "errmsg": "ok", "resp_data": resp_data.to_string() }))
        .into_response()
}

/// Whose credit a notice call spends: (recipient, template id). The recipient
/// is the openid (the cloud-function notice's `assignee.openid`, the direct
/// mode's `touser`), else the notice's `assignee.user_id`; the template is the
/// direct mode's `template_id`, or the cloud-function notice's (`""` without).
fn credit_key(api: Api, body: &Value) -> (String, String) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    match api {
        Api::SubscribeSend => (text(body.get("touser")), text(body.get("template_id"))),
        _ => {
            let notice = body.get("notice").unwrap_or(&Value::Null);
            let recipient = notice
                .pointer("/assignee/openid")
                .and_then(Value::as_str)
                .or_else(|| notice.pointer("/assignee/user_id").and_then(Value::as_str));
            (
                recipient.unwrap_or("").to_string(),
                text(notice.get("template_id")),
            )
        }
    }
}

/// WeChat's body rules for subscribe/send: 47003 for a bad value, 40003 for a bad openid.
fn check_subscribe_body(body: &Value) -> i64 {
    let openid = body.get("touser").and_then(Value::as_str).unwrap_or("");
    if !openid.starts_with('o') || openid.len() < 2 {
        return 40003;
    }
    if body
        .get("template_id")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return 40037;
    }
    let Some(data) = body.get("data").and_then(Value::as_object) else {
        return 47003;
    };
    if data.is_empty() {
        return 47003;
    }
    for (key, v) in data {
        let Some(value) = v.get("value").and_then(Value::as_str) else {
            return 47003;
        };
        let Some((kind, limit)) = keyword_type(key) else {
            return 47003;
        };
        if value.is_empty() || limit.is_some_and(|l| value.chars().count() > l) {
            return 47003;
        }
        let ok = match kind {
            "number" => value.chars().all(|c| c.is_ascii_digit() || c == '.'),
            "time" => chrono::NaiveDateTime::parse_from_str(value, "%Y-%m-%d %H:%M").is_ok(),
            _ => true,
        };
        if !ok {
            return 47003;
        }
    }
    0
}

async fn subscribe_send(
    State(s): State<Arc<SimState>>,
    Query(q): Query<HashMap<String, String>>,
    body: Option<Json<Value>>,
) -> Response {
    let at = Instant::now();
    let body = body.map(|Json(v)| v).unwrap_or(Value::Null);
    let token = q.get("access_token").map(String::as_str);
    let token_code = s.check_token(token);
    if token_code != 0 {
        s.record_call(at, Api::SubscribeSend, body, 200, token_code, token);
        return wechat_error(token_code, "access_token invalid");
    }
    let openid = body
        .get("touser")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Err((status, code, resp)) = apply_fault(
        s.take_fault(Api::SubscribeSend, openid.as_deref(), false),
        false,
    )
    .await
    {
        s.record_call(at, Api::SubscribeSend, body, status, code, token);
        return resp;
    }
    let code = match check_subscribe_body(&body) {
        0 => s.take_credit(credit_key(Api::SubscribeSend, &body)),
        refused => refused,
    };
    s.record_call(at, Api::SubscribeSend, body, 200, code, token);
    wechat_error(code, if code == 0 { "ok" } else { "argument invalid" })
}

async fn control_faults(State(s): State<Arc<SimState>>, Json(fault): Json<Fault>) -> StatusCode {
    s.lock().faults.push(fault);
    StatusCode::NO_CONTENT
}

async fn control_clear(State(s): State<Arc<SimState>>) -> StatusCode {
    s.lock().faults.clear();
    StatusCode::NO_CONTENT
}

async fn control_calls(State(s): State<Arc<SimState>>) -> Json<Vec<Call>> {
    Json(s.lock().calls.clone())
}

async fn control_expire(State(s): State<Arc<SimState>>) -> StatusCode {
    let now = Instant::now();
    for t in s.lock().tokens.values_mut() {
        t.expires = now;
    }
    StatusCode::NO_CONTENT
}

/// `POST /sim/credits`: `{"openid": "o…", "template_id": "…", "count": N}`
/// (or `user_id` instead of `openid`, for a notice without one).
#[derive(Deserialize)]
struct Grant {
    openid: Option<String>,
    user_id: Option<String>,
    #[serde(default)]
    template_id: String,
    count: i64,
}

/// One line of `GET /sim/credits`.
#[derive(Serialize)]
struct CreditLine {
    /// The openid, or the user id of notices that carry none.
    recipient: String,
    template_id: String,
    count: i64,
}

async fn control_grant(
    State(s): State<Arc<SimState>>,
    Json(g): Json<Grant>,
) -> Result<StatusCode, (StatusCode, &'static str)> {
    let Some(recipient) = g.openid.or(g.user_id).filter(|r| !r.is_empty()) else {
        return Err((StatusCode::BAD_REQUEST, "openid or user_id is required\n"));
    };
    s.grant(&recipient, &g.template_id, g.count);
    Ok(StatusCode::NO_CONTENT)
}

async fn control_credits(State(s): State<Arc<SimState>>) -> Json<Vec<CreditLine>> {
    let mut lines: Vec<CreditLine> = s
        .lock()
        .credits
        .iter()
        .map(|((recipient, template_id), count)| CreditLine {
            recipient: recipient.clone(),
            template_id: template_id.clone(),
            count: *count,
        })
        .collect();
    lines.sort_by(|a, b| (&a.recipient, &a.template_id).cmp(&(&b.recipient, &b.template_id)));
    Json(lines)
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/cgi-bin/stable_token", post(stable_token))
        .route("/cgi-bin/token", get(classic_token))
        .route("/tcb/invokecloudfunction", post(invoke))
        .route("/cgi-bin/message/subscribe/send", post(subscribe_send))
        .route("/sim/faults", post(control_faults).delete(control_clear))
        .route("/sim/calls", get(control_calls))
        .route("/sim/expire-tokens", post(control_expire))
        .route("/sim/credits", post(control_grant).get(control_credits))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}
