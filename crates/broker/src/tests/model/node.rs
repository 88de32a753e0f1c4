//! The broker under test on its simulated disk: the topology, publishing, waiting for
//! confirms, restarts and power cuts, and reading back what it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_codec::{AMQPValue, FieldTable};
use holdfast_store::sim::SimFileSystem;
use holdfast_store::{FsyncPolicy, Store, StoreConfig};
use rand::SeedableRng;

use super::super::{NO_PROPERTIES, connect};
use super::expected::{BODY_SIZE, DEAD_CAPACITY, LIMITED_CAPACITY};
use super::{Coverage, Event, Op};
use crate::{
    Broker, BrokerConfig, ChannelKey, ConnectionId, PublishOutcome, PublishRequest, QueueDeclare,
};

/// Where the broker holds each message: queue name → ids in queue order (ready), plus
/// `dead` for the ready ids of the dead-letter queue and the dead letters still waiting.
pub(super) fn observe(broker: &Broker) -> BTreeMap<String, Vec<u32>> {
    let refs = broker.inspect(|state| {
        let mut refs: BTreeMap<String, Vec<crate::MessageRef>> = BTreeMap::new();
        for queue in state.queues.values() {
            refs.entry(queue.name.clone())
                .or_default()
                .extend(queue.ready.iter().map(|entry| entry.message));
            if !queue.dead_letter_pending.is_empty() {
                refs.entry("dead".into())
                    .or_default()
                    .extend(queue.dead_letter_pending.iter().map(|p| p.entry.message));
            }
            assert!(queue.held.is_empty(), "no queue here delays retries");
        }
        refs
    });
    refs.into_iter()
        .map(|(name, messages)| {
            let ids = messages
                .into_iter()
                .map(|message| super::super::body_id(broker, message))
                .collect();
            (name, ids)
        })
        .collect()
}

/// The keys the deduplicating exchange's and queue's windows hold.
pub(super) fn windows(broker: &Broker) -> (BTreeSet<u8>, BTreeSet<u8>) {
    broker.inspect(|state| {
        let keys = |window: Option<&crate::dedup::DedupWindow>| -> BTreeSet<u8> {
            window
                .cloned()
                .map(|mut window| window.entries(0).map(|(key, _)| key[0]).collect())
                .unwrap_or_default()
        };
        let vhost = &state.vhosts[crate::DEFAULT_VHOST];
        let exchange = keys(vhost.exchanges.get("once").and_then(|e| e.dedup.as_ref()));
        let queue = keys(
            vhost
                .queues
                .get("unique")
                .and_then(|id| state.queues.get(id))
                .and_then(|q| q.dedup.as_ref()),
        );
        (exchange, queue)
    })
}

pub(super) fn arguments(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert((*name).into(), value.clone());
    }
    table
}

pub(super) fn declare(broker: &Broker, connection: ConnectionId, name: &str, args: FieldTable) {
    broker
        .queue_declare(
            connection,
            QueueDeclare {
                name: name.into(),
                durable: true,
                arguments: args,
                ..QueueDeclare::default()
            },
        )
        .expect("declare");
}

pub(super) fn declare_topology(broker: &Broker, connection: ConnectionId) {
    let none = FieldTable::default;
    broker
        .exchange_declare(
            connection,
            "dlx",
            "fanout",
            false,
            true,
            false,
            false,
            none(),
        )
        .expect("dlx");
    declare(
        broker,
        connection,
        "dead",
        arguments(&[
            ("x-max-length", AMQPValue::LongLongInt(DEAD_CAPACITY)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    );
    broker
        .queue_binding(connection, true, "dead", "dlx", "", none())
        .expect("bind dead");
    declare(
        broker,
        connection,
        "work",
        arguments(&[(
            "x-dead-letter-exchange",
            AMQPValue::LongString("dlx".into()),
        )]),
    );
    let deduplicating = arguments(&[("x-message-deduplication", AMQPValue::Boolean(true))]);
    broker
        .exchange_declare(
            connection,
            "once",
            "fanout",
            false,
            true,
            false,
            false,
            deduplicating.clone(),
        )
        .expect("deduplicating exchange");
    declare(
        broker,
        connection,
        "limited",
        arguments(&[
            (
                "x-max-length",
                AMQPValue::LongLongInt(LIMITED_CAPACITY as i64),
            ),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    );
    broker
        .queue_binding(connection, true, "limited", "once", "", none())
        .expect("bind limited");
    declare(broker, connection, "unique", deduplicating);
}

pub(super) fn publish(
    broker: &Broker,
    connection: ConnectionId,
    exchange: &str,
    queue: &str,
    id: u32,
    persistent: bool,
    key: Option<u8>,
) -> PublishOutcome {
    broker
        .basic_publish(
            connection,
            &PublishRequest {
                exchange: exchange.into(),
                routing_key: queue.into(),
                persistent,
                headers: None,
                // The properties say it too: a dead-letter copy takes its delivery
                // mode from them, as from any client's message.
                properties: if persistent {
                    holdfast_codec::encode_properties(
                        &holdfast_codec::basic::AMQPProperties::default().with_delivery_mode(2),
                    )
                } else {
                    Bytes::from_static(NO_PROPERTIES)
                },
                body: body(id),
                expiration: None,
                dedup_key: key.map(|key| Bytes::copy_from_slice(&[key])),
            },
        )
        .expect("publish")
}

/// A message body: its id, then padding, so that records cross page boundaries (where
/// a torn write-back cuts) and segments fill and roll.
pub(super) fn body(id: u32) -> Bytes {
    let mut body = vec![0x5a; BODY_SIZE];
    body[..4].copy_from_slice(&id.to_be_bytes());
    Bytes::from(body)
}

/// Blocks until the log is durable past `end`, as a publisher confirm would.
pub(super) fn await_durable(broker: &Broker, end: u64) {
    broker.store().request_durable(end);
    let durable = broker.store().durable();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match &*durable.borrow() {
            Ok(at) if *at >= end => return,
            Ok(_) => {}
            Err(poisoned) => panic!("store poisoned: {}", poisoned.message),
        }
        assert!(Instant::now() < deadline, "no confirm within 10 s");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The broker under test, its disk, and its connections.
pub(super) struct Node {
    pub(super) fsync: FsyncPolicy,
    pub(super) fs: SimFileSystem,
    pub(super) broker: Arc<Broker>,
    pub(super) consumer: ChannelKey,
    pub(super) exclusive_owner: Option<ConnectionId>,
}

impl Node {
    pub(super) fn start(fsync: FsyncPolicy, fs: SimFileSystem) -> Node {
        let on = fs.clone();
        let config = BrokerConfig::new(StoreConfig {
            dir: "/sim".into(),
            segment_size: 64 * 1024,
            fsync,
        });
        let store_config = config.store.clone();
        let broker = Broker::open_with_store(config, move |visit| {
            Store::open_on(&on, store_config, visit)
        })
        .expect("broker opens");
        let (connection, _events) = connect(&broker);
        let consumer = ChannelKey {
            connection,
            channel: 1,
        };
        broker.channel_open(consumer);
        Node {
            fsync,
            fs,
            broker,
            consumer,
            exclusive_owner: None,
        }
    }

    pub(super) fn reconnect(&mut self) {
        let (connection, _events) = connect(&self.broker);
        self.consumer = ChannelKey {
            connection,
            channel: 1,
        };
        self.broker.channel_open(self.consumer);
    }
}

impl Node {
    /// A clean stop and start, or a power cut (plain or torn) and a start on what the
    /// disk kept.
    pub(super) fn restart(self, op: &Op, coverage: &Coverage) -> (Node, bool) {
        let survivor = match *op {
            Op::PowerCut { torn: true, seed } => self
                .fs
                .power_loss_torn(&mut rand::rngs::StdRng::seed_from_u64(seed)),
            Op::PowerCut { torn: false, .. } => self.fs.power_loss(),
            _ => self.fs.clone(),
        };
        // The housekeeping thread may hold the broker for a moment: the old store must
        // be shut down before the new one opens on the same disk.
        let gone = Arc::downgrade(&self.broker);
        let fsync = self.fsync;
        drop(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        while gone.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the old broker was never dropped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let node = Node::start(fsync, survivor);
        if node.broker.store().stats().torn_bytes_cut_at_open > 0 {
            coverage.count(Event::TornTailCut);
        }
        (node, matches!(op, Op::PowerCut { .. }))
    }
}
