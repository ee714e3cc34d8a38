//! The `Backbone` trait every pre-trained model implements, and its inputs.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::ctx::Ctx;
use crate::error::Result;
use crate::layers::Site;

/// Examples whose model inputs are made batch by batch, on demand: images that
/// are decoded, resized, augmented and normalised only when a batch needs them
/// (a data set at a backbone's resolution rarely fits in memory).
pub trait ImageSource: Send + Sync + std::fmt::Debug {
    /// Number of examples.
    fn len(&self) -> i64;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Model-ready images of the examples `idx`, in that order. With
    /// `augment = Some(seed)` the random training augmentations are drawn from
    /// `seed` and each example's index alone, so a batch repeats exactly
    /// whatever the number of threads that made it.
    ///
    /// # Shapes
    /// `idx`: `k` indices → `[k, channels, height, width]` float.
    fn batch(&self, idx: &[i64], augment: Option<u64>) -> Result<Tensor>;
    /// A digest of everything that decides the evaluation images (the pixels
    /// or files, which examples, the transform, any corruption): two sources
    /// with the same fingerprint make the same batches, so features computed
    /// from one serve the other (the feature cache keys on it).
    fn fingerprint(&self) -> Result<String>;
}

/// How raw images become a backbone's input, as its pre-training saw them
/// (timm's `pretrained_cfg`): `(pixel / 255 − mean) / std` per channel, at
/// `size`×`size` pixels, evaluation images resized to `size / crop_pct` then
/// centre-cropped.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ImagePreset {
    /// Side of the square input, pixels.
    pub size: i64,
    /// Per-channel mean, in [0, 1] pixel units.
    pub mean: [f64; 3],
    /// Per-channel standard deviation, in [0, 1] pixel units.
    pub std: [f64; 3],
    /// Fraction of the resized evaluation image kept by the centre crop.
    pub crop_pct: f64,
}

impl ImagePreset {
    /// ImageNet statistics (torchvision, most timm models).
    pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
    /// ImageNet standard deviations.
    pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
}

/// A batch of model inputs. A closed set: every backbone family takes one of these.
#[derive(Debug)]
pub enum Input {
    /// Token ids and attention mask, both `[batch, seq]` int64 (mask 1 = real token).
    Tokens {
        /// Token ids.
        ids: Tensor,
        /// 1 for real tokens, 0 for padding.
        mask: Tensor,
    },
    /// Normalised images `[batch, channels, height, width]`, float.
    Images(Tensor),
    /// Examples made into [`Input::Images`] batch by batch ([`ImageSource`]).
    Lazy(Arc<dyn ImageSource>),
    /// Pooled features `[batch, hidden]` already computed by a frozen backbone;
    /// the model skips the backbone and runs only the head.
    Features(Tensor),
    /// Token states entering block `block`, computed once by the frozen blocks
    /// before it ([`Backbone::prefix`]); the backbone resumes from that block.
    Hidden {
        /// The block these states enter.
        block: usize,
        /// States `[batch, seq, hidden]`.
        states: Tensor,
        /// The input's mask `[batch, seq]` int64 (1 = real token).
        mask: Tensor,
    },
}

impl Input {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        match self {
            Input::Tokens { ids, .. } => ids.size()[0],
            Input::Images(x) | Input::Features(x) => x.size()[0],
            Input::Hidden { states, .. } => states.size()[0],
            Input::Lazy(source) => source.len(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same examples on `device` (lazy examples stay where they are made).
    pub fn to_device(&self, device: Device) -> Input {
        match self {
            Input::Tokens { ids, mask } => Input::Tokens { ids: ids.to_device(device), mask: mask.to_device(device) },
            Input::Images(x) => Input::Images(x.to_device(device)),
            Input::Features(x) => Input::Features(x.to_device(device)),
            Input::Hidden { block, states, mask } => Input::Hidden { block: *block, states: states.to_device(device), mask: mask.to_device(device) },
            Input::Lazy(source) => Input::Lazy(source.clone()),
        }
    }

    /// The rows `idx` (int64, on any device) moved to `device`. Token batches are
    /// trimmed to their longest real sequence, so padding costs nothing; lazy
    /// examples are made now, without augmentation.
    pub fn select(&self, idx: &Tensor, device: Device) -> Result<Input> {
        self.select_augmented(idx, device, None)
    }

    /// As [`Input::select`], with lazy examples augmented from `augment`'s seed
    /// (see [`ImageSource::batch`]); in-memory inputs are not augmented.
    pub fn select_augmented(&self, idx: &Tensor, device: Device, augment: Option<u64>) -> Result<Input> {
        let idx = idx.to_device(Device::Cpu);
        Ok(match self {
            Input::Tokens { ids, mask } => {
                let mask = mask.index_select(0, &idx);
                let longest = mask.sum_dim_intlist(1, false, Kind::Int64).max().int64_value(&[]).max(1);
                Input::Tokens { ids: ids.index_select(0, &idx).narrow(1, 0, longest).to_device(device), mask: mask.narrow(1, 0, longest).to_device(device) }
            }
            Input::Hidden { block, states, mask } => {
                let mask = mask.index_select(0, &idx);
                let longest = mask.sum_dim_intlist(1, false, Kind::Int64).max().int64_value(&[]).max(1);
                Input::Hidden {
                    block: *block,
                    states: states.index_select(0, &idx).narrow(1, 0, longest).to_device(device),
                    mask: mask.narrow(1, 0, longest).to_device(device),
                }
            }
            Input::Images(x) => Input::Images(x.index_select(0, &idx).to_device(device)),
            Input::Features(x) => Input::Features(x.index_select(0, &idx).to_device(device)),
            Input::Lazy(source) => {
                let rows = Vec::<i64>::try_from(&idx).expect("int64 indices");
                Input::Images(source.batch(&rows, augment)?.to_device(device))
            }
        })
    }
}

/// Which part of a backbone a parameter belongs to (for partial fine-tuning,
/// per-group learning rates and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParamGroup {
    /// Input embeddings or the convolutional stem.
    Stem,
    /// Block `i` (0-based).
    Block(usize),
    /// Final norm, pooler and other parts after the blocks, except the head.
    Neck,
    /// The classification head.
    Head,
}

/// The block index of a parameter named `<prefix><i>.…`, e.g. 3 for
/// `encoder.layer.3.output.dense.weight` with prefix `encoder.layer.`.
pub fn block_index(param: &str, prefix: &str) -> Option<usize> {
    param.strip_prefix(prefix)?.split('.').next()?.parse().ok()
}

/// A pre-trained feature extractor written with hookable layers.
///
/// The classification head is not part of the backbone: [`crate::Model`] owns it,
/// so every backbone gets the same head handling.
pub trait Backbone: Send {
    /// Architecture name, e.g. `bert`.
    fn arch(&self) -> &str;
    /// Width of the pooled features.
    fn hidden_size(&self) -> i64;
    /// Name of the classification head's variables in this family's checkpoints
    /// (`head` in timm ViTs, `fc` in ResNets), so a shipped head loads as is.
    fn head_name(&self) -> &str {
        crate::model::HEAD
    }
    /// How raw images become this backbone's input; `None` for backbones that
    /// do not take images.
    fn image_preset(&self) -> Option<ImagePreset> {
        None
    }
    /// Number of blocks (valid `Tap::Block` indices are `0..num_blocks`).
    fn num_blocks(&self) -> usize;
    /// Every hook site, in forward order.
    fn sites(&self) -> Vec<Site>;
    /// The group of the parameter named `param` (a checkpoint key).
    fn group(&self, param: &str) -> ParamGroup;
    /// The input of block `block` for `input` ([`Input::Hidden`]), computed by
    /// the blocks before it under `cx`, for backbones that can resume from a
    /// block; `None` (the default) where the backbone cannot.
    fn prefix(&self, _cx: &Ctx, _input: &Input, _block: usize) -> Option<Input> {
        None
    }
    /// Runs the backbone, recording requested taps in `cx`.
    ///
    /// # Shapes
    /// `input` → pooled features `[batch, hidden_size]`.
    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor;
}
