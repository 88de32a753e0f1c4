//! Replication of the commit log: a leader ships its log's own records, byte for byte
//! with their CRCs and positions, to followers that append them at the same positions
//! and acknowledge what they made durable.
//!
//! This crate holds the link between one leader and one follower ([`leader::serve`] and
//! [`follower::follow`]) over the frames of [`frame`], and the sync-mode confirm
//! watermark ([`watermark::confirm_watermark`]). The link fences by epoch: either side
//! refuses an epoch older than one it has seen. The binary uses the crate for static
//! replication (one leader, one follower, manual promotion).
//!
//! Not built yet: coordination in etcd (leases, epochs taken in a transaction, the
//! in-sync set and its minimum), failover, truncation of a rejoining follower whose log
//! runs past the leader's, catch-up from segments the leader has deleted.

pub mod follower;
pub mod frame;
pub mod leader;
pub mod watermark;

/// What ends a replication link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed or closed.
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a frame of this protocol.
    #[error("malformed replication frame: {0}")]
    Malformed(String),
    /// The peer's epoch is older than one this side has seen: it is a deposed leader.
    #[error("frame of epoch {got} refused: epoch {seen} has been seen")]
    StaleEpoch {
        /// The epoch the frame carried.
        got: u64,
        /// The newest epoch this side knows.
        seen: u64,
    },
    /// The follower's log runs past the leader's: it must be cut back first, which is
    /// not built yet.
    #[error("follower log ends at {follower}, past the leader's end {leader}")]
    FollowerAhead {
        /// Where the follower's log ends.
        follower: u64,
        /// Where the leader's log ends.
        leader: u64,
    },
    /// The peer refused the link, saying why.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The local store failed or refused a record.
    #[error("store: {0}")]
    Store(#[from] holdfast_store::StoreError),
}
