//! Publishing copies of held messages (to a retry or the dead-letter queue)
//! so that "confirmed" means "this copy is safe": its own connection, one
//! message in flight, a bounded wait for everything.
//!
//! - Its own connection: a broker memory alarm blocks publishing connections;
//!   acks travel on the consuming connection and must keep flowing.
//! - One message in flight: lapin attaches a `basic.return` to whichever
//!   confirm completes next, so with concurrent publishes on one channel an
//!   unroutable copy could be taken as confirmed and its original acked.
//! - Bounded: connecting and waiting for the confirm each have a deadline,
//!   and the confirm's clock starts when the copy is sent; a copy not
//!   confirmed in time counts as failed (the caller releases the original). A
//!   channel whose copy failed or was abandoned (its task aborted mid-wait) is
//!   discarded, so a late confirm or return can never be attributed to a later
//!   copy; it is closed in the background, since a blocked broker may never
//!   answer the close.
//! - Queued fairly: a burst of copies (thousands of invalid events at once)
//!   waits for its turn without a clock running, since waiting behind other
//!   copies is not "not confirmed". At most [`MAX_QUEUED`] copies are queued
//!   at the lock, with a generous bound there; the rest wait for a place. When
//!   a copy fails to reach the broker (not confirmed, connection lost), every
//!   copy queued at the lock meanwhile fails at once instead of meeting the
//!   same broker one by one, so a blocked broker does not pin originals for
//!   long; the copies still waiting for a place try the broker themselves, so
//!   one failure sends at most [`MAX_QUEUED`] + 1 originals back to the queue,
//!   never a whole flood.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, Semaphore};

use super::{confirm_channel, connect, publish_confirmed, BrokerError};

/// How long a sent copy may wait for its confirm before it counts as failed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Copies queued at the lock at most; the others wait for a place, with no
/// clock. Also the most copies one failure can fail with it (see `publish`).
pub const MAX_QUEUED: usize = 32;
/// How long a queued copy may wait for the lock: generous, since the copies
/// ahead of it take a few milliseconds each, and at worst each one's own bounds.
const TURN_TIMEOUT: Duration = Duration::from_secs(60);
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
    /// Places in the queue at the lock.
    queued: Semaphore,
    link: Mutex<Link>,
    /// Copies that failed to reach the broker so far (not nacked or returned:
    /// the broker's answer about one copy says nothing about the next).
    failures: AtomicU64,
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
            queued: Semaphore::new(MAX_QUEUED),
            link: Mutex::new(None),
            failures: AtomicU64::new(0),
        }
    }

    /// Publishes one persistent, mandatory copy and waits for its confirm.
    ///
    /// # Errors
    /// Nacked, returned as unroutable, not confirmed within the timeout, the
    /// broker unreachable, a copy ahead failed to reach the broker while this
    /// one waited, or its turn did not come within [`TURN_TIMEOUT`]: the copy
    /// is not safe and the caller must not ack.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        // Counted from the moment this copy has its place at the lock: a
        // failure while it still waited for a place happened to copies far
        // ahead of it, and it tries the broker itself. Only the copies queued
        // at the lock when a copy fails (at most `MAX_QUEUED`) fail with it.
        let _place = self.queued.acquire().await.expect("never closed");
        let seen = self.failures.load(Ordering::SeqCst);
        let mut link = tokio::time::timeout(TURN_TIMEOUT, self.link.lock())
            .await
            .map_err(|_| BrokerError::TurnTimeout(TURN_TIMEOUT))?;
        if self.failures.load(Ordering::SeqCst) != seen {
            return Err(BrokerError::FailedAhead);
        }
        let sent = self
            .send(&mut link, exchange, routing_key, body, properties)
            .await;
        if let Err(e) = &sent {
            if !matches!(e, BrokerError::Nacked | BrokerError::Unroutable(_)) {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
        }
        sent
    }

    /// Sends one copy on the link (opened if needed) and waits for its confirm.
    async fn send(
        &self,
        link: &mut Link,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
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
        let mut armed = Armed { link, armed: true };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A "broker" that accepts connections and closes them at once.
    async fn hangs_up() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        format!("amqp://guest:guest@{addr}/%2f")
    }

    #[tokio::test]
    async fn copies_queued_behind_a_failed_one_fail_at_once_and_later_ones_try_again() {
        let publisher = Publisher::new(vec![hangs_up().await], "test".into());
        let copy = || publisher.publish("", "q", b"{}", BasicProperties::default());
        // The first takes the lock and meets the broker; the others wait their turn.
        let (first, second, third) = tokio::join!(copy(), copy(), copy());
        assert!(
            matches!(first, Err(BrokerError::Unreachable { .. })),
            "{first:?}"
        );
        assert!(
            matches!(second, Err(BrokerError::FailedAhead)),
            "{second:?}"
        );
        assert!(matches!(third, Err(BrokerError::FailedAhead)), "{third:?}");
        // A copy that comes after the failure tries the broker itself.
        let later = copy().await;
        assert!(
            matches!(later, Err(BrokerError::Unreachable { .. })),
            "{later:?}"
        );
    }
}
