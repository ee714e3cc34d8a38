//! GBC: the Gaussian Bhattacharyya coefficient, minus the overlap between
//! every pair of classes modelled as Gaussians in the features' top
//! principal components.
//!
//! Pándy, Agostinelli, Uijlings, Ferrari, Mensink, "Transferability
//! Estimation using Bhattacharyya Class Separability", CVPR 2022
//! (<https://arxiv.org/abs/2111.12780>), eq. (1)–(4); as google-research
//! `stable_transfer/transferability/gbc.py` computes it, after its PCA
//! (`features_targets_utils.pca_reduction`, 64 components in its
//! `config_transferability_source_selection.py`): project the centred
//! features on their top [`PCA_DIM`] principal components (all of them when
//! fewer exist), fit each class c a diagonal Gaussian (mean μ_c, population
//! variance σ_c per component, floored at 1e-4), and with `σ = (σ_c + σ_c′)/2`
//!
//! ```text
//! D_B(c, c′) = ⅛ Σ (μ_c − μ_c′)² / σ + ½ (Σ ln σ − ½ Σ ln σ_c − ½ Σ ln σ_c′),
//! GBC = − Σ_c Σ_{c′ ≠ c} exp(−D_B(c, c′)).
//! ```
//!
//! Diagonal Gaussians, as the brief of this project asks (the reference
//! offers `spherical` too, its configs' default). Always ≤ 0, 0 for classes
//! that do not overlap; higher is better. Invariant to translating and
//! rotating the features (PCA follows them; the signs of the components do
//! not matter).

use tch::Kind;

use super::{Prepared, psd_eigh, to_vec};

/// Principal components kept.
pub const PCA_DIM: i64 = 64;
/// Floor of a per-class variance (constant features would divide by zero).
pub const MIN_VARIANCE: f64 = 1e-4;

/// GBC of prepared features and labels.
pub(crate) fn gbc(data: &Prepared) -> f64 {
    let centred = &data.f - data.f.mean_dim(0, true, Kind::Double);
    // sklearn's PCA keeps at most min(n, d) components; eigenvalues come ascending.
    let k = PCA_DIM.min(data.d).min(data.n);
    let (_, vectors) = psd_eigh(&centred.tr().mm(&centred));
    let reduced = centred.mm(&vectors.narrow(1, data.d - k, k));
    let stats: Vec<(Vec<f64>, Vec<f64>)> = (0..data.classes.len())
        .map(|c| {
            let rows = reduced.index_select(0, &data.classes[c].1);
            let mean = rows.mean_dim(0, false, Kind::Double);
            let variance = (&rows - &mean).square().mean_dim(0, false, Kind::Double).clamp_min(MIN_VARIANCE);
            (to_vec(&mean), to_vec(&variance))
        })
        .collect();
    let mut total = 0.0;
    for (i, a) in stats.iter().enumerate() {
        for (j, b) in stats.iter().enumerate() {
            if i != j {
                total += (-bhattacharyya(a, b)).exp();
            }
        }
    }
    -total
}

/// Bhattacharyya distance between two diagonal Gaussians `(mean, variance)`.
fn bhattacharyya((m1, s1): &(Vec<f64>, Vec<f64>), (m2, s2): &(Vec<f64>, Vec<f64>)) -> f64 {
    let (mut mahalanobis, mut log_ratio) = (0.0, 0.0);
    for i in 0..m1.len() {
        let s = (s1[i] + s2[i]) / 2.0;
        mahalanobis += (m1[i] - m2[i]).powi(2) / s;
        log_ratio += s.ln() - 0.5 * s1[i].ln() - 0.5 * s2[i].ln();
    }
    mahalanobis / 8.0 + 0.5 * log_ratio
}

#[cfg(test)]
mod tests {
    use super::super::Score;
    use super::super::testing::*;

    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Gbc.compute(&features(), &labels(), None).unwrap();
        assert!((got - GOLDEN).abs() < 1e-10, "{got} vs {GOLDEN}");
    }
    /// golden.py's `gbc`.
    const GOLDEN: f64 = -0.007564571965226594;

    /// Two identical Gaussians overlap fully (coefficient 1); far apart, not at all.
    #[test]
    fn distance_is_zero_for_equal_gaussians() {
        let g = (vec![1.0, -2.0], vec![0.5, 2.0]);
        assert_eq!(super::bhattacharyya(&g, &g), 0.0);
        // One dimension, equal variances: (Δμ)² / (8σ).
        let (a, b) = ((vec![0.0], vec![2.0]), (vec![4.0], vec![2.0]));
        assert!((super::bhattacharyya(&a, &b) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn rises_to_zero_with_separability() {
        let score = |sep: f64| {
            let (f, y) = clusters(3, 40, 6, sep, 7);
            Score::Gbc.compute(&f, &y, None).unwrap()
        };
        let (a, b, c) = (score(0.2), score(2.0), score(20.0));
        assert!(a < b && b < c && c <= 0.0 && c > -1e-6 && a > -6.0, "{a} {b} {c}");
    }

    /// More dimensions than components kept: the PCA is what the score sees, and it follows a rotation.
    #[test]
    fn invariant_to_translation_and_rotation_through_the_pca() {
        let (f, y) = clusters(3, 40, 80, 1.0, 12);
        let a = Score::Gbc.compute(&f, &y, None).unwrap();
        let b = Score::Gbc.compute(&(f.mm(&rotation(80, 4)) + 2.5), &y, None).unwrap();
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }
}
