//! Channel methods other than content: each decoded method becomes a broker call and a
//! reply.

use holdfast_broker::{AmqpException, AmqpResult, ConsumeRequest, QueueDeclare, ReplyCode};
use holdfast_codec::{AMQPClass, access, basic, channel, confirm, exchange, method_ids, queue, tx};

use super::{Session, Settle, Transaction};

impl Session {
    #[allow(clippy::too_many_lines)]
    pub(super) fn channel_method(&mut self, channel_id: u16, method: AMQPClass) -> AmqpResult<()> {
        let key = self.key(channel_id);
        let connection = self.connection;
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "second 'channel.open' seen",
            )),
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.broker.channel_close(key);
                self.channels.remove(&channel_id);
                self.send_after_confirms(
                    channel_id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => Ok(()),
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                self.broker.channel_flow(key, flow.active);
                self.send(
                    channel_id,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: flow.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.send(
                    channel_id,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) => {
                self.broker.exchange_declare(
                    connection,
                    declare.exchange.as_str(),
                    declare.kind.as_str(),
                    declare.passive,
                    declare.durable,
                    declare.auto_delete,
                    declare.internal,
                    declare.arguments,
                )?;
                self.reply_after_definitions(
                    declare.nowait,
                    channel_id,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)) => {
                self.broker.exchange_delete(
                    connection,
                    delete.exchange.as_str(),
                    delete.if_unused,
                )?;
                self.reply_after_definitions(
                    delete.nowait,
                    channel_id,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(bind)) => {
                self.broker.exchange_binding(
                    connection,
                    true,
                    bind.destination.as_str(),
                    bind.source.as_str(),
                    bind.routing_key.as_str(),
                    bind.arguments,
                )?;
                self.reply_after_definitions(
                    bind.nowait,
                    channel_id,
                    AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(unbind)) => {
                self.broker.exchange_binding(
                    connection,
                    false,
                    unbind.destination.as_str(),
                    unbind.source.as_str(),
                    unbind.routing_key.as_str(),
                    unbind.arguments,
                )?;
                self.reply_after_definitions(
                    unbind.nowait,
                    channel_id,
                    AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) => {
                let ok = self.broker.queue_declare(
                    connection,
                    QueueDeclare {
                        name: declare.queue.as_str().to_owned(),
                        passive: declare.passive,
                        durable: declare.durable,
                        exclusive: declare.exclusive,
                        auto_delete: declare.auto_delete,
                        arguments: declare.arguments,
                    },
                )?;
                self.channel(channel_id)?.last_queue = Some(ok.name.clone());
                self.reply_after_definitions(
                    declare.nowait,
                    channel_id,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: ok.name.into(),
                        message_count: ok.message_count,
                        consumer_count: ok.consumer_count,
                    })),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(bind)) => {
                self.broker.queue_binding(
                    connection,
                    true,
                    &self.queue_name(channel_id, bind.queue.as_str())?,
                    bind.exchange.as_str(),
                    bind.routing_key.as_str(),
                    bind.arguments,
                )?;
                self.reply_after_definitions(
                    bind.nowait,
                    channel_id,
                    AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => {
                self.broker.queue_binding(
                    connection,
                    false,
                    &self.queue_name(channel_id, unbind.queue.as_str())?,
                    unbind.exchange.as_str(),
                    unbind.routing_key.as_str(),
                    unbind.arguments,
                )?;
                self.reply_after_definitions(
                    false,
                    channel_id,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(purge)) => {
                let message_count = self.broker.queue_purge(
                    connection,
                    &self.queue_name(channel_id, purge.queue.as_str())?,
                )?;
                self.reply_unless_nowait(
                    purge.nowait,
                    channel_id,
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count })),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => {
                let message_count = self.broker.queue_delete(
                    connection,
                    &self.queue_name(channel_id, delete.queue.as_str())?,
                    delete.if_unused,
                    delete.if_empty,
                )?;
                self.reply_after_definitions(
                    delete.nowait,
                    channel_id,
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count,
                    })),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                self.broker.basic_qos(key, qos.prefetch_count, qos.global);
                self.send(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => {
                let (tag, queue_id) = self.broker.basic_consume(
                    key,
                    ConsumeRequest {
                        queue: self.queue_name(channel_id, consume.queue.as_str())?,
                        consumer_tag: consume.consumer_tag.as_str().to_owned(),
                        no_ack: consume.no_ack,
                        exclusive: consume.exclusive,
                    },
                )?;
                self.reply_unless_nowait(
                    consume.nowait,
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.as_ref().into(),
                    })),
                );
                // Deliveries only after consume-ok, which is queued ahead of them.
                self.broker.dispatch(queue_id);
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                self.broker.basic_cancel(key, cancel.consumer_tag.as_str());
                self.reply_unless_nowait(
                    cancel.nowait,
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: cancel.consumer_tag,
                    })),
                );
                Ok(())
            }
            // A reply to our server-initiated cancel.
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => Ok(()),
            AMQPClass::Basic(basic::AMQPMethod::Get(get)) => self.basic_get(channel_id, get),
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => self.settle(
                channel_id,
                Settle {
                    delivery_tag: ack.delivery_tag,
                    multiple: ack.multiple,
                    requeue: false,
                    is_ack: true,
                },
            ),
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => self.settle(
                channel_id,
                Settle {
                    delivery_tag: nack.delivery_tag,
                    multiple: nack.multiple,
                    requeue: nack.requeue,
                    is_ack: false,
                },
            ),
            AMQPClass::Basic(basic::AMQPMethod::Reject(reject)) => self.settle(
                channel_id,
                Settle {
                    delivery_tag: reject.delivery_tag,
                    multiple: false,
                    requeue: reject.requeue,
                    is_ack: false,
                },
            ),
            AMQPClass::Basic(basic::AMQPMethod::Recover(recover)) => {
                if !recover.requeue {
                    return Err(AmqpException::channel(
                        ReplyCode::NotImplemented,
                        "requeue=false",
                    ));
                }
                self.broker.basic_recover(key);
                self.send(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(recover)) => {
                if !recover.requeue {
                    return Err(AmqpException::channel(
                        ReplyCode::NotImplemented,
                        "requeue=false",
                    ));
                }
                self.broker.basic_recover(key);
                Ok(())
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let session = self.channel(channel_id)?;
                if session.tx.is_some() {
                    return Err(AmqpException::channel(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if session.confirm_seq.is_none() {
                    session.confirm_seq = Some(1);
                }
                self.reply_unless_nowait(
                    select.nowait,
                    channel_id,
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                );
                Ok(())
            }
            AMQPClass::Tx(tx::AMQPMethod::Select(_)) => {
                let session = self.channel(channel_id)?;
                if session.confirm_seq.is_some() {
                    return Err(AmqpException::channel(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if session.tx.is_none() {
                    session.tx = Some(Transaction::default());
                }
                self.send(
                    channel_id,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
                Ok(())
            }
            AMQPClass::Tx(tx::AMQPMethod::Commit(_)) => self.tx_commit(channel_id),
            AMQPClass::Tx(tx::AMQPMethod::Rollback(_)) => {
                let session = self.channel(channel_id)?;
                let Some(transaction) = session.tx.as_mut() else {
                    return Err(AmqpException::channel(
                        ReplyCode::PreconditionFailed,
                        "channel is not transactional",
                    ));
                };
                *transaction = Transaction::default();
                self.send(
                    channel_id,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            other => {
                let (class_id, method_id) = method_ids(&other);
                Err(AmqpException::connection(
                    ReplyCode::CommandInvalid,
                    format!(
                        "method {class_id}/{method_id} is not valid from a client on a channel"
                    ),
                ))
            }
        }
    }
}
