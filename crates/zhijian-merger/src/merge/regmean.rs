//! RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of
//! Language Models", ICLR 2023, <https://arxiv.org/abs/2212.09849>): each
//! linear map is merged to the one whose outputs best match every model's own
//! outputs on its own inputs, min_W Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖², whose solution is
//! W* = (Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ Wᵢ with the Gram matrices Gᵢ = XᵢᵀXᵢ. As in the paper,
//! each Gram's off-diagonal entries are scaled by `alpha` (< 1 regularises
//! toward the plain average); every other tensor is averaged.
//!
//! - Linear maps: every [`Linear`](zhijian_core::layers::Linear) site and every
//!   1×1 convolution (a linear map over channels at each pixel, the bulk of an
//!   EfficientNet's weights); other convolutions are averaged.
//! - Grams are the mean of xxᵀ over the rows a layer saw on the first
//!   `examples` training examples, so that each model weighs the same whatever
//!   its data's size (the paper sums; with equal example counts it is the same
//!   up to a scale that cancels).
//! - Where Σᵢ Gᵢ is singular (inputs no example reaches, a ReLU that never
//!   fires), W* is RegMean's on the span the data covers and the plain mean
//!   off it: W* = P⁺ Σᵢ Gᵢ Wᵢ + (I − P⁺P) W̄ with P = Σᵢ Gᵢ.

use tch::{Kind, Tensor};
use zhijian_core::layers::Site;
use zhijian_core::train::Split;
use zhijian_core::{Compute, Method, Model, Result};

use super::{SiteSums, Weights, combine};

/// RegMean of `models` given each one's Grams (keyed by weight name, `[in, in]`).
pub fn merge(models: &[&Weights], grams: &[&Weights], alpha: f64) -> Weights {
    let n = models.len() as f64;
    let mut merged = combine(models, |ts| super::soup::sum(ts) / n);
    for name in grams[0].keys() {
        let (Some(gs), Some(ws)) =
            (grams.iter().map(|g| g.get(name)).collect::<Option<Vec<_>>>(), models.iter().map(|m| m.get(name)).collect::<Option<Vec<_>>>())
        else {
            continue;
        };
        let shape = ws[0].size();
        // [out, in(, 1, 1)] → Wᵀ [in, out], in f64.
        let wt: Vec<Tensor> = ws.iter().map(|w| w.reshape([shape[0], -1]).tr().to_kind(Kind::Double)).collect();
        let gs: Vec<Tensor> = gs.iter().map(|g| shrink_off_diagonal(&g.to_kind(Kind::Double), alpha)).collect();
        let p = gs.iter().fold(Tensor::zeros_like(&gs[0]), |acc, g| acc + g);
        let rhs = gs.iter().zip(&wt).fold(Tensor::zeros_like(&wt[0]), |acc, (g, w)| acc + g.matmul(w));
        let pinv = p.linalg_pinv(1e-10, true);
        let on_span = pinv.matmul(&rhs);
        let mean = wt.iter().fold(Tensor::zeros_like(&wt[0]), |acc, w| acc + w) / n;
        let eye = Tensor::eye(p.size()[0], (Kind::Double, p.device()));
        let w = on_span + (eye - pinv.matmul(&p)).matmul(&mean);
        merged.insert(name.clone(), w.tr().reshape(&shape).to_kind(ws[0].kind()));
    }
    merged
}

/// `alpha` G + (1 − `alpha`) diag(G).
fn shrink_off_diagonal(g: &Tensor, alpha: f64) -> Tensor {
    let diagonal = g.diagonal(0, 0, 1).diag_embed(0, -2, -1);
    g * alpha + diagonal * (1.0 - alpha)
}

/// The mean input Gram of every linear map of `model` (its weight's name →
/// `[in, in]`, f64, on the CPU) over the first `examples` examples of `split`.
pub fn grams(model: &Model, split: &Split, examples: i64, batch_size: i64) -> Result<Weights> {
    let sums = SiteSums::default();
    let recorder: Box<dyn Method> = Box::new(GramRecorder { sums: sums.clone() });
    let first = Tensor::arange(examples.min(split.len()), (Kind::Int64, tch::Device::Cpu));
    let _logits = zhijian_core::train::predict(model, &[recorder], &split.input.select(&first, tch::Device::Cpu)?, batch_size, Compute::Fp32)?;
    let sums = std::mem::take(&mut *sums.lock().expect("not poisoned"));
    Ok(sums.into_iter().map(|(name, (gram, rows))| (name, gram / rows.max(1) as f64)).collect())
}

/// A pass-through method that sums each linear map's input Gram and counts its rows.
struct GramRecorder {
    sums: SiteSums<(Tensor, i64)>,
}

impl GramRecorder {
    fn add(&self, site: &Site, rows: &Tensor) {
        let rows = rows.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
        let gram = rows.tr().matmul(&rows);
        let count = rows.size()[0];
        let mut sums = self.sums.lock().expect("not poisoned");
        let entry = sums.entry(format!("{}.weight", site.path)).or_insert_with(|| (Tensor::zeros_like(&gram), 0));
        entry.0 += gram;
        entry.1 += count;
    }
}

impl Method for GramRecorder {
    fn name(&self) -> &'static str {
        "regmean_grams"
    }

    fn config(&self) -> toml::Table {
        toml::Table::new()
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    fn linear_input(&self, site: &Site, x: Tensor, _train: bool) -> Tensor {
        self.add(site, &x.reshape([-1, site.in_features]));
        x
    }

    fn conv(&self, site: &Site, x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        if site.conv.is_some_and(|g| g.kernel == [1, 1] && g.groups == 1) {
            self.add(site, &x.permute([0, 2, 3, 1]).reshape([-1, site.in_features]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn matrix(rows: &[&[f64]]) -> Tensor {
        Tensor::from_slice(&rows.concat()).view([rows.len() as i64, -1]).to_kind(Kind::Float)
    }

    #[test]
    fn solves_the_regression_on_every_models_inputs() {
        // 1 output, 2 inputs. W_a = (1, 0) saw only input 0 (G_a = diag(1, 0)),
        // W_b = (0, 1) only input 1 (G_b = diag(0, 1)): each map is kept on its
        // own inputs, (1, 1), where averaging gives (½, ½).
        let a = BTreeMap::from([("w".to_string(), matrix(&[&[1.0, 0.0]]))]);
        let b = BTreeMap::from([("w".to_string(), matrix(&[&[0.0, 1.0]]))]);
        let ga = BTreeMap::from([("w".to_string(), matrix(&[&[1.0, 0.0], &[0.0, 0.0]]))]);
        let gb = BTreeMap::from([("w".to_string(), matrix(&[&[0.0, 0.0], &[0.0, 1.0]]))]);
        let m = merge(&[&a, &b], &[&ga, &gb], 1.0);
        assert!(m["w"].allclose(&matrix(&[&[1.0, 1.0]]), 1e-6, 1e-7, false), "{}", m["w"]);
        // Full Grams, by hand: G_a = [[2, 1], [1, 1]], G_b = I, α = 0.5 → G_a' = [[2, .5], [.5, 1]];
        // P = [[3, .5], [.5, 2]], rhs = G_a' W_aᵀ + G_b W_bᵀ = (2, .5) + (0, 1) = (2, 1.5);
        // W* = P⁻¹ rhs = (2·2 − .5·1.5, 3·1.5 − .5·2) / (6 − .25) = (3.25, 3.5) / 5.75.
        let ga = BTreeMap::from([("w".to_string(), matrix(&[&[2.0, 1.0], &[1.0, 1.0]]))]);
        let gb = BTreeMap::from([("w".to_string(), matrix(&[&[1.0, 0.0], &[0.0, 1.0]]))]);
        let m = merge(&[&a, &b], &[&ga, &gb], 0.5);
        assert!(m["w"].allclose(&matrix(&[&[3.25 / 5.75, 3.5 / 5.75]]), 1e-6, 1e-7, false), "{}", m["w"]);
    }

    #[test]
    fn off_the_datas_span_it_is_the_mean() {
        // Neither model saw input 1: that column is the mean, (3 + 5) / 2.
        let a = BTreeMap::from([("w".to_string(), matrix(&[&[1.0, 3.0]]))]);
        let b = BTreeMap::from([("w".to_string(), matrix(&[&[2.0, 5.0]]))]);
        let g = BTreeMap::from([("w".to_string(), matrix(&[&[1.0, 0.0], &[0.0, 0.0]]))]);
        let m = merge(&[&a, &b], &[&g, &g], 1.0);
        assert!(m["w"].allclose(&matrix(&[&[1.5, 4.0]]), 1e-6, 1e-7, false), "{}", m["w"]);
    }

    #[test]
    fn grams_are_the_mean_outer_product_of_each_layers_inputs() {
        let model = zhijian_backbones::toys::mlp(5, 3);
        let images = Tensor::randn([5, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
        let split = Split {
            name: "train".into(),
            input: zhijian_core::Input::Images(images.shallow_clone()),
            labels: Tensor::zeros([5], (Kind::Int64, tch::Device::Cpu)),
        };
        let g = grams(&model, &split, 4, 3).unwrap();
        let x = images.narrow(0, 0, 4).flatten(1, 3).to_kind(Kind::Double);
        let first = g.keys().find(|k| k.starts_with("layers.0")).unwrap();
        assert!(g[first].allclose(&(x.tr().matmul(&x) / 4.0), 1e-9, 1e-12, false));
        // The head's input is the last hidden layer's output: [6, 6].
        assert_eq!(g[&format!("{}.weight", model.head.site().path)].size(), [6, 6]);
    }
}
