//! Publishing copies of held messages (to a retry or the dead-letter queue)
//! so that "confirmed" means "this copy is safe": its own connection, one
//! message in flight, a bounded wait for everything.
//!
//! - Its own connection: a broker memory alarm blocks publishing connections;
//!   acks travel on the consuming connection and must keep flowing.
//! - One message in flight: lapin attaches a `basic.return` to whichever
//!   confirm completes next, so with concurrent publishes on one channel an
//!   unroutable copy could be taken as confirmed and its original acked.
//! - Bounded: waiting for the turn, connecting and waiting for the confirm each
//!   have a deadline; a copy not confirmed in time counts as failed (the caller
//!   releases the original). A channel whose copy failed or was abandoned (its
//!   task aborted mid-wait) is discarded, so a late confirm or return can never
//!   be attributed to a later copy; it is closed in the background, since a
//!   blocked broker may never answer the close.

use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::{confirm_channel, connect, publish_confirmed, BrokerError};

/// How long a copy may wait for its confirm (and for its turn) before it counts as failed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a publishing connection and channel may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a discarded connection is given to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Link = Option<(Connection, Channel)>;

/// Publishes copies one at a time over a connection of its own, reconnecting
/// on demand (cluster URLs tried in turn).
pub struct Publisher {
    urls: Vec<String>,
    name: String,
    timeout: Duration,
    link: Mutex<Link>,
}

/// Closes a connection in the background, without waiting for the broker.
fn discard(link: (Connection, Channel)) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, link.0.close(200, "discarded".into())).await;
        });
    }
}

/// Discards the link unless disarmed: a publish that did not finish (failed,
/// timed out, or its future dropped mid-wait) must not leave its channel for
/// the next copy.
struct Armed<'a> {
    link: &'a mut Link,
    armed: bool,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(old) = self.link.take() {
                discard(old);
            }
        }
    }
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

    /// Publishes one persistent, mandatory copy and waits for its confirm.
    ///
    /// # Errors
    /// Nacked, returned as unroutable, not confirmed (or not even sent) within
    /// the timeout, or the broker unreachable: the copy is not safe and the
    /// caller must not ack.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let mut link = tokio::time::timeout(self.timeout, self.link.lock())
            .await
            .map_err(|_| BrokerError::ConfirmTimeout(self.timeout))?;
        let usable = link
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            if let Some(old) = link.take() {
                discard(old);
            }
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let conn = connect(&self.urls, &self.name).await?;
                let channel = confirm_channel(&conn).await?;
                Ok::<_, BrokerError>((conn, channel))
            })
            .await
            .map_err(|_| BrokerError::ConfirmTimeout(CONNECT_TIMEOUT))??;
            *link = Some(opened);
        }
        let channel = link.as_ref().expect("set above").1.clone();
        let mut armed = Armed {
            link: &mut link,
            armed: true,
        };
        let sent = tokio::time::timeout(
            self.timeout,
            publish_confirmed(&channel, exchange, routing_key, body, properties),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                armed.armed = false;
                Ok(())
            }
            // The channel answered in order: it can carry the next copy.
            Ok(Err(e @ (BrokerError::Nacked | BrokerError::Unroutable(_)))) => {
                armed.armed = false;
                Err(e)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::ConfirmTimeout(self.timeout)),
        }
    }

    /// Closes the connection (at shutdown), without waiting long.
    pub async fn close(&self) {
        if let Ok(mut link) = tokio::time::timeout(self.timeout, self.link.lock()).await {
            if let Some((conn, _)) = link.take() {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bye".into())).await;
            }
        }
    }
}
