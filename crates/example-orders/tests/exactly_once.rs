//! Fault injection over the whole path of the seed article's scenario, counting effects.
//!
//! A real Holdfast broker, the order service (orders + outbox in SQLite, relay in
//! process) and the payment service (payments + processed-message store in a real
//! PostgreSQL) run as separate processes, connected through a TCP proxy plus a direct
//! URL (so cut connections fail over). While orders stream in, the test repeatedly and at
//! random: SIGKILLs the order service (before/after its commit, before/after a confirm,
//! between a confirm and the `sent` mark), SIGKILLs the payment service (before/after
//! its database commit, before its ack), SIGKILLs the broker, and cuts every proxied
//! connection. Then it lets everything drain and checks, per committed order, that
//! exactly one payment exists.
//!
//! Needs the broker binary built with the same profile (`cargo test --workspace` does).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_testkit::Server;
use holdfast_testkit::proxy::Proxy;
use holdfast_testkit::services::Postgres;
use rand::Rng;
use rand::seq::SliceRandom;

const ORDERS: i64 = 2500;
const RATE: u32 = 125;
const CHAOS: Duration = Duration::from_secs(16);

fn broker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let binary = dir.join("holdfast");
    assert!(
        binary.exists(),
        "{} missing: build the workspace (`cargo build -p holdfast`)",
        binary.display()
    );
    binary
}

/// One of the two services, restartable, with each incarnation's output kept.
struct Service {
    name: &'static str,
    binary: &'static str,
    args: Vec<String>,
    logs: PathBuf,
    child: Option<Child>,
    incarnations: usize,
}

impl Service {
    fn start(&mut self) {
        self.incarnations += 1;
        let out = File::create(
            self.logs
                .join(format!("{}-{}.out", self.name, self.incarnations)),
        )
        .expect("log file");
        let err = File::create(
            self.logs
                .join(format!("{}-{}.err", self.name, self.incarnations)),
        )
        .expect("log file");
        let child = Command::new(self.binary)
            .args(&self.args)
            .env("HOLDFAST_LOG", "warn,lapin=off")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("service starts");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `stats ...` line of every incarnation, summed per field.
    fn stat(&self, field: &str) -> u64 {
        (1..=self.incarnations)
            .filter_map(|i| {
                let text =
                    std::fs::read_to_string(self.logs.join(format!("{}-{i}.out", self.name)))
                        .ok()?;
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("stats "))?
                    .to_owned();
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{field}=")).map(str::to_owned))?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    fn last_error_log(&self) -> String {
        std::fs::read_to_string(
            self.logs
                .join(format!("{}-{}.err", self.name, self.incarnations)),
        )
        .unwrap_or_default()
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .join("\n")
    }
}

#[test]
fn every_committed_order_is_charged_exactly_once_through_crashes_and_cuts() {
    let logs = tempfile::tempdir().expect("tempdir");
    let mut broker = Server::start(&broker_binary(), &[]);
    let proxy = Proxy::start(broker.addr);
    let pg = Postgres::start();
    let payments_url = pg.create_database("payments");
    let orders_db = logs.path().join("orders.db");
    let urls = [proxy.url(), broker.url()];
    let amqp: Vec<String> = urls
        .iter()
        .flat_map(|u| ["--amqp".to_owned(), u.clone()])
        .collect();

    let mut orders = Service {
        name: "order-service",
        binary: env!("CARGO_BIN_EXE_order-service"),
        args: [
            amqp.clone(),
            vec![
                "--database".into(),
                orders_db.to_str().expect("utf-8").into(),
                "--orders".into(),
                ORDERS.to_string(),
                "--rate".into(),
                RATE.to_string(),
            ],
        ]
        .concat(),
        logs: logs.path().to_owned(),
        child: None,
        incarnations: 0,
    };
    let mut payments = Service {
        name: "payment-service",
        binary: env!("CARGO_BIN_EXE_payment-service"),
        args: [amqp, vec!["--database".into(), payments_url.clone()]].concat(),
        logs: logs.path().to_owned(),
        child: None,
        incarnations: 0,
    };
    payments.start();
    orders.start();

    let mut rng = rand::rng();
    let (mut order_kills, mut payment_kills, mut broker_kills) = (0, 0, 0);
    let chaos_until = Instant::now() + CHAOS;
    // Every kind of fault in each round of four, in random order, so that none can be
    // missing from a run.
    let mut kinds: Vec<u8> = Vec::new();
    while Instant::now() < chaos_until {
        std::thread::sleep(Duration::from_millis(rng.random_range(400..1200)));
        if kinds.is_empty() {
            kinds = vec![0, 1, 2, 3];
            kinds.shuffle(&mut rng);
        }
        match kinds.pop().expect("refilled above") {
            0 => {
                orders.kill9();
                order_kills += 1;
                std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                orders.start();
            }
            1 => {
                payments.kill9();
                payment_kills += 1;
                std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                payments.start();
            }
            2 => {
                broker.kill9();
                broker_kills += 1;
                std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                broker.restart();
            }
            _ => proxy.cut(),
        }
    }

    // Calm: the order service finishes creating and relaying, the payments catch up.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let child = orders.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "order service did not finish: {}",
            orders.last_error_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "order service failed: {}",
        orders.last_error_log()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let order_ids: HashSet<String> = runtime.block_on(async {
        let pool = holdfast_client::outbox::connect_sqlite(orders_db.to_str().expect("utf-8"))
            .await
            .expect("orders db");
        let rows: Vec<(String,)> = holdfast_client::sqlx::query_as("SELECT id FROM orders")
            .fetch_all(&pool)
            .await
            .expect("orders");
        rows.into_iter().map(|(id,)| id).collect()
    });
    let committed = order_ids.len();
    let charges_per_order = || -> HashMap<String, usize> {
        pg.psql(
            "payments",
            "SELECT order_id, COUNT(*) FROM payments GROUP BY order_id",
        )
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(id, n)| (id.to_owned(), n.parse().expect("a count")))
        .collect()
    };
    loop {
        let charged = charges_per_order();
        if charged.len() >= committed {
            break;
        }
        if Instant::now() >= deadline {
            // Enough to tell a lost message from a stuck one next time this happens.
            let missing: Vec<&String> = order_ids
                .iter()
                .filter(|id| !charged.contains_key(*id))
                .take(5)
                .collect();
            panic!(
                "payments did not catch up: {} of {committed} orders charged by the deadline; \
                 missing e.g. {missing:?}; faults: {order_kills} order-service kill -9, \
                 {payment_kills} payment-service kill -9, {broker_kills} broker kill -9; \
                 payment-service errors: {}",
                charged.len(),
                payments.last_error_log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Anything still in flight would show as a duplicate now: give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    payments.kill9();

    let charged = charges_per_order();
    let lost = order_ids
        .iter()
        .filter(|id| !charged.contains_key(*id))
        .count();
    let duplicated: usize = charged.values().map(|n| n - 1).sum();
    let unknown = charged.keys().filter(|id| !order_ids.contains(*id)).count();
    let charged_orders = charged.len();
    let absorbed = payments.stat("duplicates");
    eprintln!(
        "exactly-once: {committed} committed orders, {charged_orders} charged, {lost} lost, \
         {duplicated} duplicated effects; faults: {order_kills} order-service kill -9, \
         {payment_kills} payment-service kill -9, {broker_kills} broker kill -9, {} connection cuts; \
         {absorbed} redeliveries recognised and acked without a charge (counted from the \
         last stats line of each payment-service run, so a lower bound)",
        proxy.cuts()
    );
    assert!(
        order_kills > 0 && payment_kills > 0 && broker_kills > 0 && proxy.cuts() > 0,
        "every kind of fault was injected: {order_kills} order-service kill -9, \
         {payment_kills} payment-service kill -9, {broker_kills} broker kill -9, {} cuts",
        proxy.cuts()
    );
    assert_eq!(
        committed,
        usize::try_from(ORDERS).expect("count"),
        "every order was created"
    );
    assert_eq!(lost, 0, "every committed order is charged");
    assert_eq!(duplicated, 0, "no order is charged twice");
    assert_eq!(
        unknown, 0,
        "no charge for an order that was never committed"
    );
}
