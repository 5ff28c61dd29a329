//! What a run cost, in USD, from the prices configured per role (`FLASH_PRICE_*_PER_MTOK`,
//! `PRO_PRICE_*_PER_MTOK`) and the token counts the providers reported.
//!
//! Unknown stays unknown: a cost that needs a price that is not set, or a token count the
//! provider did not report, is `None` (`null` on the wire and in the database), never 0, so
//! that a sum over runs is never silently short. The rules are in docs/audit.md ("Cost").

use crate::{config::Prices, providers::Usage};

/// One model call's cost: input tokens × input price + output tokens × output price (prices
/// per million tokens). `None` unless both prices are set and both counts were reported.
pub fn of_model(prices: Prices, usage: Usage) -> Option<f64> {
    let input = usage.input_tokens? as f64 * prices.input_per_mtok? / 1e6;
    let output = usage.output_tokens? as f64 * prices.output_per_mtok? / 1e6;
    Some(input + output)
}

/// One model's part of a run, as [`of_run`] weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// The model's cost, from [`of_model`].
    pub cost_usd: Option<f64>,
    /// Whether the provider reported any token count for the call.
    pub reported: bool,
}

impl Part {
    pub fn of(prices: Prices, usage: Usage) -> Part {
        Part {
            cost_usd: of_model(prices, usage),
            reported: usage.input_tokens.is_some() || usage.output_tokens.is_some(),
        }
    }
}

/// A run's cost: the sum of its models' costs, or `None`.
///
/// - `None` when a model reported tokens but its cost is unknown (a price not set, or only
///   one of the two counts reported): adding up the other model alone would under-report
///   the run by a whole model, and a dashboard summing dollars could not tell.
/// - `None` when no model has a known cost (no prices set, or neither call reported usage).
/// - Otherwise the sum of the known costs. A call that ended without reporting usage
///   (skipped because Pro answered first, cancelled, timed out, failed) adds nothing:
///   providers report usage only at the end of a stream, so what such a call was billed
///   upstream, if anything, is not known to duet. The run's cost is then a floor.
pub fn of_run(parts: &[Part]) -> Option<f64> {
    if parts.iter().any(|p| p.reported && p.cost_usd.is_none()) {
        return None;
    }
    parts.iter().filter_map(|p| p.cost_usd).reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICES: Prices = Prices {
        input_per_mtok: Some(0.3),
        output_per_mtok: Some(2.5),
    };

    fn usage(input: Option<u64>, output: Option<u64>) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[test]
    fn a_model_costs_its_tokens_at_its_prices_or_nothing_is_known() {
        let cost = of_model(PRICES, usage(Some(1_000_000), Some(2_000_000))).unwrap();
        assert!((cost - 5.3).abs() < 1e-12, "{cost}");
        assert_eq!(of_model(PRICES, usage(Some(0), Some(0))), Some(0.0));
        // Any missing price or count makes the cost unknown, never 0.
        assert_eq!(of_model(PRICES, usage(None, Some(10))), None);
        assert_eq!(of_model(PRICES, usage(Some(10), None)), None);
        let half = Prices {
            output_per_mtok: None,
            ..PRICES
        };
        assert_eq!(of_model(half, usage(Some(10), Some(10))), None);
        assert_eq!(of_model(Prices::default(), usage(Some(10), Some(10))), None);
    }

    #[test]
    fn a_run_is_the_sum_unless_a_model_that_reported_tokens_has_no_price() {
        let priced = Part::of(PRICES, usage(Some(1_000_000), Some(0)));
        let unpriced = Part::of(Prices::default(), usage(Some(5), Some(5)));
        let silent = Part::of(Prices::default(), usage(None, None));
        let sum = of_run(&[priced, priced]).unwrap();
        assert!((sum - 0.6).abs() < 1e-12, "{sum}");
        // A skipped or cancelled call reported nothing: the run costs what is known.
        assert_eq!(of_run(&[silent, priced]), priced.cost_usd);
        // A model whose tokens are known but not priced: the sum would be short.
        assert_eq!(of_run(&[unpriced, priced]), None);
        // Nothing known at all.
        assert_eq!(of_run(&[silent, silent]), None);
        assert_eq!(of_run(&[unpriced, unpriced]), None);
    }
}
