//! Holdfast's AMQP 0-9-1 front end: accepts TCP connections, runs the handshake
//! (protocol header, start/start-ok with PLAIN or AMQPLAIN, tune/tune-ok, open), then
//! splits each connection into a reader (frames → [`session::Session`] → broker calls)
//! and a writer task ([`writer::run_writer`]) that owns the socket's write half.
//!
//! Everything that goes wrong on one connection ends at most that connection.
#![warn(missing_docs)]

mod alarm;
mod auth;
mod session;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use holdfast_broker::{AmqpException, Broker, Outbound, ReplyCode};
use holdfast_codec::{
    AMQPClass, AMQPValue, DecodeError, FRAME_MIN_SIZE, FieldTable, Frame, FrameDecoder, LongString,
    PROTOCOL_HEADER, connection, encode_method,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tracing::{Instrument, debug, info, info_span, warn};

use alarm::Throttle;
pub use auth::User;
use session::{Flow, Session};
use writer::{WriterItem, run_writer};

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame the server accepts and offers.
    pub frame_max: u32,
    /// Highest channel number.
    pub channel_max: u16,
    /// Heartbeat interval offered, in seconds (0 disables).
    pub heartbeat: u16,
    /// Largest message body accepted.
    pub max_message_size: u64,
    /// Users who may log in.
    pub users: Vec<User>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_message_size: 128 * 1024 * 1024,
            users: vec![User::guest()],
        }
    }
}

/// Accepts connections until `shutdown` turns true; then every connection is closed with
/// 320 CONNECTION_FORCED and this returns once they are gone.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let span = info_span!("conn", %peer);
                        connections.spawn(
                            handle_connection(stream, peer, broker.clone(), config.clone(), shutdown.clone()).instrument(span),
                        );
                    }
                    Err(err) => {
                        warn!(cause = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Reads and writes frames during the handshake, before the socket is split.
struct Handshake {
    stream: TcpStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
}

enum HandshakeError {
    /// Close the socket without a word (peer gone, garbage header already answered).
    Silent,
    /// Send `connection.close` with this exception first.
    Exception(AmqpException),
}

impl From<std::io::Error> for HandshakeError {
    fn from(_: std::io::Error) -> Self {
        HandshakeError::Silent
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Handshake {
    async fn send(&mut self, method: &AMQPClass) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode_method(&mut out, 0, method);
        self.stream.write_all(&out).await
    }

    async fn next_method(&mut self) -> Result<AMQPClass, HandshakeError> {
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(Frame::Method { channel: 0, method })) => return Ok(*method),
                Ok(Some(Frame::Heartbeat { .. })) => continue,
                Ok(Some(_)) => {
                    return Err(HandshakeError::Exception(AmqpException::connection(
                        ReplyCode::UnexpectedFrame,
                        "expected a connection method during the handshake",
                    )));
                }
                Ok(None) => {}
                Err(err) => return Err(HandshakeError::Exception(decode_exception(&err))),
            }
            let read = timeout(HANDSHAKE_TIMEOUT, self.stream.read_buf(&mut self.buffer))
                .await
                .map_err(|_| HandshakeError::Silent)??;
            if read == 0 {
                return Err(HandshakeError::Silent);
            }
        }
    }
}

fn decode_exception(err: &DecodeError) -> AmqpException {
    let code = match err {
        DecodeError::UnknownMethod { .. } => ReplyCode::NotImplemented,
        // Arguments that do not parse are a frame the server "could not decode" (501 in
        // the specification; RabbitMQ's rabbit_misc:frame_error "cannot decode"), not 502.
        DecodeError::MalformedMethod { .. }
        | DecodeError::MalformedHeader
        | DecodeError::FrameTooLarge { .. }
        | DecodeError::BadFrameEnd { .. }
        | DecodeError::UnknownFrameType { .. } => ReplyCode::FrameError,
    };
    let exception = AmqpException::connection(code, err.to_string());
    match err {
        DecodeError::UnknownMethod {
            class_id,
            method_id,
        }
        | DecodeError::MalformedMethod {
            class_id,
            method_id,
        } => exception.with_method(*class_id, *method_id),
        _ => exception,
    }
}

fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "authentication_failure_close",
        "per_consumer_qos",
        "connection.blocked",
    ] {
        capabilities.insert(name.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert(
        "product".into(),
        AMQPValue::LongString(LongString::from("Holdfast")),
    );
    properties.insert(
        "version".into(),
        AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))),
    );
    properties.insert(
        "platform".into(),
        AMQPValue::LongString(LongString::from("Rust")),
    );
    properties.insert(
        "cluster_name".into(),
        AMQPValue::LongString(LongString::from("holdfast")),
    );
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    properties
}

/// Negotiated connection parameters.
struct Tuned {
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
    vhost: String,
    /// The client wants `connection.blocked` / `unblocked`.
    blocked_notifications: bool,
}

async fn handshake(
    hs: &mut Handshake,
    peer: SocketAddr,
    config: &ServerConfig,
) -> Result<Tuned, HandshakeError> {
    let mut header = [0u8; 8];
    timeout(HANDSHAKE_TIMEOUT, hs.stream.read_exact(&mut header))
        .await
        .map_err(|_| HandshakeError::Silent)??;
    if &header != PROTOCOL_HEADER {
        // The specification: answer with the header we support, then close.
        let _ = hs.stream.write_all(PROTOCOL_HEADER).await;
        return Err(HandshakeError::Silent);
    }
    hs.send(&AMQPClass::Connection(connection::AMQPMethod::Start(
        connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: LongString::from("PLAIN AMQPLAIN"),
            locales: LongString::from("en_US"),
        },
    )))
    .await?;
    let AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) = hs.next_method().await?
    else {
        return Err(HandshakeError::Exception(AmqpException::connection(
            ReplyCode::CommandInvalid,
            "expected connection.start-ok",
        )));
    };
    let blocked_notifications = alarm::wants_blocked_notifications(&start_ok.client_properties);
    let mechanism = start_ok.mechanism.as_str().to_owned();
    if let Err(failure) = auth::authenticate(
        &config.users,
        &mechanism,
        start_ok.response.as_bytes(),
        peer.ip(),
    ) {
        warn!(?failure, "login refused");
        return Err(HandshakeError::Exception(
            AmqpException::connection(ReplyCode::AccessRefused, failure.text(&mechanism))
                .with_method(10, 11),
        ));
    }
    hs.send(&AMQPClass::Connection(connection::AMQPMethod::Tune(
        connection::Tune {
            channel_max: config.channel_max,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat,
        },
    )))
    .await?;
    let AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)) = hs.next_method().await?
    else {
        return Err(HandshakeError::Exception(AmqpException::connection(
            ReplyCode::CommandInvalid,
            "expected connection.tune-ok",
        )));
    };
    let frame_max = if tune_ok.frame_max == 0 {
        config.frame_max
    } else {
        tune_ok.frame_max
    };
    if frame_max < FRAME_MIN_SIZE || frame_max > config.frame_max {
        return Err(HandshakeError::Exception(
            AmqpException::connection(
                ReplyCode::NotAllowed,
                format!(
                    "negotiated frame_max = {frame_max} is outside {FRAME_MIN_SIZE}..={}",
                    config.frame_max
                ),
            )
            .with_method(10, 31),
        ));
    }
    let channel_max = match tune_ok.channel_max {
        0 => config.channel_max,
        n => n.min(config.channel_max),
    };
    hs.decoder.set_frame_max(frame_max);
    let AMQPClass::Connection(connection::AMQPMethod::Open(open)) = hs.next_method().await? else {
        return Err(HandshakeError::Exception(AmqpException::connection(
            ReplyCode::CommandInvalid,
            "expected connection.open",
        )));
    };
    Ok(Tuned {
        channel_max,
        frame_max,
        heartbeat: tune_ok.heartbeat,
        vhost: open.virtual_host.as_str().to_owned(),
        blocked_notifications,
    })
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hs = Handshake {
        stream,
        buffer: BytesMut::with_capacity(8192),
        // Until tune-ok, accept what a client's start-ok needs but no more.
        decoder: FrameDecoder::new(config.frame_max.max(FRAME_MIN_SIZE)),
    };
    let tuned = match handshake(&mut hs, peer, &config).await {
        Ok(tuned) => tuned,
        Err(HandshakeError::Silent) => return,
        Err(HandshakeError::Exception(exception)) => {
            send_close_and_linger(&mut hs, &exception).await;
            return;
        }
    };
    let (writer_tx, writer_rx) = mpsc::unbounded_channel::<WriterItem>();
    let sink_tx = writer_tx.clone();
    // Channel closes the broker initiates change the reader's channel state, so they
    // go to the reader; everything else is for the writer, in order.
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Outbound>();
    let sink: holdfast_broker::OutboundSink = Box::new(move |event: Outbound| match event {
        Outbound::CloseChannel { .. } => control_tx.send(event).is_ok(),
        event => sink_tx.send(WriterItem::Outbound(event)).is_ok(),
    });
    let connection_id = match broker.connect(&tuned.vhost, sink) {
        Ok(id) => id,
        Err(exception) => {
            send_close_and_linger(&mut hs, &exception.with_method(10, 40)).await;
            return;
        }
    };
    hs.send(&AMQPClass::Connection(connection::AMQPMethod::OpenOk(
        connection::OpenOk {},
    )))
    .await
    .ok();
    info!(vhost = %tuned.vhost, heartbeat = tuned.heartbeat, frame_max = tuned.frame_max, "connection opened");
    let Handshake {
        stream,
        mut buffer,
        decoder,
    } = hs;
    let (mut reader, write_half) = stream.into_split();
    let heartbeat = (tuned.heartbeat > 0).then(|| Duration::from_secs(u64::from(tuned.heartbeat)));
    let writer = tokio::spawn(
        run_writer(
            write_half,
            writer_rx,
            broker.clone(),
            tuned.frame_max,
            heartbeat,
        )
        .in_current_span(),
    );
    let mut session = Session::new(
        broker.clone(),
        connection_id,
        writer_tx.clone(),
        tuned.channel_max,
        tuned.frame_max,
        config.max_message_size,
    );
    // A peer silent for two heartbeat intervals is gone.
    let read_timeout = heartbeat.map_or(Duration::from_secs(u64::MAX / 4), |h| h * 2);
    let close_deadline = Duration::from_secs(3);
    // When the broker began waiting for close-ok: the wait is bounded in total, not per
    // read, or a client that keeps publishing would hold the connection (and a
    // shutdown) open for ever.
    let mut closing_since: Option<tokio::time::Instant> = None;
    // The peer ended the stream (or is gone): nothing is left to discard at the end.
    let mut peer_gone = false;
    let mut alarms = broker.alarms().subscribe();
    let mut throttle = Throttle::new(tuned.blocked_notifications, *alarms.borrow_and_update());
    // A publish that arrived during a resource alarm: nothing more is read until it is
    // handled.
    let mut held: Option<Frame> = None;
    'connection: loop {
        loop {
            let frame = match held.take() {
                Some(frame) => frame,
                None => match decoder.decode(&mut buffer) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(err) => {
                        let exception = decode_exception(&err);
                        debug!(code = exception.code.code(), text = %exception.text, "undecodable input");
                        session.close_connection(&exception);
                        // The stream's framing is lost; nothing more can be decoded from
                        // it. What still arrives is discarded at the end.
                        break 'connection;
                    }
                },
            };
            if !session.closing {
                let (hold, notice) = throttle.hold(&frame);
                send_connection_method(&writer_tx, notice);
                if hold {
                    held = Some(frame);
                    break;
                }
            }
            match session.handle_frame(frame) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Closed | Flow::CloseAcknowledged) => break 'connection,
                Err(exception) => {
                    debug!(code = exception.code.code(), text = %exception.text, "connection exception");
                    session.close_connection(&exception);
                }
            }
        }
        let wait = if session.closing {
            let since = *closing_since.get_or_insert_with(tokio::time::Instant::now);
            close_deadline.saturating_sub(since.elapsed())
        } else {
            read_timeout
        };
        tokio::select! {
            // While a publish is held the socket is not read, and the peer's silence is
            // not a missed heartbeat (RabbitMQ pauses its heartbeat monitor likewise).
            read = timeout(wait, reader.read_buf(&mut buffer)), if held.is_none() => {
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        peer_gone = true;
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => {
                        if !session.closing {
                            warn!("missed heartbeats from client, closing");
                            peer_gone = true;
                        }
                        break;
                    }
                }
            }
            _ = shutdown.changed(), if !session.closing => {
                session.close_connection(&AmqpException::connection(
                    ReplyCode::ConnectionForced,
                    "broker forced connection closure with reason 'shutdown'",
                ));
            }
            Ok(()) = alarms.changed() => {
                let notice = throttle.alarm_changed(*alarms.borrow_and_update());
                send_connection_method(&writer_tx, notice);
            }
            Some(event) = control_rx.recv() => {
                if let Outbound::CloseChannel { channel, code, text } = event {
                    session.server_closed_channel(channel, code, &text);
                }
            }
        }
    }
    session.teardown();
    let _ = writer_tx.send(WriterItem::Shutdown);
    drop(writer_tx);
    drop(session);
    // The writer sends what is queued (close-ok, a close reason, the last confirms) and
    // then shuts the socket's write side.
    let _ = writer.await;
    if !peer_gone {
        discard_until_eof(&mut reader).await;
    }
    info!("connection closed");
}

/// How long a closed connection keeps reading, to let the peer see the end of stream.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Reads and discards input until the peer ends the stream or [`CLOSE_LINGER`] passes.
/// Closing a socket with unread input makes the kernel answer with a reset, and a reset
/// can destroy what the broker wrote last (close-ok, a close reason, publisher confirms)
/// in the peer's receive buffer before the client reads it; a client whose close
/// overtook its own buffered publishes (amqplib) would see EPIPE instead of close-ok.
async fn discard_until_eof(reader: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut scratch = vec![0u8; 16 * 1024];
    let _ = timeout(CLOSE_LINGER, async {
        while let Ok(read) = reader.read(&mut scratch).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

/// Queues a connection-level method (blocked / unblocked) for the writer.
fn send_connection_method(writer: &mpsc::UnboundedSender<WriterItem>, method: Option<AMQPClass>) {
    if let Some(method) = method {
        let mut out = BytesMut::with_capacity(64);
        encode_method(&mut out, 0, &method);
        let _ = writer.send(WriterItem::Frames(out));
    }
}

/// Sends `connection.close` during the handshake and gives the peer a moment to read it.
async fn send_close_and_linger(hs: &mut Handshake, exception: &AmqpException) {
    let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: exception.code.code(),
        reply_text: exception.reply_text().into(),
        class_id: exception.class_id,
        method_id: exception.method_id,
    }));
    if hs.send(&close).await.is_err() {
        return;
    }
    let _ = timeout(Duration::from_secs(1), async {
        loop {
            match hs.next_method().await {
                Ok(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let _ = hs.stream.shutdown().await;
    discard_until_eof(&mut hs.stream).await;
}
