//! Segment files: naming, the record format, and the recovery scan. The record writer
//! (`encode_record`) and reader (`scan`, `decode_header`) live here together.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::file_layer::LogFile;

/// First bytes of every segment file; the last byte is the format version.
pub(crate) const MAGIC: [u8; 8] = *b"HFLOG\0\0\x01";
/// Length of [`MAGIC`]; the first record of a segment starts here.
pub(crate) const MAGIC_LEN: u64 = MAGIC.len() as u64;
/// `[len: u32 LE][crc: u32 LE]`.
pub(crate) const HEADER_LEN: u64 = 8;
/// Largest accepted payload: 512 MiB.
pub const MAX_RECORD_SIZE: usize = 512 * 1024 * 1024;
/// Recovery reads segments in chunks of this size.
const SCAN_CHUNK: usize = 1024 * 1024;

/// One segment file. Shared (`Arc`) by the segment table, the writer, the flusher and
/// readers, so a read that found the segment keeps working while it is being deleted.
pub(crate) struct Segment {
    /// Logical offset of the file's first byte; also its file name.
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn LogFile>,
    /// Bytes in the file (magic included). Only the writer changes it, for the active
    /// segment; kept here for stats.
    pub(crate) len: AtomicU64,
    /// Live references (queue entries) to records in this segment. A segment is deleted
    /// only when it and every older segment have none.
    pub(crate) refs: AtomicU64,
}

/// `{base:020}.log`.
pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The base offset encoded in a segment file name, or `None` if it is not one.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// CRC-32C over the 4 little-endian length bytes, then the payload. Covering the length
/// means a corrupted length is detected, and an all-zero header is never a valid record
/// (so zero-filled tails are cut, not read as empty records).
pub(crate) fn record_crc(payload: &[u8]) -> u32 {
    let len = u32::try_from(payload.len()).expect("payload length checked against MAX_RECORD_SIZE");
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

/// Appends the encoded record to `buf`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked against MAX_RECORD_SIZE");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_crc(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// `(len, crc)` from a record header.
pub(crate) fn decode_header(header: &[u8; 8]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// Where a scan stopped.
pub(crate) struct ScanOutcome {
    /// File offset just past the last valid record.
    pub(crate) valid_len: u64,
    /// Why the bytes from `valid_len` on are not records, if there are any.
    pub(crate) torn: Option<&'static str>,
}

/// Visits every valid record of a segment (whose magic was already checked) in order,
/// stopping at the first incomplete, absurd or checksum-failing one.
pub(crate) fn scan(
    file: &dyn LogFile,
    base: u64,
    file_len: u64,
    visit: &mut dyn FnMut(u64, &[u8]),
) -> io::Result<ScanOutcome> {
    let mut reader = ChunkReader {
        file,
        file_len,
        start: 0,
        buf: Vec::new(),
    };
    let mut offset = MAGIC_LEN;
    let torn = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < HEADER_LEN {
            break Some("incomplete header");
        }
        let header: [u8; 8] = reader
            .get(offset, 8)?
            .try_into()
            .expect("ChunkReader::get returns exactly the requested length");
        let (len, crc) = decode_header(&header);
        if len as usize > MAX_RECORD_SIZE {
            break Some("absurd length");
        }
        if u64::from(len) > remaining - HEADER_LEN {
            break Some("length past end of file");
        }
        let payload = reader.get(offset + HEADER_LEN, len as usize)?;
        if record_crc(payload) != crc {
            break Some("checksum mismatch");
        }
        visit(base + offset, payload);
        offset += HEADER_LEN + u64::from(len);
    };
    Ok(ScanOutcome {
        valid_len: offset,
        torn,
    })
}

/// Sequential reads through a buffer of at least [`SCAN_CHUNK`] bytes.
struct ChunkReader<'a> {
    file: &'a dyn LogFile,
    file_len: u64,
    /// File offset of `buf[0]`.
    start: u64,
    buf: Vec<u8>,
}

impl ChunkReader<'_> {
    /// `len` bytes at `offset`; the caller guarantees they are inside the file.
    fn get(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let end = offset + len as u64;
        if offset < self.start || end > self.start + self.buf.len() as u64 {
            let want = (self.file_len - offset).min(len.max(SCAN_CHUNK) as u64);
            self.buf
                .resize(usize::try_from(want).map_err(io::Error::other)?, 0);
            self.file.read_at(&mut self.buf, offset)?;
            self.start = offset;
        }
        let from = usize::try_from(offset - self.start).map_err(io::Error::other)?;
        Ok(&self.buf[from..from + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip() {
        assert_eq!(segment_file_name(42), "00000000000000000042.log");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.log"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_file_name("00000000000000000042.tmp"), None);
    }

    #[test]
    fn zero_header_is_not_a_record() {
        assert_ne!(record_crc(&[]), 0);
    }
}
