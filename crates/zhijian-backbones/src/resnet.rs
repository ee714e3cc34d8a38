//! ResNet (He et al. 2016, <https://arxiv.org/abs/1512.03385>) with torchvision /
//! timm key names (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`):
//! ResNet-18 / 34 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3×3
//! convolution as in torchvision's "v1.5").
//!
//! Taps: `Tap::Block(i)` is the output of stage `layer{i+1}`. BatchNorm uses its
//! pre-trained statistics unless its own parameters train (see [`BatchNorm2d`]).

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn;
use zhijian_core::layers::{BatchNorm2d, Conv2d, Padding, Role, Site};
use zhijian_core::{Backbone, Ctx, Error, ImagePreset, Input, ParamGroup, Result, Tap, block_index};

/// The residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1×1, 3×3, 1×1 convolutions (ResNet-50 and deeper), expansion 4.
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Architecture hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Block type.
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: Vec<usize>,
    /// Width of each stage before expansion (torchvision: 64, 128, 256, 512).
    pub channels: Vec<i64>,
    /// Width of the 7×7 stem.
    pub stem_width: i64,
    /// Input channels.
    pub in_chans: i64,
}

impl ResNetConfig {
    fn standard(block: BlockKind, layers: [usize; 4]) -> Self {
        ResNetConfig { block, layers: layers.to_vec(), channels: vec![64, 128, 256, 512], stem_width: 64, in_chans: 3 }
    }

    /// ResNet-18, -34 or -50 by depth.
    pub fn by_depth(depth: u32) -> Result<Self> {
        match depth {
            18 => Ok(Self::resnet18()),
            34 => Ok(Self::resnet34()),
            50 => Ok(Self::resnet50()),
            other => Err(Error::Config(format!("unknown ResNet depth {other}; known: 18, 34, 50"))),
        }
    }

    /// ResNet-18: 11.7 M parameters.
    pub fn resnet18() -> Self {
        Self::standard(BlockKind::Basic, [2, 2, 2, 2])
    }

    /// ResNet-34: 21.8 M parameters.
    pub fn resnet34() -> Self {
        Self::standard(BlockKind::Basic, [3, 4, 6, 3])
    }

    /// ResNet-50: 25.6 M parameters.
    pub fn resnet50() -> Self {
        Self::standard(BlockKind::Bottleneck, [3, 4, 6, 3])
    }

    /// Rejects inconsistent stage lists.
    pub fn validate(&self) -> Result<()> {
        if self.layers.len() != self.channels.len() || self.layers.is_empty() || self.layers.contains(&0) {
            return Err(Error::Config(format!(
                "resnet: layers {:?} and channels {:?} must be non-empty, of equal length, without zero stages",
                self.layers, self.channels
            )));
        }
        Ok(())
    }
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

struct Unit {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Unit {
    fn new(p: &nn::Path, conv: &str, bn: &str, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Unit {
        Unit {
            conv: Conv2d::new(p / conv, c_in, c_out, kernel, stride, Padding::Fixed(kernel / 2), 1, false),
            bn: BatchNorm2d::new(p / bn, c_out, BN_EPS, BN_MOMENTUM),
        }
    }

    fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        self.bn.forward(cx, &self.conv.forward(cx, x))
    }
}

struct Residual {
    units: Vec<Unit>,
    downsample: Option<Unit>,
}

impl Residual {
    fn new(p: nn::Path, kind: BlockKind, c_in: i64, planes: i64, stride: i64) -> Residual {
        let out = planes * kind.expansion();
        let units = match kind {
            BlockKind::Basic => vec![Unit::new(&p, "conv1", "bn1", c_in, planes, 3, stride), Unit::new(&p, "conv2", "bn2", planes, planes, 3, 1)],
            BlockKind::Bottleneck => vec![
                Unit::new(&p, "conv1", "bn1", c_in, planes, 1, 1),
                Unit::new(&p, "conv2", "bn2", planes, planes, 3, stride),
                Unit::new(&p, "conv3", "bn3", planes, out, 1, 1),
            ],
        };
        let downsample = (stride != 1 || c_in != out).then(|| Unit::new(&(&p / "downsample"), "0", "1", c_in, out, 1, stride));
        Residual { units, downsample }
    }

    fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let last = self.units.len() - 1;
        let y = self.units.iter().enumerate().fold(x.shallow_clone(), |h, (i, u)| {
            let h = u.forward(cx, &h);
            if i < last { h.relu() } else { h }
        });
        let shortcut = self.downsample.as_ref().map_or_else(|| x.shallow_clone(), |d| d.forward(cx, x));
        (y + shortcut).relu()
    }
}

/// A ResNet feature extractor; its head is named `fc`, as upstream.
pub struct ResNet {
    config: ResNetConfig,
    stem: Unit,
    stages: Vec<Vec<Residual>>,
    width: i64,
}

impl ResNet {
    /// Creates the variables under `p` (random init; load weights after).
    pub fn new(p: nn::Path, config: &ResNetConfig) -> Result<ResNet> {
        config.validate()?;
        let mut stem = Unit::new(&p, "conv1", "bn1", config.in_chans, config.stem_width, 7, 2);
        stem.conv = stem.conv.with_role(Role::Stem);
        let mut c_in = config.stem_width;
        let mut stages = Vec::new();
        for (i, (&blocks, &planes)) in config.layers.iter().zip(&config.channels).enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let stage = (0..blocks)
                .map(|j| {
                    let r = Residual::new(&p / format!("layer{}", i + 1) / j, config.block, c_in, planes, if j == 0 { stride } else { 1 });
                    c_in = planes * config.block.expansion();
                    r
                })
                .collect();
            stages.push(stage);
        }
        Ok(ResNet { config: config.clone(), stem, stages, width: c_in })
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }
}

impl Backbone for ResNet {
    fn arch(&self) -> &str {
        "resnet"
    }

    fn hidden_size(&self) -> i64 {
        self.width
    }

    fn head_name(&self) -> &str {
        "fc"
    }

    /// torchvision's ImageNet recipe: 224 px, ImageNet mean and std, crop 0.875.
    fn image_preset(&self) -> Option<ImagePreset> {
        Some(ImagePreset { size: 224, mean: ImagePreset::IMAGENET_MEAN, std: ImagePreset::IMAGENET_STD, crop_pct: 0.875 })
    }

    fn num_blocks(&self) -> usize {
        self.stages.len()
    }

    /// Every convolution: the stem, then each block's units and its downsampling shortcut.
    fn sites(&self) -> Vec<Site> {
        let blocks = self.stages.iter().flatten();
        let units = blocks.flat_map(|b| b.units.iter().chain(&b.downsample));
        std::iter::once(&self.stem).chain(units).flat_map(|u| [u.conv.site().clone(), u.bn.site().clone()]).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        // Stages are named from 1 (`layer1`), blocks from 0.
        block_index(param, "layer").map_or(ParamGroup::Stem, |i| ParamGroup::Block(i.saturating_sub(1)))
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let Input::Images(images) = input else { panic!("resnet takes Input::Images; the data config must produce images") };
        let mut x = self.stem.forward(cx, images).relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (i, stage) in self.stages.iter().enumerate() {
            x = stage.iter().fold(x, |h, block| block.forward(cx, &h));
            cx.tap(Tap::Block(i), &x);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, 3)
    }
}
