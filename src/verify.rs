//! Signature verification: the EIP-712 digest, libsecp256k1 public-key recovery, and the
//! malleability rules tokens enforce (low s, v ∈ {27, 28}), run on a pool of OS threads.
//!
//! Recovery (~45 µs) is the daemon's throughput ceiling, so it gets dedicated threads: on
//! tokio's blocking pool it would compete with file and DNS work and grow threads without
//! bound. Work arrives through one bounded crossbeam queue, one item per message, so a
//! large call spreads over every thread; a full queue refuses the overflowing items at
//! once rather than buffering without limit. A whole call is answered on a single oneshot
//! when its last item finishes, so an async caller is woken once per call, not per item.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use alloy::primitives::{Address, B256, keccak256};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use secp256k1::Message;
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use tokio::sync::oneshot;

use crate::admission::Admitted;
use crate::config::VerifyConfig;
use crate::x402::eip712::signing_hash;
use crate::x402::{Reason, SignedAuthorization};

/// secp256k1n / 2, big-endian. A signature with a larger `s` has a twin `(r, n - s)`;
/// tokens refuse it, so the daemon does too.
const HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x5d,
    0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// Why a signature does not authorize its transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature v is {v}; tokens accept only 27 or 28")]
    BadV { v: u8 },
    #[error("signature s is in the upper half of the curve order (malleable); tokens refuse it")]
    HighS,
    #[error("no public key recovers from this signature")]
    Unrecoverable,
    #[error("signature was made by {recovered}, not by the payer {expected}")]
    WrongSigner { recovered: Address, expected: Address },
    #[error(
        "signature is {len} bytes, not a 65-byte ECDSA signature; only a payer with code (a contract wallet) can sign so"
    )]
    NotEcdsa { len: usize },
}

/// Checks that `signed` carries a valid signature by its payer over the token's domain.
pub fn check(domain_separator: B256, signed: &SignedAuthorization) -> Result<(), SignatureError> {
    let sig = signed
        .signature
        .ecdsa()
        .ok_or(SignatureError::NotEcdsa { len: signed.signature.as_bytes().len() })?;
    let v = sig[64];
    if v != 27 && v != 28 {
        return Err(SignatureError::BadV { v });
    }
    // Big-endian byte order makes lexicographic order numeric order.
    if sig[32..64] > HALF_ORDER[..] {
        return Err(SignatureError::HighS);
    }
    let digest = signing_hash(domain_separator, &signed.authorization);
    let recovered = recover(digest, sig)?;
    if recovered != signed.authorization.from {
        return Err(SignatureError::WrongSigner { recovered, expected: signed.authorization.from });
    }
    Ok(())
}

/// The address whose key made `sig` (r ‖ s ‖ v, v ∈ {27, 28}) over `digest`.
pub fn recover(digest: B256, sig: &[u8; 65]) -> Result<Address, SignatureError> {
    let recid =
        RecoveryId::try_from(i32::from(sig[64]) - 27).map_err(|_| SignatureError::BadV { v: sig[64] })?;
    // Fails for r or s of zero or not below the curve order.
    let rsig =
        RecoverableSignature::from_compact(&sig[..64], recid).map_err(|_| SignatureError::Unrecoverable)?;
    let key = rsig.recover(Message::from_digest(digest.0)).map_err(|_| SignatureError::Unrecoverable)?;
    let hash = keccak256(&key.serialize_uncompressed()[1..]);
    Ok(Address::from_slice(&hash[12..]))
}

/// Raw libsecp256k1 recoveries per second on `threads` threads for about `duration`: the
/// ceiling ingest throughput is judged against. Signatures are made up front; only
/// parse + recover is timed, as in the `verify` criterion bench.
pub fn measure_recovery_ceiling(threads: usize, duration: Duration) -> f64 {
    let samples: Vec<(B256, [u8; 65])> = (0..64u8)
        .map(|i| {
            let key = secp256k1::SecretKey::from_byte_array([i.wrapping_add(1); 32])
                .expect("a small scalar is a valid key");
            let digest = keccak256([i]);
            let sig = secp256k1::SECP256K1.sign_ecdsa_recoverable(Message::from_digest(digest.0), &key);
            let (recid, rs) = sig.serialize_compact();
            let mut raw = [0u8; 65];
            raw[..64].copy_from_slice(&rs);
            raw[64] = 27 + i32::from(recid) as u8;
            (digest, raw)
        })
        .collect();
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let started = std::time::Instant::now();
                let mut n = 0usize;
                while started.elapsed() < duration {
                    for (digest, sig) in &samples {
                        let recid = RecoveryId::try_from(i32::from(sig[64]) - 27).expect("made with 27/28");
                        let key = RecoverableSignature::from_compact(&sig[..64], recid)
                            .and_then(|s| s.recover(Message::from_digest(digest.0)));
                        std::hint::black_box(key.ok());
                    }
                    n += samples.len();
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

/// Why the pool could not give a verdict on an item. None of these say anything about the
/// payment itself: it was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("verification queue is full")]
    QueueFull,
    #[error("verification pool is shut down")]
    ShutDown,
    #[error("verification of this item panicked; it was not checked")]
    Panicked,
}

impl PoolError {
    /// The x402 code if the refusal has to be phrased as one. `QueueFull` and `ShutDown`
    /// are better answered with gRPC RESOURCE_EXHAUSTED and UNAVAILABLE by the caller.
    pub fn reason(self) -> Reason {
        Reason::UnexpectedVerifyError
    }
}

/// The verdict on one item: `Ok(Ok(()))` valid, `Ok(Err(_))` a bad signature, `Err(_)` not
/// checked.
pub type Outcome = Result<Result<(), SignatureError>, PoolError>;

/// One call's items and their results, shared with the workers.
struct Batch {
    items: Vec<Admitted>,
    results: Vec<OnceLock<Outcome>>,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl Batch {
    fn finish(&self, index: usize, outcome: Outcome) {
        // Each index is sent to exactly one worker, so the slot is always empty here.
        let _ = self.results[index].set(outcome);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(done) = self.done.lock().take()
        {
            let _ = done.send(());
        }
    }
}

/// The items of one call with their verdicts, in the order given.
pub struct Verified {
    batch: Arc<Batch>,
}

impl Verified {
    pub fn len(&self) -> usize {
        self.batch.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.items.is_empty()
    }

    /// Each item with its verdict. An item without one (the pool stopped under it) reads
    /// as [`PoolError::ShutDown`].
    pub fn iter(&self) -> impl Iterator<Item = (&Admitted, Outcome)> {
        self.batch
            .items
            .iter()
            .zip(&self.batch.results)
            .map(|(item, r)| (item, r.get().cloned().unwrap_or(Err(PoolError::ShutDown))))
    }

    pub fn outcomes(&self) -> Vec<Outcome> {
        self.iter().map(|(_, o)| o).collect()
    }
}

/// A fixed set of OS threads checking signatures from a bounded queue.
pub struct VerifyPool {
    tx: Option<Sender<(Arc<Batch>, usize)>>,
    rx: Receiver<(Arc<Batch>, usize)>,
    threads: Vec<JoinHandle<()>>,
}

impl VerifyPool {
    /// The pool the configuration describes (0 threads: one per core).
    pub fn from_config(config: &VerifyConfig) -> std::io::Result<Self> {
        Self::new(config.effective_threads(), config.queue_capacity)
    }

    /// Starts `threads` workers (at least one) behind a queue of `queue_capacity` items.
    pub fn new(threads: usize, queue_capacity: usize) -> std::io::Result<Self> {
        Self::with_checker(threads, queue_capacity, check)
    }

    /// The pool with another check function: the seam tests use to make a worker panic.
    fn with_checker(threads: usize, queue_capacity: usize, checker: Checker) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<(Arc<Batch>, usize)>(queue_capacity.max(1));
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new().name(format!("verify-{i}")).spawn(move || worker(rx, checker))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { tx: Some(tx), rx, threads })
    }

    /// Items waiting in the queue (not counting those being checked).
    pub fn queue_depth(&self) -> usize {
        self.rx.len()
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Checks every item. Items that do not fit in the queue get [`PoolError::QueueFull`]
    /// at once; the others are spread over all threads.
    pub async fn verify(&self, items: Vec<Admitted>) -> Verified {
        let n = items.len();
        let (done_tx, done_rx) = oneshot::channel();
        let batch = Arc::new(Batch {
            items,
            results: (0..n).map(|_| OnceLock::new()).collect(),
            remaining: AtomicUsize::new(n),
            done: Mutex::new(Some(done_tx)),
        });
        for i in 0..n {
            let refused = match &self.tx {
                None => Some(PoolError::ShutDown),
                Some(tx) => match tx.try_send((Arc::clone(&batch), i)) {
                    Ok(()) => None,
                    Err(TrySendError::Full(_)) => Some(PoolError::QueueFull),
                    Err(TrySendError::Disconnected(_)) => Some(PoolError::ShutDown),
                },
            };
            if let Some(err) = refused {
                batch.finish(i, Err(err));
            }
        }
        if n > 0 {
            // An error means the batch was dropped unfinished: its missing verdicts read as
            // ShutDown in `Verified::iter`.
            let _ = done_rx.await;
        }
        Verified { batch }
    }

    /// Stops accepting work, lets the workers finish what is queued, and joins them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for VerifyPool {
    fn drop(&mut self) {
        self.stop();
    }
}

type Checker = fn(B256, &SignedAuthorization) -> Result<(), SignatureError>;

fn worker(rx: Receiver<(Arc<Batch>, usize)>, checker: Checker) {
    // Ends when every sender is gone and the queue is drained.
    while let Ok((batch, i)) = rx.recv() {
        let item = &batch.items[i];
        // A panic is a bug in the check, not a verdict on the payment: that item is
        // answered as unchecked and the thread carries on with the next one.
        let outcome = catch_unwind(AssertUnwindSafe(|| checker(item.domain_separator, &item.signed)))
            .map_err(|_| PoolError::Panicked);
        batch.finish(i, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::{Authorization, RawSignature};
    use alloy::primitives::{U256, address, b256};
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    fn signed_by(signer: &PrivateKeySigner, sep: B256, nonce: u8) -> SignedAuthorization {
        let authorization = Authorization {
            from: signer.address(),
            to: address!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            value: U256::from(1000),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX),
            nonce: B256::with_last_byte(nonce),
        };
        let sig = signer.sign_hash_sync(&signing_hash(sep, &authorization)).unwrap();
        SignedAuthorization {
            chain_id: 1,
            token: Address::ZERO,
            authorization,
            signature: RawSignature::from(sig.as_bytes()),
        }
    }

    const SEP: B256 = b256!("1111111111111111111111111111111111111111111111111111111111111111");

    #[test]
    fn accepts_good_and_names_each_defect() {
        let signer = PrivateKeySigner::random();
        let good = signed_by(&signer, SEP, 1);
        assert_eq!(check(SEP, &good), Ok(()));

        let edited = |edit: &dyn Fn(&mut [u8; 65])| {
            let mut sig = *good.signature.ecdsa().unwrap();
            edit(&mut sig);
            SignedAuthorization { signature: RawSignature::from(sig), ..good.clone() }
        };
        let bad_v = edited(&|s| s[64] = 1);
        assert_eq!(check(SEP, &bad_v), Err(SignatureError::BadV { v: 1 }));

        // The malleable twin (r, n - s, v ^ 1) recovers the same key but has a high s.
        let n = U256::from_be_bytes(secp256k1::constants::CURVE_ORDER);
        let high_s = edited(&|sig| {
            let s = U256::from_be_slice(&sig[32..64]);
            sig[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
            sig[64] ^= 0x07; // 27 <-> 28
        });
        assert_eq!(check(SEP, &high_s), Err(SignatureError::HighS));

        let zero_r = edited(&|s| s[..32].fill(0));
        assert_eq!(check(SEP, &zero_r), Err(SignatureError::Unrecoverable));

        // Any other length is not ECDSA at all (a contract wallet's; judged on chain).
        let long =
            SignedAuthorization { signature: RawSignature::new(vec![1u8; 192]).unwrap(), ..good.clone() };
        assert_eq!(check(SEP, &long), Err(SignatureError::NotEcdsa { len: 192 }));

        let mut tampered = good.clone();
        tampered.authorization.value += U256::from(1);
        assert!(matches!(check(SEP, &tampered), Err(SignatureError::WrongSigner { .. })));
    }

    #[tokio::test]
    async fn pool_checks_many_per_call_and_refuses_overflow() {
        let signer = PrivateKeySigner::random();
        let pool = VerifyPool::new(2, 1024).unwrap();
        let mut items: Vec<Admitted> = (0..50)
            .map(|i| Admitted {
                signed: signed_by(&signer, SEP, i),
                domain_separator: SEP,
                contract_signatures: true,
            })
            .collect();
        items[7].signed.authorization.to = Address::ZERO;
        let verified = pool.verify(items).await;
        let outcomes = verified.outcomes();
        assert_eq!(outcomes.len(), 50);
        for (i, o) in outcomes.iter().enumerate() {
            if i == 7 {
                assert!(matches!(o, Ok(Err(SignatureError::WrongSigner { .. }))));
            } else {
                assert_eq!(o, &Ok(Ok(())), "item {i}");
            }
        }
        assert_eq!(pool.queue_depth(), 0);
        assert!(pool.verify(Vec::new()).await.is_empty());

        // A queue of one behind one busy thread cannot take 200 items at once.
        let small = VerifyPool::new(1, 1).unwrap();
        let many: Vec<Admitted> = (0..200)
            .map(|i| Admitted {
                signed: signed_by(&signer, SEP, i as u8),
                domain_separator: SEP,
                contract_signatures: true,
            })
            .collect();
        let outcomes = small.verify(many).await.outcomes();
        let full = outcomes.iter().filter(|o| **o == Err(PoolError::QueueFull)).count();
        let valid = outcomes.iter().filter(|o| **o == Ok(Ok(()))).count();
        assert!(full > 0, "some items must be refused");
        assert_eq!(full + valid, 200, "every item is either checked or refused");
    }

    #[tokio::test]
    async fn a_panicking_check_fails_only_its_item_and_the_thread_survives() {
        fn panics_on_nonce_3(sep: B256, s: &SignedAuthorization) -> Result<(), SignatureError> {
            if s.authorization.nonce == B256::with_last_byte(3) {
                panic!("injected verifier bug");
            }
            check(sep, s)
        }
        let signer = PrivateKeySigner::random();
        let pool = VerifyPool::with_checker(1, 64, panics_on_nonce_3).unwrap();
        let items = |range: std::ops::Range<u8>| {
            range
                .map(|i| Admitted {
                    signed: signed_by(&signer, SEP, i),
                    domain_separator: SEP,
                    contract_signatures: true,
                })
                .collect()
        };
        let outcomes = pool.verify(items(0..6)).await.outcomes();
        assert_eq!(outcomes[3], Err(PoolError::Panicked));
        for i in [0, 1, 2, 4, 5] {
            assert_eq!(outcomes[i], Ok(Ok(())), "item {i}");
        }
        // The single worker thread is still there.
        assert!(pool.verify(items(4..8)).await.outcomes().iter().all(|o| *o == Ok(Ok(()))));
    }

    #[tokio::test]
    async fn shut_down_pool_refuses_without_checking() {
        let signer = PrivateKeySigner::random();
        let mut pool = VerifyPool::new(1, 8).unwrap();
        pool.stop();
        let outcomes = pool
            .verify(vec![Admitted {
                signed: signed_by(&signer, SEP, 1),
                domain_separator: SEP,
                contract_signatures: true,
            }])
            .await
            .outcomes();
        assert_eq!(outcomes, vec![Err(PoolError::ShutDown)]);
    }
}
