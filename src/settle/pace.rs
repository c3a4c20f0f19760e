//! When the engine acts: the chain's block cadence learnt from the heads it sees, how late
//! a transaction can be sent and still make the next block (learnt from inclusions), the
//! recent arrival rate, and from them how long a batch that is cheap enough is held for
//! company and when the engine looks at the chain next.
//!
//! All of it is a plain function of what was seen and when (engine clock, milliseconds),
//! so every rule is tested without a chain or a clock.
//!
//! - **Cadence.** A chain has one when the heads seen lately have timestamps a whole
//!   number of seconds apart per block, the same step throughout, and were seen about that
//!   far apart on the engine's clock too. A chain that mines each transaction at once
//!   (anvil automine, or blocks made on demand) has none: its timestamps bunch up or run
//!   ahead of the clock. The next block is expected at the earliest phase seen (a head is
//!   seen after it was made, never before).
//! - **Send lead.** A transaction is sent `lead` before the expected block: the time a cut
//!   of that many payments takes from the engine's decision to the node (a line fitted to
//!   the last sends: a fixed part and a part per payment, as a large batch is simulated,
//!   written and carried longer) plus a margin, doubled after a transaction cut at its send
//!   moment that reached the node in time and still missed the block it was cut for, and
//!   eased back after each that made it. A cut after the send moment (a late arrival on an
//!   idle settler) is a chance taken, and one that reached the node after the expected
//!   moment missed for its own work (which the fit learns): neither moves the margin.
//! - **Holding.** On a chain with a cadence a batch that is cheap enough waits for the send
//!   moment of the next block, and everything waiting then goes together: a transaction
//!   sent earlier would wait in the pool for the same block. It goes at once when the
//!   moment has come, or when the arrival rate says no other payment will come before it.
//!   Once a batch went for the block, late arrivals wait for a last call on an idle
//!   settler (their own work and a small margin before the block), when the rate says
//!   company comes before it; otherwise they go at once. On a chain without a cadence
//!   waiting is pure loss: a batch goes at once, unless the arrival rate brings another
//!   payment within the policy's linger (then it waits that long, at most). Payments that
//!   arrive while a settler's transaction is in flight wait for it anyway: batching costs
//!   no latency there.
//! - **Arrival rate.** Payments that arrived in the last few seconds *while others were
//!   waiting*: a client that sends its next request only after its last one was answered
//!   never brings company, however often it pays.
//! - **Looking at the chain.** Right after a send, soon and then less often; with a
//!   cadence, from a little before the expected block every few tens of milliseconds until
//!   it is seen (a block already there at the first look moves the expected phase
//!   earlier); with nothing in flight, at the poll interval.

use std::collections::VecDeque;

use super::rpc::Head;
use super::work::Work;
use crate::planner::{CutReason, Hold};

/// Heads kept to learn the cadence from.
const HEADS: usize = 8;

/// Fewest heads before a cadence is believed.
const MIN_HEADS: usize = 5;

/// How far the clock's view of the block gaps may stray from the timestamps' (percent of
/// the window's span) and still count as one cadence.
const CLOCK_TOLERANCE_PERCENT: u64 = 25;

/// Arrivals counted for the rate: those of this window.
const RATE_WINDOW_MS: u64 = 5_000;

/// Most arrivals remembered (a burst beyond this already says "company comes").
const RATE_MEMORY: usize = 1_024;

/// After a send on a chain without a cadence, the first look at the chain, doubled at each
/// look that found nothing new.
const FIRST_LOOK_MS: u64 = 3;

/// Looks at the chain this often from a little before the expected moment of a block
/// ([`EARLY_LOOK_MS`]) until it is seen.
const NEAR_BLOCK_LOOK_MS: u64 = 25;

/// How long before a block's expected moment the looks for it start.
const EARLY_LOOK_MS: u64 = 50;

/// Smallest margin of the send lead (milliseconds).
const MIN_MARGIN_MS: u64 = 50;

/// The margin of a last call: late arrivals, after a batch went for the next block, are
/// cut this long (milliseconds) plus their work before the block is expected; a chance
/// taken, whose miss teaches nothing.
const LAST_CALL_MARGIN_MS: u64 = 20;

/// Sends remembered until their inclusion teaches the lead.
const SENT_MEMORY: usize = 16;

/// How long after its send moment a cut still counts as made at it (the wake and the
/// round's first reads).
const ON_TIME_SLACK_MS: u64 = 5;

/// One head as seen: its number, its timestamp (seconds) and when the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    number: u64,
    timestamp: u64,
    at_ms: u64,
}

/// A batch sent for a block, to learn the lead from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    /// The batch (its counter).
    batch: u64,
    /// The block the cut was made for: the next one expected when it was decided.
    for_block: u64,
    /// Cut at its send moment (not after it, as a chance taken).
    on_time: bool,
    /// Reached the node before the block's expected moment (else it missed for its own
    /// work, which the work fit learns, not the margin).
    before_block: bool,
}

/// What the engine learnt of the chain's pace and of arrivals.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    heads: VecDeque<Seen>,
    /// How long cuts take from decision to the node, by size.
    work: Work,
    /// The send lead's margin, learnt (milliseconds); 0 until a cadence is known.
    margin_ms: u64,
    sent: VecDeque<Sent>,
    /// Arrivals that came while others waited (engine clock).
    arrivals: VecDeque<u64>,
    /// The number of the newest head when the engine last looked and found nothing new, and
    /// how many looks found nothing since the last send.
    empty_looks: u32,
    /// The chain's preconfirmations count: a transaction is seen included at the next
    /// flashblock, so nothing waits for the sealed block and the engine looks for receipts
    /// rather than heads while one is in flight.
    preconfirmed: bool,
}

impl Pace {
    /// A head seen at `now_ms`. Returns whether it is new (a higher number, or another
    /// block at a height seen before: a reorg restarts the learning).
    pub fn saw_head(&mut self, head: &Head, now_ms: u64) -> bool {
        let seen = Seen { number: head.number, timestamp: head.timestamp, at_ms: now_ms };
        match self.heads.back() {
            Some(last) if last.number == head.number => {
                self.empty_looks = self.empty_looks.saturating_add(1);
                false
            }
            Some(last) if last.number > head.number => {
                self.heads.clear();
                self.heads.push_back(seen);
                self.empty_looks = 0;
                true
            }
            _ => {
                if self.heads.len() == HEADS {
                    self.heads.pop_front();
                }
                self.heads.push_back(seen);
                self.empty_looks = 0;
                true
            }
        }
    }

    /// Counts inclusions at their preconfirmation (see the field).
    pub fn preconfirmed(&mut self, on: bool) {
        self.preconfirmed = on;
    }

    /// The chain's block time (milliseconds), when it has a cadence.
    pub fn block_ms(&self) -> Option<u64> {
        if self.heads.len() < MIN_HEADS {
            return None;
        }
        let pairs = self.heads.iter().zip(self.heads.iter().skip(1));
        let mut step: Option<u64> = None;
        for (a, b) in pairs {
            let dn = b.number - a.number;
            let dt = b.timestamp.checked_sub(a.timestamp)?;
            if dt == 0 || dt % dn != 0 {
                return None;
            }
            match step {
                None => step = Some(dt / dn),
                Some(s) if s == dt / dn => {}
                Some(_) => return None,
            }
        }
        let block_ms = step? * 1000;
        let (first, last) = (self.heads.front()?, self.heads.back()?);
        let by_stamps = (last.number - first.number) * block_ms;
        let by_clock = last.at_ms.saturating_sub(first.at_ms);
        (by_clock.abs_diff(by_stamps) * 100 <= by_stamps * CLOCK_TOLERANCE_PERCENT).then_some(block_ms)
    }

    /// When the block after the newest head is expected (engine clock), with a cadence.
    pub fn next_block_at_ms(&self) -> Option<u64> {
        let block_ms = self.block_ms()?;
        let next = self.heads.back()?.number + 1;
        self.heads.iter().map(|s| s.at_ms + (next - s.number) * block_ms).min()
    }

    /// How long a cut of `items` payments takes from the engine's decision until the node
    /// has it (milliseconds; see [`Work`]).
    pub fn work_ms(&self, items: usize) -> u64 {
        self.work.ms(items)
    }

    /// How long before the expected block a cut of `items` payments is made.
    pub fn lead_ms(&self, items: usize) -> Option<u64> {
        let block_ms = self.block_ms()?;
        let margin = if self.margin_ms == 0 { initial_margin(block_ms) } else { self.margin_ms };
        Some((self.work_ms(items) + margin).min(block_ms / 2))
    }

    /// The last moment to cut `items` payments for the next block (engine clock), with a
    /// cadence.
    pub fn send_by_ms(&self, items: usize) -> Option<u64> {
        Some(self.next_block_at_ms()?.saturating_sub(self.lead_ms(items)?))
    }

    /// Batch `batch` of `items` payments, decided at `decided_ms`, reached the node at
    /// `now_ms`.
    pub fn sent(&mut self, batch: u64, items: usize, decided_ms: u64, now_ms: u64) {
        self.empty_looks = 0;
        let on_time = self.send_by_ms(items).is_some_and(|by| decided_ms <= by + ON_TIME_SLACK_MS);
        self.work.record(items, now_ms.saturating_sub(decided_ms));
        let (Some(last), Some(next_at)) = (self.heads.back(), self.next_block_at_ms()) else { return };
        // Decided before the next block's expected moment: made for it; after: the one after.
        let for_block = if decided_ms < next_at { last.number + 1 } else { last.number + 2 };
        let before_block = decided_ms >= next_at || now_ms < next_at;
        if self.sent.len() == SENT_MEMORY {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent { batch, for_block, on_time, before_block });
    }

    /// Batch `batch` was seen included in block `number`: the lead is learnt from whether
    /// it made the block it was cut for (returned; `None`: nothing to learn).
    pub fn included(&mut self, batch: u64, number: u64) -> Option<bool> {
        let i = self.sent.iter().position(|s| s.batch == batch)?;
        let sent = self.sent.remove(i)?;
        let block_ms = self.block_ms()?;
        let margin = if self.margin_ms == 0 { initial_margin(block_ms) } else { self.margin_ms };
        let made = number <= sent.for_block;
        if made {
            self.margin_ms = (margin * 15 / 16).max(MIN_MARGIN_MS);
        } else if sent.on_time && sent.before_block {
            self.margin_ms = (margin * 2).min(block_ms / 2);
        }
        Some(made)
    }

    /// `n` payments arrived at `now_ms`; `waiting`: others of the chain were waiting then
    /// (held for a batch, or in a transaction not yet included).
    pub fn arrived(&mut self, n: u64, now_ms: u64, waiting: bool) {
        if !waiting {
            return;
        }
        for _ in 0..n.min(RATE_MEMORY as u64) {
            if self.arrivals.len() == RATE_MEMORY {
                self.arrivals.pop_front();
            }
            self.arrivals.push_back(now_ms);
        }
    }

    /// Payments per second that arrived lately while others waited.
    pub fn rate_per_s(&self, now_ms: u64) -> f64 {
        let from = now_ms.saturating_sub(RATE_WINDOW_MS);
        let n = self.arrivals.iter().rev().take_while(|&&t| t > from).count();
        n as f64 * 1000.0 / RATE_WINDOW_MS as f64
    }

    /// How long a cheap batch of `items` payments whose oldest arrived at `oldest_ms` is
    /// held.
    pub fn hold(&self, now_ms: u64, oldest_ms: u64, items: usize, linger_ms: u64) -> Hold {
        let rate = self.rate_per_s(now_ms);
        let expected = |ms: u64| rate * ms as f64 / 1000.0;
        // With preconfirmations the next flashblock, not the sealed block, is the one to make.
        // The cut is sized for what waits now and what the rate brings until then.
        let send_by = if self.preconfirmed {
            None
        } else {
            self.send_by_ms(items).map(|by| {
                let more = expected(by.saturating_sub(now_ms)) as usize;
                self.send_by_ms(items + more).unwrap_or(by)
            })
        };
        match send_by {
            Some(send_by) if now_ms < send_by && expected(send_by - now_ms) >= 1.0 => {
                Hold { until_ms: send_by, reason: CutReason::Block }
            }
            Some(send_by) if now_ms >= send_by => match self.last_call_ms(items) {
                // A batch already went for this block: late arrivals are gathered until
                // the last call, when company is expected before it.
                Some(call) if now_ms < call && expected(call - now_ms) >= 1.0 => {
                    Hold { until_ms: call, reason: CutReason::Block }
                }
                _ => Hold { until_ms: now_ms, reason: CutReason::Block },
            },
            Some(_) => Hold { until_ms: now_ms, reason: CutReason::NoCompany },
            None if expected(linger_ms) >= 1.0 => {
                // Wait for about one more arrival, never longer than the linger.
                let one_more = (1000.0 / rate).ceil() as u64;
                Hold {
                    until_ms: oldest_ms.saturating_add(linger_ms.min(one_more)),
                    reason: CutReason::CostTarget,
                }
            }
            None => Hold { until_ms: now_ms, reason: CutReason::NoCompany },
        }
    }

    /// Once a batch went for the next block: the last moment to cut `items` late arrivals
    /// with a chance to make it too (their work and [`LAST_CALL_MARGIN_MS`] before it is
    /// expected).
    fn last_call_ms(&self, items: usize) -> Option<u64> {
        let next = self.heads.back()?.number + 1;
        let next_at = self.next_block_at_ms()?;
        let gone = self.sent.iter().any(|s| s.for_block == next);
        gone.then(|| next_at.saturating_sub(self.work_ms(items) + LAST_CALL_MARGIN_MS))
    }

    /// When to look at the chain next (engine clock), the last look having been at
    /// `looked_ms`, while a transaction of ours is `in_flight` (sent, not yet seen
    /// included); `None`: at the poll interval.
    pub fn next_look_ms(&self, now_ms: u64, looked_ms: u64, in_flight: bool) -> Option<u64> {
        if !in_flight || self.preconfirmed {
            return None;
        }
        if let (Some(next), Some(block_ms)) = (self.next_block_at_ms(), self.block_ms()) {
            // From a little before the expected moment: a block seen at once there moves
            // the expected phase earlier, so the estimate never stays late.
            let start = next.saturating_sub(EARLY_LOOK_MS);
            return if now_ms < start {
                Some(start)
            } else if now_ms < next + block_ms / 2 {
                Some(looked_ms.max(start) + NEAR_BLOCK_LOOK_MS)
            } else {
                // Half a block late: the chain stalls, or the cadence changed.
                None
            };
        }
        // No cadence: soon after the send (an at-once chain mines it now), then less often.
        Some(looked_ms + (FIRST_LOOK_MS << self.empty_looks.min(10)))
    }
}

impl Pace {
    /// With nothing in flight, on a chain with a cadence: when to look for the next block
    /// (just after it is expected; half a block after the last look while it is late).
    /// `None`: no cadence, look at the poll interval.
    pub fn idle_look_ms(&self, looked_ms: u64) -> Option<u64> {
        let (next, block_ms) = (self.next_block_at_ms()?, self.block_ms()?);
        let at = next + NEAR_BLOCK_LOOK_MS;
        Some(if at > looked_ms { at } else { looked_ms + block_ms / 2 })
    }
}

/// The send lead's margin before any inclusion taught it: a tenth of a block, at least
/// [`MIN_MARGIN_MS`].
fn initial_margin(block_ms: u64) -> u64 {
    (block_ms / 10).max(MIN_MARGIN_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::B256;

    fn head(number: u64, timestamp: u64) -> Head {
        Head {
            number,
            hash: B256::with_last_byte(number as u8),
            timestamp,
            gas_limit: 30_000_000,
            base_fee: None,
        }
    }

    /// Heads of a chain with `block_ms` blocks, seen `lag_ms` after each was made.
    fn scheduled(block_ms: u64, n: u64, lag: impl Fn(u64) -> u64) -> Pace {
        let mut p = Pace::default();
        for i in 0..n {
            p.saw_head(&head(100 + i, 1_000 + i * block_ms / 1000), 1_000_000 + i * block_ms + lag(i));
        }
        p
    }

    #[test]
    fn a_regular_chain_has_a_cadence_and_its_next_block_is_expected_at_the_earliest_phase() {
        let p = scheduled(2_000, 6, |i| [30, 5, 80, 12, 40, 60][i as usize]);
        assert_eq!(p.block_ms(), Some(2_000));
        // Seen 5 ms late at best: block 106 at 1_000_000 + 6 * 2000 + 5.
        assert_eq!(p.next_block_at_ms(), Some(1_012_005));
        assert_eq!(p.lead_ms(1), Some(200), "a tenth of a block before any inclusion");
        assert_eq!(p.send_by_ms(1), Some(1_011_805));
    }

    #[test]
    fn too_few_heads_bunched_timestamps_or_a_clock_that_disagrees_mean_no_cadence() {
        assert_eq!(scheduled(1_000, 4, |_| 0).block_ms(), None, "four heads are not enough");
        // Automine: many blocks in one second.
        let mut p = Pace::default();
        for i in 0..8 {
            p.saw_head(&head(10 + i, 500 + i / 3), 1_000 + i * 30);
        }
        assert_eq!(p.block_ms(), None);
        // Automine with a timestamp per block that runs ahead of the clock.
        let mut p = Pace::default();
        for i in 0..8 {
            p.saw_head(&head(10 + i, 500 + i), 1_000 + i * 40);
        }
        assert_eq!(p.block_ms(), None, "one-second steps seen 40 ms apart");
        // Irregular steps.
        let mut p = Pace::default();
        for (i, t) in [0u64, 1, 3, 4, 6, 7].iter().enumerate() {
            p.saw_head(&head(i as u64, 500 + t), 1_000 + t * 1000);
        }
        assert_eq!(p.block_ms(), None);
    }

    #[test]
    fn heads_missed_between_looks_still_show_the_cadence_and_a_reorg_restarts_learning() {
        let mut p = Pace::default();
        for (n, seen) in [(1u64, 0u64), (3, 4_000), (4, 6_000), (6, 10_000), (7, 12_000)] {
            p.saw_head(&head(n, 100 + 2 * n), 50_000 + seen);
        }
        assert_eq!(p.block_ms(), Some(2_000));
        assert!(!p.saw_head(&head(7, 114), 62_500), "the same head again is nothing new");
        assert!(p.saw_head(&head(5, 110), 63_000), "a lower head: a reorg");
        assert_eq!(p.block_ms(), None);
    }

    #[test]
    fn the_lead_grows_after_a_missed_block_and_eases_after_blocks_made() {
        let mut p = scheduled(1_000, 6, |_| 0);
        let next = p.next_block_at_ms().unwrap();
        p.sent(1, 1, next - 160, next - 150);
        assert_eq!(p.lead_ms(1), Some(110), "10 ms of work and a 100 ms margin");
        assert_eq!(p.included(1, 107), Some(false));
        assert_eq!(p.lead_ms(1), Some(210), "missed block 106: the margin doubles");
        for b in 2..100 {
            p.sent(b, 1, next - 310, next - 300);
            assert_eq!(p.included(b, 106), Some(true));
        }
        assert_eq!(p.lead_ms(1), Some(10 + MIN_MARGIN_MS), "eased to the floor");
        for b in 100..110 {
            p.sent(b, 1, next - 500, next - 490);
            p.included(b, 108);
        }
        assert_eq!(p.lead_ms(1), Some(500), "never more than half a block");
        assert_eq!(p.included(7, 106), None, "a batch never sent (or already learnt from)");
    }

    #[test]
    fn a_big_cut_starts_earlier_and_a_late_chance_that_misses_teaches_nothing() {
        let mut p = scheduled(1_000, 6, |_| 0);
        let next = p.next_block_at_ms().unwrap();
        // Measured: 10 ms from decision to node for 2 payments, 50 ms for 82.
        p.sent(1, 2, next - 200, next - 190);
        assert_eq!(p.work_ms(202), 10 + 100, "half a millisecond per payment until sizes spread");
        p.sent(2, 82, next - 200, next - 150);
        assert_eq!((p.work_ms(2), p.work_ms(42), p.work_ms(82), p.work_ms(162)), (10, 30, 50, 90));
        assert_eq!(
            p.send_by_ms(2).unwrap() - p.send_by_ms(82).unwrap(),
            40,
            "82 payments: cut 40 ms earlier"
        );
        // Held: sized for what waits and what the rate brings until the send moment.
        let now = next - 900;
        p.arrived(100, now, true);
        let alone = p.send_by_ms(2).unwrap();
        assert!(p.hold(now, now, 2, 250).until_ms < alone, "20/s brings ~17 more: cut earlier than for 2");
        assert_eq!(p.hold(now, now, 2, 250).reason, CutReason::Block);
        // Cut after its send moment (a late arrival on an idle settler) and missed: a
        // chance taken, the margin stays.
        p.sent(3, 2, next - 20, next - 10);
        assert_eq!(p.included(3, 107), Some(false));
        assert_eq!(p.lead_ms(2), Some(10 + 100), "the work of 2 and the first margin");
        // Cut at its moment, reached the node after the expected block: missed for its own
        // work, which the fit learns; the margin stays.
        p.sent(5, 2, next - 150, next + 5);
        assert_eq!(p.included(5, 107), Some(false));
        assert_eq!(p.lead_ms(2).unwrap() - p.work_ms(2), 100);
        // Decided after the expected moment: made for the block after.
        p.sent(4, 2, next + 10, next + 20);
        assert_eq!(p.included(4, 107), Some(true));
    }

    #[test]
    fn only_arrivals_while_others_wait_count_and_only_lately() {
        let mut p = Pace::default();
        p.arrived(50, 1_000, false);
        assert_eq!(p.rate_per_s(1_000), 0.0, "a closed-loop client brings no company");
        p.arrived(10, 1_000, true);
        assert_eq!(p.rate_per_s(1_000), 2.0);
        assert_eq!(p.rate_per_s(1_000 + RATE_WINDOW_MS), 0.0, "out of the window");
    }

    #[test]
    fn with_a_cadence_a_batch_waits_for_the_send_moment_only_when_company_is_expected() {
        let mut p = scheduled(2_000, 6, |_| 0);
        let send_by = p.send_by_ms(1).unwrap();
        let now = send_by - 1_000;
        assert_eq!(p.hold(now, now, 1, 250), Hold { until_ms: now, reason: CutReason::NoCompany });
        p.arrived(20, now, true);
        assert_eq!(p.hold(now, now, 1, 250), Hold { until_ms: send_by, reason: CutReason::Block });
        assert_eq!(
            p.hold(send_by + 1, now, 1, 250),
            Hold { until_ms: send_by + 1, reason: CutReason::Block }
        );
    }

    #[test]
    fn idle_on_a_chain_with_a_cadence_the_engine_looks_once_per_block() {
        assert_eq!(Pace::default().idle_look_ms(1_000), None, "no cadence: the poll");
        let p = scheduled(2_000, 6, |_| 0);
        let next = p.next_block_at_ms().unwrap();
        assert_eq!(p.idle_look_ms(next - 1_500), Some(next + NEAR_BLOCK_LOOK_MS));
        // Late: half a block after the last look, until it is seen.
        assert_eq!(p.idle_look_ms(next + NEAR_BLOCK_LOOK_MS), Some(next + NEAR_BLOCK_LOOK_MS + 1_000));
    }

    #[test]
    fn with_preconfirmations_nothing_waits_for_the_sealed_block_nor_looks_for_it() {
        let mut p = scheduled(2_000, 6, |_| 0);
        let now = p.send_by_ms(1).unwrap() - 1_000;
        p.arrived(8, now, true);
        assert_eq!(p.hold(now, now, 1, 250).reason, CutReason::Block, "without: held for the block");
        p.preconfirmed(true);
        // 1.6/s: no company within the linger; the next flashblock comes anyway.
        assert_eq!(p.hold(now, now, 1, 250), Hold { until_ms: now, reason: CutReason::NoCompany });
        assert_eq!(p.next_look_ms(now, now, true), None, "receipts, not heads, are looked for");
    }

    #[test]
    fn without_a_cadence_a_batch_goes_at_once_unless_company_comes_within_the_linger() {
        let mut p = Pace::default();
        assert_eq!(p.hold(5_000, 5_000, 1, 250), Hold { until_ms: 5_000, reason: CutReason::NoCompany });
        p.arrived(2, 4_000, true);
        assert_eq!(p.hold(5_000, 5_000, 1, 250).reason, CutReason::NoCompany, "0.4/s: none in 250 ms");
        p.arrived(200, 4_500, true);
        // 40.4/s: the next in ~25 ms.
        assert_eq!(
            p.hold(5_000, 4_990, 1, 250),
            Hold { until_ms: 4_990 + 25, reason: CutReason::CostTarget }
        );
        assert_eq!(
            p.hold(5_000, 4_990, 1, 10),
            Hold { until_ms: 5_000, reason: CutReason::NoCompany },
            "a 10 ms linger: nobody comes in time"
        );
    }

    #[test]
    fn the_chain_is_looked_at_soon_after_a_send_and_near_the_expected_block() {
        let mut p = Pace::default();
        assert_eq!(p.next_look_ms(1_000, 1_000, false), None, "nothing in flight: the poll");
        let flying = true;
        assert_eq!(p.next_look_ms(1_000, 1_000, flying), Some(1_000 + FIRST_LOOK_MS));
        p.saw_head(&head(1, 1), 1_010);
        p.saw_head(&head(1, 1), 1_010);
        assert_eq!(
            p.next_look_ms(1_010, 1_010, flying),
            Some(1_010 + 2 * FIRST_LOOK_MS),
            "nothing new: twice as long"
        );
        assert_eq!(p.next_look_ms(5_000, 1_010, flying), Some(1_010 + 2 * FIRST_LOOK_MS), "overdue: now");
        let p = scheduled(1_000, 6, |_| 0);
        let next = p.next_block_at_ms().unwrap();
        assert_eq!(p.next_look_ms(next - 300, next - 300, flying), Some(next - EARLY_LOOK_MS));
        assert_eq!(p.next_look_ms(next - 40, next - 40, flying), Some(next - 40 + NEAR_BLOCK_LOOK_MS));
        assert_eq!(p.next_look_ms(next + 5, next + 5, flying), Some(next + 5 + NEAR_BLOCK_LOOK_MS));
        assert_eq!(p.next_look_ms(next + 600, next + 590, flying), None, "a stalled chain: the poll");
    }
}
