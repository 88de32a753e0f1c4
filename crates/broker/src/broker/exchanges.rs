//! Exchange declaration, deletion and exchange-to-exchange bindings.

use holdfast_codec::FieldTable;

use super::{Broker, default_exchange_refused, inequivalent, not_found_exchange};
use crate::ConnectionId;
use crate::QueueId;
use crate::arguments::{QueuePolicy, text};
use crate::dedup::DedupWindow;
use crate::definitions::{
    BindingDefinition, DefinitionChange, ExchangeDefinition, is_builtin_exchange,
};
use crate::error::{AmqpException, AmqpResult, ReplyCode};
use crate::exchange::{DELAYED_MESSAGE, Destination, Exchange, ExchangeKind};
use crate::state::Settlements;

impl Broker {
    /// `exchange.declare`.
    ///
    /// # Errors
    /// 403 for reserved names, 404 for a passive miss, 406 for an inequivalent
    /// re-declaration, 503 (connection) for an unknown type.
    #[allow(clippy::too_many_arguments)]
    pub fn exchange_declare(
        &self,
        connection: ConnectionId,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let vhost = state
            .vhosts
            .get_mut(&*vhost_name)
            .ok_or_else(|| not_found_exchange(name, &vhost_name))?;
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if let Some(existing) = vhost.exchanges.get(name) {
            if passive {
                return Ok(());
            }
            if existing.type_name() != kind {
                return Err(inequivalent(
                    "type",
                    "exchange",
                    name,
                    &vhost_name,
                    kind,
                    existing.type_name(),
                ));
            }
            for (arg, received, current) in [
                ("durable", durable, existing.durable),
                ("auto_delete", auto_delete, existing.auto_delete),
                ("internal", internal, existing.internal),
            ] {
                if received != current {
                    return Err(inequivalent(
                        arg,
                        "exchange",
                        name,
                        &vhost_name,
                        &received.to_string(),
                        &current.to_string(),
                    ));
                }
            }
            return Ok(());
        }
        if passive {
            return Err(not_found_exchange(name, &vhost_name));
        }
        if name.starts_with("amq.") {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let delayed = kind == DELAYED_MESSAGE;
        let kind = if delayed {
            // RabbitMQ's delayed-message plugin: routes like `x-delayed-type` once due.
            arguments
                .inner()
                .get("x-delayed-type")
                .and_then(text)
                .and_then(|t| ExchangeKind::parse(&t))
                .ok_or_else(|| {
                    AmqpException::channel(
                        ReplyCode::PreconditionFailed,
                        "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                    )
                })?
        } else {
            ExchangeKind::parse(kind).ok_or_else(|| {
                AmqpException::connection(
                    ReplyCode::CommandInvalid,
                    format!("unknown exchange type '{kind}'"),
                )
            })?
        };
        let deduplication = QueuePolicy::parse(&arguments, name, &vhost_name)?.deduplication;
        if durable {
            // The exchange, its delay queue and its window in one record, logged before
            // any of them exists.
            let mut allocate = || {
                let id = QueueId(state.next_queue_id.max(1));
                state.next_queue_id = id.0 + 1;
                id
            };
            let delay_queue = delayed.then(&mut allocate);
            let dedup_scope = deduplication.map(|_| allocate());
            let change = DefinitionChange::DeclareExchange {
                vhost: vhost_name.to_string(),
                exchange: ExchangeDefinition {
                    name: name.to_owned(),
                    kind,
                    delay_queue,
                    dedup_scope,
                    auto_delete,
                    internal,
                    arguments,
                },
            };
            let mut settlements = Settlements::new(&self.store);
            self.change_definitions(&mut state, change, true, &mut settlements)?;
            settlements.apply();
            return Ok(());
        }
        let mut exchange = Exchange::new(
            name.to_owned(),
            kind,
            false,
            auto_delete,
            internal,
            arguments,
        );
        if delayed {
            exchange.delay_queue = Some(state.create_delay_queue(&vhost_name, name, false));
        }
        if let Some((size, ttl)) = deduplication {
            exchange.dedup = Some(DedupWindow::new(size, ttl));
            let scope = QueueId(state.next_queue_id.max(1));
            state.next_queue_id = scope.0 + 1;
            exchange.dedup_scope = Some(scope);
        }
        if let Some(vhost) = state.vhosts.get_mut(&*vhost_name) {
            vhost.exchanges.insert(name.to_owned(), exchange);
        }
        Ok(())
    }

    /// `exchange.delete`. Deleting an exchange that does not exist succeeds, as in
    /// RabbitMQ 3.x and later.
    ///
    /// # Errors
    /// 403 for the default and `amq.*` exchanges, 406 when `if_unused` and it has
    /// bindings.
    pub fn exchange_delete(
        &self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if is_builtin_exchange(name) {
            return Err(if name.is_empty() {
                default_exchange_refused()
            } else {
                AmqpException::channel(
                    ReplyCode::AccessRefused,
                    format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
                )
            });
        }
        let Some(vhost) = state.vhosts.get_mut(&*vhost_name) else {
            return Ok(());
        };
        let Some(exchange) = vhost.exchanges.get(name) else {
            return Ok(());
        };
        if if_unused && !exchange.bindings().is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("exchange '{name}' in vhost '{vhost_name}' in use"),
            ));
        }
        let durable = exchange.durable;
        // Bindings to it and its delay queue (messages still waiting for their delay,
        // as in the RabbitMQ plugin) go with it.
        let change = DefinitionChange::DeleteExchange {
            vhost: vhost_name.to_string(),
            name: name.to_owned(),
        };
        let mut settlements = Settlements::new(&self.store);
        let deleted = self.change_definitions(&mut state, change, durable, &mut settlements);
        settlements.apply();
        deleted
    }

    /// `exchange.bind` / `exchange.unbind` (`bind = false`).
    ///
    /// # Errors
    /// 404 when either exchange is missing, 403 for the default exchange.
    pub fn exchange_binding(
        &self,
        connection: ConnectionId,
        bind: bool,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if source.is_empty() || destination.is_empty() {
            return Err(default_exchange_refused());
        }
        let vhost = state
            .vhosts
            .get_mut(&*vhost_name)
            .ok_or_else(|| not_found_exchange(source, &vhost_name))?;
        let destination_durable = match vhost.exchanges.get(destination) {
            Some(exchange) => exchange.durable,
            None if bind => return Err(not_found_exchange(destination, &vhost_name)),
            None => false,
        };
        let binding = BindingDefinition {
            source: source.to_owned(),
            destination: Destination::Exchange(destination.to_owned()),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        let Some(exchange) = vhost.exchanges.get(source) else {
            return if bind {
                Err(not_found_exchange(source, &vhost_name))
            } else {
                Ok(())
            };
        };
        let durable = exchange.durable && destination_durable;
        if self.change_binding(&mut state, &vhost_name, bind, binding, durable)? {
            let mut settlements = Settlements::new(&self.store);
            self.delete_emptied_exchanges(
                &mut state,
                &vhost_name,
                vec![source.to_owned()],
                &mut settlements,
            );
            settlements.apply();
        }
        Ok(())
    }
}
