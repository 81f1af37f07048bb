//! The `dlq` subcommand: list the dead-letter queue, replay chosen messages into
//! the work queue, or purge them. Messages are taken unacked on one channel;
//! those not chosen return to the queue when the channel closes, and a replayed
//! message leaves the dead-letter queue only after its copy is confirmed.

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::ShortString;
use lapin::BasicProperties;
use serde::Serialize;

use crate::broker::{self, header_int, header_str, headers, BrokerError};
use crate::settings::Settings;

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub event_id: Option<String>,
}

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub reason: String,
    pub errcode: Option<i64>,
    pub attempts: Option<i64>,
    pub event_id: Option<String>,
    pub age_seconds: Option<i64>,
    pub detail: Option<String>,
}

fn row(body: &[u8], props: &BasicProperties) -> Row {
    let event_id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("event_id")
                .and_then(|e| e.as_str())
                .map(str::to_string)
        })
        .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_string()));
    let age_seconds = header_str(props, headers::FIRST_FAILED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| Utc::now().signed_duration_since(t).num_seconds());
    Row {
        // The broker's own dead-lettering (delivery limit) adds no x-notifier-* headers.
        reason: header_str(props, headers::REASON).unwrap_or_else(|| "delivery_limit".into()),
        errcode: header_int(props, headers::ERRCODE),
        attempts: header_int(props, headers::ATTEMPTS),
        event_id,
        age_seconds,
        detail: header_str(props, headers::DETAIL),
    }
}

impl Filter {
    fn matches(&self, r: &Row) -> bool {
        self.reason.as_ref().is_none_or(|x| *x == r.reason)
            && self
                .event_id
                .as_ref()
                .is_none_or(|x| Some(x) == r.event_id.as_ref())
    }
}

/// What to do with the chosen messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    List,
    Replay,
    Purge,
}

/// Runs one action over the dead-letter queue; returns the rows it acted on.
///
/// # Errors
/// The broker failed; nothing not yet confirmed has left the queue.
pub async fn run(
    settings: &Settings,
    action: Action,
    filter: &Filter,
) -> Result<Vec<Row>, BrokerError> {
    let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-dlq").await?;
    let channel = broker::confirm_channel(&conn).await?;
    let mut rows = Vec::new();
    while let Some(msg) = channel
        .basic_get(
            settings.dead_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await?
    {
        let d = msg.delivery;
        let r = row(&d.data, &d.properties);
        if !filter.matches(&r) {
            continue; // stays unacked; returns to the queue when the channel closes
        }
        match action {
            Action::List => {}
            Action::Replay => {
                let props = without_notifier_headers(&d.properties);
                broker::publish_confirmed(&channel, "", &settings.queue, &d.data, props).await?;
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            Action::Purge => {
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        rows.push(r);
    }
    let _ = channel.close(200, "dlq done".into()).await;
    let _ = conn.close(200, "dlq done".into()).await;
    Ok(rows)
}

/// A replayed message starts afresh: attempts and reasons are dropped.
fn without_notifier_headers(props: &BasicProperties) -> BasicProperties {
    let mut table = lapin::types::FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            if !k.as_str().starts_with("x-notifier-")
                && !k.as_str().starts_with("x-death")
                && !k.as_str().starts_with("x-first-death")
                && !k.as_str().starts_with("x-last-death")
            {
                table.insert(ShortString::from(k.as_str()), v.clone());
            }
        }
    }
    props.clone().with_headers(table)
}

/// The rows as a table.
pub fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<18} {:>8} {:>8} {:>9}  {}\n",
        "reason", "errcode", "attempts", "age", "event_id"
    );
    for r in rows {
        let dash = || "-".to_string();
        out.push_str(&format!(
            "{:<18} {:>8} {:>8} {:>9}  {}\n",
            r.reason,
            r.errcode.map(|c| c.to_string()).unwrap_or_else(dash),
            r.attempts.map(|c| c.to_string()).unwrap_or_else(dash),
            r.age_seconds.map(|s| format!("{s}s")).unwrap_or_else(dash),
            r.event_id.clone().unwrap_or_else(dash),
        ));
    }
    out.push_str(&format!("{} message(s)\n", rows.len()));
    out
}
