//! The `Backbone` trait every pre-trained model implements, and its inputs.

use tch::{Device, Kind, Tensor};

use crate::ctx::Ctx;
use crate::layers::Site;

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
    /// Pooled features `[batch, hidden]` already computed by a frozen backbone;
    /// the model skips the backbone and runs only the head.
    Features(Tensor),
}

impl Input {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        match self {
            Input::Tokens { ids, .. } => ids.size()[0],
            Input::Images(x) | Input::Features(x) => x.size()[0],
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows `idx` (int64, on any device) moved to `device`. Token batches are
    /// trimmed to their longest real sequence, so padding costs nothing.
    pub fn select(&self, idx: &Tensor, device: Device) -> Input {
        let idx = idx.to_device(Device::Cpu);
        match self {
            Input::Tokens { ids, mask } => {
                let mask = mask.index_select(0, &idx);
                let longest = mask.sum_dim_intlist(1, false, Kind::Int64).max().int64_value(&[]).max(1);
                Input::Tokens {
                    ids: ids.index_select(0, &idx).narrow(1, 0, longest).to_device(device),
                    mask: mask.narrow(1, 0, longest).to_device(device),
                }
            }
            Input::Images(x) => Input::Images(x.index_select(0, &idx).to_device(device)),
            Input::Features(x) => Input::Features(x.index_select(0, &idx).to_device(device)),
        }
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
    /// Number of blocks (valid `Tap::Block` indices are `0..num_blocks`).
    fn num_blocks(&self) -> usize;
    /// Every hook site, in forward order.
    fn sites(&self) -> Vec<Site>;
    /// The group of the parameter named `param` (a checkpoint key).
    fn group(&self, param: &str) -> ParamGroup;
    /// Runs the backbone, recording requested taps in `cx`.
    ///
    /// # Shapes
    /// `input` → pooled features `[batch, hidden_size]`.
    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor;
}
