//! Durability: the flusher thread writes what is pending and fsyncs (group commit),
//! publishes the durable offset, and poisons the store when an fsync fails.

use super::*;

impl Core {
    /// Writes what is pending and fsyncs the active segment (and the log directory when a
    /// roll left its entry unsynced), with `writer` released during the fsync, then
    /// advances `synced` and publishes: the synced offset under `Always`, the offset
    /// handed to the OS under the other policies.
    pub(super) fn sync_locked(
        &self,
        writer: &mut MutexGuard<'_, Writer>,
    ) -> Result<(), StoreError> {
        self.flush_pending(writer)?;
        let target = writer.written;
        let file = Arc::clone(&writer.active.file);
        let active_base = writer.active.base;
        let sync_dir = writer.unsynced_dir;
        let result = MutexGuard::unlocked(writer, || {
            self.sync_file(file.as_ref())?;
            if sync_dir {
                self.fs.sync_dir(&self.log_dir)?;
            }
            Ok(())
        });
        if let Err(error) = result {
            return Err(self.poison(
                writer,
                "fsyncing a segment (or the log directory after a roll)",
                error,
            ));
        }
        // A roll meanwhile synced this directory entry itself and set the flag anew for
        // the segment after it.
        if sync_dir && writer.active.base == active_base {
            writer.unsynced_dir = false;
        }
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        if target > writer.synced {
            writer.synced = target;
        }
        if self.policy == FsyncPolicy::Always {
            self.publish(target);
        } else {
            self.publish(self.flushed.load(Ordering::SeqCst));
        }
        Ok(())
    }

    /// Under `Interval` and `Never`: writes what is pending when somebody waits for it
    /// (or anything written meanwhile by a read or a tick) and publishes it.
    pub(super) fn write_requested(&self, writer: &mut Writer) {
        let published = match &*self.durable_tx.borrow() {
            Ok(durable) => *durable,
            Err(_) => return,
        };
        if writer.requested > published && self.flush_pending(writer).is_ok() {
            self.publish(self.flushed.load(Ordering::SeqCst));
        }
    }

    /// One fsync, serialised with all others; refuses once any fsync has failed.
    pub(super) fn sync_file(&self, file: &dyn LogFile) -> io::Result<()> {
        let _guard = self.sync_lock.lock();
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(io::Error::other("an earlier fsync failed"));
        }
        match file.sync_data() {
            Ok(()) => {
                self.fsyncs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(error) => {
                self.sync_failed.store(true, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// Raises the confirmable offset to `offset`; never lowers it, never clears a poison.
    pub(super) fn publish(&self, offset: u64) {
        self.durable_tx.send_if_modified(|current| match current {
            Ok(durable) if *durable < offset => {
                *durable = offset;
                true
            }
            _ => false,
        });
    }

    /// Poisons the store: no write or durability progress from now on.
    pub(super) fn poison(
        &self,
        writer: &mut Writer,
        context: &'static str,
        error: io::Error,
    ) -> StoreError {
        if writer.poisoned.is_none() {
            tracing::error!(
                context,
                error = %error,
                written = writer.written,
                synced = writer.synced,
                "store poisoned: refusing further writes"
            );
            let poisoned = StorePoisoned {
                message: format!("{context}: {error}"),
            };
            writer.poisoned = Some(poisoned.clone());
            // The previous value (the last durable offset) is no longer of interest.
            let _previous = self.durable_tx.send_replace(Err(poisoned));
        }
        self.flusher_wake.notify_all();
        StoreError::Io {
            source: error,
            context: context.to_owned(),
        }
    }

    pub(super) fn run_flusher(&self) {
        let mut writer = self.writer.lock();
        loop {
            if writer.shutdown || writer.poisoned.is_some() {
                return;
            }
            match self.policy {
                FsyncPolicy::Always => {
                    if writer.requested > writer.synced {
                        // A failure poisons the store; the loop then exits.
                        let _ = self.sync_locked(&mut writer);
                    } else {
                        self.flusher_wake.wait(&mut writer);
                    }
                }
                FsyncPolicy::Interval(period) => {
                    let deadline = Instant::now() + period;
                    while !writer.shutdown && writer.poisoned.is_none() {
                        self.write_requested(&mut writer);
                        if self
                            .flusher_wake
                            .wait_until(&mut writer, deadline)
                            .timed_out()
                        {
                            break;
                        }
                        MutexGuard::unlocked(&mut writer, std::thread::yield_now);
                    }
                    if !writer.shutdown
                        && writer.poisoned.is_none()
                        && writer.written > writer.synced
                    {
                        let _ = self.sync_locked(&mut writer);
                    }
                }
                FsyncPolicy::Never => {
                    self.write_requested(&mut writer);
                    self.flusher_wake.wait(&mut writer);
                    // Woken by the first append that waits: let the appends running
                    // alongside it join the batch (one write for ~35 instead of ~10).
                    MutexGuard::unlocked(&mut writer, std::thread::yield_now);
                }
            }
        }
    }
}
