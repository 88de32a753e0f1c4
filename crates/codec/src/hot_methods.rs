//! Hand-written decoders for the methods nearly every message passes through:
//! `basic.publish`, `basic.ack`, `basic.nack` and `basic.reject`.
//!
//! amq_protocol's generic parser builds an `AMQPFlags` map with one `String` per flag name
//! for every bit field, which made decoding `basic.publish` about an eighth of the
//! broker's CPU on a small-message publish load. These produce the same values from the
//! same bytes (a property test holds them to it) without the detour.

use amq_protocol::protocol::{AMQPClass, basic};

const BASIC: u16 = 60;
const PUBLISH: u16 = 40;
const ACK: u16 = 80;
const REJECT: u16 = 90;
const NACK: u16 = 120;

/// Decodes `args` (the payload after class and method id) when `(class_id, method_id)`
/// is one of the hot methods: `None` for any other method, `Some(None)` when the
/// arguments are malformed (too short, invalid UTF-8, trailing bytes).
pub(crate) fn decode(class_id: u16, method_id: u16, args: &[u8]) -> Option<Option<AMQPClass>> {
    if class_id != BASIC {
        return None;
    }
    let method = match method_id {
        PUBLISH => publish(args).map(basic::AMQPMethod::Publish),
        ACK => tag_and_bits(args).map(|(delivery_tag, bits)| {
            basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple: bit(bits, 0),
            })
        }),
        REJECT => tag_and_bits(args).map(|(delivery_tag, bits)| {
            basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag,
                requeue: bit(bits, 0),
            })
        }),
        NACK => tag_and_bits(args).map(|(delivery_tag, bits)| {
            basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag,
                multiple: bit(bits, 0),
                requeue: bit(bits, 1),
            })
        }),
        _ => return None,
    };
    Some(method.map(AMQPClass::Basic))
}

/// ticket (short, reserved), exchange (shortstr), routing-key (shortstr), then a bit
/// field: mandatory, immediate.
fn publish(args: &[u8]) -> Option<basic::Publish> {
    let rest = args.get(2..)?;
    let (exchange, rest) = short_string(rest)?;
    let (routing_key, rest) = short_string(rest)?;
    let [bits] = rest else {
        return None;
    };
    Some(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: bit(*bits, 0),
        immediate: bit(*bits, 1),
    })
}

/// delivery-tag (longlong) then one octet of bits: exactly nine bytes.
fn tag_and_bits(args: &[u8]) -> Option<(u64, u8)> {
    let (tag, rest) = args.split_first_chunk::<8>()?;
    let [bits] = rest else {
        return None;
    };
    Some((u64::from_be_bytes(*tag), *bits))
}

fn short_string(input: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = input.split_first()?;
    let (text, rest) = rest.split_at_checked(usize::from(len))?;
    Some((std::str::from_utf8(text).ok()?, rest))
}

fn bit(bits: u8, index: u8) -> bool {
    (bits >> index) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::parse_class;
    use proptest::prelude::*;

    /// What amq_protocol's parser makes of the same payload (`None` when it fails or
    /// leaves bytes over, which the decoder treats as malformed).
    fn reference(class_id: u16, method_id: u16, args: &[u8]) -> Option<AMQPClass> {
        let mut payload = Vec::with_capacity(args.len() + 4);
        payload.extend_from_slice(&class_id.to_be_bytes());
        payload.extend_from_slice(&method_id.to_be_bytes());
        payload.extend_from_slice(args);
        match parse_class(payload.as_slice()) {
            Ok((&[], method)) => Some(method),
            _ => None,
        }
    }

    fn hot_method() -> impl Strategy<Value = u16> {
        prop_oneof![Just(PUBLISH), Just(ACK), Just(REJECT), Just(NACK)]
    }

    /// Arguments shaped like a publish (valid strings of any length, any bits, optional
    /// trailing bytes), so the interesting cases are not all "too short".
    fn publish_args() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u16>(),
            "[a-z.\\-é]{0,40}",
            "[a-z.#*é]{0,80}",
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..3),
        )
            .prop_map(|(ticket, exchange, routing_key, bits, trailing)| {
                let mut args = ticket.to_be_bytes().to_vec();
                for text in [exchange, routing_key] {
                    args.push(u8::try_from(text.len()).unwrap_or(u8::MAX));
                    args.extend_from_slice(text.as_bytes());
                }
                args.push(bits);
                args.extend_from_slice(&trailing);
                args
            })
    }

    proptest! {
        #[test]
        fn agrees_with_amq_protocol_on_random_bytes(
            method_id in hot_method(),
            args in proptest::collection::vec(any::<u8>(), 0..24),
        ) {
            prop_assert_eq!(
                decode(BASIC, method_id, &args),
                Some(reference(BASIC, method_id, &args))
            );
        }

        #[test]
        fn agrees_with_amq_protocol_on_publish_shapes(args in publish_args()) {
            prop_assert_eq!(
                decode(BASIC, PUBLISH, &args),
                Some(reference(BASIC, PUBLISH, &args))
            );
        }

        #[test]
        fn agrees_on_tag_and_bits(tag in any::<u64>(), bits in any::<u8>(), method_id in hot_method().prop_filter("not publish", |m| *m != PUBLISH)) {
            let mut args = tag.to_be_bytes().to_vec();
            args.push(bits);
            let decoded = decode(BASIC, method_id, &args);
            prop_assert!(matches!(decoded, Some(Some(_))));
            prop_assert_eq!(decoded, Some(reference(BASIC, method_id, &args)));
        }
    }

    #[test]
    fn other_methods_are_left_to_the_generic_parser() {
        assert_eq!(decode(BASIC, 10, &[0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode(20, 40, &[]), None);
    }

    #[test]
    fn invalid_utf8_in_a_publish_is_malformed() {
        let args = [0, 0, 1, 0xff, 0, 0];
        assert_eq!(decode(BASIC, PUBLISH, &args), Some(None));
        assert_eq!(reference(BASIC, PUBLISH, &args), None);
    }
}
