//! Synchronous send: each call returns after the broker's publisher confirm.
//!
//! `cargo run --release -- server` in one terminal, then
//! `cargo run -p holdfast-client --example send [amqp-url]`.

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
        .declare_queue("example.send", durable, FieldTable::default())
        .await?;
    for i in 0..10 {
        let c = producer
            .send(Message::to_queue(
                "example.send",
                format!("order {i} created"),
            ))
            .await?;
        println!("confirmed {} after {} attempt(s)", c.message_id, c.attempts);
    }
    producer.close().await
}
