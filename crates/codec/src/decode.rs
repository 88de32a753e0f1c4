//! Splits a byte stream into frames and decodes method payloads.
//!
//! "Need more bytes" is `Ok(None)`; anything else wrong is a [`DecodeError`]. The size
//! field is checked against `frame_max` before any payload is buffered, so a peer cannot
//! make the server hold a frame larger than it agreed to.

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic::parse_properties, parse_class};
use bytes::{Buf, Bytes, BytesMut};

use crate::{DecodeError, FRAME_END, FRAME_OVERHEAD, Frame, frame_type};

/// Frame header: type (1), channel (2), size (4).
const HEADER_LEN: usize = 7;
/// Content header fixed part: class (2), weight (2), body size (8), property flags (2).
const CONTENT_HEADER_MIN: usize = 14;

/// Cuts frames off the front of a buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frame_max: u32,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `frame_max` bytes including framing;
    /// 0 means no limit other than the 32-bit size field.
    #[must_use]
    pub fn new(frame_max: u32) -> Self {
        Self { frame_max }
    }

    /// Changes the limit, e.g. once `connection.tune-ok` is received.
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// The limit in force.
    #[must_use]
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Decodes the next frame at the front of `buffer`, removing its bytes.
    ///
    /// # Errors
    /// Any [`DecodeError`]; the connection cannot continue after one, because the
    /// stream's framing can no longer be trusted.
    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buffer[0];
        if !matches!(
            kind,
            frame_type::METHOD | frame_type::HEADER | frame_type::BODY | frame_type::HEARTBEAT
        ) {
            return Err(DecodeError::UnknownFrameType { frame_type: kind });
        }
        let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
        let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]) as usize;
        let total = size + FRAME_OVERHEAD;
        if self.frame_max != 0 && total > self.frame_max as usize {
            return Err(DecodeError::FrameTooLarge {
                size: total as u64,
                frame_max: self.frame_max,
            });
        }
        if buffer.len() < total {
            buffer.reserve(total - buffer.len());
            return Ok(None);
        }
        let end = buffer[total - 1];
        if end != FRAME_END {
            return Err(DecodeError::BadFrameEnd { found: end });
        }
        let mut frame = buffer.split_to(total).freeze();
        frame.advance(HEADER_LEN);
        let payload = frame.slice(..size);
        let decoded = match kind {
            frame_type::METHOD => Frame::Method {
                channel,
                method: Box::new(decode_method(&payload)?),
            },
            frame_type::HEADER => decode_content_header(channel, payload)?,
            frame_type::BODY => Frame::Body { channel, payload },
            _ => Frame::Heartbeat { channel },
        };
        Ok(Some(decoded))
    }
}

fn decode_content_header(channel: u16, payload: Bytes) -> Result<Frame, DecodeError> {
    if payload.len() < CONTENT_HEADER_MIN {
        return Err(DecodeError::MalformedHeader);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let mut size = [0u8; 8];
    size.copy_from_slice(&payload[4..12]);
    Ok(Frame::Header {
        channel,
        class_id,
        body_size: u64::from_be_bytes(size),
        properties: payload.slice(12..),
    })
}

/// Decodes a method frame's payload (class id, method id, arguments).
///
/// # Errors
/// [`DecodeError::UnknownMethod`] for a pair the protocol lacks,
/// [`DecodeError::MalformedMethod`] when the arguments do not parse or bytes remain.
pub fn decode_method(payload: &[u8]) -> Result<AMQPClass, DecodeError> {
    if payload.len() < 4 {
        return Err(DecodeError::MalformedMethod {
            class_id: 0,
            method_id: 0,
        });
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if !is_known_method(class_id, method_id) {
        return Err(DecodeError::UnknownMethod {
            class_id,
            method_id,
        });
    }
    let malformed = DecodeError::MalformedMethod {
        class_id,
        method_id,
    };
    if let Some(hot) = crate::hot_methods::decode(class_id, method_id, &payload[4..]) {
        return hot.ok_or(malformed);
    }
    match parse_class(payload) {
        Ok((&[], method)) => Ok(method),
        _ => Err(malformed),
    }
}

/// Decodes raw basic properties (flags + fields) as carried in a content header.
///
/// # Errors
/// [`DecodeError::MalformedHeader`] when the fields do not match the flags.
pub fn decode_properties(raw: &[u8]) -> Result<BasicProperties, DecodeError> {
    match parse_properties(raw) {
        Ok((&[], properties)) => Ok(properties),
        _ => Err(DecodeError::MalformedHeader),
    }
}

/// Every class/method pair of AMQP 0-9-1 with RabbitMQ's extensions.
fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => return false,
    };
    methods.contains(&method_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_body, encode_content_header, encode_heartbeat, encode_method};
    use amq_protocol::protocol::basic;

    fn publish() -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            mandatory: true,
            immediate: false,
        }))
    }

    #[test]
    fn method_round_trip() {
        let mut buffer = BytesMut::new();
        encode_method(&mut buffer, 3, &publish());
        let decoder = FrameDecoder::new(4096);
        let frame = decoder
            .decode(&mut buffer)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            frame,
            Frame::Method {
                channel: 3,
                method: Box::new(publish())
            }
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn partial_input_needs_more_bytes() {
        let mut whole = BytesMut::new();
        encode_method(&mut whole, 1, &publish());
        let decoder = FrameDecoder::new(4096);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decoder.decode(&mut part), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn content_frames_stay_raw() {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let raw = crate::encode_properties(&properties);
        let mut buffer = BytesMut::new();
        encode_content_header(&mut buffer, 1, 5, &raw);
        encode_body(&mut buffer, 1, b"hello", 4096);
        encode_heartbeat(&mut buffer);
        let decoder = FrameDecoder::new(4096);
        let Some(Frame::Header {
            body_size,
            properties: got,
            ..
        }) = decoder.decode(&mut buffer).expect("valid")
        else {
            panic!("expected header");
        };
        assert_eq!(body_size, 5);
        assert_eq!(decode_properties(&got).expect("props"), properties);
        assert_eq!(
            decoder.decode(&mut buffer).expect("valid"),
            Some(Frame::Body {
                channel: 1,
                payload: Bytes::from_static(b"hello")
            })
        );
        assert_eq!(
            decoder.decode(&mut buffer).expect("valid"),
            Some(Frame::Heartbeat { channel: 0 })
        );
    }

    #[test]
    fn oversized_frame_rejected_before_buffering() {
        let mut buffer = BytesMut::from(&[1u8, 0, 1, 0, 1, 0, 0][..]);
        let decoder = FrameDecoder::new(4096);
        assert!(matches!(
            decoder.decode(&mut buffer),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn bad_frame_end_and_unknown_type() {
        let mut buffer = BytesMut::new();
        encode_heartbeat(&mut buffer);
        let last = buffer.len() - 1;
        buffer[last] = 0;
        let decoder = FrameDecoder::new(4096);
        assert_eq!(
            decoder.decode(&mut buffer),
            Err(DecodeError::BadFrameEnd { found: 0 })
        );
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            decoder.decode(&mut garbage),
            Err(DecodeError::UnknownFrameType { .. })
        ));
    }

    #[test]
    fn unknown_and_malformed_methods() {
        assert_eq!(
            decode_method(&[0, 60, 0, 99]),
            Err(DecodeError::UnknownMethod {
                class_id: 60,
                method_id: 99
            })
        );
        // basic.qos needs 7 bytes of arguments
        assert_eq!(
            decode_method(&[0, 60, 0, 10, 0]),
            Err(DecodeError::MalformedMethod {
                class_id: 60,
                method_id: 10
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut buffer = BytesMut::from(&bytes[..]);
            let decoder = FrameDecoder::new(4096);
            while let Ok(Some(_)) = decoder.decode(&mut buffer) {}
        }
    }
}
