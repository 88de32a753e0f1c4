//! The broker's records in the commit log. The store sees opaque bytes; this module is
//! the only writer and reader of their layout (all integers big-endian):
//!
//! ```text
//! publish: 0x01 | flags u8 (bit 0: persistent)
//!          | exchange: u8 len + bytes | routing key: u8 len + bytes
//!          | durable queue ids: u16 count + u64 each   (queues that must recover it)
//!          | properties: u32 len + raw basic properties
//!          | body: the rest of the record
//! ack:     0x02 | u32 count | (queue id u64, message position u64) * count
//! ```
//!
//! A message is written once, whatever the number of queues it reaches; every queue keeps
//! only its position. An ack record removes one queue's reference when the log is
//! replayed. Queue ids are never reused, so records of a deleted queue are simply ignored.

use bytes::{BufMut, Bytes, BytesMut};

use crate::QueueId;

const PUBLISH: u8 = 1;
const ACK: u8 = 2;
const PERSISTENT: u8 = 1;

/// A message as stored: everything a delivery needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The exchange it was published to.
    pub exchange: Bytes,
    /// The routing key it was published with.
    pub routing_key: Bytes,
    /// Raw basic properties.
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
}

/// What recovery needs of a publish record: no body copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHeader {
    /// delivery-mode 2.
    pub persistent: bool,
    /// Durable queues that must get it back after a restart.
    pub durable_queues: Vec<QueueId>,
    /// Size of the body.
    pub body_size: u32,
}

/// A decoded record, for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// A message.
    Publish(PublishHeader),
    /// Queue references removed.
    Ack(Vec<(QueueId, u64)>),
}

/// Encodes a publish record.
#[must_use]
pub fn encode_publish(
    persistent: bool,
    exchange: &str,
    routing_key: &str,
    durable_queues: &[QueueId],
    properties: &[u8],
    body: &[u8],
) -> BytesMut {
    let exchange = short(exchange.as_bytes());
    let routing_key = short(routing_key.as_bytes());
    let mut record = BytesMut::with_capacity(
        2 + 2
            + exchange.len()
            + routing_key.len()
            + 2
            + durable_queues.len() * 8
            + 4
            + properties.len()
            + body.len(),
    );
    record.put_u8(PUBLISH);
    record.put_u8(if persistent { PERSISTENT } else { 0 });
    record.put_u8(exchange.len() as u8);
    record.put_slice(exchange);
    record.put_u8(routing_key.len() as u8);
    record.put_slice(routing_key);
    let count = durable_queues.len().min(u16::MAX as usize);
    record.put_u16(count as u16);
    for queue in &durable_queues[..count] {
        record.put_u64(queue.0);
    }
    record.put_u32(properties.len() as u32);
    record.put_slice(properties);
    record.put_slice(body);
    record
}

/// AMQP short strings are at most 255 bytes; the codec already enforces it on input.
fn short(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(255)]
}

/// Encodes an ack record.
#[must_use]
pub fn encode_ack(acks: &[(QueueId, u64)]) -> BytesMut {
    let mut record = BytesMut::with_capacity(5 + acks.len() * 16);
    record.put_u8(ACK);
    record.put_u32(acks.len() as u32);
    for (queue, position) in acks {
        record.put_u64(queue.0);
        record.put_u64(*position);
    }
    record
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Some(u64::from_be_bytes(array))
    }
}

/// Decodes a record for replay; `None` for bytes this version does not understand
/// (the CRC already vouched for them, so this means a record from a newer version).
#[must_use]
pub fn replay(bytes: &[u8]) -> Option<Replayed> {
    let mut reader = Reader { bytes, at: 0 };
    match reader.u8()? {
        PUBLISH => {
            let persistent = reader.u8()? & PERSISTENT != 0;
            let exchange_len = reader.u8()? as usize;
            reader.take(exchange_len)?;
            let key_len = reader.u8()? as usize;
            reader.take(key_len)?;
            let count = reader.u16()? as usize;
            let mut durable_queues = Vec::with_capacity(count);
            for _ in 0..count {
                durable_queues.push(QueueId(reader.u64()?));
            }
            let properties_len = reader.u32()? as usize;
            reader.take(properties_len)?;
            let body_size = u32::try_from(bytes.len() - reader.at).unwrap_or(u32::MAX);
            Some(Replayed::Publish(PublishHeader {
                persistent,
                durable_queues,
                body_size,
            }))
        }
        ACK => {
            let count = reader.u32()? as usize;
            let mut acks = Vec::with_capacity(count.min(bytes.len() / 16));
            for _ in 0..count {
                acks.push((QueueId(reader.u64()?), reader.u64()?));
            }
            Some(Replayed::Ack(acks))
        }
        _ => None,
    }
}

/// Splits a publish record read back from the log into its parts, sharing its bytes.
#[must_use]
pub fn decode_message(record: &Bytes) -> Option<StoredMessage> {
    let mut reader = Reader {
        bytes: record,
        at: 0,
    };
    if reader.u8()? != PUBLISH {
        return None;
    }
    reader.u8()?;
    let exchange_len = reader.u8()? as usize;
    let exchange_at = reader.at;
    reader.take(exchange_len)?;
    let key_len = reader.u8()? as usize;
    let key_at = reader.at;
    reader.take(key_len)?;
    let count = reader.u16()? as usize;
    reader.take(count * 8)?;
    let properties_len = reader.u32()? as usize;
    let properties_at = reader.at;
    reader.take(properties_len)?;
    Some(StoredMessage {
        exchange: record.slice(exchange_at..exchange_at + exchange_len),
        routing_key: record.slice(key_at..key_at + key_len),
        properties: record.slice(properties_at..properties_at + properties_len),
        body: record.slice(reader.at..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trip() {
        let record = encode_publish(
            true,
            "amq.direct",
            "key",
            &[QueueId(7), QueueId(9)],
            &[0x10, 0],
            b"body",
        )
        .freeze();
        assert_eq!(
            replay(&record),
            Some(Replayed::Publish(PublishHeader {
                persistent: true,
                durable_queues: vec![QueueId(7), QueueId(9)],
                body_size: 4,
            }))
        );
        let message = decode_message(&record).expect("publish");
        assert_eq!(&message.exchange[..], b"amq.direct");
        assert_eq!(&message.routing_key[..], b"key");
        assert_eq!(&message.properties[..], &[0x10, 0]);
        assert_eq!(&message.body[..], b"body");
    }

    #[test]
    fn ack_round_trip_and_garbage() {
        let record = encode_ack(&[(QueueId(1), 42), (QueueId(2), 43)]);
        assert_eq!(
            replay(&record),
            Some(Replayed::Ack(vec![(QueueId(1), 42), (QueueId(2), 43)]))
        );
        assert_eq!(replay(&[9, 9, 9]), None);
        assert_eq!(replay(&[ACK, 0, 0, 0, 5, 1]), None);
    }

    proptest::proptest! {
        #[test]
        fn replay_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = replay(&bytes);
            let _ = decode_message(&Bytes::from(bytes));
        }
    }
}
