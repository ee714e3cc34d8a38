//! DELTA: deep learning transfer using feature map with attention (Li, Xiong,
//! Wang, Wang, Liu, Wang & Huan, ICLR 2019, <https://arxiv.org/abs/1901.09229>).
//!
//! Instead of pulling weights toward their pre-trained values (L2-SP),
//! DELTA pulls the *behaviour*: the outer feature maps of the network being
//! fine-tuned toward those of the frozen pre-trained network on the same
//! batch, channel by channel, weighted by how much each channel matters to
//! the new task:
//!
//! `Ω = α·Σ_j ½·Σ_{b,c} C_j·w_{j,c}·‖FM_{j,c}(w, x_b) − FM_{j,c}(w⁰, x_b)‖² / (H_j·W_j) + β·½‖w_head‖²`
//!
//! The channel attention `w_{j,c}` is computed once before training as the
//! reference (`lixingjian/DELTA`, `channel_eval.py`, `train.py`) does: a
//! linear classifier is fitted on the pre-trained features, then for each
//! channel c of each regularised block j the loss increase when that
//! channel is switched off (its producing layer's output zeroed, as zeroing
//! the filter's weights does) is measured on training examples; the
//! increases are standardised per block and `w_j = softmax(z_j / 5)`.
//! LAMDA-ZhiJian's DELTA leaves the attention out (uniform weights); this
//! is the paper's method (`attention = false` gives the plain feature-map
//! variant, `½‖FM(w) − FM(w⁰)‖²`).
//!
//! - Regularised blocks: `blocks`, default four spread over the network
//!   ending with the last (the reference takes the end of each ResNet stage).
//!   On transformers a block's "channels" are the hidden units and its
//!   positions the tokens.
//! - The reference sums over the batch (not a mean), so α depends on the
//!   batch size: α 0.01 and β 0.01 at its batch of 64.
//! - Needs a teacher: the runner gives the pre-trained model itself; its
//!   feature maps are computed on every batch (maps are too big to cache).
//! - trains: nothing of its own; regularises what the strategy trains.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};
use zhijian_core::train::features;
use zhijian_core::{Ctx, Error, Input, Method, Model, Result, Role, RunData, Site, Split, StepOutput, Tap, Teacher, TrainConfig, config_table};

use crate::anchor::half_squared_head;
use crate::probe::{ProbeConfig, fit_linear};

/// Configuration of DELTA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeltaConfig {
    /// Weight α of the feature-map term. Default 0.01.
    pub alpha: f64,
    /// Weight β of `½‖w‖²` on the head. Default 0.01.
    pub beta: f64,
    /// Regularised blocks; empty: four spread evenly, ending with the last.
    pub blocks: Vec<usize>,
    /// Weight channels by their importance to the new task. Default true.
    pub attention: bool,
    /// Training examples the channel importance is measured on. Default 64
    /// (the reference: 4 batches of 32).
    pub attention_examples: i64,
    /// Softmax temperature of the standardised importances. Default 5.
    pub temperature: f64,
    /// The classifier fitted on the pre-trained features to score channels.
    pub probe: ProbeConfig,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig { alpha: 0.01, beta: 0.01, blocks: Vec::new(), attention: true, attention_examples: 64, temperature: 5.0, probe: ProbeConfig::default() }
    }
}

impl DeltaConfig {
    /// Rejects out-of-range values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "delta".into(), message });
        for (name, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("`{name} = {v}`: must be a non-negative number"));
            }
        }
        if self.attention_examples < 1 {
            return bad(format!("`attention_examples = {}`: must be at least 1", self.attention_examples));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("`temperature = {}`: must be a positive number", self.temperature));
        }
        if !self.probe.l2.is_empty() {
            return bad("`probe.l2`: DELTA's probe only scores channels; it takes no penalties to choose from".into());
        }
        self.probe.validate("delta")
    }
}

/// DELTA.
pub struct Delta {
    config: DeltaConfig,
    blocks: Vec<usize>,
    /// Per regularised block: channel weights `[C]` (uniform 1/C without attention).
    weights: Vec<Tensor>,
    head: Vec<Tensor>,
}

impl Delta {
    /// DELTA with `config`.
    pub fn new(config: DeltaConfig) -> Self {
        Delta { config, blocks: Vec::new(), weights: Vec::new(), head: Vec::new() }
    }
}

/// Four blocks spread over `n`, ending with the last: `round((k+1)·n/4) − 1`.
pub fn spread_blocks(n: usize) -> Vec<usize> {
    let mut b: Vec<usize> = (1..=4).map(|k| ((k * n) as f64 / 4.0).round().max(1.0) as usize - 1).collect();
    b.dedup();
    b
}

/// A feature map as `[batch, channels, positions]`: CNN maps `[b, c, h, w]`
/// as they are, token states `[b, tokens, hidden]` with the hidden units as channels.
pub fn channels_first(map: &Tensor) -> Tensor {
    match map.dim() {
        4 => map.flatten(2, 3),
        3 => map.transpose(1, 2),
        _ => map.unsqueeze(2),
    }
    .to_kind(Kind::Float)
}

/// One block's term `½·Σ_{b,c} C·w_c·‖s_{b,c} − t_{b,c}‖² / P` (`s`, `t` as
/// `[batch, C, P]`; `w` `[C]`), or `½‖s − t‖²` without weights.
pub fn block_term(student: &Tensor, teacher: &Tensor, weights: Option<&Tensor>) -> Tensor {
    let d2 = (student - teacher.detach()).square().sum_dim_intlist(2, false, Kind::Float);
    match weights {
        Some(w) => {
            let (c, p) = (student.size()[1] as f64, student.size()[2] as f64);
            (d2 * w.unsqueeze(0)).sum(Kind::Float) * (0.5 * c / p)
        }
        None => d2.sum(Kind::Float) * 0.5,
    }
}

/// Standardised importances → softmax(z / T) (NumPy's population standard deviation).
pub fn attention_weights(increase: &Tensor, temperature: f64) -> Tensor {
    let mean = increase.mean(Kind::Float);
    let std = (increase - &mean).square().mean(Kind::Float).sqrt().clamp_min(1e-12);
    ((increase - mean) / std / temperature).softmax(0, Kind::Float)
}

/// Switches one output channel of the layer at `path` off (zeroes it), as
/// zeroing that filter's weights would: the probe of channel importance.
struct ChannelOff {
    path: String,
    channel: i64,
}

impl ChannelOff {
    fn apply(&self, site: &Site, out: Tensor, channel_dim: i64) -> Tensor {
        if site.path != self.path {
            return out;
        }
        let dim = if channel_dim < 0 { out.dim() as i64 + channel_dim } else { channel_dim };
        let mut shape = vec![1i64; out.dim()];
        shape[dim as usize] = out.size()[dim as usize];
        let keep = Tensor::ones(shape.as_slice(), (out.kind(), out.device()));
        let _ = keep.narrow(dim, self.channel, 1).fill_(0.0);
        out * keep
    }
}

impl Method for ChannelOff {
    fn name(&self) -> &'static str {
        "delta_channel_off"
    }
    fn config(&self) -> toml::Table {
        toml::Table::new()
    }
    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }
    fn linear(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.apply(site, out, -1)
    }
    fn conv(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.apply(site, out, 1)
    }
}

/// The last layer (linear or convolution, not a norm) inside block `block`:
/// the one whose output channels are the block's.
fn last_layer_of(model: &Model, block: usize) -> Option<Site> {
    model.sites().into_iter().rev().find(|s| s.block == Some(block) && !matches!(s.role, Role::Norm | Role::Head))
}

/// Loss increase of each channel of `block` switched off, on `input` with
/// the probe `(w, b)`, through the teacher's backbone.
fn channel_increases(teacher: &Teacher, block: usize, input: &Input, labels: &Tensor, probe: &(Tensor, Tensor)) -> Result<Tensor> {
    let model = &teacher.model;
    let site = last_layer_of(model, block)
        .ok_or_else(|| Error::Config(format!("delta: block {block} of {} has no linear or convolution layer", model.backbone.arch())))?;
    let loss = |methods: &[Box<dyn Method>]| {
        let cx = Ctx::new(false, methods, Vec::new());
        let pooled = tch::no_grad(|| model.features(&cx, input));
        pooled.linear(&probe.0, Some(&probe.1)).cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, 0.0).double_value(&[])
    };
    let base = loss(&[]);
    let increases: Vec<f64> = (0..site.out_features)
        .map(|channel| {
            let off: Vec<Box<dyn Method>> = vec![Box::new(ChannelOff { path: site.path.clone(), channel })];
            loss(&off) - base
        })
        .collect();
    Ok(Tensor::from_slice(&increases).to_kind(Kind::Float))
}

impl Method for Delta {
    fn name(&self) -> &'static str {
        "delta"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let n = model.backbone.num_blocks();
        self.blocks = if self.config.blocks.is_empty() { spread_blocks(n) } else { self.config.blocks.clone() };
        if let Some(b) = self.blocks.iter().find(|&&b| b >= n) {
            return Err(Error::MethodConfig {
                method: "delta".into(),
                message: format!("`blocks` names block {b}, and {} has {n} (0‥{})", model.backbone.arch(), n - 1),
            });
        }
        Ok(())
    }

    fn taps(&self) -> Vec<Tap> {
        self.blocks.iter().map(|&b| Tap::Block(b)).collect()
    }

    fn teacher_taps(&self) -> Option<Vec<Tap>> {
        Some(self.taps())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let teacher = data.teacher.ok_or_else(|| Error::Config("delta needs the pre-trained model as teacher".into()))?;
        self.head = data.params.iter().filter(|(n, _)| data.is_head(model, n)).map(|(_, t)| t.shallow_clone()).collect();
        self.weights = if self.config.attention { self.channel_attention(teacher, data.train, cfg)? } else { Vec::new() };
        Ok(())
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        let teacher = step.teacher.as_ref()?;
        let mut total: Option<Tensor> = None;
        for (k, b) in self.blocks.iter().enumerate() {
            let (s, t) = (step.taps.get(&Tap::Block(*b))?, teacher.taps.get(&Tap::Block(*b))?);
            let term = block_term(&channels_first(s), &channels_first(t), self.weights.get(k));
            total = Some(match total {
                Some(acc) => acc + term,
                None => term,
            });
        }
        let features = total.map(|t| t * self.config.alpha);
        let head = half_squared_head(&self.head).map(|h| h * self.config.beta);
        [features, head].into_iter().flatten().reduce(|a, b| a + b)
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut t = toml::Table::new();
        t.insert("blocks".into(), self.blocks.iter().map(|&b| toml::Value::from(b as i64)).collect::<Vec<_>>().into());
        if !self.weights.is_empty() {
            // How peaked the attention is: the largest weight times the channel count (1 = uniform).
            let peaks: Vec<toml::Value> = self.weights.iter().map(|w| (w.max().double_value(&[]) * w.size()[0] as f64).into()).collect();
            t.insert("attention_peak".into(), peaks.into());
        }
        Some(t)
    }
}

impl Delta {
    /// The paper's channel attention of each regularised block.
    fn channel_attention(&self, teacher: &Teacher, train: &Split, cfg: &TrainConfig) -> Result<Vec<Tensor>> {
        let device = teacher.model.device();
        let input = teacher.train_input.as_ref().unwrap_or(&train.input);
        let pooled = features(&teacher.model, &teacher.methods, input, cfg.eval_batch_size)?;
        let classes = train.labels.max().int64_value(&[]) + 1;
        let probe = fit_linear(&pooled, &train.labels, classes, device, self.config.probe.budget(cfg))?;
        // The first examples of a seeded shuffle of the training split.
        let n = self.config.attention_examples.min(train.len());
        tch::manual_seed(cfg.seed as i64 ^ 0x5EED);
        let idx = Tensor::randperm(train.len(), (Kind::Int64, Device::Cpu)).narrow(0, 0, n);
        let batch = input.select(&idx, device)?;
        let labels = train.labels.index_select(0, &idx).to_device(device);
        self.blocks
            .iter()
            .map(|&b| {
                let increase = channel_increases(teacher, b, &batch, &labels, &probe)?;
                Ok(attention_weights(&increase, self.config.temperature).to_device(device))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block term by hand: two channels of two positions, one example.
    #[test]
    fn block_term_by_hand() {
        let s = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.0]).view([1, 2, 2]);
        let t = Tensor::from_slice(&[0.0f32, 0.0, 3.0, 0.0]).view([1, 2, 2]);
        // d² = (1 + 4, 9) = (5, 9).
        assert!((block_term(&s, &t, None).double_value(&[]) - 0.5 * 14.0).abs() < 1e-6);
        // Weighted: ½·(C/P)·(0.25·5 + 0.75·9) with C = P = 2.
        let w = Tensor::from_slice(&[0.25f32, 0.75]);
        assert!((block_term(&s, &t, Some(&w)).double_value(&[]) - 0.5 * (0.25 * 5.0 + 0.75 * 9.0)).abs() < 1e-6);
    }

    /// z-scores over the population, softmax at T: increases (0, 1, 2) have
    /// z = (−√1.5, 0, √1.5).
    #[test]
    fn attention_is_the_softmax_of_standardised_increases() {
        let w = attention_weights(&Tensor::from_slice(&[0.0f32, 1.0, 2.0]), 5.0);
        let z = 1.5f64.sqrt() / 5.0;
        let e = [(-z).exp(), 1.0, z.exp()];
        let sum: f64 = e.iter().sum();
        for (k, got) in Vec::<f32>::try_from(w).unwrap().into_iter().enumerate() {
            assert!((got as f64 - e[k] / sum).abs() < 1e-6);
        }
    }

    /// Four spread blocks end with the last; short networks repeat none.
    #[test]
    fn spread_blocks_end_with_the_last() {
        assert_eq!(spread_blocks(7), vec![1, 3, 4, 6]);
        assert_eq!(spread_blocks(12), vec![2, 5, 8, 11]);
        assert_eq!(spread_blocks(2), vec![0, 1]);
    }

    /// Switching off a channel of a block's last layer changes that block's
    /// map only in that channel (up to what later layers mix in), and the
    /// importance of the channels is measured on every toy family.
    #[test]
    fn channel_attention_runs_on_each_family() {
        for (name, model) in [("cnn", crate::testing::cnn(0)), ("efficientnet", crate::testing::efficientnet(0)), ("bert", crate::testing::bert(0))] {
            let input = if name == "bert" { crate::testing::tokens() } else { crate::testing::images() };
            let teacher = Teacher::new(model, Vec::new(), "toy");
            let mut m = Delta::new(DeltaConfig { attention_examples: 6, ..Default::default() });
            m.prepare(&teacher.model).unwrap();
            let split = Split { name: "train".into(), input, labels: crate::testing::labels() };
            let weights = m.channel_attention(&teacher, &split, &TrainConfig::default()).unwrap();
            assert_eq!(weights.len(), m.blocks.len(), "{name}");
            let cx = Ctx::new(false, &[], m.taps());
            let _ = tch::no_grad(|| teacher.model.forward(&cx, &split.input));
            let taps = cx.take_taps();
            for (w, b) in weights.iter().zip(&m.blocks) {
                let channels = channels_first(&taps[&Tap::Block(*b)]).size()[1];
                assert_eq!(w.size(), [channels], "{name}: block {b}'s weights, one per channel");
                assert!((w.sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-5, "{name}");
            }
        }
    }
}
