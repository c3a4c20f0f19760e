//! The `x402-batcher` command: parses flags ([`cli`]), installs logging, and makes one
//! library call per subcommand.

mod cli;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;

use cli::{Cli, Command, load, read_only_ledger};
use x402_batcher::clock::SystemClock;
use x402_batcher::tools::{demo, devnet, loadgen};
use x402_batcher::{daemon, export, reconcile, x402};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Logs go to stderr; stdout carries only what scripts read (`listening on ADDR`).
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config } => {
            // First: from here on SIGTERM/SIGINT stop the daemon cleanly, and SIGHUP (before
            // the daemon listens for it to reload) is ignored rather than fatal.
            let stop = daemon::shutdown_signal();
            let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            // A process-wide limit: raised by the process that is the daemon, before it opens
            // anything.
            daemon::open_files();
            let config = load(&config)?;
            config.validate_for_run()?;
            x402_batcher::ledger::open::check(&config.ledger)?;
            let listeners = daemon::Listeners::bind(&config).await?;
            println!("{}", listeners.describe()?);
            daemon::serve(config, listeners, Arc::new(SystemClock), stop).await?;
        }
        Command::Demo { payments, payers, payees, settlers, rate, confirmations, dir, http_requests } => {
            // Its daemon runs in this process: the same headroom as `run`.
            daemon::open_files();
            let rate = (rate > 0.0).then_some(rate);
            let opts = demo::DemoOptions {
                payments,
                payers,
                payees,
                settlers,
                rate,
                confirmations,
                dir,
                http_requests,
                ..Default::default()
            };
            demo::run(&opts).await.context("demo failed")?;
        }
        Command::Loadgen(args) => {
            // With --devnet its daemons run in this process: the same headroom as `run`.
            daemon::open_files();
            loadgen::command(cli::loadgen_command(args)?).await?
        }
        Command::Export(args) => {
            let config = load(&args.config)?;
            let over = args.ledger.clone();
            let job = cli::export_job(args)?; // bad flags refused before the ledger is opened
            let s = export::run(&*read_only_ledger(&config, over)?, &config.token_table(), &job)?;
            eprintln!("exported {} rows; log position {}", s.rows, s.cursor);
        }
        Command::Devnet { dir, settlers, payers, block_time, flashblocks_ms } => {
            let opts = devnet::ByHand { dir, settlers, payers, block_time, flashblock_ms: flashblocks_ms };
            devnet::by_hand(&opts, daemon::shutdown_signal()).await?;
        }
        Command::Reconcile { config, ledger, from_block, to_block, chain_id } => {
            let config = load(&config)?;
            let ledger = read_only_ledger(&config, ledger)?;
            let mut out = std::io::stdout().lock();
            if !reconcile::run(&*ledger, &config, from_block, to_block, chain_id, &mut out).await? {
                std::process::exit(1);
            }
        }
        Command::NewToken { name, role } => {
            anyhow::ensure!(role == "api" || role == "admin", "--role must be api or admin");
            let (token, hash) = x402_batcher::auth::new_token().context("reading /dev/urandom")?;
            println!("token (give it to {name}; it is not stored anywhere): {token}\n");
            println!("[[credentials]]\nname = {name:?}\nrole = \"{role}\"\ntoken_sha256 = \"{hash}\"");
        }
        Command::MigrateLedger { config, from } => migrate_ledger(&config, &from)?,
        Command::CheckConfig { config } => {
            let config = load(&config)?;
            x402_batcher::ledger::open::check(&config.ledger)?;
            print!("{}", config.describe_tokens());
            println!("config is valid");
        }
        Command::Status(args) => cli::status(args).await?,
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

/// Copies the RocksDB ledger at `from` into the PostgreSQL ledger `config` names (which
/// must be empty), and reads the copy back.
fn migrate_ledger(config: &std::path::Path, from: &std::path::Path) -> anyhow::Result<()> {
    use x402_batcher::ledger::{LedgerStore as _, PgLedger, RocksLedger};
    let config = load(config)?;
    anyhow::ensure!(
        config.ledger.backend == x402_batcher::config::LedgerBackend::Postgres,
        "--config must name a PostgreSQL ledger ([ledger] backend = \"postgres\")"
    );
    let source = RocksLedger::open_read_only(from).with_context(|| format!("ledger {}", from.display()))?;
    let target = PgLedger::open(x402_batcher::ledger::open::connect(&config.ledger)?)?;
    let chains: Vec<u64> = config.chains.iter().map(|c| c.chain_id).collect();
    let done = target.import(&source, &chains)?;
    println!(
        "copied {} payments, {} changes, {} settlement log entries and {} batches from {} to {}; \
         the copy reads back the same",
        done.records,
        done.changes,
        done.settlement_entries,
        done.batches,
        from.display(),
        target.location()
    );
    Ok(())
}
