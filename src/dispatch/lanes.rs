//! One call in flight per assignee (WeChat answers `43108` to concurrent
//! sends to one user), in arrival order, while different assignees' notices
//! run concurrently. A window takes its place in its assignee's lane when it
//! closes (synchronously, so order is arrival order) and waits for the
//! previous window of the lane to finish — or to be dropped, when its task
//! panicked or was aborted. A lane's entry is removed by whoever finishes
//! last, even by an aborted task, so entries never leak; an aborted window in
//! the middle passes its turn on only after the one before it finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Per assignee: the serial of the last ticket and the signal its call is done.
type Tail = (u64, Option<oneshot::Receiver<()>>);

/// Every assignee's lane.
#[derive(Default)]
pub struct Lanes {
    tails: Arc<Mutex<HashMap<String, Tail>>>,
}

/// A window's place in its assignee's lane.
pub struct Ticket {
    previous: Option<oneshot::Receiver<()>>,
    finish: Option<Finish>,
}

/// Holding the lane: dropping it (done, panicked or aborted) lets the next
/// window of the lane go.
pub struct Turn {
    _finish: Finish,
}

/// Signals the lane's next window and removes the lane's entry if no window
/// queued behind. Dropped only once the previous window has finished, so the
/// chain holds even when a window in the middle is aborted.
struct Finish {
    tails: Arc<Mutex<HashMap<String, Tail>>>,
    key: String,
    serial: u64,
    _done: oneshot::Sender<()>,
}

impl Lanes {
    /// Takes the next place in `assignee`'s lane.
    pub fn ticket(&self, assignee: &str) -> Ticket {
        let (done, next) = oneshot::channel();
        let mut tails = self.tails.lock().expect("not poisoned");
        let serial = tails.get(assignee).map_or(0, |(s, _)| s.wrapping_add(1));
        let previous = tails
            .insert(assignee.to_string(), (serial, Some(next)))
            .and_then(|(_, rx)| rx);
        Ticket {
            previous,
            finish: Some(Finish {
                tails: self.tails.clone(),
                key: assignee.to_string(),
                serial,
                _done: done,
            }),
        }
    }

    /// Assignees with a window queued or in flight (tests, metrics).
    pub fn len(&self) -> usize {
        self.tails.lock().expect("not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Waits for the lane's previous window to finish (or be dropped).
    pub async fn wait(mut self) -> Turn {
        if let Some(previous) = self.previous.as_mut() {
            let _ = previous.await;
        }
        self.previous = None;
        Turn {
            _finish: self.finish.take().expect("taken once"),
        }
    }
}

impl Drop for Ticket {
    /// A window dropped before its turn (its task aborted) passes the turn on
    /// only after the window before it finished.
    fn drop(&mut self) {
        let Some(finish) = self.finish.take() else {
            return;
        };
        match (self.previous.take(), tokio::runtime::Handle::try_current()) {
            (Some(previous), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = previous.await;
                    drop(finish);
                });
            }
            _ => drop(finish),
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        if tails.get(&self.key).is_some_and(|(s, _)| *s == self.serial) {
            tails.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_assignees_windows_go_one_at_a_time_and_in_order() {
        let lanes = Lanes::default();
        let first = lanes.ticket("u1");
        let second = lanes.ticket("u1");
        let other = lanes.ticket("u2");
        // Another assignee does not wait.
        let other = other.wait().await;
        let first = first.wait().await;
        let mut second = tokio::spawn(second.wait());
        tokio::task::yield_now().await;
        assert!(
            futures_util::poll!(&mut second).is_pending(),
            "the second window waits for the first"
        );
        drop(first);
        let second = second.await.unwrap();
        drop((second, other));
        assert!(lanes.is_empty());
    }

    #[tokio::test]
    async fn an_aborted_window_frees_its_lane_and_leaks_no_entry() {
        let lanes = Lanes::default();
        let held = lanes.ticket("u1").wait().await;
        let queued = lanes.ticket("u1");
        let task = tokio::spawn(async move {
            let _turn = queued.wait().await;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        let _ = task.await;
        // A window that comes now still waits for the one in flight.
        let mut late = tokio::spawn(lanes.ticket("u1").wait());
        tokio::task::yield_now().await;
        assert!(futures_util::poll!(&mut late).is_pending());
        drop(held);
        drop(late.await.unwrap());
        tokio::task::yield_now().await;
        assert!(lanes.is_empty(), "entries of aborted windows are removed");
        // And the lane still works.
        let again = lanes.ticket("u1").wait().await;
        drop(again);
        assert!(lanes.is_empty());
    }
}
