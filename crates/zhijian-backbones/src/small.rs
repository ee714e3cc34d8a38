//! A small MLP and a small CNN: backbones for tests and toy experiments
//! (digits at 28 px on a laptop), trained from scratch or from a checkpoint
//! of their own. Every linear layer and convolution is a hook site, so every
//! method runs on them.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn;
use zhijian_core::layers::{BatchNorm2d, Conv2d, Linear, Padding, Role, Site};
use zhijian_core::{Backbone, Ctx, Error, ImagePreset, Input, ParamGroup, Result, Tap, block_index};

/// How images are fed to the small backbones: `size`×`size` pixels, scaled to [-1, 1].
fn preset(size: i64) -> ImagePreset {
    ImagePreset { size, mean: [0.5; 3], std: [0.5; 3], crop_pct: 1.0 }
}

/// A multi-layer perceptron over flattened images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Side of the square input image, pixels.
    pub image_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Width of each hidden layer (the last one is the feature width).
    pub hidden: Vec<i64>,
}

impl Default for MlpConfig {
    /// 3 × 28 × 28 → 256 → 128.
    fn default() -> Self {
        MlpConfig { image_size: 28, in_chans: 3, hidden: vec![256, 128] }
    }
}

/// An MLP: `layers.i` are linear layers, each followed by ReLU.
pub struct Mlp {
    config: MlpConfig,
    layers: Vec<Linear>,
}

impl MlpConfig {
    /// Rejects empty or non-positive sizes.
    pub fn validate(&self) -> Result<()> {
        if self.hidden.is_empty() || self.hidden.iter().chain([&self.image_size, &self.in_chans]).any(|&w| w < 1) {
            return Err(Error::Config(format!("mlp: image_size, in_chans and every hidden width must be ≥ 1, and hidden non-empty: {self:?}")));
        }
        Ok(())
    }
}

impl Mlp {
    /// Creates the variables under `p` (random init).
    pub fn new(p: nn::Path, config: &MlpConfig) -> Result<Mlp> {
        config.validate()?;
        let mut width = config.in_chans * config.image_size * config.image_size;
        let layers = config
            .hidden
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let layer = Linear::new(&p / "layers" / i, width, out, true, Role::Other);
                width = out;
                layer
            })
            .collect();
        Ok(Mlp { config: config.clone(), layers })
    }
}

impl Backbone for Mlp {
    fn arch(&self) -> &str {
        "mlp"
    }

    fn hidden_size(&self) -> i64 {
        *self.config.hidden.last().expect("validated: non-empty")
    }

    fn image_preset(&self) -> Option<ImagePreset> {
        Some(preset(self.config.image_size))
    }

    fn num_blocks(&self) -> usize {
        self.layers.len()
    }

    fn sites(&self) -> Vec<Site> {
        self.layers.iter().map(|l| l.site().clone()).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        block_index(param, "layers.").map_or(ParamGroup::Neck, ParamGroup::Block)
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let Input::Images(images) = input else { panic!("mlp takes Input::Images; the data config must produce images") };
        let mut x = images.flatten(1, 3);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(cx, &x).relu();
            cx.tap(Tap::Block(i), &x);
        }
        x
    }
}

/// A small VGG-style CNN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmallCnnConfig {
    /// Side of the square input image, pixels.
    pub image_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Output channels of each stage (3×3 conv, BatchNorm, ReLU, 2×2 max-pool
    /// except after the last, which is averaged globally).
    pub channels: Vec<i64>,
}

impl Default for SmallCnnConfig {
    /// 3 × 28 × 28 → 32 → 64 → 128 channels.
    fn default() -> Self {
        SmallCnnConfig { image_size: 28, in_chans: 3, channels: vec![32, 64, 128] }
    }
}

/// A small CNN: `features.i.conv` / `features.i.bn` per stage.
pub struct SmallCnn {
    config: SmallCnnConfig,
    stages: Vec<(Conv2d, BatchNorm2d)>,
}

impl SmallCnnConfig {
    /// Rejects empty or non-positive sizes.
    pub fn validate(&self) -> Result<()> {
        if self.channels.is_empty() || self.channels.iter().chain([&self.image_size, &self.in_chans]).any(|&c| c < 1) {
            return Err(Error::Config(format!("small_cnn: image_size, in_chans and every channel count must be ≥ 1, and channels non-empty: {self:?}")));
        }
        Ok(())
    }
}

impl SmallCnn {
    /// Creates the variables under `p` (random init).
    pub fn new(p: nn::Path, config: &SmallCnnConfig) -> Result<SmallCnn> {
        config.validate()?;
        let mut c_in = config.in_chans;
        let stages = config
            .channels
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let q = &p / "features" / i;
                let mut conv = Conv2d::new(&q / "conv", c_in, c_out, 3, 1, Padding::Fixed(1), 1, false);
                if i == 0 {
                    conv = conv.with_role(Role::Stem);
                }
                c_in = c_out;
                (conv, BatchNorm2d::new(&q / "bn", c_out, 1e-5, 0.1))
            })
            .collect();
        Ok(SmallCnn { config: config.clone(), stages })
    }
}

impl Backbone for SmallCnn {
    fn arch(&self) -> &str {
        "small_cnn"
    }

    fn hidden_size(&self) -> i64 {
        *self.config.channels.last().expect("validated: non-empty")
    }

    fn image_preset(&self) -> Option<ImagePreset> {
        Some(preset(self.config.image_size))
    }

    fn num_blocks(&self) -> usize {
        self.stages.len()
    }

    fn sites(&self) -> Vec<Site> {
        self.stages.iter().flat_map(|(conv, bn)| [conv.site().clone(), bn.site().clone()]).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        block_index(param, "features.").map_or(ParamGroup::Neck, ParamGroup::Block)
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let Input::Images(images) = input else { panic!("small_cnn takes Input::Images; the data config must produce images") };
        let last = self.stages.len() - 1;
        let mut x = images.shallow_clone();
        for (i, (conv, bn)) in self.stages.iter().enumerate() {
            x = bn.forward(cx, &conv.forward(cx, &x)).relu();
            if i < last {
                x = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            cx.tap(Tap::Block(i), &x);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, 3)
    }
}
