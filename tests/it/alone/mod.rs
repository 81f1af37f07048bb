//! The tests that change the shared broker for everyone: they stop it, grow
//! it into a cluster, or lower a broker-wide timeout. Each calls
//! `common::broker_lock::alone()` first, so it runs while no other test uses
//! the broker. They sit in this module so their names (`alone::...`) sort
//! first: libtest starts tests in name order, so they run at the start,
//! while no test is in flight yet that they would have to wait for.

mod broker_restart;
mod consumer_timeout;
mod node_loss;
