//! Integration tests of the producer against a real `holdfast` process.
//!
//! The broker binary is the one cargo builds for the `holdfast` workspace member:
//! `cargo test --workspace` (and CI's `cargo test --release --workspace --all-targets`)
//! builds it before running any test; with `cargo test -p holdfast-client` build it first
//! with `cargo build -p holdfast` (same profile).

mod consumer;
mod outbox;
mod producer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use holdfast_client::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use holdfast_client::lapin::types::{AMQPValue, FieldTable};
use holdfast_client::{Producer, ProducerConfig, RetryPolicy};
use holdfast_testkit::Server;
use holdfast_testkit::services::{Postgres, RabbitMq};

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

/// A broker a test runs against: its own Holdfast process, or the RabbitMQ shared by
/// the test run (queue names get a unique suffix there).
pub enum Broker {
    Holdfast(Server),
    RabbitMq(&'static RabbitMq),
}

impl Broker {
    pub fn holdfast() -> Broker {
        Broker::Holdfast(start())
    }

    pub fn rabbitmq() -> Broker {
        Broker::RabbitMq(RabbitMq::shared())
    }

    pub fn url(&self) -> String {
        match self {
            Broker::Holdfast(s) => s.url(),
            Broker::RabbitMq(r) => r.url(),
        }
    }

    /// A queue name no other test uses on this broker.
    pub fn queue(&self, base: &str) -> String {
        match self {
            Broker::Holdfast(_) => base.to_owned(),
            Broker::RabbitMq(_) => format!("{base}-{}", uuid::Uuid::now_v7()),
        }
    }

    async fn connect(&self) -> holdfast_client::lapin::Connection {
        holdfast_client::lapin::Connection::connect(
            &self.url(),
            holdfast_client::lapin::ConnectionProperties::default(),
        )
        .await
        .expect("connect")
    }

    /// Removes every message of `queue` and counts them by message id.
    pub async fn drain(&self, queue: &str) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for (id, _, _) in self.drain_with_headers(queue).await {
            *ids.entry(id).or_insert(0) += 1;
        }
        ids
    }

    /// Removes every message of `queue`: (message id, body, headers as debug text).
    pub async fn drain_with_headers(&self, queue: &str) -> Vec<(String, Vec<u8>, String)> {
        let conn = self.connect().await;
        let channel = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let props = &msg.delivery.properties;
            let id = props
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let headers = props
                .headers()
                .as_ref()
                .map(headers_text)
                .unwrap_or_default();
            out.push((id, msg.delivery.data.clone(), headers));
        }
        let _ = conn.close(200, "drained".into()).await;
        out
    }

    /// How many messages `queue` holds.
    pub async fn message_count(&self, queue: &str) -> u32 {
        let conn = self.connect().await;
        let channel = conn.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = conn.close(200, "counted".into()).await;
        q.message_count()
    }

    /// Deletes `queue` (RabbitMQ outlives the test).
    pub async fn delete_queue(&self, queue: &str) {
        let conn = self.connect().await;
        let channel = conn.create_channel().await.expect("channel");
        let _ = channel
            .queue_delete(
                queue.into(),
                holdfast_client::lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        let _ = conn.close(200, "deleted".into()).await;
    }
}

/// Keeps a test database alive for the test's duration.
pub enum DbGuard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] Postgres),
}

/// A SQLite database in a fresh temporary file.
pub async fn sqlite_pool() -> (holdfast_client::sqlx::SqlitePool, DbGuard) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.db");
    let pool = holdfast_client::outbox::connect_sqlite(path.to_str().expect("utf-8 path"))
        .await
        .expect("sqlite");
    (pool, DbGuard::Sqlite(dir))
}

/// A database on a private PostgreSQL server.
pub async fn postgres_pool() -> (holdfast_client::sqlx::PgPool, DbGuard) {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("postgres starts");
    let url = pg.url();
    let pool = holdfast_client::sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("postgres pool");
    (pool, DbGuard::Postgres(pg))
}

/// Headers as readable text (strings as UTF-8, not byte lists), for assertions.
pub fn headers_text(table: &FieldTable) -> String {
    fn value(v: &AMQPValue) -> String {
        match v {
            AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
            AMQPValue::FieldArray(a) => {
                let items: Vec<String> = a.as_slice().iter().map(value).collect();
                format!("[{}]", items.join(", "))
            }
            AMQPValue::FieldTable(t) => headers_text(t),
            other => format!("{other:?}"),
        }
    }
    let fields: Vec<String> = table
        .inner()
        .iter()
        .map(|(k, v)| format!("{}: {}", k.as_str(), value(v)))
        .collect();
    format!("{{{}}}", fields.join(", "))
}
