//! Connections that end badly: a reset in the middle of deliveries must cost nothing
//! beyond the connection itself, and the disk it pinned must be reclaimed.

use std::time::Duration;

use bytes::BytesMut;
use holdfast_codec::{
    AMQPClass, FieldTable as CodecTable, basic, connection, encode_body, encode_content_header,
    encode_method, encode_properties,
};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::binary;
use crate::raw::{CLIENT_FRAME_MAX, RawClient};
use crate::support::*;
use holdfast_testkit::Server;

/// A consumer whose socket is reset while deliveries are still queued for it: the
/// deliveries go back to the queue, another consumer takes and acks them, and then the
/// segments that held them are deleted (a queued delivery pins its record until the
/// connection's writer has read it; a writer that stopped must still let go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_consumer_leaves_no_pinned_segments() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");
    let server = Server::start_in(binary(), &data_dir, &["--segment-size", "1048576"]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "pinned", true).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let body = vec![5u8; 16 * 1024];
    let messages = 1000;
    let mut window = Vec::new();
    for _ in 0..messages {
        window.push(
            channel
                .basic_publish(
                    "".into(),
                    "pinned".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in window {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    let before = segment_files(&data_dir);
    assert!(before >= 10, "{before} segments for 16 MB");

    // A consumer that reads nothing: its socket fills, deliveries queue up behind it.
    let mut stuck = RawClient::tcp_with_small_window(server.addr, 4096)
        .await
        .handshake()
        .await;
    stuck.open_channel(1).await;
    stuck
        .call(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1000,
                global: false,
            })),
        )
        .await;
    stuck
        .send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "pinned".into(),
                consumer_tag: "stuck".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: CodecTable::default(),
            })),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stuck.reset();

    // Everything comes back and is taken by a well-behaved consumer.
    channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "pinned".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..messages {
        let delivery = next_delivery(&mut consumer).await;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let mut left = segment_files(&data_dir);
    for _ in 0..100 {
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = segment_files(&data_dir);
    }
    assert!(
        left <= 2,
        "{left} of {before} segment files remain after every message was acked"
    );
}

/// publish + header + body frames for one message on `channel`.
fn message_frames(out: &mut BytesMut, channel: u16, routing_key: &str, body: &[u8]) {
    encode_method(
        out,
        channel,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    encode_content_header(
        out,
        channel,
        body.len() as u64,
        &encode_properties(&basic::AMQPProperties::default()),
    );
    encode_body(out, channel, body, CLIENT_FRAME_MAX);
}

fn burst(channel: u16, messages: usize) -> BytesMut {
    let mut out = BytesMut::new();
    for _ in 0..messages {
        message_frames(&mut out, channel, "nowhere", &[1u8; 100]);
    }
    out
}

/// A client whose `connection.close` overtakes its own buffered publishes (amqplib
/// does this) gets close-ok and a clean end of stream: the broker reads and discards
/// what still arrives instead of closing a socket with unread input, which makes the
/// kernel answer with a reset that can destroy the close-ok before it is read.
#[tokio::test]
async fn a_close_overtaking_publishes_gets_close_ok_and_no_reset() {
    let server = crate::start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    let mut out = BytesMut::new();
    encode_method(
        &mut out,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    out.extend_from_slice(&burst(1, 2000));
    client.try_send_bytes(&out).await.expect("burst sent");
    match client.expect_method().await {
        (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    // Give a reset, if one comes, time to arrive; then the client is still writing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .try_send_bytes(&burst(1, 500))
        .await
        .expect("the socket was not reset");
    let rest = client.read_to_eof().await.expect("a clean end of stream");
    assert!(rest.is_empty(), "bytes after close-ok: {rest:?}");
}

/// A connection error while the client is still publishing (and not reading): the
/// broker's `connection.close` reaches the client intact even after the broker gave up
/// waiting for close-ok, and the client's writes are never answered with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_close_reaches_a_client_that_keeps_publishing() {
    let server = crate::start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    // A publish on a channel that was never opened: 504 CHANNEL_ERROR for the connection.
    let mut out = burst(7, 1);
    out.extend_from_slice(&burst(1, 100));
    client.try_send_bytes(&out).await.expect("sent");
    // Keep publishing past the broker's wait for close-ok (3 s), reading nothing.
    let chunk = burst(1, 200);
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < until {
        client
            .try_send_bytes(&chunk)
            .await
            .expect("the socket was not reset while the client was publishing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let close = client.expect_connection_close().await;
    assert_eq!(close.reply_code, 504, "{close:?}");
}

/// Undecodable input followed by more data: the broker's 501 `connection.close` is read
/// intact by the client, and the input the broker did not read is discarded, not
/// answered with a reset.
#[tokio::test]
async fn a_frame_error_close_reaches_the_client_intact_despite_unread_input() {
    let server = crate::start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    let mut out = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    out.extend_from_slice(&burst(1, 2000));
    client.try_send_bytes(&out).await.expect("sent");
    // Read nothing until the broker has had time to give up on this connection.
    tokio::time::sleep(Duration::from_millis(600)).await;
    client
        .try_send_bytes(&burst(1, 100))
        .await
        .expect("the socket was not reset");
    let close = client.expect_connection_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
}

/// `interop/node/run.sh 127.0.0.1 PORT MODE` (amqplib), with its output piped.
fn amqplib(server: &Server, mode: &str) -> std::process::Child {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/node/run.sh");
    std::process::Command::new("bash")
        .arg(&script)
        .arg("127.0.0.1")
        .arg(server.addr.port().to_string())
        .arg(mode)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run interop/node/run.sh")
}

fn finished(child: std::process::Child) -> (bool, String) {
    let output = child.wait_with_output().expect("amqplib script exits");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// amqplib: 2,000 `sendToQueue` calls and then `connection.close()`, whose close frame
/// overtakes the buffered publishes. Before the broker discarded late input this ended
/// with `write EPIPE` and a close that never resolved.
#[test]
fn amqplib_burst_then_close_ends_cleanly() {
    let server = crate::start();
    for _ in 0..3 {
        let (ok, output) = finished(amqplib(&server, "burst"));
        assert!(ok && output.contains("burst: closed cleanly"), "{output}");
    }
}

/// amqplib publishing in a loop while the broker shuts down: the 320 close reaches it.
#[test]
fn amqplib_sees_connection_forced_on_shutdown_while_publishing() {
    use std::io::BufRead;
    let mut server = crate::start();
    let mut child = amqplib(&server, "publish");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "publishing", "the script did not start publishing");
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.terminate().success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let (ok, stderr) = finished(child);
    let text = rest.join("\n");
    assert!(
        ok && text.contains("closed by the broker: 320"),
        "{text}\n{stderr}"
    );
}

/// lapin: a burst of publishes and then `connection.close`: close-ok arrives.
#[tokio::test]
async fn lapin_burst_then_close_gets_close_ok() {
    let server = crate::start();
    for _ in 0..3 {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        declare(&channel, "lapin-burst", false).await;
        for i in 0..2000u32 {
            publish(&channel, "", "lapin-burst", &i.to_be_bytes(), false).await;
        }
        connection
            .close(200, "bye".into())
            .await
            .expect("close-ok after a burst");
    }
}
