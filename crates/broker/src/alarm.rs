//! Resource alarms, as RabbitMQ has them: a free-disk limit on the data directory's
//! filesystem and a memory high-watermark on the process's resident set. While either is
//! crossed, connections that publish are blocked (`connection.blocked`; the amqp layer
//! stops reading their publishes) and consumers keep draining.
//!
//! [`Alarms`] holds the current [`AlarmState`] in a watch channel: a monitor thread
//! ([`Alarms::spawn_monitor`]) samples free disk space (`statvfs`) and the resident set
//! (`/proc/self/status`) every [`ALARM_CHECK_INTERVAL`], and the publish path raises the
//! disk alarm at once when the store refuses a write for lack of space
//! ([`Alarms::disk_write_refused`]). The decision itself is the pure [`evaluate`].
//!
//! # Invariants
//! - A write refused for lack of space keeps the disk alarm raised until free space has
//!   grown by [`REFUSED_WRITE_HEADROOM`] since the refusal, even when the configured limit
//!   is lower: otherwise the next sample would clear it and publishers would be let in to
//!   fail again at once.
//! - A value that cannot be sampled leaves its alarm as it was.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{info, warn};

/// RabbitMQ's default free-disk limit: 50 MB (here 50 MiB).
pub const DEFAULT_DISK_FREE_LIMIT: u64 = 50 * 1024 * 1024;
/// RabbitMQ's default memory high-watermark: 0.4 of total memory.
pub const DEFAULT_MEMORY_HIGH_WATERMARK: MemoryWatermark = MemoryWatermark::Fraction(0.4);
/// How often the monitor samples disk and memory.
pub const ALARM_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// After a refused write, how much more space must be free than at the refusal before
/// the disk alarm may clear.
pub const REFUSED_WRITE_HEADROOM: u64 = 1024 * 1024;

/// The memory high-watermark: a fraction of total memory (the smaller of RAM and the
/// cgroup limit) or an absolute number of bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryWatermark {
    /// Fraction of total memory, in (0, 1]. Text form: a number with a decimal point,
    /// `0.4`.
    Fraction(f64),
    /// Bytes. Text form: an integer, `1073741824`.
    Absolute(u64),
}

impl MemoryWatermark {
    /// The limit in bytes given total memory, or `None` for a fraction when the total
    /// is unknown.
    #[must_use]
    pub fn limit(self, total: Option<u64>) -> Option<u64> {
        match self {
            MemoryWatermark::Absolute(bytes) => Some(bytes),
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            MemoryWatermark::Fraction(fraction) => {
                total.map(|total| (total as f64 * fraction) as u64)
            }
        }
    }

    /// Whether the value can work: a fraction in (0, 1], or at least one byte.
    #[must_use]
    pub fn is_valid(self) -> bool {
        match self {
            MemoryWatermark::Fraction(fraction) => fraction > 0.0 && fraction <= 1.0,
            MemoryWatermark::Absolute(bytes) => bytes > 0,
        }
    }
}

impl fmt::Display for MemoryWatermark {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryWatermark::Fraction(fraction) => write!(formatter, "{fraction:?}"),
            MemoryWatermark::Absolute(bytes) => write!(formatter, "{bytes}"),
        }
    }
}

/// Error from parsing a [`MemoryWatermark`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid memory high-watermark {input:?}: expected a fraction of total memory in (0, 1] \
     such as \"0.4\", or a number of bytes such as \"1073741824\""
)]
pub struct ParseMemoryWatermarkError {
    /// The text that failed to parse.
    pub input: String,
}

impl FromStr for MemoryWatermark {
    type Err = ParseMemoryWatermarkError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = || ParseMemoryWatermarkError {
            input: input.to_owned(),
        };
        let text = input.trim();
        let watermark = if text.contains('.') {
            MemoryWatermark::Fraction(text.parse::<f64>().map_err(|_| error())?)
        } else {
            MemoryWatermark::Absolute(text.parse::<u64>().map_err(|_| error())?)
        };
        if watermark.is_valid() {
            Ok(watermark)
        } else {
            Err(error())
        }
    }
}

/// The limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlarmConfig {
    /// The disk alarm is raised while the data directory's filesystem has fewer bytes
    /// available than this.
    pub disk_free_limit: u64,
    /// The memory alarm is raised while the resident set is above this.
    pub memory_high_watermark: MemoryWatermark,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        Self {
            disk_free_limit: DEFAULT_DISK_FREE_LIMIT,
            memory_high_watermark: DEFAULT_MEMORY_HIGH_WATERMARK,
        }
    }
}

/// Which alarms are raised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlarmState {
    /// Free disk space is below the limit (or a write was refused for lack of it).
    pub disk: bool,
    /// Memory use is above the watermark.
    pub memory: bool,
}

impl AlarmState {
    /// Whether publishers must be blocked.
    #[must_use]
    pub fn any(self) -> bool {
        self.disk || self.memory
    }

    /// The `connection.blocked` reason, in RabbitMQ's words.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// One measurement; `None` where the value could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Bytes available to unprivileged users on the data directory's filesystem.
    pub disk_free: Option<u64>,
    /// The process's resident set, in bytes.
    pub memory_used: Option<u64>,
    /// Total memory: RAM, or the cgroup limit if lower.
    pub memory_total: Option<u64>,
}

/// The alarm state after `sample`, and the refused-write latch (free bytes at the last
/// refusal, cleared once [`REFUSED_WRITE_HEADROOM`] more is free).
#[must_use]
pub fn evaluate(
    config: &AlarmConfig,
    sample: &Sample,
    previous: AlarmState,
    latch: Option<u64>,
) -> (AlarmState, Option<u64>) {
    let (disk, latch) = match sample.disk_free {
        Some(free) => {
            let latch = latch.filter(|at| free < at.saturating_add(REFUSED_WRITE_HEADROOM));
            (free < config.disk_free_limit || latch.is_some(), latch)
        }
        None => (previous.disk || latch.is_some(), latch),
    };
    let limit = config.memory_high_watermark.limit(sample.memory_total);
    let memory = match (sample.memory_used, limit) {
        (Some(used), Some(limit)) => used > limit,
        _ => previous.memory,
    };
    (AlarmState { disk, memory }, latch)
}

/// The broker's resource alarms. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Alarms {
    inner: Arc<Inner>,
}

struct Inner {
    config: AlarmConfig,
    /// The data directory, whose filesystem the disk limit applies to.
    dir: PathBuf,
    state: watch::Sender<AlarmState>,
    /// Free bytes when a write was last refused for lack of space (see the module docs).
    latch: Mutex<Option<u64>>,
    /// Publishes refused because the store had no space.
    refused_publishes: AtomicU64,
}

impl fmt::Debug for Alarms {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Alarms")
            .field("config", &self.inner.config)
            .field("state", &*self.inner.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Alarms {
    /// No alarm raised yet; nothing sampled until [`Alarms::check`] or the monitor runs.
    #[must_use]
    pub fn new(config: AlarmConfig, dir: PathBuf) -> Self {
        let (state, _) = watch::channel(AlarmState::default());
        Self {
            inner: Arc::new(Inner {
                config,
                dir,
                state,
                latch: Mutex::new(None),
                refused_publishes: AtomicU64::new(0),
            }),
        }
    }

    /// The limits.
    #[must_use]
    pub fn config(&self) -> AlarmConfig {
        self.inner.config
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> AlarmState {
        *self.inner.state.borrow()
    }

    /// A receiver that sees every change of state.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.inner.state.subscribe()
    }

    /// Samples disk and memory now and updates the state.
    pub fn check(&self) {
        self.inner.apply(&sample(&self.inner.dir), None);
    }

    /// The store refused a write for lack of space: raises the disk alarm now (the disk
    /// may have filled between two samples, or the limit may be smaller than a record)
    /// and holds it until space returns.
    pub fn disk_write_refused(&self) {
        let free = disk_free(&self.inner.dir).unwrap_or(0);
        self.inner.apply(
            &Sample {
                disk_free: Some(free),
                ..Sample::default()
            },
            Some(free),
        );
    }

    /// Counts a publish refused for lack of space.
    pub fn count_refused_publish(&self) {
        self.inner.refused_publishes.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes refused for lack of space since start (nacked, or dropped without
    /// confirms).
    #[must_use]
    pub fn refused_publishes(&self) -> u64 {
        self.inner.refused_publishes.load(Ordering::Relaxed)
    }

    /// Checks once now, then every `interval` on a thread that ends when the last clone
    /// of these alarms is dropped.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn spawn_monitor(&self, interval: Duration) -> std::io::Result<JoinHandle<()>> {
        self.check();
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("holdfast-alarms".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let Some(inner) = weak.upgrade() else { break };
                    inner.apply(&sample(&inner.dir), None);
                }
            })
    }
}

impl Inner {
    /// Folds `sample` (and a new refusal, if `refused_at`) into the state; logs changes.
    fn apply(&self, sample: &Sample, refused_at: Option<u64>) {
        let mut latch = self.latch.lock();
        if let Some(free) = refused_at {
            *latch = Some(latch.map_or(free, |at| at.min(free)));
        }
        let previous = *self.state.borrow();
        let (next, new_latch) = evaluate(&self.config, sample, previous, *latch);
        *latch = new_latch;
        if next == previous {
            return;
        }
        let limit = self.config.disk_free_limit;
        match (previous.disk, next.disk) {
            (false, true) => warn!(
                free = sample.disk_free,
                limit,
                refused_write = refused_at.is_some(),
                "disk alarm set: publishers are blocked until space returns"
            ),
            (true, false) => info!(free = sample.disk_free, limit, "disk alarm cleared"),
            _ => {}
        }
        let memory_limit = self.config.memory_high_watermark.limit(sample.memory_total);
        match (previous.memory, next.memory) {
            (false, true) => warn!(
                used = sample.memory_used,
                limit = memory_limit,
                "memory alarm set: publishers are blocked until memory use falls"
            ),
            (true, false) => info!(
                used = sample.memory_used,
                limit = memory_limit,
                "memory alarm cleared"
            ),
            _ => {}
        }
        self.state.send_replace(next);
    }
}

fn sample(dir: &Path) -> Sample {
    Sample {
        disk_free: disk_free(dir),
        memory_used: resident_set(),
        memory_total: memory_total(),
    }
}

/// Bytes available to unprivileged users on the filesystem holding `dir`.
fn disk_free(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    #[allow(clippy::useless_conversion)]
    let available = u64::from(stat.blocks_available()).checked_mul(stat.fragment_size())?;
    Some(available)
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_set() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kibibytes_field(&status, "VmRSS:")
}

/// `MemTotal` of `/proc/meminfo`, or the cgroup v2 `memory.max` if lower.
fn memory_total() -> Option<u64> {
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| kibibytes_field(&text, "MemTotal:"));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    match (ram, cgroup) {
        (Some(ram), Some(cgroup)) => Some(ram.min(cgroup)),
        (ram, cgroup) => ram.or(cgroup),
    }
}

/// The value of a `Name:   1234 kB` line, in bytes.
fn kibibytes_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    let kib = line[name.len()..]
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn config(disk_free_limit: u64, memory_high_watermark: MemoryWatermark) -> AlarmConfig {
        AlarmConfig {
            disk_free_limit,
            memory_high_watermark,
        }
    }

    fn sample(disk_free: u64, memory_used: u64, memory_total: u64) -> Sample {
        Sample {
            disk_free: Some(disk_free),
            memory_used: Some(memory_used),
            memory_total: Some(memory_total),
        }
    }

    #[test]
    fn thresholds() {
        let cfg = config(50 * MIB, MemoryWatermark::Fraction(0.4));
        let quiet = AlarmState::default();
        let (state, _) = evaluate(&cfg, &sample(50 * MIB, 400, 1000), quiet, None);
        assert_eq!(state, quiet, "at the limits exactly, no alarm");
        let (state, _) = evaluate(&cfg, &sample(50 * MIB - 1, 400, 1000), quiet, None);
        assert!(state.disk && !state.memory);
        assert_eq!(state.reason(), "low on disk");
        let (state, _) = evaluate(&cfg, &sample(50 * MIB, 401, 1000), quiet, None);
        assert!(!state.disk && state.memory);
        assert_eq!(state.reason(), "low on memory");
        let (state, _) = evaluate(&cfg, &sample(0, 1000, 1000), quiet, None);
        assert_eq!(state.reason(), "low on memory & disk");
        let absolute = config(0, MemoryWatermark::Absolute(500));
        let (state, _) = evaluate(&absolute, &sample(0, 501, 1), quiet, None);
        assert!(state.memory && !state.disk, "absolute ignores the total");
    }

    #[test]
    fn unknown_values_keep_the_previous_state() {
        let cfg = config(10, MemoryWatermark::Fraction(0.5));
        let raised = AlarmState {
            disk: true,
            memory: true,
        };
        assert_eq!(evaluate(&cfg, &Sample::default(), raised, None).0, raised);
        let no_total = Sample {
            disk_free: Some(100),
            memory_used: Some(1),
            memory_total: None,
        };
        let (state, _) = evaluate(&cfg, &no_total, raised, None);
        assert!(!state.disk && state.memory);
    }

    #[test]
    fn a_refused_write_holds_the_disk_alarm_until_headroom_returns() {
        let cfg = config(0, MemoryWatermark::Absolute(u64::MAX));
        let quiet = AlarmState::default();
        let (state, latch) = evaluate(&cfg, &sample(4096, 0, 1), quiet, Some(4096));
        assert!(state.disk, "raised although above the (zero) limit");
        let (state, latch) = evaluate(&cfg, &sample(4096 + MIB - 1, 0, 1), state, latch);
        assert!(state.disk && latch.is_some());
        let (state, latch) = evaluate(&cfg, &sample(4096 + MIB, 0, 1), state, latch);
        assert!(!state.disk && latch.is_none(), "cleared with the headroom");
    }

    #[test]
    fn alarms_publish_changes_and_latch_refusals() {
        let dir = std::env::temp_dir();
        let alarms = Alarms::new(config(0, MemoryWatermark::Absolute(u64::MAX)), dir);
        let mut receiver = alarms.subscribe();
        alarms.check();
        assert!(!alarms.state().any());
        alarms.disk_write_refused();
        assert!(receiver.has_changed().expect("sender alive"));
        assert_eq!(receiver.borrow_and_update().reason(), "low on disk");
        let tiny = Alarms::new(
            config(0, MemoryWatermark::Absolute(1)),
            std::env::temp_dir(),
        );
        tiny.check();
        assert!(tiny.state().memory, "this process uses more than one byte");
    }

    #[test]
    fn watermark_parsing() {
        assert_eq!("0.4".parse(), Ok(MemoryWatermark::Fraction(0.4)));
        assert_eq!(" 1.0 ".parse(), Ok(MemoryWatermark::Fraction(1.0)));
        assert_eq!(
            "1073741824".parse(),
            Ok(MemoryWatermark::Absolute(1_073_741_824))
        );
        for bad in ["0.0", "1.5", "-0.1", "0", "abc", "", "1e9", "12MB"] {
            assert!(bad.parse::<MemoryWatermark>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(MemoryWatermark::Fraction(0.4).to_string(), "0.4");
        assert_eq!(MemoryWatermark::Fraction(0.5).limit(Some(1000)), Some(500));
        assert_eq!(MemoryWatermark::Fraction(0.5).limit(None), None);
    }

    #[test]
    fn proc_fields() {
        let text = "Name:\tholdfast\nVmRSS:\t   2048 kB\nVmSwap:\t0 kB\n";
        assert_eq!(kibibytes_field(text, "VmRSS:"), Some(2 * MIB));
        assert_eq!(kibibytes_field(text, "VmHWM:"), None);
        assert!(resident_set().is_some_and(|rss| rss > 0));
        assert!(memory_total().is_some_and(|total| total > 0));
        assert!(disk_free(&std::env::temp_dir()).is_some());
    }
}
