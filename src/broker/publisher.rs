//! Publishing copies of held messages (to a retry or the dead-letter queue)
//! so that "confirmed" means "this copy is safe": its own connection, one
//! message in flight, a bounded wait for the confirm.
//!
//! - Its own connection: a broker memory alarm blocks publishing connections;
//!   acks travel on the consuming connection and must keep flowing.
//! - One message in flight: lapin attaches a `basic.return` to whichever
//!   confirm completes next, so with concurrent publishes on one channel an
//!   unroutable copy could be taken as confirmed and its original acked.
//! - A bounded wait: a copy not confirmed in time counts as failed (the caller
//!   releases the original), and the channel is dropped so a late answer can
//!   never be attributed to a later copy.

use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::{confirm_channel, connect, publish_confirmed, BrokerError};

/// How long a copy may wait for its confirm before it counts as failed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes copies one at a time over a connection of its own, reconnecting
/// on demand (cluster URLs tried in turn).
pub struct Publisher {
    urls: Vec<String>,
    name: String,
    timeout: Duration,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    /// Nothing is opened until the first publish.
    pub fn new(urls: Vec<String>, name: String) -> Self {
        Publisher {
            urls,
            name,
            timeout: CONFIRM_TIMEOUT,
            link: Mutex::new(None),
        }
    }

    /// With another confirm timeout (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publishes one persistent, mandatory copy and waits for its confirm.
    ///
    /// # Errors
    /// Nacked, returned as unroutable, not confirmed within the timeout, or the
    /// broker unreachable: the copy is not safe and the caller must not ack.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let mut link = self.link.lock().await;
        let usable = link
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            if let Some((conn, _)) = link.take() {
                let _ = conn.close(200, "replaced".into()).await;
            }
            let conn = connect(&self.urls, &self.name).await?;
            let channel = confirm_channel(&conn).await?;
            *link = Some((conn, channel));
        }
        let (_, channel) = link.as_ref().expect("set above");
        let sent = tokio::time::timeout(
            self.timeout,
            publish_confirmed(channel, exchange, routing_key, body, properties),
        )
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e @ (BrokerError::Nacked | BrokerError::Unroutable(_)))) => Err(e),
            Ok(Err(e)) => {
                *link = None;
                Err(e)
            }
            Err(_) => {
                // Drop the channel: its late confirm or return must not meet the next copy.
                if let Some((conn, _)) = link.take() {
                    let _ = conn.close(200, "confirm timed out".into()).await;
                }
                Err(BrokerError::ConfirmTimeout(self.timeout))
            }
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}
