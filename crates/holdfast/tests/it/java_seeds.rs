//! The seed article's Java snippets (transactions, publisher confirms, durability, manual
//! ack, nack with requeue, reject), run with the RabbitMQ Java client against a real broker
//! by `interop/java/run.sh`, which installs the client when missing.

use std::path::PathBuf;
use std::process::Command;

use holdfast_testkit::Server;

use crate::start;

/// Runs `interop/java/run.sh 127.0.0.1 PORT ARGS...` and fails the test with its output
/// when it exits non-zero.
fn run_script(server: &Server, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/java/run.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("127.0.0.1")
        .arg(server.addr.port().to_string())
        .args(args)
        .output()
        .expect("run interop/java/run.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "interop/java/run.sh {args:?} failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

#[test]
fn java_seed_programs_pass() {
    let server = start();
    run_script(&server, &[]);
}

#[test]
fn java_seed_durable_message_survives_a_crash() {
    let mut server = start();
    let suffix = server.pid().to_string();
    run_script(&server, &["SeedDurableRestart", "before", &suffix]);
    // `restart` kills the process with SIGKILL and starts it again on the same data directory.
    server.restart();
    run_script(&server, &["SeedDurableRestart", "after", &suffix]);
}
