//! The frames of a replication link. Each is `[len: u32 BE][kind: u8][body]`, `len`
//! counting kind and body; integers are big-endian.
//!
//! - `Hello` (follower → leader, first): the newest epoch the follower has seen and
//!   where its log ends.
//! - `Records` (leader → follower): the leader's epoch, how far the leader's own log is
//!   durable, and records as the leader's log holds them, each with its position.
//! - `Ack` (follower → leader): the epoch and how far the follower's log is durable.
//! - `Refuse` (either way, last): why the link ends.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use holdfast_store::{LogPosition, MAX_RECORD_SIZE, RawRecord};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::LinkError;

/// Largest frame accepted: one record of the largest size, with room for its header.
pub const MAX_FRAME: usize = MAX_RECORD_SIZE + 1024;

const HELLO: u8 = 1;
const RECORDS: u8 = 2;
const ACK: u8 = 3;
const REFUSE: u8 = 4;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The follower introduces itself.
    Hello {
        /// The newest epoch it has seen.
        epoch: u64,
        /// Where its log ends.
        log_end: u64,
    },
    /// Records of the leader's log, in order, continuing the follower's.
    Records {
        /// The leader's epoch.
        epoch: u64,
        /// How far the leader's own log is durable.
        leader_durable: u64,
        /// The records.
        records: Vec<RawRecord>,
    },
    /// How far the follower's log is durable.
    Ack {
        /// The epoch of the records acknowledged.
        epoch: u64,
        /// The follower's durable end.
        durable_end: u64,
    },
    /// The link ends, and why.
    Refuse {
        /// A reason for a person.
        reason: String,
    },
}

impl Frame {
    /// The frame's bytes, length prefix included.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        match self {
            Frame::Hello { epoch, log_end } => {
                body.put_u8(HELLO);
                body.put_u64(*epoch);
                body.put_u64(*log_end);
            }
            Frame::Records {
                epoch,
                leader_durable,
                records,
            } => {
                body.put_u8(RECORDS);
                body.put_u64(*epoch);
                body.put_u64(*leader_durable);
                body.put_u32(u32::try_from(records.len()).expect("a frame holds few records"));
                for record in records {
                    body.put_u64(record.position.0);
                    body.put_u32(
                        u32::try_from(record.bytes.len()).expect("records are below 4 GiB"),
                    );
                    body.put_slice(&record.bytes);
                }
            }
            Frame::Ack { epoch, durable_end } => {
                body.put_u8(ACK);
                body.put_u64(*epoch);
                body.put_u64(*durable_end);
            }
            Frame::Refuse { reason } => {
                body.put_u8(REFUSE);
                body.put_slice(reason.as_bytes());
            }
        }
        let mut framed = BytesMut::with_capacity(4 + body.len());
        framed.put_u32(u32::try_from(body.len()).expect("frames are below 4 GiB"));
        framed.put_slice(&body);
        framed.freeze()
    }

    /// Decodes a frame's body (kind and fields, without the length prefix).
    ///
    /// # Errors
    /// [`LinkError::Malformed`] for an unknown kind, a short or long body, or record
    /// lengths that do not add up.
    pub fn decode(mut body: Bytes) -> Result<Frame, LinkError> {
        let malformed = |what: &str| LinkError::Malformed(what.to_owned());
        let need = |body: &Bytes, n: usize| {
            if body.remaining() < n {
                Err(malformed("frame shorter than its fields"))
            } else {
                Ok(())
            }
        };
        need(&body, 1)?;
        let frame = match body.get_u8() {
            HELLO => {
                need(&body, 16)?;
                Frame::Hello {
                    epoch: body.get_u64(),
                    log_end: body.get_u64(),
                }
            }
            RECORDS => {
                need(&body, 20)?;
                let epoch = body.get_u64();
                let leader_durable = body.get_u64();
                let count = body.get_u32() as usize;
                // Each record takes at least 12 bytes: a count the body cannot hold is a lie.
                if count > body.remaining() / 12 {
                    return Err(malformed("record count larger than the frame"));
                }
                let mut records = Vec::with_capacity(count);
                for _ in 0..count {
                    need(&body, 12)?;
                    let position = body.get_u64();
                    let len = body.get_u32() as usize;
                    need(&body, len)?;
                    records.push(RawRecord {
                        position: LogPosition(position),
                        bytes: body.split_to(len),
                    });
                }
                Frame::Records {
                    epoch,
                    leader_durable,
                    records,
                }
            }
            ACK => {
                need(&body, 16)?;
                Frame::Ack {
                    epoch: body.get_u64(),
                    durable_end: body.get_u64(),
                }
            }
            REFUSE => Frame::Refuse {
                reason: String::from_utf8_lossy(&body.split_to(body.remaining())).into_owned(),
            },
            kind => return Err(LinkError::Malformed(format!("unknown frame kind {kind}"))),
        };
        if body.has_remaining() {
            return Err(malformed("bytes after the frame's fields"));
        }
        Ok(frame)
    }
}

/// Reads one frame.
///
/// # Errors
/// [`LinkError::Io`] when the connection fails or closes; [`LinkError::Malformed`] for
/// a frame over [`MAX_FRAME`] or one [`Frame::decode`] refuses.
pub async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Result<Frame, LinkError> {
    let len = reader.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Malformed(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Frame::decode(Bytes::from(body))
}

/// Writes one frame.
///
/// # Errors
/// [`LinkError::Io`] when the write fails.
pub async fn write_frame(
    writer: &mut (impl AsyncWrite + Unpin),
    frame: &Frame,
) -> Result<(), LinkError> {
    writer.write_all(&frame.encode()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frames() -> impl Strategy<Value = Frame> {
        let record = (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(position, bytes)| RawRecord {
                position: LogPosition(position),
                bytes: Bytes::from(bytes),
            },
        );
        prop_oneof![
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, log_end)| Frame::Hello { epoch, log_end }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(record, 0..5)
            )
                .prop_map(|(epoch, leader_durable, records)| Frame::Records {
                    epoch,
                    leader_durable,
                    records
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, durable_end)| Frame::Ack { epoch, durable_end }),
            ".{0,40}".prop_map(|reason| Frame::Refuse { reason }),
        ]
    }

    proptest! {
        /// Every frame decodes to itself.
        #[test]
        fn frames_round_trip(frame in frames()) {
            let encoded = frame.encode();
            prop_assert_eq!(Frame::decode(encoded.slice(4..))?, frame);
        }

        /// Any bytes decode to a frame or an error, never a panic; a cut frame is refused.
        #[test]
        fn garbage_is_refused_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), frame in frames()) {
            let _ = Frame::decode(Bytes::from(bytes));
            let encoded = frame.encode();
            if encoded.len() > 5 && !matches!(frame, Frame::Refuse { .. }) {
                prop_assert!(Frame::decode(encoded.slice(4..encoded.len() - 1)).is_err());
            }
        }
    }
}
