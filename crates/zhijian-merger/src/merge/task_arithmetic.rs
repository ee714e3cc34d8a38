//! Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic",
//! ICLR 2023, <https://arxiv.org/abs/2212.04089>): a fine-tune's task vector
//! is τᵢ = θᵢ − θ₀; adding λ Σ τᵢ to the pre-trained θ₀ gives one model for
//! every task. λ = 0 is the pre-trained model; one model with λ = 1 is itself.

use super::{Weights, combine_deltas};

/// θ₀ + λ Σᵢ (θᵢ − θ₀).
pub fn merge(base: &Weights, models: &[&Weights], lambda: f64) -> Weights {
    combine_deltas(base, models, |taus| super::soup::sum(taus) * lambda)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::tests::{values, weights};

    #[test]
    fn adds_the_scaled_sum_of_task_vectors() {
        let base = weights(&[("w", &[1.0, 1.0])]);
        let a = weights(&[("w", &[2.0, 1.0])]);
        let b = weights(&[("w", &[1.0, -1.0])]);
        // τ_a = (1, 0), τ_b = (0, −2): 1 + 0.5·1, 1 + 0.5·(−2).
        assert_eq!(values(&merge(&base, &[&a, &b], 0.5), "w"), [1.5, 0.0]);
        assert_eq!(values(&merge(&base, &[&a, &b], 0.0), "w"), [1.0, 1.0]);
        assert_eq!(values(&merge(&base, &[&a], 1.0), "w"), [2.0, 1.0]);
    }
}
