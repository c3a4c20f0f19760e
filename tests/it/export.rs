//! `x402-batcher export`, the binary, over a ledger a writer holds open (as the daemon
//! does): CSV a standard reader parses with amounts that round-trip exactly, JSON Lines,
//! incremental runs from a cursor file that see every final payment exactly once, each
//! filter, and per-payee daily totals.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use x402_batcher::export::format_units;
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, AuthKey, Evidence, LedgerHandle, RocksLedger, Status, Submission,
    TransitionRequest,
};
use x402_batcher::tools::devnet::payer_keys;
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::x402::SignedAuthorization;
use x402_batcher::x402::eip712::TokenDomain;

const CHAIN: u64 = 8453;
const TOKEN: Address = Address::repeat_byte(0x11);
const OTHER_TOKEN: Address = Address::repeat_byte(0x22);
const PAYEES: [Address; 2] = [Address::repeat_byte(0xa1), Address::repeat_byte(0xa2)];
/// 2026-11-20T12:00:00Z and the next day.
const DAY1: u64 = 1_795_176_000;
const DAY2: u64 = DAY1 + 86_400;
/// A resource with every character CSV must quote.
const RESOURCE: &str = "https://api.example/v1/items?a=1,b=\"two\"\nnext";

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    handle: LedgerHandle,
    /// The writer thread, joined when the fixture goes: RocksDB closed before the process
    /// exits (a database still closing while the process tears down aborts it).
    writer: Option<std::thread::JoinHandle<()>>,
    /// Payment id -> (payer, payee, token, value, final status once it has one).
    payments: BTreeMap<String, (Address, Address, Address, U256, Option<Status>)>,
    keys: Vec<(String, AuthKey)>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let config = path.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{}\"\n[[chains]]\nchain_id = {CHAIN}\nrpc_url = \"http://127.0.0.1:1\"\n\
             [[tokens]]\nchain_id = {CHAIN}\naddress = \"{TOKEN}\"\neip712_name = \"USD Coin\"\neip712_version = \"2\"\n\
             decimals = 6\nsymbol = \"USDC\"\n",
            path.join("ledger").display()
        ),
    )
    .unwrap();
    let ledger = Arc::new(RocksLedger::open(&path.join("ledger")).unwrap());
    let (handle, writer) = LedgerHandle::start(ledger, 64).unwrap();
    Fixture {
        _dir: dir,
        dir: path,
        config,
        handle,
        writer: Some(writer),
        payments: BTreeMap::new(),
        keys: Vec::new(),
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Fixture {
    /// Accepts `n` payments from 3 payers to the 2 payees; a few are in another token.
    async fn accept(&mut self, n: usize, tag: u64) {
        let payers = payer_keys("export", 3);
        for i in 0..n {
            let token = if i % 7 == 6 { OTHER_TOKEN } else { TOKEN };
            let domain = TokenDomain::new("USD Coin", "2", CHAIN, token);
            let signed: SignedAuthorization = PaymentBuilder::new(&payers[i % 3], &domain, DAY1)
                .to(PAYEES[i % 2])
                .value(1_000_001 + (tag * 1000 + i as u64) * 7_919)
                .nonce_index(tag * 1_000 + i as u64)
                .build();
            let req = AcceptRequest {
                signed: signed.clone(),
                submission: Submission {
                    network: "base".into(),
                    max_timeout_seconds: 60,
                    idempotency_key: String::new(),
                    resource: RESOURCE.into(),
                    api_server: format!("api-{}", i % 2),
                    ..Submission::default()
                },
                balance: U256::from(u64::MAX),
                window: Ok(()),
                now_ms: DAY1 * 1000,
            };
            let AcceptOutcome::Accepted(r) = self.handle.accept(req).await.unwrap() else {
                panic!("accepted")
            };
            let a = &signed.authorization;
            self.payments.insert(r.payment_id().to_string(), (a.from, a.to, token, a.value, None));
            self.keys.push((r.payment_id().to_string(), r.key()));
        }
    }

    /// Makes the first `n` not yet final payments final: every fifth fails, every
    /// seventh expires, the rest settle, half in a block of DAY1, half of DAY2.
    async fn finish(&mut self, n: usize) {
        let open: Vec<(String, AuthKey)> =
            self.keys.iter().filter(|(id, _)| self.payments[id].4.is_none()).take(n).cloned().collect();
        for (i, (id, key)) in open.into_iter().enumerate() {
            let status = match i {
                _ if i % 5 == 4 => Status::Failed,
                _ if i % 7 == 3 => Status::Expired,
                _ => Status::Settled,
            };
            let mut t = TransitionRequest::new(key, status, DAY2 * 1000);
            if status == Status::Settled {
                let mut b = TransitionRequest::new(key, Status::Batched, DAY1 * 1000);
                b.batch_id = Some(format!("{CHAIN}:{i}"));
                self.handle.transition(b).await.unwrap();
                self.handle
                    .transition(TransitionRequest::new(key, Status::Submitted, DAY1 * 1000))
                    .await
                    .unwrap();
                let mut inc = TransitionRequest::new(key, Status::Included, DAY1 * 1000);
                inc.evidence = Some(Evidence {
                    tx_hash: B256::repeat_byte(i as u8),
                    block_number: 100 + i as u64,
                    block_hash: B256::repeat_byte(0x80 | i as u8),
                    block_time: if i % 2 == 0 { DAY1 + 60 } else { DAY2 + 60 },
                    log_index: i as u64,
                    gas_share: 45_000,
                    fee_share_wei: U256::from(45_000u64 * 1_000_000_007),
                });
                self.handle.transition(inc).await.unwrap();
            } else {
                t.failure = Some((x402_batcher::x402::Reason::InsufficientFunds, "drained".into()));
            }
            self.handle.transition(t).await.unwrap();
            self.payments.get_mut(&id).unwrap().4 = Some(status);
        }
    }

    fn export(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_x402-batcher"))
            .args(["export", "--config"])
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "export {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Which rows of the full export a filter should leave.
type Select<'a> = dyn Fn(&csv::StringRecord) -> bool + 'a;

fn csv_rows(text: &str) -> Vec<csv::StringRecord> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let header = reader.headers().unwrap().clone();
    assert_eq!(header.iter().collect::<Vec<_>>(), x402_batcher::export::COLUMNS);
    reader.records().map(|r| r.unwrap()).collect()
}

fn col(name: &str) -> usize {
    x402_batcher::export::COLUMNS.iter().position(|c| *c == name).unwrap()
}

fn ids(rows: &[csv::StringRecord]) -> Vec<String> {
    rows.iter().map(|r| r[col("payment_id")].to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_parses_and_amounts_round_trip_while_the_ledger_is_open() {
    let mut f = fixture();
    f.accept(20, 1).await;
    f.finish(20).await;
    let rows = csv_rows(&f.export(&[]));
    assert_eq!(rows.len(), 20);
    for r in &rows {
        let (payer, payee, token, value, status) = &f.payments[&r[col("payment_id")]];
        assert_eq!(r[col("payer")].parse::<Address>().unwrap(), *payer);
        assert_eq!(r[col("payee")].parse::<Address>().unwrap(), *payee);
        assert_eq!(r[col("token")].parse::<Address>().unwrap(), *token);
        assert_eq!(r[col("amount_base_units")].parse::<U256>().unwrap(), *value, "exact base units");
        if *token == TOKEN {
            assert_eq!(&r[col("amount")], format_units(*value, 6), "exact decimal");
            assert_eq!(&r[col("symbol")], "USDC");
        } else {
            assert_eq!(&r[col("amount")], "", "no decimals for a token the config does not know");
        }
        assert_eq!(&r[col("resource")], RESOURCE, "quoted and unquoted back");
        let want = match status.unwrap() {
            Status::Settled => "settled",
            Status::Failed => "failed",
            _ => "expired",
        };
        assert_eq!(&r[col("status")], want);
        assert_eq!(&r[col("accepted_at")], "2026-11-20T12:00:00.000Z");
        if want == "settled" {
            assert!(
                ["2026-11-20T12:01:00.000Z", "2026-11-21T12:01:00.000Z"].contains(&&r[col("block_time")])
            );
            assert!(!r[col("tx_hash")].is_empty() && !r[col("batch_id")].is_empty());
            assert_eq!(&r[col("gas_share")], "45000");
        } else {
            assert_eq!(&r[col("reason")], "insufficient_funds");
            assert_eq!(&r[col("block_time")], "", "no block: no block time");
        }
        assert!(!r[col("recorded_at")].is_empty(), "the daemon's time of the entry");
    }

    // JSON Lines: the same rows, as objects of strings.
    let jsonl = f.export(&["--format", "jsonl"]);
    let objects: Vec<serde_json::Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 20);
    for (o, r) in objects.iter().zip(&rows) {
        assert_eq!(o["payment_id"], r[col("payment_id")]);
        assert_eq!(o["amount_base_units"], r[col("amount_base_units")]);
        assert_eq!(o["resource"], RESOURCE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_incremental_exports_see_every_final_payment_once() {
    let mut f = fixture();
    f.accept(30, 2).await;
    let cursor = f.path("export.cursor");
    let cursor_arg = cursor.to_str().unwrap();
    let mut seen = Vec::new();
    for step in [7, 11, 12] {
        f.finish(step).await;
        let rows = csv_rows(&f.export(&["--cursor", cursor_arg]));
        assert_eq!(rows.len(), step, "only what became final since the last run");
        seen.extend(ids(&rows));
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(seen.len(), 30);
    assert_eq!(unique.len(), 30, "no duplicates");
    let finals: HashSet<_> = f.payments.iter().filter(|(_, p)| p.4.is_some()).map(|(id, _)| id).collect();
    assert_eq!(unique, finals, "no gaps");
    // Nothing new: an empty export, and the cursor stays.
    let before = std::fs::read_to_string(&cursor).unwrap();
    assert!(csv_rows(&f.export(&["--cursor", cursor_arg])).is_empty());
    assert_eq!(std::fs::read_to_string(&cursor).unwrap(), before);
}

/// The time the filters go by: a settled row's `block_time`, another's `recorded_at`.
fn final_at(r: &csv::StringRecord) -> &str {
    let block = &r[col("block_time")];
    if block.is_empty() { &r[col("recorded_at")] } else { block }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_selects_exactly_its_payments() {
    let mut f = fixture();
    f.accept(28, 3).await;
    f.finish(28).await;
    let all = csv_rows(&f.export(&[]));
    let expect = |pred: &Select<'_>| -> HashSet<String> {
        all.iter().filter(|r| pred(r)).map(|r| r[col("payment_id")].to_owned()).collect()
    };
    let got = |args: &[&str]| -> HashSet<String> { ids(&csv_rows(&f.export(args))).into_iter().collect() };
    let payer = format!("{}", f.payments.values().next().unwrap().0);
    let payee = format!("{}", PAYEES[1]);
    let cases: Vec<(Vec<&str>, Box<Select<'_>>)> = vec![
        (vec!["--payer", &payer], Box::new(|r| r[col("payer")].eq_ignore_ascii_case(&payer))),
        (vec!["--payee", &payee], Box::new(|r| r[col("payee")].eq_ignore_ascii_case(&payee))),
        (vec!["--status", "failed"], Box::new(|r| &r[col("status")] == "failed")),
        (vec!["--status", "settled"], Box::new(|r| &r[col("status")] == "settled")),
        (vec!["--chain-id", "8453"], Box::new(|_| true)),
        (vec!["--chain-id", "1"], Box::new(|_| false)),
        (
            vec!["--token", "0x2222222222222222222222222222222222222222"],
            Box::new(|r| r[col("token")].starts_with("0x2222")),
        ),
        // Settled ones at their block's time (day 1 or 2); the others at the recorded time (day 2).
        (vec!["--from", "2026-11-21"], Box::new(|r| final_at(r).starts_with("2026-11-21"))),
        (vec!["--to", "2026-11-21"], Box::new(|r| final_at(r).starts_with("2026-11-20"))),
        (
            vec!["--from", "2026-11-20T12:00:00Z", "--to", "2026-11-20T12:01:01Z", "--status", "settled"],
            Box::new(|r| final_at(r).starts_with("2026-11-20T12:01")),
        ),
    ];
    for (args, pred) in &cases {
        let want = expect(pred.as_ref());
        assert_eq!(got(args), want, "{args:?}");
    }
    assert!(expect(&|r| r[col("token")].starts_with("0x2222")).len() >= 3, "the fixture has both tokens");
    assert!(!got(&["--status", "failed"]).is_empty());

    // A bad filter value is refused, with the flag named.
    let out = Command::new(env!("CARGO_BIN_EXE_x402-batcher"))
        .args(["export", "--config"])
        .arg(&f.config)
        .args(["--from", "2026-02-30"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from"));

    // Totals per payee per day: the settled sums, exactly.
    let totals = f.path("totals.csv");
    f.export(&["--totals", totals.to_str().unwrap()]);
    let text = std::fs::read_to_string(&totals).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let mut sum_rows = U256::ZERO;
    let mut n_rows = 0u64;
    for r in reader.records() {
        let r = r.unwrap();
        sum_rows += r[6].parse::<U256>().unwrap();
        n_rows += r[5].parse::<u64>().unwrap();
    }
    let settled: Vec<_> = f.payments.values().filter(|p| p.4 == Some(Status::Settled)).collect();
    assert_eq!(n_rows, settled.len() as u64);
    assert_eq!(sum_rows, settled.iter().map(|p| p.3).sum::<U256>());
}
