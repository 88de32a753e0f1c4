//! Deletes dead segments on a thread of its own.
//!
//! The unlink itself is cheap, but closing the last handle of an unlinked segment makes
//! the filesystem free its blocks and drop its cached pages: about 40 ms for a 64 MiB
//! segment on this machine's ext4. Done inline by whoever released the last reference —
//! a broker thread holding the broker lock — it stalled every publish and consumer for
//! that long and was the whole p99.9 latency tail. Here it happens off every hot path,
//! one segment at a time in base order (an older segment is always unlinked before a
//! newer one, so a crash never leaves a gap at the front of the log).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::file_layer::FileSystem;
use crate::segment::Segment;

enum Job {
    Delete(Arc<Segment>),
    /// Answered once every job queued before it is done.
    Barrier(mpsc::Sender<()>),
}

pub(crate) struct Reaper {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    fs: Arc<dyn FileSystem>,
    log_dir: PathBuf,
}

impl Reaper {
    pub(crate) fn start(fs: Arc<dyn FileSystem>, log_dir: PathBuf) -> std::io::Result<Reaper> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread_fs = Arc::clone(&fs);
        let thread_dir = log_dir.clone();
        let thread = std::thread::Builder::new()
            .name("holdfast-store-reaper".to_owned())
            .spawn(move || {
                for job in queue {
                    match job {
                        Job::Delete(segment) => delete(thread_fs.as_ref(), &thread_dir, segment),
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Reaper {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
            fs,
            log_dir,
        })
    }

    /// Queues `segment` (already out of the segment table) for deletion; after
    /// [`Reaper::stop`] it is deleted at once.
    pub(crate) fn delete(&self, segment: Arc<Segment>) {
        let segment = match self.jobs.lock().as_ref() {
            Some(jobs) => match jobs.send(Job::Delete(segment)) {
                Ok(()) => return,
                Err(mpsc::SendError(Job::Delete(segment))) => segment,
                Err(_) => return,
            },
            None => segment,
        };
        delete(self.fs.as_ref(), &self.log_dir, segment);
    }

    /// Blocks until every deletion queued so far is done.
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

    /// Finishes the queued deletions and stops the thread.
    pub(crate) fn stop(&self) {
        drop(self.jobs.lock().take());
        if let Some(thread) = self.thread.lock().take()
            && thread.join().is_err()
        {
            tracing::error!("store reaper thread panicked");
        }
    }
}

fn delete(fs: &dyn FileSystem, log_dir: &std::path::Path, segment: Arc<Segment>) {
    let result = fs
        .remove_file(&segment.path)
        .and_then(|()| fs.sync_dir(log_dir));
    match result {
        Ok(()) => tracing::debug!(base = segment.base, "segment deleted"),
        Err(error) => tracing::warn!(
            segment = %segment.path.display(),
            error = %error,
            "could not delete a dead segment"
        ),
    }
    // Dropping the last handle here is what frees the file's blocks.
    drop(segment);
}
