//! BSS: batch spectral shrinkage (Chen, Wang, Fu, Long & Wang, NeurIPS 2019,
//! "Catastrophic forgetting meets negative transfer",
//! <https://papers.nips.cc/paper/8466>).
//!
//! Fine-tuning on little data amplifies the feature directions the new task
//! does not need (negative transfer), and those carry the smallest singular
//! values of the batch's feature matrix. BSS adds `η·Σ_{i=1..k} σ²_{−i}`, the
//! squared k smallest singular values of the pooled features `F [batch,
//! hidden]`, to the loss; defaults η 1e-3, k 1 (the paper's and the
//! reference's, `thuml/Batch-Spectral-Shrinkage`, which LAMDA-ZhiJian copies).
//!
//! - trains: nothing of its own; reads the pooled features of each step
//!   (so it works on any backbone and with any Architect method).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, StepOutput, Tap, config_table};

/// Configuration of BSS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BssConfig {
    /// Weight η of the penalty. Default 1e-3.
    pub eta: f64,
    /// How many of the smallest singular values are shrunk. Default 1.
    pub k: i64,
}

impl Default for BssConfig {
    fn default() -> Self {
        BssConfig { eta: 1e-3, k: 1 }
    }
}

impl BssConfig {
    /// Rejects a weight below 0 and `k` below 1, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "bss".into(), message });
        if !(self.eta >= 0.0 && self.eta.is_finite()) {
            return bad(format!("`eta = {}`: must be a non-negative number", self.eta));
        }
        if self.k < 1 {
            return bad(format!("`k = {}`: must be at least 1", self.k));
        }
        Ok(())
    }
}

/// Batch spectral shrinkage.
pub struct Bss {
    config: BssConfig,
}

impl Bss {
    /// BSS with `config`.
    pub fn new(config: BssConfig) -> Self {
        Bss { config }
    }
}

/// `Σ` of the squares of the `k` smallest singular values of `features`
/// (`[batch, hidden]`; fewer if the matrix has fewer).
pub fn smallest_squared_singular_values(features: &Tensor, k: i64) -> Tensor {
    // Reduced SVD with vectors: its backward is defined (values-only SVD has none).
    let (_, s, _) = features.to_kind(Kind::Float).svd(true, true);
    let n = s.size()[0];
    let k = k.min(n);
    // svdvals sorts in descending order: the smallest are last.
    s.narrow(0, n - k, k).square().sum(Kind::Float)
}

impl Method for Bss {
    fn name(&self) -> &'static str {
        "bss"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    fn taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        let features = step.taps.get(&Tap::Pooled)?;
        Some(smallest_squared_singular_values(features, self.config.k) * self.config.eta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A diagonal feature matrix has its diagonal as singular values: with
    /// diag(3, 2, 0.5) the smallest is 0.5 (0.25 squared), the two smallest 2 and 0.5.
    #[test]
    fn penalty_takes_the_smallest_singular_values() {
        let f = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]).view([3, 4]);
        assert!((smallest_squared_singular_values(&f, 1).double_value(&[]) - 0.25).abs() < 1e-6);
        assert!((smallest_squared_singular_values(&f, 2).double_value(&[]) - 4.25).abs() < 1e-5);
        // k beyond the rank takes every singular value.
        assert!((smallest_squared_singular_values(&f, 9).double_value(&[]) - 13.25).abs() < 1e-5);
        // A rotation does not change them: Q·F with Q orthogonal.
        let c = (0.3f64).cos() as f32;
        let s = (0.3f64).sin() as f32;
        let q = Tensor::from_slice(&[c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]).view([3, 3]);
        assert!((smallest_squared_singular_values(&q.matmul(&f), 1).double_value(&[]) - 0.25).abs() < 1e-5);
    }

    /// The penalty's gradient shrinks the smallest direction: one gradient
    /// step on the features lowers σ_min.
    #[test]
    fn gradient_shrinks_the_smallest_direction() {
        let f = Tensor::from_slice(&[3.0f32, 0.1, 0.2, 0.4, 2.0, 0.3]).view([2, 3]).set_requires_grad(true);
        let m = Bss::new(BssConfig { eta: 1.0, k: 1 });
        let mut step = crate::testing::empty_step();
        step.taps.insert(Tap::Pooled, f.shallow_clone());
        let loss = m.extra_loss(&step).unwrap();
        loss.backward();
        let shrunk = tch::no_grad(|| &f - f.grad() * 0.1);
        assert!(smallest_squared_singular_values(&shrunk, 1).double_value(&[]) < loss.double_value(&[]));
    }
}
