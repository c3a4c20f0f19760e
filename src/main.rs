//! The `x402-batcher` command: parses flags, installs logging, and calls into the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use std::sync::Arc;

use x402_batcher::clock::SystemClock;
use x402_batcher::{config::Config, daemon, demo, x402};

#[derive(Parser)]
#[command(version, about = "Verifies, durably records and batch-settles x402 (EIP-3009) payments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: verify, record and (later) settle payments submitted over gRPC.
    /// Stops accepting on SIGTERM or SIGINT, answers what is in flight, and exits 0.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local devnet, verify signed sample payments and settle one on chain.
    Demo {
        /// Number of sample payments to verify.
        #[arg(long, default_value_t = demo::DemoOptions::default().payments)]
        payments: usize,
        /// Number of distinct payers.
        #[arg(long, default_value_t = demo::DemoOptions::default().payers)]
        payers: usize,
    },
    /// Validate a config file and print its token table.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Decode an x402 payment header (v1 X-PAYMENT or v2 PAYMENT-SIGNATURE) and print it,
    /// or the reason code it would be refused with.
    Decode {
        /// The header value (base64).
        header: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Logs go to stderr; stdout carries only what scripts read (`listening on ADDR`).
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config } => {
            let config = Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            config.validate_for_run()?;
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.server.listen))?;
            println!("listening on {}", listener.local_addr()?);
            daemon::serve(config, listener, Arc::new(SystemClock), shutdown_signal()).await?;
        }
        Command::Demo { payments, payers } => {
            demo::run(&demo::DemoOptions { payments, payers }).await.context("demo failed")?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            for t in &config.tokens {
                println!(
                    "chain {:>8}  {}  {:<6} domain {:?}/{:?}  {} decimals",
                    t.chain_id, t.address, t.symbol, t.eip712_name, t.eip712_version, t.decimals
                );
            }
            println!("config is valid");
        }
        Command::Decode { header } => match x402::decode::decode_header(&header) {
            Ok(payload) => println!("{payload:#?}"),
            Err(e) => {
                println!("refused: {} ({e})", e.reason());
                std::process::exit(1);
            }
        },
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
