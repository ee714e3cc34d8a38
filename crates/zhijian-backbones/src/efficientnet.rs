//! EfficientNet-Lite (Tan & Le 2019; the Lite variants of TensorFlow's
//! `efficientnet/lite`): MobileNet-v2 inverted-residual blocks with ReLU6, no
//! squeeze-excite, a fixed 32-wide stem and 1280-wide head, scaled by width and
//! depth multipliers. Key names are lukemelas' `EfficientNet-PyTorch` ones, as
//! the shipped Lite0 weights use (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv` / `._bn0` / `._depthwise_conv` / `._bn1` /
//! `._project_conv` / `._bn2`, `_conv_head`, `_bn1`, head `_fc`).
//!
//! Matches TensorFlow, where the weights come from: "same" padding (the extra
//! pixel of an odd total padding goes bottom / right), BatchNorm eps 1e-3 and
//! momentum 0.01 (TF's decay 0.99). Inputs are scaled `(x − 127) / 128`.
//! Stochastic depth and the head dropout of training recipes are left out:
//! the backbone computes the same function in training and evaluation passes,
//! which keeps cached features exact.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn;
use zhijian_core::layers::{BatchNorm2d, Conv2d, Padding, Role, Site};
use zhijian_core::{Backbone, Ctx, Error, ImagePreset, Input, ParamGroup, Result, Tap};

const BN_EPS: f64 = 1e-3;
const BN_MOMENTUM: f64 = 0.01;
const STEM_WIDTH: i64 = 32;
const HEAD_WIDTH: i64 = 1280;

/// One stage of the architecture: `repeats` blocks with the same kernel and
/// expansion, the first one striding and changing the width.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stage {
    repeats: i64,
    kernel: i64,
    stride: i64,
    expand: i64,
    channels: i64,
}

/// The unscaled stages (Lite0), TensorFlow's `efficientnet_lite_builder`.
const STAGES: [Stage; 7] = [
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 1, channels: 16 },
    Stage { repeats: 2, kernel: 3, stride: 2, expand: 6, channels: 24 },
    Stage { repeats: 2, kernel: 5, stride: 2, expand: 6, channels: 40 },
    Stage { repeats: 3, kernel: 3, stride: 2, expand: 6, channels: 80 },
    Stage { repeats: 3, kernel: 5, stride: 1, expand: 6, channels: 112 },
    Stage { repeats: 4, kernel: 5, stride: 2, expand: 6, channels: 192 },
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 6, channels: 320 },
];

/// Hyper-parameters of an EfficientNet-Lite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientNetLiteConfig {
    /// Channel multiplier of the blocks (the stem and head stay fixed).
    pub width: f64,
    /// Block-repeat multiplier of the middle stages (the first and last stay at one block).
    pub depth: f64,
    /// Input resolution of the preset, pixels.
    pub image_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Keep only the first `stages` of the seven stages (1 … 7) and no
    /// `_conv_head`: the features are then stage `stages − 1`'s output,
    /// average-pooled (what `Tap::Block(stages − 1)` records). None: the
    /// whole network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<usize>,
}

impl EfficientNetLiteConfig {
    fn preset(width: f64, depth: f64, image_size: i64) -> Self {
        EfficientNetLiteConfig { width, depth, image_size, in_chans: 3, stages: None }
    }

    /// Lite0: 224 px, 4.65 M parameters with a 1000-class head.
    pub fn lite0() -> Self {
        Self::preset(1.0, 1.0, 224)
    }
    /// Lite1: depth × 1.1, 240 px.
    pub fn lite1() -> Self {
        Self::preset(1.0, 1.1, 240)
    }
    /// Lite2: width × 1.1, depth × 1.2, 260 px.
    pub fn lite2() -> Self {
        Self::preset(1.1, 1.2, 260)
    }
    /// Lite3: width × 1.2, depth × 1.4, 280 px.
    pub fn lite3() -> Self {
        Self::preset(1.2, 1.4, 280)
    }
    /// Lite4: width × 1.4, depth × 1.8, 300 px.
    pub fn lite4() -> Self {
        Self::preset(1.4, 1.8, 300)
    }

    /// A preset by name (`lite0` … `lite4`).
    pub fn by_name(name: &str) -> Result<Self> {
        Ok(match name {
            "lite0" => Self::lite0(),
            "lite1" => Self::lite1(),
            "lite2" => Self::lite2(),
            "lite3" => Self::lite3(),
            "lite4" => Self::lite4(),
            other => return Err(Error::Config(format!("unknown EfficientNet-Lite preset `{other}`; known: lite0, lite1, lite2, lite3, lite4"))),
        })
    }

    /// Rejects multipliers and sizes that cannot build a network.
    pub fn validate(&self) -> Result<()> {
        if !(self.width > 0.0 && self.depth > 0.0) || self.image_size < 1 || self.in_chans < 1 {
            return Err(Error::Config(format!("efficientnet-lite: width, depth, image_size and in_chans must be positive: {self:?}")));
        }
        if let Some(kept) = self.stages.filter(|k| !(1..=STAGES.len()).contains(k)) {
            return Err(Error::Config(format!("efficientnet-lite: stages = {kept}; keep 1 … {} of its stages", STAGES.len())));
        }
        Ok(())
    }

    /// Channels after width scaling: the nearest multiple of 8, never 10 % below
    /// the scaled value (TensorFlow's `round_filters`).
    fn channels(&self, c: i64) -> i64 {
        let v = c as f64 * self.width;
        let rounded = (((v + 4.0) as i64) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * v { rounded + 8 } else { rounded }
    }

    /// Repeats after depth scaling (rounded up); the first and last stages are fixed in Lite.
    fn repeats(&self, stage: usize) -> i64 {
        let r = STAGES[stage].repeats;
        if stage == 0 || stage == STAGES.len() - 1 { r } else { (r as f64 * self.depth).ceil() as i64 }
    }
}

struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(p: &nn::Path, conv: &str, bn: &str, c_in: i64, c_out: i64, kernel: i64, stride: i64, groups: i64) -> ConvBn {
        ConvBn {
            conv: Conv2d::new(p / conv, c_in, c_out, kernel, stride, Padding::TfSame, groups, false),
            bn: BatchNorm2d::new(p / bn, c_out, BN_EPS, BN_MOMENTUM),
        }
    }

    fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        self.bn.forward(cx, &self.conv.forward(cx, x))
    }
}

fn relu6(x: Tensor) -> Tensor {
    x.clamp(0.0, 6.0)
}

/// An inverted-residual block: 1×1 expansion (absent when the ratio is 1),
/// depthwise k×k, 1×1 projection; a skip connection when shape allows.
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

impl Block {
    fn new(p: nn::Path, c_in: i64, c_out: i64, s: &Stage, stride: i64) -> Block {
        let mid = c_in * s.expand;
        Block {
            expand: (s.expand != 1).then(|| ConvBn::new(&p, "_expand_conv", "_bn0", c_in, mid, 1, 1, 1)),
            depthwise: ConvBn::new(&p, "_depthwise_conv", "_bn1", mid, mid, s.kernel, stride, mid),
            project: ConvBn::new(&p, "_project_conv", "_bn2", mid, c_out, 1, 1, 1),
            skip: stride == 1 && c_in == c_out,
        }
    }

    fn convs(&self) -> impl Iterator<Item = &ConvBn> {
        self.expand.iter().chain([&self.depthwise, &self.project])
    }

    fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let h = self.expand.as_ref().map_or_else(|| x.shallow_clone(), |e| relu6(e.forward(cx, x)));
        let h = self.project.forward(cx, &relu6(self.depthwise.forward(cx, &h)));
        if self.skip { h + x } else { h }
    }
}

/// An EfficientNet-Lite feature extractor (the head `_fc` lives in
/// [`zhijian_core::Model`]). Blocks are numbered across stages, as in the
/// checkpoints; `Tap::Block(i)` is the output of stage `i`.
pub struct EfficientNetLite {
    config: EfficientNetLiteConfig,
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    /// `_conv_head`; none when the network is cut after a stage.
    head: Option<ConvBn>,
    width: i64,
}

impl EfficientNetLite {
    /// Creates the variables under `p` (random init; load weights after).
    pub fn new(p: nn::Path, config: &EfficientNetLiteConfig) -> Result<EfficientNetLite> {
        config.validate()?;
        let stem = ConvBn::new(&p, "_conv_stem", "_bn0", config.in_chans, STEM_WIDTH, 3, 2, 1);
        let stem = ConvBn { conv: stem.conv.with_role(Role::Stem), ..stem };
        let (mut c_in, mut index) = (STEM_WIDTH, 0);
        let mut stages = Vec::new();
        for (i, s) in STAGES.iter().enumerate().take(config.stages.unwrap_or(STAGES.len())) {
            let c_out = config.channels(s.channels);
            let blocks = (0..config.repeats(i))
                .map(|j| {
                    let block = Block::new(&p / "_blocks" / index, c_in, c_out, s, if j == 0 { s.stride } else { 1 });
                    (c_in, index) = (c_out, index + 1);
                    block
                })
                .collect();
            stages.push(blocks);
        }
        let head = config.stages.is_none().then(|| ConvBn::new(&p, "_conv_head", "_bn1", c_in, HEAD_WIDTH, 1, 1, 1));
        let width = if head.is_some() { HEAD_WIDTH } else { c_in };
        Ok(EfficientNetLite { config: config.clone(), stem, stages, head, width })
    }

    /// The configuration.
    pub fn config(&self) -> &EfficientNetLiteConfig {
        &self.config
    }
}

impl Backbone for EfficientNetLite {
    fn arch(&self) -> &str {
        "efficientnet_lite"
    }

    fn hidden_size(&self) -> i64 {
        self.width
    }

    fn head_name(&self) -> &str {
        "_fc"
    }

    /// `(x − 127) / 128` on 0–255 pixels, the scaling the Lite weights were trained with;
    /// evaluation crops keep `size / (size + 32)` as TensorFlow's `CROP_PADDING`.
    fn image_preset(&self) -> Option<ImagePreset> {
        let size = self.config.image_size;
        Some(ImagePreset { size, mean: [127.0 / 255.0; 3], std: [128.0 / 255.0; 3], crop_pct: size as f64 / (size + 32) as f64 })
    }

    fn num_blocks(&self) -> usize {
        self.stages.len()
    }

    fn sites(&self) -> Vec<Site> {
        let blocks = self.stages.iter().flatten().flat_map(Block::convs);
        std::iter::once(&self.stem).chain(blocks).chain(&self.head).flat_map(|c| [c.conv.site().clone(), c.bn.site().clone()]).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        if let Some(n) = zhijian_core::block_index(param, "_blocks.") {
            let mut first = 0;
            for (stage, blocks) in self.stages.iter().enumerate() {
                first += blocks.len();
                if n < first {
                    return ParamGroup::Block(stage);
                }
            }
        }
        if param.starts_with("_conv_stem.") || param.starts_with("_bn0.") { ParamGroup::Stem } else { ParamGroup::Neck }
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let Input::Images(images) = input else { panic!("efficientnet_lite takes Input::Images; the data config must produce images") };
        let mut x = relu6(self.stem.forward(cx, images));
        for (i, stage) in self.stages.iter().enumerate() {
            x = stage.iter().fold(x, |h, block| block.forward(cx, &h));
            cx.tap(Tap::Block(i), &x);
        }
        let x = match &self.head {
            Some(head) => relu6(head.forward(cx, &x)),
            None => x,
        };
        x.adaptive_avg_pool2d([1, 1]).flatten(1, 3)
    }
}
