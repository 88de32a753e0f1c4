//! Why bytes could not be decoded. Each variant maps to one AMQP reply code, chosen by
//! the connection layer; the codec itself knows nothing of connections.

/// A decoding failure. All of them are connection errors in AMQP terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame's size field exceeds the negotiated `frame_max`.
    #[error("frame of {size} bytes exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// Declared payload size plus framing.
        size: u64,
        /// The negotiated limit.
        frame_max: u32,
    },
    /// The byte after the payload was not 0xCE.
    #[error("frame end octet was {found:#04x}, expected 0xce")]
    BadFrameEnd {
        /// The byte found instead.
        found: u8,
    },
    /// The frame type octet is not one AMQP 0-9-1 defines.
    #[error("unknown frame type {frame_type}")]
    UnknownFrameType {
        /// The octet found.
        frame_type: u8,
    },
    /// A method frame named a class/method pair this protocol does not have.
    #[error("unknown method {class_id}/{method_id}")]
    UnknownMethod {
        /// Class id read from the frame.
        class_id: u16,
        /// Method id read from the frame.
        method_id: u16,
    },
    /// A method's arguments could not be parsed, or bytes were left over.
    #[error("malformed arguments for method {class_id}/{method_id}")]
    MalformedMethod {
        /// Class id read from the frame.
        class_id: u16,
        /// Method id read from the frame.
        method_id: u16,
    },
    /// A content header frame is shorter than its fixed part or has bad properties.
    #[error("malformed content header")]
    MalformedHeader,
}
