//! The integration tests: one test binary, one module per behaviour, so the
//! suite links once and libtest runs the tests side by side on its threads
//! (`RUST_TEST_THREADS` in `.cargo/config.toml`: they mostly wait on timers,
//! the broker and child processes, not on the CPU).
//!
//! They share one RabbitMQ: each test gets its own exchange and queue names
//! from `common::TestEnv`, which also takes the broker shared
//! (`common::broker_lock`). The few tests that stop the broker, grow it into a
//! cluster or change a broker-wide setting are a binary of their own,
//! `tests/alone`, which `cargo test` runs apart from this one.
//!
//! To add a behaviour: put its tests in `tests/it/<name>.rs`, start the file
//! with a `//!` line saying what it checks, add `mod <name>;` below, and reach
//! the harness as `crate::common` (`use crate::common::{TestEnv, ...};`).
//! Build every test's broker state through `TestEnv` (or call
//! `common::broker_lock::share_broker()` first when a test reaches the broker
//! some other way); a test that changes the broker for everyone goes in
//! `tests/alone` instead. A test that needs a machine-wide resource of its
//! own (a fixed port, a shared build directory) takes a lock for it in its
//! module, as `node` does for the example's build.

mod common;

mod compose;
mod deploy;
mod direct;
mod edges;
mod event_schema;
mod faults;
mod held_fault;
mod held_fault_edges;
mod ledger;
mod ledger_ack;
mod ledger_claim;
mod ledger_edges;
mod node;
mod operations;
mod operator;
mod pipeline;
mod settlement;
mod sim_credits;
mod subscription;
mod subscription_schema;
mod trace;
mod wechat_client;
