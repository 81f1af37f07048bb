//! `dlq`: list, export, replay or purge the dead-letter queue, safely on a
//! queue of any size while the service runs.
//!
//! One pass, bounded twice:
//! - it takes at most the number of messages the queue held when the command
//!   started (read with a passive declare). Everything that enters the queue
//!   after that — new dead letters, a replayed copy that failed again at once,
//!   a message this run put back — lands behind those, so the pass sees each
//!   original message once and never a replayed one;
//! - it holds at most `WINDOW` messages unacked at a time: it consumes with
//!   that prefetch and settles each message as it comes (a chosen one acked
//!   once its action is done — for a replay, once its copy is confirmed —
//!   every other one put back with a nack and requeue).
//!
//! A quorum queue puts a requeued message at its back, so after a `list` the
//! queue holds the same messages, rotated: order in a dead-letter queue means
//! nothing, and `x-notifier-first-failed-at` keeps the time. Deliveries that
//! arrive past the bound (the prefetch window runs ahead) return to the queue,
//! untouched, when the channel closes.
//!
//! A consumer rather than `basic.get`: a get is a round trip per message
//! (about 600 messages/s here, three minutes for 100,000), while acks and
//! nacks on a consumer need none.

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::broker::inspect::{self, Presence};
use crate::broker::{self, header_int, header_str, headers, BrokerError};
use crate::cli::{DlqCommand, DlqFilter};
use crate::reason::Reason;
use crate::settings::{Needs, Settings};
use crate::telemetry;

/// Messages held unacked at once (the memory bound: about this many bodies).
pub const WINDOW: u16 = 200;

/// Replayed copies awaiting their confirm at once (a confirm is a round trip;
/// one at a time would make a replay of 100,000 take minutes).
const IN_FLIGHT: usize = 64;

/// With no delivery for this long, the queue is asked whether any are left
/// (someone else may have emptied it).
const IDLE: Duration = Duration::from_secs(1);

/// Which dead letters an action takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<Reason>,
    pub event_id: Option<String>,
    /// Act on at most this many.
    pub limit: Option<usize>,
}

impl Filter {
    /// The filter the command line asks for.
    ///
    /// # Errors
    /// An unknown reason word: one line listing the valid ones.
    pub fn from_args(args: &DlqFilter) -> Result<Filter, String> {
        let reason = match &args.reason {
            None => None,
            Some(word) => Some(
                word.parse::<Reason>()
                    .map_err(|e| format!("--reason: {e}"))?,
            ),
        };
        Ok(Filter {
            reason,
            event_id: args.event_id.clone(),
            limit: args.limit,
        })
    }

    fn matches(&self, r: &Row) -> bool {
        self.reason.is_none_or(|x| Some(x) == r.known_reason)
            && self
                .event_id
                .as_ref()
                .is_none_or(|x| Some(x) == r.event_id.as_ref())
    }
}

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The header's word (kept raw when a newer version wrote one we do not know).
    pub reason: String,
    #[serde(skip)]
    known_reason: Option<Reason>,
    pub errcode: Option<i64>,
    pub attempts: Option<i64>,
    pub age_seconds: Option<i64>,
    pub assignee: Option<String>,
    pub event_id: Option<String>,
    pub detail: Option<String>,
}

/// Reads what a dead letter says about itself (body best-effort: it may be
/// the invalid event that put it here).
pub fn row(body: &[u8], props: &BasicProperties) -> Row {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let event_id = parsed
        .as_ref()
        .and_then(|v| v.get("event_id").and_then(text))
        .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_string()));
    let assignee = parsed
        .as_ref()
        .and_then(|v| v.get("assignee")?.get("user_id").and_then(text));
    let age_seconds = header_str(props, headers::FIRST_FAILED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| Utc::now().signed_duration_since(t).num_seconds());
    let header = header_str(props, headers::REASON);
    let known_reason = Reason::of_header(header.as_deref());
    Row {
        reason: header.unwrap_or_else(|| Reason::DeliveryLimit.as_str().into()),
        known_reason,
        errcode: header_int(props, headers::ERRCODE),
        attempts: header_int(props, headers::ATTEMPTS),
        age_seconds,
        assignee,
        event_id,
        detail: header_str(props, headers::DETAIL),
    }
}

/// What to do with the chosen messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look; every message goes back.
    List,
    /// Copy into the work queue (confirmed), then remove.
    Replay,
    /// Remove.
    Purge,
}

/// Exact counts of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages in the queue when the command started (the bound).
    pub at_start: u32,
    /// Messages looked at (at most `at_start`).
    pub examined: usize,
    /// Messages the filter chose and the action was carried out on.
    pub chosen: usize,
}

/// Runs `action` over the dead-letter queue; `each` sees every chosen message
/// (before it is settled). Returns exact counts.
///
/// # Errors
/// The broker failed, or the dead-letter queue does not exist. Nothing that
/// was not confirmed elsewhere has left the queue: unsettled messages return
/// to it when the channel closes.
pub async fn run(
    settings: &Settings,
    action: Action,
    filter: &Filter,
    mut each: impl FnMut(&Row, &Delivery) -> std::io::Result<()>,
) -> Result<Counts, DlqError> {
    let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-dlq").await?;
    let at_start = match inspect::queue(&conn, &settings.dead_queue).await? {
        Presence::Present { messages, .. } => messages,
        _ => {
            return Err(DlqError::NoQueue(settings.dead_queue.clone()));
        }
    };
    // Replayed copies are published several at a time, and lapin hands a
    // returned (unroutable) message to whichever confirm completes next: so a
    // replay starts only when the work queue exists, and no copy can come back.
    if action == Action::Replay
        && !matches!(
            inspect::queue(&conn, &settings.queue).await?,
            Presence::Present { .. }
        )
    {
        let _ = conn.close(200, "dlq done".into()).await;
        return Err(DlqError::NoQueue(settings.queue.clone()));
    }
    let mut counts = Counts {
        at_start,
        ..Counts::default()
    };
    let limit = filter.limit.unwrap_or(usize::MAX);
    if at_start == 0 || limit == 0 {
        let _ = conn.close(200, "dlq done".into()).await;
        return Ok(counts);
    }
    let channel = broker::confirm_channel(&conn).await?;
    let result = async {
        channel
            .basic_qos(WINDOW, BasicQosOptions::default())
            .await?;
        let tag = format!("wechat-notifier-dlq-{}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                settings.dead_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Replays whose copy is not confirmed yet: oldest first, each acks its
        // original when its confirm arrives.
        let mut replays = FuturesOrdered::new();
        while counts.examined < at_start as usize && counts.chosen < limit {
            let delivery = match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(Some(d)) => d?,
                Ok(None) => break, // the broker cancelled the consumer
                Err(_) => {
                    // Everything this run holds is settled, so a queue with
                    // nothing ready has nothing more for it.
                    match inspect::queue(&conn, &settings.dead_queue).await? {
                        Presence::Present { messages: 0, .. } | Presence::Missing => break,
                        _ => continue,
                    }
                }
            };
            counts.examined += 1;
            let r = row(&delivery.data, &delivery.properties);
            let chosen = filter.matches(&r);
            if chosen {
                each(&r, &delivery).map_err(DlqError::Output)?;
                counts.chosen += 1;
            }
            if chosen && action == Action::Replay {
                replays.push_back(replay(&channel, settings, delivery));
                if replays.len() >= IN_FLIGHT {
                    if let Some(r) = replays.next().await {
                        r?;
                    }
                }
                while let Some(Some(r)) = replays.next().now_or_never() {
                    r?;
                }
            } else {
                settle(chosen && action == Action::Purge, &delivery).await?;
            }
        }
        while let Some(r) = replays.next().await {
            r?;
        }
        // A round trip after the last settlement: once the broker answers the
        // cancel, it has taken every ack and nack sent before it, so closing
        // the channel returns only the deliveries past the bound.
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await?;
        Ok::<_, DlqError>(())
    }
    .await;
    // Deliveries past the bound, and anything unsettled after an error,
    // return to the queue with the channel.
    let _ = channel.close(200, "dlq done".into()).await;
    let _ = conn.close(200, "dlq done".into()).await;
    result.map(|()| counts)
}

/// Copies a dead letter into the work queue with fresh headers and, once the
/// broker confirmed the copy, acks the original.
async fn replay(channel: &Channel, settings: &Settings, d: Delivery) -> Result<(), BrokerError> {
    let props = without_notifier_headers(&d.properties);
    broker::publish_confirmed(channel, "", &settings.queue, &d.data, props).await?;
    ack(d.acker.ack(BasicAckOptions::default()).await?)
}

/// lapin answers `false` when it could not settle a delivery (its channel is
/// closing or failed): the message is not removed, and the run must not say it was.
fn ack(settled: bool) -> Result<(), BrokerError> {
    if settled {
        Ok(())
    } else {
        Err(BrokerError::Amqp(lapin::Error::from(
            lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closing,
                "a delivery could not be settled",
            ),
        )))
    }
}

/// Acks a message to remove it, or puts it back (nack and requeue).
async fn settle(remove: bool, d: &Delivery) -> Result<(), BrokerError> {
    let settled = if remove {
        d.acker.ack(BasicAckOptions::default()).await?
    } else {
        d.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?
    };
    ack(settled)
}

/// Why a `dlq` run stopped.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the dead-letter queue {0:?} does not exist (NOTIFIER_DEAD_QUEUE; `run` declares it)")]
    NoQueue(String),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl From<lapin::Error> for DlqError {
    fn from(e: lapin::Error) -> Self {
        DlqError::Broker(e.into())
    }
}

/// A replayed message starts afresh: attempts and reasons are dropped.
fn without_notifier_headers(props: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
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

/// The table's header line.
pub fn table_header() -> String {
    format!(
        "{:<18} {:>8} {:>8} {:>8}  {:<16} {:<36}  detail\n",
        "reason", "errcode", "attempts", "age", "assignee", "event_id"
    )
}

/// One table line.
pub fn table_line(r: &Row) -> String {
    let dash = || "-".to_string();
    format!(
        "{:<18} {:>8} {:>8} {:>8}  {:<16} {:<36}  {}\n",
        r.reason,
        r.errcode.map(|c| c.to_string()).unwrap_or_else(dash),
        r.attempts.map(|c| c.to_string()).unwrap_or_else(dash),
        r.age_seconds.map(age).unwrap_or_else(dash),
        r.assignee.clone().unwrap_or_else(dash),
        r.event_id.clone().unwrap_or_else(dash),
        r.detail.clone().unwrap_or_else(dash),
    )
}

/// An age as an operator reads it: `42s`, `17m`, `5h`, `3d`.
fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// One exported message: the body (as text when it is UTF-8, else base64),
/// the properties a republisher needs, and every header.
pub fn export_line(d: &Delivery) -> Value {
    let mut line = Map::new();
    match std::str::from_utf8(&d.data) {
        Ok(text) => line.insert("body".into(), Value::from(text)),
        Err(_) => line.insert("body_base64".into(), Value::from(base64(&d.data))),
    };
    let p = &d.properties;
    let opt = |v: Option<&ShortString>| v.map(|s| Value::from(s.as_str()));
    line.insert(
        "properties".into(),
        json!({
            "message_id": opt(p.message_id().as_ref()),
            "content_type": opt(p.content_type().as_ref()),
        }),
    );
    let headers = p
        .headers()
        .as_ref()
        .map(table_json)
        .unwrap_or_else(|| Value::Object(Map::new()));
    line.insert("headers".into(), headers);
    Value::Object(line)
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), amqp_json(v)))
            .collect(),
    )
}

/// An AMQP header value as JSON (integers stay integers, byte strings become
/// text when they are UTF-8).
fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(t) => Value::from(t),
            Err(_) => json!({ "base64": base64(s.as_bytes()) }),
        },
        AMQPValue::ByteArray(b) => json!({ "base64": base64(b.as_slice()) }),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::DecimalValue(d) => json!({ "scale": d.scale, "value": d.value }),
        AMQPValue::Void => Value::Null,
    }
}

/// Standard base64 with padding (bodies that are not UTF-8).
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `dlq` subcommand.
pub async fn main(cmd: DlqCommand) -> ExitCode {
    let args = match &cmd {
        DlqCommand::List { filter, .. }
        | DlqCommand::Export { filter, .. }
        | DlqCommand::Replay { filter }
        | DlqCommand::Purge { filter, .. } => filter,
    };
    let filter = match Filter::from_args(args) {
        Ok(f) => f,
        Err(why) => return super::bad_usage(why),
    };
    if let DlqCommand::Purge { yes: false, .. } = cmd {
        return super::bad_usage("dlq purge deletes messages; add --yes to confirm");
    }
    let settings = match super::settings(Needs::Broker) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "warn");
    let dead = settings.dead_queue.clone();
    let stdout = std::io::stdout();
    let summary = |c: Counts| {
        format!(
            "{} of {} message(s) examined ({} in {dead} at start)",
            c.chosen, c.examined, c.at_start
        )
    };
    match cmd {
        DlqCommand::List { json, .. } => {
            let mut out = stdout.lock();
            let mut first = true;
            let started = if json {
                write!(out, "[")
            } else {
                out.write_all(table_header().as_bytes())
            };
            if let Err(e) = started {
                return super::fail(e);
            }
            let result = run(&settings, Action::List, &filter, |r, _| {
                if json {
                    let sep = if std::mem::take(&mut first) {
                        "\n"
                    } else {
                        ",\n"
                    };
                    let text = serde_json::to_string(r).map_err(std::io::Error::other)?;
                    write!(out, "{sep}  {text}")
                } else {
                    out.write_all(table_line(r).as_bytes())
                }
            })
            .await;
            match result {
                Ok(c) => {
                    let _ = if json {
                        writeln!(out, "\n]")
                    } else {
                        writeln!(out, "{} shown; {}", c.chosen, summary(c))
                    };
                    ExitCode::SUCCESS
                }
                Err(e) => super::fail(e),
            }
        }
        DlqCommand::Export { out: path, .. } => {
            let mut sink: Box<dyn Write> = match &path {
                Some(p) => match std::fs::File::create(p) {
                    Ok(f) => Box::new(std::io::BufWriter::new(f)),
                    Err(e) => return super::fail(format!("--out {}: {e}", p.display())),
                },
                None => Box::new(stdout.lock()),
            };
            let result = run(&settings, Action::List, &filter, |_, msg| {
                let line =
                    serde_json::to_string(&export_line(msg)).map_err(std::io::Error::other)?;
                writeln!(sink, "{line}")
            })
            .await;
            let flushed = sink.flush();
            drop(sink);
            match (result, flushed) {
                (Ok(c), Ok(())) => {
                    eprintln!("exported {}", summary(c));
                    ExitCode::SUCCESS
                }
                (Err(e), _) => super::fail(e),
                (_, Err(e)) => super::fail(format!("cannot write the output: {e}")),
            }
        }
        DlqCommand::Replay { .. } => {
            match run(&settings, Action::Replay, &filter, |_, _| Ok(())).await {
                Ok(c) => {
                    println!(
                        "replayed {} into {}; {}",
                        c.chosen,
                        settings.queue,
                        summary(c)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => super::fail(e),
            }
        }
        DlqCommand::Purge { .. } => {
            match run(&settings, Action::Purge, &filter, |_, _| Ok(())).await {
                Ok(c) => {
                    println!("purged {}; {}", c.chosen, summary(c));
                    ExitCode::SUCCESS
                }
                Err(e) => super::fail(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn props(reason: Option<&str>) -> BasicProperties {
        let mut h = FieldTable::default();
        if let Some(r) = reason {
            h.insert(
                headers::REASON.into(),
                AMQPValue::LongString(LongString::from(r.as_bytes().to_vec())),
            );
            h.insert(headers::ERRCODE.into(), AMQPValue::LongLongInt(43101));
            h.insert(
                headers::DETAIL.into(),
                AMQPValue::LongString(LongString::from(b"user refused".to_vec())),
            );
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn a_row_reads_headers_and_body() {
        let body = br#"{"event_id":"e-1","assignee":{"user_id":1024}}"#;
        let r = row(body, &props(Some("wechat_rejected")));
        assert_eq!(r.reason, "wechat_rejected");
        assert_eq!(r.known_reason, Some(Reason::WechatRejected));
        assert_eq!(r.errcode, Some(43101));
        assert_eq!(r.assignee.as_deref(), Some("1024"));
        assert_eq!(r.event_id.as_deref(), Some("e-1"));
        let line = table_line(&r);
        assert!(
            line.contains("user refused") && line.contains("1024"),
            "{line}"
        );
        let broker_own = row(b"not json", &props(None));
        assert_eq!(broker_own.reason, "delivery_limit");
        assert_eq!(broker_own.known_reason, Some(Reason::DeliveryLimit));
    }

    #[test]
    fn the_filter_compares_reasons_from_the_vocabulary() {
        let f = Filter {
            reason: Some(Reason::Expired),
            ..Filter::default()
        };
        assert!(f.matches(&row(b"{}", &props(Some("expired")))));
        assert!(!f.matches(&row(b"{}", &props(Some("expired_later")))));
        let args = DlqFilter {
            reason: Some("invalid_evnt".into()),
            event_id: None,
            limit: None,
        };
        let err = Filter::from_args(&args).unwrap_err();
        assert!(
            err.contains("invalid_evnt") && err.contains("invalid_event"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }

    #[test]
    fn ages_read_as_an_operator_would() {
        assert_eq!(age(42), "42s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(18_000), "5h");
        assert_eq!(age(3 * 86_400), "3d");
    }
}
