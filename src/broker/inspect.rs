//! Looking at the topology without changing it, for `check`, `status` and
//! `dlq`: passive declares only (a missing queue is reported, never created),
//! plus RabbitMQ's management API when `NOTIFIER_MANAGEMENT_URL` is set.
//!
//! A passive declare tells whether a queue exists, its ready messages and its
//! consumers; it cannot see a queue's arguments or type. Those (and which
//! replica is the single active consumer) only the management API can tell, so
//! without it a queue is reported `present`, with that limit said out loud.

use std::fmt;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use serde_json::Value;

use super::{reply_code, BrokerError};
use crate::settings::{Secret, Settings};

/// What a passive declare found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// It exists; for a queue, its ready messages and consumers.
    Present { messages: u32, consumers: u32 },
    /// No object of that name in the vhost.
    Missing,
    /// It exists but differs from what the settings ask for (the reason).
    Mismatched(String),
}

/// One object of the topology and what was found.
#[derive(Debug, Clone)]
pub struct Found {
    /// `exchange`, `work queue`, `dead-letter queue` or `retry queue 30s`.
    pub role: String,
    pub name: String,
    pub presence: Presence,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.presence {
            Presence::Present { .. } => "present".to_string(),
            Presence::Missing => "missing".to_string(),
            Presence::Mismatched(why) => format!("mismatched: {why}"),
        };
        write!(f, "{:<18} {:<44} {state}", self.role, self.name)
    }
}

/// Arguments a queue must have, compared through the management API.
type Expected = Vec<(&'static str, Value)>;

/// The queues of the settings' topology: (role, name, expected arguments).
fn queues(settings: &Settings) -> Vec<(String, String, Expected)> {
    let mut out = vec![
        (
            "work queue".to_string(),
            settings.queue.clone(),
            vec![
                ("x-queue-type", Value::from("quorum")),
                ("x-single-active-consumer", Value::from(true)),
                (
                    "x-dead-letter-routing-key",
                    Value::from(settings.dead_queue.as_str()),
                ),
            ],
        ),
        (
            "dead-letter queue".to_string(),
            settings.dead_queue.clone(),
            vec![("x-queue-type", Value::from("quorum"))],
        ),
    ];
    for delay in &settings.retry_delays {
        out.push((
            format!("retry queue {}", crate::settings::format_duration(*delay)),
            settings.retry_queue(*delay),
            vec![
                ("x-queue-type", Value::from("quorum")),
                ("x-message-ttl", Value::from(delay.as_millis() as u64)),
                (
                    "x-dead-letter-routing-key",
                    Value::from(settings.queue.as_str()),
                ),
            ],
        ));
    }
    out
}

/// Passive-declares one queue on a channel of its own (a 404 closes the
/// channel it happened on).
///
/// # Errors
/// A failure other than "not found" (the connection went away, access refused).
pub async fn queue(conn: &Connection, name: &str) -> Result<Presence, BrokerError> {
    let channel = conn.create_channel().await?;
    let result = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(q) => {
            let _ = channel.close(200, "inspected".into()).await;
            Ok(Presence::Present {
                messages: q.message_count(),
                consumers: q.consumer_count(),
            })
        }
        Err(e) if reply_code(&e) == Some(404) => Ok(Presence::Missing),
        // 405 RESOURCE_LOCKED: an exclusive queue of another connection has the name.
        Err(e) if reply_code(&e) == Some(405) => Ok(Presence::Mismatched(
            "an exclusive queue of another connection".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn exchange(conn: &Connection, name: &str) -> Result<Presence, BrokerError> {
    let channel = conn.create_channel().await?;
    let result = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(()) => {
            let _ = channel.close(200, "inspected".into()).await;
            Ok(Presence::Present {
                messages: 0,
                consumers: 0,
            })
        }
        Err(e) if reply_code(&e) == Some(404) => Ok(Presence::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Every object of the topology, as found; nothing is created or changed.
/// With a management API, present queues also have their arguments and the
/// exchange its type compared.
///
/// # Errors
/// The broker failed in a way other than a missing object.
pub async fn topology(conn: &Connection, settings: &Settings) -> Result<Vec<Found>, BrokerError> {
    let api = management(settings);
    let mut found = Vec::new();
    let mut presence = exchange(conn, &settings.exchange).await?;
    if let (Some(api), Presence::Present { .. }) = (&api, &presence) {
        if let Ok(info) = api
            .get(&format!("exchanges/{{vhost}}/{}", enc(&settings.exchange)))
            .await
        {
            if info["type"] != "topic" || info["durable"] != true {
                presence = Presence::Mismatched(format!(
                    "type {} durable {} (want topic, durable)",
                    info["type"], info["durable"]
                ));
            }
        }
    }
    found.push(Found {
        role: "exchange".into(),
        name: settings.exchange.clone(),
        presence,
    });
    for (role, name, want) in queues(settings) {
        let mut presence = queue(conn, &name).await?;
        if let (Some(api), Presence::Present { .. }) = (&api, &presence) {
            if let Ok(info) = api.queue(&name).await {
                let differs: Vec<String> = want
                    .iter()
                    .filter(|(k, v)| &info["arguments"][*k] != v)
                    .map(|(k, v)| format!("{k} is {} (want {v})", info["arguments"][*k]))
                    .collect();
                if !differs.is_empty() {
                    presence = Presence::Mismatched(differs.join(", "));
                }
            }
        }
        found.push(Found {
            role,
            name,
            presence,
        });
    }
    Ok(found)
}

/// The management API of the settings, on AMQP_URL's vhost, if a URL is set.
pub fn management(settings: &Settings) -> Option<Management> {
    let vhost = settings
        .amqp_urls
        .first()
        .and_then(|u| u.parse::<lapin::uri::AMQPUri>().ok())
        .map(|u| u.vhost)
        .unwrap_or_else(|| "/".into());
    settings
        .management_url
        .as_ref()
        .map(|url| Management::new(url, &vhost))
}

/// Percent-encodes one path segment of a management API URL.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// RabbitMQ's management HTTP API (read-only GETs).
pub struct Management {
    base: reqwest::Url,
    user: String,
    password: String,
    vhost: String,
    http: reqwest::Client,
}

impl Management {
    /// `url` like `http://guest:guest@127.0.0.1:15672`, optionally with a vhost
    /// path (`.../%2f`); without one, `default_vhost` (AMQP_URL's).
    pub fn new(url: &Secret, default_vhost: &str) -> Management {
        let mut base = reqwest::Url::parse(url.expose()).expect("checked by settings");
        let user = base.username().to_string();
        let password = base.password().unwrap_or("").to_string();
        let vhost = match base.path().trim_matches('/') {
            "" => default_vhost.to_string(),
            p => percent_decode(p),
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_path("/api/");
        Management {
            base,
            user: percent_decode(&user),
            password: percent_decode(&password),
            vhost,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("a TLS backend is compiled in"),
        }
    }

    /// GETs `path` under `/api/` (`{vhost}` replaced by the encoded vhost).
    ///
    /// # Errors
    /// A one-line reason (never the URL's password).
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let path = path.replace("{vhost}", &enc(&self.vhost));
        let url = self.base.join(&path).map_err(|e| e.to_string())?;
        let resp = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| format!("management API unreachable: {}", e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("management API answered {}", resp.status()));
        }
        resp.json()
            .await
            .map_err(|e| format!("management API: {}", e.without_url()))
    }

    /// One queue's details.
    ///
    /// # Errors
    /// As `get`.
    pub async fn queue(&self, name: &str) -> Result<Value, String> {
        self.get(&format!("queues/{{vhost}}/{}", enc(name))).await
    }

    /// The single active consumer of `queue`: its connection name (which
    /// carries the replica's host and pid) or consumer tag, `None` when no
    /// consumer is active.
    ///
    /// # Errors
    /// As `get`.
    pub async fn active_consumer(&self, queue: &str) -> Result<Option<String>, String> {
        let info = self.queue(queue).await?;
        Ok(active_in(&info))
    }
}

/// The active consumer in a queue's management record (pure, for tests).
pub fn active_in(info: &Value) -> Option<String> {
    let consumers = info["consumer_details"].as_array()?;
    consumers
        .iter()
        .find(|c| c["active"] == true || c["activity_status"] == "single_active")
        .map(|c| {
            let tag = c["consumer_tag"].as_str().unwrap_or("?");
            match c["channel_details"]["connection_name"].as_str() {
                Some(conn) if conn != tag => format!("{tag} (connection {conn})"),
                _ => tag.to_string(),
            }
        })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerError;
    use serde_json::json;

    #[test]
    fn names_are_encoded_as_one_path_segment() {
        assert_eq!(enc("/"), "%2F");
        assert_eq!(enc("wechat-notifier.retry.5s"), "wechat-notifier.retry.5s");
        assert_eq!(percent_decode("%2f"), "/");
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn the_active_consumer_is_the_single_active_one() {
        let info = json!({"consumer_details": [
            {"consumer_tag": "wechat-notifier-a-1", "active": false, "activity_status": "waiting",
             "channel_details": {"connection_name": "wechat-notifier-a-1"}},
            {"consumer_tag": "wechat-notifier-b-2", "active": true, "activity_status": "single_active",
             "channel_details": {"connection_name": "wechat-notifier-b-2"}},
        ]});
        assert_eq!(active_in(&info).as_deref(), Some("wechat-notifier-b-2"));
        assert_eq!(active_in(&json!({"consumer_details": []})), None);
    }

    #[test]
    fn the_management_url_gives_credentials_and_vhost() {
        let m = Management::new(&Secret::new("http://ops:p%40ss@127.0.0.1:15672/t-1"), "/");
        assert_eq!((m.user.as_str(), m.password.as_str()), ("ops", "p@ss"));
        assert_eq!(m.vhost, "t-1");
        assert_eq!(m.base.as_str(), "http://127.0.0.1:15672/api/");
        let m = Management::new(&Secret::new("http://127.0.0.1:15672"), "v");
        assert_eq!(m.vhost, "v");
    }

    fn amqp(code: u16, text: &str) -> BrokerError {
        let e = lapin::protocol::AMQPError::from_id(code, text.into()).expect("a known code");
        BrokerError::Amqp(lapin::Error::from(lapin::ErrorKind::ProtocolError(e)))
    }

    #[test]
    fn each_broker_failure_is_its_own_kind_in_one_line() {
        use super::super::FailureKind;
        let mismatch = amqp(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/'",
        );
        assert_eq!(mismatch.kind(), FailureKind::Mismatch);
        let text = mismatch.to_string();
        assert!(
            text.contains("other arguments") && text.contains("'q'"),
            "{text}"
        );
        let timed_out = amqp(
            406,
            "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
             Timeout value used: 60000 ms. This timeout value can be configured, see consumers doc guide to learn more",
        );
        assert_eq!(timed_out.kind(), FailureKind::ConsumerTimeout);
        let text = timed_out.to_string();
        assert!(
            text.contains("consumer_timeout") && !text.contains("other arguments"),
            "{text}"
        );
        assert_eq!(
            amqp(404, "NOT_FOUND - no queue 'q'").kind(),
            FailureKind::NotFound
        );
        assert_eq!(
            amqp(403, "ACCESS_REFUSED").kind(),
            FailureKind::AccessRefused
        );
        let lost = BrokerError::Amqp(lapin::Error::from(lapin::ErrorKind::IOError(
            std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        )));
        assert_eq!(lost.kind(), FailureKind::ConnectionLost);
        assert!(lost.to_string().contains("connection was lost"), "{lost}");
        let unreachable = BrokerError::Unreachable {
            tried: "amqp://h:5672/".into(),
            last: "refused".into(),
        };
        assert!(unreachable.to_string().contains("scripts/broker.sh"));
        for e in [mismatch, lost, unreachable] {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    /// Only the broker's "inequivalent arg" answer means a queue or exchange
    /// exists with other arguments (an operator must act, retried slowly);
    /// any other 406, such as the one a stray double ack earns, closes a
    /// channel and a reconnect is enough.
    #[test]
    fn only_an_inequivalent_arg_406_reads_as_a_mismatch() {
        use super::super::FailureKind;
        let exchange = amqp(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': \
             received 'direct' but current is 'topic'",
        );
        assert_eq!(exchange.kind(), FailureKind::Mismatch);
        for text in [
            "PRECONDITION_FAILED - unknown delivery tag 42",
            "PRECONDITION_FAILED - fast reply consumer does not exist",
            "PRECONDITION_FAILED",
        ] {
            let e = amqp(406, text);
            assert_eq!(e.kind(), FailureKind::Refused, "{text}");
            let line = e.to_string();
            assert!(
                !line.contains("other arguments") && line.contains(text),
                "{line}"
            );
        }
    }
}
