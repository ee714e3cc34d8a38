//! LwF: learning without forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017,
//! <https://arxiv.org/abs/1606.09282>).
//!
//! The pre-trained model's own task (ImageNet for the vision backbones) has
//! a head θ_o; the new task gets θ_n. Before training, the original network's
//! outputs `y_o` on the new task's images are recorded (here: the teacher
//! slot holding the pre-trained model with its shipped head, computed once
//! when the inputs are not augmented). Training then minimises
//! `L_new(y_n, ŷ_n) + λ_o·L_old(y_o, ŷ_o)` over the shared backbone θ_s, θ_o
//! and θ_n, where `L_old` is the cross-entropy between the temperature-T
//! softened recorded and current old-task outputs (T = 2, λ_o = 1 as in the
//! paper), so the backbone keeps answering the old task as it did.
//!
//! - θ_o is the method's own parameter (`lwf/old_head.weight|bias`),
//!   initialised from the teacher's head and trained with the rest; it is in
//!   the artifact (the old task's adapted head), and forgetting on the source
//!   task is measured through it ([`Method::source_head`]).
//! - Warm-up (the paper's first phase: θ_s and θ_o frozen, θ_n trained) is
//!   a linear probe in `before_train` (`warmup = false` skips it).
//! - trains: every backbone parameter (`unfreeze = false`: what the strategy
//!   unfreezes), the new head, θ_o.
//! - Needs a teacher: the runner gives the pre-trained model with its
//!   shipped head when the experiment names no other.

use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, RunData, StepOutput, Tap, TrainConfig, config_table};

use crate::probe::{ProbeConfig, fit_probe};

/// Configuration of LwF.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LwfConfig {
    /// Weight λ_o of the old-task loss. Default 1.
    pub lambda: f64,
    /// Temperature of both softmaxes. Default 2.
    pub temperature: f64,
    /// Classes of the pre-trained task (the teacher's head). Default 1000 (ImageNet).
    pub source_classes: i64,
    /// Fit the new head first on frozen features (the warm-up). Default true.
    pub warmup: bool,
    /// The warm-up probe.
    pub probe: ProbeConfig,
    /// Fine-tune every backbone parameter. Default true.
    pub unfreeze: bool,
}

impl Default for LwfConfig {
    fn default() -> Self {
        LwfConfig { lambda: 1.0, temperature: 2.0, source_classes: 1000, warmup: true, probe: ProbeConfig::default(), unfreeze: true }
    }
}

impl LwfConfig {
    /// Rejects out-of-range values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "lwf".into(), message });
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return bad(format!("`lambda = {}`: must be a non-negative number", self.lambda));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("`temperature = {}`: must be a positive number", self.temperature));
        }
        if self.source_classes < 1 {
            return bad(format!("`source_classes = {}`: must be at least 1", self.source_classes));
        }
        self.probe.validate("lwf")
    }
}

/// Learning without forgetting.
pub struct Lwf {
    config: LwfConfig,
    vs: Option<VarStore>,
    old_head: Option<(Tensor, Tensor)>,
}

impl Lwf {
    /// LwF with `config`.
    pub fn new(config: LwfConfig) -> Self {
        Lwf { config, vs: None, old_head: None }
    }
}

/// `−Σ softmax(t/T)·log_softmax(s/T)`, averaged over the batch: the
/// cross-entropy of the softened recorded outputs `t` and current ones `s`.
pub fn soft_cross_entropy(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let target = (teacher / temperature).softmax(1, Kind::Float);
    let log_p = (student / temperature).log_softmax(1, Kind::Float);
    -(target * log_p).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float)
}

impl Method for Lwf {
    fn name(&self) -> &'static str {
        "lwf"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        if self.config.unfreeze {
            model.unfreeze_where(|_, _| true);
        }
        let vs = VarStore::new(model.device());
        let hidden = model.backbone.hidden_size();
        let root = vs.root() / "old_head";
        let w = root.var("weight", &[self.config.source_classes, hidden], Init::Const(0.0));
        let b = root.var("bias", &[self.config.source_classes], Init::Const(0.0));
        self.old_head = Some((w, b));
        self.vs = Some(vs);
        Ok(())
    }

    fn taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn teacher_taps(&self) -> Option<Vec<Tap>> {
        Some(Vec::new())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let teacher = data.teacher.ok_or_else(|| Error::Config("lwf needs the pre-trained model with its head as teacher".into()))?;
        let (w, b) = self.old_head.as_ref().expect("prepare made the old head");
        let head = &teacher.model.head;
        if head.ws.size() != w.size() {
            return Err(Error::MethodConfig {
                method: "lwf".into(),
                message: format!(
                    "the teacher's head is {:?} and `source_classes = {}` with hidden {} wants {:?}",
                    head.ws.size(),
                    self.config.source_classes,
                    w.size()[1],
                    w.size()
                ),
            });
        }
        tch::no_grad(|| {
            w.shallow_clone().copy_(&head.ws);
            match &head.bs {
                Some(bias) => b.shallow_clone().copy_(bias),
                None => {
                    let _ = b.shallow_clone().zero_();
                }
            }
        });
        if self.config.warmup {
            fit_probe(model, data.train, data.val, &self.config.probe, cfg, "lwf")?;
        }
        Ok(())
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        let (w, b) = self.old_head.as_ref()?;
        let features = step.taps.get(&Tap::Pooled)?;
        let recorded = &step.teacher.as_ref()?.logits;
        let current = features.linear(w, Some(b));
        Some(soft_cross_entropy(&current, recorded, self.config.temperature) * self.config.lambda)
    }

    fn source_head(&self) -> Option<(Tensor, Tensor)> {
        self.old_head.as_ref().map(|(w, b)| (w.shallow_clone(), b.shallow_clone()))
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Soft cross-entropy by hand: teacher logits (0, ln 3) at T = 1 give
    /// targets (¼, ¾); student logits (0, 0) give log ½ each: −log ½ = ln 2.
    /// At T = 2 the targets are softmax(0, ln 3 / 2) = (1/(1+√3), √3/(1+√3)).
    #[test]
    fn soft_cross_entropy_by_hand() {
        let t = Tensor::from_slice(&[0.0f32, 3f32.ln()]).view([1, 2]);
        let s = Tensor::zeros([1, 2], tch::kind::FLOAT_CPU);
        assert!((soft_cross_entropy(&s, &t, 1.0).double_value(&[]) - 2f64.ln()).abs() < 1e-6);
        // Student (ln 2, 0) at T = 2: log-probs of (√2, 1)/(1+√2).
        let s = Tensor::from_slice(&[2f32.ln(), 0.0]).view([1, 2]);
        let r3 = 3f64.sqrt();
        let (p0, p1) = (1.0 / (1.0 + r3), r3 / (1.0 + r3));
        let r2 = 2f64.sqrt();
        let (q0, q1) = (r2 / (1.0 + r2), 1.0 / (1.0 + r2));
        let want = -(p0 * q0.ln() + p1 * q1.ln());
        assert!((soft_cross_entropy(&s, &t, 2.0).double_value(&[]) - want).abs() < 1e-6);
    }
}
