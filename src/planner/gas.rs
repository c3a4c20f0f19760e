//! What a settlement costs: fees, the gas of each shape (a direct call, an `aggregate3`
//! batch), the L1 data fee of OP-stack chains, and the gas model learnt from receipts per
//! token and shape.

/// Fees as last seen (`eth_feeHistory`), in wei per gas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fees {
    pub base_fee: u128,
    pub priority_fee: u128,
}

impl Fees {
    /// What one unit of gas costs a transaction included now.
    pub fn per_gas(self) -> u128 {
        self.base_fee.saturating_add(self.priority_fee)
    }
}

/// Gas a batch costs: a fixed part and a part per payment (seeded from config, then learned
/// from receipts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GasModel {
    pub fixed: u64,
    pub per_item: u64,
}

impl GasModel {
    pub fn batch_gas(self, items: usize) -> u64 {
        self.fixed.saturating_add(self.per_item.saturating_mul(items as u64))
    }
}

/// How a settlement of `n` payments is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// One payment: the token's `transferWithAuthorization`, sent to the token.
    Direct,
    /// Several: one `aggregate3` call to Multicall3, each item allowed to fail.
    Batch,
}

impl Shape {
    pub fn of(items: usize) -> Shape {
        if items == 1 { Shape::Direct } else { Shape::Batch }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Direct => "direct",
            Shape::Batch => "batch",
        }
    }
}

/// The L1 data fee (wei) an OP-stack chain charges on top of gas, by shape: a direct call,
/// and a batch's fixed and per-payment parts. All zero on other chains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Fees {
    pub direct: u128,
    pub batch_fixed: u128,
    pub batch_per_item: u128,
}

/// What settling `n` payments costs, in both shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costs {
    /// Gas of an `aggregate3` batch.
    pub batch: GasModel,
    /// Gas of one direct `transferWithAuthorization`.
    pub direct_gas: u64,
    pub l1: L1Fees,
}

impl Costs {
    /// Gas of a settlement of `items` (in its shape).
    pub fn gas(&self, items: usize) -> u64 {
        match Shape::of(items) {
            Shape::Direct => self.direct_gas,
            Shape::Batch => self.batch.batch_gas(items),
        }
    }

    /// The L1 data fee of a settlement of `items` (wei).
    pub fn l1_fee(&self, items: usize) -> u128 {
        match Shape::of(items) {
            Shape::Direct => self.l1.direct,
            Shape::Batch => {
                self.l1.batch_fixed.saturating_add(self.l1.batch_per_item.saturating_mul(items as u128))
            }
        }
    }

    /// Wei per payment for a settlement of `items` at `fees`.
    pub fn cost_per_payment(&self, items: usize, fees: Fees) -> u128 {
        if items == 0 {
            return u128::MAX;
        }
        let total =
            u128::from(self.gas(items)).saturating_mul(fees.per_gas()).saturating_add(self.l1_fee(items));
        total / items as u128
    }
}

/// Learns the gas model from receipts: a least-squares line `gas = fixed + per_item · n`
/// through the most recent batches. Until two different sizes have been seen, only the
/// per-item part is learned (the fixed part keeps its seed). The line prices batches for
/// the planner; [`GasLearner::envelope`] sizes gas limits.
#[derive(Debug, Clone)]
pub struct GasLearner {
    seed: GasModel,
    samples: std::collections::VecDeque<(u64, u64)>,
    window: usize,
}

impl GasLearner {
    pub fn new(seed: GasModel, window: usize) -> Self {
        Self { seed, samples: std::collections::VecDeque::new(), window: window.max(2) }
    }

    /// A receipt: `items` payments used `gas_used` gas.
    pub fn observe(&mut self, items: usize, gas_used: u64) {
        if items == 0 {
            return;
        }
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back((items as u64, gas_used));
    }

    /// Whether any receipt was learnt from.
    pub fn learnt(&self) -> bool {
        !self.samples.is_empty()
    }

    /// The model as learned so far (the seed before any receipt).
    pub fn model(&self) -> GasModel {
        let n = self.samples.len() as f64;
        if n == 0.0 {
            return self.seed;
        }
        let (sx, sy) = self.samples.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x as f64, b + y as f64));
        let (mx, my) = (sx / n, sy / n);
        let (sxx, sxy) = self.samples.iter().fold((0.0, 0.0), |(a, b), &(x, y)| {
            let dx = x as f64 - mx;
            (a + dx * dx, b + dx * (y as f64 - my))
        });
        // At least the intrinsic 21,000 of any transaction; at least 1 per item.
        let (fixed, per_item) = if sxx > 0.0 {
            let slope = sxy / sxx;
            (my - slope * mx, slope)
        } else {
            let fixed = self.seed.fixed as f64;
            (fixed, (my - fixed) / mx)
        };
        GasModel { fixed: fixed.max(21_000.0).round() as u64, per_item: per_item.max(1.0).round() as u64 }
    }

    /// The gas a batch of `items` may need by what was learnt, before any margin: the line
    /// scaled by the largest ratio of gas used to the line's prediction in the window (at
    /// least 1), so a batch that used more than the line (fresh payees, say) is covered.
    /// `None` before the first receipt.
    pub fn envelope(&self, items: usize) -> Option<u64> {
        if self.samples.is_empty() {
            return None;
        }
        let m = self.model();
        let worst = self
            .samples
            .iter()
            .map(|&(n, used)| used as f64 / m.batch_gas(n as usize).max(1) as f64)
            .fold(1.0f64, f64::max);
        Some((m.batch_gas(items) as f64 * worst).ceil() as u64)
    }
}

/// The learners of one chain: one per token and shape (a direct call and a batch cost
/// differently, and so do tokens), each starting from the seeds.
#[derive(Debug, Clone)]
pub struct GasBook {
    seed: GasModel,
    window: usize,
    learners: std::collections::BTreeMap<(alloy::primitives::Address, Shape), GasLearner>,
}

impl GasBook {
    pub fn new(seed: GasModel, window: usize) -> Self {
        Self { seed, window, learners: Default::default() }
    }

    /// The learner for `token`'s settlements of `items` (the seeds' if none yet).
    pub fn learner(&self, token: alloy::primitives::Address, items: usize) -> GasLearner {
        self.learners
            .get(&(token, Shape::of(items)))
            .cloned()
            .unwrap_or_else(|| GasLearner::new(self.seed, self.window))
    }

    /// A receipt of `token`'s settlement of `items` that used `gas_used`.
    pub fn observe(&mut self, token: alloy::primitives::Address, items: usize, gas_used: u64) {
        let (seed, window) = (self.seed, self.window);
        self.learners
            .entry((token, Shape::of(items)))
            .or_insert_with(|| GasLearner::new(seed, window))
            .observe(items, gas_used);
    }

    /// What `token`'s settlements cost by what was learnt, with the L1 fees given.
    pub fn costs(&self, token: alloy::primitives::Address, l1: L1Fees) -> Costs {
        Costs {
            batch: self.learner(token, 2).model(),
            direct_gas: self.learner(token, 1).model().batch_gas(1),
            l1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gas_learner_finds_the_line() {
        let seed = GasModel { fixed: 40_000, per_item: 60_000 };
        let mut l = GasLearner::new(seed, 16);
        assert_eq!((l.model(), l.envelope(10)), (seed, None));
        // One size only: the per-item part from the seed's fixed part.
        l.observe(10, 40_000 + 10 * 45_000);
        assert_eq!(l.model(), GasModel { fixed: 40_000, per_item: 45_000 });
        // Two sizes: the exact line.
        l.observe(50, 27_000 + 50 * 45_300);
        l.observe(1, 27_000 + 45_300);
        l.observe(10, 27_000 + 10 * 45_300);
        l.samples.pop_front();
        assert_eq!(l.model(), GasModel { fixed: 27_000, per_item: 45_300 });
        assert_eq!(l.envelope(200), Some(27_000 + 200 * 45_300), "on the line: no more than the line");
        // The window forgets old samples.
        let mut w = GasLearner::new(seed, 2);
        for _ in 0..3 {
            w.observe(1, 200_000);
        }
        w.observe(2, 300_000);
        w.observe(4, 500_000);
        assert_eq!(w.model(), GasModel { fixed: 100_000, per_item: 100_000 });
    }

    #[test]
    fn the_envelope_covers_the_dearest_batch_seen() {
        let mut l = GasLearner::new(GasModel { fixed: 40_000, per_item: 60_000 }, 16);
        // Funded payees, then one batch of fresh ones (+22k each).
        for n in [10, 20, 30] {
            l.observe(n, 27_000 + n as u64 * 49_000);
        }
        l.observe(20, 27_000 + 20 * 71_000);
        let line = l.model().batch_gas(20);
        let env = l.envelope(20).unwrap();
        assert!(env >= 27_000 + 20 * 71_000, "covers the dear batch: {env}");
        assert!(env > line);
    }

    #[test]
    fn the_book_learns_per_token_and_shape() {
        use alloy::primitives::Address;
        let seed = GasModel { fixed: 40_000, per_item: 60_000 };
        let (a, b) = (Address::repeat_byte(1), Address::repeat_byte(2));
        let mut book = GasBook::new(seed, 8);
        book.observe(a, 1, 85_700);
        book.observe(a, 10, 27_000 + 10 * 45_000);
        book.observe(a, 20, 27_000 + 20 * 45_000);
        let c = book.costs(a, L1Fees::default());
        assert_eq!((c.direct_gas, c.batch), (85_700, GasModel { fixed: 27_000, per_item: 45_000 }));
        assert_eq!(book.costs(b, L1Fees::default()).batch, seed, "another token starts from the seeds");
        assert_eq!(book.learner(a, 1).envelope(1), Some(85_700));
    }
}
