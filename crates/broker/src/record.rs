//! The broker's records in the commit log. The store sees opaque bytes; this module is
//! the only writer and reader of their layout (all integers big-endian):
//!
//! ```text
//! publish: 0x01 | flags u8 (bit 0: persistent, bit 1: has expiration, bit 2: has key)
//!          | published at: u64 ms since the UNIX epoch | [expiration: u64 ms, if bit 1]
//!          | [deduplication key: u16 len + bytes, scopes: u16 count + u64 each, if bit 2]
//!          | exchange: u8 len + bytes | routing key: u8 len + bytes
//!          | durable queue ids: u16 count + u64 each   (queues that must recover it)
//!          | settled: u16 count + (queue id u64, position u64) each
//!          | properties: u32 len + raw basic properties
//!          | body: the rest of the record
//! ack:     0x02 | u32 count | (queue id u64, message position u64) * count
//! requeue: 0x03 | u32 count | (queue id u64, message position u64) * count
//! dedup checkpoint: 0x04 | u32 queues | per queue: queue id u64, u32 keys,
//!          (seen at u64 ms, u16 len + key bytes) * keys
//! definition: 0x05 | one change to the durable definitions, as JSON
//! park:    0x06 | reason u8 | u32 count | (queue id u64, message position u64) * count
//! ```
//!
//! A message is written once, whatever the number of queues it reaches; every queue keeps
//! only its position. An ack record removes one queue's reference when the log is
//! replayed; a requeue record counts a failed delivery. A publish record may also settle
//! other entries: a dead-letter move is one record that adds the new copy and removes the
//! original, so after a crash the message is in exactly one of the two queues. Queue ids
//! are never reused, so records of a deleted queue are simply ignored.

use bytes::{BufMut, Bytes, BytesMut};

use crate::QueueId;

const PUBLISH: u8 = 1;
const ACK: u8 = 2;
const REQUEUE: u8 = 3;
const PERSISTENT: u8 = 1;
const HAS_EXPIRATION: u8 = 2;
const HAS_DEDUP_KEY: u8 = 4;
const DEDUP_CHECKPOINT: u8 = 4;
const DEFINITION: u8 = 5;
const PARK: u8 = 6;

/// The deduplication windows of durable queues at one moment.
pub type DedupCheckpoint = Vec<(QueueId, Vec<(Vec<u8>, u64)>)>;

/// One window to checkpoint: its scope and its (key, seen at) pairs, borrowed.
pub type WindowSnapshot<'a> = (QueueId, Vec<(&'a [u8], u64)>);

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

/// A publish record to write.
#[derive(Debug, Clone, Copy)]
pub struct NewPublish<'a> {
    /// delivery-mode 2.
    pub persistent: bool,
    /// When the broker took it, in ms since the UNIX epoch (TTLs count from here).
    pub published_at: u64,
    /// Per-message TTL from the `expiration` property, in ms.
    pub expiration: Option<u64>,
    /// Deduplication key and the windows (queue ids, exchange scope ids) that recorded
    /// it, so that replay puts it back in each.
    pub dedup: Option<(&'a [u8], &'a [QueueId])>,
    /// Exchange it was published to.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Durable queues that must get it back after a restart.
    pub durable_queues: &'a [QueueId],
    /// Queue entries this record removes (dead-letter moves).
    pub settles: &'a [(QueueId, u64)],
    /// Raw basic properties.
    pub properties: &'a [u8],
    /// Body.
    pub body: &'a [u8],
}

/// What recovery needs of a publish record: no body copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHeader {
    /// delivery-mode 2.
    pub persistent: bool,
    /// When the broker took it (ms since the UNIX epoch).
    pub published_at: u64,
    /// Per-message TTL in ms.
    pub expiration: Option<u64>,
    /// Deduplication key and the windows that recorded it.
    pub dedup: Option<(Vec<u8>, Vec<QueueId>)>,
    /// Durable queues that must get it back after a restart.
    pub durable_queues: Vec<QueueId>,
    /// Entries removed by this record.
    pub settles: Vec<(QueueId, u64)>,
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
    /// Failed deliveries, one count each.
    Requeue(Vec<(QueueId, u64)>),
    /// Every durable queue's deduplication window.
    DedupCheckpoint(DedupCheckpoint),
    /// A change to the durable definitions (its JSON, parsed by `definitions`).
    Definition(Vec<u8>),
    /// Dead letters no target took: out of the ready list until moved (reason code).
    Park(u8, Vec<(QueueId, u64)>),
}

/// Encodes a publish record.
#[must_use]
pub fn encode_publish(message: &NewPublish<'_>) -> BytesMut {
    let exchange = short(message.exchange.as_bytes());
    let routing_key = short(message.routing_key.as_bytes());
    let queues = &message.durable_queues[..message.durable_queues.len().min(u16::MAX as usize)];
    let settles = &message.settles[..message.settles.len().min(u16::MAX as usize)];
    let mut record = BytesMut::with_capacity(
        2 + 16
            + 2
            + exchange.len()
            + routing_key.len()
            + 2
            + queues.len() * 8
            + 2
            + settles.len() * 16
            + 4
            + message.properties.len()
            + message.body.len(),
    );
    let mut flags = 0;
    if message.persistent {
        flags |= PERSISTENT;
    }
    if message.expiration.is_some() {
        flags |= HAS_EXPIRATION;
    }
    let dedup = message.dedup.map(|(key, scopes)| {
        (
            &key[..key.len().min(u16::MAX as usize)],
            &scopes[..scopes.len().min(u16::MAX as usize)],
        )
    });
    if dedup.is_some() {
        flags |= HAS_DEDUP_KEY;
    }
    record.put_u8(PUBLISH);
    record.put_u8(flags);
    record.put_u64(message.published_at);
    if let Some(expiration) = message.expiration {
        record.put_u64(expiration);
    }
    if let Some((key, scopes)) = dedup {
        record.put_u16(key.len() as u16);
        record.put_slice(key);
        record.put_u16(scopes.len() as u16);
        for scope in scopes {
            record.put_u64(scope.0);
        }
    }
    record.put_u8(exchange.len() as u8);
    record.put_slice(exchange);
    record.put_u8(routing_key.len() as u8);
    record.put_slice(routing_key);
    record.put_u16(queues.len() as u16);
    for queue in queues {
        record.put_u64(queue.0);
    }
    record.put_u16(settles.len() as u16);
    for (queue, position) in settles {
        record.put_u64(queue.0);
        record.put_u64(*position);
    }
    record.put_u32(message.properties.len() as u32);
    record.put_slice(message.properties);
    record.put_slice(message.body);
    record
}

/// AMQP short strings are at most 255 bytes; the codec already enforces it on input.
fn short(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(255)]
}

fn encode_pairs(tag: u8, pairs: &[(QueueId, u64)]) -> BytesMut {
    let mut record = BytesMut::with_capacity(5 + pairs.len() * 16);
    record.put_u8(tag);
    record.put_u32(pairs.len() as u32);
    for (queue, position) in pairs {
        record.put_u64(queue.0);
        record.put_u64(*position);
    }
    record
}

/// Encodes an ack record.
#[must_use]
pub fn encode_ack(acks: &[(QueueId, u64)]) -> BytesMut {
    encode_pairs(ACK, acks)
}

/// Encodes a deduplication checkpoint.
#[must_use]
pub fn encode_dedup_checkpoint(checkpoint: &[WindowSnapshot<'_>]) -> BytesMut {
    let mut record = BytesMut::new();
    record.put_u8(DEDUP_CHECKPOINT);
    record.put_u32(checkpoint.len() as u32);
    for (queue, entries) in checkpoint {
        record.put_u64(queue.0);
        record.put_u32(entries.len() as u32);
        for (key, at) in entries {
            let key = &key[..key.len().min(u16::MAX as usize)];
            record.put_u64(*at);
            record.put_u16(key.len() as u16);
            record.put_slice(key);
        }
    }
    record
}

/// Encodes a park record: these entries died for `reason` and wait for a dead-letter
/// target.
#[must_use]
pub fn encode_park(reason: u8, entries: &[(QueueId, u64)]) -> BytesMut {
    let pairs = encode_pairs(PARK, entries);
    let mut record = BytesMut::with_capacity(pairs.len() + 1);
    record.put_u8(PARK);
    record.put_u8(reason);
    record.extend_from_slice(&pairs[1..]);
    record
}

/// Encodes a definition record around a change's JSON.
#[must_use]
pub fn encode_definition(json: &[u8]) -> BytesMut {
    let mut record = BytesMut::with_capacity(1 + json.len());
    record.put_u8(DEFINITION);
    record.put_slice(json);
    record
}

/// Encodes a requeue record (one failed delivery per entry).
#[must_use]
pub fn encode_requeue(requeues: &[(QueueId, u64)]) -> BytesMut {
    encode_pairs(REQUEUE, requeues)
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
    fn pairs(&mut self, count: usize) -> Option<Vec<(QueueId, u64)>> {
        // Bound the allocation by what the bytes can hold, whatever the count claims.
        let mut pairs = Vec::with_capacity(count.min(self.bytes.len() / 16));
        for _ in 0..count {
            pairs.push((QueueId(self.u64()?), self.u64()?));
        }
        Some(pairs)
    }
}

/// Decodes a record for replay; `None` for bytes this version does not understand
/// (the CRC already vouched for them, so this means a record from a newer version).
#[must_use]
pub fn replay(bytes: &[u8]) -> Option<Replayed> {
    let mut reader = Reader { bytes, at: 0 };
    match reader.u8()? {
        PUBLISH => {
            let flags = reader.u8()?;
            let published_at = reader.u64()?;
            let expiration = if flags & HAS_EXPIRATION != 0 {
                Some(reader.u64()?)
            } else {
                None
            };
            let dedup = if flags & HAS_DEDUP_KEY != 0 {
                let len = usize::from(reader.u16()?);
                let key = reader.take(len)?.to_vec();
                let count = usize::from(reader.u16()?);
                let mut scopes = Vec::with_capacity(count);
                for _ in 0..count {
                    scopes.push(QueueId(reader.u64()?));
                }
                Some((key, scopes))
            } else {
                None
            };
            let exchange_len = reader.u8()? as usize;
            reader.take(exchange_len)?;
            let key_len = reader.u8()? as usize;
            reader.take(key_len)?;
            let count = reader.u16()? as usize;
            let mut durable_queues = Vec::with_capacity(count);
            for _ in 0..count {
                durable_queues.push(QueueId(reader.u64()?));
            }
            let settle_count = reader_count16(&mut reader)?;
            let settles = reader.pairs(settle_count)?;
            let properties_len = reader.u32()? as usize;
            reader.take(properties_len)?;
            let body_size = u32::try_from(bytes.len() - reader.at).unwrap_or(u32::MAX);
            Some(Replayed::Publish(PublishHeader {
                persistent: flags & PERSISTENT != 0,
                published_at,
                expiration,
                dedup,
                durable_queues,
                settles,
                body_size,
            }))
        }
        ACK => {
            let count = reader.u32()? as usize;
            Some(Replayed::Ack(reader.pairs(count)?))
        }
        REQUEUE => {
            let count = reader.u32()? as usize;
            Some(Replayed::Requeue(reader.pairs(count)?))
        }
        DEDUP_CHECKPOINT => {
            let queues = reader.u32()? as usize;
            let mut checkpoint = Vec::with_capacity(queues.min(bytes.len() / 12));
            for _ in 0..queues {
                let queue = QueueId(reader.u64()?);
                let keys = reader.u32()? as usize;
                let mut entries = Vec::with_capacity(keys.min(bytes.len() / 10));
                for _ in 0..keys {
                    let at = reader.u64()?;
                    let len = usize::from(reader.u16()?);
                    entries.push((reader.take(len)?.to_vec(), at));
                }
                checkpoint.push((queue, entries));
            }
            Some(Replayed::DedupCheckpoint(checkpoint))
        }
        DEFINITION => Some(Replayed::Definition(bytes[1..].to_vec())),
        PARK => {
            let reason = reader.u8()?;
            let count = reader.u32()? as usize;
            Some(Replayed::Park(reason, reader.pairs(count)?))
        }
        _ => None,
    }
}

fn reader_count16(reader: &mut Reader<'_>) -> Option<usize> {
    reader.u16().map(usize::from)
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
    let flags = reader.u8()?;
    reader.take(if flags & HAS_EXPIRATION != 0 { 16 } else { 8 })?;
    if flags & HAS_DEDUP_KEY != 0 {
        let len = usize::from(reader.u16()?);
        reader.take(len)?;
        let scopes = usize::from(reader.u16()?);
        reader.take(scopes * 8)?;
    }
    let exchange_len = reader.u8()? as usize;
    let exchange_at = reader.at;
    reader.take(exchange_len)?;
    let key_len = reader.u8()? as usize;
    let key_at = reader.at;
    reader.take(key_len)?;
    let count = reader.u16()? as usize;
    reader.take(count * 8)?;
    let settled = reader.u16()? as usize;
    reader.take(settled * 16)?;
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
        let record = encode_publish(&NewPublish {
            persistent: true,
            published_at: 1_700_000_000_000,
            expiration: Some(5000),
            dedup: Some((b"order-7", &[QueueId(9), QueueId(40)])),
            exchange: "amq.direct",
            routing_key: "key",
            durable_queues: &[QueueId(7), QueueId(9)],
            settles: &[(QueueId(3), 80)],
            properties: &[0x10, 0],
            body: b"body",
        })
        .freeze();
        assert_eq!(
            replay(&record),
            Some(Replayed::Publish(PublishHeader {
                persistent: true,
                published_at: 1_700_000_000_000,
                expiration: Some(5000),
                dedup: Some((b"order-7".to_vec(), vec![QueueId(9), QueueId(40)])),
                durable_queues: vec![QueueId(7), QueueId(9)],
                settles: vec![(QueueId(3), 80)],
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
        assert_eq!(
            replay(&encode_requeue(&[(QueueId(4), 8)])),
            Some(Replayed::Requeue(vec![(QueueId(4), 8)]))
        );
        let checkpoint =
            encode_dedup_checkpoint(&[(QueueId(5), vec![(&b"k1"[..], 10), (&b"k2"[..], 20)])]);
        assert_eq!(
            replay(&checkpoint),
            Some(Replayed::DedupCheckpoint(vec![(
                QueueId(5),
                vec![(b"k1".to_vec(), 10), (b"k2".to_vec(), 20)]
            )]))
        );
        assert_eq!(
            replay(&encode_park(2, &[(QueueId(3), 64)])),
            Some(Replayed::Park(2, vec![(QueueId(3), 64)]))
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
