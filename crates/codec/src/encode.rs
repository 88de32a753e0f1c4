//! Frames out: methods through `amq-protocol`'s generator, content written directly so
//! that a stored message's raw properties and body go to the socket without re-encoding.

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic::gen_properties, gen_class};
use bytes::{BufMut, Bytes, BytesMut};

use crate::{BASIC_CLASS_ID, FRAME_END, FRAME_OVERHEAD, frame_type};

fn put_frame_header(buffer: &mut BytesMut, kind: u8, channel: u16, size: usize) {
    buffer.put_u8(kind);
    buffer.put_u16(channel);
    // Callers bound sizes by frame_max (a u32), so this cannot truncate.
    buffer.put_u32(u32::try_from(size).expect("frame payload bounded by frame_max"));
}

/// Appends a method frame.
///
/// # Panics
/// Only if `amq-protocol` fails to serialise a method it generated itself into a growable
/// buffer, which would be a bug there.
pub fn encode_method(buffer: &mut BytesMut, channel: u16, method: &AMQPClass) {
    let arguments = cookie_factory::gen_simple(gen_class(method), Vec::with_capacity(64))
        .expect("serialising into a Vec cannot fail");
    put_frame_header(buffer, frame_type::METHOD, channel, arguments.len());
    buffer.extend_from_slice(&arguments);
    buffer.put_u8(FRAME_END);
}

/// Appends a basic content header whose properties are already encoded.
pub fn encode_content_header(
    buffer: &mut BytesMut,
    channel: u16,
    body_size: u64,
    properties: &[u8],
) {
    put_frame_header(buffer, frame_type::HEADER, channel, 12 + properties.len());
    buffer.put_u16(BASIC_CLASS_ID);
    buffer.put_u16(0);
    buffer.put_u64(body_size);
    buffer.extend_from_slice(properties);
    buffer.put_u8(FRAME_END);
}

/// Appends body frames, split so that none exceeds `frame_max` (0 = unlimited).
/// An empty body produces no frame, as the specification requires.
pub fn encode_body(buffer: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = if frame_max == 0 {
        body.len().max(1)
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    };
    buffer.reserve(body.len() + body.len().div_ceil(chunk) * FRAME_OVERHEAD);
    for piece in body.chunks(chunk) {
        put_frame_header(buffer, frame_type::BODY, channel, piece.len());
        buffer.extend_from_slice(piece);
        buffer.put_u8(FRAME_END);
    }
}

/// Appends a heartbeat frame (channel 0, empty payload).
pub fn encode_heartbeat(buffer: &mut BytesMut) {
    put_frame_header(buffer, frame_type::HEARTBEAT, 0, 0);
    buffer.put_u8(FRAME_END);
}

/// Encodes basic properties to their wire form (flags + fields).
///
/// # Panics
/// Only on a bug in `amq-protocol`'s generator (see [`encode_method`]).
#[must_use]
pub fn encode_properties(properties: &BasicProperties) -> Bytes {
    let raw = cookie_factory::gen_simple(gen_properties(properties), Vec::with_capacity(32))
        .expect("serialising into a Vec cannot fail");
    Bytes::from(raw)
}
