//! Every exchange type, exchange-to-exchange bindings, the default exchange and
//! mandatory returns.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};

use crate::start;
use crate::support::*;

#[tokio::test]
async fn direct_fanout_and_default_exchanges() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    for queue in ["d1", "d2", "f1", "f2"] {
        declare(&channel, queue, false).await;
    }
    channel
        .queue_bind(
            "d1".into(),
            "amq.direct".into(),
            "red".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    channel
        .queue_bind(
            "d2".into(),
            "amq.direct".into(),
            "blue".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    channel
        .queue_bind(
            "f1".into(),
            "amq.fanout".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    channel
        .queue_bind(
            "f2".into(),
            "amq.fanout".into(),
            "ignored".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    publish(&channel, "amq.direct", "red", b"r", false).await;
    publish(&channel, "amq.direct", "green", b"g", false).await;
    publish(&channel, "amq.fanout", "whatever", b"f", false).await;
    publish(&channel, "", "d2", b"default", false).await;
    assert_eq!(get_body(&channel, "d1").await.as_deref(), Some(&b"r"[..]));
    assert_eq!(get_body(&channel, "d1").await, None);
    assert_eq!(
        get_body(&channel, "d2").await.as_deref(),
        Some(&b"default"[..])
    );
    assert_eq!(get_body(&channel, "f1").await.as_deref(), Some(&b"f"[..]));
    assert_eq!(get_body(&channel, "f2").await.as_deref(), Some(&b"f"[..]));
    // Unbinding stops the flow.
    channel
        .queue_unbind(
            "d1".into(),
            "amq.direct".into(),
            "red".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    publish(&channel, "amq.direct", "red", b"r2", false).await;
    assert_eq!(get_body(&channel, "d1").await, None);
}

fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(
            (*key).into(),
            AMQPValue::LongString(LongString::from(*value)),
        );
    }
    table
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "h-all", false).await;
    declare(&channel, "h-any", false).await;
    channel
        .queue_bind(
            "h-all".into(),
            "amq.headers".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", "all"), ("format", "pdf"), ("type", "report")]),
        )
        .await
        .expect("bind all");
    channel
        .queue_bind(
            "h-any".into(),
            "amq.match".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", "any"), ("format", "zip"), ("type", "report")]),
        )
        .await
        .expect("bind any");
    channel
        .exchange_bind(
            "amq.match".into(),
            "amq.headers".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .ok();
    let send = |headers: FieldTable, body: &'static [u8]| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "amq.headers".into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_headers(headers),
                )
                .await
                .expect("publish");
        }
    };
    send(table(&[("format", "pdf"), ("type", "report")]), b"both").await;
    send(table(&[("format", "pdf"), ("type", "log")]), b"pdf-log").await;
    // amq.headers has no binding to h-any itself: only the exchange-to-exchange binding
    // (fanout-like on headers with no arguments = match all) carries messages there.
    assert_eq!(
        get_body(&channel, "h-all").await.as_deref(),
        Some(&b"both"[..])
    );
    assert_eq!(get_body(&channel, "h-all").await, None);
    assert_eq!(
        get_body(&channel, "h-any").await.as_deref(),
        Some(&b"both"[..])
    );
    assert_eq!(get_body(&channel, "h-any").await, None);
}

#[tokio::test]
async fn exchange_to_exchange_bindings_route_once_and_survive_cycles() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    for name in ["upstream", "downstream"] {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("exchange");
    }
    channel
        .exchange_bind(
            "downstream".into(),
            "upstream".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("e2e");
    // A cycle must not loop or duplicate.
    channel
        .exchange_bind(
            "upstream".into(),
            "downstream".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("e2e back");
    declare(&channel, "e2e-q", false).await;
    channel
        .queue_bind(
            "e2e-q".into(),
            "downstream".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    channel
        .queue_bind(
            "e2e-q".into(),
            "upstream".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    publish(&channel, "upstream", "k", b"once", false).await;
    assert_eq!(message_count(&channel, "e2e-q").await, 1);
    channel
        .exchange_unbind(
            "downstream".into(),
            "upstream".into(),
            "".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    channel
        .exchange_delete("downstream".into(), ExchangeDeleteOptions::default())
        .await
        .expect("delete");
    publish(&channel, "upstream", "k", b"twice", false).await;
    assert_eq!(message_count(&channel, "e2e-q").await, 2);
}

#[tokio::test]
async fn mandatory_unroutable_is_returned_before_its_confirm() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let confirm = channel
        .basic_publish(
            "amq.direct".into(),
            "nobody".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost?",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmation");
    let returned = confirm.take_message().expect("returned message");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.data, b"lost?");
    // Not mandatory: silently dropped, but still confirmed.
    let confirm = channel
        .basic_publish(
            "amq.direct".into(),
            "nobody".into(),
            BasicPublishOptions::default(),
            b"drop",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmation");
    assert!(confirm.is_ack());
    assert!(confirm.take_message().is_none());
}

#[tokio::test]
async fn topic_exchange_many_patterns() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "animals".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    for (queue, pattern) in [
        ("q-orange", "*.orange.*"),
        ("q-rabbit", "*.*.rabbit"),
        ("q-lazy", "lazy.#"),
    ] {
        declare(&channel, queue, false).await;
        channel
            .queue_bind(
                queue.into(),
                "animals".into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    channel
        .queue_bind(
            "q-rabbit".into(),
            "animals".into(),
            "lazy.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    for key in [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "lazy",
        "orange",
    ] {
        publish(&channel, "animals", key, key.as_bytes(), false).await;
    }
    assert_eq!(message_count(&channel, "q-orange").await, 3);
    // lazy.pink.rabbit matches both of q-rabbit's bindings but arrives once.
    assert_eq!(message_count(&channel, "q-rabbit").await, 5);
    assert_eq!(message_count(&channel, "q-lazy").await, 4);
}
