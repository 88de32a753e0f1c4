//! The read half's logic: per-channel state (content assembly, confirm and tx modes) and
//! the translation of each AMQP method into a broker call and a reply. Sans-IO: frames
//! in, [`WriterItem`]s out, so it can be driven without a socket.

mod content;
mod methods;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use holdfast_broker::{
    AmqpException, AmqpResult, Broker, ChannelKey, ConnectionId, Disposition, PublishRequest,
    ReplyCode, Scope,
};
use holdfast_codec::AssemblyError;
use holdfast_codec::{
    AMQPClass, Command, CommandAssembler, Frame, basic, channel, connection, encode_method,
    method_ids,
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::debug;

use crate::writer::WriterItem;

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

    /// Sends the `-ok` of a method unless the client asked for `nowait`.
    fn reply_unless_nowait(&self, nowait: bool, channel: u16, reply: AMQPClass) {
        if !nowait {
            self.send(channel, reply);
        }
    }

    /// Sends the `-ok` of a method that changes definitions (unless `nowait`) once the
    /// log is durable past the last definition record: a declare-ok is a promise like a
    /// publisher confirm, also for a re-declare of something still on its way to disk.
    fn reply_after_definitions(&self, nowait: bool, channel: u16, reply: AMQPClass) {
        if nowait {
            return;
        }
        self.send_after_durable(channel, reply, self.broker.definitions_end());
    }

    /// Sends a reply that must not overtake the confirms already queued.
    fn send_after_confirms(&self, channel: u16, reply: AMQPClass) {
        self.send_after_durable(channel, reply, self.confirm_horizon);
    }

    /// Sends a reply once the log is durable up to `durable_end`.
    fn send_after_durable(&self, channel: u16, reply: AMQPClass, durable_end: u64) {
        let mut frames = BytesMut::with_capacity(64);
        encode_method(&mut frames, channel, &reply);
        let _ = self.writer.send(WriterItem::AfterDurable {
            durable_end,
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

    fn channel(&mut self, channel_id: u16) -> AmqpResult<&mut ChannelSession> {
        self.channels
            .get_mut(&channel_id)
            .ok_or_else(|| AmqpException::connection(ReplyCode::ChannelError, "channel not open"))
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
