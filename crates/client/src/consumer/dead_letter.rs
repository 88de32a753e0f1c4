//! [`replay_dead_letters`]: moves dead-lettered messages back to the queue they died in,
//! for after a person fixed what made them fail (the article's "人工干预").

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};

use super::ATTEMPT_HEADER;
use crate::Error;

/// What [`replay_dead_letters`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages republished to their origin queue and removed from the dead-letter queue.
    pub replayed: u64,
    /// Messages left in the dead-letter queue because their origin is unknown (no
    /// `x-death` header) or the republish was not confirmed.
    pub skipped: u64,
}

/// The queue a dead letter came from: the queue of its `rejected` death, else of its
/// most recent death.
fn origin_queue(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get(&ShortString::from("x-death"))? else {
        return None;
    };
    let entries: Vec<&FieldTable> = deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .collect();
    let text = |t: &FieldTable, key: &str| match t.inner().get(&ShortString::from(key)) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    };
    entries
        .iter()
        .find(|t| text(t, "reason").as_deref() == Some("rejected"))
        .or_else(|| entries.first())
        .and_then(|t| text(t, "queue"))
}

/// Republishes up to `limit` messages of `dead_letter_queue` to the queue each died in
/// (through the default exchange, with publisher confirms, attempt count reset), and
/// acknowledges each only after its copy is confirmed, so a crash mid-way duplicates at
/// most one message (same message id) and loses none.
///
/// # Errors
/// A lost connection or a broker refusal; messages replayed before it stay replayed.
pub async fn replay_dead_letters(
    url: &str,
    dead_letter_queue: &str,
    limit: u64,
) -> Result<ReplayReport, Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut report = ReplayReport::default();
    while report.replayed + report.skipped < limit {
        let Some(message) = channel
            .basic_get(dead_letter_queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let Some(origin) = origin_queue(&headers) else {
            // Left unacknowledged: it returns to the queue when the channel closes.
            report.skipped += 1;
            continue;
        };
        let headers: FieldTable = headers
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != ATTEMPT_HEADER)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let properties = delivery.properties.clone().with_headers(headers);
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                origin.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        if matches!(confirm, lapin::Confirmation::Ack(None)) {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            report.replayed += 1;
        } else {
            tracing::warn!(origin, "replay not confirmed; the dead letter stays");
            report.skipped += 1;
        }
    }
    let _ = channel.close(200, ShortString::from("replayed")).await;
    let _ = connection.close(200, ShortString::from("replayed")).await;
    Ok(report)
}
