//! Static replication, the first step of the cluster: one leader and one follower chosen
//! by configuration, with no automatic failover. The leader ships its commit log to the
//! follower that connects; in sync mode its confirms wait until the follower has the
//! message durable too. The follower keeps a byte-for-byte copy of the leader's log and
//! serves no AMQP. If the leader's machine is lost, a person starts a server on the
//! follower's data directory: it opens that copy like any data directory, with every
//! message the leader confirmed in sync mode.
//!
//! Without coordination there is one epoch ([`STATIC_EPOCH`]); electing leaders, epochs
//! and the in-sync set in etcd come with the cluster.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use holdfast_broker::Broker;
use holdfast_cluster::{follower, leader, watermark};
use holdfast_store::{Store, StoreConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ReplicationMode;

/// The epoch of static replication: one leader for the life of the data.
pub const STATIC_EPOCH: u64 = 1;
/// How long a follower waits before connecting again after a link ended.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// Starts accepting the follower on `listen`, and in sync mode makes the broker's
/// confirms wait for it. Call before serving AMQP.
///
/// # Errors
/// When the address cannot be bound.
pub async fn lead(
    listen: std::net::SocketAddr,
    mode: ReplicationMode,
    broker: &Broker,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for followers on {listen}"))?;
    // Tests and scripts read this line to learn the port when asked for port 0.
    info!(replication = %listener.local_addr()?, mode = ?mode, "accepting a follower");
    let (acked, follower_durable) = watch::channel(0);
    if mode == ReplicationMode::Sync {
        let confirmed =
            watermark::confirm_watermark(broker.store().durable(), vec![follower_durable]);
        if broker.use_confirm_watermark(confirmed).is_err() {
            anyhow::bail!("the broker's confirm watermark was set already");
        }
    }
    let acked = Arc::new(acked);
    let store = broker.store().clone();
    tokio::spawn(async move {
        // One follower at a time: a second one waits until the first link ends.
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(cause = %err, "accepting a follower failed");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    continue;
                }
            };
            info!(%peer, "follower connected");
            let ended =
                leader::serve(socket, store.clone(), STATIC_EPOCH, Arc::clone(&acked)).await;
            warn!(%peer, outcome = ?ended, "follower link ended");
        }
    });
    Ok(())
}

/// Runs a follower of `leader` on the data directory of `store_config` until `stop`
/// resolves; connects again whenever the link ends.
///
/// # Errors
/// When the data directory cannot be opened.
pub async fn follow(
    leader: &str,
    store_config: StoreConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = store_config.dir.clone();
    // The copy must keep every segment: nothing on a follower references records yet,
    // so garbage collection (which `Broker::open` starts) is never enabled here.
    let store = Store::open(store_config, |_, _| {})
        .with_context(|| format!("cannot open data directory {}", dir.display()))?;
    info!(%leader, log_end = store.stats().written, "following");
    let links = async {
        loop {
            match TcpStream::connect(leader).await {
                Ok(socket) => {
                    info!(%leader, "connected to the leader");
                    let ended = follower::follow(socket, store.clone(), STATIC_EPOCH).await;
                    warn!(%leader, outcome = ?ended, "link to the leader ended");
                }
                Err(err) => warn!(%leader, cause = %err, "cannot reach the leader"),
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    };
    tokio::select! {
        () = links => {}
        () = stop => info!("stopping the follower"),
    }
    store.shutdown().context("closing the store")?;
    Ok(())
}
