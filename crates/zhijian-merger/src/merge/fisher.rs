//! Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted
//! Averaging", NeurIPS 2022, <https://arxiv.org/abs/2111.09832>): each
//! parameter is the average of the models' values weighted by each model's
//! diagonal Fisher information, θ* = Σᵢ Fᵢ θᵢ / Σᵢ Fᵢ (equal model weights),
//! the Fisher floored at `floor` so that a parameter no model's loss reaches
//! is averaged uniformly (the reference's `fisher_floor`).
//!
//! The diagonal Fisher of a classifier is E_x E_{y∼p(y|x)} (∂ log p(y|x) / ∂θ)²:
//! here over the first `examples` training examples, one at a time, with y
//! drawn from the model's own prediction (the reference's sampled estimate),
//! in evaluation mode (BatchNorm uses its running statistics, no dropout).
//! Tensors without a gradient (BatchNorm's running statistics) get no Fisher:
//! they are averaged uniformly.

use tch::{Kind, Tensor};
use zhijian_core::train::Split;
use zhijian_core::{Ctx, Model, Result};

use super::{Weights, combine};

/// Σᵢ max(Fᵢ, floor) θᵢ / Σᵢ max(Fᵢ, floor); tensors without Fisher are averaged.
pub fn merge(models: &[&Weights], fishers: &[&Weights], floor: f64) -> Weights {
    let n = models.len() as f64;
    let names: Vec<&String> = models[0].keys().collect();
    let mut merged = combine(models, |ts| super::soup::sum(ts) / n);
    for name in names {
        let Some(fs) = fishers.iter().map(|f| f.get(name)).collect::<Option<Vec<_>>>() else { continue };
        let fs: Vec<Tensor> = fs.iter().map(|f| f.clamp_min(floor)).collect();
        let weighted = models.iter().zip(&fs).fold(Tensor::zeros_like(&fs[0]), |acc, (m, f)| acc + f * &m[name]);
        let total = fs.iter().fold(Tensor::zeros_like(&fs[0]), |acc, f| acc + f);
        merged.insert(name.clone(), (weighted / total).to_kind(models[0][name].kind()));
    }
    merged
}

/// The diagonal Fisher of every float parameter of `model` on the first
/// `examples` examples of `split`, labels drawn from the model (seeded).
/// Sets every parameter to require a gradient: the model is a merge's copy.
pub fn diagonal(model: &Model, split: &Split, examples: i64, seed: u64) -> Result<Weights> {
    let mut params: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(name, t)| !zhijian_core::layers::is_buffer(name) && t.is_floating_point())
        .map(|(name, t)| (name, t.set_requires_grad(true)))
        .collect();
    let mut fisher: Vec<Tensor> = params.iter().map(|(_, t)| Tensor::zeros_like(t).to_kind(Kind::Double)).collect();
    let n = examples.min(split.len());
    tch::manual_seed(seed as i64);
    let cx = Ctx::new(false, &[], Vec::new());
    let bar = zhijian_core::train::progress_bar(n as u64, "Fisher");
    for i in 0..n {
        let x = split.input.select(&Tensor::from_slice(&[i]), model.device())?;
        let log_p = model.forward(&cx, &x).log_softmax(-1, Kind::Float);
        let y = tch::no_grad(|| log_p.exp().multinomial(1, true));
        for (_, t) in params.iter_mut() {
            t.zero_grad();
        }
        log_p.gather(1, &y, false).sum(Kind::Float).backward();
        for ((_, t), f) in params.iter().zip(fisher.iter_mut()) {
            let g = t.grad();
            if g.defined() {
                *f += g.to_kind(Kind::Double).square();
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(params.into_iter().zip(fisher).map(|((name, t), f)| (name, (f / n.max(1) as f64).to_kind(t.kind()))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::tests::{values, weights};

    #[test]
    fn weighs_each_value_by_its_fisher() {
        let a = weights(&[("w", &[1.0, 1.0, 4.0]), ("running", &[2.0])]);
        let b = weights(&[("w", &[3.0, 3.0, 0.0]), ("running", &[4.0])]);
        let fa = weights(&[("w", &[1.0, 0.0, 0.0])]);
        let fb = weights(&[("w", &[3.0, 0.0, 1.0])]);
        // (1·1 + 3·3) / 4; floor 1e-3 on both: the mean; (1e-3·4 + 1·0) / (1 + 1e-3).
        let m = merge(&[&a, &b], &[&fa, &fb], 1e-3);
        let w = values(&m, "w");
        assert!((w[0] - 2.5).abs() < 1e-6 && (w[1] - 2.0).abs() < 1e-6 && (w[2] - 0.004 / 1.001).abs() < 1e-6, "{w:?}");
        assert_eq!(values(&m, "running"), [3.0]);
    }

    #[test]
    fn the_fisher_of_a_zero_head_is_a_quarter_of_the_squared_features() {
        // With the head (weight and bias) at 0 both classes have p = ½: ∂ log p_y / ∂W_c = (1[c = y] − ½) h, whose square is
        // ¼ h² whichever y is drawn; ¼ for the bias; and no gradient reaches the layers below (∂/∂h = 0).
        let model = zhijian_backbones::toys::mlp(3, 2);
        tch::no_grad(|| {
            let _ = model.head.ws.shallow_clone().zero_();
            let _ = model.head.bs.as_ref().map(|b| b.shallow_clone().zero_());
        });
        let head = model.head.site().path.clone();
        let images = Tensor::randn([3, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
        let split = Split { name: "train".into(), input: zhijian_core::Input::Images(images), labels: Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu)) };
        let h = zhijian_core::train::features(&model, &[], &split.input, 3).unwrap();
        let fisher = diagonal(&model, &split, 3, 0).unwrap();
        let want = (h.square().mean_dim(0, false, Kind::Float) / 4.0).unsqueeze(0).repeat([2, 1]);
        assert!(fisher[&format!("{head}.weight")].allclose(&want, 1e-6, 1e-7, false));
        assert!(fisher[&format!("{head}.bias")].allclose(&Tensor::full([2], 0.25, (Kind::Float, tch::Device::Cpu)), 1e-6, 1e-7, false));
        for (name, f) in &fisher {
            if !name.starts_with(&head) {
                assert_eq!(f.abs().sum(Kind::Double).double_value(&[]), 0.0, "{name}");
            }
        }
    }
}
