//! Who may use the shared RabbitMQ while tests run side by side in one
//! process. Most tests share it (each with its own exchange and queue names,
//! see `TestEnv`); a few change it for everyone: they stop it, grow it into a
//! cluster or lower a broker-wide timeout. Those live in their own test
//! binary (`tests/alone`), which `cargo test` runs apart from `tests/it`;
//! this readers-writer lock keeps them apart within a binary: `TestEnv::new`
//! takes the shared side, [`alone`] the exclusive one. In `tests/alone`
//! every test takes it exclusively, so they run one at a time whatever
//! `RUST_TEST_THREADS` says.
//!
//! Either side is held by the test's thread until that thread ends (libtest
//! runs each test on its own thread, which ends after the test's tokio
//! runtime has been dropped, so after every task, in-process service and
//! child replica of the test is gone, even when the test panicked). Taking
//! it again on the same thread is a no-op, so a test may build several
//! `TestEnv`s. Tokio's lock is fair: once an `alone` test waits, no further
//! test starts sharing, so it cannot be starved; and unlike std's it is not
//! poisoned by a panicking holder.
//!
//! Call these from the test's own body (the test's thread), never from a
//! spawned task: a guard taken on a runtime worker thread would be a second
//! holder, and one queued behind a waiting `alone` test would deadlock.

use std::cell::RefCell;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static BROKER: RwLock<()> = RwLock::const_new(());

/// What this test thread holds, if anything.
enum Held {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

fn holds_any() -> bool {
    HELD.with(|h| h.borrow().is_some())
}

fn keep(held: Held) {
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

/// Shares the broker for the rest of this test; waits while an `alone` test
/// has it. `TestEnv::new` calls it; a test that reaches the broker without a
/// `TestEnv` (e.g. runs a command against `amqp_url()`) calls it first.
pub async fn share_broker() {
    if !holds_any() {
        keep(Held::Shared(BROKER.read().await));
    }
}

/// As [`share_broker`], for a test that is not async (blocks the thread).
pub fn share_broker_blocking() {
    if !holds_any() {
        keep(Held::Shared(BROKER.blocking_read()));
    }
}

/// Has the broker alone for the rest of this test: waits until every test
/// sharing it has ended, and keeps any other from starting meanwhile. Call
/// it first, before `TestEnv::new`.
pub async fn alone() {
    assert!(
        !holds_any(),
        "alone() must come first in a test, before anything shares the broker"
    );
    keep(Held::Alone(BROKER.write().await));
}
