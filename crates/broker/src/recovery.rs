//! Rebuilding the broker's state from the log after a restart.
//!
//! Every publish record names the durable queues that must get it back; every ack record
//! removes one queue's reference. Replaying both in log order leaves exactly the
//! messages that were not acknowledged. Entries are kept per queue in log order (publish
//! order), so an ack finds its entry by binary search instead of a global map.
//! [`Replay::into_state`] then builds the state: definitions from their checkpoint and
//! later records, the queue id counter past every id the log names, deduplication
//! windows, and each queue's messages (a parked dead letter waits again).

use std::collections::{HashMap, VecDeque};

use holdfast_store::{LogPosition, Store};
use tracing::info;

use crate::dead_letter::DeathReason;
use crate::definitions::{DefinitionChange, Definitions};
use crate::enqueue::expiry;
use crate::error::BrokerError;
use crate::queue::{MessageRef, PendingDeadLetter, QueueEntry};
use crate::record::{Replayed, replay};
use crate::state::{Settlements, State, VHost};
use crate::{DEFAULT_VHOST, QueueId};

#[derive(Debug, Clone, Copy)]
struct Recovered {
    entry: QueueEntry,
    acked: bool,
    parked: Option<u8>,
    published_at: u64,
    expiration: Option<u64>,
}

/// An entry as recovered, with what its expiry is computed from once the queue's TTL
/// is known.
#[derive(Debug, Clone, Copy)]
pub struct RecoveredEntry {
    /// The entry (expiry not yet set).
    pub entry: QueueEntry,
    /// When the broker first took the message.
    pub published_at: u64,
    /// Its per-message TTL.
    pub expiration: Option<u64>,
    /// It died and waits for a dead-letter target (the reason's code).
    pub parked: Option<u8>,
}

/// Collects replayed records.
#[derive(Debug, Default)]
pub struct Replay {
    queues: HashMap<QueueId, Vec<Recovered>>,
    /// Records this version could not interpret: how many, and the first one's kind
    /// byte and position. The broker refuses to open such a log.
    pub unknown_records: u64,
    /// The first record this version could not interpret.
    pub first_unknown: Option<(u8, LogPosition)>,
    /// Deduplication keys per queue, oldest first: the last checkpoint's, then those of
    /// later publish records.
    pub dedup_keys: HashMap<QueueId, VecDeque<(Vec<u8>, u64)>>,
    /// Where the last deduplication checkpoint is; it stays pinned.
    pub dedup_checkpoint: Option<LogPosition>,
    /// The highest queue (or window) id any record names. Ids are never reused, also
    /// those of queues the definitions do not know (exclusive durable queues, which
    /// die with their connection): a new queue with such an id would be handed the old
    /// queue's messages at the next restart.
    pub max_queue_id: u64,
    /// Changes to the durable definitions, in log order, with where each is.
    pub definition_changes: Vec<(LogPosition, DefinitionChange)>,
}

/// Keys kept per queue while replaying; windows larger than this are rebuilt partially.
const REPLAY_KEYS_PER_QUEUE: usize = 1_000_000;

impl Replay {
    /// Feeds one record.
    pub fn visit(&mut self, position: LogPosition, payload: &[u8]) {
        let record = replay(payload);
        if let Some(record) = &record {
            self.max_queue_id = self.max_queue_id.max(highest_queue_id(record));
        }
        match record {
            Some(Replayed::Publish(header)) => {
                // A dead-letter move removes the original in the same record.
                self.settle(&header.settles);
                if !header.persistent {
                    return;
                }
                if let Some((key, scopes)) = &header.dedup {
                    for scope in scopes {
                        let keys = self.dedup_keys.entry(*scope).or_default();
                        keys.push_back((key.clone(), header.published_at));
                        if keys.len() > REPLAY_KEYS_PER_QUEUE {
                            keys.pop_front();
                        }
                    }
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
                    delivery_count: 0,
                    expires_at: u64::MAX,
                };
                for queue in header.durable_queues {
                    self.queues.entry(queue).or_default().push(Recovered {
                        entry,
                        acked: false,
                        parked: None,
                        published_at: header.published_at,
                        expiration: header.expiration,
                    });
                }
            }
            Some(Replayed::Ack(acks)) => self.settle(&acks),
            Some(Replayed::DedupCheckpoint(checkpoint)) => {
                self.dedup_keys = checkpoint
                    .into_iter()
                    .map(|(queue, keys)| (queue, keys.into_iter().collect()))
                    .collect();
                self.dedup_checkpoint = Some(position);
            }
            Some(Replayed::Park(reason, entries)) => {
                for (queue, position) in entries {
                    if let Some(recovered) = self.find(queue, position) {
                        recovered.parked = Some(reason);
                    }
                }
            }
            Some(Replayed::Requeue(requeues)) => {
                for (queue, position) in requeues {
                    if let Some(recovered) = self.find(queue, position) {
                        recovered.entry.delivery_count =
                            recovered.entry.delivery_count.saturating_add(1);
                    }
                }
            }
            Some(Replayed::Definition(json)) => match DefinitionChange::from_json(&json) {
                Ok(change) => self.definition_changes.push((position, change)),
                Err(_) => self.unknown(position, payload),
            },
            None => self.unknown(position, payload),
        }
    }

    fn unknown(&mut self, position: LogPosition, payload: &[u8]) {
        self.unknown_records += 1;
        if self.first_unknown.is_none() {
            self.first_unknown = Some((payload.first().copied().unwrap_or(0), position));
        }
    }

    fn find(&mut self, queue: QueueId, position: u64) -> Option<&mut Recovered> {
        let entries = self.queues.get_mut(&queue)?;
        let index = entries
            .binary_search_by_key(&position, |r| r.entry.message.position.0)
            .ok()?;
        entries.get_mut(index)
    }

    fn settle(&mut self, pairs: &[(QueueId, u64)]) {
        for (queue, position) in pairs {
            if let Some(recovered) = self.find(*queue, *position) {
                recovered.acked = true;
            }
        }
    }

    /// The surviving entries of each queue, in log order.
    pub fn take_queues(&mut self) -> HashMap<QueueId, Vec<RecoveredEntry>> {
        std::mem::take(&mut self.queues)
            .into_iter()
            .map(|(queue, entries)| {
                let live = entries
                    .into_iter()
                    .filter(|r| !r.acked)
                    .map(|r| RecoveredEntry {
                        entry: r.entry,
                        published_at: r.published_at,
                        expiration: r.expiration,
                        parked: r.parked,
                    })
                    .collect();
                (queue, live)
            })
            .collect()
    }
}

impl Replay {
    /// The broker's state as the log (and the definitions checkpoint) left it.
    ///
    /// # Errors
    /// [`BrokerError::UnknownRecord`] when the log holds a record this version cannot
    /// interpret (skipping it could drop acks or moves silently); the errors of reading
    /// the definitions checkpoint.
    pub fn into_state(
        mut self,
        store: &Store,
        consumer_timeout: u64,
        segment_size: u64,
        sync_definitions: bool,
    ) -> Result<State, BrokerError> {
        if let Some((kind, position)) = self.first_unknown {
            return Err(BrokerError::UnknownRecord {
                kind,
                position: position.0,
                count: self.unknown_records,
            });
        }
        let mut state = State::new(store.clone(), consumer_timeout, segment_size);
        state.sync_definitions = sync_definitions;
        state
            .vhosts
            .insert(DEFAULT_VHOST.to_owned(), VHost::with_builtin_exchanges());
        let checkpoint: Option<Definitions> = match store.read_definitions()? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(BrokerError::Definitions)?),
            None => None,
        };
        let mut settlements = Settlements::new(store);
        let changes = std::mem::take(&mut self.definition_changes);
        restore_definitions(&mut state, checkpoint, changes, &mut settlements);
        settlements.apply();
        // Everything recovered counts as logged before any reply from now on.
        state.definitions_end = store.stats().written;
        state.next_queue_id = state.next_queue_id.max(self.max_queue_id + 1);
        state.restore_dedup_windows(std::mem::take(&mut self.dedup_keys), self.dedup_checkpoint);
        let mut recovered_messages = 0u64;
        for (queue_id, entries) in self.take_queues() {
            let Some(queue) = state.queues.get_mut(&queue_id) else {
                continue;
            };
            for recovered in entries {
                let mut entry = recovered.entry;
                entry.expires_at = expiry(
                    recovered.published_at,
                    queue.policy.message_ttl,
                    recovered.expiration,
                );
                store.retain(entry.message.position);
                recovered_messages += 1;
                // A dead letter that was waiting for a target waits again.
                match recovered.parked.and_then(DeathReason::from_code) {
                    Some(reason) => queue.dead_letter_pending.push_back(PendingDeadLetter {
                        entry,
                        reason,
                        attempts: 0,
                        due_at: 0,
                    }),
                    None => queue.push(entry),
                }
            }
        }
        store.collect_garbage();
        info!(
            queues = state.queues.len(),
            messages = recovered_messages,
            "broker state recovered"
        );
        Ok(state)
    }
}

/// Rebuilds the definitions from the checkpoint and the change records past it, which
/// stay pinned until the next checkpoint.
fn restore_definitions(
    state: &mut State,
    checkpoint: Option<Definitions>,
    changes: Vec<(LogPosition, DefinitionChange)>,
    settlements: &mut Settlements<'_>,
) {
    let as_of = checkpoint.as_ref().map_or(0, |c| c.as_of);
    if let Some(checkpoint) = checkpoint {
        checkpoint.restore(state, settlements);
    }
    for (position, change) in changes {
        if position.0 < as_of {
            continue;
        }
        change.apply(state, settlements);
        state.store.retain(position);
        state.definition_records.push(position);
    }
}

/// The highest queue id a record names, 0 if none.
fn highest_queue_id(record: &Replayed) -> u64 {
    let of_pairs = |pairs: &[(QueueId, u64)]| pairs.iter().map(|(q, _)| q.0).max().unwrap_or(0);
    match record {
        Replayed::Publish(header) => header
            .durable_queues
            .iter()
            .map(|q| q.0)
            .chain(
                header
                    .dedup
                    .iter()
                    .flat_map(|(_, scopes)| scopes.iter().map(|q| q.0)),
            )
            .max()
            .unwrap_or(0)
            .max(of_pairs(&header.settles)),
        Replayed::Ack(pairs) | Replayed::Requeue(pairs) | Replayed::Park(_, pairs) => {
            of_pairs(pairs)
        }
        Replayed::DedupCheckpoint(windows) => windows.iter().map(|(q, _)| q.0).max().unwrap_or(0),
        // Declared ids are raised past by applying the change itself.
        Replayed::Definition(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{NewPublish, encode_ack, encode_publish, encode_requeue};

    fn publish(persistent: bool, queues: &[QueueId], settles: &[(QueueId, u64)]) -> Vec<u8> {
        encode_publish(&NewPublish {
            persistent,
            published_at: 1000,
            expiration: None,
            dedup: None,
            exchange: "",
            routing_key: "a",
            durable_queues: queues,
            settles,
            properties: &[0, 0],
            body: b"x",
        })
        .to_vec()
    }

    #[test]
    fn acked_and_transient_messages_do_not_come_back() {
        let mut replay = Replay::default();
        let q1 = QueueId(1);
        let q2 = QueueId(2);
        let q3 = QueueId(3);
        replay.visit(LogPosition(8), &publish(true, &[q1, q2], &[]));
        replay.visit(LogPosition(50), &publish(false, &[], &[]));
        replay.visit(LogPosition(90), &publish(true, &[q1], &[]));
        replay.visit(LogPosition(130), &encode_ack(&[(q1, 8)]));
        replay.visit(LogPosition(150), &encode_requeue(&[(q1, 90)]));
        replay.visit(LogPosition(170), &encode_requeue(&[(q1, 90)]));
        // A dead-letter move of q2's copy into q3: one record, both effects.
        replay.visit(LogPosition(200), &publish(true, &[q3], &[(q2, 8)]));
        let queues = replay.take_queues();
        let positions = |q| -> Vec<u64> {
            queues
                .get(&q)
                .map(|entries| entries.iter().map(|e| e.entry.message.position.0).collect())
                .unwrap_or_default()
        };
        assert_eq!(positions(q1), vec![90]);
        assert_eq!(queues[&q1][0].entry.delivery_count, 2);
        assert_eq!(positions(q2), Vec::<u64>::new());
        assert_eq!(positions(q3), vec![200]);
    }
}
