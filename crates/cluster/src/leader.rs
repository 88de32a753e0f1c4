//! The leader's side of a link: after the follower's hello, it ships the records of its
//! log from where the follower's ends, as they become readable, and records the
//! follower's acknowledgements in a watch (how far the follower's log is durable).

use std::sync::Arc;
use std::time::Duration;

use holdfast_store::Store;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::LinkError;
use crate::frame::{Frame, read_frame, write_frame};

/// Bytes of records per frame, about.
const FRAME_BYTES: usize = 256 * 1024;
/// How long the leader waits for its log to grow before looking again: a lazy record
/// becomes readable without the durability change that wakes it.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// Serves one follower on `socket` as the leader of `epoch`, until the follower goes or
/// refuses. `acked` receives, in order, how far the follower's log is durable (shared by
/// the successive links of one follower, so a confirm watermark can watch it).
///
/// # Errors
/// [`LinkError::StaleEpoch`] when the follower has seen a newer epoch (this leader is
/// deposed: it must stop leading); [`LinkError::FollowerAhead`] when the follower's log
/// runs past this one; [`LinkError::Store`] when the follower's log starts in a segment
/// this one has deleted (catching up from a copy of sealed segments is not built);
/// otherwise what ended the connection.
pub async fn serve(
    socket: TcpStream,
    store: Store,
    epoch: u64,
    acked: Arc<watch::Sender<u64>>,
) -> Result<(), LinkError> {
    socket.set_nodelay(true)?;
    let (mut reader, mut writer) = socket.into_split();
    let (seen, log_end) = match read_frame(&mut reader).await? {
        Frame::Hello { epoch, log_end } => (epoch, log_end),
        other => {
            let malformed = LinkError::Malformed(format!("expected a hello, got {other:?}"));
            return Err(refuse(&mut writer, malformed).await);
        }
    };
    if seen > epoch {
        warn!(
            epoch,
            seen, "a follower has seen a newer epoch: this leader is deposed"
        );
        return Err(refuse(&mut writer, LinkError::StaleEpoch { got: epoch, seen }).await);
    }
    let leader_end = store.stats().written;
    if log_end > leader_end {
        let ahead = LinkError::FollowerAhead {
            follower: log_end,
            leader: leader_end,
        };
        return Err(refuse(&mut writer, ahead).await);
    }
    acked.send_replace(log_end);
    let mut acks = tokio::spawn(async move {
        loop {
            match read_frame(&mut reader).await? {
                Frame::Ack {
                    epoch: of,
                    durable_end,
                } if of == epoch => {
                    acked.send_if_modified(|at| {
                        let raised = durable_end > *at;
                        *at = (*at).max(durable_end);
                        raised
                    });
                }
                Frame::Refuse { reason } => return Err(LinkError::Refused(reason)),
                other => {
                    return Err(LinkError::Malformed(format!(
                        "expected an ack, got {other:?}"
                    )));
                }
            }
        }
    });
    let mut durable = store.durable();
    let mut cursor = log_end;
    debug!(epoch, from = cursor, "shipping the log to a follower");
    loop {
        let records = store.read_records(cursor, FRAME_BYTES)?;
        let Some(last) = records.last() else {
            tokio::select! {
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                ended = &mut acks => {
                    return ended.map_err(|join| LinkError::Malformed(join.to_string()))?;
                }
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        };
        cursor = last.end();
        let leader_durable = durable.borrow().as_ref().map_or(0, |at| *at);
        write_frame(
            &mut writer,
            &Frame::Records {
                epoch,
                leader_durable,
                records,
            },
        )
        .await?;
    }
}

/// Tells the follower why the link ends (if it still listens), and gives the reason back.
async fn refuse(writer: &mut OwnedWriteHalf, reason: LinkError) -> LinkError {
    let _ = write_frame(
        writer,
        &Frame::Refuse {
            reason: reason.to_string(),
        },
    )
    .await;
    reason
}
