//! The plugin interface every reuse method implements.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::nn::VarStore;
use tch::Tensor;

use crate::ctx::Tap;
use crate::error::{Error, Result};
use crate::layers::Site;
use crate::model::Model;

/// The three stages of model reuse (as in LAMDA-ZhiJian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Model preparation: adds trainable structure or picks what trains.
    Architect,
    /// Model learning: objectives and optimisation guided by the pre-trained model.
    Tuner,
    /// Model inference: how pre-trained knowledge is used at prediction time.
    Merger,
}

/// What one training forward pass produced, for methods that add losses.
pub struct StepOutput {
    /// Logits `[batch, classes]`.
    pub logits: Tensor,
    /// Integer labels `[batch]`.
    pub labels: Tensor,
    /// The taps methods asked for.
    pub taps: BTreeMap<Tap, Tensor>,
}

/// A reuse method: one file per method, registered by name.
///
/// Life cycle: the engine freezes the backbone (the head stays trainable), calls
/// [`Method::prepare`] on each method in strategy order, then trains with every
/// method active at each hook site.
pub trait Method: Send {
    /// Registered name (`lora`).
    fn name(&self) -> &'static str;

    /// The method's configuration as TOML, such that building the method from
    /// it gives the same method (config round-trip).
    fn config(&self) -> toml::Table;

    /// Validates against the model, creates the method's parameters and sets what
    /// trains in the backbone. Called once, before training.
    fn prepare(&mut self, model: &Model) -> Result<()>;

    /// Transforms the output `out` of the linear layer at `site`, given its input `x`.
    fn linear(&self, _site: &str, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        out
    }

    /// Transforms the output `out` of the convolution at `site` (whose
    /// [`crate::layers::ConvGeometry`] says how it slides), given its input `x`.
    fn conv(&self, _site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        out
    }

    /// Whether the method changes the backbone's forward pass (if no method does
    /// and the backbone is frozen, features are computed once and cached).
    fn alters_forward(&self) -> bool {
        false
    }

    /// Whether the model's output is unchanged right after `prepare`, as for LoRA
    /// (B = 0). Checked by the conformance tests.
    fn identity_at_init(&self) -> bool {
        true
    }

    /// Taps the method needs from each training step.
    fn taps(&self) -> Vec<Tap> {
        Vec::new()
    }

    /// An extra loss term added to the task loss.
    fn extra_loss(&self, _step: &StepOutput) -> Option<Tensor> {
        None
    }

    /// The method's own parameters, if it has any.
    fn var_store(&self) -> Option<&VarStore> {
        None
    }

    /// Mutable access to the method's own parameters (for loading a saved adapter).
    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        None
    }

    /// Folds the method into the backbone's weights, so inference costs nothing extra.
    fn merge(&mut self, _model: &Model) -> Result<()> {
        Err(Error::Unsupported { method: self.name().into(), operation: "merge".into() })
    }

    /// Undoes [`Method::merge`].
    fn unmerge(&mut self, _model: &Model) -> Result<()> {
        Err(Error::Unsupported { method: self.name().into(), operation: "unmerge".into() })
    }

    /// Whether [`Method::merge`] is supported.
    fn can_merge(&self) -> bool {
        false
    }
}
