//! Integration tests of the producer against a real `holdfast` process.
//!
//! The broker binary is the one cargo builds for the `holdfast` workspace member:
//! `cargo test --workspace` (and CI's `cargo test --release --workspace --all-targets`)
//! builds it before running any test; with `cargo test -p holdfast-client` build it first
//! with `cargo build -p holdfast` (same profile).

mod producer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use holdfast_client::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use holdfast_client::lapin::types::{AMQPValue, FieldTable};
use holdfast_client::{Producer, ProducerConfig, RetryPolicy};
use holdfast_testkit::Server;

/// `target/<profile>/holdfast`, next to `target/<profile>/deps/<this test>`.
pub fn broker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join(format!("holdfast{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p holdfast` with the same profile \
         (`cargo test --workspace` builds it)",
        binary.display()
    );
    binary
}

pub fn start() -> Server {
    Server::start(&broker_binary(), &[])
}

pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
        multiplier: 2.0,
        full_jitter: true,
        deadline: Duration::from_secs(60),
    }
}

pub async fn producer(server: &Server, retry: RetryPolicy) -> Producer {
    Producer::connect(
        ProducerConfig::new(server.url())
            .confirm_timeout(Duration::from_secs(5))
            .retry(retry),
    )
    .await
    .expect("producer connects")
}

pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

pub fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert((*k).into(), v.clone());
    }
    table
}

/// Removes every message of `queue` and counts them by message id.
pub async fn drain(server: &Server, queue: &str) -> HashMap<String, usize> {
    let conn = server.connect().await;
    let channel = conn.create_channel().await.expect("channel");
    let mut ids = HashMap::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let id = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}
