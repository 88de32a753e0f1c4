//! One-way send: no confirm, for data that may be lost (a broker crash or a network
//! failure right after the call loses it silently).
//!
//! `cargo run --release -- server` in one terminal, then
//! `cargo run -p holdfast-client --example send_oneway [amqp-url]`.

use holdfast_client::lapin::{options::QueueDeclareOptions, types::FieldTable};
use holdfast_client::{Message, Producer, ProducerConfig};

#[tokio::main]
async fn main() -> Result<(), holdfast_client::Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let producer = Producer::connect(ProducerConfig::new(url)).await?;
    producer
        .declare_queue(
            "example.metrics",
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for i in 0..1000 {
        let sample =
            Message::to_queue("example.metrics", format!("cpu={}", i % 100)).persistent(false);
        producer.send_oneway(sample).await?;
    }
    println!("1000 samples written (not confirmed)");
    producer.close().await
}
