//! LogME: the log maximum evidence of a Bayesian linear model from the
//! features to each class's one-hot target, averaged over classes.
//!
//! You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models
//! for Transfer Learning", ICML 2021 (<https://arxiv.org/abs/2102.11005>),
//! Algorithm 1; as TLlib's `tllib/ranking/logme.py` computes it (and the
//! authors' `thuml/LogME`): with `FᵀF = V diag(s) Vᵀ` (here a symmetric
//! eigendecomposition, which for this PSD matrix equals the SVD TLlib takes),
//! for each class c with target `y` (1 on its rows, 0 elsewhere), start at
//! α = β = 1 and iterate at most 11 times
//!
//! ```text
//! γ = Σ s/(s + α/β),  m = β V (Vᵀ Fᵀ y) / (α + β s),
//! α ← γ / |m|²,  β ← (n − γ) / |y − F m|²,   stop when α/β moves by < 1 %,
//! ```
//!
//! then the evidence per example
//! `L/n = [d/2 ln α + n/2 ln β − ½ Σ ln(α + β s) − β/2 |y − F m|² − α/2 |m|² − n/2 ln 2π] / n`
//! (|m|² and the residual from the last step's m, as the reference keeps them).
//! The score is its mean over the classes present. Higher is better.

use tch::Tensor;

use super::{Prepared, psd_eigh, to_vec};

/// Most fixed-point steps (the paper: converges within 10, usually 2 or 3).
pub const MAX_STEPS: usize = 11;

/// LogME of prepared features and labels.
pub(crate) fn logme(data: &Prepared) -> f64 {
    let (n, d) = (data.n as f64, data.d as f64);
    let (s, v) = psd_eigh(&data.f.tr().mm(&data.f));
    let y = data.one_hot();
    // Vᵀ Fᵀ y for every class at once: [d, classes].
    let projected = v.tr().mm(&data.f.tr().mm(&y));
    let evidences: Vec<f64> = (0..data.classes.len() as i64).map(|c| class_evidence(&data.f, &y.select(1, c), &s, &v, &projected.select(1, c), n, d)).collect();
    evidences.iter().sum::<f64>() / evidences.len() as f64
}

/// The evidence per example of one target column `y`.
fn class_evidence(f: &Tensor, y: &Tensor, s: &Tensor, v: &Tensor, projected: &Tensor, n: f64, d: f64) -> f64 {
    let (mut alpha, mut beta) = (1.0f64, 1.0f64);
    let mut lam = alpha / beta;
    let (mut alpha_de, mut beta_de) = (0.0, 0.0);
    for _ in 0..MAX_STEPS {
        let gamma = (s / (s + lam)).sum(tch::Kind::Double).double_value(&[]);
        let m = v.mv(&(projected * beta / (s * beta + alpha)));
        alpha_de = m.dot(&m).double_value(&[]);
        alpha = gamma / alpha_de;
        let residual = y - f.mv(&m);
        beta_de = residual.dot(&residual).double_value(&[]);
        beta = (n - gamma) / beta_de;
        let new_lam = alpha / beta;
        if ((new_lam - lam) / lam).abs() < 0.01 {
            break;
        }
        lam = new_lam;
    }
    let log_det: f64 = to_vec(s).iter().map(|si| (alpha + beta * si).ln()).sum();
    let evidence = d / 2.0 * alpha.ln() + n / 2.0 * beta.ln()
        - 0.5 * log_det
        - beta / 2.0 * beta_de
        - alpha / 2.0 * alpha_de
        - n / 2.0 * (2.0 * std::f64::consts::PI).ln();
    evidence / n
}

#[cfg(test)]
mod tests {
    use super::super::Score;
    use super::super::testing::*;

    /// golden.py: TLlib's algorithm in numpy on the same numbers.
    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Logme.compute(&features(), &labels(), None).unwrap();
        assert!((got - GOLDEN).abs() < 1e-9, "{got} vs {GOLDEN}");
    }
    /// golden.py's `logme`.
    const GOLDEN: f64 = -0.5163653717137554;

    /// More separable classes: more evidence for a linear model.
    #[test]
    fn rises_with_separability() {
        let score = |sep: f64| {
            let (f, y) = clusters(4, 40, 12, sep, 3);
            Score::Logme.compute(&f, &y, None).unwrap()
        };
        let (a, b, c) = (score(0.5), score(2.0), score(6.0));
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    /// The evidence depends on F only through FᵀF's spectrum and Fᵀy, so an
    /// orthogonal rotation of the features leaves it unchanged.
    #[test]
    fn invariant_to_rotating_the_features() {
        let (f, y) = clusters(3, 30, 8, 2.0, 5);
        let a = Score::Logme.compute(&f, &y, None).unwrap();
        let b = Score::Logme.compute(&f.mm(&rotation(8, 9)), &y, None).unwrap();
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }
}
