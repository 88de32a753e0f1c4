//! The follower's side of a link: it says where its log ends, appends the leader's
//! records at the leader's positions (each CRC checked by the store), and acknowledges
//! how far its log is durable each time that moves (one fsync covers the frames that
//! arrived while the last one ran).
//!
//! The follower's store must not collect garbage: nothing on it references records yet
//! (applying them to queues, so that a promotion is immediate, is not built), so every
//! segment stays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use holdfast_store::{Store, StoreError};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;

use crate::LinkError;
use crate::frame::{Frame, read_frame, write_frame};

/// Follows the leader on `socket`, having seen epoch `seen` so far, until the link ends.
///
/// # Errors
/// [`LinkError::StaleEpoch`] when the leader's epoch is older than one this follower has
/// seen (a deposed leader: its records are refused); [`LinkError::Refused`] when the
/// leader refuses the link; [`LinkError::Store`] when a record does not continue this
/// log or fails its CRC (nothing of it is written); otherwise what ended the connection.
pub async fn follow(socket: TcpStream, store: Store, seen: u64) -> Result<(), LinkError> {
    socket.set_nodelay(true)?;
    let (mut reader, writer) = socket.into_split();
    let writer = Arc::new(Mutex::new(writer));
    let log_end = store.stats().written;
    send(
        &writer,
        &Frame::Hello {
            epoch: seen,
            log_end,
        },
    )
    .await?;
    let epoch = Arc::new(AtomicU64::new(seen));
    // Acks leave from their own task, whenever the log's durability moves: the frames
    // that arrive meanwhile are appended and share the next fsync (group commit),
    // instead of each waiting for one of its own before the next is read.
    let mut acker = {
        let (writer, epoch, mut durable) =
            (Arc::clone(&writer), Arc::clone(&epoch), store.durable());
        tokio::spawn(async move {
            let mut acked = log_end;
            loop {
                let at = durable
                    .borrow_and_update()
                    .clone()
                    .map_err(|_| LinkError::Store(StoreError::Poisoned))?;
                if at > acked {
                    acked = at;
                    let epoch = epoch.load(Ordering::SeqCst);
                    send(
                        &writer,
                        &Frame::Ack {
                            epoch,
                            durable_end: at,
                        },
                    )
                    .await?;
                }
                if durable.changed().await.is_err() {
                    return Ok::<(), LinkError>(());
                }
            }
        })
    };
    let refuse = |reason: String| {
        let writer = Arc::clone(&writer);
        async move {
            let _ = send(&writer, &Frame::Refuse { reason }).await;
        }
    };
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame?,
            ended = &mut acker => {
                return ended.map_err(|join| LinkError::Malformed(join.to_string()))?;
            }
        };
        match frame {
            Frame::Records {
                epoch: of, records, ..
            } => {
                let newest = epoch.load(Ordering::SeqCst);
                if of < newest {
                    let refusal = LinkError::StaleEpoch {
                        got: of,
                        seen: newest,
                    };
                    refuse(refusal.to_string()).await;
                    acker.abort();
                    return Err(refusal);
                }
                epoch.store(of, Ordering::SeqCst);
                for record in &records {
                    if let Err(err) = store.append_replicated(record, 0) {
                        refuse(err.to_string()).await;
                        acker.abort();
                        return Err(err.into());
                    }
                }
            }
            Frame::Refuse { reason } => {
                acker.abort();
                return Err(LinkError::Refused(reason));
            }
            other => {
                acker.abort();
                return Err(LinkError::Malformed(format!(
                    "expected records, got {other:?}"
                )));
            }
        }
    }
}

async fn send(writer: &Mutex<OwnedWriteHalf>, frame: &Frame) -> Result<(), LinkError> {
    write_frame(&mut *writer.lock().await, frame).await
}
