//! Recovery at open: every segment scanned, every record's CRC checked, a torn tail cut.

use super::*;

/// Scans `log_dir`, visits every valid record, repairs the tail, and returns the segment
/// table (never empty: a fresh log gets segment 0) and how many bytes of a torn tail it
/// cut off the last segment.
pub(super) fn recover(
    fs: &dyn FileSystem,
    log_dir: &Path,
    visit: &mut dyn FnMut(LogPosition, &[u8]),
) -> Result<(BTreeMap<u64, Arc<Segment>>, u64), StoreError> {
    let mut torn_bytes = 0;
    let mut bases: Vec<u64> = fs
        .list_dir(log_dir)
        .map_err(StoreError::io(format!("listing {}", log_dir.display())))?
        .iter()
        .filter_map(|name| parse_segment_file_name(name))
        .collect();
    bases.sort_unstable();
    let mut segments = BTreeMap::new();
    let count = bases.len();
    for (index, base) in bases.into_iter().enumerate() {
        let is_last = index + 1 == count;
        let path = log_dir.join(segment_file_name(base));
        let io_error = |what: &str| StoreError::io(format!("{what} {}", path.display()));
        let file = fs.open(&path, false).map_err(io_error("opening"))?;
        let mut len = file.len().map_err(io_error("reading length of"))?;
        let mut magic = [0u8; MAGIC.len()];
        let magic_ok = len >= MAGIC_LEN && {
            file.read_at(&mut magic, 0).map_err(io_error("reading"))?;
            magic == MAGIC
        };
        if !magic_ok {
            if is_last {
                tracing::warn!(segment = %path.display(), lost_bytes = len, "segment without magic reset");
                file.set_len(0).map_err(io_error("truncating"))?;
                file.write_at(&MAGIC, 0)
                    .map_err(io_error("writing magic to"))?;
                file.sync_data().map_err(io_error("syncing"))?;
                len = MAGIC_LEN;
            } else {
                tracing::warn!(segment = %path.display(), lost_bytes = len, "sealed segment without magic skipped");
            }
        } else {
            let outcome = scan(file.as_ref(), base, len, &mut |position, payload| {
                visit(LogPosition(position), payload);
            })
            .map_err(io_error("scanning"))?;
            if let Some(reason) = outcome.torn {
                let offset = outcome.valid_len;
                let lost_bytes = len - offset;
                if is_last {
                    file.set_len(offset).map_err(io_error("truncating"))?;
                    file.sync_data().map_err(io_error("syncing"))?;
                    tracing::warn!(segment = %path.display(), offset, lost_bytes, reason, "torn tail cut");
                    torn_bytes += lost_bytes;
                    len = offset;
                } else {
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        lost_bytes,
                        reason,
                        "corrupt record in a sealed segment; rest of the segment skipped"
                    );
                }
            }
        }
        segments.insert(
            base,
            Arc::new(Segment {
                base,
                path,
                file,
                len: AtomicU64::new(len),
                refs: AtomicU64::new(0),
            }),
        );
    }
    let sync_dir = |fs: &dyn FileSystem| {
        fs.sync_dir(log_dir)
            .map_err(StoreError::io(format!("syncing {}", log_dir.display())))
    };
    match segments.values().next_back() {
        Some(last) => {
            // Recovered bytes may exist only in the page cache (after a process crash);
            // make them durable before anything new builds on them.
            last.file
                .sync_data()
                .map_err(StoreError::io(format!("syncing {}", last.path.display())))?;
            sync_dir(fs)?;
        }
        None => {
            let path = log_dir.join(segment_file_name(0));
            let io_error = |what: &str| StoreError::io(format!("{what} {}", path.display()));
            let file = fs.open(&path, true).map_err(io_error("creating"))?;
            file.set_len(0).map_err(io_error("truncating"))?;
            file.write_at(&MAGIC, 0)
                .map_err(io_error("writing magic to"))?;
            file.sync_data().map_err(io_error("syncing"))?;
            sync_dir(fs)?;
            segments.insert(
                0,
                Arc::new(Segment {
                    base: 0,
                    path,
                    file,
                    len: AtomicU64::new(MAGIC_LEN),
                    refs: AtomicU64::new(0),
                }),
            );
        }
    }
    Ok((segments, torn_bytes))
}
