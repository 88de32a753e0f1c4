//! The server's configuration: one tree, read from flags > `HOLDFAST_*` environment
//! variables > TOML file > defaults. Each option is defined once: clap reads the flag
//! and its environment variable, the file fills what neither set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use holdfast_amqp::{ServerConfig, User};
use holdfast_broker::MemoryWatermark;
use holdfast_broker::alarm::{AlarmConfig, DEFAULT_DISK_FREE_LIMIT, DEFAULT_MEMORY_HIGH_WATERMARK};
use holdfast_store::FsyncPolicy;
use serde::Deserialize;

/// `holdfast server` flags; every one also reads `HOLDFAST_<NAME>`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// TOML configuration file (see holdfast.example.toml).
    #[arg(long, env = "HOLDFAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./holdfast-data].
    #[arg(long, env = "HOLDFAST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// AMQP listen address [default: 127.0.0.1:5672].
    #[arg(long, env = "HOLDFAST_AMQP_LISTEN")]
    pub amqp_listen: Option<SocketAddr>,
    /// always | interval:MS | never [default: always].
    #[arg(long, env = "HOLDFAST_FSYNC")]
    pub fsync: Option<FsyncPolicy>,
    /// Commit-log segment size in bytes [default: 67108864].
    #[arg(long, env = "HOLDFAST_SEGMENT_SIZE")]
    pub segment_size: Option<u64>,
    /// Largest accepted message body in bytes [default: 134217728].
    #[arg(long, env = "HOLDFAST_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    /// Largest frame in bytes [default: 131072].
    #[arg(long, env = "HOLDFAST_FRAME_MAX")]
    pub frame_max: Option<u32>,
    /// Highest channel number per connection [default: 2047].
    #[arg(long, env = "HOLDFAST_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    /// Heartbeat offered to clients, in seconds; 0 disables [default: 60].
    #[arg(long, env = "HOLDFAST_HEARTBEAT")]
    pub heartbeat: Option<u16>,
    /// Milliseconds a delivery may stay unacknowledged before its channel is closed
    /// with 406 (queues may set x-consumer-timeout) [default: 1800000].
    #[arg(long, env = "HOLDFAST_CONSUMER_TIMEOUT")]
    pub consumer_timeout: Option<u64>,
    /// Publishers are blocked while the data directory's filesystem has fewer bytes
    /// free than this [default: 52428800].
    #[arg(long, env = "HOLDFAST_DISK_FREE_LIMIT")]
    pub disk_free_limit: Option<u64>,
    /// Publishers are blocked while the process's resident memory is above this: a
    /// fraction of total memory (0.4) or bytes (1073741824) [default: 0.4].
    #[arg(long, env = "HOLDFAST_MEMORY_HIGH_WATERMARK")]
    pub memory_high_watermark: Option<MemoryWatermark>,
    /// Lead static replication: accept a follower on this address and ship it the log
    /// [default: off].
    #[arg(long, env = "HOLDFAST_REPLICATION_LISTEN")]
    pub replication_listen: Option<SocketAddr>,
    /// Follow the leader with this replication address (HOST:PORT): keep a byte-for-byte
    /// copy of its log and serve no AMQP [default: off].
    #[arg(long, env = "HOLDFAST_FOLLOW")]
    pub follow: Option<String>,
    /// sync: a confirm waits for the follower too; async: for the leader's fsync alone
    /// [default: sync].
    #[arg(long, env = "HOLDFAST_REPLICATION")]
    pub replication: Option<ReplicationMode>,
}

/// Whether a leader's confirms wait for its follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// A confirm leaves once the message is durable on the leader and on the follower.
    Sync,
    /// A confirm leaves once the message is durable on the leader; a failover may lose
    /// what the follower had not received.
    Async,
}

impl std::str::FromStr for ReplicationMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sync" => Ok(ReplicationMode::Sync),
            "async" => Ok(ReplicationMode::Async),
            other => Err(format!("replication must be sync or async, not '{other}'")),
        }
    }
}

/// The node's part in static replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// A single node.
    Off,
    /// The leader: serves AMQP and ships its log to the follower that connects.
    Lead {
        /// Where followers connect.
        listen: SocketAddr,
        /// Whether confirms wait for the follower.
        mode: ReplicationMode,
    },
    /// The follower: copies the leader's log, serves no AMQP.
    Follow {
        /// The leader's replication address.
        leader: String,
    },
}

/// `memory_high_watermark` in the file: `0.4` or `1073741824`, or either as a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileWatermark {
    Bytes(u64),
    Fraction(f64),
    Text(String),
}

/// The configuration file's layout; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    amqp_listen: Option<SocketAddr>,
    fsync: Option<String>,
    segment_size: Option<u64>,
    max_message_size: Option<u64>,
    frame_max: Option<u32>,
    channel_max: Option<u16>,
    heartbeat: Option<u16>,
    consumer_timeout: Option<u64>,
    disk_free_limit: Option<u64>,
    memory_high_watermark: Option<FileWatermark>,
    users: Option<Vec<User>>,
    replication_listen: Option<SocketAddr>,
    follow: Option<String>,
    replication: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub amqp_listen: SocketAddr,
    pub fsync: FsyncPolicy,
    pub segment_size: u64,
    pub consumer_timeout: Duration,
    pub alarms: AlarmConfig,
    pub server: ServerConfig,
    pub replication: Replication,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid fsync policy in config file: {0}")]
    Fsync(String),
    #[error("segment_size must be at least 4096 bytes, got {0}")]
    SegmentTooSmall(u64),
    #[error("frame_max must be at least 4096 bytes, got {0}")]
    FrameMaxTooSmall(u32),
    #[error("channel_max must be at least 1")]
    NoChannels,
    #[error("no users configured: nobody could log in")]
    NoUsers,
    #[error("consumer_timeout must be at least 1 ms")]
    ZeroConsumerTimeout,
    #[error("invalid replication in config file: {0}")]
    ReplicationMode(String),
    #[error("a node either leads (replication_listen) or follows (follow), not both")]
    LeadAndFollow,
    #[error("invalid memory_high_watermark in config file: {0}")]
    MemoryWatermark(String),
    #[error(
        "memory_high_watermark must be a fraction of total memory in (0, 1] or at least 1 byte, got {0}"
    )]
    MemoryWatermarkOutOfRange(MemoryWatermark),
}

impl Config {
    /// Resolves flags, environment and file into one configuration and checks it.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable file or a value that cannot work.
    pub fn load(args: ServerArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let file_fsync = file
            .fsync
            .map(|text| {
                text.parse::<FsyncPolicy>()
                    .map_err(|err| ConfigError::Fsync(err.to_string()))
            })
            .transpose()?;
        let file_watermark = match file.memory_high_watermark {
            None => None,
            Some(FileWatermark::Bytes(bytes)) => Some(MemoryWatermark::Absolute(bytes)),
            Some(FileWatermark::Fraction(fraction)) => Some(MemoryWatermark::Fraction(fraction)),
            Some(FileWatermark::Text(text)) => Some(
                text.parse::<MemoryWatermark>()
                    .map_err(|err| ConfigError::MemoryWatermark(err.to_string()))?,
            ),
        };
        let mode = match args.replication {
            Some(mode) => mode,
            None => file
                .replication
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(ConfigError::ReplicationMode)?
                .unwrap_or(ReplicationMode::Sync),
        };
        let replication = match (
            args.replication_listen.or(file.replication_listen),
            args.follow.or(file.follow),
        ) {
            (Some(_), Some(_)) => return Err(ConfigError::LeadAndFollow),
            (Some(listen), None) => Replication::Lead { listen, mode },
            (None, Some(leader)) => Replication::Follow { leader },
            (None, None) => Replication::Off,
        };
        let defaults = ServerConfig::default();
        let config = Config {
            replication,
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("holdfast-data")),
            amqp_listen: args
                .amqp_listen
                .or(file.amqp_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5672))),
            fsync: args.fsync.or(file_fsync).unwrap_or(FsyncPolicy::Always),
            segment_size: args
                .segment_size
                .or(file.segment_size)
                .unwrap_or(holdfast_store::DEFAULT_SEGMENT_SIZE),
            consumer_timeout: Duration::from_millis(
                args.consumer_timeout
                    .or(file.consumer_timeout)
                    .unwrap_or(30 * 60 * 1000),
            ),
            alarms: AlarmConfig {
                disk_free_limit: args
                    .disk_free_limit
                    .or(file.disk_free_limit)
                    .unwrap_or(DEFAULT_DISK_FREE_LIMIT),
                memory_high_watermark: args
                    .memory_high_watermark
                    .or(file_watermark)
                    .unwrap_or(DEFAULT_MEMORY_HIGH_WATERMARK),
            },
            server: ServerConfig {
                frame_max: args
                    .frame_max
                    .or(file.frame_max)
                    .unwrap_or(defaults.frame_max),
                channel_max: args
                    .channel_max
                    .or(file.channel_max)
                    .unwrap_or(defaults.channel_max),
                heartbeat: args
                    .heartbeat
                    .or(file.heartbeat)
                    .unwrap_or(defaults.heartbeat),
                max_message_size: args
                    .max_message_size
                    .or(file.max_message_size)
                    .unwrap_or(defaults.max_message_size),
                users: file.users.unwrap_or(defaults.users),
            },
        };
        config.validate()
    }

    fn validate(self) -> Result<Config, ConfigError> {
        if self.segment_size < 4096 {
            return Err(ConfigError::SegmentTooSmall(self.segment_size));
        }
        if self.server.frame_max < 4096 {
            return Err(ConfigError::FrameMaxTooSmall(self.server.frame_max));
        }
        if self.server.channel_max == 0 {
            return Err(ConfigError::NoChannels);
        }
        if self.consumer_timeout.is_zero() {
            return Err(ConfigError::ZeroConsumerTimeout);
        }
        if !self.alarms.memory_high_watermark.is_valid() {
            return Err(ConfigError::MemoryWatermarkOutOfRange(
                self.alarms.memory_high_watermark,
            ));
        }
        if self.server.users.is_empty() {
            return Err(ConfigError::NoUsers);
        }
        Ok(self)
    }
}

/// How long graceful shutdown waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_leads_or_follows_not_both() {
        let listen: SocketAddr = "127.0.0.1:5700".parse().expect("address");
        let both = ServerArgs {
            replication_listen: Some(listen),
            follow: Some("127.0.0.1:5701".into()),
            ..ServerArgs::default()
        };
        assert!(matches!(
            Config::load(both),
            Err(ConfigError::LeadAndFollow)
        ));
        let lead = ServerArgs {
            replication_listen: Some(listen),
            replication: Some(ReplicationMode::Async),
            ..ServerArgs::default()
        };
        assert_eq!(
            Config::load(lead).expect("valid").replication,
            Replication::Lead {
                listen,
                mode: ReplicationMode::Async
            }
        );
        assert_eq!(
            Config::load(ServerArgs::default())
                .expect("valid")
                .replication,
            Replication::Off
        );
        assert!("both".parse::<ReplicationMode>().is_err());
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("holdfast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("holdfast.toml");
        std::fs::write(
            &path,
            "fsync = \"never\"\nheartbeat = 5\nsegment_size = 8192\n",
        )
        .expect("write");
        let config = Config::load(ServerArgs {
            config: Some(path.clone()),
            heartbeat: Some(7),
            ..ServerArgs::default()
        })
        .expect("valid");
        assert_eq!(config.fsync, FsyncPolicy::Never);
        assert_eq!(config.server.heartbeat, 7);
        assert_eq!(config.segment_size, 8192);
        assert_eq!(config.amqp_listen, SocketAddr::from(([127, 0, 0, 1], 5672)));
        std::fs::write(&path, "fsync_mode = \"never\"\n").expect("write");
        assert!(matches!(
            Config::load(ServerArgs {
                config: Some(path),
                ..ServerArgs::default()
            }),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn alarm_options() {
        let dir = std::env::temp_dir().join(format!("holdfast-alarms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("holdfast.toml");
        let load = |text: &str, args: ServerArgs| {
            std::fs::write(&path, text).expect("write");
            Config::load(ServerArgs {
                config: Some(path.clone()),
                ..args
            })
        };
        let config = load("", ServerArgs::default()).expect("defaults");
        assert_eq!(config.alarms, AlarmConfig::default());
        assert_eq!(config.alarms.disk_free_limit, 50 * 1024 * 1024);
        assert_eq!(
            config.alarms.memory_high_watermark,
            MemoryWatermark::Fraction(0.4)
        );
        let config = load(
            "disk_free_limit = 1000\nmemory_high_watermark = 0.6\n",
            ServerArgs::default(),
        )
        .expect("fraction");
        assert_eq!(config.alarms.disk_free_limit, 1000);
        assert_eq!(
            config.alarms.memory_high_watermark,
            MemoryWatermark::Fraction(0.6)
        );
        let config = load(
            "memory_high_watermark = 1073741824\n",
            ServerArgs::default(),
        )
        .expect("bytes");
        assert_eq!(
            config.alarms.memory_high_watermark,
            MemoryWatermark::Absolute(1 << 30)
        );
        let config =
            load("memory_high_watermark = \"0.5\"\n", ServerArgs::default()).expect("text");
        assert_eq!(
            config.alarms.memory_high_watermark,
            MemoryWatermark::Fraction(0.5)
        );
        let config = load(
            "memory_high_watermark = 0.6\ndisk_free_limit = 1\n",
            ServerArgs {
                memory_high_watermark: Some(MemoryWatermark::Absolute(5)),
                disk_free_limit: Some(7),
                ..ServerArgs::default()
            },
        )
        .expect("flags win");
        assert_eq!(
            config.alarms,
            AlarmConfig {
                disk_free_limit: 7,
                memory_high_watermark: MemoryWatermark::Absolute(5),
            }
        );
        assert!(matches!(
            load("memory_high_watermark = 1.5\n", ServerArgs::default()),
            Err(ConfigError::MemoryWatermarkOutOfRange(_))
        ));
        assert!(matches!(
            load("memory_high_watermark = 0\n", ServerArgs::default()),
            Err(ConfigError::MemoryWatermarkOutOfRange(_))
        ));
        assert!(matches!(
            load("memory_high_watermark = \"lots\"\n", ServerArgs::default()),
            Err(ConfigError::MemoryWatermark(_))
        ));
        assert!(matches!(
            load("disk_free_limit = -1\n", ServerArgs::default()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
