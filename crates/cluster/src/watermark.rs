//! The confirm watermark of a leader in sync mode: how far the log is durable on the
//! leader AND on every in-sync follower. A publisher confirm (and every reply that
//! promises durability) for offset `o` may leave only once the watermark reaches `o`.
//! The node hands it to the broker (`Broker::use_confirm_watermark`), which hands it to
//! the connections; the broker is not a dependency of this crate.

use std::sync::Arc;

use holdfast_store::StorePoisoned;
use tokio::sync::{Notify, watch};

/// Where a confirm may be sent up to, or the poison that stops confirms for good.
pub type Watermark = watch::Receiver<Result<u64, StorePoisoned>>;

/// The minimum of the leader's own durable offset (`local`, from `Store::durable`) and
/// each in-sync follower's acknowledged durable end, kept up to date by a task on the
/// current runtime. A poisoned local store poisons the watermark. With no followers it
/// is the local offset. A follower that stops acknowledging holds it back: confirms
/// stall, which is what sync mode promises (shrinking the in-sync set is the
/// coordinator's job, fenced in etcd, and not built yet).
#[must_use]
pub fn confirm_watermark(mut local: Watermark, in_sync: Vec<watch::Receiver<u64>>) -> Watermark {
    let changed = Arc::new(Notify::new());
    for mut follower in in_sync.iter().cloned() {
        let changed = Arc::clone(&changed);
        tokio::spawn(async move {
            while follower.changed().await.is_ok() {
                changed.notify_one();
            }
        });
    }
    let minimum = move |local: &Watermark| -> Result<u64, StorePoisoned> {
        let own = local.borrow().clone()?;
        Ok(in_sync.iter().map(|f| *f.borrow()).fold(own, u64::min))
    };
    let (tx, rx) = watch::channel(minimum(&local));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = changed.notified() => {}
            }
            let now = minimum(&local);
            tx.send_if_modified(|at| {
                let moved = *at != now;
                // A poisoned watermark stays poisoned.
                if moved && at.is_ok() {
                    *at = now;
                }
                moved
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn the_watermark_is_the_slowest_of_the_leader_and_its_followers() {
        let (local, local_rx) = watch::channel(Ok(100));
        let (a, a_rx) = watch::channel(40);
        let (b, b_rx) = watch::channel(70);
        let watermark = confirm_watermark(local_rx, vec![a_rx, b_rx]);
        assert_eq!(*watermark.borrow(), Ok(40));
        a.send_replace(90);
        settle().await;
        assert_eq!(*watermark.borrow(), Ok(70));
        b.send_replace(200);
        settle().await;
        assert_eq!(
            *watermark.borrow(),
            Ok(90),
            "the leader's fsync bounds it too"
        );
        let _previous = local.send_replace(Ok(150));
        a.send_replace(300);
        settle().await;
        assert_eq!(*watermark.borrow(), Ok(150));
        let _previous = local.send_replace(Err(StorePoisoned {
            message: "fsync failed".into(),
        }));
        settle().await;
        assert!(watermark.borrow().is_err(), "poison stops confirms");
        let _previous = local.send_replace(Ok(500));
        settle().await;
        assert!(watermark.borrow().is_err(), "and for good");
    }

    #[tokio::test]
    async fn a_silent_follower_holds_confirms_back() {
        let (local, local_rx) = watch::channel(Ok(10));
        let (_silent, silent_rx) = watch::channel(10);
        let watermark = confirm_watermark(local_rx, vec![silent_rx]);
        let _previous = local.send_replace(Ok(1000));
        settle().await;
        assert_eq!(*watermark.borrow(), Ok(10));
        let alone = confirm_watermark(local.subscribe(), Vec::new());
        assert_eq!(*alone.borrow(), Ok(1000), "no followers: the local offset");
    }
}
