//! [`Proxy`]: a TCP relay on loopback whose connections a test can cut at once, to
//! play a network failure between a client and a broker without touching either.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Forwards every connection on `addr` to the upstream address.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Both ends of every live connection, for [`cut`](Self::cut).
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    cuts: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    ///
    /// # Panics
    /// When no port can be bound.
    #[must_use]
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let registry = Arc::clone(&sockets);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    // The broker is down: refuse, as it would.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                    let mut live = registry
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    live.retain(|s: &TcpStream| s.peer_addr().is_ok());
                    live.push(c);
                    live.push(s);
                }
                pipe(client.try_clone(), server.try_clone());
                pipe(server.try_clone(), client.try_clone());
            }
        });
        Proxy {
            addr,
            sockets,
            cuts: AtomicU64::new(0),
        }
    }

    /// The AMQP URL through the proxy, for the default vhost as guest.
    #[must_use]
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Resets every connection open through the proxy now; new ones are accepted.
    pub fn cut(&self) {
        let mut live = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for socket in live.drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`cut`](Self::cut) ran.
    #[must_use]
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

fn pipe(from: std::io::Result<TcpStream>, to: std::io::Result<TcpStream>) {
    let (Ok(mut from), Ok(mut to)) = (from, to) else {
        return;
    };
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
