//! Jittered exponential backoff: the one schedule of waits between retries, shared by the
//! model calls (`run::drive`) and the audit writer (`audit::writer`).
//!
//! Each user picks its own base, cap and spread; the arithmetic lives here once.

use std::time::Duration;

/// Waits that double from `base` up to `cap`, each scaled by a random factor in
/// [`floor`, 1] so that many callers failing at once do not retry in lock-step.
///
/// [`floor`]: Backoff::floor
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The nominal wait before the first retry.
    pub base: Duration,
    /// No nominal wait is longer than this.
    pub cap: Duration,
    /// The smallest share of the nominal wait a jittered wait may be, in (0, 1].
    pub floor: f64,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration, floor: f64) -> Self {
        Backoff { base, cap, floor }
    }

    /// The wait before retry `n` (0-based), before jitter: `base · 2^n`, capped.
    pub fn nominal(&self, n: u32) -> Duration {
        self.base.saturating_mul(1 << n.min(16)).min(self.cap)
    }

    /// The nominal wait before retry `n` scaled by a uniform factor in [`floor`, 1].
    ///
    /// [`floor`]: Backoff::floor
    pub fn jittered(&self, n: u32) -> Duration {
        self.nominal(n)
            .mul_f64(rand::random_range(self.floor..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_jitter_stays_in_its_band() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 0.5);
        let nominal: Vec<u128> = (0..7).map(|n| b.nominal(n).as_millis()).collect();
        assert_eq!(nominal, [100, 200, 400, 800, 1600, 2000, 2000]);
        // A huge retry count neither overflows nor passes the cap.
        assert_eq!(b.nominal(u32::MAX), b.cap);
        for n in 0..7 {
            for _ in 0..100 {
                let j = b.jittered(n);
                assert!(j <= b.nominal(n) && j >= b.nominal(n).mul_f64(0.5), "{j:?}");
            }
        }
    }
}
