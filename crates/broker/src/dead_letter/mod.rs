//! The dead-letter headers, in RabbitMQ's format so existing tooling reads them:
//! an `x-death` array (most recent first) of tables with `count`, `reason`, `queue`,
//! `time`, `exchange`, `routing-keys` and, for messages that had one,
//! `original-expiration`; plus `x-first-death-{reason,queue,exchange}` (set once) and
//! `x-last-death-{reason,queue,exchange}` (set every time). A second death in the same
//! queue for the same reason increments that entry's count and moves it to the front.

mod moves;

use holdfast_codec::{AMQPValue, FieldArray, FieldTable, LongString, ShortString, basic};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    /// Rejected or nacked with `requeue=false`.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// A length limit pushed it out (or refused it, with `reject-publish-dlx`).
    Maxlen,
    /// It was returned more often than `x-delivery-limit` allows.
    DeliveryLimit,
}

impl DeathReason {
    /// Its code in a park record.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            DeathReason::Rejected => 1,
            DeathReason::Expired => 2,
            DeathReason::Maxlen => 3,
            DeathReason::DeliveryLimit => 4,
        }
    }

    /// The reason a park record names.
    #[must_use]
    pub fn from_code(code: u8) -> Option<DeathReason> {
        match code {
            1 => Some(DeathReason::Rejected),
            2 => Some(DeathReason::Expired),
            3 => Some(DeathReason::Maxlen),
            4 => Some(DeathReason::DeliveryLimit),
            _ => None,
        }
    }

    /// The name in `x-death`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Where and why a message died.
#[derive(Debug, Clone)]
pub struct Death<'a> {
    /// The queue it died in.
    pub queue: &'a str,
    /// Why.
    pub reason: DeathReason,
    /// The exchange it had been published to.
    pub exchange: &'a str,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<String>,
    /// Seconds since the UNIX epoch.
    pub time: u64,
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn text_of(value: Option<&AMQPValue>) -> Option<String> {
    crate::arguments::text(value?)
}

fn deaths(headers: &FieldTable) -> Vec<FieldTable> {
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array
            .as_slice()
            .iter()
            .filter_map(|value| match value {
                AMQPValue::FieldTable(table) => Some(table.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Returns the properties of the dead-lettered copy: `x-death` and the first/last death
/// headers updated, `expiration` removed (kept in `x-death` as `original-expiration`).
#[must_use]
pub fn record_death(
    properties: &basic::AMQPProperties,
    death: &Death<'_>,
) -> basic::AMQPProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut entries = deaths(&headers);
    let existing = entries.iter().position(|entry| {
        text_of(entry.inner().get("queue")).as_deref() == Some(death.queue)
            && text_of(entry.inner().get("reason")).as_deref() == Some(death.reason.as_str())
    });
    let mut entry = match existing {
        Some(index) => {
            let mut entry = entries.remove(index);
            let count = match entry.inner().get("count") {
                Some(AMQPValue::LongLongInt(count)) => *count,
                Some(AMQPValue::LongInt(count)) => i64::from(*count),
                _ => 0,
            };
            entry.insert(
                ShortString::from("count"),
                AMQPValue::LongLongInt(count + 1),
            );
            entry
        }
        None => {
            let mut entry = FieldTable::default();
            entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            entry.insert(ShortString::from("reason"), long(death.reason.as_str()));
            entry.insert(ShortString::from("queue"), long(death.queue));
            entry.insert(ShortString::from("exchange"), long(death.exchange));
            let keys = death
                .routing_keys
                .iter()
                .map(|key| long(key))
                .collect::<Vec<_>>();
            entry.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(FieldArray::from(keys)),
            );
            if let Some(expiration) = properties.expiration() {
                entry.insert(
                    ShortString::from("original-expiration"),
                    long(expiration.as_str()),
                );
            }
            entry
        }
    };
    entry.insert(ShortString::from("time"), AMQPValue::Timestamp(death.time));
    entries.insert(0, entry);
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(
            entries
                .into_iter()
                .map(AMQPValue::FieldTable)
                .collect::<Vec<_>>(),
        )),
    );
    if !headers.contains_key("x-first-death-reason") {
        headers.insert(
            ShortString::from("x-first-death-reason"),
            long(death.reason.as_str()),
        );
        headers.insert(ShortString::from("x-first-death-queue"), long(death.queue));
        headers.insert(
            ShortString::from("x-first-death-exchange"),
            long(death.exchange),
        );
    }
    headers.insert(
        ShortString::from("x-last-death-reason"),
        long(death.reason.as_str()),
    );
    headers.insert(ShortString::from("x-last-death-queue"), long(death.queue));
    headers.insert(
        ShortString::from("x-last-death-exchange"),
        long(death.exchange),
    );
    without_expiration(properties).with_headers(headers)
}

/// The same properties minus `expiration` (the copy's TTL is the target queue's).
fn without_expiration(properties: &basic::AMQPProperties) -> basic::AMQPProperties {
    let mut copy = basic::AMQPProperties::default();
    if let Some(v) = properties.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = properties.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = properties.headers() {
        copy = copy.with_headers(v.clone());
    }
    if let Some(v) = properties.delivery_mode() {
        copy = copy.with_delivery_mode(*v);
    }
    if let Some(v) = properties.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = properties.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = properties.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = properties.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = properties.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = properties.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = properties.user_id() {
        copy = copy.with_user_id(v.clone());
    }
    if let Some(v) = properties.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = properties.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy
}

/// Whether dead-lettering to `target` closes a cycle that no client ever interrupted
/// (RabbitMQ drops the message then): walking the deaths from the most recent, `target`
/// appears before any `rejected` death. A rejection anywhere in between means a client
/// is involved, and the message goes on.
#[must_use]
pub fn is_cycle(headers: Option<&FieldTable>, target: &str) -> bool {
    let Some(headers) = headers else {
        return false;
    };
    for entry in deaths(headers) {
        if text_of(entry.inner().get("reason")).as_deref() == Some("rejected") {
            return false;
        }
        if text_of(entry.inner().get("queue")).as_deref() == Some(target) {
            return true;
        }
    }
    false
}

/// The routing keys a message was published with: its key plus `CC` header values.
#[must_use]
pub fn routing_keys(routing_key: &str, headers: Option<&FieldTable>) -> Vec<String> {
    let mut keys = vec![routing_key.to_owned()];
    if let Some(AMQPValue::FieldArray(cc)) = headers.and_then(|h| h.inner().get("CC")) {
        keys.extend(
            cc.as_slice()
                .iter()
                .filter_map(|value| text_of(Some(value))),
        );
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn death(queue: &'static str, reason: DeathReason) -> Death<'static> {
        Death {
            queue,
            reason,
            exchange: "orders",
            routing_keys: vec!["created".into()],
            time: 1_700_000_000,
        }
    }

    fn header<'a>(properties: &'a basic::AMQPProperties, name: &str) -> Option<&'a AMQPValue> {
        properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
    }

    #[test]
    fn deaths_accumulate_in_rabbitmq_format() {
        let original = basic::AMQPProperties::default().with_expiration("5000".into());
        let once = record_death(&original, &death("work", DeathReason::Rejected));
        assert_eq!(once.expiration(), &None);
        let entries = deaths(once.headers().as_ref().expect("headers"));
        assert_eq!(entries.len(), 1);
        let entry = entries[0].inner();
        assert_eq!(entry.get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(text_of(entry.get("reason")).as_deref(), Some("rejected"));
        assert_eq!(text_of(entry.get("queue")).as_deref(), Some("work"));
        assert_eq!(text_of(entry.get("exchange")).as_deref(), Some("orders"));
        assert_eq!(
            text_of(entry.get("original-expiration")).as_deref(),
            Some("5000")
        );
        assert_eq!(
            entry.get("time"),
            Some(&AMQPValue::Timestamp(1_700_000_000))
        );
        let twice = record_death(&once, &death("retry", DeathReason::Expired));
        let thrice = record_death(&twice, &death("work", DeathReason::Rejected));
        let entries = deaths(thrice.headers().as_ref().expect("headers"));
        assert_eq!(entries.len(), 2, "same queue and reason share an entry");
        assert_eq!(
            text_of(entries[0].inner().get("queue")).as_deref(),
            Some("work")
        );
        assert_eq!(
            entries[0].inner().get("count"),
            Some(&AMQPValue::LongLongInt(2))
        );
        assert_eq!(
            text_of(header(&thrice, "x-first-death-queue")).as_deref(),
            Some("work")
        );
        assert_eq!(
            text_of(header(&thrice, "x-first-death-reason")).as_deref(),
            Some("rejected")
        );
        assert_eq!(
            text_of(header(&twice, "x-last-death-reason")).as_deref(),
            Some("expired")
        );
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let expired = record_death(
            &basic::AMQPProperties::default(),
            &death("a", DeathReason::Expired),
        );
        assert!(is_cycle(expired.headers().as_ref(), "a"));
        assert!(!is_cycle(expired.headers().as_ref(), "b"));
        let then_rejected = record_death(&expired, &death("b", DeathReason::Rejected));
        assert!(!is_cycle(then_rejected.headers().as_ref(), "a"));
        assert!(!is_cycle(None, "a"));
    }
}
