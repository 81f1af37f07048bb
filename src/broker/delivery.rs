//! One delivery held unacked by this replica, and the only ways it leaves:
//! acked (its notice was accepted, or its copy is safe in a retry or
//! dead-letter queue) or released back to the queue (nack with requeue). A
//! delivery dropped unsettled — a task that panicked — is released too, so
//! nothing stays pinned on a live channel; when its session is being given up
//! (shutdown grace elapsed, connection lost) it is left to the channel's close,
//! which returns it once (a nack first would count twice against the delivery
//! limit, and a still-registered consumer would only get it back).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, BasicProperties};
use tracing::{debug, warn};

use super::{header_int, header_str, headers};
use crate::metrics::Metrics;

/// Set when a session is given up: its unsettled deliveries are then left
/// to the channel's close instead of being nacked one by one.
#[derive(Clone, Default)]
pub struct Abandon(Arc<AtomicBool>);

impl Abandon {
    pub fn abandon(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn abandoned(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One unacked delivery and what is needed to copy it elsewhere.
pub struct Pending {
    /// `None` once settled (acked or released).
    acker: Option<Acker>,
    abandon: Abandon,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Failed rounds so far (`x-notifier-attempts` of a message back from a
    /// retry queue), never negative: a hostile or broken header counts as 0.
    pub attempts: i64,
    pub first_failed_at: Option<String>,
    metrics: Arc<Metrics>,
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
    pub fn new(
        delivery: lapin::message::Delivery,
        metrics: Arc<Metrics>,
        abandon: &Abandon,
    ) -> Self {
        metrics.unacked_deliveries.inc();
        Pending {
            abandon: abandon.clone(),
            attempts: attempts_of(&delivery.properties),
            first_failed_at: header_str(&delivery.properties, headers::FIRST_FAILED_AT),
            acker: Some(delivery.acker),
            body: delivery.data,
            properties: delivery.properties,
            metrics,
        }
    }

    /// The CRM's `message_id`, for log lines about a message whose body could not be read.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|m| m.as_str())
    }

    /// Acks; `false` when the ack could not be done (channel gone: the broker redelivers).
    pub async fn ack(&mut self) -> bool {
        let Some(acker) = self.acker.take() else {
            return false;
        };
        self.metrics.unacked_deliveries.dec();
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => true,
            Ok(false) => {
                warn!("ack not done (channel closed); the broker will redeliver");
                false
            }
            Err(e) => {
                warn!(error = %e, "ack failed; the broker will redeliver");
                false
            }
        }
    }

    /// Returns the message to its queue now (nack, requeue).
    pub async fn release(&mut self) {
        if let Some(acker) = self.acker.take() {
            self.metrics.unacked_deliveries.dec();
            if let Err(e) = acker.nack(requeue()).await {
                debug!(error = %e, "release failed; the channel's close returns the message");
            }
        }
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
        self.metrics.unacked_deliveries.dec();
        if self.abandon.abandoned() {
            return; // the session's channel is closing: that returns it
        }
        // Unsettled: a task panicked. Hand the message back rather than leave
        // it pinned on a live channel.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = acker.nack(requeue()).await;
            });
        }
    }
}
