//! H-score: how much of the features' variance the class means explain,
//! measured in the features' own metric.
//!
//! Bao, Li, Huang, Zheng, Tong, "An Information-Theoretic Approach to
//! Transferability in Task Transfer Learning", ICIP 2019, Definition 2; as
//! TLlib's `tllib/ranking/hscore.py` computes it:
//! `H = tr(cov(f)⁺ cov(g))` with `g(x) = E[f | y(x)]` (each row replaced by its
//! class mean), both covariances over examples with `n − 1` (numpy's
//! `np.cov`), and the pseudo-inverse keeping eigenvalues above 1e-15 × the
//! largest (numpy's `pinv(rcond = 1e-15)`). Invariant to any invertible
//! linear map of the features; higher is better. It equals `tr(P_F P_Y)`,
//! the trace of the projections on the centred features' and on the class
//! indicators' spans in example space, so with at least `n − 1` dimensions
//! (features spanning every centred direction) it is exactly C − 1 whatever
//! the features: it cannot compare wide features on few examples (the
//! shrinkage of Ibrahim et al. 2022 would; not applied, as in the reference).

use tch::Kind;

use super::{Prepared, psd_eigh, to_vec};

/// Eigenvalues of cov(f) at or below this fraction of the largest are dropped by the pseudo-inverse.
pub const RCOND: f64 = 1e-15;

/// H-score of prepared features and labels.
pub(crate) fn hscore(data: &Prepared) -> f64 {
    let cov = |x: &tch::Tensor| {
        let centred = x - x.mean_dim(0, true, Kind::Double);
        centred.tr().mm(&centred) / (data.n - 1) as f64
    };
    let y = data.one_hot();
    let means = y.tr().mm(&data.f) / y.sum_dim_intlist(0, false, Kind::Double).unsqueeze(1);
    let g = y.mm(&means);
    let (values, vectors) = psd_eigh(&cov(&data.f));
    // tr(V diag(1/λ) Vᵀ C) = Σᵢ vᵢᵀ C vᵢ / λᵢ over the kept eigenvalues.
    let along = to_vec(&vectors.tr().mm(&cov(&g)).mm(&vectors).diagonal(0, 0, 1));
    let values = to_vec(&values);
    let cutoff = RCOND * values.iter().copied().fold(0.0, f64::max);
    values.iter().zip(&along).filter(|(l, _)| **l > cutoff).map(|(l, a)| a / l).sum()
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::super::Score;
    use super::super::testing::*;

    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Hscore.compute(&features(), &labels(), None).unwrap();
        assert!((got - GOLDEN).abs() < 1e-10, "{got} vs {GOLDEN}");
    }
    /// golden.py's `hscore`.
    const GOLDEN: f64 = 1.7655648889833677;

    /// tr(cov(f)⁻¹ cov(g)) is unchanged by f → f A + b for invertible A.
    #[test]
    fn invariant_to_invertible_linear_maps() {
        let (f, y) = clusters(3, 30, 6, 1.5, 11);
        tch::manual_seed(2);
        let a = Tensor::randn([6, 6], (Kind::Double, Device::Cpu)) + Tensor::eye(6, (Kind::Double, Device::Cpu)) * 3.0;
        let before = Score::Hscore.compute(&f, &y, None).unwrap();
        let after = Score::Hscore.compute(&(f.mm(&a) + 7.0), &y, None).unwrap();
        assert!((before - after).abs() < 1e-8 * before.abs().max(1.0), "{before} vs {after}");
    }

    /// As many dimensions as examples − 1: the score is C − 1 for any features.
    #[test]
    fn saturates_at_classes_minus_one_when_features_are_wide() {
        for seed in 0..3 {
            let (f, y) = clusters(4, 5, 30, 0.1 + seed as f64, seed);
            let h = Score::Hscore.compute(&f, &y, None).unwrap();
            assert!((h - 3.0).abs() < 1e-6, "{h}");
        }
    }

    /// Between-class variance up, within-class fixed: higher; bounded by the number of classes − 1.
    #[test]
    fn rises_with_separability_up_to_classes_minus_one() {
        let score = |sep: f64| {
            let (f, y) = clusters(4, 50, 8, sep, 4);
            Score::Hscore.compute(&f, &y, None).unwrap()
        };
        let (a, b, c) = (score(0.3), score(1.5), score(8.0));
        assert!(a < b && b < c && c < 3.0, "{a} {b} {c}");
    }
}
