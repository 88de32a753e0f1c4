//! The basic class: qos, consume, cancel, publish, get, acknowledgements, recover.

use std::sync::Arc;

use super::{
    Broker, ConsumeRequest, GetOk, PublishOutcome, PublishRequest, not_found_exchange,
    not_found_queue, random_suffix,
};
use crate::channel::Unacked;
use crate::dedup::ExchangeDedup;
use crate::enqueue::{Message, RouteError, now_ms};
use crate::error::{AmqpException, AmqpResult, ReplyCode};
use crate::queue::Consumer;
use crate::state::Disposition;
use crate::state::Settlements;
use crate::{ChannelKey, ConnectionId, QueueId};

impl Broker {
    /// `basic.qos`. A prefetch size other than 0 is refused by the amqp layer, as
    /// RabbitMQ does.
    pub fn basic_qos(&self, key: ChannelKey, prefetch_count: u16, global: bool) {
        let mut state = self.state.lock();
        if let Some(channel) = state.channels.get_mut(&key) {
            if global {
                channel.channel_prefetch = prefetch_count;
            } else {
                channel.consumer_prefetch = prefetch_count;
            }
        }
        let mut settlements = Settlements::new(&self.store);
        state.dispatch_channel(key, &mut settlements);
        settlements.apply();
    }

    /// `basic.consume`: registers the consumer but delivers nothing yet, so the caller
    /// can send `consume-ok` first and then call [`Broker::dispatch`].
    ///
    /// # Errors
    /// 404 / 405 for the queue, 403 for exclusivity conflicts, 530 (connection) for a
    /// reused tag.
    pub fn basic_consume(
        &self,
        key: ChannelKey,
        request: ConsumeRequest,
    ) -> AmqpResult<(Arc<str>, QueueId)> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, key.connection)?;
        let queue_id = Self::queue_id(&state, key.connection, &vhost_name, &request.queue)?;
        let tag: Arc<str> = if request.consumer_tag.is_empty() {
            format!("amq.ctag-{}", random_suffix(22)).into()
        } else {
            request.consumer_tag.as_str().into()
        };
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        if channel.consumers.contains_key(&tag) {
            return Err(AmqpException::connection(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let prefetch = channel.consumer_prefetch;
        let queue = state
            .queues
            .get_mut(&queue_id)
            .ok_or_else(|| not_found_queue(&request.queue, &vhost_name))?;
        if queue.has_exclusive_consumer() || (request.exclusive && !queue.consumers.is_empty()) {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!(
                    "queue '{}' in vhost '{vhost_name}' in exclusive use",
                    request.queue
                ),
            ));
        }
        queue.consumers.push(Consumer {
            channel: key,
            tag: tag.clone(),
            no_ack: request.no_ack,
            exclusive: request.exclusive,
            prefetch,
            unacked: 0,
        });
        queue.had_consumer = true;
        queue.last_used = now_ms();
        if let Some(channel) = state.channels.get_mut(&key) {
            channel.consumers.insert(tag.clone(), queue_id);
        }
        Ok((tag, queue_id))
    }

    /// Delivers what a queue can deliver now.
    pub fn dispatch(&self, queue: QueueId) {
        let mut state = self.state.lock();
        let mut settlements = Settlements::new(&self.store);
        state.dispatch(queue, &mut settlements);
        settlements.apply();
    }

    /// `basic.cancel`. Unknown tags are not an error (the consumer may have been
    /// cancelled by the server already).
    pub fn basic_cancel(&self, key: ChannelKey, consumer_tag: &str) {
        let mut state = self.state.lock();
        let tag: Arc<str> = consumer_tag.into();
        if let Some(queue) = state.remove_consumer(key, &tag) {
            let mut settlements = Settlements::new(&self.store);
            if let Err(err) = self.delete_queue_logged(&mut state, queue, &mut settlements) {
                tracing::warn!(cause = %err.text, "auto-delete queue kept: its deletion could not be logged");
            }
            settlements.apply();
        }
    }

    /// `basic.publish`: routes, writes the message once, enqueues it everywhere.
    ///
    /// # Errors
    /// 404 for a missing exchange, 403 for an internal one, 541 (connection) when the
    /// store cannot take the write.
    pub fn basic_publish(
        &self,
        connection: ConnectionId,
        request: &PublishRequest,
    ) -> AmqpResult<PublishOutcome> {
        let mut state = self.state.lock();
        let vhost = Self::vhost_of(&state, connection)?;
        let now = now_ms();
        let dedup_scope = match request.dedup_key.as_deref() {
            Some(key) => match state.exchange_dedup(&vhost, &request.exchange, key, now) {
                ExchangeDedup::Duplicate => {
                    // Confirmed (the retry succeeds) but routed nowhere; the confirm
                    // waits for everything written so far, the original included.
                    return Ok(PublishOutcome {
                        routed: true,
                        rejected: false,
                        durable_end: {
                            let written = self.store.stats().written;
                            self.store.request_durable(written);
                            Some(written)
                        },
                    });
                }
                ExchangeDedup::New(scope) => Some(scope),
                ExchangeDedup::NotDeduplicating => None,
            },
            None => None,
        };
        // Through a deduplicating exchange a publish is all or nothing: the key is
        // remembered only once every target took the message, so that the producer's
        // retry of a refused or unroutable publish is not taken for a duplicate.
        let all_or_nothing = dedup_scope.is_some();
        let dedup_scope = dedup_scope.flatten();
        let delayed = state.delay_for_publish(&vhost, &request.exchange, request.headers.as_ref());
        let targets = match delayed {
            Some((delay_queue, _)) => vec![delay_queue],
            None => state
                .route(
                    &vhost,
                    &request.exchange,
                    &request.routing_key,
                    request.headers.as_ref(),
                )
                .map_err(|err| match err {
                    RouteError::NoExchange => not_found_exchange(&request.exchange, &vhost),
                    RouteError::Internal => AmqpException::channel(
                        ReplyCode::AccessRefused,
                        format!(
                            "cannot publish to internal exchange '{}' in vhost '{vhost}'",
                            request.exchange
                        ),
                    ),
                })?,
        };
        if targets.is_empty() {
            return Ok(PublishOutcome {
                routed: false,
                rejected: false,
                durable_end: None,
            });
        }
        let message = Message {
            exchange: &request.exchange,
            routing_key: &request.routing_key,
            persistent: request.persistent,
            headers: request.headers.as_ref(),
            properties: &request.properties,
            body: &request.body,
            // In a delay queue, "expiry" is when the message is due.
            expiration: delayed.map_or(request.expiration, |(_, delay)| Some(delay)),
            dedup_key: request.dedup_key.as_deref(),
            dedup_scope,
            published_at: now,
        };
        if all_or_nothing && state.refused_by_any(&message, &targets) {
            return Ok(PublishOutcome {
                routed: true,
                rejected: true,
                durable_end: None,
            });
        }
        let mut settlements = Settlements::new(&self.store);
        let enqueued = match state.enqueue(&message, &targets, &[], &mut settlements) {
            Ok(enqueued) => enqueued,
            // The log is intact and nothing was stored: nack (or, without confirms, drop
            // and count) and block publishers until space returns.
            Err(err) if err.is_out_of_space() => {
                settlements.apply();
                self.alarms.disk_write_refused();
                self.alarms.count_refused_publish();
                tracing::warn!(exchange = %request.exchange, routing_key = %request.routing_key, cause = %err, "publish refused for lack of disk space: nacked, or dropped without confirms");
                return Ok(PublishOutcome {
                    routed: true,
                    rejected: true,
                    durable_end: None,
                });
            }
            Err(err) => {
                return Err(AmqpException::connection(
                    ReplyCode::InternalError,
                    format!("message store failed: {err}"),
                ));
            }
        };
        settlements.apply();
        if all_or_nothing
            && !enqueued.rejected
            && let Some(key) = request.dedup_key.as_deref()
        {
            state.exchange_dedup_record(&vhost, &request.exchange, key, now);
        }
        Ok(PublishOutcome {
            routed: true,
            rejected: enqueued.rejected,
            durable_end: enqueued.durable_end,
        })
    }

    /// `basic.get`.
    ///
    /// # Errors
    /// 404 / 405 for the queue.
    pub fn basic_get(
        &self,
        key: ChannelKey,
        queue: &str,
        no_ack: bool,
    ) -> AmqpResult<Option<GetOk>> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, key.connection)?;
        let queue_id = Self::queue_id(&state, key.connection, &vhost_name, queue)?;
        let mut settlements = Settlements::new(&self.store);
        state.expire_head(queue_id, now_ms(), &mut settlements);
        settlements.apply();
        let Some(queue) = state.queues.get_mut(&queue_id) else {
            return Err(not_found_queue(queue, &vhost_name));
        };
        queue.last_used = now_ms();
        let Some(entry) = queue.pop() else {
            return Ok(None);
        };
        let message_count = queue.message_count();
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        let delivery_tag = channel.next_delivery_tag();
        if no_ack {
            let mut settlements = Settlements::new(&self.store);
            settlements.settle_keep_reference(queue_id, &entry);
            settlements.apply();
        } else {
            channel.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue_id,
                    entry,
                    consumer_tag: None,
                    delivered_at: now_ms(),
                },
            );
        }
        Ok(Some(GetOk {
            delivery_tag,
            redelivered: entry.redelivered,
            message_count,
            delivery_count: entry.delivery_count,
            message: entry.message,
            release_after_read: no_ack,
        }))
    }

    /// `basic.ack`, `basic.nack` and `basic.reject`: settles (`requeue = false` or an
    /// ack) or requeues the deliveries the tag covers.
    ///
    /// # Errors
    /// 406 PRECONDITION_FAILED for an unknown delivery tag.
    pub fn basic_settle(
        &self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
        disposition: Disposition,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        let deliveries = channel
            .take_settled(delivery_tag, multiple)
            .ok_or_else(|| {
                AmqpException::channel(
                    ReplyCode::PreconditionFailed,
                    format!("unknown delivery tag {delivery_tag}"),
                )
            })?;
        let mut settlements = Settlements::new(&self.store);
        let touched = state.finish_deliveries(key, deliveries, disposition, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        state.dispatch_channel(key, &mut settlements);
        settlements.apply();
        Ok(())
    }

    /// `basic.recover` with requeue: every unacked delivery of the channel goes back.
    pub fn basic_recover(&self, key: ChannelKey) {
        let mut state = self.state.lock();
        let deliveries: Vec<(u64, Unacked)> = state
            .channels
            .get_mut(&key)
            .map(|c| std::mem::take(&mut c.unacked).into_iter().collect())
            .unwrap_or_default();
        let mut settlements = Settlements::new(&self.store);
        let touched =
            state.finish_deliveries(key, deliveries, Disposition::Requeue, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply();
    }
}
