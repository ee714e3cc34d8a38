//! BatchNorm statistics of a merged model, measured anew. A merge averages
//! (or sums) each model's running mean and variance, but the merged weights
//! make activations whose statistics are none of those: the normalisation is
//! off and accuracy drops. Passing training examples through the merged model
//! and setting each BatchNorm's running statistics to the mean and (unbiased)
//! variance of its inputs repairs that, as Git Re-Basin does for its ResNets
//! and as REPAIR (Jordan et al., ICLR 2023) motivates. The statistics are
//! exact over the examples given (sums, not a moving average).

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use zhijian_core::layers::Site;
use zhijian_core::train::{Split, batches};
use zhijian_core::{Ctx, Method, Model, Result};

use super::SiteSums;

/// Sets the running statistics of every BatchNorm of `model` to those of its
/// inputs over the first `examples` examples of `split`. Returns how many
/// layers were set.
///
/// The pass normalises with each batch's own statistics, as training does:
/// each layer's input then comes from layers above that normalise the way
/// they will with their new statistics. (With the old running statistics
/// above it, a layer would be measured on inputs it will never see again, and
/// the error compounds down a deep network.) Batches of `batch_size`.
pub fn reestimate(model: &Model, split: &Split, examples: i64, batch_size: i64) -> Result<usize> {
    let vars = model.vs.variables();
    let layers: Vec<String> = vars.keys().filter_map(|k| k.strip_suffix(".running_mean")).map(str::to_string).collect();
    // BatchNorm uses batch statistics only where its own parameters train.
    let scales: Vec<Tensor> = layers.iter().filter_map(|l| vars.get(&format!("{l}.weight"))).map(Tensor::shallow_clone).collect();
    let trained: Vec<bool> = scales.iter().map(Tensor::requires_grad).collect();
    for s in &scales {
        let _ = s.shallow_clone().set_requires_grad(true);
    }
    let sums = statistics(model, split, examples, batch_size, true);
    for (s, was) in scales.iter().zip(trained) {
        let _ = s.shallow_clone().set_requires_grad(was);
    }
    let sums = sums?;
    let mut set = 0;
    tch::no_grad(|| {
        for (path, (sum, squares, n)) in sums {
            let (Some(mean_var), Some(var_var)) = (vars.get(&format!("{path}.running_mean")), vars.get(&format!("{path}.running_var"))) else { continue };
            let mean = &sum / n as f64;
            let var = (squares / n as f64 - mean.square()) * (n as f64 / (n as f64 - 1.0).max(1.0));
            mean_var.shallow_clone().copy_(&mean);
            var_var.shallow_clone().copy_(&var.clamp_min(0.0));
            set += 1;
        }
    });
    Ok(set)
}

/// Per-channel sums of every 4-d norm input (sum, sum of squares, count), over
/// the first `examples` of `split`, in a training pass (`train`) or an evaluation one, without gradients.
fn statistics(model: &Model, split: &Split, examples: i64, batch_size: i64, train: bool) -> Result<BTreeMap<String, (Tensor, Tensor, i64)>> {
    let sums = SiteSums::default();
    let methods: [Box<dyn Method>; 1] = [Box::new(StatsRecorder { sums: sums.clone() })];
    let cx = Ctx::new(train, &methods, Vec::new());
    for idx in batches(examples.min(split.len()), batch_size) {
        let input = split.input.select(&idx, model.device())?;
        let _logits = tch::no_grad(|| model.forward(&cx, &input));
    }
    Ok(std::mem::take(&mut *sums.lock().expect("not poisoned")))
}

/// A pass-through method that sums each norm layer's input per channel.
struct StatsRecorder {
    sums: SiteSums<(Tensor, Tensor, i64)>,
}

impl Method for StatsRecorder {
    fn name(&self) -> &'static str {
        "batchnorm_statistics"
    }

    fn config(&self) -> toml::Table {
        toml::Table::new()
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    fn norm(&self, site: &Site, x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        // BatchNorm2d inputs: [batch, channels, h, w]; LayerNorms (other shapes, no running statistics) are skipped later.
        if x.dim() == 4 {
            let x = x.detach().to_kind(Kind::Double).to_device(Device::Cpu);
            let dims: &[i64] = &[0, 2, 3];
            let (sum, squares) = (x.sum_dim_intlist(dims, false, Kind::Double), x.square().sum_dim_intlist(dims, false, Kind::Double));
            let n = x.size()[0] * x.size()[2] * x.size()[3];
            let mut sums = self.sums.lock().expect("not poisoned");
            let entry = sums.entry(site.path.clone()).or_insert_with(|| (Tensor::zeros_like(&sum), Tensor::zeros_like(&sum), 0));
            entry.0 += sum;
            entry.1 += squares;
            entry.2 += n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_statistics_become_those_of_the_inputs() {
        // The toy CNN's first BatchNorm sees the first convolution's output: compute it by hand.
        let model = zhijian_backbones::toys::cnn(2);
        let images = zhijian_backbones::toys::images();
        let zhijian_core::Input::Images(x) = &images else { unreachable!() };
        let split = Split { name: "train".into(), input: zhijian_backbones::toys::images(), labels: zhijian_backbones::toys::labels() };
        let vars = model.vs.variables();
        let conv = vars.keys().find(|k| k.ends_with("0.conv.weight")).unwrap().clone();
        let bn = conv.replace("conv.weight", "bn");
        let y = x.conv2d(&vars[&conv], None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).to_kind(Kind::Double);
        let mean = y.mean_dim(&[0i64, 2, 3][..], false, Kind::Double);
        let var = y.var_dim(&[0i64, 2, 3][..], true, false);
        let _ = vars[&format!("{bn}.weight")].shallow_clone().set_requires_grad(false);
        assert_eq!(reestimate(&model, &split, 6, 8).unwrap(), 2);
        assert!(vars[&format!("{bn}.running_mean")].to_kind(Kind::Double).allclose(&mean, 1e-4, 1e-5, false));
        assert!(vars[&format!("{bn}.running_var")].to_kind(Kind::Double).allclose(&var, 1e-4, 1e-5, false));
        // In evaluation, every layer (the second too, behind the first's new statistics) sees inputs
        // with the statistics it holds (one batch of all 6 images: batch and running statistics agree,
        // up to the unbiased variance's n / (n − 1) = 1536 / 1535).
        for (path, (sum, squares, n)) in statistics(&model, &split, 6, 8, false).unwrap() {
            let mean = &sum / n as f64;
            let var = squares / n as f64 - mean.square();
            assert!(vars[&format!("{path}.running_mean")].to_kind(Kind::Double).allclose(&mean, 1e-3, 1e-3, false), "{path}");
            assert!(vars[&format!("{path}.running_var")].to_kind(Kind::Double).allclose(&var, 3e-3, 1e-3, false), "{path}");
        }
        // The layers' own parameters are left as frozen as they were.
        assert!(!vars[&format!("{bn}.weight")].requires_grad());
    }
}
