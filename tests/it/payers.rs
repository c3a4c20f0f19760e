//! Payers with code on a real anvil: a contract wallet (ERC-1271) and an EIP-7702 account
//! (delegated by a real type-4 transaction) pay and settle in the same batch as keys; a
//! 7702 account whose delegate has no ERC-1271 is refused at submission although its ECDSA
//! signature recovers; a counterfactual wallet (ERC-6492) from a factory not allow-listed
//! is refused; a wallet whose owner changes after acceptance fails at pre-simulation and its
//! exposure is released.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use common::daemon::TestDaemon;
use common::settle::{Miner, is_final, ledger_after, settling_daemon, status, submit, wait_for};
use x402_batcher::api::v1;
use x402_batcher::chain::IEip3009;
use x402_batcher::chain::RpcEndpoint;
use x402_batcher::client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::ledger::{AuthKey, LedgerStore as _, RocksLedger};
use x402_batcher::payer::{ChainVerdict, PayerCode, Route, check_signatures, probe_payers};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::tools::wallets::{Wallets, erc6492_signature, owned_wallet_signature};
use x402_batcher::x402::{RawSignature, SignedAuthorization};

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xbe);

/// Submits `signed`; the refusal's reason and message, or `None` if accepted.
async fn refusal(d: &TestDaemon, signed: &SignedAuthorization) -> Option<(String, String)> {
    let mut c = d.ingest().await;
    let req = client::typed_request("t".into(), signed, &testkit::requirements_for(signed));
    match c.submit(req).await.expect("no transport error").into_inner().outcome {
        Some(v1::submit_reply::Outcome::Rejected(r)) => Some((r.reason, r.message)),
        Some(v1::submit_reply::Outcome::Accepted(_)) => None,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Submits `items` while settlement is paused, then resumes it: they go out in one batch.
/// Their payment ids.
async fn submit_as_one_batch(d: &TestDaemon, items: &[SignedAuthorization]) -> Vec<String> {
    let mut admin = d.admin().await;
    let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
    admin.update_policy(pause(true)).await.unwrap();
    let mut ids = Vec::new();
    for s in items {
        ids.push(submit(d, s).await);
    }
    admin.update_policy(pause(false)).await.unwrap();
    ids
}

/// A wallet of `owner` (created, funded with `balance`) and a payment builder for it.
async fn funded_wallet(
    net: &Devnet,
    w: &Wallets,
    owner: &PrivateKeySigner,
    salt: u64,
    balance: u64,
) -> Address {
    let wallet = w.create_wallet(net, owner.address(), salt).await.unwrap();
    net.fund(&[wallet], U256::from(balance)).await.unwrap();
    wallet
}

fn wallet_payment(
    d: &TestDaemon,
    owner: &PrivateKeySigner,
    wallet: Address,
    value: u64,
    i: u64,
) -> SignedAuthorization {
    PaymentBuilder::new(owner, &d.domain(), SystemClock.now_unix())
        .from(wallet)
        .to(PAYEE)
        .value(value)
        .nonce_index(i)
        .wrap_signature(owned_wallet_signature)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallets_and_7702_accounts_pay_and_settle_in_one_batch_with_keys() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let w = Wallets::deploy(&net).await.unwrap();
        let d = settling_daemon(&net, "payers", 1, |_| {}).await;
        let keys = devnet::payer_keys("payers", 4);
        let (owner, account, eoas) = (&keys[0], &keys[1], &keys[2..]);
        let wallet = funded_wallet(&net, &w, owner, 1, 1_000_000).await;
        w.delegate(&net, account, w.self_signed).await.unwrap();
        let addrs: Vec<_> = keys[1..].iter().map(|k| k.address()).collect();
        net.fund(&addrs, U256::from(1_000_000u64)).await.unwrap();

        let now = SystemClock.now_unix();
        let mut items = vec![
            wallet_payment(&d, owner, wallet, 1_001, 1),
            PaymentBuilder::new(account, &d.domain(), now).to(PAYEE).value(1_002).nonce_index(2).build(),
        ];
        for (i, k) in eoas.iter().enumerate() {
            items.push(
                PaymentBuilder::new(k, &d.domain(), now)
                    .to(PAYEE)
                    .value(1_003 + i as u64)
                    .nonce_index(3)
                    .build(),
            );
        }
        assert_eq!(items[0].signature.as_bytes().len(), 192, "the wallet's signature is not ECDSA-shaped");
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let ids = submit_as_one_batch(&d, &items).await;

        let done = wait_for(&d, &ids, WAIT, is_final).await;
        for p in &done {
            assert_eq!(status(p), v1::PaymentStatus::Settled, "{p:?}");
        }
        let token = IEip3009::new(net.token(), net.provider());
        for s in &items {
            let used =
                token.authorizationState(s.authorization.from, s.authorization.nonce).call().await.unwrap();
            assert!(used, "AuthorizationUsed for {}", s.authorization.from);
        }
        assert_eq!(net.balance_of(wallet).await.unwrap(), U256::from(1_000_000u64 - 1_001));
        let dir = Arc::clone(&d.dir);
        d.stop().await;

        let (log, _) = ledger_after(dir.path(), net.chain_id());
        let tx = log[0].tx_hash;
        assert!(log.iter().all(|r| r.tx_hash == tx), "one transaction for the batch: {log:?}");
        let route = |from: Address| {
            log.iter().find(|r| r.signed.authorization.from == from).unwrap().submission.route
        };
        assert_eq!(route(wallet), Route::Erc1271);
        assert_eq!(route(account.address()), Route::Eip7702);
        assert_eq!(route(eoas[0].address()), Route::Eoa);
    })
    .await
    .expect("within the time limit");
}

/// A payment from `owner`'s wallet number `salt` of `factory`, not deployed yet: its
/// signature wrapped in ERC-6492 with the factory call that deploys it.
fn counterfactual_payment(
    d: &TestDaemon,
    owner: &PrivateKeySigner,
    factory: Address,
    wallet: Address,
    salt: u64,
    i: u64,
) -> SignedAuthorization {
    let mut p = wallet_payment(d, owner, wallet, 1_000 + i, i);
    let wrapped = erc6492_signature(
        factory,
        Wallets::create_calldata(owner.address(), salt),
        p.signature.bytes().clone(),
    );
    p.signature = RawSignature::new(wrapped).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counterfactual_wallet_of_an_allow_listed_factory_is_deployed_and_settled_in_the_batch() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let listed = Wallets::deploy(&net).await.unwrap();
        let unlisted = Wallets::deploy(&net).await.unwrap();
        let d =
            settling_daemon(&net, "6492", 1, |c| c.chains[0].erc6492_factories = vec![listed.factory]).await;
        let keys = devnet::payer_keys("6492", 3);
        let (owner, eoas) = (&keys[0], &keys[1..]);
        let wallet = listed.wallet_address(&net, owner.address(), 1).await.unwrap();
        let elsewhere = unlisted.wallet_address(&net, owner.address(), 1).await.unwrap();
        let mut funded: Vec<_> = eoas.iter().map(|k| k.address()).collect();
        funded.extend([wallet, elsewhere]);
        net.fund(&funded, U256::from(1_000_000u64)).await.unwrap();
        let provider = net.provider().clone();
        let code = move |at| {
            let provider = provider.clone();
            async move { alloy::providers::Provider::get_code_at(&provider, at).await.unwrap() }
        };
        assert!(code(wallet).await.is_empty(), "not deployed yet");

        // The same owner's wallet of a factory not on the list: refused, nothing recorded.
        let refused = counterfactual_payment(&d, owner, unlisted.factory, elsewhere, 1, 9);
        let (reason, message) = refusal(&d, &refused).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("allow-list"), "{message}");

        let now = SystemClock.now_unix();
        let mut items = vec![counterfactual_payment(&d, owner, listed.factory, wallet, 1, 1)];
        for (i, k) in eoas.iter().enumerate() {
            items.push(
                PaymentBuilder::new(k, &d.domain(), now)
                    .to(PAYEE)
                    .value(2_000 + i as u64)
                    .nonce_index(2)
                    .build(),
            );
        }
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let ids = submit_as_one_batch(&d, &items).await;
        let done = wait_for(&d, &ids, WAIT, is_final).await;
        for p in &done {
            assert_eq!(status(p), v1::PaymentStatus::Settled, "{p:?}");
        }
        assert!(!code(wallet).await.is_empty(), "deployed by the batch");
        let token = IEip3009::new(net.token(), net.provider());
        assert!(token.authorizationState(wallet, items[0].authorization.nonce).call().await.unwrap());
        assert_eq!(net.balance_of(wallet).await.unwrap(), U256::from(1_000_000u64 - 1_001));
        let dir = Arc::clone(&d.dir);
        d.stop().await;

        let (log, _) = ledger_after(dir.path(), net.chain_id());
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|r| r.tx_hash == log[0].tx_hash), "one transaction for the batch: {log:?}");
        let receipt =
            alloy::providers::Provider::get_transaction_receipt(net.provider(), log[0].tx_hash.unwrap())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(receipt.to, Some(x402_batcher::chain::MULTICALL3), "one aggregate3 transaction");
        let used = x402_batcher::chain::authorizations_used(&receipt, net.token());
        assert!(
            used.contains(&(wallet, items[0].authorization.nonce)),
            "its AuthorizationUsed log: {used:?}"
        );
        let first = log.iter().find(|r| r.signed.authorization.from == wallet).unwrap();
        assert_eq!(first.submission.route, Route::Erc6492);
        let ledger = RocksLedger::open(&dir.path().join("ledger")).unwrap();
        assert!(
            ledger.get(&AuthKey::of(&refused)).unwrap().is_none(),
            "nothing recorded for the refused one"
        );
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_the_token_would_refuse_are_refused_at_submission_and_nothing_is_recorded() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let w = Wallets::deploy(&net).await.unwrap();
        let d = settling_daemon(&net, "refused", 1, |_| {}).await;
        let keys = devnet::payer_keys("refused", 3);
        let (strict, owner, plain) = (&keys[0], &keys[1], &keys[2]);
        w.delegate(&net, strict, w.strict).await.unwrap();
        let addrs: Vec<_> = keys.iter().map(|k| k.address()).collect();
        net.fund(&addrs, U256::from(1_000_000u64)).await.unwrap();
        let now = SystemClock.now_unix();
        let mut refused = Vec::new();

        // A 7702 account delegated to a contract without ERC-1271: its ECDSA signature
        // recovers to it, but the token asks its code, which refuses.
        let delegated = PaymentBuilder::new(strict, &d.domain(), now).to(PAYEE).nonce_index(1).build();
        assert_eq!(x402_batcher::verify::check(d.domain().separator(), &delegated), Ok(()));
        let (reason, message) = refusal(&d, &delegated).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("EIP-7702") && message.contains("ERC-1271"), "{message}");
        refused.push(delegated);

        // A wallet not deployed yet, signing through ERC-6492 with a factory nobody listed.
        let counterfactual = w.wallet_address(&net, owner.address(), 7).await.unwrap();
        net.fund(&[counterfactual], U256::from(1_000_000u64)).await.unwrap();
        let mut wrapped = wallet_payment(&d, owner, counterfactual, 1_000, 2);
        wrapped.signature = RawSignature::new(erc6492_signature(
            w.factory,
            Wallets::create_calldata(owner.address(), 7),
            wrapped.signature.bytes().clone(),
        ))
        .unwrap();
        let (reason, message) = refusal(&d, &wrapped).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("ERC-6492") && message.contains("allow-list"), "{message}");
        refused.push(wrapped);

        // A key (no code) cannot sign with a contract wallet's signature.
        let long = PaymentBuilder::new(plain, &d.domain(), now)
            .to(PAYEE)
            .nonce_index(3)
            .wrap_signature(owned_wallet_signature)
            .build();
        let (reason, message) = refusal(&d, &long).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("no code"), "{message}");
        refused.push(long);

        // Something ending in the 6492 suffix that is not a wrapper.
        let mut garbled = PaymentBuilder::new(plain, &d.domain(), now).to(PAYEE).nonce_index(5).build();
        garbled.signature =
            RawSignature::new([&[0u8; 40][..], &x402_batcher::x402::ERC6492_SUFFIX[..]].concat()).unwrap();
        let (reason, message) = refusal(&d, &garbled).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("not a valid wrapper"), "{message}");
        refused.push(garbled);

        // A wallet's signature by someone who is not its owner.
        let wallet = funded_wallet(&net, &w, owner, 8, 1_000_000).await;
        let forged = wallet_payment(&d, plain, wallet, 1_000, 4);
        let (reason, message) = refusal(&d, &forged).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("contract") && message.contains("ERC-1271"), "{message}");
        refused.push(forged);

        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let ledger = RocksLedger::open(&dir.path().join("ledger")).unwrap();
        for s in &refused {
            assert!(
                ledger.get(&AuthKey::of(s)).unwrap().is_none(),
                "nothing recorded for {}",
                s.authorization.from
            );
        }
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_whose_owner_changes_after_acceptance_fails_at_pre_simulation_and_its_exposure_is_released()
{
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let w = Wallets::deploy(&net).await.unwrap();
        // Long enough for the owner to change before any batch is cut.
        let d = settling_daemon(&net, "owner", 1, |c| {
            c.settlement.max_wait_ms = Some(4_000);
            c.settlement.target_cost_per_payment_wei = 0;
        })
        .await;
        let keys = devnet::payer_keys("owner", 2);
        let (owner, next) = (&keys[0], &keys[1]);
        let wallet = funded_wallet(&net, &w, owner, 1, 1_000_000).await;

        let first = wallet_payment(&d, owner, wallet, 600_000, 1);
        let id = submit(&d, &first).await;
        // While it is owed, the wallet cannot promise the same balance twice.
        let (reason, _) = refusal(&d, &wallet_payment(&d, owner, wallet, 600_000, 2)).await.expect("refused");
        assert_eq!(reason, "insufficient_funds");

        w.set_owner(&net, wallet, owner, next.address()).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let done = wait_for(&d, std::slice::from_ref(&id), WAIT, is_final).await;
        assert_eq!(status(&done[0]), v1::PaymentStatus::Failed, "{:?}", done[0]);
        assert_eq!(done[0].failure_reason, "invalid_exact_evm_payload_signature", "{:?}", done[0]);
        assert!(
            done[0].tx_hash.is_empty() && done[0].batch_id.is_empty(),
            "refused before any batch: {:?}",
            done[0]
        );

        // Its exposure is released: the new owner's payment of the same value is taken.
        let token = IEip3009::new(net.token(), net.provider());
        assert!(!token.authorizationState(wallet, first.authorization.nonce).call().await.unwrap());
        assert_eq!(refusal(&d, &wallet_payment(&d, next, wallet, 600_000, 3)).await, None);
        d.stop().await;
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_read_code_and_judge_signatures_as_the_token_does() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let w = Wallets::deploy(&net).await.unwrap();
        let keys = devnet::payer_keys("probes", 3);
        let (key, delegated, owner) = (&keys[0], &keys[1], &keys[2]);
        w.delegate(&net, delegated, w.strict).await.unwrap();
        let wallet = funded_wallet(&net, &w, owner, 1, 5).await;
        let ep = RpcEndpoint::connect_http(net.chain_id(), net.rpc_url()).unwrap();

        let probed = probe_payers(
            &ep,
            &[(net.token(), key.address()), (net.token(), delegated.address()), (net.token(), wallet)],
        )
        .await
        .unwrap();
        assert_eq!(
            probed,
            vec![
                (Some(U256::ZERO), PayerCode::None),
                (Some(U256::ZERO), PayerCode::Delegated(w.strict)),
                (Some(U256::from(5)), PayerCode::Contract),
            ]
        );
        // A round of 500 payers: more than one call's answer may hold (EIP-170), split.
        let many: Vec<_> =
            (0..500u16).map(|i| (net.token(), Address::left_padding_from(&i.to_be_bytes()))).collect();
        let read = probe_payers(&ep, &many).await.unwrap();
        assert_eq!(read.len(), 500);
        assert!(read.iter().all(|r| *r == (Some(U256::ZERO), PayerCode::None)));
        // A "token" without balanceOf answers no balance.
        assert_eq!(probe_payers(&ep, &[(w.factory, key.address())]).await.unwrap()[0].0, None);

        let digest = B256::repeat_byte(0x42);
        let ecdsa =
            |k: &PrivateKeySigner| Bytes::from(k.sign_hash_sync(&digest).unwrap().as_bytes().to_vec());
        let counterfactual = w.wallet_address(&net, owner.address(), 2).await.unwrap();
        let elsewhere = w.wallet_address(&net, owner.address(), 4).await.unwrap();
        let wrapped =
            |calldata: Bytes| erc6492_signature(w.factory, calldata, owned_wallet_signature(&ecdsa(owner)));
        let cases = [
            ((key.address(), ecdsa(key)), ChainVerdict::Valid),
            ((key.address(), ecdsa(owner)), ChainVerdict::EcdsaMismatch),
            ((delegated.address(), ecdsa(delegated)), ChainVerdict::Erc1271Refused),
            ((wallet, owned_wallet_signature(&ecdsa(owner))), ChainVerdict::Valid),
            ((wallet, owned_wallet_signature(&ecdsa(key))), ChainVerdict::Erc1271Refused),
            ((counterfactual, wrapped(Wallets::create_calldata(owner.address(), 2))), ChainVerdict::Valid),
            // The factory call deploys another wallet: the signer stays without code.
            ((elsewhere, wrapped(Wallets::create_calldata(owner.address(), 3))), ChainVerdict::NotDeployed),
        ];
        let items: Vec<_> = cases.iter().map(|((signer, sig), _)| (*signer, digest, sig.clone())).collect();
        let verdicts = check_signatures(&ep, &items).await.unwrap();
        let expected: Vec<_> = cases.iter().map(|(_, v)| *v).collect();
        assert_eq!(verdicts, expected);
        // 1,000 checks of wallet signatures at once: split within the size limits.
        let many: Vec<_> = (0..1_000).map(|i| items[3 + i % 2].clone()).collect();
        let verdicts = check_signatures(&ep, &many).await.unwrap();
        assert_eq!(verdicts.len(), 1_000);
        assert!(verdicts.iter().enumerate().all(|(i, v)| *v == expected[3 + i % 2]));
        for at in [counterfactual, elsewhere] {
            let code = alloy::providers::Provider::get_code_at(net.provider(), at).await.unwrap();
            assert!(code.is_empty(), "nothing the probe deployed persists");
        }
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_checks_ecdsa_only_has_every_payer_judged_by_ecdsa() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let w = Wallets::deploy(&net).await.unwrap();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let d =
            TestDaemon::start_on(Arc::clone(&net), dir, |c| c.tokens[0].contract_signatures = false).await;
        let keys = devnet::payer_keys("ecdsa only", 2);
        let (strict, owner) = (&keys[0], &keys[1]);
        w.delegate(&net, strict, w.strict).await.unwrap();
        let wallet = funded_wallet(&net, &w, owner, 1, 1_000_000).await;
        net.fund(&[strict.address()], U256::from(1_000_000u64)).await.unwrap();

        // Such a token recovers the signer whatever the payer's code: the 7702 account pays.
        let delegated =
            PaymentBuilder::new(strict, &d.domain(), SystemClock.now_unix()).to(PAYEE).nonce_index(1).build();
        assert_eq!(refusal(&d, &delegated).await, None);
        // A contract wallet cannot sign for it at all.
        let (reason, message) =
            refusal(&d, &wallet_payment(&d, owner, wallet, 1_000, 2)).await.expect("refused");
        assert_eq!(reason, "invalid_exact_evm_payload_signature");
        assert!(message.contains("ECDSA only"), "{message}");
        d.stop().await;
    })
    .await
    .expect("within the time limit");
}
