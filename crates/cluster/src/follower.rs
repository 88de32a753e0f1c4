//! The follower's side of a link: it says where its log ends, appends the leader's
//! records at the leader's positions (each CRC checked by the store), and acknowledges
//! how far its log is durable after each frame.
//!
//! The follower's store must not collect garbage: nothing on it references records yet
//! (applying them to queues, so that a promotion is immediate, is not built), so every
//! segment stays.

use holdfast_store::{Store, StoreError};
use tokio::net::TcpStream;

use crate::LinkError;
use crate::frame::{Frame, read_frame, write_frame};

/// Follows the leader on `socket`, having seen epoch `seen` so far, until the link ends.
///
/// # Errors
/// [`LinkError::StaleEpoch`] when the leader's epoch is older than one this follower has
/// seen (a deposed leader: its records are refused); [`LinkError::Refused`] when the
/// leader refuses the link; [`LinkError::Store`] when a record does not continue this
/// log or fails its CRC (nothing of it is written); otherwise what ended the connection.
pub async fn follow(socket: TcpStream, store: Store, mut seen: u64) -> Result<(), LinkError> {
    socket.set_nodelay(true)?;
    let (mut reader, mut writer) = socket.into_split();
    write_frame(
        &mut writer,
        &Frame::Hello {
            epoch: seen,
            log_end: store.stats().written,
        },
    )
    .await?;
    loop {
        match read_frame(&mut reader).await? {
            Frame::Records { epoch, records, .. } => {
                if epoch < seen {
                    let refusal = LinkError::StaleEpoch { got: epoch, seen };
                    let _ = write_frame(
                        &mut writer,
                        &Frame::Refuse {
                            reason: refusal.to_string(),
                        },
                    )
                    .await;
                    return Err(refusal);
                }
                seen = epoch;
                let mut end = None;
                for record in &records {
                    match store.append_replicated(record, 0) {
                        Ok(appended) => end = Some(appended.end),
                        Err(err) => {
                            let _ = write_frame(
                                &mut writer,
                                &Frame::Refuse {
                                    reason: err.to_string(),
                                },
                            )
                            .await;
                            return Err(err.into());
                        }
                    }
                }
                if let Some(end) = end {
                    store
                        .wait_durable(end)
                        .await
                        .map_err(|_| LinkError::Store(StoreError::Poisoned))?;
                    write_frame(
                        &mut writer,
                        &Frame::Ack {
                            epoch,
                            durable_end: end,
                        },
                    )
                    .await?;
                }
            }
            Frame::Refuse { reason } => return Err(LinkError::Refused(reason)),
            other => {
                return Err(LinkError::Malformed(format!(
                    "expected records, got {other:?}"
                )));
            }
        }
    }
}
