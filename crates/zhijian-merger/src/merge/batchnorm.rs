//! BatchNorm statistics of a merged model, measured anew. A merge averages
//! (or sums) each model's running mean and variance, but the merged weights
//! make activations whose statistics are none of those: the normalisation is
//! off and accuracy drops. Passing training examples through the merged model
//! and setting each BatchNorm's running statistics to the mean and (unbiased)
//! variance of its inputs repairs that, as Git Re-Basin does for its ResNets
//! and as REPAIR (Jordan et al., ICLR 2023) motivates. The statistics are
//! exact over the examples given (sums, not a moving average).

use tch::{Device, Kind, Tensor};
use zhijian_core::layers::Site;
use zhijian_core::train::Split;
use zhijian_core::{Compute, Method, Model, Result};

use super::SiteSums;

/// Sets the running statistics of every BatchNorm of `model` to those of its
/// inputs over the first `examples` examples of `split`, in evaluation mode.
/// Returns how many layers were set.
pub fn reestimate(model: &Model, split: &Split, examples: i64, batch_size: i64) -> Result<usize> {
    let sums = SiteSums::default();
    let recorder: Box<dyn Method> = Box::new(StatsRecorder { sums: sums.clone() });
    let first = Tensor::arange(examples.min(split.len()), (Kind::Int64, Device::Cpu));
    let _logits = zhijian_core::train::predict(model, &[recorder], &split.input.select(&first, Device::Cpu)?, batch_size, Compute::Fp32)?;
    let sums = std::mem::take(&mut *sums.lock().expect("not poisoned"));
    let vars = model.vs.variables();
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
        assert_eq!(reestimate(&model, &split, 6, 4).unwrap(), 2);
        assert!(vars[&format!("{bn}.running_mean")].to_kind(Kind::Double).allclose(&mean, 1e-4, 1e-5, false));
        assert!(vars[&format!("{bn}.running_var")].to_kind(Kind::Double).allclose(&var, 1e-4, 1e-5, false));
    }
}
