//! Transferability scores: which pre-trained backbone (or which of its layers,
//! at which input resolution) to reuse for a target task, estimated from the
//! candidate's frozen features on the target's training data before any
//! fine-tuning. One score per file, each following its paper and the
//! reference code named in its header (TLlib `tllib/ranking`, google-research
//! `stable_transfer/transferability`); [`kendall`] checks a score's ranking
//! against the accuracies the candidates reach.
//!
//! Every score is computed in f64 on the CPU whatever the features' kind and
//! device, and is "higher is better". Scores that read the source model's
//! predictions over its own label space (LEEP, NCE) refuse candidates without
//! them (a text encoder without a pre-training head, an intermediate layer).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use zhijian_core::{Error, Result};

pub mod gbc;
pub mod hscore;
pub mod kendall;
pub mod leep;
pub mod logme;
pub mod nce;
pub mod transrate;

pub use kendall::kendall_tau_b;

/// The transferability scores zhijian computes. A closed set; names as
/// registered (`logme`, `leep`, `nce`, `hscore`, `gbc`, `transrate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// LogME (You et al. 2021): mean per-class log maximum evidence of a Bayesian linear model on the features.
    Logme,
    /// LEEP (Nguyen et al. 2020): log expected empirical prediction from the source model's soft predictions.
    Leep,
    /// NCE (Tran et al. 2019): negative conditional entropy of target labels given the source model's hard predictions.
    Nce,
    /// H-score (Bao et al. 2019): tr(cov(f)⁺ cov(E\[f|y\])).
    Hscore,
    /// GBC (Pándy et al. 2022): minus the summed Bhattacharyya coefficients between per-class Gaussians.
    Gbc,
    /// TransRate (Huang et al. 2022): coding rate of the features minus its mean over classes.
    Transrate,
}

impl Score {
    /// Every score, in the order tables show them.
    pub const ALL: [Score; 6] = [Score::Logme, Score::Leep, Score::Nce, Score::Hscore, Score::Gbc, Score::Transrate];

    /// The registered name.
    pub fn name(self) -> &'static str {
        match self {
            Score::Logme => "logme",
            Score::Leep => "leep",
            Score::Nce => "nce",
            Score::Hscore => "hscore",
            Score::Gbc => "gbc",
            Score::Transrate => "transrate",
        }
    }

    /// Whether the score reads the source model's predictions over its own
    /// label space rather than the features.
    pub fn needs_source(self) -> bool {
        matches!(self, Score::Leep | Score::Nce)
    }

    /// The score of a candidate.
    ///
    /// # Shapes
    /// `features`: `[n, d]` float; `labels`: `[n]` integer target classes
    /// (any non-negative values; classes are the values present);
    /// `source_probs`: `[n, z]` probabilities over the source label space
    /// (rows sum to 1), needed by LEEP and NCE and ignored by the others.
    pub fn compute(self, features: &Tensor, labels: &Tensor, source_probs: Option<&Tensor>) -> Result<f64> {
        let data = Prepared::new(self.name(), features, labels)?;
        let source = || {
            let probs = source_probs.ok_or_else(|| Error::Unsupported {
                method: self.name().into(),
                operation: "a candidate without the source model's predictions: it needs a pre-training head over the source label space \
                            (a text encoder without one, or an intermediate layer, cannot be scored by it)"
                    .into(),
            })?;
            source_matrix(self.name(), probs, data.n)
        };
        let value = match self {
            Score::Logme => logme::logme(&data),
            Score::Leep => leep::leep(&source()?, &data),
            Score::Nce => nce::nce(&source()?.argmax(1, false), &data),
            Score::Hscore => hscore::hscore(&data),
            Score::Gbc => gbc::gbc(&data),
            Score::Transrate => transrate::transrate(&data),
        };
        if !value.is_finite() {
            return Err(Error::Data(format!("{}: the score is not finite ({value}); are the features degenerate (constant, NaN)?", self.name())));
        }
        Ok(value)
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Score {
    type Err = Error;

    /// A registered name; an unknown one lists the known.
    fn from_str(s: &str) -> Result<Score> {
        Score::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::Config(format!("unknown transferability score `{s}`; known: {}", Score::ALL.map(Score::name).join(", "))))
    }
}

/// Features and labels checked and moved to f64 on the CPU, with each
/// class's rows: what every score starts from.
pub(crate) struct Prepared {
    /// Features `[n, d]`, f64, CPU.
    pub f: Tensor,
    /// Number of examples.
    pub n: i64,
    /// Feature dimension.
    pub d: i64,
    /// Labels, one per example.
    pub labels: Vec<i64>,
    /// The classes present, ascending, each with its rows (int64 indices).
    pub classes: Vec<(i64, Tensor)>,
}

impl Prepared {
    /// Checks shapes and values, naming the score and the input at fault.
    pub fn new(score: &str, features: &Tensor, labels: &Tensor) -> Result<Prepared> {
        if features.dim() != 2 {
            return Err(Error::ShapeMismatch { name: format!("{score}: features"), expected: vec![-1, -1], got: features.size() });
        }
        let (n, d) = (features.size()[0], features.size()[1]);
        if labels.size() != [n] {
            return Err(Error::ShapeMismatch { name: format!("{score}: labels (one per feature row)"), expected: vec![n], got: labels.size() });
        }
        if labels.is_floating_point() {
            return Err(Error::Data(format!("{score}: labels must be integer classes, got {:?}", labels.kind())));
        }
        let f = features.to_device(Device::Cpu).to_kind(Kind::Double).contiguous();
        if !bool::try_from(f.isfinite().all()).unwrap_or(false) {
            return Err(Error::Data(format!("{score}: the features hold NaN or infinite values")));
        }
        let labels = Vec::<i64>::try_from(labels.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous())?;
        if let Some(bad) = labels.iter().find(|&&y| y < 0) {
            return Err(Error::Data(format!("{score}: labels must be non-negative classes, got {bad}")));
        }
        let mut present: Vec<i64> = labels.clone();
        present.sort_unstable();
        present.dedup();
        if present.len() < 2 {
            return Err(Error::Data(format!("{score}: needs at least two classes among the {n} labels, got {present:?}")));
        }
        let classes = present
            .into_iter()
            .map(|c| {
                let rows: Vec<i64> = (0..n).filter(|&i| labels[i as usize] == c).collect();
                (c, Tensor::from_slice(&rows))
            })
            .collect();
        Ok(Prepared { f, n, d, labels, classes })
    }

    /// One-hot targets `[n, classes]`, f64, a column per class present.
    pub fn one_hot(&self) -> Tensor {
        let index: Vec<i64> = self.labels.iter().map(|y| self.classes.iter().position(|(c, _)| c == y).expect("every label is a class") as i64).collect();
        Tensor::from_slice(&index).one_hot(self.classes.len() as i64).to_kind(Kind::Double)
    }
}

/// The source predictions checked: `[n, z]` probabilities (non-negative, rows
/// summing to 1 within 1e-3), as f64 on the CPU. Logits are refused, not
/// silently softmaxed: the caller knows which it has.
fn source_matrix(score: &str, probs: &Tensor, n: i64) -> Result<Tensor> {
    if probs.dim() != 2 || probs.size()[0] != n {
        return Err(Error::ShapeMismatch { name: format!("{score}: source predictions"), expected: vec![n, -1], got: probs.size() });
    }
    let p = probs.to_device(Device::Cpu).to_kind(Kind::Double);
    let min = p.min().double_value(&[]);
    let worst = (p.sum_dim_intlist(1, false, Kind::Double) - 1.0).abs().max().double_value(&[]);
    if !(min >= 0.0 && worst <= 1e-3) {
        return Err(Error::Data(format!(
            "{score}: source predictions must be probabilities (non-negative, rows summing to 1); smallest {min}, a row sum off by {worst} (logits? apply softmax)"
        )));
    }
    Ok(p)
}

/// Eigenvalues (ascending, negatives from round-off set to 0) and
/// eigenvectors (columns) of a symmetric positive semi-definite matrix.
pub(crate) fn psd_eigh(a: &Tensor) -> (Tensor, Tensor) {
    let sym = (a + a.tr()) / 2.0;
    let (values, vectors) = sym.linalg_eigh("L");
    (values.clamp_min(0.0), vectors)
}

/// A tensor of f64 as a `Vec`.
pub(crate) fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().flatten(0, -1)).expect("a CPU f64 tensor")
}

#[cfg(test)]
pub(crate) mod testing {
    //! Fixed tiny inputs shared by the scores' tests; `golden.py` beside this
    //! file computes the expected values from the same numbers with numpy.

    use tch::Tensor;

    /// Eight examples, three features (golden.py's `F`).
    pub const F: [[f64; 3]; 8] =
        [[1.0, 0.2, -0.5], [0.8, -0.1, 0.3], [1.3, 0.4, 0.1], [-0.2, 1.1, 0.7], [0.1, 0.9, -0.3], [-0.4, 1.4, 0.2], [0.3, -0.6, 1.2], [-0.1, -0.2, 0.9]];
    /// Their classes (golden.py's `Y`).
    pub const Y: [i64; 8] = [0, 0, 0, 1, 1, 1, 2, 2];
    /// Source logits over four source classes (golden.py's `S`), softmaxed by [`source_probs`].
    pub const S: [[f64; 4]; 8] = [
        [2.0, 0.1, -1.0, 0.3],
        [1.5, 0.2, 0.0, -0.4],
        [0.3, 1.1, -0.2, 0.0],
        [-0.5, 2.2, 0.4, 0.1],
        [0.0, 1.0, 1.2, -1.0],
        [0.2, 0.3, 2.0, 0.5],
        [-1.0, 0.0, 0.3, 1.8],
        [0.4, -0.3, 0.1, 1.1],
    ];

    /// [`F`] as a `[8, 3]` tensor.
    pub fn features() -> Tensor {
        Tensor::from_slice(F.as_flattened()).reshape([8, 3])
    }

    /// [`Y`] as a tensor.
    pub fn labels() -> Tensor {
        Tensor::from_slice(&Y)
    }

    /// softmax of [`S`], `[8, 4]`.
    pub fn source_probs() -> Tensor {
        Tensor::from_slice(S.as_flattened()).reshape([8, 4]).softmax(1, tch::Kind::Double)
    }

    /// `k` classes of `per` examples in `d` dimensions: class means `separation`
    /// apart along the first axes, unit Gaussian noise drawn from `seed`.
    pub fn clusters(k: i64, per: i64, d: i64, separation: f64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let labels = Tensor::arange(k, (tch::Kind::Int64, tch::Device::Cpu)).repeat_interleave_self_int(per, 0, None);
        let means = Tensor::eye(k, (tch::Kind::Double, tch::Device::Cpu)).pad([0, d - k], "constant", None) * separation;
        let noise = Tensor::randn([k * per, d], (tch::Kind::Double, tch::Device::Cpu));
        (means.index_select(0, &labels) + noise, labels)
    }

    /// A random orthogonal `d × d` matrix (QR of a Gaussian one) from `seed`.
    pub fn rotation(d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::linalg_qr(&Tensor::randn([d, d], (tch::Kind::Double, tch::Device::Cpu)), "reduced").0
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for s in Score::ALL {
            assert_eq!(s.name().parse::<Score>().unwrap(), s);
            let toml_value: toml::Value = toml::Value::try_from(s).unwrap();
            assert_eq!(toml_value.as_str(), Some(s.name()));
        }
        let err = "logme2".parse::<Score>().unwrap_err().to_string();
        assert!(err.contains("logme2") && err.contains("transrate"), "{err}");
    }

    #[test]
    fn inputs_are_checked_and_named() {
        let f = features();
        let err = Score::Logme.compute(&f, &Tensor::from_slice(&[0i64, 1]), None).unwrap_err().to_string();
        assert!(err.contains("labels"), "{err}");
        let err = Score::Hscore.compute(&f.flatten(0, -1), &labels(), None).unwrap_err().to_string();
        assert!(err.contains("features"), "{err}");
        let err = Score::Gbc.compute(&f, &Tensor::zeros([8], (Kind::Int64, Device::Cpu)), None).unwrap_err().to_string();
        assert!(err.contains("two classes"), "{err}");
        let err = Score::Leep.compute(&f, &labels(), None).unwrap_err().to_string();
        assert!(err.contains("leep") && err.contains("source"), "{err}");
        let logits = Tensor::from_slice(S.as_flattened()).reshape([8, 4]);
        let err = Score::Nce.compute(&f, &labels(), Some(&logits)).unwrap_err().to_string();
        assert!(err.contains("probabilities"), "{err}");
        let nan = f.copy();
        let _ = nan.get(0).get(0).fill_(f64::NAN);
        assert!(Score::Transrate.compute(&nan, &labels(), None).unwrap_err().to_string().contains("NaN"));
    }

    /// The feature scores do not read the source predictions; class ids need not be contiguous.
    #[test]
    fn class_values_are_names_not_positions() {
        let shifted = labels() * 3 + 5;
        for s in [Score::Logme, Score::Hscore, Score::Gbc, Score::Transrate] {
            let a = s.compute(&features(), &labels(), None).unwrap();
            let b = s.compute(&features().to_kind(Kind::Float), &shifted, Some(&source_probs())).unwrap();
            assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "{s}: {a} vs {b}");
        }
    }
}
