//! `x402-batcher migrate-ledger`: a RocksDB ledger with payments in every state (accepted,
//! batched, settled and finalized, corrected, reversed and settled again, failed, expired,
//! with idempotency keys and a batch) is copied into an empty PostgreSQL ledger, which then
//! reads the same and goes on from where the RocksDB one stopped. A second copy into the
//! now full ledger is refused.

use std::process::Command;

use alloy::primitives::{Address, B256, U256};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, Applied, ApplyRequest, AuthKey, BatchRecord, BatchStatus,
    Command as LedgerCommand, Evidence, LedgerStore, PgConnect, PgLedger, Repeat, RocksLedger, Status,
    Submission, TransitionRequest,
};
use x402_batcher::tools::postgres::TestPostgres;
use x402_batcher::x402::{Authorization, RawSignature, SignedAuthorization};

fn signed(payer: u8, nonce: u8, value: u64) -> SignedAuthorization {
    SignedAuthorization {
        chain_id: 8453,
        token: Address::repeat_byte(0xcc),
        authorization: Authorization {
            from: Address::repeat_byte(payer),
            to: Address::repeat_byte(0xee),
            value: U256::from(value),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX),
            nonce: B256::with_last_byte(nonce),
        },
        signature: RawSignature::from([0; 65]),
    }
}

fn accept(s: SignedAuthorization, idem: &str) -> LedgerCommand {
    LedgerCommand::accept(AcceptRequest {
        signed: s,
        submission: Submission {
            network: "eip155:8453".into(),
            idempotency_key: idem.into(),
            ..Submission::default()
        },
        balance: U256::from(1_000_000u64),
        window: Ok(()),
        now_ms: 1,
    })
    .0
}

fn step(key: AuthKey, to: Status, from: Status, block: u64) -> TransitionRequest {
    let mut t = TransitionRequest::new(key, to, 10 + block);
    t.only_from = Some(from);
    if matches!(to, Status::Included) || (to == Status::Settled && from == Status::Settled) {
        t.evidence = Some(Evidence {
            tx_hash: B256::repeat_byte(block as u8),
            block_number: block,
            block_hash: B256::repeat_byte(block as u8 + 1),
            block_time: 1_000 + block,
            log_index: 1,
            gas_share: 40_000,
            fee_share_wei: U256::from(7),
        });
    }
    t
}

/// Applies `commands` as one group; panics on any error.
fn run(ledger: &dyn LedgerStore, commands: Vec<LedgerCommand>) -> Vec<Applied> {
    ledger.apply_group(&commands).results.into_iter().map(|r| r.expect("applied")).collect()
}

/// A RocksDB ledger with payments in every state.
fn populate(ledger: &dyn LedgerStore) {
    let keys: Vec<AuthKey> = (0..8).map(|n| AuthKey::of(&signed(1 + n % 3, n, 100 + u64::from(n)))).collect();
    run(
        ledger,
        (0..8).map(|n| accept(signed(1 + n % 3, n, 100 + u64::from(n)), &format!("idem-{n}"))).collect(),
    );
    let batch = BatchRecord {
        chain_id: 8453,
        counter: 1,
        token: Address::repeat_byte(0xcc),
        settler: Address::repeat_byte(0x5e),
        items: keys[..4].to_vec(),
        cut_reason: "size".into(),
        status: BatchStatus::Signed,
        attempts: Vec::new(),
        created_at_ms: 5,
        updated_at_ms: 5,
        gas_limit: 300_000,
        inclusion: None,
    };
    let batched: Vec<_> = keys[..4].iter().map(|k| step(*k, Status::Batched, Status::Accepted, 0)).collect();
    run(
        ledger,
        vec![
            LedgerCommand::apply(ApplyRequest {
                transitions: batched,
                batch: Some(batch),
                atomic: true,
                fence: None,
            })
            .0,
        ],
    );
    let on = |k: &[AuthKey], to, from, block| -> Vec<LedgerCommand> {
        k.iter().map(|k| LedgerCommand::transition(step(*k, to, from, block)).0).collect()
    };
    run(ledger, on(&keys[..4], Status::Submitted, Status::Batched, 0));
    run(ledger, on(&keys[..4], Status::Included, Status::Submitted, 20));
    run(ledger, on(&keys[..4], Status::Settled, Status::Included, 20));
    // One corrected, one reversed and settled again, one finalized.
    run(ledger, on(&keys[..1], Status::Settled, Status::Settled, 21));
    run(ledger, on(&keys[1..2], Status::Accepted, Status::Settled, 0));
    run(ledger, on(&keys[1..2], Status::Included, Status::Accepted, 22));
    run(ledger, on(&keys[1..2], Status::Settled, Status::Included, 22));
    let mut fin = step(keys[2], Status::Settled, Status::Settled, 0);
    fin.evidence = None;
    fin.finalize = true;
    run(ledger, vec![LedgerCommand::transition(fin).0]);
    run(ledger, on(&keys[4..5], Status::Failed, Status::Accepted, 0));
    run(ledger, on(&keys[5..6], Status::Expired, Status::Accepted, 0));
}

#[test]
fn a_rocksdb_ledger_is_copied_into_postgres_and_goes_on_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    {
        let rocks = RocksLedger::open(&path).unwrap();
        populate(&rocks);
    }
    let pg = TestPostgres::start().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, format!("[ledger]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.url())).unwrap();
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_x402-batcher"))
            .args(["migrate-ledger", "--config"])
            .arg(&config)
            .arg("--from")
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = migrate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("copied 8 payments") && stdout.contains("1 batches"), "{stdout}");

    let rocks = RocksLedger::open_read_only(&path).unwrap();
    let copy = PgLedger::open(PgConnect::new(&pg.url(), None).unwrap()).unwrap();
    assert_eq!(copy.records().unwrap(), rocks.records().unwrap());
    assert_eq!(copy.events_after(0, usize::MAX).unwrap(), rocks.events_after(0, usize::MAX).unwrap());
    assert_eq!(copy.settlement_log(0, usize::MAX).unwrap(), rocks.settlement_log(0, usize::MAX).unwrap());
    assert_eq!(copy.pending_records().unwrap(), rocks.pending_records().unwrap());
    assert_eq!(copy.watched().unwrap(), rocks.watched().unwrap());
    assert_eq!(copy.exposures().unwrap(), rocks.exposures().unwrap());
    assert_eq!(copy.batches(8453).unwrap(), rocks.batches(8453).unwrap());
    assert_eq!(
        (copy.last_seq(), copy.last_settlement(), copy.pending()),
        (rocks.last_seq(), rocks.last_settlement(), rocks.pending())
    );
    for r in rocks.records().unwrap() {
        assert_eq!(copy.get_by_id(&r.payment_id()).unwrap(), Some(r));
    }

    // It goes on: a retry under its idempotency key is the same payment, a different
    // transfer under a used nonce a double spend, a new payment the next change.
    let last = copy.last_seq();
    let answers = copy.apply_group(&[
        accept(signed(1, 0, 100), "idem-0"),
        accept(signed(1, 0, 555), ""),
        accept(signed(9, 9, 1), ""),
    ]);
    match &answers.results[..] {
        [
            Ok(Applied::Accept(AcceptOutcome::Duplicate(_, Repeat::Retry))),
            Ok(Applied::Accept(AcceptOutcome::Refused { .. })),
            Ok(Applied::Accept(AcceptOutcome::Accepted(new))),
        ] => assert_eq!(new.seq, last + 1),
        other => panic!("{other:?}"),
    }
    drop(copy);

    // Into a ledger that is not empty: refused, nothing changed.
    let out = migrate();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");
    let copy = PgLedger::open_read_only(PgConnect::new(&pg.url(), None).unwrap()).unwrap();
    assert_eq!(copy.last_seq(), last + 1);
}
