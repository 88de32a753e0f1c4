//! The write half of a connection: one task that owns the socket's write side and turns
//! replies, broker deliveries and publisher confirms into bytes, in the order they were
//! queued. Confirms and `tx.commit-ok` wait here for the store's durability watermark,
//! so the reader never blocks on an fsync and publishes keep flowing while one is in
//! flight (that is what lets concurrent publishers share fsyncs).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use holdfast_broker::{Broker, Outbound};
use holdfast_codec::{
    AMQPClass, AMQPValue, basic, connection, decode_properties, encode_body, encode_content_header,
    encode_heartbeat, encode_method, encode_properties,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tracing::{debug, error};

/// What the rest of the connection hands the writer.
#[derive(Debug)]
pub enum WriterItem {
    /// Frames ready to go.
    Frames(BytesMut),
    /// A broker event (a delivery needs its record read first).
    Outbound(Outbound),
    /// A publisher confirm; `durable_end` is the log offset that must be durable first.
    Confirm {
        /// Channel number.
        channel: u16,
        /// The publish sequence number.
        seq: u64,
        /// Durability needed, if any.
        durable_end: Option<u64>,
        /// `basic.ack` (taken) or `basic.nack` (refused by a full queue).
        ack: bool,
    },
    /// Frames that may only leave once the log is durable up to `durable_end`.
    AfterDurable {
        /// Durability needed.
        durable_end: u64,
        /// The frames.
        frames: BytesMut,
    },
    /// Flush and close the socket.
    Shutdown,
}

/// A confirm ready to go: channel, sequence number, ack (true) or nack.
type ReadyConfirm = (u16, u64, bool);

enum Pending {
    Confirm(ReadyConfirm),
    Frames(BytesMut),
}

/// Runs the writer until the socket fails or `Shutdown` arrives.
pub async fn run_writer(
    mut socket: OwnedWriteHalf,
    mut items: UnboundedReceiver<WriterItem>,
    broker: Arc<Broker>,
    frame_max: u32,
    heartbeat: Option<Duration>,
) {
    let mut durable = broker.confirmed();
    let mut pending: VecDeque<(u64, Pending)> = VecDeque::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut confirms: Vec<ReadyConfirm> = Vec::new();
    let mut last_write = Instant::now();
    let tick = heartbeat.map_or(Duration::from_secs(3600), |h| {
        (h / 2).max(Duration::from_millis(100))
    });
    let mut heartbeat_timer = tokio::time::interval(tick);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            item = items.recv() => {
                let Some(item) = item else { break };
                let mut next = Some(item);
                // Batch whatever is already queued into one write.
                let mut budget = 256;
                while let Some(item) = next.take() {
                    let durable_now = match &*durable.borrow() {
                        Ok(offset) => *offset,
                        Err(_) => 0,
                    };
                    match item {
                        WriterItem::Frames(frames) => {
                            // Replies keep their place after the confirms before them.
                            flush_confirms(&mut out, &mut confirms);
                            out.extend_from_slice(&frames);
                        }
                        WriterItem::Outbound(event) => {
                            if let Err(text) = encode_outbound(&broker, &mut out, event, frame_max) {
                                error!(error = %text, "delivery could not be read from the store");
                                encode_method(&mut out, 0, &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                                    reply_code: 541,
                                    reply_text: "INTERNAL_ERROR - message store read failed".into(),
                                    class_id: 0,
                                    method_id: 0,
                                })));
                                shutting_down = true;
                            }
                        }
                        WriterItem::Confirm { channel, seq, durable_end, ack } => {
                            let needed = durable_end.unwrap_or(0);
                            if pending.is_empty() && needed <= durable_now {
                                confirms.push((channel, seq, ack));
                            } else {
                                pending.push_back((needed, Pending::Confirm((channel, seq, ack))));
                            }
                        }
                        WriterItem::AfterDurable { durable_end, frames } => {
                            if pending.is_empty() && durable_end <= durable_now {
                                flush_confirms(&mut out, &mut confirms);
                                out.extend_from_slice(&frames);
                            } else {
                                pending.push_back((durable_end, Pending::Frames(frames)));
                            }
                        }
                        WriterItem::Shutdown => shutting_down = true,
                    }
                    budget -= 1;
                    if budget > 0 && !shutting_down {
                        next = items.try_recv().ok();
                    }
                }
            }
            changed = durable.changed(), if !pending.is_empty() => {
                if changed.is_err() {
                    break;
                }
                let offset = match &*durable.borrow() {
                    Ok(offset) => *offset,
                    Err(poisoned) => {
                        error!(cause = %poisoned, "store poisoned; confirms withheld");
                        break;
                    }
                };
                while pending.front().is_some_and(|(needed, _)| *needed <= offset) {
                    match pending.pop_front() {
                        Some((_, Pending::Confirm(confirm))) => confirms.push(confirm),
                        Some((_, Pending::Frames(frames))) => {
                            flush_confirms(&mut out, &mut confirms);
                            out.extend_from_slice(&frames);
                        }
                        None => break,
                    }
                }
            }
            _ = heartbeat_timer.tick(), if heartbeat.is_some() => {
                if heartbeat.is_some_and(|h| last_write.elapsed() >= h / 2) {
                    encode_heartbeat(&mut out);
                }
            }
        }
        flush_confirms(&mut out, &mut confirms);
        if !out.is_empty() {
            if let Err(err) = socket.write_all(&out).await {
                debug!(cause = %err, "socket write failed");
                break;
            }
            out.clear();
            last_write = Instant::now();
        }
        if shutting_down {
            break;
        }
    }
    release_undelivered(&broker, &mut items);
    let _ = socket.shutdown().await;
}

/// Each queued delivery holds a reference on its record that reading it would have
/// released. Once the writer stops (socket failed, shutdown) nothing will read them, so
/// they are released here, or their segments would stay on disk until a restart. The
/// receiver is closed first: later deliveries fail to send and the broker releases them.
fn release_undelivered(broker: &Broker, items: &mut UnboundedReceiver<WriterItem>) {
    items.close();
    while let Ok(item) = items.try_recv() {
        if let WriterItem::Outbound(Outbound::Deliver { message, .. }) = item {
            broker.release(message);
        }
    }
}

/// Writes queued confirms, one `basic.ack`/`basic.nack` with `multiple` per run of one
/// channel and one kind: confirms leave in publish order, so confirming up to the
/// highest sequence number confirms exactly the run.
fn flush_confirms(out: &mut BytesMut, confirms: &mut Vec<ReadyConfirm>) {
    let mut index = 0;
    while index < confirms.len() {
        let (channel, _, ack) = confirms[index];
        let mut last = index;
        while last + 1 < confirms.len()
            && confirms[last + 1].0 == channel
            && confirms[last + 1].2 == ack
        {
            last += 1;
        }
        let delivery_tag = confirms[last].1;
        let multiple = last > index;
        let method = if ack {
            basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple,
            })
        } else {
            basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag,
                multiple,
                requeue: false,
            })
        };
        encode_method(out, channel, &AMQPClass::Basic(method));
        index = last + 1;
    }
    confirms.clear();
}

/// The properties to deliver with: unchanged for a first delivery; with an
/// `x-delivery-count` header (as RabbitMQ's quorum queues send) once it was returned.
pub fn delivery_properties(raw: &Bytes, delivery_count: u32) -> Bytes {
    if delivery_count == 0 {
        return raw.clone();
    }
    let Ok(properties) = decode_properties(raw) else {
        return raw.clone();
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(i64::from(delivery_count)),
    );
    encode_properties(&properties.with_headers(headers))
}

fn encode_outbound(
    broker: &Broker,
    out: &mut BytesMut,
    event: Outbound,
    frame_max: u32,
) -> Result<(), String> {
    match event {
        Outbound::Deliver {
            channel,
            consumer_tag,
            delivery_tag,
            redelivered,
            delivery_count,
            message,
        } => {
            let read = broker.read_message(message);
            broker.release(message);
            let stored = read.map_err(|err| err.to_string())?;
            encode_method(
                out,
                channel,
                &AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: consumer_tag.as_ref().into(),
                    delivery_tag,
                    redelivered,
                    exchange: String::from_utf8_lossy(&stored.exchange).as_ref().into(),
                    routing_key: String::from_utf8_lossy(&stored.routing_key).as_ref().into(),
                })),
            );
            let properties = delivery_properties(&stored.properties, delivery_count);
            encode_content_header(out, channel, stored.body.len() as u64, &properties);
            encode_body(out, channel, &stored.body, frame_max);
        }
        // Routed to the reader when the connection is set up; never queued here.
        Outbound::CloseChannel { .. } => {}
        Outbound::Cancel {
            channel,
            consumer_tag,
        } => encode_method(
            out,
            channel,
            &AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: consumer_tag.as_ref().into(),
                nowait: false,
            })),
        ),
    }
    Ok(())
}
