//! `holdfast outbox list|stats|retry|discard` against a real application database whose
//! rows a real relay gave up on.

use std::process::Command;
use std::time::Duration;

use holdfast_client::outbox::{OutboxStatus, RelayConfig, connect_sqlite};
use holdfast_client::{Message, Outbox, Producer, ProducerConfig, RetryPolicy};
use holdfast_testkit::services::Postgres;

use crate::{binary, start};

fn outbox_cli(database: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary())
        .arg("outbox")
        .args(args)
        .args(["--database", database])
        .output()
        .expect("run holdfast outbox");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Three rows for a queue that does not exist, relayed once each: all end up failed.
async fn failed_rows<DB: holdfast_client::Backend>(
    outbox: &Outbox<DB>,
    url: &str,
    enqueue: impl AsyncFnOnce(&Outbox<DB>),
) {
    outbox.migrate().await.expect("migrate");
    enqueue(outbox).await;
    let producer = Producer::connect(ProducerConfig::new(url).retry(RetryPolicy::no_retry()))
        .await
        .expect("producer");
    let relay = outbox
        .relay(
            producer,
            RelayConfig {
                max_attempts: 1,
                poll_interval: Duration::from_millis(10),
                ..RelayConfig::default()
            },
        )
        .spawn();
    for _ in 0..500 {
        if outbox.counts().await.expect("counts").failed == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.shutdown().await;
    assert_eq!(outbox.counts().await.expect("counts").failed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_lists_retries_and_discards_failed_rows() {
    let server = start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.db");
    let db = path.to_str().expect("utf-8").to_owned();
    let pool = connect_sqlite(&db).await.expect("sqlite");
    let outbox = Outbox::new(pool.clone());
    failed_rows(&outbox, &server.url(), async |outbox| {
        let mut tx = pool.begin().await.expect("begin");
        for id in ["m-1", "m-2", "m-3"] {
            outbox
                .enqueue(&mut tx, Message::to_queue("missing", "x").message_id(id))
                .await
                .expect("enqueue");
        }
        tx.commit().await.expect("commit");
    })
    .await;
    let ids: Vec<String> = outbox
        .list(Some(OutboxStatus::Failed), 10)
        .await
        .expect("list")
        .iter()
        .map(|r| r.id.to_string())
        .collect();

    let (ok, out, err) = outbox_cli(&db, &["list", "--status", "failed"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("m-1") && out.contains("m-3") && out.contains("(3 rows)"),
        "{out}"
    );
    assert!(out.contains("312"), "the last error is shown: {out}");
    let (ok, out, _) = outbox_cli(&db, &["list", "--json"]);
    assert!(ok);
    let first: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("a line")).expect("json");
    assert_eq!(first["status"], "failed");
    assert_eq!(first["attempts"], 1);

    let (ok, out, err) = outbox_cli(&db, &["retry", &ids[0]]);
    assert!(ok, "{err}");
    assert!(out.contains("1 of 1"), "{out}");
    let (ok, out, err) = outbox_cli(&db, &["discard", &ids[1]]);
    assert!(ok, "{err}");
    assert!(out.contains("1 of 1"), "{out}");
    // Retrying a pending row, or a row that does not exist, changes nothing: exit 1.
    let (ok, _, err) = outbox_cli(&db, &["retry", &ids[0], "99999"]);
    assert!(!ok);
    assert!(
        err.contains("2 of the given rows were not changed"),
        "{err}"
    );
    let (ok, out, _) = outbox_cli(&db, &["stats"]);
    assert!(ok);
    assert_eq!(out, "pending 1\nsent 0\nfailed 1\ndiscarded 1\n");
    let (ok, out, _) = outbox_cli(&db, &["retry", "--all-failed"]);
    assert!(ok);
    assert!(out.contains("1 failed rows back to pending"), "{out}");
    let row = outbox
        .get(ids[0].parse().expect("id"))
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (row.status(), row.attempts),
        (Some(OutboxStatus::Pending), 0)
    );

    // Clear errors, no damage.
    let (ok, _, err) = outbox_cli("mysql://db/app", &["stats"]);
    assert!(!ok);
    assert!(err.contains("unsupported database URL"), "{err}");
    let (ok, _, err) = outbox_cli("/nonexistent/app.db", &["stats"]);
    assert!(!ok);
    assert!(
        err.contains("no SQLite database at /nonexistent/app.db"),
        "{err}"
    );
    let (ok, _, err) = outbox_cli(&db, &["discard"]);
    assert!(!ok);
    assert!(err.contains("required"), "{err}");
    assert_eq!(outbox.counts().await.expect("counts").pending, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_a_postgresql_outbox() {
    let server = start();
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("postgres");
    let url = pg.url();
    let pool = holdfast_client::sqlx::postgres::PgPoolOptions::new()
        .connect(&url)
        .await
        .expect("pool");
    let outbox = Outbox::new(pool.clone());
    failed_rows(&outbox, &server.url(), async |outbox| {
        let mut tx = pool.begin().await.expect("begin");
        for id in ["p-1", "p-2", "p-3"] {
            outbox
                .enqueue(&mut tx, Message::to_queue("missing", "x").message_id(id))
                .await
                .expect("enqueue");
        }
        tx.commit().await.expect("commit");
    })
    .await;
    let (ok, out, err) = outbox_cli(&url, &["list", "--status", "failed"]);
    assert!(ok, "{err}");
    assert!(out.contains("p-2") && out.contains("(3 rows)"), "{out}");
    let (ok, out, err) = outbox_cli(&url, &["retry", "--all-failed"]);
    assert!(ok, "{err}");
    assert!(out.contains("3 failed rows"), "{out}");
    let bad = url
        .replace("postgres@", "postgres:secret@")
        .replace(&pg.port().to_string(), "1");
    let (ok, _, err) = outbox_cli(&bad, &["stats"]);
    assert!(!ok);
    assert!(
        err.contains("cannot connect") && !err.contains("secret"),
        "{err}"
    );
}
