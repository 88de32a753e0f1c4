//! Test harness: a real `holdfast` process on a free loopback port and a temporary data
//! directory, killed with SIGKILL or stopped with SIGTERM like an operator would, plus
//! small lapin helpers. Used by the binary's integration tests.

pub mod proxy;
pub mod services;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// A running broker process.
pub struct Server {
    child: Child,
    /// Where it listens for AMQP.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    binary: PathBuf,
    extra_args: Vec<String>,
    /// Every line the process (and its restarts) wrote to stderr.
    log: Arc<Mutex<Vec<String>>>,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `binary` on a fresh temporary data directory.
    ///
    /// # Panics
    /// When the process cannot start or does not report its address in time.
    #[must_use]
    pub fn start(binary: &Path, extra_args: &[&str]) -> Server {
        let temp = tempfile::tempdir().expect("temporary directory");
        let data_dir = temp.path().join("data");
        let mut server = Self::start_in(binary, &data_dir, extra_args);
        server._temp = Some(temp);
        server
    }

    /// Starts `binary` on `data_dir` (kept by the caller, e.g. across restarts).
    ///
    /// # Panics
    /// When the process cannot start or does not report its address in time.
    #[must_use]
    pub fn start_in(binary: &Path, data_dir: &Path, extra_args: &[&str]) -> Server {
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (child, addr) = spawn(binary, data_dir, &extra_args, "127.0.0.1:0", &log);
        Server {
            child,
            addr,
            data_dir: data_dir.to_owned(),
            binary: binary.to_owned(),
            extra_args,
            log,
            _temp: None,
        }
    }

    /// The AMQP URL for the default vhost as guest.
    #[must_use]
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Connects with lapin.
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("lapin connects to holdfast")
    }

    /// How many lines of the server's log so far contain `needle`.
    ///
    /// # Panics
    /// When the log's lock is poisoned.
    #[must_use]
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("server log")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The value of `key=` in the first log line that has it (the server logs its
    /// addresses that way), e.g. `replication` for the replication listener.
    ///
    /// # Panics
    /// When the log's lock is poisoned.
    #[must_use]
    pub fn logged_value(&self, key: &str) -> Option<String> {
        let log = self.log.lock().expect("server log");
        log.iter()
            .find_map(|line| logged(line, key).map(str::to_owned))
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit on its own; its status, or `None` if
    /// it is still running.
    ///
    /// # Panics
    /// When the process cannot be polled.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, and waits for the exit.
    ///
    /// # Panics
    /// When `kill` cannot be run.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.child.wait().expect("server exits")
    }

    /// Starts the same binary on the same data directory and port after a stop.
    ///
    /// # Panics
    /// When it does not come up.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let listen = self.addr.to_string();
        let mut last = None;
        // The old port may linger briefly; retry a few times.
        for _ in 0..50 {
            match try_spawn(
                &self.binary,
                &self.data_dir,
                &self.extra_args,
                &listen,
                &self.log,
            ) {
                Ok((child, addr)) => {
                    self.child = child;
                    self.addr = addr;
                    return;
                }
                Err(err) => {
                    last = Some(err);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("server did not restart: {last:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value the server logged as `key=VALUE` in `line`, if it did.
fn logged<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{key}=");
    let at = line.find(&needle)?;
    line[at + needle.len()..].split_whitespace().next()
}

fn spawn(
    binary: &Path,
    data_dir: &Path,
    extra_args: &[String],
    listen: &str,
    log: &Arc<Mutex<Vec<String>>>,
) -> (Child, SocketAddr) {
    try_spawn(binary, data_dir, extra_args, listen, log).expect("server starts")
}

fn try_spawn(
    binary: &Path,
    data_dir: &Path,
    extra_args: &[String],
    listen: &str,
    log: &Arc<Mutex<Vec<String>>>,
) -> Result<(Child, SocketAddr), String> {
    let mut child = Command::new(binary)
        .arg("server")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--amqp-listen")
        .arg(listen)
        .args(extra_args)
        .env(
            "HOLDFAST_LOG",
            std::env::var("HOLDFAST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| err.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = mpsc::channel();
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("HOLDFAST_TEST_ECHO").is_some() {
                eprintln!("[server] {line}");
            }
            if let Ok(mut log) = log.lock() {
                log.push(line.clone());
            }
            if !sent {
                if let Some(addr) = logged(&line, "amqp") {
                    let _ = tx.send(Ok(addr.to_owned()));
                    sent = true;
                } else if line.contains("ERROR") || line.contains("Error:") {
                    let _ = tx.send(Err(line));
                    sent = true;
                }
            }
        }
        if !sent {
            let _ = tx.send(Err("server exited before listening".into()));
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addr)) => {
            let addr = addr
                .trim_matches('"')
                .parse()
                .map_err(|e| format!("bad address {addr}: {e}"))?;
            Ok((child, addr))
        }
        Ok(Err(line)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(line)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err("timed out waiting for the server".into())
        }
    }
}
