//! Asynchronous send: 10,000 messages in flight at once, confirms awaited afterwards,
//! plus one send with a callback.
//!
//! `cargo run --release -- server` in one terminal, then
//! `cargo run -p holdfast-client --example send_async [amqp-url]`.

use std::time::Instant;

use holdfast_client::lapin::{options::QueueDeclareOptions, types::FieldTable};
use holdfast_client::{Message, Producer, ProducerConfig};

#[tokio::main]
async fn main() -> Result<(), holdfast_client::Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let producer = Producer::connect(ProducerConfig::new(url)).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    producer
        .declare_queue("example.async", durable, FieldTable::default())
        .await?;
    let started = Instant::now();
    let handles: Vec<_> = (0..10_000)
        .map(|i| producer.send_async(Message::to_queue("example.async", format!("event {i}"))))
        .collect();
    let mut failed = 0;
    for handle in handles {
        if let Err(e) = handle.await {
            eprintln!("not confirmed: {e}");
            failed += 1;
        }
    }
    println!(
        "10000 sends, {failed} failed, {:.0} msg/s",
        10_000.0 / started.elapsed().as_secs_f64()
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    producer.send_with_callback(
        Message::to_queue("example.async", "with callback"),
        move |r| {
            println!("callback: {r:?}");
            let _ = tx.send(());
        },
    );
    let _ = rx.await;
    producer.close().await
}
