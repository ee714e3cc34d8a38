//! TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When
//! Merging Models", NeurIPS 2023, <https://arxiv.org/abs/2306.01708>), as its
//! reference code (`prateeky2806/ties-merging`) does:
//!
//! 1. **Trim**: each task vector τᵢ = θᵢ − θ₀ keeps its `density` share of
//!    entries of largest magnitude, counted over the whole vector (every merged
//!    tensor, flattened together), the rest set to 0.
//! 2. **Elect**: each entry's sign is the sign of the trimmed vectors' sum.
//! 3. **Disjoint mean**: each entry is the mean of the trimmed values that
//!    have the elected sign (0 where none has).
//!
//! θ = θ₀ + λ τ_merged. At density 1 with one model, or with models whose task
//! vectors agree in sign everywhere, this is task arithmetic with λ / n.

use tch::{Kind, Tensor};

use super::{Weights, combine_deltas};

/// TIES-merging of `models` onto `base`.
pub fn merge(base: &Weights, models: &[&Weights], density: f64, lambda: f64) -> Weights {
    // The magnitude each task vector's kept entries must reach, over all its entries.
    let thresholds: Vec<Option<f64>> = models.iter().map(|m| threshold(base, m, density)).collect();
    combine_deltas(base, models, |taus| {
        let trimmed: Vec<Tensor> = taus.iter().zip(&thresholds).map(|(t, th)| th.map_or_else(|| t.copy(), |th| *t * t.abs().ge(th))).collect();
        let stacked = Tensor::stack(&trimmed, 0);
        let elected = stacked.sum_dim_intlist(0, false, Kind::Float).sign();
        let agrees = stacked.sign().eq_tensor(&elected.unsqueeze(0)).logical_and(&stacked.ne(0.0));
        let count = agrees.sum_dim_intlist(0, false, Kind::Float).clamp_min(1.0);
        (stacked * &agrees).sum_dim_intlist(0, false, Kind::Float) / count * lambda
    })
}

/// The smallest magnitude a kept entry of θ − θ₀ has, or none at density ≥ 1 (keep all).
fn threshold(base: &Weights, model: &Weights, density: f64) -> Option<f64> {
    if density >= 1.0 {
        return None;
    }
    let all = Tensor::cat(&base.iter().filter_map(|(k, b)| model.get(k).map(|m| (m - b).abs().flatten(0, -1).to_kind(Kind::Float))).collect::<Vec<_>>(), 0);
    let n = all.numel() as i64;
    let keep = ((density * n as f64).round() as i64).clamp(0, n);
    if keep == 0 {
        return Some(f64::INFINITY);
    }
    // The keep-th largest magnitude: entries tied with it are kept too.
    let (top, _) = all.topk(keep, 0, true, false);
    Some(top.min().double_value(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::tests::{values, weights};

    #[test]
    fn trims_elects_and_averages_the_agreeing_values() {
        let base = weights(&[("w", &[0.0; 4])]);
        // Trimmed to density 0.5 (2 of 4 entries each): a (3, 0, 0, −4), b (0, −2, 0, 5), c (−1, 0, 2, 0).
        let a = weights(&[("w", &[3.0, 1.0, 0.5, -4.0])]);
        let b = weights(&[("w", &[0.1, -2.0, 0.0, 5.0])]);
        let c = weights(&[("w", &[-1.0, 0.5, 2.0, 0.0])]);
        // Sums 2, −2, 2, 1 → signs +, −, +, +. Agreeing: entry 0 {3}, 1 {−2}, 2 {2}, 3 {5}.
        assert_eq!(values(&merge(&base, &[&a, &b, &c], 0.5, 1.0), "w"), [3.0, -2.0, 2.0, 5.0]);
        // At density 1: sums 2.1, −0.5, 2.5, 1 → +, −, +, +; means of agreeing (3, 0.1) (−2) (0.5, 2) (5).
        let m = values(&merge(&base, &[&a, &b, &c], 1.0, 2.0), "w");
        let want = [2.0 * 3.1 / 2.0, -4.0, 2.0 * 2.5 / 2.0, 10.0];
        for (g, w) in m.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{m:?} against {want:?}");
        }
    }

    #[test]
    fn density_counts_over_every_tensor_together() {
        let base = weights(&[("u", &[0.0, 0.0]), ("v", &[0.0, 0.0])]);
        let a = weights(&[("u", &[1.0, 2.0]), ("v", &[3.0, 4.0])]);
        // Half of four entries: 3 and 4, both in v; u loses everything.
        let m = merge(&base, &[&a], 0.5, 1.0);
        assert_eq!(values(&m, "u"), [0.0, 0.0]);
        assert_eq!(values(&m, "v"), [3.0, 4.0]);
    }
}
