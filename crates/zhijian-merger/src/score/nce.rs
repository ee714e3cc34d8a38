//! NCE: the negative conditional entropy of the target labels given the
//! source model's hard predictions on the target examples.
//!
//! Tran, Nguyen, Hassner, "Transferability and Hardness of Supervised
//! Classification Tasks", ICCV 2019 (<https://arxiv.org/abs/1908.08142>),
//! §3; as TLlib's `tllib/ranking/nce.py` computes it: with z = argmax θ(x)
//! the source model's predicted label (LEEP's paper scores NCE this way,
//! since target data carry no source labels) and the empirical joint
//! `P̂(y, z)` of the counts, `NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) ln P̂(y | z)`.
//! Always ≤ 0, 0 when z determines y; higher is better. Source labels never
//! predicted are skipped (TLlib masks them).

use tch::{Kind, Tensor};

use super::Prepared;

/// NCE of hard source labels `z` (`[n]` int64) against the labels.
pub(crate) fn nce(z: &Tensor, data: &Prepared) -> f64 {
    let sources = z.max().int64_value(&[]) + 1;
    let joint = data.one_hot().tr().mm(&z.one_hot(sources).to_kind(Kind::Double)) / data.n as f64;
    let p_z = joint.sum_dim_intlist(0, true, Kind::Double);
    let conditional = &joint / p_z.clamp_min(f64::MIN_POSITIVE);
    // 0 · ln 0 = 0: a cell with no example has a zero weight and a finite (clamped) logarithm.
    (&joint * conditional.clamp_min(f64::MIN_POSITIVE).log()).sum(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::super::Score;
    use super::super::testing::*;

    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Nce.compute(&features(), &labels(), Some(&source_probs())).unwrap();
        assert!((got - GOLDEN).abs() < 1e-12, "{got} vs {GOLDEN}");
    }
    /// golden.py's `nce`.
    const GOLDEN: f64 = -0.17328679513998632;

    /// A constant prediction tells nothing: NCE = −H(Y); one that names the class: 0.
    #[test]
    fn bounds_are_minus_the_label_entropy_and_zero() {
        let constant = Tensor::zeros([8], (Kind::Int64, tch::Device::Cpu)).one_hot(3).to_kind(Kind::Double);
        let got = Score::Nce.compute(&features(), &labels(), Some(&constant)).unwrap();
        let entropy = -(2.0 * 3.0 / 8.0 * (3.0f64 / 8.0).ln() + 2.0 / 8.0 * (2.0f64 / 8.0).ln());
        assert!((got + entropy).abs() < 1e-12, "{got} vs {}", -entropy);
        let exact = labels().one_hot(3).to_kind(Kind::Double);
        assert!(Score::Nce.compute(&features(), &labels(), Some(&exact)).unwrap().abs() < 1e-12);
    }
}
