//! DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities
//! from Homologous Models as a Free Lunch", ICML 2024,
//! <https://arxiv.org/abs/2311.03099>): each task vector τᵢ = θᵢ − θ₀ drops
//! each entry with probability p = 1 − density and rescales the survivors by
//! 1 / density, so its expectation is unchanged; the sparse vectors then merge
//! by task arithmetic, θ₀ + λ Σᵢ τ̃ᵢ. At density 1 it is task arithmetic.

use tch::{Kind, Tensor};

use super::{Weights, combine_deltas};

/// DARE + task arithmetic of `models` onto `base`; the drop masks come from `seed`.
pub fn merge(base: &Weights, models: &[&Weights], density: f64, lambda: f64, seed: u64) -> Weights {
    if density >= 1.0 {
        return super::task_arithmetic::merge(base, models, lambda);
    }
    tch::manual_seed(seed as i64);
    combine_deltas(base, models, |taus| {
        let kept: Vec<Tensor> = taus.iter().map(|t| *t * Tensor::rand_like(t).lt(density).to_kind(Kind::Float) / density).collect();
        super::soup::sum(&kept.iter().collect::<Vec<_>>()) * lambda
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::tests::{values, weights};

    #[test]
    fn drops_and_rescales_keeping_the_expectation() {
        let n = 20_000;
        let base = weights(&[("w", &vec![0.0; n])]);
        let a = weights(&[("w", &vec![1.0; n])]);
        let m = values(&merge(&base, &[&a], 0.25, 1.0, 7), "w");
        // Every entry is 0 or 1 / 0.25 = 4, about a quarter of them 4.
        assert!(m.iter().all(|&v| v == 0.0 || v == 4.0));
        let kept = m.iter().filter(|&&v| v == 4.0).count() as f64 / n as f64;
        assert!((kept - 0.25).abs() < 0.02, "{kept}");
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.08, "{mean}");
        // The same seed draws the same masks.
        assert_eq!(m, values(&merge(&base, &[&a], 0.25, 1.0, 7), "w"));
    }
}
