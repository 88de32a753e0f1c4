//! Changes to durable definitions: each is a log record written before the change is
//! applied, so a change the log refused leaves no trace, and the reply to the client
//! waits for the record's durability like a publisher confirm. The definitions file is
//! a checkpoint of them, written when the records it replaces would otherwise pin old
//! segments.

use holdfast_store::{Durability, StoreError};
use tracing::{error, warn};

use super::Broker;
use crate::QueueId;
use crate::definitions::{BindingDefinition, DefinitionChange, Definitions};
use crate::error::{AmqpException, ReplyCode};
use crate::record::encode_definition;
use crate::state::{Settlements, State};

/// Definition records after which a checkpoint is written even if they pin nothing yet.
const MAX_UNCHECKPOINTED_RECORDS: usize = 10_000;

fn refused(err: &StoreError) -> AmqpException {
    AmqpException::connection(ReplyCode::InternalError, format!("definitions: {err}"))
}

impl Broker {
    /// The log offset a reply to a definition method waits for: the end of the last
    /// definition record.
    #[must_use]
    pub fn definitions_end(&self) -> u64 {
        self.state.lock().definitions_end
    }

    /// Writes `change` to the log (pinned until a checkpoint covers it); applies nothing.
    fn log_definition(
        &self,
        state: &mut State,
        change: &DefinitionChange,
    ) -> Result<(), StoreError> {
        let appended = self.store.append(
            &encode_definition(&change.to_json()),
            1,
            Durability::Requested,
        )?;
        if state.sync_definitions {
            // A declare-ok is a promise under every fsync policy, as it always was.
            self.store.sync_all()?;
        }
        state.definition_records.push(appended.position);
        state.definitions_end = state.definitions_end.max(appended.end);
        Ok(())
    }

    /// Applies a change, logging it first when it touches only durable things (a
    /// transient one is applied without a record).
    ///
    /// # Errors
    /// 541 (connection) when the log refuses the record; nothing is applied then.
    pub(super) fn change_definitions(
        &self,
        state: &mut State,
        change: DefinitionChange,
        durable: bool,
        settlements: &mut Settlements<'_>,
    ) -> Result<(), AmqpException> {
        if durable {
            self.log_definition(state, &change)
                .map_err(|err| refused(&err))?;
        }
        change.apply(state, settlements);
        Ok(())
    }

    /// Deletes a queue (a durable one only once its deletion is logged) and then the
    /// auto-delete exchanges it left without bindings. Returns the ready messages dropped.
    ///
    /// # Errors
    /// 541 (connection) when the deletion of a durable queue cannot be logged: the queue
    /// then stays as it was, here and after a restart.
    pub(super) fn delete_queue_logged(
        &self,
        state: &mut State,
        id: QueueId,
        settlements: &mut Settlements<'_>,
    ) -> Result<u32, AmqpException> {
        let Some(queue) = state.queues.get(&id) else {
            return Ok(0);
        };
        if queue.durable && queue.exclusive_owner.is_none() {
            let change = DefinitionChange::DeleteQueue {
                vhost: queue.vhost.clone(),
                id,
            };
            self.log_definition(state, &change)
                .map_err(|err| refused(&err))?;
        }
        let removal = state.delete_queue(id, settlements);
        self.delete_emptied_exchanges(
            state,
            &removal.vhost,
            removal.emptied_exchanges,
            settlements,
        );
        Ok(removal.dropped)
    }

    /// Deletes auto-delete exchanges that lost their last binding. A durable one whose
    /// deletion the log refuses stays (it is deleted again by its next unbinding).
    pub(super) fn delete_emptied_exchanges(
        &self,
        state: &mut State,
        vhost: &str,
        names: Vec<String>,
        settlements: &mut Settlements<'_>,
    ) {
        for name in names {
            let Some(exchange) = state.vhosts.get(vhost).and_then(|v| v.exchanges.get(&name))
            else {
                continue;
            };
            let change = DefinitionChange::DeleteExchange {
                vhost: vhost.to_owned(),
                name,
            };
            let durable = exchange.durable;
            if let Err(err) = self.change_definitions(state, change, durable, settlements) {
                warn!(cause = %err.text, "auto-delete exchange kept: its deletion could not be logged");
            }
        }
    }

    /// Adds (`bind`) or removes a binding, logged first when both ends are durable.
    /// Returns whether the source is an auto-delete exchange left without bindings,
    /// which the caller then deletes.
    ///
    /// # Errors
    /// 541 (connection) when the log refuses the record; nothing changes then.
    pub(super) fn change_binding(
        &self,
        state: &mut State,
        vhost: &str,
        bind: bool,
        binding: BindingDefinition,
        durable: bool,
    ) -> Result<bool, AmqpException> {
        let Some(exchange) = state
            .vhosts
            .get(vhost)
            .and_then(|v| v.exchanges.get(&binding.source))
        else {
            return Ok(false);
        };
        let exists = exchange.bindings().contains(&binding.binding());
        let source = binding.source.clone();
        if bind != exists {
            let change = if bind {
                DefinitionChange::Bind {
                    vhost: vhost.to_owned(),
                    binding,
                }
            } else {
                DefinitionChange::Unbind {
                    vhost: vhost.to_owned(),
                    binding,
                }
            };
            let mut settlements = Settlements::new(&self.store);
            self.change_definitions(state, change, durable, &mut settlements)?;
            settlements.apply();
        }
        Ok(!bind
            && state
                .vhosts
                .get(vhost)
                .and_then(|v| v.exchanges.get(&source))
                .is_some_and(|e| e.auto_delete && e.bindings().is_empty()))
    }

    /// Writes the definitions checkpoint once the records since the last one pin a
    /// segment the log has moved past (or are many), and only once all of them are
    /// durable: the checkpoint's offset must never lie beyond what a crash keeps of the
    /// log, or records written after the crash would be taken as already in it.
    pub(super) fn checkpoint_definitions(&self, state: &mut State) {
        let Some(oldest) = state.definition_records.first() else {
            return;
        };
        let stats = self.store.stats();
        let behind = stats.written.saturating_sub(oldest.0) > state.segment_size;
        if !behind && state.definition_records.len() < MAX_UNCHECKPOINTED_RECORDS {
            return;
        }
        if stats.durable < state.definitions_end {
            self.store.request_durable(state.definitions_end);
            return;
        }
        let mut definitions = Definitions::snapshot(state);
        definitions.as_of = state.definitions_end;
        let written = serde_json::to_vec(&definitions)
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                self.store
                    .write_definitions(&bytes)
                    .map_err(|err| err.to_string())
            });
        match written {
            Ok(()) => {
                for position in state.definition_records.drain(..) {
                    self.store.release(position);
                }
            }
            Err(err) => {
                error!(cause = %err, "definitions checkpoint could not be written; retried later")
            }
        }
    }
}
