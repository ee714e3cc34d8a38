//! LEEP: the log expected empirical prediction of the source model's soft
//! predictions, read through the empirical conditional P̂(y | z).
//!
//! Nguyen, Hassner, Seeger, Archambeau, "LEEP: A New Measure to Evaluate
//! Transferability of Learned Representations", ICML 2020
//! (<https://arxiv.org/abs/2002.12462>), eq. (1)–(2); as TLlib's
//! `tllib/ranking/leep.py` computes it: with θ(x) the source model's
//! probabilities over its z labels, the joint `P̂(y, z) = (1/n) Σ_{i: yᵢ = y} θ(xᵢ)_z`,
//! `P̂(y | z) = P̂(y, z) / Σ_y P̂(y, z)`, and
//! `LEEP = (1/n) Σᵢ ln Σ_z P̂(yᵢ | z) θ(xᵢ)_z`. Always ≤ 0; higher is better.
//! A source label no example puts mass on contributes nothing (TLlib would
//! divide 0 by 0 there).
//!
//! It reads no features: candidates differ only through their predictions
//! (the resolution the images are seen at). For Lite0 these are its shipped
//! ImageNet head's; a backbone without a pre-training head is refused.

use tch::{Kind, Tensor};

use super::Prepared;

/// LEEP of source probabilities `[n, z]` (f64, checked) against the labels.
pub(crate) fn leep(probs: &Tensor, data: &Prepared) -> f64 {
    let y = data.one_hot();
    let joint = y.tr().mm(probs) / data.n as f64;
    let mass = joint.sum_dim_intlist(0, true, Kind::Double);
    // Where no example puts mass on a source label, P̂(y | z) is never read (θ_z = 0 in every row).
    let conditional = joint / mass.clamp_min(f64::MIN_POSITIVE);
    let expected = probs.mm(&conditional.tr());
    (expected * &y).sum_dim_intlist(1, false, Kind::Double).log().mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::super::Score;
    use super::super::testing::*;

    #[test]
    fn matches_the_reference_on_a_tiny_input() {
        let got = Score::Leep.compute(&features(), &labels(), Some(&source_probs())).unwrap();
        assert!((got - GOLDEN).abs() < 1e-12, "{got} vs {GOLDEN}");
    }
    /// golden.py's `leep`.
    const GOLDEN: f64 = -0.7210406073491793;

    /// With one-hot predictions LEEP is NCE of the argmax (the paper's §3
    /// relation, with equality when θ is deterministic); a source model that
    /// names the target class exactly scores 0, the maximum.
    #[test]
    fn hard_predictions_give_nce_and_perfect_ones_zero() {
        let z = Tensor::from_slice(&[0i64, 0, 1, 2, 2, 1, 3, 3]);
        let hard = z.one_hot(4).to_kind(Kind::Double);
        let leep = Score::Leep.compute(&features(), &labels(), Some(&hard)).unwrap();
        let nce = Score::Nce.compute(&features(), &labels(), Some(&hard)).unwrap();
        assert!((leep - nce).abs() < 1e-12 && leep < 0.0, "{leep} vs {nce}");
        let perfect = labels().one_hot(4).to_kind(Kind::Double);
        assert!(Score::Leep.compute(&features(), &labels(), Some(&perfect)).unwrap().abs() < 1e-12);
        assert!(Score::Leep.compute(&features(), &labels(), Some(&source_probs())).unwrap() < 0.0);
    }

    /// Renaming the source labels changes nothing; sharper evidence of the target class scores higher.
    #[test]
    fn invariant_to_permuting_source_labels_and_rises_with_informative_predictions() {
        let p = source_probs();
        let a = Score::Leep.compute(&features(), &labels(), Some(&p)).unwrap();
        let b = Score::Leep.compute(&features(), &labels(), Some(&p.index_select(1, &Tensor::from_slice(&[2i64, 0, 3, 1])))).unwrap();
        assert!((a - b).abs() < 1e-12);
        let sharper = (p.log() + labels().one_hot(4).to_kind(Kind::Double) * 2.0).softmax(1, Kind::Double);
        assert!(Score::Leep.compute(&features(), &labels(), Some(&sharper)).unwrap() > a);
    }
}
