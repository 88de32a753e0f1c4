//! The `holdfast` binary: `holdfast server` runs the broker. Configuration loading,
//! tracing and signal handling live here; everything else is in the library crates.

mod config;
mod outbox_cli;
mod replication;

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast_broker::{Broker, BrokerConfig};
use holdfast_store::StoreConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::config::{Config, Replication, SHUTDOWN_GRACE, ServerArgs};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "An AMQP 0-9-1 broker that never loses a confirmed message"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (single node; embedded default with no arguments).
    Server(ServerArgs),
    /// Load-test an AMQP 0-9-1 broker (this one or any other) by URL.
    Bench(holdfast_bench::BenchArgs),
    /// Inspect and repair an application's transactional outbox (rows the relay gave
    /// up on): list, stats, retry, discard.
    Outbox(outbox_cli::OutboxArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // lapin logs a spurious error when a broker closes the socket right after
    // connection.close-ok; the bench reports its own errors.
    let default_filter = match cli.command {
        Command::Server(_) => "info",
        Command::Bench(_) => "warn,lapin=off",
        Command::Outbox(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Server(args) => {
            let config = Config::load(args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_server(config))
        }
        Command::Bench(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(holdfast_bench::run(args))?;
            Ok(())
        }
        Command::Outbox(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(outbox_cli::run(args))
        }
    }
}

async fn run_server(config: Config) -> anyhow::Result<()> {
    info!(data_dir = %config.data_dir.display(), fsync = %config.fsync, "opening store");
    let store = StoreConfig {
        dir: config.data_dir.clone(),
        segment_size: config.segment_size,
        fsync: config.fsync,
    };
    if let Replication::Follow { leader } = &config.replication {
        return replication::follow(leader, store, stop_requested()?).await;
    }
    let broker = Broker::open(BrokerConfig {
        store,
        consumer_timeout: config.consumer_timeout,
        alarms: config.alarms,
    })
    .with_context(|| format!("cannot open data directory {}", config.data_dir.display()))?;
    broker
        .alarms()
        .spawn_monitor(holdfast_broker::alarm::ALARM_CHECK_INTERVAL)
        .context("cannot start the resource alarm monitor")?;
    if let Replication::Lead { listen, mode } = config.replication {
        replication::lead(listen, mode, &broker).await?;
    }
    let listener = TcpListener::bind(config.amqp_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.amqp_listen))?;
    // Tests and scripts read this line to learn the port when asked for port 0.
    info!(amqp = %listener.local_addr()?, "holdfast listening");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(holdfast_amqp::serve(
        listener,
        broker.clone(),
        Arc::new(config.server.clone()),
        shutdown_rx,
    ));
    let mut durable = broker.store().durable();
    let poisoned = tokio::select! {
        () = stop_requested()? => false,
        _ = durable.wait_for(Result::is_err) => true,
    };
    if poisoned {
        // A failed fsync means the disk may not hold what we think it holds: stop at
        // once, confirm nothing more, and let recovery decide what survived.
        error!("the message store failed to make writes durable; stopping the node");
        std::process::exit(70);
    }
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
        info!("connections did not close in time");
    }
    broker
        .store()
        .shutdown()
        .context("final flush of the message store failed")?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, saying which.
///
/// # Errors
/// When the SIGTERM handler cannot be installed.
fn stop_requested() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
    })
}
