//! The seams replication builds on: reading a running log's records as they are, bytes
//! and positions, and appending such records to another log so that it becomes a copy
//! of the first, byte for byte, with the same positions and segment boundaries.
//!
//! Segment boundaries need no message of their own: a segment's base is the previous
//! segment's end, and its first record starts just after the magic, so a record placed
//! [`MAGIC_LEN`] past where the copy ends says the original rolled there.

use super::*;

/// A record as the log holds it: where it starts, and its bytes (length, CRC, payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Where its header starts in the logical log.
    pub position: LogPosition,
    /// The encoded record: `[len: u32 LE][crc: u32 LE][payload]`.
    pub bytes: Bytes,
}

impl RawRecord {
    /// Where the next record can start (this one's end).
    #[must_use]
    pub fn end(&self) -> u64 {
        self.position.0 + self.bytes.len() as u64
    }
}

impl Store {
    /// The records from logical offset `from` on, as far as the OS has them (nothing of
    /// the pending buffer, nothing a refused write cut back), up to about `max_bytes`
    /// (at least one record when there is one). `from` is a record's position, a
    /// record's end, or a segment's base; reading from the end of the log returns none.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when `from` is in a segment that was deleted or is not a
    /// record boundary; [`StoreError::Corrupt`] when a stored record fails its CRC;
    /// [`StoreError::Io`] when a read fails.
    pub fn read_records(&self, from: u64, max_bytes: usize) -> Result<Vec<RawRecord>, StoreError> {
        let core = &self.handle.core;
        let readable = core.flushed.load(Ordering::SeqCst);
        let segments: Vec<Arc<Segment>> = core
            .segments
            .read()
            .range(..=from)
            .next_back()
            .map(|(base, _)| *base)
            .map(|first| {
                core.segments
                    .read()
                    .range(first..)
                    .map(|(_, s)| Arc::clone(s))
                    .collect()
            })
            .unwrap_or_default();
        if segments.is_empty() {
            return Err(StoreError::NotFound { position: from });
        }
        let mut records = Vec::new();
        let mut taken = 0usize;
        let mut at = from;
        for segment in segments {
            // A segment's end is the next one's base: carry on from its first record.
            at = at.max(segment.base + MAGIC_LEN);
            let end = (segment.base + segment.len.load(Ordering::SeqCst)).min(readable);
            while at < end {
                if taken >= max_bytes && !records.is_empty() {
                    return Ok(records);
                }
                let record = read_raw(segment.as_ref(), at, end)?;
                taken += record.bytes.len();
                at = record.end();
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Appends a record read from another log (by [`Store::read_records`]) at the same
    /// position it has there, holding `refs` live references. The CRC is checked first;
    /// the segment rolls where the position says the other log rolled, and nowhere else.
    /// Confirmable like a [`Durability::Requested`] append.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the bytes are not one record or fail the CRC;
    /// [`StoreError::OutOfSequence`] when the position does not continue this log (or
    /// records of its own are waiting to be written); otherwise as [`Store::append`].
    /// A refused record leaves the log as it was.
    pub fn append_replicated(&self, record: &RawRecord, refs: u32) -> Result<Appended, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            position: record.position.0,
            reason: reason.to_owned(),
        };
        let header: [u8; 8] = record
            .bytes
            .get(..HEADER_LEN as usize)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| corrupt("shorter than a record header"))?;
        let (len, crc) = decode_header(&header);
        let payload = &record.bytes[HEADER_LEN as usize..];
        if payload.len() != len as usize {
            return Err(corrupt("length does not match the header"));
        }
        if record_crc(payload) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let core = &self.handle.core;
        let (mut appended, rolled) = core.append_batch(
            &[(payload, refs)],
            Durability::Requested,
            Some(record.position.0),
        )?;
        if rolled && core.gc_enabled.load(Ordering::SeqCst) {
            core.collect_garbage();
        }
        let appended = appended.pop().expect("one record in, one position out");
        debug_assert_eq!(appended.position, record.position);
        Ok(appended)
    }
}

/// The record at logical offset `at` of `segment`, which is readable below `end`.
fn read_raw(segment: &Segment, at: u64, end: u64) -> Result<RawRecord, StoreError> {
    let offset = at - segment.base;
    let not_a_record = || StoreError::NotFound { position: at };
    if at + HEADER_LEN > end {
        return Err(not_a_record());
    }
    let mut header = [0u8; HEADER_LEN as usize];
    segment
        .file
        .read_at(&mut header, offset)
        .map_err(StoreError::io(format!("reading the record header at {at}")))?;
    let (len, crc) = decode_header(&header);
    let record_end = at + HEADER_LEN + u64::from(len);
    if record_end > end {
        return Err(not_a_record());
    }
    let mut bytes = vec![0u8; HEADER_LEN as usize + len as usize];
    segment
        .file
        .read_at(&mut bytes, offset)
        .map_err(StoreError::io(format!("reading the record at {at}")))?;
    if record_crc(&bytes[HEADER_LEN as usize..]) != crc {
        return Err(StoreError::Corrupt {
            position: at,
            reason: "checksum mismatch".to_owned(),
        });
    }
    Ok(RawRecord {
        position: LogPosition(at),
        bytes: Bytes::from(bytes),
    })
}
