//! Integration tests: the real `holdfast` binary, driven by lapin (a third-party client)
//! and by raw bytes over TCP.

mod alarms;
mod bad_input;
mod bench;
mod confirms_tx;
mod consumers;
mod dead_letter;
mod dead_letter_pending;
mod dedup;
mod definitions;
mod delayed;
mod disconnects;
mod durability;
mod java_seeds;
mod outbox_cli;
mod power_loss;
mod protocol;
mod queues;
mod raw;
mod replication;
mod routing;
mod support;

use std::path::Path;

use holdfast_testkit::Server;

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_holdfast"))
}

pub fn start() -> Server {
    Server::start(binary(), &[])
}
