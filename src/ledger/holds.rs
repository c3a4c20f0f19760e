//! Holds: verified payments reserved for a short time before anything is owed.
//!
//! The x402 facilitator protocol verifies a payment (`POST /verify`) before the API's
//! handler runs and settles it (`POST /settle`) after. Between the two, the payment is
//! *held*: its nonce is reserved (another verification or submission of it is refused,
//! so a replayed header cannot pass verification while the first request is being
//! served) and its value counts in its payer's exposure (so verifications cannot together
//! overspend a payer). Nothing is owed for a hold: the acceptance that claims it is what
//! the ledger records, and a hold nobody claims lapses and changes nothing.
//!
//! Holds are decided in the writer's single decision order. On RocksDB they live in memory
//! and need no durability: the ledger alone decides what is accepted (at most once per
//! authorization, with the balance checked again at acceptance), so a hold lost in a crash
//! costs nothing but an early refusal a replay might otherwise have met. On PostgreSQL they
//! are rows every daemon of a fleet reads in the same transactions as the rest (a header
//! verified on one daemon is held on all); a group works on the holds of the payers it
//! names, read into one of these, and writes back what changed ([`Holds::changes_since`]).

use std::collections::{BTreeSet, HashMap};

use alloy::primitives::U256;

use super::record::{AuthKey, PayerKey};
use crate::x402::Authorization;

/// One held payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub authorization: Authorization,
    /// The idempotency key (x402 `payment-identifier`) of the verification that placed it;
    /// empty when none was given.
    pub idempotency_key: String,
    /// When it lapses (Unix ms).
    pub expires_at_ms: u64,
}

/// Every live hold, with each payer's held total.
#[derive(Debug, Default, Clone)]
pub struct Holds {
    by_key: HashMap<AuthKey, Hold>,
    by_payer: HashMap<PayerKey, U256>,
    /// Expiry order, for [`Holds::lapse`].
    expiry: BTreeSet<(u64, AuthKey)>,
}

impl Holds {
    /// Releases every hold that has lapsed by `now_ms`; returns how many.
    pub fn lapse(&mut self, now_ms: u64) -> usize {
        let mut released = 0;
        while let Some(&(at, key)) = self.expiry.first() {
            if at > now_ms {
                break;
            }
            self.remove(&key);
            released += 1;
        }
        released
    }

    /// The live hold on `key`, if any (holds lapsed by `now_ms` are gone first).
    pub fn get(&mut self, key: &AuthKey, now_ms: u64) -> Option<&Hold> {
        self.lapse(now_ms);
        self.by_key.get(key)
    }

    /// The total value held for `payer`.
    pub fn held(&self, payer: &PayerKey) -> U256 {
        self.by_payer.get(payer).copied().unwrap_or_default()
    }

    /// Places a hold on `key`, replacing any there was.
    pub fn insert(&mut self, key: AuthKey, hold: Hold) {
        self.remove(&key);
        let value = hold.authorization.value;
        let held = self.by_payer.entry(key.payer()).or_default();
        *held = held.saturating_add(value);
        self.expiry.insert((hold.expires_at_ms, key));
        self.by_key.insert(key, hold);
    }

    /// Releases the hold on `key` (claimed, or lapsed), returning it.
    pub fn remove(&mut self, key: &AuthKey) -> Option<Hold> {
        let hold = self.by_key.remove(key)?;
        self.expiry.remove(&(hold.expires_at_ms, *key));
        let payer = key.payer();
        if let Some(held) = self.by_payer.get_mut(&payer) {
            *held = held.saturating_sub(hold.authorization.value);
            if held.is_zero() {
                self.by_payer.remove(&payer);
            }
        }
        Some(hold)
    }

    /// What changed from `before` to this: the holds placed (or replaced), and the keys
    /// whose hold was released (claimed or lapsed).
    pub fn changes_since<'a>(&'a self, before: &Holds) -> (Vec<(&'a AuthKey, &'a Hold)>, Vec<AuthKey>) {
        let placed = self.by_key.iter().filter(|(k, h)| before.by_key.get(*k) != Some(*h)).collect();
        let released = before.by_key.keys().filter(|k| !self.by_key.contains_key(*k)).copied().collect();
        (placed, released)
    }

    /// Live holds.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Address, B256};

    fn key(payer: u8, nonce: u8) -> AuthKey {
        AuthKey::new(1, Address::repeat_byte(9), Address::repeat_byte(payer), B256::repeat_byte(nonce))
    }

    fn hold(payer: u8, value: u64, expires_at_ms: u64) -> Hold {
        Hold {
            authorization: Authorization {
                from: Address::repeat_byte(payer),
                to: Address::repeat_byte(7),
                value: U256::from(value),
                valid_after: U256::ZERO,
                valid_before: U256::MAX,
                nonce: B256::ZERO,
            },
            idempotency_key: String::new(),
            expires_at_ms,
        }
    }

    #[test]
    fn totals_follow_inserts_claims_and_lapses() {
        let mut h = Holds::default();
        h.insert(key(1, 1), hold(1, 10, 100));
        h.insert(key(1, 2), hold(1, 5, 200));
        h.insert(key(2, 1), hold(2, 7, 100));
        assert_eq!(h.held(&key(1, 0).payer()), U256::from(15));
        assert_eq!(h.remove(&key(1, 2)).unwrap().authorization.value, U256::from(5), "claimed");
        assert_eq!(h.held(&key(1, 0).payer()), U256::from(10));
        assert!(h.get(&key(1, 1), 99).is_some(), "live until its expiry");
        assert!(h.get(&key(1, 1), 100).is_none(), "lapsed at its expiry");
        assert_eq!(h.held(&key(1, 0).payer()), U256::ZERO);
        assert_eq!(h.held(&key(2, 0).payer()), U256::ZERO, "lapsed with it");
        assert!(h.is_empty() && h.by_payer.is_empty() && h.expiry.is_empty());
    }

    #[test]
    fn changes_are_the_holds_placed_replaced_and_released() {
        let mut before = Holds::default();
        before.insert(key(1, 1), hold(1, 10, 100));
        before.insert(key(1, 2), hold(1, 5, 100));
        before.insert(key(2, 1), hold(2, 7, 100));
        let mut after = before.clone();
        assert_eq!(after.changes_since(&before), (Vec::new(), Vec::new()), "nothing changed");
        after.remove(&key(1, 1));
        after.insert(key(1, 2), hold(1, 5, 300));
        after.insert(key(3, 1), hold(3, 1, 100));
        after.lapse(100);
        let (mut placed, mut released) = after.changes_since(&before);
        placed.sort_by_key(|(k, _)| **k);
        released.sort();
        assert_eq!(placed, vec![(&key(1, 2), &hold(1, 5, 300))], "replaced (new expiry); the new one lapsed");
        assert_eq!(released, vec![key(1, 1), key(2, 1)], "claimed, and lapsed");
    }

    #[test]
    fn a_replaced_hold_counts_once() {
        let mut h = Holds::default();
        h.insert(key(1, 1), hold(1, 10, 100));
        h.insert(key(1, 1), hold(1, 10, 300));
        assert_eq!(h.held(&key(1, 0).payer()), U256::from(10));
        assert_eq!(h.lapse(200), 0, "the old expiry is gone with the old hold");
        assert_eq!(h.lapse(300), 1);
        assert!(h.is_empty());
    }
}
