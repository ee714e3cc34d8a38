//! Kendall's τ-b: how well a score orders candidates as their accuracies do.
//!
//! Kendall, "The treatment of ties in ranking problems", Biometrika 1945:
//! `τ_b = (P − Q) / √((n₀ − n₁)(n₀ − n₂))` over the `n₀ = n(n−1)/2` pairs, with
//! P concordant and Q discordant pairs, n₁ and n₂ the pairs tied in x and in
//! y (a pair tied in both counts in both); as `scipy.stats.kendalltau`
//! (variant `b`). O(n²): candidates are few.

/// τ-b of two equally long sequences; `None` when fewer than two pairs'
/// worth of data or when either sequence is constant (τ undefined).
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "kendall_tau_b: sequences of different lengths");
    let n = x.len();
    let (mut concordant, mut discordant, mut tied_x, mut tied_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let (dx, dy) = (x[i] - x[j], y[i] - y[j]);
            if dx == 0.0 {
                tied_x += 1;
            }
            if dy == 0.0 {
                tied_y += 1;
            }
            if dx != 0.0 && dy != 0.0 {
                if (dx > 0.0) == (dy > 0.0) {
                    concordant += 1;
                } else {
                    discordant += 1;
                }
            }
        }
    }
    let pairs = (n * n.saturating_sub(1) / 2) as i64;
    let denominator = (((pairs - tied_x) * (pairs - tied_y)) as f64).sqrt();
    (denominator > 0.0).then(|| (concordant - discordant) as f64 / denominator)
}

#[cfg(test)]
mod tests {
    use super::kendall_tau_b;

    #[test]
    fn perfect_reversed_and_undefined() {
        assert_eq!(kendall_tau_b(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(kendall_tau_b(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(kendall_tau_b(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(kendall_tau_b(&[1.0], &[1.0]), None);
    }

    /// Ties in both sequences, counted by hand (τ-b as scipy.stats.kendalltau defines it):
    /// 7 concordant, 1 discordant, one pair tied in x, one in y, n₀ = 10: 6 / √(9·9).
    #[test]
    fn ties_in_both_sequences_match_scipy() {
        let tau = kendall_tau_b(&[1.0, 2.0, 2.0, 3.0, 4.0], &[2.0, 1.0, 3.0, 3.0, 5.0]).unwrap();
        assert!((tau - 2.0 / 3.0).abs() < 1e-15, "{tau}");
        // Ties in x only: 5 concordant, one pair tied in x, n₀ = 6: 5 / √(5·6).
        let tau = kendall_tau_b(&[1.0, 1.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((tau - 5.0 / 30f64.sqrt()).abs() < 1e-15, "{tau}");
    }
}
