//! Rebuilding queue contents from the log after a restart.
//!
//! Every publish record names the durable queues that must get it back; every ack record
//! removes one queue's reference. Replaying both in log order leaves exactly the
//! messages that were not acknowledged. Entries are kept per queue in log order (publish
//! order), so an ack finds its entry by binary search instead of a global map.

use std::collections::HashMap;

use holdfast_store::LogPosition;

use crate::QueueId;
use crate::queue::{MessageRef, QueueEntry};
use crate::record::{Replayed, replay};

#[derive(Debug, Clone, Copy)]
struct Recovered {
    entry: QueueEntry,
    acked: bool,
}

/// Collects replayed records.
#[derive(Debug, Default)]
pub struct Replay {
    queues: HashMap<QueueId, Vec<Recovered>>,
    /// Records this version could not interpret (counted, logged by the caller).
    pub unknown_records: u64,
}

impl Replay {
    /// Feeds one record.
    pub fn visit(&mut self, position: LogPosition, payload: &[u8]) {
        match replay(payload) {
            Some(Replayed::Publish(header)) => {
                if !header.persistent {
                    return;
                }
                let entry = QueueEntry {
                    message: MessageRef {
                        position,
                        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    },
                    body_size: header.body_size,
                    // Whether it reached a consumer before the restart is not recorded, so
                    // it is conservatively marked: never served twice as fresh.
                    redelivered: true,
                    recoverable: true,
                };
                for queue in header.durable_queues {
                    self.queues.entry(queue).or_default().push(Recovered {
                        entry,
                        acked: false,
                    });
                }
            }
            Some(Replayed::Ack(acks)) => {
                for (queue, position) in acks {
                    if let Some(entries) = self.queues.get_mut(&queue)
                        && let Ok(index) =
                            entries.binary_search_by_key(&position, |r| r.entry.message.position.0)
                    {
                        entries[index].acked = true;
                    }
                }
            }
            None => self.unknown_records += 1,
        }
    }

    /// The surviving entries of each queue, in log order.
    pub fn into_queues(self) -> HashMap<QueueId, Vec<QueueEntry>> {
        self.queues
            .into_iter()
            .map(|(queue, entries)| {
                let live = entries
                    .into_iter()
                    .filter(|r| !r.acked)
                    .map(|r| r.entry)
                    .collect();
                (queue, live)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_ack, encode_publish};

    #[test]
    fn acked_and_transient_messages_do_not_come_back() {
        let mut replay = Replay::default();
        let q1 = QueueId(1);
        let q2 = QueueId(2);
        replay.visit(
            LogPosition(8),
            &encode_publish(true, "", "a", &[q1, q2], &[0, 0], b"x"),
        );
        replay.visit(
            LogPosition(50),
            &encode_publish(false, "", "a", &[], &[0, 0], b"y"),
        );
        replay.visit(
            LogPosition(90),
            &encode_publish(true, "", "a", &[q1], &[0, 0], b"z"),
        );
        replay.visit(LogPosition(130), &encode_ack(&[(q1, 8)]));
        let queues = replay.into_queues();
        let positions =
            |q| -> Vec<u64> { queues[&q].iter().map(|e| e.message.position.0).collect() };
        assert_eq!(positions(q1), vec![90]);
        assert_eq!(positions(q2), vec![8]);
    }
}
