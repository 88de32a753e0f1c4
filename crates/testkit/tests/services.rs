//! The external services of `holdfast_testkit::services` start (installing themselves when
//! missing) and serve requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Instant;

use holdfast_testkit::services::{Postgres, RabbitMq, Redis};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[test]
fn postgres_starts_and_serves_a_new_database() {
    let started = Instant::now();
    let mut postgres = Postgres::start();
    eprintln!(
        "PostgreSQL ready in {:?} at {}",
        started.elapsed(),
        postgres.url()
    );
    assert_eq!(
        postgres.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", postgres.port())
    );

    let url = postgres.create_database("holdfast_test");
    assert!(url.ends_with("/holdfast_test"), "{url}");
    // The psql binary itself, on the returned URL, so the URL is checked too.
    let output = Command::new(postgres.bin_dir().join("psql"))
        .arg(&url)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "SELECT 1", "-c", "SELECT current_database()"])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "1\nholdfast_test\n"
    );

    // Committed data survives a crash and a restart on the same port.
    postgres.psql(
        "holdfast_test",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    );
    postgres.kill9();
    let restarted = Instant::now();
    postgres.restart();
    eprintln!("PostgreSQL restarted in {:?}", restarted.elapsed());
    assert_eq!(postgres.psql("holdfast_test", "SELECT v FROM t"), "42");
}

#[test]
fn redis_starts_and_answers_ping() {
    let started = Instant::now();
    let redis = Redis::start();
    eprintln!("Redis ready in {:?} at {}", started.elapsed(), redis.url());
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));

    let mut stream = TcpStream::connect(("127.0.0.1", redis.port())).expect("connect to Redis");
    stream.write_all(b"PING\r\n").expect("send PING");
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).expect("read the reply");
    assert_eq!(&reply, b"+PONG\r\n");
}

#[tokio::test]
async fn rabbitmq_is_shared_and_declares_a_queue() {
    let started = Instant::now();
    let rabbitmq = RabbitMq::shared();
    eprintln!(
        "RabbitMQ ready in {:?} at {}",
        started.elapsed(),
        rabbitmq.url()
    );
    assert!(
        std::ptr::eq(rabbitmq, RabbitMq::shared()),
        "one instance per process"
    );

    let connection = Connection::connect(&rabbitmq.url(), ConnectionProperties::default())
        .await
        .expect("lapin connects to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "holdfast-testkit-services".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    assert_eq!(queue.name().as_str(), "holdfast-testkit-services");
    connection.close(200, "done".into()).await.expect("close");
}
