//! Queue arguments that change behaviour, parsed and checked once at declaration.
//! Unknown arguments are kept as given (and compared on re-declaration) but have no
//! effect, as in RabbitMQ. An invalid value is refused with 406 PRECONDITION_FAILED.

use holdfast_codec::{AMQPValue, FieldTable};

use crate::error::{AmqpException, AmqpResult, ReplyCode};

/// What a full queue does with the next message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message to make room.
    #[default]
    DropHead,
    /// Refuse the new message: publishers in confirm mode get a nack.
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// `x-redelivery-delay`: a consumer's "retry later" (nack or reject with requeue) holds
/// the message back for `initial × multiplier^(n−1)` ms on its n-th retry, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// `x-redelivery-delay`, ms: the first delay.
    pub initial: u64,
    /// `x-redelivery-delay-multiplier` (default 2): growth per retry.
    pub multiplier: u64,
    /// `x-redelivery-delay-max`, ms (default 30 000 or `initial` if larger): the cap.
    pub max: u64,
}

impl Backoff {
    /// The delay before retry number `retry` (1-based).
    #[must_use]
    pub fn delay(&self, retry: u32) -> u64 {
        let mut delay = self.initial;
        for _ in 1..retry {
            delay = delay.saturating_mul(self.multiplier);
            if delay >= self.max {
                break;
            }
        }
        delay.min(self.max)
    }
}

/// The effective behaviour of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuePolicy {
    /// `x-message-ttl`, ms.
    pub message_ttl: Option<u64>,
    /// `x-expires`: delete the queue after this many ms unused.
    pub expires: Option<u64>,
    /// `x-max-length`, messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`, body bytes.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange` ("" is the default exchange).
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-delivery-limit`: returns allowed before the message is dead-lettered.
    pub delivery_limit: Option<u32>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-consumer-timeout`, ms: an unacked delivery older than this closes its channel.
    pub consumer_timeout: Option<u64>,
    /// `x-message-deduplication`: the window size (`x-cache-size`) and key lifetime in
    /// ms (`x-cache-ttl`).
    pub deduplication: Option<(usize, Option<u64>)>,
    /// `x-redelivery-delay` and friends.
    pub redelivery_delay: Option<Backoff>,
}

/// An integer argument of any AMQP integer width (clients differ in which they send).
#[must_use]
pub fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i128::from(*v),
        AMQPValue::ShortShortUInt(v) => i128::from(*v),
        AMQPValue::ShortInt(v) => i128::from(*v),
        AMQPValue::ShortUInt(v) => i128::from(*v),
        AMQPValue::LongInt(v) => i128::from(*v),
        AMQPValue::LongUInt(v) => i128::from(*v),
        AMQPValue::LongLongInt(v) => i128::from(*v),
        _ => return None,
    })
}

/// The text of a string-typed argument.
#[must_use]
pub fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

impl QueuePolicy {
    /// Parses the arguments of `queue.declare`.
    ///
    /// # Errors
    /// 406 PRECONDITION_FAILED naming the argument, in RabbitMQ's words.
    pub fn parse(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<QueuePolicy> {
        let invalid = |name: &str, why: String| {
            AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {why}"),
            )
        };
        let non_negative = |name: &str, value: &AMQPValue, min: i128| -> AmqpResult<u64> {
            let number = integer(value)
                .ok_or_else(|| invalid(name, format!("{{unacceptable_type,{value:?}}}")))?;
            if number < min {
                return Err(invalid(name, format!("{{value_negative,{number}}}")));
            }
            u64::try_from(number)
                .map_err(|_| invalid(name, format!("{{value_too_large,{number}}}")))
        };
        let mut policy = QueuePolicy::default();
        let table = arguments.inner();
        for (name, value) in table {
            match name.as_str() {
                "x-message-ttl" => {
                    policy.message_ttl = Some(non_negative("x-message-ttl", value, 0)?)
                }
                "x-expires" => {
                    let ms = non_negative("x-expires", value, 1).map_err(|_| {
                        invalid(
                            "x-expires",
                            format!("{{value_zero_or_less,{:?}}}", integer(value)),
                        )
                    })?;
                    policy.expires = Some(ms);
                }
                "x-max-length" => policy.max_length = Some(non_negative("x-max-length", value, 0)?),
                "x-max-length-bytes" => {
                    policy.max_length_bytes = Some(non_negative("x-max-length-bytes", value, 0)?);
                }
                "x-delivery-limit" => {
                    let limit = non_negative("x-delivery-limit", value, 0)?;
                    policy.delivery_limit = Some(u32::try_from(limit).unwrap_or(u32::MAX));
                }
                "x-consumer-timeout" => {
                    policy.consumer_timeout = Some(non_negative("x-consumer-timeout", value, 1)?);
                }
                "x-overflow" => {
                    policy.overflow = match text(value).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => {
                            return Err(invalid(
                                "x-overflow",
                                format!("{{unknown_overflow_type,{value:?}}}"),
                            ));
                        }
                    };
                }
                "x-dead-letter-exchange" => {
                    policy.dead_letter_exchange = Some(text(value).ok_or_else(|| {
                        invalid(
                            "x-dead-letter-exchange",
                            format!("{{unacceptable_type,{value:?}}}"),
                        )
                    })?);
                }
                "x-dead-letter-routing-key" => {
                    policy.dead_letter_routing_key = Some(text(value).ok_or_else(|| {
                        invalid(
                            "x-dead-letter-routing-key",
                            format!("{{unacceptable_type,{value:?}}}"),
                        )
                    })?);
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(on) => policy.single_active_consumer = *on,
                    other => {
                        return Err(invalid(
                            "x-single-active-consumer",
                            format!("{{unacceptable_type,{other:?}}}"),
                        ));
                    }
                },
                _ => {}
            }
        }
        if let Some(value) = table.get("x-redelivery-delay") {
            let initial = non_negative("x-redelivery-delay", value, 1)?;
            let multiplier = match table.get("x-redelivery-delay-multiplier") {
                Some(value) => non_negative("x-redelivery-delay-multiplier", value, 1)?,
                None => 2,
            };
            let max = match table.get("x-redelivery-delay-max") {
                Some(value) => non_negative("x-redelivery-delay-max", value, 1)?,
                None => initial.max(30_000),
            };
            policy.redelivery_delay = Some(Backoff {
                initial,
                multiplier,
                max: max.max(initial),
            });
        }
        if matches!(
            table.get("x-message-deduplication"),
            Some(AMQPValue::Boolean(true))
        ) {
            let size = match table.get("x-cache-size") {
                Some(value) => {
                    usize::try_from(non_negative("x-cache-size", value, 1)?).unwrap_or(usize::MAX)
                }
                None => crate::dedup::DEFAULT_CACHE_SIZE,
            };
            let ttl = match table.get("x-cache-ttl") {
                Some(value) => Some(non_negative("x-cache-ttl", value, 1)?),
                None => None,
            };
            policy.deduplication = Some((size, ttl));
        }
        if policy.dead_letter_routing_key.is_some() && policy.dead_letter_exchange.is_none() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!(
                    "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': Key x-dead-letter-exchange should be defined"
                ),
            ));
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_codec::{LongString, ShortString};

    fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in pairs {
            table.insert(ShortString::from(*name), value.clone());
        }
        table
    }

    #[test]
    fn backoff_grows_and_caps() {
        let backoff = Backoff {
            initial: 100,
            multiplier: 3,
            max: 1000,
        };
        assert_eq!(
            (1..=5).map(|n| backoff.delay(n)).collect::<Vec<_>>(),
            vec![100, 300, 900, 1000, 1000]
        );
    }

    #[test]
    fn parses_and_refuses() {
        let policy = QueuePolicy::parse(
            &args(&[
                ("x-message-ttl", AMQPValue::LongInt(1000)),
                ("x-max-length", AMQPValue::ShortShortUInt(3)),
                (
                    "x-overflow",
                    AMQPValue::LongString(LongString::from("reject-publish")),
                ),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(LongString::from("dlx")),
                ),
                ("x-single-active-consumer", AMQPValue::Boolean(true)),
                ("x-unknown", AMQPValue::Boolean(true)),
            ]),
            "q",
            "/",
        )
        .expect("valid");
        assert_eq!(policy.message_ttl, Some(1000));
        assert_eq!(policy.max_length, Some(3));
        assert_eq!(policy.overflow, Overflow::RejectPublish);
        assert_eq!(policy.dead_letter_exchange.as_deref(), Some("dlx"));
        assert!(policy.single_active_consumer);
        for bad in [
            args(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
            args(&[("x-expires", AMQPValue::LongInt(0))]),
            args(&[(
                "x-overflow",
                AMQPValue::LongString(LongString::from("sometimes")),
            )]),
            args(&[(
                "x-max-length",
                AMQPValue::LongString(LongString::from("ten")),
            )]),
            args(&[(
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("k")),
            )]),
        ] {
            let err = QueuePolicy::parse(&bad, "q", "/").expect_err("invalid");
            assert_eq!(err.code, ReplyCode::PreconditionFailed, "{bad:?}");
        }
    }
}
