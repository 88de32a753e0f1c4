//! The broker driven without sockets: commands in, outcomes and [`Outbound`] events out.
//! Includes a model-based property test of acknowledgement bookkeeping across restarts;
//! [`model`] holds the wider one, with power cuts.

mod model;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use holdfast_store::sim::SimFileSystem;
use holdfast_store::{FsyncPolicy, StoreConfig};
use proptest::prelude::*;

use crate::{
    Broker, BrokerConfig, ChannelKey, ConnectionId, ConsumeRequest, Disposition, Outbound,
    PublishRequest, QueueDeclare, ReplyCode,
};

/// Raw basic properties with no field set.
const NO_PROPERTIES: &[u8] = &[0, 0];

fn open(dir: &std::path::Path) -> Arc<Broker> {
    Broker::open(BrokerConfig::new(StoreConfig {
        dir: dir.to_owned(),
        segment_size: 64 * 1024,
        fsync: FsyncPolicy::Never,
    }))
    .expect("broker opens")
}

fn connect(broker: &Broker) -> (ConnectionId, Arc<Mutex<Vec<Outbound>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let id = broker
        .connect(
            "/",
            Box::new(move |event| {
                sink.lock().expect("events").push(event);
                true
            }),
        )
        .expect("vhost / exists");
    (id, events)
}

fn publish(broker: &Broker, connection: ConnectionId, queue: &str, id: u32, persistent: bool) {
    broker
        .basic_publish(
            connection,
            &PublishRequest {
                exchange: String::new(),
                routing_key: queue.to_owned(),
                persistent,
                headers: None,
                properties: Bytes::from_static(NO_PROPERTIES),
                body: Bytes::copy_from_slice(&id.to_be_bytes()),
                expiration: None,
                dedup_key: None,
            },
        )
        .expect("publish");
}

fn body_id(broker: &Broker, message: crate::MessageRef) -> u32 {
    let stored = broker.read_message(message).expect("readable");
    u32::from_be_bytes(stored.body[..4].try_into().expect("4 bytes"))
}

fn declare_durable(broker: &Broker, connection: ConnectionId, name: &str) {
    broker
        .queue_declare(
            connection,
            QueueDeclare {
                name: name.to_owned(),
                durable: true,
                ..QueueDeclare::default()
            },
        )
        .expect("declare");
}

#[test]
fn dispatch_respects_prefetch_and_requeues_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = open(dir.path());
    let (connection, events) = connect(&broker);
    let key = ChannelKey {
        connection,
        channel: 1,
    };
    broker.channel_open(key);
    declare_durable(&broker, connection, "q");
    for id in 0..5 {
        publish(&broker, connection, "q", id, true);
    }
    broker.basic_qos(key, 2, false);
    let (_, queue) = broker
        .basic_consume(
            key,
            ConsumeRequest {
                queue: "q".into(),
                ..ConsumeRequest::default()
            },
        )
        .expect("consume");
    broker.dispatch(queue);
    let delivered: Vec<(u64, u32, bool)> = events
        .lock()
        .expect("events")
        .drain(..)
        .map(|event| match event {
            Outbound::Deliver {
                delivery_tag,
                message,
                redelivered,
                ..
            } => (delivery_tag, body_id(&broker, message), redelivered),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(delivered, vec![(1, 0, false), (2, 1, false)]);
    // Reject 1 with requeue: it goes back in front of 2, 3, 4 and comes right back.
    broker
        .basic_settle(key, 1, false, Disposition::Requeue)
        .expect("nack");
    let next: Vec<(u32, bool)> = events
        .lock()
        .expect("events")
        .drain(..)
        .map(|event| match event {
            Outbound::Deliver {
                message,
                redelivered,
                ..
            } => (body_id(&broker, message), redelivered),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(next, vec![(0, true)]);
    let unknown = broker
        .basic_settle(key, 99, false, Disposition::Ack)
        .expect_err("unknown tag");
    assert_eq!(unknown.code, ReplyCode::PreconditionFailed);
}

/// A deduplicating exchange's window is checkpointed once after a change, not every
/// second forever: an idle broker appends nothing.
#[test]
fn a_clean_exchange_window_is_not_checkpointed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = open(dir.path());
    let (connection, _events) = connect(&broker);
    let mut arguments = holdfast_codec::FieldTable::default();
    arguments.insert(
        "x-message-deduplication".into(),
        holdfast_codec::AMQPValue::Boolean(true),
    );
    broker
        .exchange_declare(
            connection, "x", "fanout", false, true, false, false, arguments,
        )
        .expect("exchange");
    declare_durable(&broker, connection, "q");
    broker
        .queue_binding(
            connection,
            true,
            "q",
            "x",
            "",
            holdfast_codec::FieldTable::default(),
        )
        .expect("bind");
    broker
        .basic_publish(
            connection,
            &PublishRequest {
                exchange: "x".into(),
                routing_key: String::new(),
                persistent: true,
                headers: None,
                properties: Bytes::from_static(NO_PROPERTIES),
                body: Bytes::from_static(b"m"),
                expiration: None,
                dedup_key: Some(Bytes::from_static(b"k")),
            },
        )
        .expect("publish");
    // The housekeeping thread checkpoints the dirty window within a second or so.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let before = broker.store().stats().appended_records;
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let after = broker.store().stats().appended_records;
    assert_eq!(
        after - before,
        0,
        "an idle broker with a clean window appended records"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Publish { persistent: bool },
    Get,
    Ack(usize),
    Reject { index: usize, requeue: bool },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(|persistent| Op::Publish { persistent }),
        3 => Just(Op::Get),
        2 => (0usize..8).prop_map(Op::Ack),
        1 => (0usize..8, any::<bool>()).prop_map(|(index, requeue)| Op::Reject { index, requeue }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After any sequence of publishes, gets, acks, rejects and restarts, the queue holds
    /// exactly the model's messages, serves them in publish order, and a restart brings
    /// back every unsettled persistent message and nothing else.
    #[test]
    fn acknowledgements_survive_restarts_like_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = open(dir.path());
        let (mut connection, _) = connect(&broker);
        let mut key = ChannelKey { connection, channel: 1 };
        broker.channel_open(key);
        declare_durable(&broker, connection, "q");
        let mut next_id = 0u32;
        let mut persistent = BTreeSet::new();
        let mut ready: BTreeSet<u32> = BTreeSet::new();
        let mut unacked: Vec<(u64, u32)> = Vec::new();
        for op in ops {
            match op {
                Op::Publish { persistent: is_persistent } => {
                    publish(&broker, connection, "q", next_id, is_persistent);
                    if is_persistent {
                        persistent.insert(next_id);
                    }
                    ready.insert(next_id);
                    next_id += 1;
                }
                Op::Get => {
                    let got = broker.basic_get(key, "q", false).expect("get");
                    match (got, ready.pop_first()) {
                        (None, None) => {}
                        (Some(ok), Some(expected)) => {
                            prop_assert_eq!(body_id(&broker, ok.message), expected);
                            unacked.push((ok.delivery_tag, expected));
                        }
                        (got, expected) => prop_assert!(false, "get {:?} but model had {:?}", got.map(|g| g.delivery_tag), expected),
                    }
                }
                Op::Ack(index) if !unacked.is_empty() => {
                    let (tag, _) = unacked.remove(index % unacked.len());
                    broker.basic_settle(key, tag, false, Disposition::Ack).expect("ack");
                }
                Op::Reject { index, requeue } if !unacked.is_empty() => {
                    let (tag, id) = unacked.remove(index % unacked.len());
                    broker.basic_settle(key, tag, false, if requeue { Disposition::Requeue } else { Disposition::Reject }).expect("reject");
                    if requeue {
                        ready.insert(id);
                    }
                }
                Op::Restart => {
                    drop(broker);
                    broker = open(dir.path());
                    (connection, _) = connect(&broker);
                    key = ChannelKey { connection, channel: 1 };
                    broker.channel_open(key);
                    ready.extend(unacked.drain(..).map(|(_, id)| id));
                    ready.retain(|id| persistent.contains(id));
                }
                Op::Ack(_) | Op::Reject { .. } => {}
            }
            let (count, _) = broker.queue_counts("/", "q").expect("queue exists");
            prop_assert_eq!(count as usize, ready.len());
        }
    }
}

fn publish_to(broker: &Broker, connection: ConnectionId, exchange: &str, key: &str, id: u32) {
    broker
        .basic_publish(
            connection,
            &PublishRequest {
                exchange: exchange.to_owned(),
                routing_key: key.to_owned(),
                persistent: true,
                headers: None,
                properties: Bytes::from_static(NO_PROPERTIES),
                body: Bytes::copy_from_slice(&id.to_be_bytes()),
                expiration: None,
                dedup_key: None,
            },
        )
        .expect("publish");
}

fn count(broker: &Broker, queue: &str) -> Option<u32> {
    broker.queue_counts("/", queue).map(|(ready, _)| ready)
}

/// Durable definitions come back from their log records alone, and again from the
/// checkpoint that replaces those records once the log has moved past them.
#[test]
fn definitions_survive_restarts_from_records_and_from_their_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = holdfast_codec::FieldTable::default;
    {
        let broker = open(dir.path());
        let (c, _events) = connect(&broker);
        broker
            .exchange_declare(c, "orders", "direct", false, true, false, false, table())
            .expect("exchange");
        broker
            .exchange_declare(c, "fan", "fanout", false, true, false, false, table())
            .expect("exchange");
        // An auto-delete exchange that loses its last binding goes, durably.
        broker
            .exchange_declare(c, "brief", "fanout", false, true, true, false, table())
            .expect("exchange");
        for queue in ["kept", "deleted", "bound-then-unbound"] {
            declare_durable(&broker, c, queue);
        }
        broker
            .queue_binding(c, true, "kept", "orders", "k", table())
            .expect("bind");
        broker
            .queue_binding(c, true, "bound-then-unbound", "orders", "b", table())
            .expect("bind");
        broker
            .queue_binding(c, false, "bound-then-unbound", "orders", "b", table())
            .expect("unbind");
        broker
            .exchange_binding(c, true, "orders", "fan", "", table())
            .expect("exchange-to-exchange");
        broker
            .queue_binding(c, true, "deleted", "brief", "", table())
            .expect("bind");
        broker
            .queue_delete(c, "deleted", false, false)
            .expect("delete");
        publish_to(&broker, c, "fan", "k", 1);
        assert_eq!(count(&broker, "kept"), Some(1));
    }
    let check = |broker: &Broker, expected_in_kept: u32| {
        let (c, _events) = connect(broker);
        assert_eq!(count(broker, "kept"), Some(expected_in_kept));
        assert_eq!(count(broker, "deleted"), None, "a deleted queue came back");
        assert_eq!(count(broker, "bound-then-unbound"), Some(0));
        let passive = |name: &str| {
            broker
                .exchange_declare(c, name, "fanout", true, true, false, false, table())
                .is_ok()
        };
        assert!(
            !passive("brief"),
            "the emptied auto-delete exchange came back"
        );
        // Routing through both bindings still works; the removed binding stays removed.
        publish_to(broker, c, "fan", "k", 2);
        publish_to(broker, c, "orders", "b", 3);
        assert_eq!(count(broker, "kept"), Some(expected_in_kept + 1));
        assert_eq!(count(broker, "bound-then-unbound"), Some(0));
    };
    {
        let broker = open(dir.path());
        check(&broker, 1);
    }
    let definitions_file = dir.path().join("definitions");
    {
        let broker = open(dir.path());
        // Move the log a segment past the definition records: the housekeeping thread
        // then writes a checkpoint and releases them, and their segments go.
        let (c, _events) = connect(&broker);
        declare_durable(&broker, c, "filler");
        for id in 0..2000 {
            publish(&broker, c, "filler", id, true);
        }
        broker.queue_purge(c, "filler").expect("purge");
        broker.queue_purge(c, "kept").expect("purge");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read(&definitions_file)
            .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains("\"as_of\""))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no definitions checkpoint was written"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let first_segment = dir.path().join("log").join(format!("{:020}.log", 0));
        while first_segment.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the first segment outlived the checkpoint that replaced its records"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        check(&broker, 0);
    }
    let broker = open(dir.path());
    check(&broker, 1);
}

/// A log holding a record kind this version does not know (written by a newer one) is
/// refused at open, naming the kind: skipping it could drop acks or moves silently.
#[test]
fn a_record_of_an_unknown_kind_refuses_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        dir: dir.path().to_owned(),
        segment_size: 64 * 1024,
        fsync: FsyncPolicy::Never,
    };
    {
        let store = holdfast_store::Store::open(config.clone(), |_, _| {}).expect("store");
        store
            .append(&[0x7f, 1, 2, 3], 0, holdfast_store::Durability::Requested)
            .expect("append");
        store.shutdown().expect("shutdown");
    }
    let refused = match Broker::open(BrokerConfig::new(config)) {
        Ok(_) => panic!("a log with an unknown record kind was opened"),
        Err(err) => err.to_string(),
    };
    assert!(
        refused.contains("0x7f") && refused.contains("position 8"),
        "the error names the kind and where: {refused}"
    );
}

/// A `queue.delete` whose record the log cannot take fails whole: the client gets 541
/// and the queue keeps its messages, now and after a restart. (Before definitions were
/// logged, the queue was deleted in memory, the file write failed, and the queue came
/// back with its messages at the next start although the client had seen an error.)
#[test]
fn a_queue_delete_the_log_refuses_leaves_the_queue_and_its_messages() {
    let fs = SimFileSystem::default();
    // Too little room to reserve a segment: every write meets the disk at once.
    fs.set_free_space(Some(20_000));
    {
        let broker = open_on(&fs);
        let (c, _events) = connect(&broker);
        declare_durable(&broker, c, "kept");
        for id in 0..3 {
            publish(&broker, c, "kept", id, true);
        }
        fs.set_free_space(Some(0));
        let refused = broker
            .queue_delete(c, "kept", false, false)
            .expect_err("the deletion cannot be logged");
        assert_eq!(refused.code, ReplyCode::InternalError, "{refused:?}");
        assert_eq!(count(&broker, "kept"), Some(3), "the queue stays, whole");
        fs.set_free_space(None);
    }
    let broker = open_on(&fs);
    assert_eq!(
        count(&broker, "kept"),
        Some(3),
        "after a restart the queue is there with its messages"
    );
}

/// A broker on the store's simulated disk (1 MiB segments, `fsync always`).
fn open_on(fs: &SimFileSystem) -> Arc<Broker> {
    let config = BrokerConfig::new(StoreConfig {
        dir: "/sim".into(),
        segment_size: 1 << 20,
        fsync: FsyncPolicy::Always,
    });
    let fs = fs.clone();
    let store_config = config.store.clone();
    Broker::open_with_store(config, move |visit| {
        holdfast_store::Store::open_on(&fs, store_config, visit)
    })
    .expect("broker opens")
}

/// A queue that expires (`x-expires`) or loses its last consumer (auto-delete) while the
/// log cannot take its deletion stays whole, in memory and after a restart, instead of
/// vanishing now and coming back at the next start with its messages. An expired one
/// goes once the disk has room again; an auto-delete one when its next consumer leaves.
#[test]
fn a_queue_deletion_the_log_refuses_keeps_the_queue_for_expiry_and_auto_delete() {
    let fs = SimFileSystem::default();
    // Too little room to reserve a segment: every write meets the disk at once.
    fs.set_free_space(Some(20_000));
    let later = crate::enqueue::now_ms() + 60_000;
    {
        let broker = open_on(&fs);
        let (c, _events) = connect(&broker);
        let key = ChannelKey {
            connection: c,
            channel: 1,
        };
        broker.channel_open(key);
        let mut expiring = holdfast_codec::FieldTable::default();
        expiring.insert("x-expires".into(), holdfast_codec::AMQPValue::LongInt(1000));
        for (name, auto_delete, arguments) in [
            ("expiring", false, expiring),
            ("brief", true, holdfast_codec::FieldTable::default()),
        ] {
            broker
                .queue_declare(
                    c,
                    QueueDeclare {
                        name: name.into(),
                        durable: true,
                        auto_delete,
                        arguments,
                        ..QueueDeclare::default()
                    },
                )
                .expect("declare");
            for id in 0..3 {
                publish(&broker, c, name, id, true);
            }
        }
        let (tag, _) = broker
            .basic_consume(
                key,
                ConsumeRequest {
                    queue: "brief".into(),
                    no_ack: false,
                    ..ConsumeRequest::default()
                },
            )
            .expect("consume");
        fs.set_free_space(Some(0));
        broker.housekeeping(later);
        broker.basic_cancel(key, &tag);
        assert_eq!(
            count(&broker, "expiring"),
            Some(3),
            "expired queue kept whole"
        );
        assert!(count(&broker, "brief").is_some(), "auto-delete queue kept");
    }
    {
        let broker = open_on(&fs);
        assert_eq!(count(&broker, "expiring"), Some(3), "after a restart too");
        assert_eq!(count(&broker, "brief"), Some(3), "after a restart too");
        fs.set_free_space(None);
        broker.housekeeping(later);
        assert_eq!(
            count(&broker, "expiring"),
            None,
            "expired once the disk had room"
        );
    }
    let broker = open_on(&fs);
    assert_eq!(count(&broker, "expiring"), None, "its deletion is durable");
}
