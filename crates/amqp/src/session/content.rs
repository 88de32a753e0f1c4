//! Content-carrying work: publishes (with confirms, returns, transactions), `basic.get`,
//! acknowledgements, and the deduplication key a publish carries.

use bytes::BytesMut;
use holdfast_broker::{AmqpException, AmqpResult, PublishRequest, ReplyCode};
use holdfast_codec::{
    AMQPClass, Content, basic, decode_properties, encode_body, encode_content_header,
    encode_method, tx,
};

use super::{Session, Settle};
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

impl Session {
    /// Resolves an empty queue name to the channel's last declared queue.
    pub(super) fn queue_name(&self, channel_id: u16, name: &str) -> AmqpResult<String> {
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

    pub(super) fn settle(&mut self, channel_id: u16, settle: Settle) -> AmqpResult<()> {
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

    pub(super) fn basic_publish(
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

    pub(super) fn send_return(&self, channel_id: u16, request: &PublishRequest) {
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

    pub(super) fn basic_get(&mut self, channel_id: u16, get: basic::Get) -> AmqpResult<()> {
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

    pub(super) fn tx_commit(&mut self, channel_id: u16) -> AmqpResult<()> {
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
}
