//! Malformed and out-of-sequence input over a raw socket. Each test asserts the exact
//! reply (AMQP 0-9-1 spec and RabbitMQ as the reference), that the socket is closed after
//! a connection exception, and that the server survives: still running, and a fresh lapin
//! connection can declare, publish and get.

use bytes::{BufMut, BytesMut};
use holdfast_codec::{
    AMQPClass, FieldTable, PROTOCOL_HEADER, basic, encode_body, encode_content_header,
    encode_heartbeat, encode_method, encode_properties, exchange, frame_type, queue,
};
use holdfast_testkit::Server;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::{BasicProperties, Connection};

use crate::raw::{CLIENT_CHANNEL_MAX, CLIENT_FRAME_MAX, CloseReply, RawClient};
use crate::start;

// Reply codes (AMQP 0-9-1 §1.9 constants).
const FRAME_ERROR: u16 = 501;
const COMMAND_INVALID: u16 = 503;
const CHANNEL_ERROR: u16 = 504;
const UNEXPECTED_FRAME: u16 = 505;
const NOT_ALLOWED: u16 = 530;
const NOT_IMPLEMENTED: u16 = 540;
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;
const PRECONDITION_FAILED: u16 = 406;

/// The server process is running (not exited, not a zombie) and serves a fresh client.
async fn assert_server_healthy(server: &Server) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid()))
        .expect("the server process still exists");
    // Field 3, after "pid (comm)", is the state; Z = exited, not yet reaped.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .expect("stat has a state field");
    assert_ne!(state, "Z", "the server process exited");

    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let name = format!("health-{}", rand::random::<u64>());
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = channel
        .basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            b"still alive",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let message = channel
        .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message is there");
    assert_eq!(message.delivery.data, b"still alive");
    connection.close(200, "bye".into()).await.expect("close");
}

fn assert_close(reply: &CloseReply, code: u16, class_id: u16, method_id: u16) {
    assert_eq!(
        (reply.reply_code, reply.class_id, reply.method_id),
        (code, class_id, method_id),
        "{reply:?}"
    );
    assert!(!reply.reply_text.is_empty(), "{reply:?}");
}

fn method_frame(channel: u16, method: &AMQPClass) -> BytesMut {
    let mut out = BytesMut::new();
    encode_method(&mut out, channel, method);
    out
}

/// A frame with arbitrary type and payload, framed correctly.
fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(u32::try_from(payload.len()).expect("small payload"));
    out.extend_from_slice(payload);
    out.put_u8(holdfast_codec::FRAME_END);
    out
}

fn publish(exchange: &str, routing_key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    }))
}

fn properties() -> bytes::Bytes {
    encode_properties(&basic::AMQPProperties::default())
}

fn queue_declare(name: &str, durable: bool, exclusive: bool) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable,
        exclusive,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn exchange_declare(name: &str, kind: &str) -> AMQPClass {
    AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: name.into(),
        kind: kind.into(),
        passive: false,
        durable: false,
        auto_delete: false,
        internal: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// publish + header + body frames for one message.
fn message(channel: u16, exchange: &str, routing_key: &str, body: &[u8]) -> BytesMut {
    let mut out = method_frame(channel, &publish(exchange, routing_key));
    encode_content_header(&mut out, channel, body.len() as u64, &properties());
    encode_body(&mut out, channel, body, CLIENT_FRAME_MAX);
    out
}

fn expect_declare_ok(reply: AMQPClass, name: &str) {
    match reply {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
            assert_eq!(ok.queue.as_str(), name);
        }
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}

/// Sends a connection-fatal input after the handshake; returns the close received.
async fn connection_error_after(server: &Server, channel: Option<u16>, input: &[u8]) -> CloseReply {
    let mut client = RawClient::open(server.addr).await;
    if let Some(channel) = channel {
        client.open_channel(channel).await;
    }
    client.send_bytes(input).await;
    client.expect_connection_close().await
}

// ---------------------------------------------------------------- protocol header

#[tokio::test]
async fn wrong_protocol_version_gets_supported_header() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_bytes(b"AMQP\x00\x00\x09\x00").await;
    assert_eq!(client.read_to_close().await, PROTOCOL_HEADER);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn http_request_gets_supported_header() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_bytes(b"HTTP/1.1").await;
    assert_eq!(client.read_to_close().await, PROTOCOL_HEADER);
    let mut client = RawClient::tcp(server.addr).await;
    client
        .send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(client.read_to_close().await, PROTOCOL_HEADER);
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- framing: 501

#[tokio::test]
async fn garbage_after_handshake_is_frame_error() {
    let server = start();
    let close = connection_error_after(&server, None, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn unknown_frame_type_is_frame_error() {
    let server = start();
    let close = connection_error_after(&server, None, &raw_frame(9, 0, b"hi")).await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn frame_larger_than_frame_max_is_frame_error() {
    let server = start();
    // Only the header: the size field alone must be refused, before any payload arrives.
    let mut header = BytesMut::new();
    header.put_u8(frame_type::BODY);
    header.put_u16(1);
    header.put_u32(CLIENT_FRAME_MAX);
    let close = connection_error_after(&server, Some(1), &header).await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn bad_frame_end_is_frame_error() {
    let server = start();
    let mut frame = method_frame(1, &queue_declare("q", false, false));
    let last = frame.len() - 1;
    frame[last] = 0xAB;
    let close = connection_error_after(&server, Some(1), &frame).await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn heartbeat_on_nonzero_channel_is_frame_error() {
    let server = start();
    let close =
        connection_error_after(&server, Some(1), &raw_frame(frame_type::HEARTBEAT, 1, b"")).await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    // A heartbeat on channel 0 is fine, before and after.
    let mut client = RawClient::open(server.addr).await;
    let mut heartbeat = BytesMut::new();
    encode_heartbeat(&mut heartbeat);
    client.send_bytes(&heartbeat).await;
    client.open_channel(1).await;
    client.close().await;
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- methods: 540, 502

#[tokio::test]
async fn unknown_method_is_not_implemented() {
    let server = start();
    // basic class, method 99: no such method.
    let close = connection_error_after(
        &server,
        Some(1),
        &raw_frame(frame_type::METHOD, 1, &[0, 60, 0, 99]),
    )
    .await;
    assert_close(&close, NOT_IMPLEMENTED, 60, 99);
    // An unknown class on channel 0.
    let close = connection_error_after(
        &server,
        None,
        &raw_frame(frame_type::METHOD, 0, &[0x12, 0x34, 0, 10]),
    )
    .await;
    assert_close(&close, NOT_IMPLEMENTED, 0x1234, 10);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn truncated_method_arguments_are_frame_error() {
    // RabbitMQ: rabbit_misc:frame_error "cannot decode", with the method's ids.
    let server = start();
    // basic.qos needs prefetch-size (4), prefetch-count (2) and global (1); send 1 byte.
    let close = connection_error_after(
        &server,
        Some(1),
        &raw_frame(frame_type::METHOD, 1, &[0, 60, 0, 10, 0]),
    )
    .await;
    assert_close(&close, FRAME_ERROR, 60, 10);
    // queue.declare whose short-string length runs past the payload.
    let close = connection_error_after(
        &server,
        Some(1),
        &raw_frame(frame_type::METHOD, 1, &[0, 50, 0, 10, 0, 0, 200, b'q']),
    )
    .await;
    assert_close(&close, FRAME_ERROR, 50, 10);
    // Trailing bytes after complete arguments (channel.open's reserved short string).
    let close = connection_error_after(
        &server,
        None,
        &raw_frame(frame_type::METHOD, 1, &[0, 20, 0, 10, 0, 0xFF]),
    )
    .await;
    assert_close(&close, FRAME_ERROR, 20, 10);
    // A payload too short to hold class and method ids.
    let close =
        connection_error_after(&server, None, &raw_frame(frame_type::METHOD, 0, &[0, 10])).await;
    assert_eq!(close.reply_code, FRAME_ERROR, "{close:?}");
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn truncated_content_header_is_frame_error() {
    let server = start();
    let mut frames = method_frame(1, &publish("", "q"));
    // class id and weight, but no body size or property flags.
    frames.extend_from_slice(&raw_frame(frame_type::HEADER, 1, &[0, 60, 0, 0]));
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- channels: 504

#[tokio::test]
async fn method_on_unopened_channel_is_channel_error() {
    let server = start();
    let frame = method_frame(3, &queue_declare("q", false, false));
    let close = connection_error_after(&server, Some(1), &frame).await;
    assert_close(&close, CHANNEL_ERROR, 50, 10);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn channel_open_twice_is_channel_error() {
    let server = start();
    let frame = method_frame(
        1,
        &AMQPClass::Channel(holdfast_codec::channel::AMQPMethod::Open(
            holdfast_codec::channel::Open {},
        )),
    );
    let close = connection_error_after(&server, Some(1), &frame).await;
    assert_close(&close, CHANNEL_ERROR, 20, 10);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn channel_above_channel_max_is_channel_error() {
    let server = start();
    let frame = method_frame(
        CLIENT_CHANNEL_MAX + 1,
        &AMQPClass::Channel(holdfast_codec::channel::AMQPMethod::Open(
            holdfast_codec::channel::Open {},
        )),
    );
    let close = connection_error_after(&server, None, &frame).await;
    assert_eq!(close.reply_code, CHANNEL_ERROR, "{close:?}");
    // channel_max itself is usable.
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(CLIENT_CHANNEL_MAX).await;
    client.close().await;
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- content: 505

#[tokio::test]
async fn content_header_without_publish_is_unexpected_frame() {
    let server = start();
    let mut frames = BytesMut::new();
    encode_content_header(&mut frames, 1, 5, &properties());
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn body_without_publish_is_unexpected_frame() {
    let server = start();
    let close =
        connection_error_after(&server, Some(1), &raw_frame(frame_type::BODY, 1, b"hello")).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn body_larger_than_declared_is_unexpected_frame() {
    let server = start();
    let mut frames = method_frame(1, &publish("", "q"));
    encode_content_header(&mut frames, 1, 5, &properties());
    encode_body(&mut frames, 1, b"hello, too long", CLIENT_FRAME_MAX);
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    // Over two frames: the second crosses the declared size.
    let mut frames = method_frame(1, &publish("", "q"));
    encode_content_header(&mut frames, 1, 5, &properties());
    encode_body(&mut frames, 1, b"hel", CLIENT_FRAME_MAX);
    encode_body(&mut frames, 1, b"lo!", CLIENT_FRAME_MAX);
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn method_where_body_expected_is_unexpected_frame() {
    let server = start();
    let mut frames = method_frame(1, &publish("", "q"));
    encode_content_header(&mut frames, 1, 5, &properties());
    encode_method(&mut frames, 1, &queue_declare("q", false, false));
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn method_where_header_expected_is_unexpected_frame() {
    let server = start();
    let mut frames = method_frame(1, &publish("", "q"));
    encode_method(&mut frames, 1, &queue_declare("q", false, false));
    let close = connection_error_after(&server, Some(1), &frames).await;
    assert_close(&close, UNEXPECTED_FRAME, 0, 0);
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- handshake: 403, 530

#[tokio::test]
async fn bad_password_is_access_refused() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    client.login("guest", "not-the-password").await;
    let close = client.expect_connection_close().await;
    assert_close(&close, ACCESS_REFUSED, 10, 11);
    // Unknown user, same answer.
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    client.login("nobody", "guest").await;
    let close = client.expect_connection_close().await;
    assert_close(&close, ACCESS_REFUSED, 10, 11);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn garbage_during_handshake_is_frame_error() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    match client.expect_method().await {
        (0, AMQPClass::Connection(holdfast_codec::connection::AMQPMethod::Start(_))) => {}
        other => panic!("expected connection.start, got {other:?}"),
    }
    client.send_bytes(b"\x00\x00\x00garbage garbage").await;
    let close = client.expect_connection_close().await;
    assert_close(&close, FRAME_ERROR, 0, 0);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn frame_max_below_minimum_is_not_allowed() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    client.login("guest", "guest").await;
    client.tune_with(1024).await;
    let close = client.expect_connection_close().await;
    assert_close(&close, NOT_ALLOWED, 10, 31);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn unknown_vhost_is_not_allowed() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    client.login("guest", "guest").await;
    client.tune().await;
    client
        .send_method(0, crate::raw::open("no-such-vhost"))
        .await;
    let close = client.expect_connection_close().await;
    assert_close(&close, NOT_ALLOWED, 10, 40);
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- channel-level errors

#[tokio::test]
async fn publish_to_missing_exchange_closes_only_the_channel() {
    let server = start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    client
        .send_bytes(&message(1, "no-such-exchange", "rk", b"lost"))
        .await;
    let close = client.expect_channel_close(1).await;
    assert_close(&close, NOT_FOUND, 60, 40);
    // The connection stays usable: another channel works, and so does channel 1 again.
    for channel in [2, 1] {
        client.open_channel(channel).await;
        let name = format!("after-404-{channel}");
        let reply = client
            .call(channel, queue_declare(&name, false, false))
            .await;
        expect_declare_ok(reply, &name);
        client
            .send_bytes(&message(channel, "", &name, b"kept"))
            .await;
        let reply = client
            .call(
                channel,
                AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                    queue: name.as_str().into(),
                    no_ack: true,
                })),
            )
            .await;
        assert!(
            matches!(reply, AMQPClass::Basic(basic::AMQPMethod::GetOk(_))),
            "{reply:?}"
        );
        match client.next_frame().await {
            Some(holdfast_codec::Frame::Header { body_size: 4, .. }) => {}
            other => panic!("expected a content header, got {other:?}"),
        }
        match client.next_frame().await {
            Some(holdfast_codec::Frame::Body { payload, .. }) => assert_eq!(&payload[..], b"kept"),
            other => panic!("expected a body, got {other:?}"),
        }
    }
    client.close().await;
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn ack_of_unknown_delivery_tag_is_precondition_failed() {
    let server = start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    client
        .send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 42,
                multiple: false,
            })),
        )
        .await;
    let close = client.expect_channel_close(1).await;
    assert_close(&close, PRECONDITION_FAILED, 60, 80);
    client.open_channel(2).await;
    client.close().await;
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn exclusive_queue_of_another_connection_is_resource_locked() {
    let server = start();
    let mut owner = RawClient::open(server.addr).await;
    owner.open_channel(1).await;
    let reply = owner.call(1, queue_declare("mine", false, true)).await;
    expect_declare_ok(reply, "mine");

    let mut other = RawClient::open(server.addr).await;
    other.open_channel(1).await;
    other
        .send_method(1, queue_declare("mine", false, false))
        .await;
    let close = other.expect_channel_close(1).await;
    assert_close(&close, RESOURCE_LOCKED, 50, 10);
    other.close().await;
    // The owner is unaffected.
    let reply = owner.call(1, queue_declare("mine", false, true)).await;
    expect_declare_ok(reply, "mine");
    owner.close().await;
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn redeclare_with_different_durable_is_precondition_failed() {
    let server = start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    let reply = client
        .call(1, queue_declare("durable-q", true, false))
        .await;
    expect_declare_ok(reply, "durable-q");
    client
        .send_method(1, queue_declare("durable-q", false, false))
        .await;
    let close = client.expect_channel_close(1).await;
    assert_close(&close, PRECONDITION_FAILED, 50, 10);
    client.close().await;
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn exchange_declare_with_unknown_type_is_command_invalid() {
    let server = start();
    let frame = method_frame(1, &exchange_declare("weird", "no-such-type"));
    let close = connection_error_after(&server, Some(1), &frame).await;
    assert_close(&close, COMMAND_INVALID, 40, 10);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn declaring_reserved_amq_exchange_is_access_refused() {
    let server = start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    client
        .send_method(1, exchange_declare("amq.foo", "direct"))
        .await;
    let close = client.expect_channel_close(1).await;
    assert_close(&close, ACCESS_REFUSED, 40, 10);
    client.close().await;
    assert_server_healthy(&server).await;
}

// ---------------------------------------------------------------- abrupt disconnects

#[tokio::test]
async fn disconnect_mid_frame_is_harmless() {
    let server = start();
    // Mid protocol header.
    let mut client = RawClient::tcp(server.addr).await;
    client.send_bytes(b"AMQ").await;
    drop(client);
    // Mid frame header, mid method payload, and mid content body.
    let whole = message(1, "", "q", &[7u8; 1000]);
    let publish_len = method_frame(1, &publish("", "q")).len();
    for cut in [3, publish_len - 4, whole.len() - 500] {
        let mut client = RawClient::open(server.addr).await;
        client.open_channel(1).await;
        client.send_bytes(&whole[..cut]).await;
        drop(client);
    }
    // Mid handshake.
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    drop(client);
    assert_server_healthy(&server).await;
}

#[tokio::test]
async fn garbage_on_another_connection_keeps_confirmed_message() {
    let server = start();
    let connection: Connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "precious".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = channel
        .basic_publish(
            "".into(),
            "precious".into(),
            BasicPublishOptions::default(),
            b"keep me",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());

    let mut garbage: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    garbage[0] = 0xFF; // not a frame type
    let close = connection_error_after(&server, Some(1), &garbage).await;
    assert_close(&close, FRAME_ERROR, 0, 0);

    // The first connection is untouched and the message is still there.
    let message = channel
        .basic_get("precious".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the confirmed message survives");
    assert_eq!(message.delivery.data, b"keep me");
    connection.close(200, "bye".into()).await.expect("close");
    assert_server_healthy(&server).await;
}
