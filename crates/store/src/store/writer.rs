//! The append path: records join the pending buffer (or are written at once), segments
//! roll, and a write the disk refused is cut back out of the log.

use super::*;

impl Core {
    /// Raises the requested durability offset (bounded by what is written) and wakes the
    /// flusher.
    /// Returns the offset asked for: `end`, bounded by what is written.
    pub(super) fn request(&self, end: u64) -> u64 {
        let mut writer = self.writer.lock();
        let end = end.min(writer.written);
        if end > writer.requested {
            writer.requested = end;
            self.flusher_wake.notify_all();
        }
        end
    }

    /// Appends records; `placement` is the position a replicated record must get (the
    /// leader's): the segment then rolls only where that position says the leader's
    /// did, and a record it does not fit is refused.
    pub(super) fn append_batch(
        &self,
        payloads: &[(&[u8], u32)],
        durability: Durability,
        placement: Option<u64>,
    ) -> Result<(Vec<Appended>, bool), StoreError> {
        let request = durability == Durability::Requested;
        for (payload, _) in payloads {
            if payload.len() > MAX_RECORD_SIZE {
                return Err(StoreError::RecordTooLarge {
                    len: payload.len(),
                    max: MAX_RECORD_SIZE,
                });
            }
        }
        let mut writer = self.writer.lock();
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        if writer.shutdown {
            return Err(StoreError::Closed);
        }
        if let Some(position) = placement {
            // A replica's log holds only what the leader wrote: nothing of its own may
            // be waiting to go in between.
            if !writer.deferred.is_empty() || payloads.len() != 1 {
                return Err(StoreError::OutOfSequence {
                    expected: writer.written,
                    position,
                });
            }
            let rolls_here =
                writer.active_len > MAGIC_LEN && position == writer.written + MAGIC_LEN;
            if position != writer.written && !rolls_here {
                return Err(StoreError::OutOfSequence {
                    expected: writer.written,
                    position,
                });
            }
        }
        let mut appended = Vec::with_capacity(payloads.len());
        let mut rolled = false;
        // Deferred records go first, through the same roll checks; they return no
        // position (nobody reads them back).
        let deferred = std::mem::take(&mut writer.deferred);
        writer.deferred_bytes = 0;
        let deferred_count = deferred.len();
        let records = deferred
            .iter()
            .map(|payload| (payload.as_slice(), 0, false))
            .chain(
                payloads
                    .iter()
                    .map(|&(payload, refs)| (payload, refs, true)),
            );
        // Where this call's records start in the active segment, when nothing of an
        // earlier call is pending: a failed write can then be undone by cutting back.
        let mut own = writer
            .pending
            .is_empty()
            .then_some((writer.active_len, 0u64));
        for (payload, refs, report) in records {
            let size = HEADER_LEN + payload.len() as u64;
            let at = writer.active_len;
            let roll = match placement {
                Some(position) => position == writer.written + MAGIC_LEN && at > MAGIC_LEN,
                None => at > MAGIC_LEN && at + size > self.segment_size,
            };
            if roll {
                self.write_out(&mut writer, own)?;
                self.roll(&mut writer)?;
                rolled = true;
                own = Some((writer.active_len, 0));
            }
            let position = writer.active.base + writer.active_len;
            encode_record(&mut writer.pending, payload);
            writer.active_len += size;
            writer.written = writer.active.base + writer.active_len;
            // Counted at once: the active segment is never collected, and a release
            // may come before the write.
            writer
                .active
                .refs
                .fetch_add(u64::from(refs), Ordering::SeqCst);
            if let Some((_, own_refs)) = own.as_mut() {
                *own_refs += u64::from(refs);
            }
            if report {
                appended.push(Appended {
                    position: LogPosition(position),
                    len: u32::try_from(payload.len()).expect("checked against MAX_RECORD_SIZE"),
                    end: position + size,
                });
            }
        }
        // Records that asked for an fsync (or that no recovery needs) wait for the
        // flusher's write; a lazy record (a requeue count, a dead-letter copy that settles
        // a durable original) is handed to the OS before this returns, so that a process
        // crash keeps it.
        let defer = durability != Durability::Lazy
            && writer.active_len <= writer.preallocated
            && writer.pending.len() < PENDING_LIMIT;
        if !defer && let Err(error) = self.write_out(&mut writer, own) {
            if deferred_count > 0 {
                tracing::warn!(records = deferred_count, error = %error, "deferred records dropped with a failed write");
            }
            return Err(error);
        }
        self.appended_records
            .fetch_add((payloads.len() + deferred_count) as u64, Ordering::SeqCst);
        match self.policy {
            FsyncPolicy::Always => {
                if request {
                    writer.requested = writer.written;
                    self.flusher_wake.notify_all();
                }
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {
                // Confirmable once handed to the OS: at once if this call wrote, else as
                // soon as the flusher writes what is pending (one write for many appends).
                self.publish(self.flushed.load(Ordering::SeqCst));
                if request && !writer.pending.is_empty() {
                    writer.requested = writer.written;
                    self.flusher_wake.notify_all();
                }
            }
        }
        Ok((appended, rolled))
    }

    /// Hands the pending bytes to the OS (poisoning the store if that fails: they may
    /// belong to earlier appends that already returned).
    pub(super) fn flush_pending(&self, writer: &mut Writer) -> Result<(), StoreError> {
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        self.write_out(writer, None)
    }

    /// Writes the pending bytes at `flushed_len`. `own` = (start, refs) of the records of
    /// the current append when they are all that is pending: a failure then cuts the
    /// file back to `start` and forgets them (a refused append, the store stays usable);
    /// otherwise a failure poisons the store.
    pub(super) fn write_out(
        &self,
        writer: &mut Writer,
        own: Option<(u64, u64)>,
    ) -> Result<(), StoreError> {
        if writer.pending.is_empty() {
            return Ok(());
        }
        let offset = writer.flushed_len;
        if let Err(error) = writer.active.file.write_at(&writer.pending, offset) {
            let undo = own.filter(|(start, _)| *start == offset);
            let Some((start, refs)) = undo else {
                tracing::error!(error = %error, "writing pending log records failed");
                return Err(self.poison(writer, "writing pending log records", error));
            };
            // A short write may have left a torn record: cut the file back to the last
            // good record, so nothing torn sits before later appends. If even that
            // fails, the file's contents are unknown and the store must stop.
            return match writer.active.file.set_len(start) {
                Ok(()) => {
                    tracing::warn!(
                        segment = %writer.active.path.display(),
                        offset = start,
                        bytes = writer.pending.len(),
                        error = %error,
                        "segment write failed; cut back to the last good record"
                    );
                    writer.pending.clear();
                    writer.active_len = start;
                    writer.written = writer.active.base + start;
                    // The truncate freed the storage reserved beyond `start`: reserve it
                    // again, or write synchronously from now on (a deferred write must
                    // never be the one that finds the disk full).
                    writer.preallocated =
                        preallocate(writer.active.file.as_ref(), self.segment_size);
                    let _ =
                        writer
                            .active
                            .refs
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                                Some(r.saturating_sub(refs))
                            });
                    Err(StoreError::WriteFailed {
                        source: error,
                        context: "writing a segment".to_owned(),
                    })
                }
                Err(truncate_error) => {
                    tracing::error!(error = %error, "segment write failed");
                    Err(self.poison(
                        writer,
                        "cutting a failed segment write back",
                        truncate_error,
                    ))
                }
            };
        }
        writer.pending.clear();
        writer.flushed_len = writer.active_len;
        writer.active.len.store(writer.active_len, Ordering::SeqCst);
        self.flushed.store(writer.written, Ordering::SeqCst);
        Ok(())
    }

    /// Seals the active segment (fsynced) and starts the next one, named by its base
    /// offset = old base + old length. Its magic and directory entry are fsynced here,
    /// or under `Always` by the flusher before it publishes anything in it.
    pub(super) fn roll(&self, writer: &mut Writer) -> Result<(), StoreError> {
        debug_assert!(
            writer.pending.is_empty(),
            "pending bytes are written before a roll"
        );
        let old = Arc::clone(&writer.active);
        if let Err(error) = self.sync_file(old.file.as_ref()) {
            return Err(self.poison(writer, "fsyncing a segment before roll", error));
        }
        // A second roll before the flusher synced the directory (lazy appends, which
        // wake no flusher, or one batch spanning segments): the older name must be
        // durable before a newer one, or a power cut could leave a gap between segments.
        if writer.unsynced_dir {
            if let Err(error) = self.fs.sync_dir(&self.log_dir) {
                return Err(self.poison(writer, "syncing the log directory before roll", error));
            }
            writer.unsynced_dir = false;
        }
        let base = old.base + writer.active_len;
        let path = self.log_dir.join(segment_file_name(base));
        let written = self.fs.open(&path, true).and_then(|file| {
            file.set_len(0)?;
            file.write_at(&MAGIC, 0)?;
            Ok(file)
        });
        let file = match written {
            Ok(file) => file,
            // Nothing points into the new file yet: remove it (durably: a stale empty
            // file named by an offset the old segment then grows past would overlap it
            // after a crash) and stay on the old segment, so a full disk is a refused
            // append, not a stopped node.
            Err(error) => {
                let removed = match self.fs.remove_file(&path) {
                    Err(remove_error) if remove_error.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
                .and_then(|()| self.fs.sync_dir(&self.log_dir));
                return match removed {
                    Err(remove_error) => {
                        tracing::error!(error = %error, "segment creation failed");
                        Err(self.poison(
                            writer,
                            "removing a segment that could not be created",
                            remove_error,
                        ))
                    }
                    Ok(()) => {
                        tracing::warn!(segment = %path.display(), error = %error, "segment creation failed; staying on the active segment");
                        Err(StoreError::WriteFailed {
                            source: error,
                            context: "creating a segment".to_owned(),
                        })
                    }
                };
            }
        };
        // Under `Always` the new segment's magic and directory entry are fsynced by the
        // flusher, before it publishes anything written into it: appends wait for one
        // fsync at a roll (the old segment's tail) instead of three. The old segment is
        // complete on disk, so a power cut before that leaves at most a torn last
        // segment, which recovery cuts or resets. Other policies publish on write, so
        // the roll makes the new segment durable itself.
        let defer_sync = self.policy == FsyncPolicy::Always;
        if !defer_sync {
            let synced = self
                .sync_file(file.as_ref())
                .and_then(|()| self.fs.sync_dir(&self.log_dir));
            if let Err(error) = synced {
                return Err(self.poison(writer, "creating a segment", error));
            }
        }
        let segment = Arc::new(Segment {
            base,
            path,
            file,
            len: AtomicU64::new(MAGIC_LEN),
            refs: AtomicU64::new(0),
        });
        let preallocated = preallocate(segment.file.as_ref(), self.segment_size);
        self.segments.write().insert(base, Arc::clone(&segment));
        writer.active = segment;
        writer.active_len = MAGIC_LEN;
        writer.written = base + MAGIC_LEN;
        writer.flushed_len = MAGIC_LEN;
        writer.preallocated = preallocated;
        self.flushed.store(writer.written, Ordering::SeqCst);
        if defer_sync {
            // The old segment is fsynced to its end; the new magic is not yet.
            writer.unsynced_dir = true;
            writer.synced = base;
            self.publish(base);
        } else {
            writer.synced = writer.written;
        }
        tracing::debug!(base, "segment rolled");
        Ok(())
    }
}
