//! Deletes dead segments on a thread of its own.
//!
//! The unlink itself is cheap, but closing the last handle of an unlinked segment makes
//! the filesystem free its blocks and drop its cached pages: about 40 ms for a 64 MiB
//! segment on this machine's ext4. Done inline by whoever released the last reference —
//! a broker thread holding the broker lock — it stalled every publish and consumer for
//! that long and was the whole p99.9 latency tail. Here it happens off every hot path.
//!
//! Two rules keep deletion from losing anything:
//! - A segment is unlinked only once the log is durable (under the store's policy) up to
//!   what was written when it died. It dies when its last message was settled, and that
//!   settlement may be a record not yet written or fsynced — a dead-letter copy, a new
//!   deduplication checkpoint — which must survive before the original goes.
//! - Segments go oldest first, and after a failed unlink (or once the store is poisoned
//!   or stopped) none is deleted any more: a newer segment gone while an older one stays
//!   would leave a gap, and the next open's recovery deletes what is dead anyway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::StorePoisoned;
use crate::file_layer::FileSystem;
use crate::segment::Segment;

enum Job {
    /// Delete `segment` once the log is durable up to `after`.
    Delete { segment: Arc<Segment>, after: u64 },
    /// Answered once every job queued before it is done.
    Barrier(mpsc::Sender<()>),
}

pub(crate) struct Reaper {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    /// Starts the thread; `durable` is the store's durable-offset watch.
    pub(crate) fn start(
        fs: Arc<dyn FileSystem>,
        log_dir: PathBuf,
        durable: watch::Receiver<Result<u64, StorePoisoned>>,
    ) -> std::io::Result<Reaper> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("holdfast-store-reaper".to_owned())
            .spawn(move || run(fs.as_ref(), &log_dir, durable, &queue))?;
        Ok(Reaper {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `segment` (already out of the segment table) for deletion once the log is
    /// durable up to `after`. After [`Reaper::stop`] the file stays for the next open.
    pub(crate) fn delete(&self, segment: Arc<Segment>, after: u64) {
        let sent = self
            .jobs
            .lock()
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::Delete { segment, after }).is_ok());
        if !sent {
            tracing::debug!("store stopped: a dead segment is left for the next open");
        }
    }

    /// Blocks until every deletion queued so far is done (or given up).
    pub(crate) fn wait_idle(&self) {
        let (done, finished) = mpsc::channel();
        let queued = self
            .jobs
            .lock()
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::Barrier(done)).is_ok());
        if queued {
            let _ = finished.recv();
        }
    }

    /// Finishes the queued jobs and stops the thread. Call it after the store's final
    /// fsync: queued deletions wait for durability.
    pub(crate) fn stop(&self) {
        drop(self.jobs.lock().take());
        if let Some(thread) = self.thread.lock().take()
            && thread.join().is_err()
        {
            tracing::error!("store reaper thread panicked");
        }
    }
}

fn run(
    fs: &dyn FileSystem,
    log_dir: &Path,
    mut durable: watch::Receiver<Result<u64, StorePoisoned>>,
    queue: &mpsc::Receiver<Job>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "segment reaper could not start; dead segments stay until the next open");
            return;
        }
    };
    // Set once deleting must stop (see the module docs).
    let mut halted = false;
    for job in queue {
        match job {
            Job::Barrier(done) => {
                let _ = done.send(());
            }
            Job::Delete { .. } if halted => {}
            Job::Delete { segment, after } => {
                // The watch's read guard is dropped at once: held across the deletion
                // it would block the flusher's next publish for as long.
                let caught_up = runtime
                    .block_on(durable.wait_for(|state| match state {
                        Ok(offset) => *offset >= after,
                        Err(_) => true,
                    }))
                    .is_ok_and(|state| state.is_ok());
                if !caught_up {
                    tracing::info!(
                        base = segment.base,
                        "store poisoned or closed: dead segments stay until the next open"
                    );
                    halted = true;
                    continue;
                }
                if let Err(error) = delete(fs, log_dir, &segment) {
                    tracing::warn!(
                        segment = %segment.path.display(),
                        error = %error,
                        "could not delete a dead segment; deletion stops until the next open"
                    );
                    halted = true;
                }
                // Dropping the handle (the last one, unless a read still holds it) is
                // what frees the file's blocks.
                drop(segment);
            }
        }
    }
}

fn delete(fs: &dyn FileSystem, log_dir: &Path, segment: &Segment) -> std::io::Result<()> {
    fs.remove_file(&segment.path)?;
    fs.sync_dir(log_dir)?;
    tracing::debug!(base = segment.base, "segment deleted");
    Ok(())
}
