//! A model-based property test of the whole promise: random operations against a broker
//! on the store's simulated disk, with clean restarts and power cuts (plain and torn) in
//! between, checked after every step against a model of where each message must be.
//!
//! The topology exercises what the promise depends on: a queue dead-lettering into a
//! full `reject-publish` target, a deduplicating exchange in front of a length-limited
//! queue, a queue-level deduplication window, an exclusive durable queue, declares on a
//! full disk and abrupt disconnects. The model tracks, for every message, the places it
//! has been since the last moment the log was known durable: after a power cut it must
//! be in one of them, exactly once; without one it must be exactly where the model says.
//!
//! [`expected`] is the model and its checks, [`node`] the broker on its simulated disk.

mod expected;
mod node;

use std::collections::BTreeMap;
use std::sync::Arc;

use holdfast_codec::{AMQPValue, FieldTable};
use holdfast_store::FsyncPolicy;
use holdfast_store::sim::SimFileSystem;
use proptest::prelude::*;

use super::connect;
use crate::{Disposition, QueueDeclare};
use expected::{LIMITED_CAPACITY, Model, Place, check_declared, check_recovered, check_steady};
use node::{Node, arguments, await_durable, declare, declare_topology, observe, publish, windows};

#[derive(Debug, Clone)]
enum Op {
    /// Into `work`; a persistent one may be left unconfirmed.
    Publish {
        persistent: bool,
        confirm: bool,
    },
    /// Through the deduplicating exchange into `limited`, with key `key`.
    PublishDeduplicated {
        key: u8,
    },
    /// Into `unique`, whose own window drops repeated keys.
    PublishUnique {
        key: u8,
    },
    /// Into the exclusive durable queue of a second connection.
    PublishExclusive,
    Get(Place),
    Ack(usize),
    Reject {
        index: usize,
        requeue: bool,
    },
    /// The consuming connection goes without a word: what it had not acked returns.
    Disconnect,
    /// The exclusive queue's connection goes: the queue and its messages with it.
    DisconnectExclusive,
    /// A durable queue declared when the disk is full: durable, or no trace. A large
    /// one (30 KB of arguments) often does not fit in what the active segment has left.
    DeclareOnFullDisk {
        large: bool,
    },
    /// A durable queue that nothing is published to: it must stay empty.
    DeclareFresh,
    Restart,
    PowerCut {
        torn: bool,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let queue = prop_oneof![
        3 => Just(Place::Work),
        1 => Just(Place::Limited),
        1 => Just(Place::Unique),
        1 => Just(Place::Dead),
    ];
    prop_oneof![
        4 => (any::<bool>(), any::<bool>()).prop_map(|(persistent, confirm)| Op::Publish { persistent, confirm }),
        3 => (0u8..6).prop_map(|key| Op::PublishDeduplicated { key }),
        2 => (0u8..4).prop_map(|key| Op::PublishUnique { key }),
        1 => Just(Op::PublishExclusive),
        5 => queue.prop_map(Op::Get),
        3 => (0usize..8).prop_map(Op::Ack),
        4 => (0usize..8, any::<bool>()).prop_map(|(index, requeue)| Op::Reject { index, requeue }),
        1 => Just(Op::Disconnect),
        1 => Just(Op::DisconnectExclusive),
        2 => any::<bool>().prop_map(|large| Op::DeclareOnFullDisk { large }),
        1 => Just(Op::DeclareFresh),
        1 => Just(Op::Restart),
        2 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::PowerCut { torn, seed }),
    ]
}

#[allow(clippy::too_many_lines)]
fn step(
    node: &mut Node,
    model: &mut Model,
    op: Op,
    coverage: &Coverage,
) -> Result<(), TestCaseError> {
    let broker = Arc::clone(&node.broker);
    let connection = node.consumer.connection;
    match op {
        Op::Publish {
            persistent,
            confirm,
        } => {
            let id = model.publish(persistent, Place::Work);
            let outcome = publish(&broker, connection, "", "work", id, persistent, None);
            prop_assert!(outcome.routed && !outcome.rejected);
            if let Some(end) = outcome.durable_end.filter(|_| confirm) {
                await_durable(&broker, end);
                model.confirmed();
            }
        }
        Op::PublishDeduplicated { key } => {
            let expected = if model.exchange_window.contains_key(&key) {
                "duplicate"
            } else if model.ready_in(Place::Limited).len() >= LIMITED_CAPACITY {
                "refused"
            } else {
                "taken"
            };
            let id = model.next_id;
            let before = observe(&broker).remove("limited").unwrap_or_default();
            let outcome = publish(&broker, connection, "once", "", id, true, Some(key));
            let after = observe(&broker).remove("limited").unwrap_or_default();
            let got = match (outcome.rejected, after.len() > before.len()) {
                (true, _) => "refused",
                (false, true) => "taken",
                (false, false) => "duplicate",
            };
            prop_assert_eq!(got, expected, "publish of key {} through the exchange", key);
            coverage.count(match got {
                "taken" => Event::ExchangeTook,
                "refused" => Event::ExchangeRefused,
                _ => Event::ExchangeDuplicate,
            });
            if got == "taken" {
                model.publish(true, Place::Limited);
                model.exchange_window.insert(key, false);
                await_durable(&broker, outcome.durable_end.expect("persistent"));
                model.confirmed();
            }
        }
        Op::PublishUnique { key } => {
            let duplicate = model.unique_window.contains_key(&key);
            let id = model.next_id;
            let outcome = publish(&broker, connection, "", "unique", id, true, Some(key));
            prop_assert!(!outcome.rejected);
            if duplicate {
                coverage.count(Event::QueueDuplicate);
            } else {
                model.publish(true, Place::Unique);
                model.unique_window.insert(key, false);
                await_durable(&broker, outcome.durable_end.expect("persistent"));
                model.confirmed();
            }
        }
        Op::PublishExclusive => {
            let owner = match node.exclusive_owner {
                Some(owner) => owner,
                None => {
                    let (owner, _events) = connect(&broker);
                    node.exclusive_owner = Some(owner);
                    owner
                }
            };
            if !model.exclusive_declared {
                broker
                    .queue_declare(
                        owner,
                        QueueDeclare {
                            name: "exclusive".into(),
                            durable: true,
                            exclusive: true,
                            ..QueueDeclare::default()
                        },
                    )
                    .expect("exclusive declare");
                model.exclusive_declared = true;
            }
            let id = model.publish(true, Place::Exclusive);
            let outcome = publish(&broker, owner, "", "exclusive", id, true, None);
            await_durable(&broker, outcome.durable_end.expect("persistent"));
            model.confirmed();
        }
        Op::Get(place) => {
            let queue = place.queue().expect("a queue");
            let got = broker.basic_get(node.consumer, queue, false).expect("get");
            match got {
                Some(ok) => {
                    let id = super::body_id(&broker, ok.message);
                    if place == Place::Dead {
                        // Which dead letter is queued and which waits depends on timing.
                        prop_assert!(model.ready_in(Place::Dead).contains(&id));
                    } else {
                        prop_assert_eq!(Some(id), model.ready_in(place).first().copied());
                    }
                    model.unacked.push((ok.delivery_tag, id, place));
                }
                None if place == Place::Dead => {}
                None => prop_assert!(
                    model.ready_in(place).is_empty(),
                    "get from '{}' found nothing",
                    queue
                ),
            }
        }
        Op::Ack(index) if !model.unacked.is_empty() => {
            let (tag, id, _) = model.unacked.remove(index % model.unacked.len());
            broker
                .basic_settle(node.consumer, tag, false, Disposition::Ack)
                .expect("ack");
            model
                .lives
                .get_mut(&id)
                .expect("known")
                .moves_to(Place::Gone);
        }
        Op::Reject { index, requeue } if !model.unacked.is_empty() => {
            let (tag, id, place) = model.unacked.remove(index % model.unacked.len());
            let disposition = if requeue {
                Disposition::Retry
            } else {
                Disposition::Reject
            };
            broker
                .basic_settle(node.consumer, tag, false, disposition)
                .expect("reject");
            if !requeue {
                // Only `work` has a dead-letter exchange; elsewhere a reject drops.
                let to = if place == Place::Work {
                    Place::Dead
                } else {
                    Place::Gone
                };
                model.lives.get_mut(&id).expect("known").moves_to(to);
            }
        }
        Op::Ack(_) | Op::Reject { .. } => {}
        Op::Disconnect => {
            broker.disconnect(connection);
            model.unacked.clear();
            node.reconnect();
        }
        Op::DisconnectExclusive => {
            if let Some(owner) = node.exclusive_owner.take() {
                broker.disconnect(owner);
                for life in model.lives.values_mut() {
                    if life.now() == Place::Exclusive {
                        life.moves_to(Place::Gone);
                    }
                }
                model.exclusive_declared = false;
            }
        }
        Op::DeclareOnFullDisk { large } => {
            let name = format!("full-{}", model.next_queue);
            model.next_queue += 1;
            // Acks made so far are written first, so the full disk meets only the declare.
            broker.store().sync_all().expect("sync");
            model.durable_point();
            node.fs.set_free_space(Some(0));
            let declared = broker.queue_declare(
                connection,
                QueueDeclare {
                    name: name.clone(),
                    durable: true,
                    arguments: if large {
                        arguments(&[("comment", AMQPValue::LongString("c".repeat(30_000).into()))])
                    } else {
                        FieldTable::default()
                    },
                    ..QueueDeclare::default()
                },
            );
            node.fs.set_free_space(None);
            // declare-ok leaves only once the record is durable.
            await_durable(&broker, broker.definitions_end());
            match declared {
                Ok(_) => {
                    coverage.count(Event::FullDiskDeclareTook);
                    model.empty_queues.push(name);
                }
                Err(refused) => {
                    coverage.count(Event::FullDiskDeclareRefused);
                    prop_assert_eq!(refused.code, crate::ReplyCode::InternalError);
                    model.absent_queues.push(name);
                }
            }
        }
        Op::DeclareFresh => {
            let name = format!("fresh-{}", model.next_queue);
            model.next_queue += 1;
            declare(&broker, connection, &name, FieldTable::default());
            await_durable(&broker, broker.definitions_end());
            // A definition record is fsynced (or confirmed) with everything before it.
            model.durable_point();
            model.empty_queues.push(name);
        }
        Op::Restart | Op::PowerCut { .. } => unreachable!("restarts replace the node"),
    }
    Ok(())
}

/// What a run must have made happen, or it proves nothing about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    DeadLetterWaited,
    ExchangeTook,
    ExchangeRefused,
    ExchangeDuplicate,
    QueueDuplicate,
    FullDiskDeclareTook,
    FullDiskDeclareRefused,
    PowerCutWithExclusiveMessages,
    TornTailCut,
}

/// How often each [`Event`] happened over all cases.
#[derive(Default)]
struct Coverage(std::sync::Mutex<BTreeMap<Event, u64>>);

impl Coverage {
    fn count(&self, event: Event) {
        *self.0.lock().expect("coverage").entry(event).or_default() += 1;
    }
}

fn run_case(fsync: FsyncPolicy, ops: Vec<Op>, coverage: &Coverage) -> Result<(), TestCaseError> {
    let mut node = Node::start(fsync, SimFileSystem::default());
    declare_topology(&node.broker, node.consumer.connection);
    node.broker.store().sync_all().expect("sync");
    let mut model = Model {
        always: fsync == FsyncPolicy::Always,
        ..Model::default()
    };
    for op in ops {
        if matches!(op, Op::Restart | Op::PowerCut { .. }) {
            if matches!(op, Op::PowerCut { .. })
                && model
                    .lives
                    .values()
                    .any(|life| life.now() == Place::Exclusive)
            {
                coverage.count(Event::PowerCutWithExclusiveMessages);
            }
            let crashed;
            (node, crashed) = node.restart(&op, coverage);
            let windows = windows(&node.broker);
            check_recovered(&mut model, &observe(&node.broker), &windows, crashed)?;
        } else {
            step(&mut node, &mut model, op, coverage)?;
        }
        let seen = observe(&node.broker);
        if node.broker.inspect(|state| {
            state
                .queues
                .values()
                .any(|queue| !queue.dead_letter_pending.is_empty())
        }) {
            coverage.count(Event::DeadLetterWaited);
        }
        check_steady(&model, &seen)?;
        check_declared(&model, &node.broker)?;
    }
    Ok(())
}

/// After any sequence of operations, restarts and power cuts, under `fsync always` and
/// `never`, every message is where the model allows: nothing confirmed is lost, nothing
/// refused is remembered, nothing acked durably returns, nothing lands in a queue it
/// was not sent to, and no dead letter is dropped for want of room. The run must also
/// have met each [`Event`], so that it cannot pass by never reaching a case.
#[test]
fn the_broker_keeps_its_promise_like_the_model() {
    let config = ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let coverage = Coverage::default();
    let cases = (
        prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::Never)],
        proptest::collection::vec(op(), 1..80),
    );
    if let Err(failure) = runner.run(&cases, |(fsync, ops)| run_case(fsync, ops, &coverage)) {
        panic!("{failure}");
    }
    let met = coverage.0.lock().expect("coverage").clone();
    for event in [
        Event::DeadLetterWaited,
        Event::ExchangeTook,
        Event::ExchangeRefused,
        Event::ExchangeDuplicate,
        Event::QueueDuplicate,
        Event::FullDiskDeclareTook,
        Event::FullDiskDeclareRefused,
        Event::PowerCutWithExclusiveMessages,
        Event::TornTailCut,
    ] {
        assert!(met.contains_key(&event), "no case met {event:?}: {met:?}");
    }
    eprintln!("model test coverage: {met:?}");
}
