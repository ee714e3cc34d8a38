//! TransRate: the mutual information between features and labels,
//! estimated by the coding rate of the features minus its mean over classes.
//!
//! Huang, Huang, Yang, Zhang, Li, "Frustratingly Easy Transferability
//! Estimation", ICML 2022 (<https://arxiv.org/abs/2106.09362>), eq. (6)–(8);
//! as TLlib's `tllib/ranking/transrate.py` and the authors' code compute it:
//! centre the features on their mean (the paper's centring), then
//! `TrR = R(F) − (1/C) Σ_c R(F_c)` with the coding rate
//! `R(Z) = ½ ln det(I + ZᵀZ / (n_Z ε))`, ε = 1e-4, `n_Z` the rows of Z, and
//! `F_c` the centred rows of class c (not centred again). The determinant is
//! taken on the smaller of ZᵀZ and ZZᵀ (Sylvester's identity), through their
//! eigenvalues. Invariant to translating and rotating the features; not to
//! scaling them. Higher is better.

use tch::Tensor;

use super::{Prepared, psd_eigh, to_vec};

/// The distortion ε.
pub const EPS: f64 = 1e-4;

/// TransRate of prepared features and labels.
pub(crate) fn transrate(data: &Prepared) -> f64 {
    let centred = &data.f - data.f.mean_dim(0, true, tch::Kind::Double);
    let per_class: f64 = (0..data.classes.len()).map(|k| coding_rate(&centred.index_select(0, &data.classes[k].1))).sum();
    coding_rate(&centred) - per_class / data.classes.len() as f64
}

/// `½ ln det(I + ZᵀZ / (n ε))` of `z` `[n, d]`.
fn coding_rate(z: &Tensor) -> f64 {
    let (n, d) = (z.size()[0], z.size()[1]);
    let gram = if d <= n { z.tr().mm(z) } else { z.mm(&z.tr()) };
    let (values, _) = psd_eigh(&gram);
    0.5 * to_vec(&values).iter().map(|l| (l / (n as f64 * EPS)).ln_1p()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::super::Score;
    use super::super::testing::*;

    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Transrate.compute(&features(), &labels(), None).unwrap();
        assert!((got - GOLDEN).abs() < 1e-10, "{got} vs {GOLDEN}");
    }
    /// golden.py's `transrate`.
    const GOLDEN: f64 = 2.2479153935044547;

    /// More examples than dimensions and fewer take the two Gram matrices; both agree with the direct form.
    #[test]
    fn both_gram_matrices_give_the_same_rate() {
        let (f, _) = clusters(2, 3, 10, 1.0, 8);
        let direct = |z: &tch::Tensor| {
            let n = z.size()[0] as f64;
            let m = tch::Tensor::eye(z.size()[1], (tch::Kind::Double, tch::Device::Cpu)) + z.tr().mm(z) / (n * super::EPS);
            0.5 * tch::Tensor::linalg_slogdet(&m).1.double_value(&[])
        };
        assert!((super::coding_rate(&f) - direct(&f)).abs() < 1e-8);
        let tall = f.tr().contiguous();
        assert!((super::coding_rate(&tall) - direct(&tall)).abs() < 1e-8);
    }

    /// Centring and the log-determinant make it blind to translations and rotations.
    #[test]
    fn invariant_to_translation_and_rotation() {
        let (f, y) = clusters(3, 20, 5, 2.0, 6);
        let a = Score::Transrate.compute(&f, &y, None).unwrap();
        let b = Score::Transrate.compute(&(f.mm(&rotation(5, 1)) - 4.0), &y, None).unwrap();
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }

    #[test]
    fn rises_with_separability() {
        let score = |sep: f64| {
            let (f, y) = clusters(4, 30, 10, sep, 2);
            Score::Transrate.compute(&f, &y, None).unwrap()
        };
        let (a, b, c) = (score(0.2), score(2.0), score(8.0));
        assert!(a < b && b < c, "{a} {b} {c}");
    }
}
