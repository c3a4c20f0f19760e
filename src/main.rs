//! The `x402-batcher` command: parses flags, installs logging, and calls into the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use x402_batcher::{config::Config, demo, x402};

#[derive(Parser)]
#[command(version, about = "Verifies, durably records and batch-settles x402 (EIP-3009) payments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
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
