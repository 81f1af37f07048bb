//! The access token: fetched once, cached, refreshed ahead of expiry, one fetch
//! in flight at a time; a failed refresh keeps the cached token until it
//! expires, so a token endpoint's hiccup costs no notice. The stable mode (`/cgi-bin/stable_token`) is the default
//! because it returns the same token to every replica and every other service
//! of the appid; the classic `/cgi-bin/token` invalidates the tokens others hold.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;

use super::outcome::{classify, CallResult, Outcome};
use crate::metrics::Metrics;
use crate::settings::{Secret, Settings, TokenMode};

/// A token is kept at most this long, whatever `expires_in` says (WeChat's
/// live 2 hours; a hostile or broken value must not overflow the clock).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A stable token is force-refreshed at most this often (contract section 4).
const FORCE_REFRESH_EVERY: Duration = Duration::from_secs(30);

/// After a failed refresh of a token that is still valid, the next refresh is
/// tried this much later (never past the expiry), not on every call.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct TokenReply {
    access_token: Option<String>,
    expires_in: Option<u64>,
    errcode: Option<i64>,
    errmsg: Option<String>,
}

struct Cached {
    token: Secret,
    /// When a refresh is tried, ahead of `expires_at`.
    refresh_at: Instant,
    /// When WeChat stops taking it (counted from before the fetch).
    expires_at: Instant,
    /// WeChat called it invalid: never used again.
    stale: bool,
}

impl Cached {
    /// Whether the token can still be used at `now` when a refresh failed:
    /// not called invalid, and not expired.
    fn usable_at(&self, now: Instant) -> bool {
        !self.stale && now < self.expires_at
    }
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    last_forced: Option<Instant>,
}

/// Whether a stale stable token may be force-refreshed at `now`, given the
/// last forced refresh (decisions take the clock as an argument: unit-tested).
fn force_refresh_due(last_forced: Option<Instant>, now: Instant) -> bool {
    last_forced.is_none_or(|t| now.duration_since(t) >= FORCE_REFRESH_EVERY)
}

/// Tokens that live less than this are refreshed at half their life.
const SHORT_LIFE: u64 = 60;

/// How long a token that lives `expires_in` seconds is used before a refresh
/// is tried: at 90% of its lifetime and at most 5 minutes early, and a
/// short-lived one (under a minute) at half its life, so a failed refresh
/// still leaves it time to be used (see `TokenProvider::get`); never sooner
/// than a second.
fn use_for(expires_in: u64) -> Duration {
    let used = if expires_in < SHORT_LIFE {
        Duration::from_millis(expires_in * 500)
    } else {
        let ahead = (expires_in / 10).min(300);
        Duration::from_secs(expires_in - ahead)
    };
    used.max(Duration::from_secs(1)).min(MAX_LIFETIME)
}

/// Shared by every call of this replica.
pub struct TokenProvider {
    http: reqwest::Client,
    base: String,
    appid: String,
    secret: Secret,
    mode: TokenMode,
    state: Mutex<State>,
    /// A refresh ahead of expiry is in flight (made outside the lock).
    refreshing: AtomicBool,
    /// The newest token fetched, readable without waiting for the lock a
    /// fetch holds (see `cached` and `after_wait`).
    current: std::sync::Mutex<Option<Current>>,
    metrics: Arc<Metrics>,
}

/// The newest token fetched and whether WeChat rejected it. A rejection is
/// recorded here before `invalidate` takes the lock, so a call that waited
/// for its rate slot sees it at once, and `get` never serves the token again
/// even if that `invalidate` was cancelled before it took the lock.
struct Current {
    token: Secret,
    expires_at: Instant,
    rejected: bool,
}

impl Current {
    /// Usable at `now`: not rejected, not expired.
    fn usable(&self, now: Instant) -> Option<&Secret> {
        (!self.rejected && now < self.expires_at).then_some(&self.token)
    }
}

/// Clears the refresh flag however the refresh ends (its task may be aborted).
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl TokenProvider {
    pub fn new(settings: &Settings, http: reqwest::Client, metrics: Arc<Metrics>) -> Self {
        TokenProvider {
            http,
            base: settings.wechat_api_base.clone(),
            appid: settings.appid.clone(),
            secret: settings.appsecret.clone(),
            mode: settings.token_mode,
            state: Mutex::new(State::default()),
            refreshing: AtomicBool::new(false),
            current: std::sync::Mutex::new(None),
            metrics,
        }
    }

    fn mode_label(&self) -> &'static str {
        match self.mode {
            TokenMode::Stable => "stable",
            TokenMode::Classic => "classic",
        }
    }

    /// A valid token, fetched if none is cached or it is due. A refresh ahead
    /// of expiry is made by one caller while the others keep using the cached
    /// token (a slow token endpoint delays no call); when it fails, the cached
    /// token is used until it expires (the refresh is tried again every
    /// `REFRESH_RETRY`). A token WeChat called invalid is never used again:
    /// callers then wait for the one fetch in flight.
    ///
    /// # Errors
    /// The classified failure of the fetch (config fault for a bad secret,
    /// transient for network trouble) when no usable token is cached.
    pub async fn get(&self) -> Result<Secret, CallResult> {
        let mut state = self.state.lock().await;
        let mut now = Instant::now();
        if let Some(c) = state.cached.as_mut() {
            c.stale |= self.was_rejected(&c.token);
        }
        if let Some(c) = &state.cached {
            if !c.stale && now < c.refresh_at {
                return Ok(c.token.clone());
            }
            if c.usable_at(now) {
                // Due for a refresh ahead of expiry: one caller makes it,
                // outside the lock; the others go on with this token.
                if self.refreshing.swap(true, Ordering::SeqCst) {
                    return Ok(c.token.clone());
                }
                let from = c.token.clone();
                drop(state);
                let _refreshing = Refreshing(&self.refreshing);
                let result = self.fetch(false).await;
                state = self.state.lock().await;
                // Meanwhile the token may have been called invalid, or
                // replaced by a caller that could not wait: the refresh's
                // answer replaces only the token it set out to refresh, and
                // never brings back a token called invalid (a stable_token
                // refresh may answer with the same token).
                let (same, stale) = match state.cached.as_ref() {
                    Some(c) => (c.token == from, c.stale || self.was_rejected(&c.token)),
                    None => (false, true),
                };
                let fresh = matches!(&result, Ok((t, _)) if *t != from);
                if same && (!stale || fresh) {
                    return self.keep(&mut state, now, false, result);
                }
                // The refresh's answer is discarded, but it was a fetch: it
                // is counted like any other.
                let outcome = result.as_ref().err().map_or("ok", |e| e.outcome.as_str());
                self.metrics.token_fetch(self.mode_label(), outcome);
                if let Some(c) = state.cached.as_ref().filter(|c| {
                    !same && c.usable_at(Instant::now()) && !self.was_rejected(&c.token)
                }) {
                    return Ok(c.token.clone());
                }
                // No usable token: this caller waits for a fetch of its own,
                // as the others do.
                if let Some(c) = state.cached.as_mut() {
                    c.stale |= self.was_rejected(&c.token);
                }
                now = Instant::now();
            }
        }
        let force = self.mode == TokenMode::Stable
            && state.cached.as_ref().is_some_and(|c| c.stale)
            && force_refresh_due(state.last_forced, now);
        let result = self.fetch(force).await;
        self.keep(&mut state, now, force, result)
    }

    /// The token for a call that took `taken` before waiting for its rate
    /// slot, without waiting for a fetch: the newest token if it is usable;
    /// else `taken` only while it is still the newest token fetched and
    /// WeChat has not rejected it (past the expiry our clock gives it, as a
    /// token that lives 0 s is); `None`: the call must take a token again.
    ///
    /// A token that was replaced is never sent once the newest one is not
    /// usable: whether it was rejected before the newest one was fetched is
    /// not remembered, and a rejection of the newest one means WeChat took
    /// the older ones back too (a forced refresh elsewhere, an expiry).
    pub fn after_wait(&self, taken: &Secret) -> Option<Secret> {
        let current = self.current.lock().expect("not poisoned");
        let c = current.as_ref()?;
        match c.usable(Instant::now()) {
            Some(token) => Some(token.clone()),
            None => (!c.rejected && c.token == *taken).then(|| taken.clone()),
        }
    }

    /// Whether WeChat rejected `token` while it was the newest one.
    fn was_rejected(&self, token: &Secret) -> bool {
        let current = self.current.lock().expect("not poisoned");
        current
            .as_ref()
            .is_some_and(|c| c.rejected && c.token == *token)
    }

    /// Caches a fetched token; after a failed fetch, falls back to the cached
    /// token while it is usable. `asked` is when the fetch started.
    fn keep(
        &self,
        state: &mut State,
        asked: Instant,
        force: bool,
        result: Result<(Secret, u64), CallResult>,
    ) -> Result<Secret, CallResult> {
        match &result {
            Ok((token, expires_in)) => {
                if force {
                    state.last_forced = Some(asked);
                }
                state.cached = Some(Cached {
                    token: token.clone(),
                    refresh_at: asked + use_for(*expires_in),
                    expires_at: asked + Duration::from_secs(*expires_in).min(MAX_LIFETIME),
                    stale: false,
                });
                // Fetched after any rejection recorded so far: the endpoint
                // vouches for it again (stable_token may answer the same one).
                *self.current.lock().expect("not poisoned") = Some(Current {
                    token: token.clone(),
                    expires_at: asked + Duration::from_secs(*expires_in).min(MAX_LIFETIME),
                    rejected: false,
                });
                self.metrics.token_fetch(self.mode_label(), "ok");
            }
            Err(e) => {
                self.metrics
                    .token_fetch(self.mode_label(), e.outcome.as_str());
                let after = Instant::now();
                if let Some(c) = state.cached.as_mut().filter(|c| c.usable_at(after)) {
                    c.refresh_at = (after + REFRESH_RETRY).min(c.expires_at);
                    warn!(
                        detail = %e.detail,
                        expires_in_ms = c.expires_at.duration_since(after).as_millis() as u64,
                        "token refresh failed; the cached token is used until it expires"
                    );
                    return Ok(c.token.clone());
                }
            }
        }
        result.map(|(t, _)| t)
    }

    /// WeChat said `token` is no longer valid: the next `get` fetches again.
    /// A token that was already replaced is left alone.
    pub async fn invalidate(&self, token: &Secret) {
        // At once, even while a fetch holds the lock: no call takes it now.
        // Only the newest token: a late answer for a replaced one changes
        // nothing (a replaced token is never sent again once the newest is
        // rejected, see `after_wait`).
        if let Some(c) = self
            .current
            .lock()
            .expect("not poisoned")
            .as_mut()
            .filter(|c| c.token == *token)
        {
            c.rejected = true;
        }
        let mut state = self.state.lock().await;
        if let Some(c) = state.cached.as_mut() {
            if &c.token == token {
                c.stale = true;
            }
        }
    }

    async fn fetch(&self, force: bool) -> Result<(Secret, u64), CallResult> {
        let request = match self.mode {
            TokenMode::Stable => self
                .http
                .post(format!("{}/cgi-bin/stable_token", self.base))
                .json(&serde_json::json!({
                    "grant_type": "client_credential",
                    "appid": self.appid,
                    "secret": self.secret.expose(),
                    "force_refresh": force,
                })),
            TokenMode::Classic => self
                .http
                .get(format!("{}/cgi-bin/token", self.base))
                .query(&[
                    ("grant_type", "client_credential"),
                    ("appid", self.appid.as_str()),
                    ("secret", self.secret.expose()),
                ]),
        };
        let response = request.send().await.map_err(|e| {
            CallResult::transient(format!("token request failed: {}", e.without_url()))
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(CallResult::transient(format!(
                "token request answered HTTP {status}"
            )));
        }
        let reply: TokenReply = response.json().await.map_err(|e| {
            CallResult::transient(format!("token reply unreadable: {}", e.without_url()))
        })?;
        token_result(reply)
    }
}

/// What a token reply means. WeChat answers a token request without an
/// errcode when it succeeds, so the proof of success is the token itself: a
/// reply with neither a token nor a refusal (`{}`, `{"errcode":0}`) is never
/// a success, it is transient.
fn token_result(reply: TokenReply) -> Result<(Secret, u64), CallResult> {
    match (reply.errcode, reply.access_token) {
        (Some(code), _) if code != 0 => {
            let mut result = CallResult::from_errcode(code, reply.errmsg.as_deref().unwrap_or(""));
            result.detail = format!("token fetch: {}", result.detail);
            // A token fetch that is refused for a token reason is not fixed by another token.
            if classify(code) == Outcome::TokenInvalid {
                result.outcome = Outcome::Transient;
            }
            Err(result)
        }
        (_, Some(token)) if !token.is_empty() => {
            Ok((Secret::new(token), reply.expires_in.unwrap_or(7200)))
        }
        _ => Err(CallResult::transient("token reply without access_token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(json: &str) -> Result<(Secret, u64), CallResult> {
        token_result(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn only_a_token_proves_a_token_reply_a_missing_errcode_does_not() {
        let (token, ttl) = reply(r#"{"access_token":"T","expires_in":7200}"#).unwrap();
        assert_eq!((token.expose(), ttl), ("T", 7200));
        for body in [
            r#"{}"#,
            r#"{"errcode":0,"errmsg":"ok"}"#,
            r#"{"access_token":""}"#,
        ] {
            let e = reply(body).unwrap_err();
            assert_eq!(e.outcome, Outcome::Transient, "{body}");
        }
        let refused = reply(r#"{"errcode":40125,"errmsg":"invalid appsecret"}"#).unwrap_err();
        assert_eq!(refused.outcome, Outcome::ConfigFault);
        let token_reason = reply(r#"{"errcode":40001,"access_token":"T"}"#).unwrap_err();
        assert_eq!(token_reason.outcome, Outcome::Transient);
    }

    #[test]
    fn a_huge_expires_in_never_overflows_the_clock() {
        assert_eq!(use_for(1 << 62), MAX_LIFETIME);
        assert_eq!(use_for(u64::MAX), MAX_LIFETIME);
        let _ = tokio::time::Instant::now() + use_for(u64::MAX);
    }

    #[test]
    fn a_stable_token_is_force_refreshed_at_most_once_per_30s() {
        let t0 = Instant::now();
        assert!(force_refresh_due(None, t0), "never forced yet");
        assert!(!force_refresh_due(Some(t0), t0));
        assert!(!force_refresh_due(
            Some(t0),
            t0 + Duration::from_millis(29_999)
        ));
        assert!(force_refresh_due(Some(t0), t0 + Duration::from_secs(30)));
        assert!(force_refresh_due(Some(t0), t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn a_token_is_usable_until_it_expires_unless_wechat_called_it_invalid() {
        let t0 = Instant::now();
        let mut c = Cached {
            token: Secret::new("T"),
            refresh_at: t0 + Duration::from_secs(10),
            expires_at: t0 + Duration::from_secs(20),
            stale: false,
        };
        assert!(c.usable_at(t0 + Duration::from_secs(15)), "past refresh_at");
        assert!(!c.usable_at(t0 + Duration::from_secs(20)), "expired");
        c.stale = true;
        assert!(!c.usable_at(t0 + Duration::from_secs(15)), "called invalid");
    }

    #[test]
    fn tokens_are_refreshed_ahead_of_expiry() {
        // WeChat's usual 7200 s: five minutes early (the cap).
        assert_eq!(use_for(7200), Duration::from_secs(6900));
        // Shorter lives: at 90%.
        assert_eq!(use_for(1000), Duration::from_secs(900));
        assert_eq!(use_for(60), Duration::from_secs(54));
        // Under a minute: at half the life, never for less than a second.
        assert_eq!(use_for(59), Duration::from_millis(29_500));
        assert_eq!(use_for(20), Duration::from_secs(10));
        assert_eq!(use_for(5), Duration::from_millis(2_500));
        assert_eq!(use_for(1), Duration::from_secs(1));
        assert_eq!(use_for(0), Duration::from_secs(1));
    }
}
