//! The model: where each message may be, what each window holds, which queues exist;
//! and the checks of the broker against it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use crate::Broker;

/// Where a message is. `Dead` is the dead-letter queue or the wait for room in it (the
/// two trade places in the background as the housekeeping thread retries moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Place {
    Work,
    Limited,
    Unique,
    Exclusive,
    Dead,
    Gone,
}

impl Place {
    pub(super) fn queue(self) -> Option<&'static str> {
        match self {
            Place::Work => Some("work"),
            Place::Limited => Some("limited"),
            Place::Unique => Some("unique"),
            Place::Exclusive => Some("exclusive"),
            Place::Dead => Some("dead"),
            Place::Gone => None,
        }
    }
}

/// Where `dead` gets room: it takes one, refuses more, and has no dead-letter exchange.
pub(super) const DEAD_CAPACITY: i64 = 1;
/// Not a divisor of the page size, so page boundaries fall inside records.
pub(super) const BODY_SIZE: usize = 1500;
/// The length limit of the queue behind the deduplicating exchange.
pub(super) const LIMITED_CAPACITY: usize = 3;

/// One message's life as the model knows it.
#[derive(Debug)]
pub(super) struct Life {
    pub(super) persistent: bool,
    /// The places since the log was last known durable; the last is where it is now.
    pub(super) places: Vec<Place>,
}

impl Life {
    pub(super) fn now(&self) -> Place {
        *self.places.last().expect("a message is somewhere")
    }

    pub(super) fn moves_to(&mut self, place: Place) {
        if self.now() != place {
            self.places.push(place);
        }
    }
}

/// What the broker should hold.
#[derive(Default)]
pub(super) struct Model {
    /// `fsync always`: a confirm is a durable point. Under `never` only a definition
    /// record (fsynced at once, with everything before it) or a sync is one.
    pub(super) lives: BTreeMap<u32, Life>,
    /// Deliveries not settled: tag, message, the queue it came from.
    pub(super) unacked: Vec<(u64, u32, Place)>,
    pub(super) always: bool,
    /// Keys each window holds, and whether that is durable yet.
    pub(super) exchange_window: BTreeMap<u8, bool>,
    pub(super) unique_window: BTreeMap<u8, bool>,
    pub(super) exclusive_declared: bool,
    /// Durable queues that must exist and stay empty.
    pub(super) empty_queues: Vec<String>,
    /// Queues whose declare failed: they must not exist.
    pub(super) absent_queues: Vec<String>,
    pub(super) next_id: u32,
    pub(super) next_queue: u32,
}

impl Model {
    pub(super) fn publish(&mut self, persistent: bool, place: Place) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.lives.insert(
            id,
            Life {
                persistent,
                places: vec![Place::Gone, place],
            },
        );
        id
    }

    /// Everything appended so far is durable: a later confirm covers it.
    pub(super) fn durable_point(&mut self) {
        for life in self.lives.values_mut() {
            let now = life.now();
            life.places = vec![now];
        }
        for durable in self
            .exchange_window
            .values_mut()
            .chain(self.unique_window.values_mut())
        {
            *durable = true;
        }
    }

    /// A publisher confirm arrived.
    pub(super) fn confirmed(&mut self) {
        if self.always {
            self.durable_point();
        }
    }

    pub(super) fn ready_in(&self, place: Place) -> Vec<u32> {
        let unacked: BTreeSet<u32> = self.unacked.iter().map(|(_, id, _)| *id).collect();
        self.lives
            .iter()
            .filter(|(id, life)| life.now() == place && !unacked.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// After a restart: every message is in one place it may be in, once; what the broker
/// recovered is durable from now on, and the model takes it as the truth.
pub(super) fn check_recovered(
    model: &mut Model,
    seen: &BTreeMap<String, Vec<u32>>,
    windows: &(BTreeSet<u8>, BTreeSet<u8>),
    crashed: bool,
) -> Result<(), TestCaseError> {
    for (name, window, recovered) in [
        ("exchange", &mut model.exchange_window, &windows.0),
        ("queue", &mut model.unique_window, &windows.1),
    ] {
        for (key, durable) in window.iter() {
            prop_assert!(
                recovered.contains(key) || (crashed && !durable),
                "the {name} window forgot key {key}"
            );
        }
        for key in recovered {
            prop_assert!(
                window.contains_key(key),
                "the {name} window recalls key {key} it never took"
            );
        }
        *window = recovered.iter().map(|key| (*key, true)).collect();
    }
    let mut found: HashMap<u32, Place> = HashMap::new();
    for (queue, ids) in seen {
        let place = [
            Place::Work,
            Place::Limited,
            Place::Unique,
            Place::Exclusive,
            Place::Dead,
        ]
        .into_iter()
        .find(|place| place.queue() == Some(queue.as_str()));
        for id in ids {
            let place = place.ok_or_else(|| {
                TestCaseError::fail(format!("message {id} recovered into queue '{queue}'"))
            })?;
            if let Some(earlier) = found.insert(*id, place) {
                prop_assert!(
                    false,
                    "message {id} recovered twice: {earlier:?} and {place:?}"
                );
            }
        }
    }
    for (id, life) in &mut model.lives {
        let now = found.get(id).copied().unwrap_or(Place::Gone);
        let possible: Vec<Place> = if !life.persistent || !crashed {
            // A clean stop makes everything durable; transient messages never return.
            let expected = if life.persistent {
                life.now()
            } else {
                Place::Gone
            };
            vec![if expected == Place::Exclusive {
                Place::Gone
            } else {
                expected
            }]
        } else {
            life.places
                .iter()
                .map(|&p| {
                    if p == Place::Exclusive {
                        Place::Gone
                    } else {
                        p
                    }
                })
                .collect()
        };
        prop_assert!(
            possible.contains(&now),
            "message {id} recovered in {now:?}; it may only be in {possible:?} (history {:?})",
            life.places
        );
        life.places = vec![now];
    }
    model.unacked.clear();
    model.exclusive_declared = false;
    Ok(())
}

/// Without a restart the broker holds exactly the model's messages, in publish order.
pub(super) fn check_steady(
    model: &Model,
    seen: &BTreeMap<String, Vec<u32>>,
) -> Result<(), TestCaseError> {
    for place in [Place::Work, Place::Limited, Place::Unique, Place::Exclusive] {
        let name = place.queue().expect("a queue");
        let held = seen.get(name).cloned().unwrap_or_default();
        prop_assert_eq!(&held, &model.ready_in(place), "queue '{}'", name);
    }
    let mut dead = seen.get("dead").cloned().unwrap_or_default();
    dead.sort_unstable();
    prop_assert_eq!(
        dead,
        model.ready_in(Place::Dead),
        "dead letters (queued or waiting)"
    );
    for name in &model.empty_queues {
        prop_assert_eq!(
            seen.get(name).map_or(0, Vec::len),
            0,
            "queue '{}' got messages",
            name
        );
    }
    Ok(())
}

pub(super) fn check_declared(model: &Model, broker: &Broker) -> Result<(), TestCaseError> {
    for name in &model.empty_queues {
        prop_assert!(
            broker.queue_counts("/", name).is_some(),
            "queue '{}' lost",
            name
        );
    }
    for name in &model.absent_queues {
        prop_assert!(
            broker.queue_counts("/", name).is_none(),
            "queue '{}' exists although its declare failed",
            name
        );
    }
    Ok(())
}
