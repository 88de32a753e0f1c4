//! The read half's logic: per-channel state (content assembly, confirm and tx modes) and
//! the translation of each AMQP method into a broker call and a reply. Sans-IO: frames
//! in, [`WriterItem`]s out, so it can be driven without a socket.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use holdfast_broker::{
    AmqpException, AmqpResult, Broker, ChannelKey, ConnectionId, ConsumeRequest, Disposition,
    PublishRequest, QueueDeclare, ReplyCode, Scope,
};
use holdfast_codec::AssemblyError;
use holdfast_codec::{
    AMQPClass, Command, CommandAssembler, Content, Frame, access, basic, channel, confirm,
    connection, decode_properties, encode_body, encode_content_header, encode_method, exchange,
    method_ids, queue, tx,
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::debug;

use crate::writer::{WriterItem, delivery_properties};

/// The key a deduplicating queue recognises a message by: the `x-deduplication-header`
/// header, else the `message-id` property.
fn dedup_key(properties: &holdfast_codec::basic::AMQPProperties) -> Option<bytes::Bytes> {
    let header = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-deduplication-header"));
    match header {
        Some(holdfast_codec::AMQPValue::LongString(s)) => {
            Some(bytes::Bytes::copy_from_slice(s.as_bytes()))
        }
        Some(holdfast_codec::AMQPValue::ShortString(s)) => {
            Some(bytes::Bytes::copy_from_slice(s.as_str().as_bytes()))
        }
        Some(other) => Some(bytes::Bytes::from(format!("{other:?}"))),
        None => properties
            .message_id()
            .as_ref()
            .map(|id| bytes::Bytes::copy_from_slice(id.as_str().as_bytes())),
    }
}

/// What the connection loop should do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// The peer closed the connection cleanly; close-ok has been queued.
    Closed,
    /// Our `connection.close` was acknowledged.
    CloseAcknowledged,
}

struct Settle {
    delivery_tag: u64,
    multiple: bool,
    requeue: bool,
    is_ack: bool,
}

impl Settle {
    fn disposition(&self) -> Disposition {
        if self.is_ack {
            Disposition::Ack
        } else if self.requeue {
            Disposition::Retry
        } else {
            Disposition::Reject
        }
    }
}

#[derive(Default)]
struct Transaction {
    publishes: Vec<(PublishRequest, bool)>,
    settles: Vec<Settle>,
}

struct ChannelSession {
    assembler: CommandAssembler,
    /// Next publish sequence number, once `confirm.select` was received.
    confirm_seq: Option<u64>,
    tx: Option<Transaction>,
    /// We sent `channel.close` and wait for `close-ok`; everything else is dropped.
    closing: bool,
    /// The queue this channel declared last: AMQP lets an empty queue name in later
    /// methods stand for it.
    last_queue: Option<String>,
}

/// One connection's protocol state after the handshake.
pub struct Session {
    broker: Arc<Broker>,
    connection: ConnectionId,
    writer: UnboundedSender<WriterItem>,
    channels: HashMap<u16, ChannelSession>,
    channel_max: u16,
    frame_max: u32,
    max_message_size: u64,
    /// We sent `connection.close`: only close/close-ok are still processed.
    pub closing: bool,
    /// Highest log offset a confirm of this connection waits for. Close-oks wait for it
    /// too, so no confirm ever follows the close-ok of its channel.
    confirm_horizon: u64,
}

impl Session {
    /// A session for a connection the broker has registered.
    #[must_use]
    pub fn new(
        broker: Arc<Broker>,
        connection: ConnectionId,
        writer: UnboundedSender<WriterItem>,
        channel_max: u16,
        frame_max: u32,
        max_message_size: u64,
    ) -> Self {
        Self {
            broker,
            connection,
            writer,
            channels: HashMap::new(),
            channel_max,
            frame_max,
            max_message_size,
            closing: false,
            confirm_horizon: 0,
        }
    }

    fn send(&self, channel: u16, reply: AMQPClass) {
        let mut frames = BytesMut::with_capacity(64);
        encode_method(&mut frames, channel, &reply);
        let _ = self.writer.send(WriterItem::Frames(frames));
    }

    /// Sends a reply that must not overtake the confirms already queued.
    fn send_after_confirms(&self, channel: u16, reply: AMQPClass) {
        let mut frames = BytesMut::with_capacity(32);
        encode_method(&mut frames, channel, &reply);
        let _ = self.writer.send(WriterItem::AfterDurable {
            durable_end: self.confirm_horizon,
            frames,
        });
    }

    fn key(&self, channel: u16) -> ChannelKey {
        ChannelKey {
            connection: self.connection,
            channel,
        }
    }

    /// Queues `connection.close` for an exception and enters the closing state.
    pub fn close_connection(&mut self, exception: &AmqpException) {
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: exception.code.code(),
                reply_text: exception.reply_text().into(),
                class_id: exception.class_id,
                method_id: exception.method_id,
            })),
        );
        self.closing = true;
    }

    /// Handles one frame. A returned error is a connection exception the caller must
    /// send (see [`Session::close_connection`]); channel exceptions are handled here.
    ///
    /// # Errors
    /// Connection-level [`AmqpException`]s.
    pub fn handle_frame(&mut self, frame: Frame) -> AmqpResult<Flow> {
        let channel_id = frame.channel();
        if self.closing {
            if let Frame::Method { method, .. } = &frame {
                match **method {
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                        return Ok(Flow::CloseAcknowledged);
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                        self.send(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        return Ok(Flow::CloseAcknowledged);
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        if let Frame::Heartbeat { channel } = frame {
            if channel != 0 {
                return Err(AmqpException::connection(
                    ReplyCode::FrameError,
                    "heartbeat frame on non-zero channel",
                ));
            }
            return Ok(Flow::Continue);
        }
        if channel_id == 0 {
            return match frame {
                Frame::Method { method, .. } => self.connection_method(*method),
                _ => Err(AmqpException::connection(
                    ReplyCode::UnexpectedFrame,
                    "content frame on channel 0",
                )),
            };
        }
        if channel_id > self.channel_max {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                format!(
                    "channel {channel_id} exceeds channel_max {}",
                    self.channel_max
                ),
            ));
        }
        let Some(session) = self.channels.get_mut(&channel_id) else {
            return match frame {
                Frame::Method { method, .. }
                    if matches!(*method, AMQPClass::Channel(channel::AMQPMethod::Open(_))) =>
                {
                    self.channels.insert(
                        channel_id,
                        ChannelSession {
                            assembler: CommandAssembler::new(self.max_message_size),
                            confirm_seq: None,
                            tx: None,
                            closing: false,
                            last_queue: None,
                        },
                    );
                    self.broker.channel_open(self.key(channel_id));
                    self.send(
                        channel_id,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    );
                    Ok(Flow::Continue)
                }
                Frame::Method { method, .. } => {
                    let (class_id, method_id) = method_ids(&method);
                    Err(AmqpException::connection(
                        ReplyCode::ChannelError,
                        "expected 'channel.open'",
                    )
                    .with_method(class_id, method_id))
                }
                _ => Err(AmqpException::connection(
                    ReplyCode::ChannelError,
                    "expected 'channel.open'",
                )),
            };
        };
        if session.closing {
            if let Frame::Method { method, .. } = &frame {
                match **method {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&channel_id);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.channels.remove(&channel_id);
                        self.send_after_confirms(
                            channel_id,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        let command = match session.assembler.push(frame) {
            Ok(Some(command)) => command,
            Ok(None) => return Ok(Flow::Continue),
            Err(AssemblyError::MessageTooLarge { size, max }) => {
                self.channel_exception(
                    channel_id,
                    AmqpException::channel(
                        ReplyCode::PreconditionFailed,
                        format!("message size {size} is larger than configured max size {max}"),
                    )
                    .with_method(60, 40),
                );
                return Ok(Flow::Continue);
            }
            Err(err) => {
                return Err(AmqpException::connection(
                    ReplyCode::UnexpectedFrame,
                    err.to_string(),
                ));
            }
        };
        let (class_id, method_id, result) = match command {
            Command::Method(method) => {
                let (class_id, method_id) = method_ids(&method);
                (
                    class_id,
                    method_id,
                    self.channel_method(channel_id, *method),
                )
            }
            Command::Content { method, content } => {
                let result = match *method {
                    AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => {
                        self.basic_publish(channel_id, publish, content)
                    }
                    _ => Ok(()),
                };
                (60, 40, result)
            }
        };
        match result {
            Ok(()) => Ok(Flow::Continue),
            Err(exception) => {
                let exception = if exception.class_id == 0 {
                    exception.with_method(class_id, method_id)
                } else {
                    exception
                };
                if exception.scope == Scope::Connection || exception.code.is_hard() {
                    Err(AmqpException {
                        scope: Scope::Connection,
                        ..exception
                    })
                } else {
                    self.channel_exception(channel_id, exception);
                    Ok(Flow::Continue)
                }
            }
        }
    }

    fn channel_exception(&mut self, channel_id: u16, exception: AmqpException) {
        debug!(channel = channel_id, code = exception.code.code(), text = %exception.text, "channel exception");
        self.broker.channel_close(self.key(channel_id));
        if let Some(session) = self.channels.get_mut(&channel_id) {
            session.closing = true;
        }
        self.send_after_confirms(
            channel_id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: exception.code.code(),
                reply_text: exception.reply_text().into(),
                class_id: exception.class_id,
                method_id: exception.method_id,
            })),
        );
    }

    fn connection_method(&mut self, method: AMQPClass) -> AmqpResult<Flow> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                self.send_after_confirms(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Ok(Flow::Closed)
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(Flow::Continue)
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                Ok(Flow::CloseAcknowledged)
            }
            // Clients may echo these; they carry no request.
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ) => Ok(Flow::Continue),
            other => {
                let (class_id, method_id) = method_ids(&other);
                Err(AmqpException::connection(
                    ReplyCode::CommandInvalid,
                    "method not valid on channel 0 after the handshake",
                )
                .with_method(class_id, method_id))
            }
        }
    }

    #[allow(clippy::too_many_lines)]
    fn channel_method(&mut self, channel_id: u16, method: AMQPClass) -> AmqpResult<()> {
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
                if !declare.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)) => {
                self.broker.exchange_delete(
                    connection,
                    delete.exchange.as_str(),
                    delete.if_unused,
                )?;
                if !delete.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
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
                if !bind.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
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
                if !unbind.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
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
                if !declare.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: ok.name.into(),
                            message_count: ok.message_count,
                            consumer_count: ok.consumer_count,
                        })),
                    );
                }
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
                if !bind.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
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
                self.send(
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
                if !purge.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => {
                let message_count = self.broker.queue_delete(
                    connection,
                    &self.queue_name(channel_id, delete.queue.as_str())?,
                    delete.if_unused,
                    delete.if_empty,
                )?;
                if !delete.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count,
                        })),
                    );
                }
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
                if !consume.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: tag.as_ref().into(),
                        })),
                    );
                }
                // Deliveries only after consume-ok, which is queued ahead of them.
                self.broker.dispatch(queue_id);
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                self.broker.basic_cancel(key, cancel.consumer_tag.as_str());
                if !cancel.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag,
                        })),
                    );
                }
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
                if !select.nowait {
                    self.send(
                        channel_id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
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

    fn channel(&mut self, channel_id: u16) -> AmqpResult<&mut ChannelSession> {
        self.channels
            .get_mut(&channel_id)
            .ok_or_else(|| AmqpException::connection(ReplyCode::ChannelError, "channel not open"))
    }

    /// Resolves an empty queue name to the channel's last declared queue.
    fn queue_name(&self, channel_id: u16, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.channels
            .get(&channel_id)
            .and_then(|session| session.last_queue.clone())
            .ok_or_else(|| {
                AmqpException::channel(ReplyCode::NotFound, "no previously declared queue")
            })
    }

    fn settle(&mut self, channel_id: u16, settle: Settle) -> AmqpResult<()> {
        let session = self.channel(channel_id)?;
        if let Some(transaction) = session.tx.as_mut() {
            transaction.settles.push(settle);
            return Ok(());
        }
        self.broker.basic_settle(
            self.key(channel_id),
            settle.delivery_tag,
            settle.multiple,
            settle.disposition(),
        )
    }

    fn basic_publish(
        &mut self,
        channel_id: u16,
        publish: basic::Publish,
        content: Content,
    ) -> AmqpResult<()> {
        if publish.immediate {
            // RabbitMQ dropped `immediate` in 3.0 and refuses it the same way.
            return Err(AmqpException::connection(
                ReplyCode::NotImplemented,
                "immediate=true",
            ));
        }
        let properties = decode_properties(&content.properties).map_err(|_| {
            AmqpException::connection(
                ReplyCode::SyntaxError,
                "malformed content header properties",
            )
        })?;
        let expiration = match properties.expiration() {
            None => None,
            Some(text) => Some(text.as_str().parse::<u64>().map_err(|_| {
                AmqpException::channel(
                    ReplyCode::PreconditionFailed,
                    format!("invalid expiration '{}': no_integer", text.as_str()),
                )
            })?),
        };
        let dedup_key = dedup_key(&properties);
        let request = PublishRequest {
            exchange: publish.exchange.as_str().to_owned(),
            routing_key: publish.routing_key.as_str().to_owned(),
            persistent: properties.delivery_mode() == &Some(2),
            headers: properties.headers().clone(),
            properties: content.properties,
            body: content.body,
            expiration,
            dedup_key,
        };
        let session = self.channel(channel_id)?;
        if let Some(transaction) = session.tx.as_mut() {
            transaction.publishes.push((request, publish.mandatory));
            return Ok(());
        }
        let seq = session.confirm_seq.inspect(|&seq| {
            session.confirm_seq = Some(seq + 1);
        });
        let outcome = self.broker.basic_publish(self.connection, &request)?;
        if !outcome.routed && publish.mandatory {
            self.send_return(channel_id, &request);
        }
        if let Some(seq) = seq {
            if let Some(end) = outcome.durable_end {
                self.confirm_horizon = self.confirm_horizon.max(end);
            }
            let _ = self.writer.send(WriterItem::Confirm {
                channel: channel_id,
                seq,
                durable_end: outcome.durable_end,
                ack: !outcome.rejected,
            });
        }
        Ok(())
    }

    fn send_return(&self, channel_id: u16, request: &PublishRequest) {
        let mut frames = BytesMut::with_capacity(128 + request.body.len());
        encode_method(
            &mut frames,
            channel_id,
            &AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: ReplyCode::NoRoute.code(),
                reply_text: "NO_ROUTE".into(),
                exchange: request.exchange.as_str().into(),
                routing_key: request.routing_key.as_str().into(),
            })),
        );
        encode_content_header(
            &mut frames,
            channel_id,
            request.body.len() as u64,
            &request.properties,
        );
        encode_body(&mut frames, channel_id, &request.body, self.frame_max);
        let _ = self.writer.send(WriterItem::Frames(frames));
    }

    fn basic_get(&mut self, channel_id: u16, get: basic::Get) -> AmqpResult<()> {
        let key = self.key(channel_id);
        let Some(ok) = self.broker.basic_get(
            key,
            &self.queue_name(channel_id, get.queue.as_str())?,
            get.no_ack,
        )?
        else {
            self.send(
                channel_id,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let read = self.broker.read_message(ok.message);
        if ok.release_after_read {
            self.broker.release(ok.message);
        }
        let stored = read.map_err(|err| {
            AmqpException::connection(
                ReplyCode::InternalError,
                format!("message store read failed: {err}"),
            )
        })?;
        let mut frames = BytesMut::with_capacity(128 + stored.body.len());
        encode_method(
            &mut frames,
            channel_id,
            &AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: ok.delivery_tag,
                redelivered: ok.redelivered,
                exchange: String::from_utf8_lossy(&stored.exchange).as_ref().into(),
                routing_key: String::from_utf8_lossy(&stored.routing_key).as_ref().into(),
                message_count: ok.message_count,
            })),
        );
        let properties = delivery_properties(&stored.properties, ok.delivery_count);
        encode_content_header(
            &mut frames,
            channel_id,
            stored.body.len() as u64,
            &properties,
        );
        encode_body(&mut frames, channel_id, &stored.body, self.frame_max);
        let _ = self.writer.send(WriterItem::Frames(frames));
        Ok(())
    }

    fn tx_commit(&mut self, channel_id: u16) -> AmqpResult<()> {
        let session = self.channel(channel_id)?;
        let Some(transaction) = session.tx.as_mut() else {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                "channel is not transactional",
            ));
        };
        let transaction = std::mem::take(transaction);
        let mut durable_end = 0;
        let mut rejected = false;
        for (request, mandatory) in &transaction.publishes {
            let outcome = self.broker.basic_publish(self.connection, request)?;
            if !outcome.routed && *mandatory {
                self.send_return(channel_id, request);
            }
            rejected |= outcome.rejected;
            durable_end = durable_end.max(outcome.durable_end.unwrap_or(0));
        }
        for settle in transaction.settles {
            self.broker.basic_settle(
                self.key(channel_id),
                settle.delivery_tag,
                settle.multiple,
                settle.disposition(),
            )?;
        }
        if rejected {
            // A publish was refused (a full queue with reject-publish, or no disk space):
            // commit-ok would claim it was taken. RabbitMQ fails the commit the same way.
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                "partial tx completion",
            ));
        }
        let mut frames = BytesMut::with_capacity(16);
        encode_method(
            &mut frames,
            channel_id,
            &AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        );
        let _ = self.writer.send(WriterItem::AfterDurable {
            durable_end,
            frames,
        });
        Ok(())
    }

    /// The broker closed a channel on its own (its state there is gone): tell the peer
    /// and drop the channel's frames until it answers.
    pub fn server_closed_channel(&mut self, channel_id: u16, code: ReplyCode, text: &str) {
        let Some(session) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if session.closing {
            return;
        }
        session.closing = true;
        let exception = AmqpException::channel(code, text);
        self.send_after_confirms(
            channel_id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: exception.code.code(),
                reply_text: exception.reply_text().into(),
                class_id: 0,
                method_id: 0,
            })),
        );
    }

    /// Releases everything the connection holds in the broker.
    pub fn teardown(&mut self) {
        self.channels.clear();
        self.broker.disconnect(self.connection);
    }
}
