//! One delivery held unacked by this replica, and the only ways it leaves:
//! acked (its notice was accepted, or its copy is safe in a retry or
//! dead-letter queue; the frame is sent by its channel's [`Acks`]) or
//! released back to the queue (nack with requeue). A
//! delivery dropped unsettled — a task that panicked — is released too, so
//! nothing stays pinned on a live channel; when its session is being given up
//! (shutdown grace elapsed, connection lost) it is left to the channel's close,
//! which returns it once (a nack first would count twice against the delivery
//! limit, and a still-registered consumer would only get it back).

use lapin::options::BasicNackOptions;
use lapin::{Acker, BasicProperties};
use tracing::{debug, warn};

use super::acks::Acks;
use super::{header_int, header_str, headers};

/// One unacked delivery and what is needed to copy it elsewhere.
///
/// Thousands are held at once (a bulk assignment waits whole in its windows),
/// so the message is kept compactly: the body as an exact-size boxed slice,
/// and the properties as [`Props`] rather than lapin's 296-byte
/// `BasicProperties` (the memory row of the benchmark).
pub struct Pending {
    /// `None` once settled (acked or released). Kept for the nack; acks go
    /// through `acks`, which may cover several deliveries with one frame.
    acker: Option<Acker>,
    tag: u64,
    acks: Acks,
    pub body: Box<[u8]>,
    props: Props,
    /// Failed rounds so far (`x-notifier-attempts` of a message back from a
    /// retry queue), never negative: a hostile or broken header counts as 0.
    pub attempts: i64,
    pub first_failed_at: Option<String>,
    /// The broker delivered it before (a crash or a lost ack): the grant
    /// ledger may already hold or have settled its event.
    pub redelivered: bool,
    /// The trace context copies of this message carry (contract section 6):
    /// its `receive` span's with export on, else the CRM's `traceparent`.
    /// Boxed: 8 bytes on every held delivery, 25 more only when traced.
    pub trace: Option<Box<crate::trace::Ctx>>,
}

/// The content type the CRM's events carry (contract section 2).
const JSON: &str = "application/json";

/// The original properties, rebuilt exactly by [`Props::to_properties`].
/// What the CRM sends (a JSON content type, a message id, persistent) fits in
/// `Common`, a few dozen bytes; anything else (headers of a message back from
/// a retry queue, a priority, a timestamp...) is kept whole.
enum Props {
    Common {
        /// `true`: `application/json`; `false`: no content type.
        json: bool,
        message_id: Option<Box<str>>,
        delivery_mode: Option<u8>,
    },
    Other(Box<BasicProperties>),
}

impl Props {
    fn new(p: BasicProperties) -> Props {
        let json = match p.content_type() {
            None => false,
            Some(t) if t.as_str() == JSON => true,
            Some(_) => return Props::Other(Box::new(p)),
        };
        let only_common = p.content_encoding().is_none()
            && p.headers().is_none()
            && p.priority().is_none()
            && p.correlation_id().is_none()
            && p.reply_to().is_none()
            && p.expiration().is_none()
            && p.timestamp().is_none()
            && p.kind().is_none()
            && p.user_id().is_none()
            && p.app_id().is_none()
            && p.cluster_id().is_none();
        if !only_common {
            return Props::Other(Box::new(p));
        }
        Props::Common {
            json,
            message_id: p.message_id().as_ref().map(|m| Box::from(m.as_str())),
            delivery_mode: *p.delivery_mode(),
        }
    }

    fn message_id(&self) -> Option<&str> {
        match self {
            Props::Common { message_id, .. } => message_id.as_deref(),
            Props::Other(p) => p.message_id().as_ref().map(|m| m.as_str()),
        }
    }

    fn to_properties(&self) -> BasicProperties {
        match self {
            Props::Common {
                json,
                message_id,
                delivery_mode,
            } => {
                let mut p = BasicProperties::default();
                if *json {
                    p = p.with_content_type(JSON.into());
                }
                if let Some(id) = message_id {
                    p = p.with_message_id((&**id).into());
                }
                if let Some(mode) = delivery_mode {
                    p = p.with_delivery_mode(*mode);
                }
                p
            }
            Props::Other(p) => (**p).clone(),
        }
    }
}

/// Reads an attempts header: absent, negative or out of range count as 0,
/// huge values are kept (they are past any limit, and the arithmetic on them
/// saturates).
pub fn attempts_of(properties: &BasicProperties) -> i64 {
    header_int(properties, headers::ATTEMPTS)
        .unwrap_or(0)
        .max(0)
}

impl Pending {
    /// Takes the delivery into `acks`' books (called in arrival order).
    pub fn new(delivery: lapin::message::Delivery, acks: &Acks) -> Self {
        acks.received(delivery.delivery_tag);
        Pending {
            attempts: attempts_of(&delivery.properties),
            first_failed_at: header_str(&delivery.properties, headers::FIRST_FAILED_AT),
            tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            acks: acks.clone(),
            acker: Some(delivery.acker),
            body: delivery.data.into_boxed_slice(),
            props: Props::new(delivery.properties),
            trace: None,
        }
    }

    /// Reads the CRM's trace context and, with export on, makes the event's
    /// `receive` span. A message without headers (kept compactly) has no
    /// context to read: with export off that costs one branch.
    pub fn traced(&mut self, queue: &str) {
        let trace = match &self.props {
            Props::Other(p) => crate::trace::receive(p, queue),
            Props::Common { .. } if crate::trace::enabled() => {
                crate::trace::receive(&self.props.to_properties(), queue)
            }
            Props::Common { .. } => None,
        };
        self.trace = trace.map(Box::new);
    }

    /// The CRM's `message_id`, for log lines about a message whose body could not be read.
    pub fn message_id(&self) -> Option<&str> {
        self.props.message_id()
    }

    /// The message's properties as they arrived (for its copy in a retry or
    /// dead-letter queue).
    pub fn properties(&self) -> BasicProperties {
        self.props.to_properties()
    }

    /// Settles the delivery as acked: the ack leaves with the next flush of
    /// its channel's acks. `false` when the channel is gone (the broker redelivers).
    pub fn ack(&mut self) -> bool {
        let Some(acker) = self.acker.take() else {
            return false;
        };
        // Poisoned when the channel closed or failed.
        let usable = acker.usable();
        if !usable {
            warn!("ack not done (channel closed); the broker will redeliver");
        }
        self.acks.settled(self.tag);
        usable
    }

    /// Returns the message to its queue now (nack, requeue).
    pub async fn release(&mut self) {
        // Nacked through a clone (one use between them): if this task is
        // aborted mid-nack, `Drop` still finds the delivery unsettled.
        let Some(acker) = self.acker.clone() else {
            return;
        };
        if let Err(e) = acker.nack(requeue()).await {
            debug!(error = %e, "release failed; the channel's close returns the message");
        }
        self.acker = None;
        // Only once the nack is out may an ack behind it cover its tag.
        self.acks.released(self.tag);
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        multiple: false,
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if self.acks.abandoned() {
            // The session's channel is closing: that returns it. It stays
            // outstanding until then, so no ack may cover it.
            self.acks.left_to_close();
            return;
        }
        // Unsettled: a task panicked. Hand the message back rather than leave
        // it pinned on a live channel.
        let (acks, tag) = (self.acks.clone(), self.tag);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = acker.nack(requeue()).await;
                    acks.released(tag);
                });
            }
            Err(_) => acks.left_to_close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    #[test]
    fn properties_come_back_exactly_as_they_arrived() {
        let mut headers = FieldTable::default();
        headers.insert("x-notifier-attempts".into(), AMQPValue::LongLongInt(3));
        let cases = vec![
            BasicProperties::default(),
            // What the CRM sends: kept compactly.
            BasicProperties::default()
                .with_content_type(JSON.into())
                .with_message_id("e-1".into())
                .with_delivery_mode(2),
            BasicProperties::default().with_message_id("e-2".into()),
            BasicProperties::default().with_content_type(JSON.into()),
            // Anything else: kept whole.
            BasicProperties::default()
                .with_content_type("text/plain".into())
                .with_message_id("e-3".into()),
            BasicProperties::default()
                .with_content_type(JSON.into())
                .with_message_id("e-4".into())
                .with_headers(headers)
                .with_expiration("60000".into())
                .with_priority(5)
                .with_timestamp(1_795_615_380)
                .with_app_id("crm".into()),
        ];
        for original in cases {
            let props = Props::new(original.clone());
            assert_eq!(props.to_properties(), original);
            assert_eq!(
                props.message_id(),
                original.message_id().as_ref().map(|m| m.as_str())
            );
        }
        assert!(matches!(
            Props::new(
                BasicProperties::default()
                    .with_content_type(JSON.into())
                    .with_message_id("e-1".into())
                    .with_delivery_mode(2)
            ),
            Props::Common { .. }
        ));
    }
}
