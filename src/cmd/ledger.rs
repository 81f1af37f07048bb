//! `ledger held` and `ledger show USER_ID` (contract section 8.7): what the
//! grant ledger holds, read-only, for operators. Reads the broker's and the
//! ledger's settings only (`Needs::Ledger`): no WeChat secret on an operator's
//! machine, and no `WECHAT_TEMPLATE_ID` needed (every template is shown).
//!
//! This file owns the command's shape and its output; the ledger's store
//! fills the views below (`HeldUser`, `UserView`). Customer names are
//! personal data: `show` prints them only with `--names`, and `held` never.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use crate::cli::LedgerCommand;
use crate::event;
use crate::ledger::Store;
use crate::settings::{LedgerSettings, Needs};
use crate::telemetry;

/// The line (exit code 1) when `NOTIFIER_LEDGER_URL` is not set.
pub const NOT_CONFIGURED: &str = "the ledger is not configured (NOTIFIER_LEDGER_URL)";

/// The `ledger` subcommand.
pub async fn main(cmd: LedgerCommand) -> ExitCode {
    let settings = match super::settings(Needs::Ledger) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "warn");
    let Some(ledger) = settings.ledger.as_ref() else {
        return super::fail(NOT_CONFIGURED);
    };
    read(ledger, cmd).await
}

/// Reads the ledger for `cmd` and prints the answer (read-only: the
/// schema is not migrated here; a ledger no replica has created yet is
/// reported, not created).
async fn read(ledger: &LedgerSettings, cmd: LedgerCommand) -> ExitCode {
    let unreadable = |e: crate::ledger::LedgerError| {
        super::fail(format!(
            "cannot read the ledger at {} (schema {}): {e}",
            ledger.redacted_url(),
            ledger.schema
        ))
    };
    let store = match Store::connect(ledger, None) {
        Ok(s) => s,
        Err(e) => return unreadable(e),
    };
    let now = Utc::now();
    match cmd {
        LedgerCommand::Held { limit, json } => {
            let users = match store.held_users(limit as i64).await {
                Ok(u) => u,
                Err(e) => return unreadable(e),
            };
            let users: Vec<HeldUser> = users
                .into_iter()
                .map(|u| HeldUser {
                    reason: HoldReason::named(&u.reason),
                    user_id: u.user_id,
                    template_id: u.template_id,
                    held_events: u.held,
                    oldest_held_at: u.oldest,
                })
                .collect();
            print!("{}", render_held(&users, json, now));
        }
        LedgerCommand::Show {
            user_id,
            json,
            names,
        } => {
            let (credits, openid) = match store.credits_of(&user_id).await {
                Ok(c) => c,
                Err(e) => return unreadable(e),
            };
            let held = match store.held_of(&user_id).await {
                Ok(h) => h,
                Err(e) => return unreadable(e),
            };
            let view = UserView {
                user_id,
                openid,
                credits: credits
                    .into_iter()
                    .map(|(template_id, c)| CreditView {
                        template_id,
                        credits: c.count.max(0) as u32,
                        exact: c.exact,
                    })
                    .collect(),
                held: held
                    .into_iter()
                    .map(|(_, r)| HeldEventView {
                        event_id: r.event_id,
                        held_at: r.held_at,
                        reason: HoldReason::named(&r.reason),
                        claimed_by: r.claimed_by,
                        body: r.body,
                    })
                    .collect(),
            };
            print!("{}", render_show(&view, json, names, now));
        }
    }
    ExitCode::SUCCESS
}

/// Why a user's events wait (the `reason` the ledger records with a hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// WeChat answered 43101, or the ledger knows an exact 0.
    NoCredit,
    /// Direct mode: no openid in the events and none known for the user.
    NoOpenid,
}

impl HoldReason {
    /// The reason as the ledger records it (anything but `no_openid` is a credit).
    pub fn named(word: &str) -> HoldReason {
        if word == "no_openid" {
            HoldReason::NoOpenid
        } else {
            HoldReason::NoCredit
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::NoCredit => "no_credit",
            HoldReason::NoOpenid => "no_openid",
        }
    }
}

/// One line of `ledger held`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldUser {
    pub user_id: String,
    pub template_id: String,
    pub held_events: u64,
    pub oldest_held_at: DateTime<Utc>,
    pub reason: HoldReason,
}

/// One template's credits for a user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreditView {
    pub template_id: String,
    pub credits: u32,
    /// `false`: the count is a lower bound (accepts counted since the ledger
    /// started; the user may hold more from before).
    pub exact: bool,
}

/// One held event: the original body as the CRM published it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldEventView {
    pub event_id: String,
    pub held_at: DateTime<Utc>,
    pub reason: HoldReason,
    /// The notice that claimed it for a call whose outcome is not known yet.
    pub claimed_by: Option<String>,
    pub body: Vec<u8>,
}

/// What `ledger show USER_ID` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct UserView {
    pub user_id: String,
    pub openid: Option<String>,
    pub credits: Vec<CreditView>,
    pub held: Vec<HeldEventView>,
}

/// `ledger held`: a table, or a JSON array.
pub fn render_held(users: &[HeldUser], as_json: bool, now: DateTime<Utc>) -> String {
    if as_json {
        let lines: Vec<_> = users
            .iter()
            .map(|u| {
                json!({
                    "user_id": u.user_id,
                    "template_id": u.template_id,
                    "held_events": u.held_events,
                    "oldest_held_at": u.oldest_held_at.to_rfc3339(),
                    "reason": u.reason.as_str(),
                })
            })
            .collect();
        return serde_json::to_string_pretty(&lines).expect("serialises") + "\n";
    }
    if users.is_empty() {
        return "no user has held events\n".into();
    }
    let mut out = format!(
        "{:<24} {:<24} {:>7} {:>12}  {}\n",
        "user", "template", "events", "oldest", "reason"
    );
    for u in users {
        out.push_str(&format!(
            "{:<24} {:<24} {:>7} {:>12}  {}\n",
            u.user_id,
            u.template_id,
            u.held_events,
            format!("{} ago", age(now - u.oldest_held_at)),
            u.reason.as_str()
        ));
    }
    out
}

/// `ledger show`: text, or a JSON object; customer names only with `names`.
pub fn render_show(user: &UserView, as_json: bool, names: bool, now: DateTime<Utc>) -> String {
    // The customer of a held event, read from its body (held bodies passed
    // the parser when they arrived; a body that no longer does shows none).
    let customer = |e: &HeldEventView| {
        event::parse(&e.body)
            .ok()
            .map(|a| (a.customer.id, a.customer.name))
    };
    if as_json {
        let held: Vec<_> = user
            .held
            .iter()
            .map(|e| {
                let mut v = json!({
                    "event_id": e.event_id,
                    "held_at": e.held_at.to_rfc3339(),
                    "reason": e.reason.as_str(),
                    "claimed_by": e.claimed_by,
                });
                if let Some((id, name)) = customer(e) {
                    v["customer_id"] = json!(id);
                    if names {
                        v["customer_name"] = json!(name);
                    }
                }
                v
            })
            .collect();
        let v = json!({
            "user_id": user.user_id,
            "openid": user.openid,
            "credits": user.credits,
            "held": held,
        });
        return serde_json::to_string_pretty(&v).expect("serialises") + "\n";
    }
    let mut out = format!(
        "user {}\nopenid {}\n",
        user.user_id,
        user.openid.as_deref().unwrap_or("(none known)")
    );
    if user.credits.is_empty() {
        out.push_str("credits: none counted\n");
    }
    for c in &user.credits {
        out.push_str(&format!(
            "credits {}: {}{}\n",
            c.template_id,
            if c.exact { "" } else { "at least " },
            c.credits
        ));
    }
    out.push_str(&format!("held events: {}\n", user.held.len()));
    for e in &user.held {
        let (id, name) = customer(e).unwrap_or_default();
        out.push_str(&format!(
            "  {}  {} ago  {}  customer {}{}{}\n",
            e.event_id,
            age(now - e.held_at),
            e.reason.as_str(),
            id,
            if names && !name.is_empty() {
                format!(" {name}")
            } else {
                String::new()
            },
            e.claimed_by
                .as_deref()
                .map(|n| format!("  (claimed by notice {n})"))
                .unwrap_or_default()
        ));
    }
    out
}

/// A coarse age: `42s`, `17m`, `5h`, `3d`.
fn age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn user() -> UserView {
        let body = r#"{"event_id":"e-1","event_type":"customer.assigned","occurred_at":"2026-11-25T14:03:27+08:00","source":"web","assignee":{"user_id":"1024"},"customer":{"id":"88231","name":"上海某某贸易有限公司"}}"#.as_bytes();
        UserView {
            user_id: "1024".into(),
            openid: Some("oW1".into()),
            credits: vec![CreditView {
                template_id: "tpl".into(),
                credits: 0,
                exact: true,
            }],
            held: vec![HeldEventView {
                event_id: "e-1".into(),
                held_at: at("2026-12-01T00:00:00Z"),
                reason: HoldReason::NoCredit,
                claimed_by: None,
                body: body.to_vec(),
            }],
        }
    }

    #[test]
    fn show_prints_customer_names_only_when_asked() {
        let now = at("2026-12-03T01:00:00Z");
        for json in [false, true] {
            let plain = render_show(&user(), json, false, now);
            assert!(plain.contains("88231") && plain.contains("e-1"), "{plain}");
            assert!(!plain.contains("上海某某贸易有限公司"), "{plain}");
            let named = render_show(&user(), json, true, now);
            assert!(named.contains("上海某某贸易有限公司"), "{named}");
        }
        let text = render_show(&user(), false, false, now);
        assert!(
            text.contains("credits tpl: 0\n") && text.contains("2d ago"),
            "{text}"
        );
    }

    #[test]
    fn held_lists_each_user_with_its_oldest_and_reason() {
        let now = at("2026-12-03T01:00:00Z");
        let users = vec![HeldUser {
            user_id: "1024".into(),
            template_id: "tpl".into(),
            held_events: 3,
            oldest_held_at: at("2026-12-03T00:00:00Z"),
            reason: HoldReason::NoOpenid,
        }];
        let table = render_held(&users, false, now);
        assert!(table.contains("1024") && table.contains("1h ago") && table.contains("no_openid"));
        let v: serde_json::Value = serde_json::from_str(&render_held(&users, true, now)).unwrap();
        assert_eq!(v[0]["held_events"], 3);
        assert_eq!(v[0]["reason"], "no_openid");
        assert_eq!(render_held(&[], false, now), "no user has held events\n");
    }
}
