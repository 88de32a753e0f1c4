//! Joins a method frame, its content header and its body frames into one command.
//!
//! Per channel, frames must arrive as `method [header body*]`; interleaving on one
//! channel is a connection error (UNEXPECTED_FRAME). A body that stays a single frame is
//! passed on as the very `Bytes` the decoder produced; only multi-frame bodies are joined.

use amq_protocol::protocol::{AMQPClass, basic};
use bytes::{Bytes, BytesMut};

use crate::{BASIC_CLASS_ID, Frame};

/// A message's content as received: raw properties and the whole body.
#[derive(Clone, Debug, PartialEq)]
pub struct Content {
    /// Basic properties in wire form (flags + fields).
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
}

/// A complete command from the peer.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// A method without content.
    Method(Box<AMQPClass>),
    /// A content-bearing method (basic.publish) with its content.
    Content {
        /// The method.
        method: Box<AMQPClass>,
        /// Its content.
        content: Content,
    },
}

/// Why a frame did not fit the expected sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    /// A frame arrived that the sequence does not allow here (505 UNEXPECTED_FRAME).
    #[error("{0}")]
    UnexpectedFrame(&'static str),
    /// The body frames add up to more than the header declared (505 UNEXPECTED_FRAME).
    #[error("content body exceeds the {declared} bytes the header declared")]
    BodyOverrun {
        /// The size the header declared.
        declared: u64,
    },
    /// The header announces a body above the configured limit (406 PRECONDITION_FAILED).
    #[error("message size {size} is larger than the configured max size {max}")]
    MessageTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

enum State {
    Idle,
    ExpectHeader(Box<AMQPClass>),
    ExpectBody {
        method: Box<AMQPClass>,
        properties: Bytes,
        declared: u64,
        received: Vec<Bytes>,
        received_len: u64,
    },
}

/// Assembles commands for one channel.
pub struct CommandAssembler {
    state: State,
    max_message_size: u64,
}

impl CommandAssembler {
    /// An assembler that refuses bodies larger than `max_message_size`.
    #[must_use]
    pub fn new(max_message_size: u64) -> Self {
        Self {
            state: State::Idle,
            max_message_size,
        }
    }

    /// True while a content-bearing method waits for its header or body.
    #[must_use]
    pub fn in_progress(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Feeds one frame of this channel; returns a command once it is complete.
    ///
    /// # Errors
    /// [`AssemblyError`] when the frame does not fit the sequence; the assembler is then
    /// reset to idle.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Command>, AssemblyError> {
        let result = self.step(frame);
        if result.is_err() {
            self.state = State::Idle;
        }
        result
    }

    fn step(&mut self, frame: Frame) -> Result<Option<Command>, AssemblyError> {
        match (std::mem::replace(&mut self.state, State::Idle), frame) {
            (State::Idle, Frame::Method { method, .. }) => {
                if matches!(*method, AMQPClass::Basic(basic::AMQPMethod::Publish(_))) {
                    self.state = State::ExpectHeader(method);
                    Ok(None)
                } else {
                    Ok(Some(Command::Method(method)))
                }
            }
            (State::Idle, Frame::Header { .. }) => Err(AssemblyError::UnexpectedFrame(
                "expected method frame, got content header frame instead",
            )),
            (State::Idle, Frame::Body { .. }) => Err(AssemblyError::UnexpectedFrame(
                "expected method frame, got content body frame instead",
            )),
            (
                State::ExpectHeader(method),
                Frame::Header {
                    class_id,
                    body_size,
                    properties,
                    ..
                },
            ) => {
                if class_id != BASIC_CLASS_ID {
                    return Err(AssemblyError::UnexpectedFrame(
                        "content header class differs from the method's class",
                    ));
                }
                if body_size > self.max_message_size {
                    return Err(AssemblyError::MessageTooLarge {
                        size: body_size,
                        max: self.max_message_size,
                    });
                }
                if body_size == 0 {
                    return Ok(Some(Command::Content {
                        method,
                        content: Content {
                            properties,
                            body: Bytes::new(),
                        },
                    }));
                }
                self.state = State::ExpectBody {
                    method,
                    properties,
                    declared: body_size,
                    received: Vec::new(),
                    received_len: 0,
                };
                Ok(None)
            }
            (State::ExpectHeader(_), _) => Err(AssemblyError::UnexpectedFrame(
                "expected content header frame, got another frame instead",
            )),
            (
                State::ExpectBody {
                    method,
                    properties,
                    declared,
                    mut received,
                    received_len,
                },
                Frame::Body { payload, .. },
            ) => {
                let received_len = received_len + payload.len() as u64;
                if received_len > declared {
                    return Err(AssemblyError::BodyOverrun { declared });
                }
                received.push(payload);
                if received_len < declared {
                    self.state = State::ExpectBody {
                        method,
                        properties,
                        declared,
                        received,
                        received_len,
                    };
                    return Ok(None);
                }
                let body = if received.len() == 1 {
                    received.pop().unwrap_or_default()
                } else {
                    let mut joined = BytesMut::with_capacity(declared as usize);
                    for piece in &received {
                        joined.extend_from_slice(piece);
                    }
                    joined.freeze()
                };
                Ok(Some(Command::Content {
                    method,
                    content: Content { properties, body },
                }))
            }
            (State::ExpectBody { .. }, _) => Err(AssemblyError::UnexpectedFrame(
                "expected content body frame, got another frame instead",
            )),
            (state, Frame::Heartbeat { .. }) => {
                self.state = state;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_frame() -> Frame {
        Frame::Method {
            channel: 1,
            method: Box::new(AMQPClass::Basic(basic::AMQPMethod::Publish(
                basic::Publish::default(),
            ))),
        }
    }

    fn header(size: u64) -> Frame {
        Frame::Header {
            channel: 1,
            class_id: 60,
            body_size: size,
            properties: Bytes::from_static(&[0, 0]),
        }
    }

    fn body(bytes: &'static [u8]) -> Frame {
        Frame::Body {
            channel: 1,
            payload: Bytes::from_static(bytes),
        }
    }

    #[test]
    fn joins_split_body() {
        let mut assembler = CommandAssembler::new(1 << 20);
        assert_eq!(assembler.push(publish_frame()), Ok(None));
        assert_eq!(assembler.push(header(6)), Ok(None));
        assert_eq!(assembler.push(body(b"abc")), Ok(None));
        let Some(Command::Content { content, .. }) = assembler.push(body(b"def")).expect("ok")
        else {
            panic!("expected content");
        };
        assert_eq!(&content.body[..], b"abcdef");
        assert!(!assembler.in_progress());
    }

    #[test]
    fn empty_body_completes_at_header() {
        let mut assembler = CommandAssembler::new(1 << 20);
        assembler.push(publish_frame()).expect("ok");
        assert!(matches!(
            assembler.push(header(0)),
            Ok(Some(Command::Content { .. }))
        ));
    }

    #[test]
    fn rejects_out_of_order_and_overrun() {
        let mut assembler = CommandAssembler::new(1 << 20);
        assert!(assembler.push(body(b"x")).is_err());
        assembler.push(publish_frame()).expect("ok");
        assert!(assembler.push(publish_frame()).is_err());
        assembler.push(publish_frame()).expect("ok");
        assembler.push(header(2)).expect("ok");
        assert_eq!(
            assembler.push(body(b"abc")),
            Err(AssemblyError::BodyOverrun { declared: 2 })
        );
        assembler.push(publish_frame()).expect("ok");
        assert!(matches!(
            assembler.push(header(1 << 21)),
            Err(AssemblyError::MessageTooLarge { .. })
        ));
    }
}
