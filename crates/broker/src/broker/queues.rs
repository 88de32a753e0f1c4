//! Queue declaration, bindings, purge and deletion.

use holdfast_codec::FieldTable;

use super::{
    Broker, QueueDeclare, QueueDeclareOk, default_exchange_refused, inequivalent, locked,
    not_found_exchange, not_found_queue, random_suffix, x_arguments,
};
use crate::arguments::QueuePolicy;
use crate::definitions::{BindingDefinition, DefinitionChange, QueueDefinition};
use crate::enqueue::now_ms;
use crate::error::{AmqpException, AmqpResult, ReplyCode};
use crate::exchange::Destination;
use crate::queue::Queue;
use crate::state::Settlements;
use crate::{ConnectionId, QueueId};

impl Broker {
    /// `queue.declare`.
    ///
    /// # Errors
    /// 403 for reserved names, 404 for a passive miss, 405 for another connection's
    /// exclusive queue, 406 for an inequivalent re-declaration.
    pub fn queue_declare(
        &self,
        connection: ConnectionId,
        request: QueueDeclare,
    ) -> AmqpResult<QueueDeclareOk> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let name = if request.name.is_empty() && !request.passive {
            format!("amq.gen-{}", random_suffix(22))
        } else {
            request.name.clone()
        };
        let existing = state
            .vhosts
            .get(&*vhost_name)
            .and_then(|v| v.queues.get(&name))
            .copied();
        if let Some(id) = existing {
            let queue = state
                .queues
                .get_mut(&id)
                .ok_or_else(|| not_found_queue(&name, &vhost_name))?;
            // A declaration counts as use for `x-expires`, as in RabbitMQ.
            queue.last_used = now_ms();
            if queue
                .exclusive_owner
                .is_some_and(|owner| owner != connection)
            {
                return Err(locked(&name, &vhost_name));
            }
            if !request.passive {
                let exclusive = queue.exclusive_owner.is_some();
                for (arg, received, current) in [
                    ("durable", request.durable, queue.durable),
                    ("exclusive", request.exclusive, exclusive),
                    ("auto_delete", request.auto_delete, queue.auto_delete),
                ] {
                    if received != current {
                        return Err(inequivalent(
                            arg,
                            "queue",
                            &name,
                            &vhost_name,
                            &received.to_string(),
                            &current.to_string(),
                        ));
                    }
                }
                let received = x_arguments(&request.arguments);
                let current = x_arguments(&queue.arguments);
                if received != current {
                    let arg = received
                        .iter()
                        .chain(current.iter())
                        .find(|pair| !received.contains(pair) || !current.contains(pair))
                        .map_or("arguments", |(k, _)| *k);
                    return Err(inequivalent(
                        arg,
                        "queue",
                        &name,
                        &vhost_name,
                        "a different value",
                        "another",
                    ));
                }
            }
            return Ok(QueueDeclareOk {
                name,
                message_count: queue.message_count(),
                consumer_count: queue.consumer_count(),
            });
        }
        if request.passive {
            return Err(not_found_queue(&name, &vhost_name));
        }
        if name.starts_with("amq.") && !request.name.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let policy = QueuePolicy::parse(&request.arguments, &name, &vhost_name)?;
        let id = QueueId(state.next_queue_id.max(1));
        state.next_queue_id = id.0 + 1;
        if request.durable && !request.exclusive {
            // Logged before it exists: a declare the log refused leaves nothing behind,
            // and the next declare of the name writes it again.
            let change = DefinitionChange::DeclareQueue {
                vhost: vhost_name.to_string(),
                queue: QueueDefinition {
                    id,
                    name: name.clone(),
                    auto_delete: request.auto_delete,
                    arguments: request.arguments,
                },
            };
            let mut settlements = Settlements::new(&self.store);
            self.change_definitions(&mut state, change, true, &mut settlements)?;
            settlements.apply();
            return Ok(QueueDeclareOk {
                name,
                message_count: 0,
                consumer_count: 0,
            });
        }
        state.queues.insert(
            id,
            Queue::new(
                id,
                name.clone(),
                vhost_name.to_string(),
                request.durable,
                request.exclusive.then_some(connection),
                request.auto_delete,
                request.arguments,
                policy,
                now_ms(),
            ),
        );
        if let Some(vhost) = state.vhosts.get_mut(&*vhost_name) {
            vhost.queues.insert(name.clone(), id);
        }
        if request.exclusive
            && let Some(owner) = state.connections.get_mut(&connection)
        {
            owner.exclusive_queues.insert(id);
        }
        Ok(QueueDeclareOk {
            name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    /// `queue.bind` / `queue.unbind` (`bind = false`).
    ///
    /// # Errors
    /// 404 for a missing queue or exchange, 403 for the default exchange, 405 for another
    /// connection's exclusive queue.
    pub fn queue_binding(
        &self,
        connection: ConnectionId,
        bind: bool,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        let queue_id = Self::queue_id(&state, connection, &vhost_name, queue)?;
        let queue_durable = state
            .queues
            .get(&queue_id)
            .is_some_and(|q| q.durable && q.exclusive_owner.is_none());
        let vhost = state
            .vhosts
            .get_mut(&*vhost_name)
            .ok_or_else(|| not_found_exchange(exchange, &vhost_name))?;
        let source = vhost
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| not_found_exchange(exchange, &vhost_name))?;
        let binding = BindingDefinition {
            source: exchange.to_owned(),
            destination: Destination::Queue(queue_id),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        let durable = source.durable && queue_durable;
        let emptied = self.change_binding(&mut state, &vhost_name, bind, binding, durable)?;
        if emptied {
            let mut settlements = Settlements::new(&self.store);
            self.delete_emptied_exchanges(
                &mut state,
                &vhost_name,
                vec![exchange.to_owned()],
                &mut settlements,
            );
            settlements.apply();
        }
        Ok(())
    }

    /// `queue.purge`: drops ready messages (not those awaiting ack); returns how many.
    ///
    /// # Errors
    /// 404 / 405 as for any queue access.
    pub fn queue_purge(&self, connection: ConnectionId, queue: &str) -> AmqpResult<u32> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let queue_id = Self::queue_id(&state, connection, &vhost_name, queue)?;
        let mut settlements = Settlements::new(&self.store);
        let mut purged = 0;
        if let Some(queue) = state.queues.get_mut(&queue_id) {
            while let Some(entry) = queue.pop() {
                settlements.settle(queue_id, &entry);
                purged += 1;
            }
            // Retries waiting out a redelivery delay are ready messages too.
            for entry in std::mem::take(&mut queue.held).into_values() {
                settlements.settle(queue_id, &entry);
                purged += 1;
            }
        }
        settlements.apply();
        Ok(purged)
    }

    /// `queue.delete`; returns the number of ready messages dropped. Deleting a queue
    /// that does not exist succeeds with 0, as in RabbitMQ 3.x and later.
    ///
    /// # Errors
    /// 406 when `if_unused`/`if_empty` do not hold, 405 for another connection's
    /// exclusive queue.
    pub fn queue_delete(
        &self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let queue_id = match Self::queue_id(&state, connection, &vhost_name, queue) {
            Ok(id) => id,
            Err(err) if err.code == ReplyCode::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let Some(target) = state.queues.get(&queue_id) else {
            return Ok(0);
        };
        if if_unused && !target.consumers.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("queue '{queue}' in vhost '{vhost_name}' in use"),
            ));
        }
        if if_empty && !target.ready.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("queue '{queue}' in vhost '{vhost_name}' is not empty"),
            ));
        }
        let mut settlements = Settlements::new(&self.store);
        // A deletion the log refused fails whole: the queue and its messages stay.
        let dropped = self.delete_queue_logged(&mut state, queue_id, &mut settlements);
        settlements.apply();
        dropped
    }

    /// Ready and consumer counts of a queue, if it exists.
    #[must_use]
    pub fn queue_counts(&self, vhost: &str, queue: &str) -> Option<(u32, u32)> {
        let state = self.state.lock();
        let id = state.vhosts.get(vhost)?.queues.get(queue)?;
        let queue = state.queues.get(id)?;
        Some((queue.message_count(), queue.consumer_count()))
    }
}
