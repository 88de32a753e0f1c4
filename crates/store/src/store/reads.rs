//! Reads and references: a record is read back by position, and each segment counts the
//! references into it; a dead prefix of segments goes to the reaper.

use super::*;

impl Store {
    /// Reads the payload of the record at `position` (as returned by `append` or passed to
    /// the `open` visitor). Safe from any thread, concurrently with appends and deletion.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no live segment holds `position`;
    /// [`StoreError::Corrupt`] if the stored length or checksum does not match;
    /// [`StoreError::Io`] if the read fails (including past the end of the file).
    pub fn read(&self, position: LogPosition, len: u32) -> Result<Bytes, StoreError> {
        let end = position.0 + HEADER_LEN + u64::from(len);
        let core = &self.handle.core;
        if end > core.flushed.load(Ordering::SeqCst) {
            // Still in the pending buffer: hand it to the OS first.
            let mut writer = core.writer.lock();
            core.flush_pending(&mut writer)?;
        }
        let segment = self
            .handle
            .core
            .segment_for(position)
            .ok_or(StoreError::NotFound {
                position: position.0,
            })?;
        let offset = position.0 - segment.base;
        if offset < MAGIC_LEN {
            return Err(StoreError::NotFound {
                position: position.0,
            });
        }
        let mut buf = vec![0u8; HEADER_LEN as usize + len as usize];
        segment
            .file
            .read_at(&mut buf, offset)
            .map_err(StoreError::io(format!("reading record at {position}")))?;
        let header: [u8; 8] = buf[..8]
            .try_into()
            .expect("buffer starts with a full header");
        let (stored_len, stored_crc) = decode_header(&header);
        let corrupt = |reason: String| StoreError::Corrupt {
            position: position.0,
            reason,
        };
        if stored_len != len {
            return Err(corrupt(format!(
                "stored length {stored_len}, expected {len}"
            )));
        }
        let payload = Bytes::from(buf).slice(HEADER_LEN as usize..);
        if record_crc(&payload) != stored_crc {
            return Err(corrupt("checksum mismatch".to_owned()));
        }
        Ok(payload)
    }

    /// Adds a live reference to the segment holding `position`.
    pub fn retain(&self, position: LogPosition) {
        let segments = self.handle.core.segments.read();
        match segments.range(..=position.0).next_back() {
            Some((_, segment)) => {
                segment.refs.fetch_add(1, Ordering::SeqCst);
            }
            None => tracing::warn!(%position, "retain of a position in no live segment"),
        }
    }

    /// Drops one live reference to the segment holding `position`; once garbage collection
    /// is enabled (first [`Store::collect_garbage`]), deletes the oldest segments that have
    /// no live references, up to the first one that has (never the active segment).
    pub fn release(&self, position: LogPosition) {
        let core = &self.handle.core;
        let now_free = {
            let segments = core.segments.read();
            let Some((_, segment)) = segments.range(..=position.0).next_back() else {
                tracing::warn!(%position, "release of a position in no live segment");
                return;
            };
            match segment
                .refs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |refs| {
                    refs.checked_sub(1)
                }) {
                Ok(previous) => previous == 1,
                Err(_) => {
                    tracing::warn!(%position, "release of a segment with no live references");
                    false
                }
            }
        };
        if now_free && core.gc_enabled.load(Ordering::SeqCst) {
            core.collect_garbage();
        }
    }

    /// Enables garbage collection and deletes the unreferenced prefix of the log now.
    pub fn collect_garbage(&self) {
        let core = &self.handle.core;
        core.gc_enabled.store(true, Ordering::SeqCst);
        core.collect_garbage();
    }

    /// Blocks until the segment files garbage collection gave up so far are deleted
    /// (deletion runs on a thread of its own).
    pub fn wait_for_deletions(&self) {
        self.handle.core.reaper.wait_idle();
    }
}

impl Core {
    pub(super) fn segment_for(&self, position: LogPosition) -> Option<Arc<Segment>> {
        let segments = self.segments.read();
        segments
            .range(..=position.0)
            .next_back()
            .map(|(_, segment)| Arc::clone(segment))
    }

    /// Takes the longest prefix of unreferenced segments (never the active, last one) out
    /// of the table and hands it to the reaper, which unlinks them oldest first, each
    /// unlink made durable before the next, so a crash never leaves a newer segment
    /// deleted and an older one present, and only once the log is durable up to what is
    /// written now.
    pub(super) fn collect_garbage(&self) {
        let _guard = self.gc_lock.lock();
        let mut dead = Vec::new();
        {
            let mut segments = self.segments.write();
            while segments.len() > 1 {
                let Some(entry) = segments.first_entry() else {
                    break;
                };
                if entry.get().refs.load(Ordering::SeqCst) != 0 {
                    break;
                }
                dead.push(entry.remove());
            }
        }
        if dead.is_empty() {
            return;
        }
        // Out of the table (reads now fail with NotFound). The files go on the reaper's
        // thread, in this order, once everything written by now is durable: that
        // includes whatever settled their last messages.
        let after = self.request(u64::MAX);
        for segment in dead {
            self.reaper.delete(segment, after);
        }
    }
}
