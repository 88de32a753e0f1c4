//! The queues around a consumed queue: `<queue>.dlq` for dead letters and
//! `<queue>.retry.<ms>` delay queues whose TTL dead-letters messages back to `<queue>`.
//! Only standard arguments are used, so the same topology works on RabbitMQ.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The dead-letter queue of `queue`.
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The delay queue of `queue` that holds messages for `delay_ms`.
#[must_use]
pub fn retry_queue(queue: &str, delay_ms: u64) -> String {
    format!("{queue}.retry.{delay_ms}")
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares `queue` (durable, dead-lettering to the default exchange with routing key
/// `<queue>.dlq`, plus `arguments`) and its dead-letter queue. Idempotent; a queue that
/// exists with other arguments makes the broker close the channel with 406.
///
/// # Errors
/// The broker's refusal or a lost connection.
pub async fn declare_topology(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    let dlq = dead_letter_queue(queue);
    channel
        .queue_declare(dlq.as_str().into(), durable(), FieldTable::default())
        .await?;
    let mut arguments = arguments;
    arguments.insert(ShortString::from("x-dead-letter-exchange"), text(""));
    arguments.insert(ShortString::from("x-dead-letter-routing-key"), text(&dlq));
    channel
        .queue_declare(queue.into(), durable(), arguments)
        .await?;
    Ok(())
}

/// Declares the delay queue of `queue` for `delay_ms`.
pub(crate) async fn declare_retry_queue(
    channel: &Channel,
    queue: &str,
    delay_ms: u64,
) -> Result<(), lapin::Error> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
    );
    arguments.insert(ShortString::from("x-dead-letter-exchange"), text(""));
    arguments.insert(ShortString::from("x-dead-letter-routing-key"), text(queue));
    channel
        .queue_declare(
            retry_queue(queue, delay_ms).as_str().into(),
            durable(),
            arguments,
        )
        .await?;
    Ok(())
}
