//! The tests that change the shared broker for everyone: they stop it, grow
//! it into a cluster, or lower a broker-wide timeout. They are a test binary
//! of their own because `cargo test` runs test binaries one after another:
//! nothing of `tests/it` runs beside them, whatever the thread count or
//! the order libtest starts tests in. Within this binary each test calls
//! `common::broker_lock::alone()` first, so they also run one at a time.
//!
//! Add a test here only when it changes the broker for other tests; anything
//! that works on its own exchange and queues belongs in `tests/it`, which
//! runs its tests side by side.

#[path = "../it/common/mod.rs"]
mod common;

mod broker_restart;
mod consumer_timeout;
mod ledger_pg_restart;
mod node_loss;
