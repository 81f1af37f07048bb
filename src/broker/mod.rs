//! RabbitMQ: connecting (several cluster URLs tried in turn), declaring the
//! topology of contract section 2 idempotently, and publishing with a confirm
//! so a message is only acked once its copy in a retry or dead-letter queue is
//! safe. Nothing here knows about events or WeChat. `inspect` looks without
//! changing anything (passive declares, the management API).

pub mod inspect;

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::reason::Reason;
use crate::settings::Settings;

pub mod acks;
pub mod delivery;
pub mod publisher;

pub use acks::{Acks, Flusher};
pub use delivery::Pending;
pub use publisher::Publisher;

/// The CRM's routing key for one assigned customer.
pub const ROUTING_KEY: &str = "customer.assigned";

/// The CRM's routing key for one answer of the subscription dialog (contract
/// section 8.1); the work queue is bound to it only with the grant ledger on.
pub const SUBSCRIPTION_ROUTING_KEY: &str = "subscription.changed";

/// The work queue's poison-message guard: after this many deliveries without an
/// ack the broker dead-letters the message itself (reason `delivery_limit`).
pub const DELIVERY_LIMIT: i64 = 20;

/// Header names of contract section 2.
pub mod headers {
    pub const REASON: &str = "x-notifier-reason";
    pub const DETAIL: &str = "x-notifier-detail";
    pub const ERRCODE: &str = "x-notifier-errcode";
    pub const ATTEMPTS: &str = "x-notifier-attempts";
    pub const FIRST_FAILED_AT: &str = "x-notifier-first-failed-at";
}

/// How to get a broker when none answers (the README's first command).
pub const START_HINT: &str = "start one with scripts/broker.sh, or `docker compose up -d rabbitmq`";

/// A broker failure, each variant one line an operator can act on: a refused
/// login is not an unreachable broker, and a queue declared with other
/// arguments (406) is not a lost connection.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no broker reachable at {tried} ({last}); {START_HINT}")]
    Unreachable { tried: String, last: String },
    #[error("the broker at {url} refused the login: check the user and password in AMQP_URL")]
    AccessRefused { url: String },
    #[error("{}", describe(.0))]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the message was returned as unroutable (no queue named {0:?})")]
    Unroutable(String),
    #[error("the broker did not confirm the message within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the message waited longer than {0:?} for its turn to be published")]
    TurnTimeout(Duration),
    #[error("a copy ahead of this one failed to reach the broker; this one was not tried")]
    FailedAhead,
}

/// What kind of broker failure, for callers that branch (and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No node answered (refused, timed out, DNS).
    Unreachable,
    /// The login was refused (403 at connection level).
    AccessRefused,
    /// A queue or exchange exists with other arguments (406 PRECONDITION_FAILED,
    /// "inequivalent arg").
    Mismatch,
    /// The broker closed the channel because a delivery stayed unacked past
    /// its `consumer_timeout` (also a 406 PRECONDITION_FAILED, told apart by
    /// its text): the deliveries return to the queue; reconnecting is enough.
    ConsumerTimeout,
    /// A queue or exchange does not exist (404 NOT_FOUND).
    NotFound,
    /// The connection or channel went away under us.
    ConnectionLost,
    /// Anything else the broker refused (a nack, an unroutable message, a 5xx,
    /// another 406 such as "unknown delivery tag").
    Refused,
}

impl BrokerError {
    pub fn kind(&self) -> FailureKind {
        match self {
            BrokerError::Unreachable { .. } => FailureKind::Unreachable,
            BrokerError::AccessRefused { .. } => FailureKind::AccessRefused,
            BrokerError::Amqp(e) => lapin_kind(e),
            BrokerError::Nacked
            | BrokerError::Unroutable(_)
            | BrokerError::ConfirmTimeout(_)
            | BrokerError::TurnTimeout(_)
            | BrokerError::FailedAhead => FailureKind::Refused,
        }
    }
}

/// The AMQP reply code of a protocol error (403, 404, 406, …), if it is one.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// Whether a broker's reply text is RabbitMQ's consumer-timeout close
/// ("delivery acknowledgement on channel 1 timed out. Timeout value used: …").
fn is_consumer_timeout(text: &str) -> bool {
    text.contains("acknowledgement") && text.contains("timed out")
}

/// Whether a broker's reply text is RabbitMQ's answer to a declare whose
/// arguments differ from the existing queue's or exchange's ("inequivalent
/// arg 'x-queue-type' for queue …"). Other 406s (a stray double ack's
/// "unknown delivery tag") close a channel and need no operator.
fn is_mismatch(text: &str) -> bool {
    text.contains("inequivalent arg")
}

fn lapin_kind(e: &lapin::Error) -> FailureKind {
    match reply_code(e) {
        Some(403) => FailureKind::AccessRefused,
        Some(404) => FailureKind::NotFound,
        Some(406) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) if is_consumer_timeout(p.get_message().as_str()) => {
                FailureKind::ConsumerTimeout
            }
            lapin::ErrorKind::ProtocolError(p) if is_mismatch(p.get_message().as_str()) => {
                FailureKind::Mismatch
            }
            _ => FailureKind::Refused,
        },
        Some(_) => FailureKind::Refused,
        None => FailureKind::ConnectionLost,
    }
}

/// One line for a lapin error: the broker's own reply text where it sent one
/// (it names the queue and the argument), otherwise what happened to the link.
fn describe(e: &lapin::Error) -> String {
    let text = match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().as_str().to_string(),
        _ => e.to_string(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match lapin_kind(e) {
        FailureKind::Mismatch => format!(
            "a queue or exchange exists with other arguments than the settings ask for ({text}); \
             delete it or fix the NOTIFIER_* names"
        ),
        FailureKind::ConsumerTimeout => format!(
            "the broker closed the consuming channel: a delivery stayed unacked longer than its \
             consumer_timeout ({text}); the messages return to the queue (see the README to raise it)"
        ),
        FailureKind::NotFound => format!("not found on the broker ({text})"),
        FailureKind::AccessRefused => {
            format!("the broker refused access ({text}): check the user, password and vhost in AMQP_URL")
        }
        FailureKind::ConnectionLost => format!("the broker connection was lost ({text})"),
        _ => format!("the broker refused ({text})"),
    }
}

/// Where a URL points, without its password: for logs.
pub fn redact_url(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) => format!(
            "{}://{}:{}/{}",
            if matches!(u.scheme, lapin::uri::AMQPScheme::AMQPS) {
                "amqps"
            } else {
                "amqp"
            },
            u.authority.host,
            u.authority.port,
            u.vhost
        ),
        Err(_) => "<malformed AMQP URL>".into(),
    }
}

/// The largest frame this client asks for, unless the URL sets `frame_max`.
/// lapin zero-fills two buffers of 32 frames per connection: at RabbitMQ's
/// 128 KiB that is 8 MiB of memory per connection; at 32 KiB, 2 MiB. Events
/// are at most 64 KiB and travel in several frames when larger.
pub const FRAME_MAX: u32 = 32 * 1024;

/// Connects to the first URL that answers, trying each in turn.
///
/// # Errors
/// `AccessRefused` when a node answered but refused the login (and none
/// accepted it), otherwise `Unreachable` when none answers.
pub async fn connect(urls: &[String], name: &str) -> Result<Connection, BrokerError> {
    let mut last = String::from("no URL configured");
    let mut refused = None;
    for url in urls {
        let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
        let mut uri = match url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) => uri,
            Err(e) => {
                last = format!("{}: {e}", redact_url(url));
                continue;
            }
        };
        uri.query.frame_max.get_or_insert(FRAME_MAX);
        match tokio::time::timeout(Duration::from_secs(10), Connection::connect_uri(uri, props))
            .await
        {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) if login_refused(&e) => refused = Some(redact_url(url)),
            Ok(Err(e)) => last = format!("{}: {}", redact_url(url), one_line(&e.to_string())),
            Err(_) => last = format!("{}: connect timed out", redact_url(url)),
        }
    }
    if let Some(url) = refused {
        return Err(BrokerError::AccessRefused { url });
    }
    Err(BrokerError::Unreachable {
        tried: urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(", "),
        last,
    })
}

/// RabbitMQ answers a wrong user or password with 403 ACCESS_REFUSED at
/// connection level (the client announces `authentication_failure_close`).
fn login_refused(e: &lapin::Error) -> bool {
    reply_code(e) == Some(403)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// The work queue's arguments (also used by `check` to compare).
pub fn work_queue_args(settings: &Settings) -> FieldTable {
    table(&[
        ("x-queue-type", long("quorum")),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-dead-letter-exchange", long("")),
        ("x-dead-letter-routing-key", long(&settings.dead_queue)),
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
    ])
}

fn retry_queue_args(settings: &Settings, delay: Duration) -> FieldTable {
    table(&[
        ("x-queue-type", long("quorum")),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        ),
        ("x-dead-letter-exchange", long("")),
        ("x-dead-letter-routing-key", long(&settings.queue)),
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
    ])
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the exchange, the work queue, the dead-letter queue and one retry
/// queue per ladder step; with the grant ledger on, the work queue is also
/// bound to `subscription.changed`. Idempotent; needs no WeChat.
///
/// With the ledger off the `subscription.changed` binding is left as it is,
/// never removed: a binding left by an earlier run with the ledger on keeps
/// bringing those events, which a replica without a ledger dead-letters
/// `no_ledger` so they can be replayed once it is back (contract 8.1), where
/// an unbind would have the broker drop them unseen.
///
/// # Errors
/// The broker's refusal, e.g. a queue that exists with other arguments.
pub async fn declare_topology(channel: &Channel, settings: &Settings) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            settings.dead_queue.as_str().into(),
            durable(),
            table(&[("x-queue-type", long("quorum"))]),
        )
        .await?;
    channel
        .queue_declare(
            settings.queue.as_str().into(),
            durable(),
            work_queue_args(settings),
        )
        .await?;
    channel
        .queue_bind(
            settings.queue.as_str().into(),
            settings.exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if settings.ledger.is_some() {
        // Subscription events go through the one active replica too, each
        // in its user's lane (contract section 8.1).
        channel
            .queue_bind(
                settings.queue.as_str().into(),
                settings.exchange.as_str().into(),
                SUBSCRIPTION_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for delay in &settings.retry_delays {
        channel
            .queue_declare(
                settings.retry_queue(*delay).as_str().into(),
                durable(),
                retry_queue_args(settings, *delay),
            )
            .await?;
    }
    Ok(())
}

/// Opens a channel in confirm mode.
///
/// # Errors
/// The broker's refusal.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes one persistent message, mandatory, and waits for the broker's confirm.
///
/// # Errors
/// `Nacked`, `Unroutable`, or the channel's failure: the caller must not ack.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties.with_delivery_mode(2),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err(BrokerError::Nacked);
    }
    if confirm.take_message().is_some() {
        return Err(BrokerError::Unroutable(routing_key.to_string()));
    }
    Ok(())
}

/// A header as an integer, whatever integer type the publisher chose.
pub fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// A header as a string.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The headers of a copy in a retry or dead-letter queue (contract section 2).
/// One constructor builds them, so every exit writes the same set.
#[derive(Debug, Clone)]
pub struct ParkHeaders {
    /// For a retry copy, the reason it will carry if the ladder runs out.
    pub reason: Reason,
    pub detail: String,
    pub errcode: Option<i64>,
    pub attempts: i64,
    pub first_failed_at: String,
}

impl ParkHeaders {
    /// `first_failed_at` is kept from an earlier round, else it is `now`.
    pub fn new(
        reason: Reason,
        detail: impl Into<String>,
        errcode: Option<i64>,
        attempts: i64,
        first_failed_at: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        ParkHeaders {
            reason,
            detail: detail.into(),
            errcode,
            attempts,
            first_failed_at: first_failed_at
                .map(str::to_string)
                .unwrap_or_else(|| now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        }
    }
}

/// The original properties for a copy, with the `x-notifier-*` headers set
/// (other headers kept). Dropped: `expiration` (a CRM's per-message TTL would
/// let the copy expire silently in a retry or the dead-letter queue) and
/// `user_id` (the broker checks it against the publishing user).
pub fn with_park_headers(original: &BasicProperties, h: &ParkHeaders) -> BasicProperties {
    let mut map = original
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    let mut set = |k: &str, v: AMQPValue| {
        map.insert(ShortString::from(k), v);
    };
    set(headers::REASON, long(h.reason.as_str()));
    set(headers::DETAIL, long(&h.detail));
    set(headers::ATTEMPTS, AMQPValue::LongLongInt(h.attempts));
    set(headers::FIRST_FAILED_AT, long(&h.first_failed_at));
    match h.errcode {
        Some(c) => set(headers::ERRCODE, AMQPValue::LongLongInt(c)),
        None => {
            map.remove(headers::ERRCODE);
        }
    }
    copy_properties(original).with_headers(FieldTable::from(map))
}

/// Every property of `p` except `expiration`, `user_id` and the headers.
fn copy_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_crm_properties_but_not_its_expiration() {
        let original = BasicProperties::default()
            .with_message_id("e-1".into())
            .with_content_type("application/json".into())
            .with_expiration("60000".into())
            .with_user_id("crm".into());
        let h = ParkHeaders::new(
            Reason::WechatRejected,
            "WeChat answered errcode 43101",
            Some(43101),
            3,
            None,
            chrono::Utc::now(),
        );
        let copy = with_park_headers(&original, &h);
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("e-1"));
        assert!(copy.expiration().is_none() && copy.user_id().is_none());
        assert_eq!(header_int(&copy, headers::ERRCODE), Some(43101));
        assert_eq!(header_int(&copy, headers::ATTEMPTS), Some(3));
        assert_eq!(
            header_str(&copy, headers::REASON).as_deref(),
            Some("wechat_rejected")
        );
        // A later copy without an errcode does not inherit the old one.
        let again = ParkHeaders::new(
            Reason::Expired,
            "old",
            None,
            4,
            Some("t0"),
            chrono::Utc::now(),
        );
        let copy2 = with_park_headers(&copy, &again);
        assert_eq!(header_int(&copy2, headers::ERRCODE), None);
        assert_eq!(
            header_str(&copy2, headers::FIRST_FAILED_AT).as_deref(),
            Some("t0")
        );
    }

    fn with(entries: &[(&str, AMQPValue)]) -> BasicProperties {
        BasicProperties::default().with_headers(table(entries))
    }

    #[test]
    fn header_int_reads_every_integer_width_a_publisher_may_choose() {
        let props = with(&[
            ("a", AMQPValue::ShortShortInt(-5)),
            ("b", AMQPValue::ShortShortUInt(250)),
            ("c", AMQPValue::ShortInt(-300)),
            ("d", AMQPValue::ShortUInt(60_000)),
            ("e", AMQPValue::LongInt(-504_002)),
            ("f", AMQPValue::LongUInt(4_000_000_000)),
            ("g", AMQPValue::LongLongInt(i64::MIN)),
            ("s", long("7")),
        ]);
        let got: Vec<Option<i64>> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|k| header_int(&props, k))
            .collect();
        assert_eq!(
            got,
            [
                Some(-5),
                Some(250),
                Some(-300),
                Some(60_000),
                Some(-504_002),
                Some(4_000_000_000),
                Some(i64::MIN)
            ]
        );
        assert_eq!(header_int(&props, "s"), None, "a string is not a number");
        assert_eq!(header_int(&props, "missing"), None);
        assert_eq!(header_int(&BasicProperties::default(), "a"), None);
    }

    #[test]
    fn header_str_reads_long_and_short_strings_only() {
        let props = with(&[
            ("long", long("wechat_rejected")),
            ("short", AMQPValue::ShortString("expired".into())),
            ("utf8", long("用户拒绝")),
            ("n", AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(
            header_str(&props, "long").as_deref(),
            Some("wechat_rejected")
        );
        assert_eq!(header_str(&props, "short").as_deref(), Some("expired"));
        assert_eq!(header_str(&props, "utf8").as_deref(), Some("用户拒绝"));
        assert_eq!(header_str(&props, "n"), None);
        assert_eq!(header_str(&props, "missing"), None);
        assert_eq!(header_str(&BasicProperties::default(), "long"), None);
    }

    #[test]
    fn park_headers_are_set_and_everything_else_is_kept() {
        // A message back from a retry queue: the CRM's own header and the
        // previous round's attempts.
        let original = with(&[
            ("x-crm-trace", long("abc")),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(1)),
            (headers::ERRCODE, AMQPValue::LongLongInt(-1)),
        ])
        .with_message_id("ev-1".into())
        .with_content_type("application/json".into());
        let parked = with_park_headers(
            &original,
            &ParkHeaders {
                reason: Reason::WechatRejected,
                detail: "WeChat answered errcode 43101: user refuse".into(),
                errcode: Some(43101),
                attempts: 2,
                first_failed_at: "2026-11-25T06:03:27.000Z".into(),
            },
        );
        assert_eq!(header_str(&parked, "x-crm-trace").as_deref(), Some("abc"));
        assert_eq!(
            parked.message_id().as_ref().map(|m| m.as_str()),
            Some("ev-1")
        );
        assert_eq!(
            parked.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            header_str(&parked, headers::REASON).as_deref(),
            Some("wechat_rejected")
        );
        assert_eq!(
            header_str(&parked, headers::DETAIL).as_deref(),
            Some("WeChat answered errcode 43101: user refuse")
        );
        assert_eq!(header_int(&parked, headers::ERRCODE), Some(43101));
        assert_eq!(header_int(&parked, headers::ATTEMPTS), Some(2));
        assert_eq!(
            header_str(&parked, headers::FIRST_FAILED_AT).as_deref(),
            Some("2026-11-25T06:03:27.000Z")
        );
        // The contract's types: errcode and attempts are integers, the rest strings.
        let h = parked.headers().as_ref().unwrap().inner();
        assert!(matches!(
            h.get(headers::ERRCODE),
            Some(AMQPValue::LongLongInt(_))
        ));
        assert!(matches!(
            h.get(headers::ATTEMPTS),
            Some(AMQPValue::LongLongInt(_))
        ));
        assert!(matches!(
            h.get(headers::REASON),
            Some(AMQPValue::LongString(_))
        ));

        // Without an errcode, none is written.
        let plain = with_park_headers(
            &BasicProperties::default(),
            &ParkHeaders {
                reason: Reason::Expired,
                detail: "old".into(),
                errcode: None,
                attempts: 1,
                first_failed_at: "t".into(),
            },
        );
        assert_eq!(
            header_str(&plain, headers::REASON).as_deref(),
            Some("expired")
        );
        assert_eq!(header_int(&plain, headers::ERRCODE), None);
        assert_eq!(header_int(&plain, headers::ATTEMPTS), Some(1));
    }
}
