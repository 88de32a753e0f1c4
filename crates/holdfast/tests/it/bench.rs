//! `holdfast bench` smoke runs: every scenario, tiny and short, against a real server,
//! through the built binary; the JSON line is parsed and checked for sense (never for
//! speed: no test asserts a timing).

use std::process::{Command, Output};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;

use crate::{binary, start};

/// Runs `holdfast bench <args>`, quiet.
fn bench(args: &[&str]) -> Output {
    Command::new(binary())
        .arg("bench")
        .args(args)
        .arg("--quiet")
        .env("HOLDFAST_LOG", "warn")
        .output()
        .expect("holdfast bench runs")
}

/// Runs a scenario that must succeed; its JSON line.
fn bench_json(args: &[&str]) -> Value {
    let output = bench(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "holdfast bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let json_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(json_lines.len(), 1, "exactly one JSON line:\n{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some(json_lines[0]),
        "the JSON line comes last"
    );
    assert!(
        stdout.contains("msg/s"),
        "a human summary precedes it:\n{stdout}"
    );
    serde_json::from_str(json_lines[0]).expect("valid JSON")
}

fn assert_sensible(report: &Value, scenario: &str, messages: u64) {
    assert_eq!(report["scenario"], scenario, "{report}");
    assert_eq!(report["messages"].as_u64(), Some(messages), "{report}");
    assert!(
        report["msgs_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
    assert!(
        report["mib_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
    assert!(
        report["duration_secs"].as_f64().is_some_and(|d| d > 0.0),
        "{report}"
    );
    assert!(
        report["host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:"))
    );
    assert!(report["params"].is_object(), "{report}");
}

fn assert_latency(report: &Value) {
    let latency = &report["latency_us"];
    let p50 = latency["p50"].as_f64().expect("p50");
    let p99 = latency["p99"].as_f64().expect("p99");
    let p999 = latency["p999"].as_f64().expect("p999");
    let max = latency["max"].as_f64().expect("max");
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "{report}"
    );
}

#[tokio::test]
async fn publish_modes_count_what_they_were_asked() {
    let server = start();
    let url = server.url();
    let confirmed = bench_json(&[
        "publish",
        "--url",
        &url,
        "--messages",
        "2000",
        "--confirm",
        "--window",
        "64",
        "--producers",
        "2",
        "--size",
        "64",
    ]);
    assert_sensible(&confirmed, "publish", 2000);
    assert_latency(&confirmed);
    assert_eq!(confirmed["nacked"], 0);
    assert_eq!(confirmed["params"]["mode"], "confirm");

    let tx = bench_json(&[
        "publish",
        "--url",
        &url,
        "--messages",
        "500",
        "--tx-batch",
        "50",
        "--size",
        "16",
    ]);
    assert_sensible(&tx, "publish", 500);
    assert_latency(&tx);
    assert_eq!(tx["latency_kind"], "commit");

    let fire = bench_json(&[
        "publish",
        "--url",
        &url,
        "--messages",
        "2000",
        "--transient",
        "--size",
        "16",
        "--producers",
        "2",
    ]);
    assert_sensible(&fire, "publish", 2000);
    assert_eq!(fire["params"]["persistent"], false);
    assert!(fire.get("latency_us").is_none(), "{fire}");
}

#[tokio::test]
async fn consume_drains_a_prefilled_or_kept_queue_and_cleans_up() {
    let server = start();
    let url = server.url();
    let drained = bench_json(&[
        "consume",
        "--url",
        &url,
        "--prefill",
        "2000",
        "--consumers",
        "2",
        "--prefetch",
        "200",
        "--ack-every",
        "10",
        "--size",
        "64",
    ]);
    assert_sensible(&drained, "consume", 2000);
    assert_eq!(drained["prefilled"], 2000);

    // A queue kept by a publish run is not filled again.
    let kept = bench_json(&[
        "publish",
        "--url",
        &url,
        "--queue",
        "bench-kept",
        "--keep",
        "--messages",
        "300",
        "--confirm",
    ]);
    assert_sensible(&kept, "publish", 300);
    let auto = bench_json(&[
        "consume",
        "--url",
        &url,
        "--queue",
        "bench-kept",
        "--prefill",
        "300",
        "--auto-ack",
    ]);
    assert_sensible(&auto, "consume", 300);
    assert_eq!(auto["prefilled"], 0);

    // Without --keep the queue is gone afterwards.
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let gone = channel
        .queue_declare(
            "bench-kept".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "the bench deleted its queue");
}

#[tokio::test]
async fn latency_and_fanout_report_percentiles_and_deliveries() {
    let server = start();
    let url = server.url();
    let latency = bench_json(&[
        "latency",
        "--url",
        &url,
        "--rate",
        "1000",
        "--messages",
        "500",
        "--size",
        "32",
    ]);
    assert_sensible(&latency, "latency", 500);
    assert_latency(&latency);
    assert_eq!(latency["sent"], 500);
    assert_eq!(latency["latency_kind"], "end-to-end");

    let fanout = bench_json(&[
        "fanout",
        "--url",
        &url,
        "--queues",
        "3",
        "--messages",
        "500",
        "--size",
        "64",
        "--window",
        "64",
        "--ack-every",
        "10",
    ]);
    assert_sensible(&fanout, "fanout", 500);
    assert_latency(&fanout);
    assert_eq!(fanout["delivered"], 1500);
    assert!(
        fanout["delivered_per_sec"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
}

#[test]
fn bad_urls_and_unreachable_brokers_fail_clearly() {
    let output = bench(&["publish", "--url", "http//nowhere", "--messages", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid AMQP URL"), "{stderr}");

    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f");
    let output = bench(&["publish", "--url", &url, "--messages", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[tokio::test]
async fn outbox_enqueues_then_relays_every_message() {
    let server = start();
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let database = dir.path().join("outbox.db");
    let database = database.to_str().expect("utf-8 path");
    let report = bench_json(&[
        "outbox",
        "--url",
        &url,
        "--database",
        database,
        "--messages",
        "300",
        "--relays",
        "2",
        "--batch",
        "50",
    ]);
    assert_sensible(&report, "outbox", 300);
    assert_latency(&report);
    assert_eq!(report["queue_depth"], 300, "{report}");
    assert!(
        report["enqueue_tx_per_sec"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{report}"
    );
    assert_eq!(report["params"]["database"], "sqlite");

    // The run dropped the tables it created, so a second run starts clean.
    let again = bench_json(&[
        "outbox",
        "--url",
        &url,
        "--database",
        database,
        "--messages",
        "300",
    ]);
    assert_sensible(&again, "outbox", 300);
}

#[tokio::test]
async fn idempotent_consumer_processes_every_message_once() {
    let server = start();
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let database = dir.path().join("effects.db");
    let report = bench_json(&[
        "idempotent",
        "--url",
        &url,
        "--database",
        database.to_str().expect("utf-8 path"),
        "--messages",
        "300",
        "--prefetch",
        "64",
        "--concurrency",
        "4",
    ]);
    assert_sensible(&report, "idempotent", 300);
    assert_eq!(report["effects"], 300, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["params"]["database"], "sqlite");

    // Queue and dead-letter queue are gone afterwards.
    let queue = report["params"]["queue"].as_str().expect("queue name");
    let connection = server.connect().await;
    for name in [queue.to_owned(), format!("{queue}.dlq")] {
        let channel = connection.create_channel().await.expect("channel");
        let gone = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(gone.is_err(), "the bench deleted {name}");
    }
}
