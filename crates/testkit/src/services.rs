//! Real external services on loopback for integration tests: a private PostgreSQL and Redis
//! per test, and one RabbitMQ shared by every test process. Missing Debian packages are
//! installed with `apt-get` on first use, so tests never depend on a hand-prepared machine.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a PostgreSQL or Redis server may take to accept work.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long RabbitMQ may take to boot (a first boot creates its database).
const RABBITMQ_TIMEOUT: Duration = Duration::from_secs(90);
/// How many times a start is retried when another process took the chosen port first.
const PORT_ATTEMPTS: usize = 3;

/// A private PostgreSQL server on a free loopback port, with a throwaway data directory.
///
/// Every connection is trusted, as the `postgres` superuser. Dropping it stops the server
/// (immediate shutdown) and deletes the data.
pub struct Postgres {
    child: Option<Child>,
    port: u16,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    /// Who the server runs as: `postgres` when the tests run as root, which PostgreSQL refuses.
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Installs PostgreSQL when missing, creates a cluster and starts it.
    ///
    /// # Panics
    /// When PostgreSQL cannot be installed, initialised or started within 60 s; the message
    /// holds the relevant output or server log.
    #[must_use]
    pub fn start() -> Postgres {
        let bin_dir = postgres_bin_dir().unwrap_or_else(|| {
            apt_install("postgresql", || postgres_bin_dir().is_some());
            postgres_bin_dir().expect("postgresql installed but no /usr/lib/postgresql/*/bin")
        });
        let dir = tempfile::Builder::new()
            .prefix("holdfast-postgres.")
            .tempdir()
            .expect("temporary directory for PostgreSQL");
        let run_as = if running_as_root() {
            let ids = system_user("postgres").expect("the postgresql package creates `postgres`");
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .expect("chown the PostgreSQL directory to postgres");
            Some(ids)
        } else {
            None
        };
        let mut postgres = Postgres {
            child: None,
            port: 0,
            data_dir: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            bin_dir,
            run_as,
            dir,
        };
        postgres.initdb();
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            postgres.port = free_port();
            match postgres.launch() {
                Ok(()) => return postgres,
                Err(err) if err.contains("Address already in use") => last = err,
                Err(err) => panic!("PostgreSQL did not start: {err}"),
            }
        }
        panic!("PostgreSQL did not start: {last}");
    }

    /// The URL of the default `postgres` database.
    #[must_use]
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The TCP port on 127.0.0.1.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding `psql` and the other client programs of this server's version.
    #[must_use]
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Creates database `name` (used as a quoted identifier, so verbatim) and returns its URL.
    ///
    /// # Panics
    /// When `psql` fails, e.g. because the database exists.
    pub fn create_database(&self, name: &str) -> String {
        let ident = format!("\"{}\"", name.replace('"', "\"\""));
        self.psql("postgres", &format!("CREATE DATABASE {ident}"));
        self.database_url(name)
    }

    /// Runs `sql` with `psql` in `database` and returns its unaligned, tuples-only output
    /// (fields separated by `|`, one row a line), trimmed.
    ///
    /// # Panics
    /// When `psql` cannot run or reports an error.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin_dir.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql {sql:?} in {database} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// SIGKILL to the postmaster, as a crash; the data directory stays for [`Self::restart`].
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it still runs (immediate shutdown) and starts it again on the same
    /// data directory and port, e.g. to exercise crash recovery after [`Self::kill9`].
    ///
    /// # Panics
    /// When the server does not come back within 60 s.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return,
                // Backends of a killed postmaster exit on their own, a moment later.
                Err(err) if err.contains("still in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => panic!("PostgreSQL did not restart: {err}"),
            }
        }
    }

    fn database_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        // The caller's directory may be closed to the `postgres` user.
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn initdb(&self) {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // Only skips flushing the template files; the server itself runs with fsync=on.
            .arg("--no-sync")
            .output()
            .expect("initdb runs");
        assert!(
            output.status.success(),
            "initdb failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the postmaster and waits until it answers; on failure the error holds its log.
    fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the PostgreSQL log");
        let socket_dir = self.dir.path().display().to_string();
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={socket_dir}")])
            .args(["-c", "fsync=on", "-c", "max_connections=200"])
            .stdout(log.try_clone().expect("duplicate the log handle"))
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot spawn postgres: {err}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("poll postgres") {
                return Err(format!(
                    "postgres exited ({status}); log:\n{}",
                    self.log_text()
                ));
            }
            if tcp_accepts(self.port) && self.pg_isready() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "not ready after {START_TIMEOUT:?}; log:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pg_isready(&self) -> bool {
        Command::new(self.bin_dir.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                "2",
            ])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Immediate shutdown (SIGQUIT): the postmaster takes its backends down with it.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The shell's builtin `kill`, as `procps` may be absent.
        let _ = Command::new("sh")
            .args(["-c", "kill -QUIT \"$1\"", "sh", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|err| format!("(no log: {err})"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The temporary directory is removed after this, when the fields drop.
        self.stop();
    }
}

/// A private Redis server on a free loopback port, without persistence. Dropping it kills it.
pub struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Installs `redis-server` when missing and starts one.
    ///
    /// # Panics
    /// When Redis cannot be installed or does not answer `PING` within 60 s; the message holds
    /// its log.
    #[must_use]
    pub fn start() -> Redis {
        let binary = redis_binary().unwrap_or_else(|| {
            apt_install("redis-server", || redis_binary().is_some());
            redis_binary().expect("redis-server installed but not found")
        });
        let dir = tempfile::Builder::new()
            .prefix("holdfast-redis.")
            .tempdir()
            .expect("temporary directory for Redis");
        let log_path = dir.path().join("redis.log");
        let log_text =
            || std::fs::read_to_string(&log_path).unwrap_or_else(|err| format!("(no log: {err})"));
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open the Redis log");
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("duplicate the log handle"))
                .stderr(log)
                .spawn()
                .expect("redis-server spawns");
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait().expect("poll redis-server") {
                    last = format!("redis-server exited ({status}); log:\n{}", log_text());
                    break;
                }
                if redis_pongs(port) {
                    return Redis {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "Redis did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                        log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("Redis did not start: {last}");
    }

    /// The URL of database 0.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port on 127.0.0.1.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The RabbitMQ on 127.0.0.1:5672 that every test process shares (guest/guest, vhost `/`).
///
/// It is started on first use, detached, and deliberately left running when the tests end so
/// that the next test binary reuses it instead of paying RabbitMQ's boot time again.
pub struct RabbitMq {
    addr: SocketAddr,
}

/// The standard AMQP port, where the shared RabbitMQ listens.
const RABBITMQ_PORT: u16 = 5672;

impl RabbitMq {
    /// The shared instance: whatever already speaks AMQP on 127.0.0.1:5672, or else a
    /// `rabbitmq-server` (installed when missing) started now. Concurrent test processes
    /// coordinate through a file lock so that only one of them starts it. Blocking; callable
    /// from synchronous and asynchronous tests alike.
    ///
    /// # Panics
    /// When RabbitMQ cannot be installed or does not accept AMQP within 90 s; the message
    /// holds the tail of its log.
    pub fn shared() -> &'static RabbitMq {
        static SHARED: OnceLock<RabbitMq> = OnceLock::new();
        SHARED.get_or_init(|| {
            let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, RABBITMQ_PORT));
            if !amqp_answers(addr) {
                ensure_rabbitmq(addr);
            }
            RabbitMq { addr }
        })
    }

    /// The AMQP URL for the default vhost as guest.
    #[must_use]
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

/// Starts RabbitMQ unless another process did while this one waited for the lock.
fn ensure_rabbitmq(addr: SocketAddr) {
    let lock_path = std::env::temp_dir().join("holdfast-test-rabbitmq.lock");
    let _lock = exclusive_lock(&lock_path);
    if amqp_answers(addr) {
        return;
    }
    let server = Path::new("/usr/sbin/rabbitmq-server");
    if !server.exists() {
        apt_install("rabbitmq-server", || server.exists());
        // The package may have started its own node (when init scripts may run): use it.
        if wait_for_amqp(addr, Duration::from_secs(5)) {
            return;
        }
    }
    let log_path = std::env::temp_dir().join("holdfast-test-rabbitmq.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open the RabbitMQ log");
    eprintln!(
        "holdfast-testkit: starting RabbitMQ on {addr} (log: {})",
        log_path.display()
    );
    let mut child = Command::new(server)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", RABBITMQ_PORT.to_string())
        // Node-to-node traffic (epmd, distribution port) on loopback only too.
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        // Its own process group: a Ctrl-C on the tests does not take it down.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("duplicate the log handle"))
        .stderr(log)
        .spawn()
        .expect("rabbitmq-server spawns");
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let deadline = Instant::now() + RABBITMQ_TIMEOUT;
    let mut exited = None;
    loop {
        if amqp_answers(addr) {
            // Not waited for: the server outlives this process on purpose.
            drop(child);
            return;
        }
        if exited.is_none()
            && let Some(status) = child.try_wait().expect("poll rabbitmq-server")
        {
            // Fine if a node started by someone else (e.g. the package) is still booting.
            assert!(
                beam_running(),
                "rabbitmq-server exited ({status}); see also /var/log/rabbitmq; log tail:\n{}",
                log_tail()
            );
            exited = Some(status);
        }
        assert!(
            Instant::now() < deadline,
            "RabbitMQ did not accept AMQP on {addr} within {RABBITMQ_TIMEOUT:?} \
             (rabbitmq-server exit: {exited:?}); see also /var/log/rabbitmq; log tail:\n{}",
            log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether the peer answers an AMQP 0-9-1 protocol header with a method frame
/// (`connection.start`), i.e. a broker is up and serving.
fn amqp_answers(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut frame_type = [0u8; 1];
        stream.read_exact(&mut frame_type)?;
        Ok(frame_type[0] == 1)
    };
    probe().unwrap_or(false)
}

fn wait_for_amqp(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if amqp_answers(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// Whether any Erlang VM runs, e.g. a RabbitMQ node still booting.
fn beam_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|comm| comm.trim() == "beam.smp")
    })
}

/// Installs a Debian package unless `installed` already holds, serialised across test
/// threads and processes (dpkg allows one install at a time). Runs `apt-get update` only
/// when a first attempt fails, e.g. on stale package lists.
fn apt_install(package: &str, installed: impl Fn() -> bool) {
    let _lock = exclusive_lock(&std::env::temp_dir().join("holdfast-test-apt.lock"));
    if installed() {
        return;
    }
    eprintln!("holdfast-testkit: installing {package} with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let install = ["install", "-y", "-o", "DPkg::Lock::Timeout=600", package];
    let mut output = apt(&install).expect("apt-get runs");
    if !output.status.success() {
        let _ = apt(&["update", "-o", "DPkg::Lock::Timeout=600"]);
        output = apt(&install).expect("apt-get runs");
    }
    assert!(
        output.status.success() && installed(),
        "apt-get install {package} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Blocks until this process holds an exclusive lock on `path`; released when dropped.
fn exclusive_lock(path: &Path) -> File {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|err| panic!("open lock file {}: {err}", path.display()));
    file.lock()
        .unwrap_or_else(|err| panic!("lock {}: {err}", path.display()));
    file
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding the server programs.
fn postgres_bin_dir() -> Option<PathBuf> {
    let version = |name: &str| -> Option<Vec<u32>> {
        name.split('.').map(|part| part.parse().ok()).collect()
    };
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            ["initdb", "pg_ctl", "postgres", "pg_isready", "psql"]
                .iter()
                .all(|program| bin.join(program).is_file())
                .then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

fn redis_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let fixed = PathBuf::from("/usr/bin/redis-server");
        fixed.is_file().then_some(fixed)
    })
}

/// Whether a Redis on `port` answers `PING` (inline command) with `+PONG`.
fn redis_pongs(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    probe().unwrap_or(false)
}

fn tcp_accepts(port: u16) -> bool {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// A port that was free a moment ago; the server binds it soon after (a rare race with
/// another process is retried by the callers).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The uid and gid of a local system user, from `/etc/passwd`.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a URL path segment.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
