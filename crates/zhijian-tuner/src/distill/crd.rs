//! CRD: contrastive representation distillation (Tian, Krishnan & Isola,
//! "Contrastive Representation Distillation", ICLR 2020,
//! <https://arxiv.org/abs/1910.10699>; RepDistiller `crd/criterion.py`,
//! `crd/memory.py`, `dataset/cifar100.py`).
//!
//! Both sides' per-example features are embedded (linear map, then unit L2
//! norm) into 128 dimensions. Two memory banks hold one embedding per
//! training example, the student's and the teacher's. For each example of
//! the batch, its own row and K = 16384 rows of examples of other classes
//! are read from each bank, and a noise-contrastive estimate (NCE) tells the
//! positive from the negatives, in both directions:
//!
//! ```text
//! student anchor:  x_k = exp(⟨m^t_k, e_s⟩ / τ) / Z_s     over the teacher bank's rows k
//! teacher anchor:  x_k = exp(⟨m^s_k, e_t⟩ / τ) / Z_t     over the student bank's rows k
//! nce(x) = −(1/b) Σ_i [ log(x_0 / (x_0 + K/N + ε)) + Σ_{k ≥ 1} log((K/N) / (x_k + K/N + ε)) ]
//! loss = nce(student anchor) + nce(teacher anchor)
//! ```
//!
//! τ = 0.07, ε = 1e-7, N the training split's size; `Z` is fixed at the first
//! step to `N ×` the mean of that step's `exp(·/τ)`, as the reference. After
//! each step each bank's rows of the batch move to `normalize(m·row + (1 − m)·e)`
//! with momentum m = 0.5. Banks start uniform in ±1/√(dim/3). β = 0.8
//! (RepDistiller's run script).
//!
//! - negatives: drawn from the examples of other classes (the reference's
//!   `exact` sampling), with replacement (the reference draws without
//!   replacement unless K exceeds them); uniformly from all others when every
//!   example shares one class. K is capped at N − 1.
//! - features: pooled on both sides by default (RepDistiller's `feat[-1]`);
//!   maps are flattened, token sequences read their first token.
//! - trains: the embeddings `embed_student`, `embed_teacher`; the banks
//!   `memory_student`, `memory_teacher` are state without gradient. All are
//!   training-only (not in the artifact). Memory: 2 × N × dim floats.

use std::cell::Cell;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use zhijian_core::{Error, Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, Setup, Stack, check_positive, check_weight, linear_embed, normalize, per_sample, per_sample_width};

/// ε of the reference's NCE loss.
const EPS: f64 = 1e-7;

/// Configuration of CRD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrdConfig {
    /// β, weight of the loss beside the cross-entropy. Default 0.8.
    pub weight: f64,
    /// Width of the embeddings and the banks' rows, ≥ 1. Default 128.
    pub embed_dim: i64,
    /// Negatives per example, ≥ 1 (capped at the training split's size − 1). Default 16384.
    pub negatives: i64,
    /// Temperature τ, > 0. Default 0.07.
    pub temperature: f64,
    /// Momentum of the banks' updates, in [0, 1). Default 0.5.
    pub momentum: f64,
    /// The student's feature: `"pooled"`, `"last"` or a block index. Default pooled.
    pub student: Feature,
    /// The teacher's feature. Default pooled.
    pub teacher: Feature,
}

impl Default for CrdConfig {
    fn default() -> Self {
        CrdConfig { weight: 0.8, embed_dim: 128, negatives: 16384, temperature: 0.07, momentum: 0.5, student: Feature::Pooled, teacher: Feature::Pooled }
    }
}

/// Where each training example's negatives come from: the examples sorted
/// by class, and each example's class's range in that order.
struct Sampler {
    sorted: Tensor,
    start: Tensor,
    count: Tensor,
    n: i64,
}

impl Sampler {
    fn new(labels: &Tensor) -> Sampler {
        let labels = labels.to_device(Device::Cpu).to_kind(Kind::Int64);
        let sorted = labels.argsort(0, false);
        let sorted_labels = labels.index_select(0, &sorted);
        let start = labels.bucketize(&sorted_labels, false, false);
        let count = labels.bucketize(&sorted_labels, false, true) - &start;
        Sampler { sorted, start, count, n: labels.size()[0] }
    }

    /// `k` negatives for each example of `idx` (`[b]`, CPU): uniform over
    /// the examples of other classes (over all examples when there are none).
    ///
    /// # Shapes
    /// `idx` `[b]` → `[b, k]`.
    fn draw(&self, idx: &Tensor, k: i64) -> Tensor {
        let b = idx.size()[0];
        let start = self.start.index_select(0, idx).unsqueeze(1);
        let count = self.count.index_select(0, idx).unsqueeze(1);
        // One class for all: no other class to draw from; draw from everyone.
        let count = count.where_self(&count.lt(self.n), &count.zeros_like());
        let pool = -&count + self.n;
        // r uniform in [0, pool), then stepped over the class's own range.
        let r = (Tensor::rand([b, k], (Kind::Double, Device::Cpu)) * pool.to_kind(Kind::Double)).floor().to_kind(Kind::Int64).minimum(&(&pool - 1));
        let r = &r + r.ge_tensor(&start).to_kind(Kind::Int64) * &count;
        self.sorted.index_select(0, &r.flatten(0, -1)).view([b, k])
    }
}

/// What CRD learns and keeps during a run.
struct State {
    embed_s: Stack,
    embed_t: Stack,
    memory_s: Tensor,
    memory_t: Tensor,
    sampler: Sampler,
    negatives: i64,
    /// `Z` of the student-anchored and teacher-anchored scores, fixed at the first step.
    z: Cell<Option<(f64, f64)>>,
}

/// The CRD loss, its embeddings and memory banks.
pub struct CrdLoss {
    config: CrdConfig,
    state: Option<State>,
}

/// The `crd` method.
pub type Crd = Distiller<CrdLoss>;

/// `exp(⟨bank[idx[i, k]], anchor_i⟩ / τ)`.
///
/// # Shapes
/// `anchor` `[b, d]`, `bank` `[n, d]`, `idx` `[b, k + 1]` → `[b, k + 1]`.
pub fn crd_scores(anchor: &Tensor, bank: &Tensor, idx: &Tensor, temperature: f64) -> Tensor {
    let (b, k1) = (idx.size()[0], idx.size()[1]);
    let rows = bank.index_select(0, &idx.flatten(0, -1)).view([b, k1, -1]).detach();
    (rows.bmm(&anchor.unsqueeze(2)).squeeze_dim(2) / temperature).exp()
}

/// The NCE loss of normalised scores `x` (`[b, 1 + K]`, the positive first)
/// with noise probability `1 / n`.
pub fn nce_loss(x: &Tensor, n: i64) -> Tensor {
    let (b, k) = (x.size()[0], x.size()[1] - 1);
    let noise = k as f64 / n as f64;
    let pos = x.select(1, 0);
    let log_d1 = (&pos / (&pos + noise + EPS)).log();
    let log_d0 = (noise / (x.narrow(1, 1, k) + noise + EPS)).log();
    -(log_d1.sum(Kind::Float) + log_d0.sum(Kind::Float)) / b as f64
}

/// Moves the bank's rows `y` toward `e`: `normalize(m·row + (1 − m)·e)`.
fn update(bank: &Tensor, y: &Tensor, e: &Tensor, momentum: f64) {
    tch::no_grad(|| {
        let rows = bank.index_select(0, y) * momentum + e.detach() * (1.0 - momentum);
        let _ = bank.shallow_clone().index_copy_(0, y, &normalize(&rows, 1));
    });
}

impl DistillLoss for CrdLoss {
    const NAME: &'static str = "crd";
    type Config = CrdConfig;

    fn new(config: CrdConfig) -> Result<Self> {
        let bad = |message: String| Err(Error::MethodConfig { method: Self::NAME.into(), message });
        check_weight(Self::NAME, "weight", config.weight)?;
        check_positive(Self::NAME, "temperature", config.temperature)?;
        if config.embed_dim < 1 {
            return bad(format!("embed_dim must be ≥ 1, got {}", config.embed_dim));
        }
        if config.negatives < 1 {
            return bad(format!("negatives must be ≥ 1, got {}", config.negatives));
        }
        if !(0.0..1.0).contains(&config.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", config.momentum));
        }
        Ok(CrdLoss { config, state: None })
    }

    fn config(&self) -> &CrdConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn build(&mut self, setup: &Setup, vs: &tch::nn::VarStore) -> Result<()> {
        let root = &vs.root();
        let n = setup.data.train.len();
        if n < 2 {
            return Err(Error::MethodConfig { method: Self::NAME.into(), message: format!("contrasts examples, and the training split has {n}") });
        }
        let (s, t) = setup.shapes();
        let d = self.config.embed_dim;
        let bound = 1.0 / (d as f64 / 3.0).sqrt();
        let bank = |name: &str| {
            let m = root.zeros_no_train(name, &[n, d]);
            tch::no_grad(|| m.shallow_clone().uniform_(-bound, bound))
        };
        self.state = Some(State {
            embed_s: linear_embed(root, "embed_student", per_sample_width(s), d),
            embed_t: linear_embed(root, "embed_teacher", per_sample_width(t), d),
            memory_s: bank("memory_student"),
            memory_t: bank("memory_teacher"),
            sampler: Sampler::new(&setup.data.train.labels),
            negatives: self.config.negatives.min(n - 1),
            z: Cell::new(None),
        });
        Ok(())
    }

    fn loss(&self, s: &Tensor, t: &Tensor, step: &StepOutput) -> std::result::Result<Tensor, String> {
        let st = self.state.as_ref().ok_or("the embeddings and memory banks are made in before_train")?;
        let tau = self.config.temperature;
        let e_s = normalize(&st.embed_s.forward(&per_sample(s)), 1);
        let e_t = normalize(&st.embed_t.forward(&per_sample(t)), 1);
        let y = step.index.to_device(Device::Cpu);
        if y.size()[0] != e_s.size()[0] {
            return Err(format!("the step's index has {} rows for a batch of {}", y.size()[0], e_s.size()[0]));
        }
        let idx = Tensor::cat(&[y.unsqueeze(1), st.sampler.draw(&y, st.negatives)], 1).to_device(e_s.device());
        // Student anchor against the teacher's bank, and the other way round.
        let out_s = crd_scores(&e_s, &st.memory_t, &idx, tau);
        let out_t = crd_scores(&e_t, &st.memory_s, &idx, tau);
        let n = st.sampler.n;
        let (z_s, z_t) = st.z.get().unwrap_or_else(|| {
            let z = (out_s.mean(Kind::Float).double_value(&[]) * n as f64, out_t.mean(Kind::Float).double_value(&[]) * n as f64);
            st.z.set(Some(z));
            z
        });
        let loss = nce_loss(&(out_s / z_s), n) + nce_loss(&(out_t / z_t), n);
        let y = y.to_device(e_s.device());
        update(&st.memory_s, &y, &e_s, self.config.momentum);
        update(&st.memory_t, &y, &e_t, self.config.momentum);
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    /// Scores and the NCE loss of one example against a 3-row bank, written out.
    #[test]
    fn crd_scores_and_nce_match_the_formulas_written_out() {
        let bank = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8];
        let (e, tau): ([f64; 2], f64) = ([0.8, 0.6], 0.5);
        let idx = Tensor::from_slice(&[1i64, 0, 2]).view([1, 3]);
        let dot = |r: usize| bank[2 * r] * e[0] + bank[2 * r + 1] * e[1];
        let want: Vec<f64> = [1, 0, 2].iter().map(|&r| (dot(r) / tau).exp()).collect();
        let got = crd_scores(&t(&e, &[1, 2]), &t(&bank, &[3, 2]), &idx, tau);
        for (k, w) in want.iter().enumerate() {
            close(got.double_value(&[0, k as i64]), *w);
        }
        // NCE with N = 3, K = 2 (noise K/N), on the scores over Z = 10.
        let x: Vec<f64> = want.iter().map(|v| v / 10.0).collect();
        let noise: f64 = 2.0 / 3.0;
        let want = -((x[0] / (x[0] + noise + 1e-7)).ln() + (noise / (x[1] + noise + 1e-7)).ln() + (noise / (x[2] + noise + 1e-7)).ln());
        close(value(&nce_loss(&(got / 10.0), 3)), want);
    }

    /// Negatives come from other classes; a bank row moves toward its new embedding and stays unit.
    #[test]
    fn crd_samples_other_classes_and_updates_its_banks() {
        let labels = Tensor::from_slice(&[2i64, 0, 1, 0, 2, 2, 1]);
        let sampler = Sampler::new(&labels);
        let idx = Tensor::arange(7, (Kind::Int64, Device::Cpu));
        let neg = sampler.draw(&idx, 200);
        let same = labels.index_select(0, &neg.flatten(0, -1)).view([7, 200]).eq_tensor(&labels.unsqueeze(1));
        assert_eq!(same.sum(Kind::Int64).int64_value(&[]), 0);
        // Every example of another class shows up.
        assert_eq!(neg.get(1).unique_dim(0, false, false, false).0.size()[0], 5);
        // One class for all: negatives from everyone.
        let one = Sampler::new(&Tensor::zeros([4], (Kind::Int64, Device::Cpu)));
        assert!(one.draw(&Tensor::from_slice(&[0i64]), 50).lt(4).all().int64_value(&[]) == 1);

        let bank = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
        update(&bank, &Tensor::from_slice(&[1i64]), &t(&[1.0, 0.0], &[1, 2]), 0.5);
        let h = 0.5f64.sqrt();
        for (k, want) in [1.0, 0.0, h, h].iter().enumerate() {
            close(bank.flatten(0, -1).double_value(&[k as i64]), *want);
        }
    }

    /// Embeddings to 128 dimensions from each side's width, banks of N rows, all training-only.
    #[test]
    fn crd_builds_embeddings_and_banks() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12])));
        let split = testing::images(0);
        let mut m = Crd::new(CrdConfig::default()).unwrap();
        m.prepare(&student).unwrap();
        m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap();
        let parts =
            [("embed_student.weight", &[128i64, 8][..]), ("embed_teacher.weight", &[128, 12]), ("memory_student", &[12, 128]), ("memory_teacher", &[12, 128])];
        testing::assert_parts(&m, &parts);
        let vars = m.var_store().unwrap().variables();
        assert!(!vars["memory_student"].requires_grad() && vars["embed_student.weight"].requires_grad());
        assert_eq!(m.loss().state.as_ref().unwrap().negatives, 11);
        let before = vars["memory_teacher"].copy();
        assert!(value(&testing::one_loss(&student, &teacher, &split, &m)).is_finite());
        // The batch's rows (0‥4) moved, the others did not.
        assert!(!vars["memory_teacher"].get(0).equal(&before.get(0)));
        assert!(vars["memory_teacher"].get(11).equal(&before.get(11)));
    }
}
