//! A linear probe fitted on the frozen backbone's pooled features, written
//! into the model's head: LP-FT's first phase, WiSE-FT's starting head and
//! DELTA's classifier for scoring channels.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};
use zhijian_core::train::{Optimizer, OptimizerConfig, batches, features};
use zhijian_core::{Error, Model, Result, Split, TrainConfig};

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
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { epochs: 20, lr: 1e-2, weight_decay: 0.0 }
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
        Ok(())
    }

    /// The budget of a run with training config `cfg` (its batch size and seed).
    pub fn budget(&self, cfg: &TrainConfig) -> ProbeBudget {
        ProbeBudget { epochs: self.epochs, lr: self.lr, batch_size: cfg.batch_size, weight_decay: self.weight_decay, seed: cfg.seed }
    }
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
            let mut logits = x.matmul(&params[0].tr());
            if let Some(b) = params.get(1) {
                logits += b;
            }
            let loss = logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
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
        let loss = fit_head_on(&model, &x, &y, ProbeBudget { epochs: 50, lr: 0.1, batch_size: 8, weight_decay: 0.0, seed: 0 }).unwrap();
        assert!(loss < 0.05, "final loss {loss}");
        let vars = model.vs.variables();
        for (n, t) in before {
            assert!(vars[&n].equal(&t), "{n} changed");
        }
    }
}
