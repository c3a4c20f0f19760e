//! `x402-batcher devnet`: a devnet started by hand for a person to try the daemon against,
//! with funded payers, settler keys and a config fragment written out.

use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::U256;

use super::{Devnet, DevnetError, DevnetOptions, X402_CHAIN_ID, payer_keys};

/// What `x402-batcher devnet` starts.
#[derive(Debug, Clone)]
pub struct ByHand {
    /// Where the config and the settler keys are written.
    pub dir: PathBuf,
    /// Settler accounts, each given 1,000 ETH.
    pub settlers: usize,
    /// Payers of the load generator's default seed, each given 1,000 USDC.
    pub payers: usize,
    /// Blocks only every this many seconds (anvil's interval mining); `None`: a block per
    /// transaction and one more every second.
    pub block_time: Option<u64>,
    /// A flashblocks stand-in with a flashblock every this many milliseconds (see
    /// [`super::Flashblocks`]); blocks are then sealed every `block_time` (default 2 s).
    pub flashblock_ms: Option<u64>,
}

/// A devnet to try the daemon by hand: funds settlers and payers, writes `DIR/config.toml`
/// and `DIR/settler.keys`, prints how to run and load the daemon, and makes blocks until
/// `stop` resolves.
pub async fn by_hand(opts: &ByHand, stop: impl std::future::Future<Output = ()>) -> Result<(), DevnetError> {
    let file_err = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| DevnetError::File { path, source }
    };
    std::fs::create_dir_all(&opts.dir).map_err(file_err(&opts.dir))?;
    let net = Devnet::start_with(DevnetOptions {
        chain_id: X402_CHAIN_ID,
        block_time_secs: opts.block_time,
        flashblock_ms: opts.flashblock_ms,
        ..DevnetOptions::default()
    })
    .await?;
    let keys = net.new_settlers("devnet", opts.settlers).await?;
    let payer_addrs: Vec<_> = payer_keys("loadgen", opts.payers).iter().map(|p| p.address()).collect();
    net.fund(&payer_addrs, U256::from(1_000_000_000u64)).await?;
    let keys_path = opts.dir.join("settler.keys");
    crate::settle::write_key_file(&keys_path, &keys).map_err(file_err(&keys_path))?;
    let t = net.token_config();
    let config_path = opts.dir.join("config.toml");
    let config = format!(
        "# Written by `x402-batcher devnet` (see ops/config.devnet.toml).\n{}\n\
         [network_aliases]\ndevnet = {}\n\n\
         [server]\nlisten = \"127.0.0.1:50051\"\n\n[facilitator]\nlisten = \"127.0.0.1:8402\"\n\n\
         [ledger]\npath = \"{}\"\n\n\
         [settlement]\nsettler_keys_file = \"{}\"\nconfirmations = 3\npoll_interval_ms = 200\nmax_wait_ms = 2000\n\n\
         [metrics]\nlisten = \"127.0.0.1:9464\"\n",
        net.token_and_chain_toml(),
        t.chain_id,
        opts.dir.join("ledger").display(),
        keys_path.display(),
    );
    std::fs::write(&config_path, config).map_err(file_err(&config_path))?;
    println!("devnet on {} (chain {}), token {}", net.rpc_url(), t.chain_id, t.address);
    println!(
        "  {} settlers funded; {} payers (seed \"loadgen\") hold 1,000 USDC each",
        keys.len(),
        opts.payers
    );
    println!("  run:  x402-batcher run --config {}", config_path.display());
    println!(
        "  load: x402-batcher loadgen --target http://127.0.0.1:50051 --chain-id {} --token {} --payers {} --payments 2000 --rate 500",
        t.chain_id, t.address, opts.payers
    );
    tokio::pin!(stop);
    if let Some(ms) = opts.flashblock_ms {
        let secs = opts.block_time.unwrap_or(2);
        println!("A flashblock every {ms} ms, a block sealed every {secs} s; Ctrl-C stops the devnet.");
        stop.await;
    } else if let Some(secs) = opts.block_time {
        println!("A block every {secs} s; Ctrl-C stops the devnet.");
        stop.await;
    } else {
        println!("A block every second (besides one per transaction); Ctrl-C stops the devnet.");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    if let Err(e) = net.mine().await {
                        tracing::warn!("devnet block production: {e}");
                    }
                }
            }
        }
    }
    Ok(())
}
