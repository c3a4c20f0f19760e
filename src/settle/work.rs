//! How long a cut takes from the engine's decision until the node has it, by its size: a
//! large batch is simulated, written and carried longer than a small one, so the send
//! lead of each cut is its own. A plain function of the sends measured.

use std::collections::VecDeque;

/// Sends remembered to fit the work of a cut from.
const SAMPLES: usize = 16;

/// The work per payment of a cut (microseconds) until sends of sizes far enough apart
/// ([`FIT_SPREAD`]) teach it: the first large batch must not miss its block for want of
/// a measure.
const PRIOR_PER_ITEM_US: f64 = 500.0;

/// The spread of batch sizes (payments) the work per payment is fitted from.
const FIT_SPREAD: u64 = 16;

/// The last sends: payments in the batch and milliseconds from decision to the node.
#[derive(Debug, Clone, Default)]
pub struct Work {
    samples: VecDeque<(u64, u64)>,
}

impl Work {
    /// A cut of `items` payments took `ms` from decision to the node.
    pub fn record(&mut self, items: usize, ms: u64) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((items as u64, ms));
    }

    /// The work of a cut of `items` payments (milliseconds): the least-squares line through
    /// the last sends, never falling with size; its slope [`PRIOR_PER_ITEM_US`] until the
    /// sizes sent spread enough to fit one (0 before any send).
    pub fn ms(&self, items: usize) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        let n = self.samples.len() as f64;
        let mean_x = self.samples.iter().map(|&(x, _)| x as f64).sum::<f64>() / n;
        let mean_y = self.samples.iter().map(|&(_, y)| y as f64).sum::<f64>() / n;
        let (lo, hi) = self.samples.iter().fold((u64::MAX, 0), |(lo, hi), &(x, _)| (lo.min(x), hi.max(x)));
        let slope = if hi - lo >= FIT_SPREAD {
            let sxx: f64 = self.samples.iter().map(|&(x, _)| (x as f64 - mean_x).powi(2)).sum();
            let sxy: f64 = self.samples.iter().map(|&(x, y)| (x as f64 - mean_x) * (y as f64 - mean_y)).sum();
            (sxy / sxx).max(0.0)
        } else {
            PRIOR_PER_ITEM_US / 1000.0
        };
        (mean_y + slope * (items as f64 - mean_x)).max(0.0).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_of_a_cut_grows_with_its_size_by_a_prior_then_by_the_fit() {
        let mut w = Work::default();
        assert_eq!(w.ms(100), 0, "nothing measured yet");
        w.record(2, 10);
        w.record(5, 12);
        assert_eq!(w.ms(3), 11, "sizes too close to fit: the mean");
        assert_eq!(w.ms(203), 111, "and half a millisecond per payment beyond it");
        w.record(82, 51);
        let (small, big) = (w.ms(2), w.ms(82));
        assert!((9..=11).contains(&small) && (50..=52).contains(&big), "fitted: {small}, {big}");
        // Larger cuts that happened to be quick never make a larger cut look cheaper.
        let mut w = Work::default();
        w.record(2, 40);
        w.record(90, 10);
        assert_eq!(w.ms(90), w.ms(2), "a falling line is flat");
        for i in 0..40 {
            w.record(1, i);
        }
        assert_eq!(w.ms(1), 32, "only the last 16 sends count: 24..=39");
    }
}
