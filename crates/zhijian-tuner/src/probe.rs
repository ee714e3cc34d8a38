//! A linear probe fitted on the frozen backbone's pooled features, written
//! into the model's head: LP-FT's first phase, WiSE-FT's starting head and
//! DELTA's classifier for scoring channels.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};
use zhijian_core::train::{Optimizer, OptimizerConfig, batches, features};
use zhijian_core::{Accuracy, Error, Model, Result, Split, TrainConfig};

/// How a method's linear probe trains (a `probe = { … }` table in its config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// Passes over the cached training features. Default 20.
    pub epochs: usize,
    /// AdamW learning rate. Default 1e-2.
    pub lr: f64,
    /// Decoupled weight decay. Default 0.
    pub weight_decay: f64,
    /// L2 penalties λ to choose from on the validation split, as LP-FT's
    /// L2-regularised logistic regression: each adds λ/2·‖W‖² (the weight,
    /// not the bias) to the mean cross-entropy, one probe is fitted per λ
    /// from the same initial head, and the one with the best validation
    /// top-1 is kept (ties: the stronger penalty). Default empty: one probe,
    /// no penalty. (Left out of the record key when empty, so runs recorded
    /// before this field keep their keys.)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub l2: Vec<f64>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { epochs: 20, lr: 1e-2, weight_decay: 0.0, l2: Vec::new() }
    }
}

impl ProbeConfig {
    /// Rejects values that cannot train, naming `method`'s field.
    pub fn validate(&self, method: &str) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: method.into(), message });
        if self.epochs == 0 {
            return bad("`probe.epochs = 0`: must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("`probe.lr = {}`: must be a positive number", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("`probe.weight_decay = {}`: must be a non-negative number", self.weight_decay));
        }
        if self.l2.iter().any(|l| !(*l >= 0.0 && l.is_finite())) {
            return bad(format!("`probe.l2 = {:?}`: each penalty must be a non-negative number", self.l2));
        }
        Ok(())
    }

    /// The budget of a run with training config `cfg` (its batch size and
    /// seed), without L2 penalty.
    pub fn budget(&self, cfg: &TrainConfig) -> ProbeBudget {
        ProbeBudget { epochs: self.epochs, lr: self.lr, batch_size: cfg.batch_size, weight_decay: self.weight_decay, l2: 0.0, seed: cfg.seed }
    }
}

/// What [`fit_probe`] chose.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeFit {
    /// The kept probe's mean training loss over its last epoch (penalty included).
    pub final_loss: f64,
    /// Its L2 penalty, where `probe.l2` listed several to choose from.
    pub l2: Option<f64>,
    /// Validation top-1 of each listed penalty, in `probe.l2`'s order.
    pub val_top1: Vec<f64>,
}

impl ProbeFit {
    /// The fit's fields for a method's record summary, named `probe_…`.
    pub fn summary(&self, t: &mut toml::Table) {
        t.insert("probe_final_loss".into(), self.final_loss.into());
        if let Some(l2) = self.l2 {
            t.insert("probe_l2".into(), l2.into());
            t.insert("probe_val_top1".into(), self.val_top1.iter().map(|&v| toml::Value::from(v)).collect::<Vec<_>>().into());
        }
    }
}

/// Fits the model's head on the frozen features of `train` as `config` says:
/// once ([`fit_head`]) or, where `config.l2` lists penalties, once per
/// penalty from the same initial head, keeping the one with the best top-1
/// on `val` (without a validation split that is an error naming `method`).
pub fn fit_probe(model: &Model, train: &Split, val: Option<&Split>, config: &ProbeConfig, cfg: &TrainConfig, method: &str) -> Result<ProbeFit> {
    let budget = config.budget(cfg);
    if config.l2.is_empty() {
        return Ok(ProbeFit { final_loss: fit_head(model, train, budget)?, l2: None, val_top1: Vec::new() });
    }
    let val = val.ok_or_else(|| Error::Config(format!("{method}: `probe.l2` is chosen on a validation split, and this run has none")))?;
    let batch = budget.batch_size.max(64);
    let (pooled, val_pooled) = (features(model, &[], &train.input, batch)?, features(model, &[], &val.input, batch)?);
    let head: Vec<Tensor> = std::iter::once(&model.head.ws).chain(model.head.bs.as_ref()).map(Tensor::shallow_clone).collect();
    let initial: Vec<Tensor> = head.iter().map(|t| t.detach().copy()).collect();
    // (λ, validation top-1, final loss, the fitted head) of each penalty.
    let mut fits = Vec::new();
    for &l2 in &config.l2 {
        write_head(&head, &initial);
        let final_loss = fit_head_on(model, &pooled, &train.labels, ProbeBudget { l2, ..budget })?;
        let top1 = tch::no_grad(|| Accuracy::from_logits(&logits(&head, &val_pooled.to_device(head[0].device())), &val.labels).top1());
        fits.push((l2, top1, final_loss, head.iter().map(|t| t.detach().copy()).collect::<Vec<_>>()));
    }
    // The best top-1; of equals, the stronger penalty.
    let (l2, _, final_loss, tensors) = fits.iter().max_by(|a, b| a.1.total_cmp(&b.1).then(a.0.total_cmp(&b.0))).expect("`probe.l2` is not empty");
    write_head(&head, tensors);
    Ok(ProbeFit { final_loss: *final_loss, l2: Some(*l2), val_top1: fits.iter().map(|f| f.1).collect() })
}

/// Copies `values` into the head's tensors.
fn write_head(head: &[Tensor], values: &[Tensor]) {
    tch::no_grad(|| head.iter().zip(values).for_each(|(h, v)| h.shallow_clone().copy_(v)));
}

/// The logits of the linear classifier `[weight, bias?]` on `x`.
fn logits(head: &[Tensor], x: &Tensor) -> Tensor {
    let logits = x.matmul(&head[0].tr());
    match head.get(1) {
        Some(b) => logits + b,
        None => logits,
    }
}

/// λ/2·‖w‖²: the L2 penalty of a probe's weight.
pub fn l2_penalty(weight: &Tensor, l2: f64) -> Tensor {
    weight.square().sum(Kind::Float) * (l2 / 2.0)
}

/// How the probe trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeBudget {
    /// Passes over the training features.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Examples per step.
    pub batch_size: i64,
    /// Decoupled weight decay of the head.
    pub weight_decay: f64,
    /// L2 penalty λ of the weight in the loss ([`l2_penalty`]).
    pub l2: f64,
    /// Seed of the shuffling.
    pub seed: u64,
}

/// Fits the model's head on the pooled features of `train` through the plain
/// pre-trained backbone (evaluation mode, no augmentation), with AdamW and
/// cross-entropy, and returns the mean loss of the last epoch. The backbone
/// is untouched; the head's tensors are trained in place.
pub fn fit_head(model: &Model, train: &Split, budget: ProbeBudget) -> Result<f64> {
    let pooled = features(model, &[], &train.input, budget.batch_size.max(64))?;
    fit_head_on(model, &pooled, &train.labels, budget)
}

/// As [`fit_head`], on features already computed (`[n, hidden]`, on the CPU).
pub fn fit_head_on(model: &Model, pooled: &Tensor, labels: &Tensor, budget: ProbeBudget) -> Result<f64> {
    let head = &model.head;
    let mut params = vec![head.ws.shallow_clone()];
    params.extend(head.bs.as_ref().map(Tensor::shallow_clone));
    // The head trains here whether or not the strategy trains it afterwards.
    let grads: Vec<bool> = params.iter().map(Tensor::requires_grad).collect();
    for p in &mut params {
        let _ = p.set_requires_grad(true);
    }
    let last = fit(&params, pooled, labels, budget)?;
    for (p, g) in params.iter_mut().zip(grads) {
        p.zero_grad();
        let _ = p.set_requires_grad(g);
    }
    Ok(last)
}

/// A new linear classifier `(weight [classes, hidden], bias [classes])`
/// fitted on `pooled` (`[n, hidden]`, on the CPU), on `device`.
pub fn fit_linear(pooled: &Tensor, labels: &Tensor, classes: i64, device: Device, budget: ProbeBudget) -> Result<(Tensor, Tensor)> {
    let params = vec![
        Tensor::zeros([classes, pooled.size()[1]], (Kind::Float, device)).set_requires_grad(true),
        Tensor::zeros([classes], (Kind::Float, device)).set_requires_grad(true),
    ];
    fit(&params, pooled, labels, budget)?;
    Ok((params[0].detach(), params[1].detach()))
}

/// Trains `params` (`[weight, bias?]` of a linear classifier) on the
/// features; returns the last epoch's mean loss.
fn fit(params: &[Tensor], pooled: &Tensor, labels: &Tensor, budget: ProbeBudget) -> Result<f64> {
    let device = params[0].device();
    let mut opt = Optimizer::new(OptimizerConfig::default(), params.iter().map(Tensor::shallow_clone).collect(), budget.weight_decay);
    let generator_seed = budget.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) as i64;
    tch::manual_seed(generator_seed);
    let mut last = f64::NAN;
    for _ in 0..budget.epochs.max(1) {
        let order = Tensor::randperm(pooled.size()[0], (Kind::Int64, Device::Cpu));
        let (mut sum, mut n) = (0.0, 0usize);
        for idx in batches(pooled.size()[0], budget.batch_size) {
            let rows = order.index_select(0, &idx);
            let x = pooled.index_select(0, &rows).to_device(device);
            let y = labels.index_select(0, &rows).to_device(device);
            let cross_entropy = logits(params, &x).cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
            let loss = if budget.l2 > 0.0 { cross_entropy + l2_penalty(&params[0], budget.l2) } else { cross_entropy };
            opt.zero_grad();
            loss.backward();
            opt.step(budget.lr);
            sum += loss.double_value(&[]);
            n += 1;
        }
        last = sum / n.max(1) as f64;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// The probe separates two well-separated clusters and leaves the backbone alone.
    #[test]
    fn probe_fits_separable_features() {
        let model = testing::mlp(0, 2);
        let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().filter(|(n, _)| !n.starts_with("head")).map(|(n, t)| (n, t.copy())).collect();
        let x = Tensor::cat(&[Tensor::ones([20, 6], (Kind::Float, Device::Cpu)) * 2.0, Tensor::ones([20, 6], (Kind::Float, Device::Cpu)) * -2.0], 0);
        let y = Tensor::cat(&[Tensor::zeros([20], (Kind::Int64, Device::Cpu)), Tensor::ones([20], (Kind::Int64, Device::Cpu))], 0);
        let loss = fit_head_on(&model, &x, &y, ProbeBudget { epochs: 50, lr: 0.1, batch_size: 8, weight_decay: 0.0, l2: 0.0, seed: 0 }).unwrap();
        assert!(loss < 0.05, "final loss {loss}");
        let vars = model.vs.variables();
        for (n, t) in before {
            assert!(vars[&n].equal(&t), "{n} changed");
        }
    }

    /// λ/2·‖W‖² by hand: W = [[1, 2], [3, 0]], λ = 0.5 → 0.25 · 14.
    #[test]
    fn l2_penalty_by_hand() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.0]).view([2, 2]);
        assert!((l2_penalty(&w, 0.5).double_value(&[]) - 3.5).abs() < 1e-6);
    }

    /// Two clusters on the first feature; the other five are noise. On the
    /// validation split a huge penalty (the weight pinned near 0: chance)
    /// loses to none, so the unpenalised probe is kept, and its head is the
    /// one written back, not the last fitted. Equal scores go to the stronger penalty.
    #[test]
    fn the_penalty_is_chosen_on_validation() {
        let split = |n: i64, seed: i64| {
            tch::manual_seed(seed);
            let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
            let noise = Tensor::randn([n, 5], (Kind::Float, Device::Cpu));
            let x = Tensor::cat(&[(y.to_kind(Kind::Float) * 4.0 - 2.0).unsqueeze(1), noise], 1);
            Split { name: "s".into(), input: zhijian_core::Input::Features(x), labels: y }
        };
        let (train, val) = (split(40, 1), split(20, 2));
        // Its pooled features are 6 wide; `Input::Features` goes straight to the head.
        let model = testing::mlp(0, 2);
        let config = ProbeConfig { epochs: 30, lr: 0.1, weight_decay: 0.0, l2: vec![1e4, 0.0] };
        let cfg = TrainConfig { batch_size: 8, ..Default::default() };
        let fit = fit_probe(&model, &train, Some(&val), &config, &cfg, "lp_ft").unwrap();
        assert_eq!(fit.l2, Some(0.0));
        assert_eq!(fit.val_top1.len(), 2);
        assert!(fit.val_top1[0] <= 0.75 && fit.val_top1[1] == 1.0, "{:?}", fit.val_top1);
        assert!(model.head.ws.abs().max().double_value(&[]) > 0.5, "the unpenalised head is written back");
        let mut t = toml::Table::new();
        fit.summary(&mut t);
        assert_eq!(t["probe_l2"].as_float(), Some(0.0));

        // Both penalties separate the clusters: the stronger one is kept.
        let tied = ProbeConfig { l2: vec![0.0, 1e-3], ..config.clone() };
        assert_eq!(fit_probe(&model, &train, Some(&val), &tied, &cfg, "lp_ft").unwrap().l2, Some(1e-3));
        let err = fit_probe(&model, &train, None, &config, &cfg, "lp_ft").unwrap_err().to_string();
        assert!(err.contains("lp_ft") && err.contains("validation"), "{err}");
        assert!(ProbeConfig { l2: vec![-1.0], ..config }.validate("lp_ft").unwrap_err().to_string().contains("probe.l2"));
    }
}
