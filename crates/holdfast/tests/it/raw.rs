//! A minimal AMQP 0-9-1 client over a raw tokio `TcpStream`, built from holdfast-codec's
//! encoders and `FrameDecoder`, for sending input that no real client would produce.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use holdfast_codec::{
    AMQPClass, AMQPValue, FieldTable, Frame, FrameDecoder, LongString, PROTOCOL_HEADER, channel,
    connection, encode_method,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long any single expected reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The frame_max this client asks for in tune-ok.
pub const CLIENT_FRAME_MAX: u32 = 131_072;
/// The channel_max this client asks for in tune-ok.
pub const CLIENT_CHANNEL_MAX: u16 = 16;

pub struct RawClient {
    stream: TcpStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
}

/// A `connection.close` or `channel.close` as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReply {
    pub reply_code: u16,
    pub reply_text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl RawClient {
    /// Opens the TCP connection only; nothing is sent.
    pub async fn tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buffer: BytesMut::with_capacity(8192),
            // The client trusts the server's frame sizes; 0 = no limit.
            decoder: FrameDecoder::new(0),
        }
    }

    /// Opens the TCP connection with a receive buffer of about `bytes` (set before the
    /// connect, so the window stays small): a client that reads slowly or not at all.
    pub async fn tcp_with_small_window(addr: SocketAddr, bytes: u32) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buffer: BytesMut::with_capacity(8192),
            decoder: FrameDecoder::new(0),
        }
    }

    /// Ends the connection with a TCP reset (SO_LINGER 0), as a crashed peer or a
    /// middlebox would, leaving whatever the server still had to send unsent.
    pub fn reset(self) {
        self.stream.set_zero_linger().expect("SO_LINGER 0");
        drop(self.stream);
    }

    /// Protocol header, start-ok (PLAIN guest/guest), tune-ok (heartbeat 0), open "/".
    pub async fn open(addr: SocketAddr) -> RawClient {
        RawClient::tcp(addr).await.handshake().await
    }

    /// [`RawClient::open`] on a connection already made.
    pub async fn handshake(self) -> RawClient {
        let mut client = self;
        client.send_header().await;
        client.login("guest", "guest").await;
        client.tune().await;
        client.send_method(0, open("/")).await;
        match client.expect_method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        client
    }

    pub async fn send_header(&mut self) {
        self.send_bytes(PROTOCOL_HEADER).await;
    }

    /// Waits for connection.start and answers with PLAIN credentials.
    pub async fn login(&mut self, user: &str, password: &str) {
        match self.expect_method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => {
                assert_eq!((start.version_major, start.version_minor), (0, 9));
                assert!(
                    start.mechanisms.to_string().contains("PLAIN"),
                    "{:?}",
                    start.mechanisms
                );
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        let response = format!("\0{user}\0{password}");
        // Like lapin and the Java client: ask for connection.close on a failed login
        // (RabbitMQ closes silently for clients without this capability).
        let mut capabilities = FieldTable::default();
        capabilities.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        let mut client_properties = FieldTable::default();
        client_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: LongString::from(response.into_bytes()),
                locale: "en_US".into(),
            })),
        )
        .await;
    }

    /// Waits for connection.tune and answers with tune-ok, heartbeats off.
    pub async fn tune(&mut self) {
        self.tune_with(CLIENT_FRAME_MAX).await;
    }

    /// As [`RawClient::tune`], asking for `frame_max`.
    pub async fn tune_with(&mut self, frame_max: u32) {
        match self.expect_method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => {
                assert!(tune.frame_max >= CLIENT_FRAME_MAX, "{tune:?}");
                assert!(tune.channel_max >= CLIENT_CHANNEL_MAX, "{tune:?}");
            }
            other => panic!("expected connection.tune, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: CLIENT_CHANNEL_MAX,
                frame_max,
                heartbeat: 0,
            })),
        )
        .await;
    }

    /// Writes bytes; a write error (the server already closed) is ignored, since the
    /// caller is about to check what the server said.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    pub async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        let mut out = BytesMut::new();
        encode_method(&mut out, channel, &method);
        self.send_bytes(&out).await;
    }

    /// The next frame, or `None` once the server closed the socket.
    ///
    /// # Panics
    /// When nothing arrives within [`REPLY_TIMEOUT`] or the server sends bytes that do
    /// not decode.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self
                .decoder
                .decode(&mut self.buffer)
                .expect("the server sends well-formed frames")
            {
                return Some(frame);
            }
            let read = timeout(REPLY_TIMEOUT, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("the server replies in time");
            match read {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buffer.is_empty(),
                        "server closed mid-frame: {:?}",
                        self.buffer
                    );
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next method frame, skipping heartbeats.
    ///
    /// # Panics
    /// When the socket closes first or a content frame arrives.
    pub async fn expect_method(&mut self) -> (u16, AMQPClass) {
        loop {
            match self.next_frame().await {
                Some(Frame::Heartbeat { .. }) => {}
                Some(Frame::Method { channel, method }) => return (channel, *method),
                Some(other) => panic!("expected a method frame, got {other:?}"),
                None => panic!("the server closed the connection instead of replying"),
            }
        }
    }

    /// Reads raw bytes until the server closes; returns everything it sent.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut all = self.buffer.split().to_vec();
        let mut chunk = [0u8; 1024];
        loop {
            match timeout(REPLY_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("the server closes the socket in time")
            {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Writes bytes, reporting a failure (a reset connection) instead of panicking.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads until the server's end of the stream: everything it sent after what was
    /// decoded so far, or the error (a reset) that cut it short.
    pub async fn read_to_eof(&mut self) -> std::io::Result<Vec<u8>> {
        let mut all = self.buffer.split().to_vec();
        let mut chunk = [0u8; 4096];
        loop {
            match timeout(REPLY_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("the server ends the stream in time")?
            {
                0 => return Ok(all),
                n => all.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Asserts the server closes the socket without sending anything more.
    pub async fn assert_closed(&mut self) {
        let rest = self.read_to_close().await;
        assert!(rest.is_empty(), "unexpected bytes before close: {rest:?}");
    }

    /// Expects `connection.close`, answers close-ok, then expects the socket to close.
    pub async fn expect_connection_close(&mut self) -> CloseReply {
        let close = loop {
            match self.expect_method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => break close,
                // Replies to work in flight before the error may precede the close.
                (channel, method) if channel != 0 => {
                    let _ = method;
                }
                other => panic!("expected connection.close, got {other:?}"),
            }
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        self.assert_closed().await;
        CloseReply {
            reply_code: close.reply_code,
            reply_text: close.reply_text.to_string(),
            class_id: close.class_id,
            method_id: close.method_id,
        }
    }

    /// Expects `channel.close` on `channel` and answers close-ok.
    pub async fn expect_channel_close(&mut self, channel_id: u16) -> CloseReply {
        match self.expect_method().await {
            (ch, AMQPClass::Channel(channel::AMQPMethod::Close(close))) if ch == channel_id => {
                self.send_method(
                    channel_id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                )
                .await;
                CloseReply {
                    reply_code: close.reply_code,
                    reply_text: close.reply_text.to_string(),
                    class_id: close.class_id,
                    method_id: close.method_id,
                }
            }
            other => panic!("expected channel.close on {channel_id}, got {other:?}"),
        }
    }

    pub async fn open_channel(&mut self, channel_id: u16) {
        self.send_method(
            channel_id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.expect_method().await {
            (ch, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if ch == channel_id => {}
            other => panic!("expected channel.open-ok on {channel_id}, got {other:?}"),
        }
    }

    /// Sends a method and expects exactly `expected` back on the same channel.
    pub async fn call(&mut self, channel_id: u16, method: AMQPClass) -> AMQPClass {
        self.send_method(channel_id, method).await;
        let (ch, reply) = self.expect_method().await;
        assert_eq!(ch, channel_id, "reply on another channel: {reply:?}");
        reply
    }

    /// connection.close from the client side, expecting close-ok and EOF.
    pub async fn close(mut self) {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
        while !matches!(
            self.expect_method().await,
            (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
        ) {}
        self.assert_closed().await;
    }
}

pub fn open(vhost: &str) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
        virtual_host: vhost.into(),
    }))
}
