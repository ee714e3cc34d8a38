//! The plugin interface every reuse method implements.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::Tensor;
use tch::nn::VarStore;

use crate::ctx::Tap;
use crate::error::{Error, Result};
use crate::hooks::{Kv, Layout, SubLayer, Tokens};
use crate::layers::Site;
use crate::model::Model;
use crate::train::{ParamOpts, Split, Teacher, TrainConfig};

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
    /// Which examples of the training split the batch holds `[batch]`
    /// (int64, on the CPU): a memory bank's rows (CRD).
    pub index: Tensor,
    /// The taps methods asked for.
    pub taps: BTreeMap<Tap, Tensor>,
    /// The teacher's output on the same batch, when a method asked for one
    /// ([`Method::teacher_taps`]).
    pub teacher: Option<TeacherOutput>,
}

/// What the frozen teacher computed on a training batch (no gradient).
pub struct TeacherOutput {
    /// Logits `[batch, teacher classes]`, fp32.
    pub logits: Tensor,
    /// The taps the methods asked of the teacher.
    pub taps: BTreeMap<Tap, Tensor>,
}

/// What a run trains on, for the hooks around training.
#[derive(Clone, Copy)]
pub struct RunData<'a> {
    /// The training split.
    pub train: &'a Split,
    /// The validation split held out of training, if the run has one.
    pub val: Option<&'a Split>,
    /// The frozen teacher, if the run has one.
    pub teacher: Option<&'a Teacher>,
    /// Every parameter that trains when training starts, as in [`StepCx::params`].
    pub params: &'a [(String, Tensor)],
}

impl<'a> RunData<'a> {
    /// Training data alone, without validation split, teacher or parameters.
    pub fn train_only(train: &'a Split) -> Self {
        RunData { train, val: None, teacher: None, params: &[] }
    }

    /// Whether the trainable parameter `name` is the model's head (see [`StepCx::is_head`]).
    pub fn is_head(&self, model: &Model, name: &str) -> bool {
        is_head(model, name)
    }
}

/// Whether the trainable parameter `name` (a model checkpoint key, or a
/// method's `instance/param`) is the model's head.
fn is_head(model: &Model, name: &str) -> bool {
    !name.contains('/') && model.group(name) == crate::backbone::ParamGroup::Head
}

/// Where training stands, for the hooks called around each optimiser step.
pub struct StepCx<'a> {
    /// The model being trained (its tensors may be changed in place under `no_grad`).
    pub model: &'a Model,
    /// Optimiser steps taken so far (1 in the first `after_step`).
    pub step: usize,
    /// Steps the run will take.
    pub total: usize,
    /// The learning rate of this step, after the schedule.
    pub lr: f64,
    /// Every parameter that trains: the model's under their checkpoint names,
    /// then each method's as `instance/param` ([`crate::train::trainable`]).
    pub params: &'a [(String, Tensor)],
}

impl StepCx<'_> {
    /// Whether the trainable parameter `name` (of [`StepCx::params`]) is the
    /// model's head, which a new task starts from scratch: constraints toward
    /// pre-trained weights leave it alone.
    pub fn is_head(&self, name: &str) -> bool {
        is_head(self.model, name)
    }
}

/// A reuse method: one file per method, registered by name.
///
/// Life cycle: the engine freezes the backbone (the head stays trainable), calls
/// [`Method::prepare`] on each method in strategy order, then
/// [`Method::before_train`] with the training split, trains with every method
/// active at each hook site ([`Method::after_backward`] and
/// [`Method::after_step`] around each optimiser step), and calls
/// [`Method::after_train`] at the end, then [`Method::fit`] on the training
/// split's features. Every hook is the identity by default.
///
/// Parameters live in the method's own [`VarStore`]: its trainable variables
/// train; its variables without gradient are persistent state (masks, indices,
/// statistics) that the artifact keeps and restores with them.
pub trait Method: Send {
    /// Registered name (`lora`).
    fn name(&self) -> &'static str;

    /// The method's configuration as TOML, such that building the method from
    /// it gives the same method (config round-trip).
    fn config(&self) -> toml::Table;

    /// Validates against the model, creates the method's parameters and sets what
    /// trains in the backbone. Called once, before training.
    fn prepare(&mut self, model: &Model) -> Result<()>;

    /// Whether the method reads a second, frozen tower's embeddings of the
    /// task's class descriptions (contrastive heads): the runner then embeds
    /// them once and hands them over with [`Method::set_class_text`].
    fn reads_class_text(&self) -> bool {
        false
    }

    /// The class descriptions' embeddings `[classes, d]` (float, CPU), one row
    /// per label, given before [`Method::prepare`] when
    /// [`Method::reads_class_text`].
    fn set_class_text(&mut self, _embeddings: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Transforms the input `x` of the linear layer at `site` before its matmul.
    fn linear_input(&self, _site: &Site, x: Tensor, _train: bool) -> Tensor {
        x
    }

    /// Transforms the output `out` of the linear layer at `site`, given its input `x`.
    fn linear(&self, _site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        out
    }

    /// Transforms the output `out` of the convolution at `site` (whose
    /// [`crate::layers::ConvGeometry`] says how it slides), given its input `x`.
    fn conv(&self, _site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        out
    }

    /// Transforms the output `out` of the norm layer at `site` (LayerNorm or
    /// BatchNorm, [`crate::Role::Norm`]), given its input `x`.
    fn norm(&self, _site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        out
    }

    /// Transforms the tokens entering transformer block `block` (may lengthen
    /// the sequence through [`Tokens::insert`]).
    fn block_input(&self, _block: usize, tokens: Tokens, _train: bool) -> Tokens {
        tokens
    }

    /// Transforms the keys and values of block `block`'s attention (may
    /// prepend some through [`Kv::prepend`]).
    fn attn_kv(&self, _block: usize, kv: Kv, _train: bool) -> Kv {
        kv
    }

    /// Transforms the output `out` of sub-layer `at` of block `block`, given
    /// what the sub-layer saw (`x`, after any pre-norm) and the token layout.
    fn sublayer(&self, _block: usize, _at: SubLayer, _x: &Tensor, out: Tensor, _layout: &Layout, _train: bool) -> Tensor {
        out
    }

    /// Called once before the first step, with the run's data (selection of
    /// sparse parameters from gradients, feature statistics, a probe, a
    /// snapshot of the pre-trained weights).
    fn before_train(&mut self, _model: &Model, _data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        Ok(())
    }

    /// Called after each backward pass, before clipping and the optimiser
    /// step (gradient masks).
    fn after_backward(&mut self, _cx: &StepCx) -> Result<()> {
        Ok(())
    }

    /// Called after each optimiser step (projections, constraints).
    fn after_step(&mut self, _cx: &StepCx) -> Result<()> {
        Ok(())
    }

    /// Called once after the last step, with the run's data (a final pruning
    /// cut, an interpolation coefficient chosen on the validation split).
    fn after_train(&mut self, _model: &Model, _data: &RunData) -> Result<()> {
        Ok(())
    }

    /// Whether the method is fitted, without gradients, on the training
    /// split's pooled features once training ends ([`Method::fit`]): class
    /// means, nearest neighbours. A strategy in which nothing else trains then
    /// takes no optimiser step, where it would otherwise be refused.
    fn fits_features(&self) -> bool {
        false
    }

    /// Called once after [`Method::after_train`] when [`Method::fits_features`],
    /// with the training split's features through the backbone as every
    /// method of the strategy leaves it (evaluation mode, no augmentation, no
    /// gradient) and its labels: the rows [`Method::fit_input`] made of each
    /// batch, by default the pooled features.
    ///
    /// # Shapes
    /// `features` `[n, d]` (`[n, hidden]` by default) and `labels` `[n]`
    /// (int64), both on the CPU.
    fn fit(&mut self, _features: &Tensor, _labels: &Tensor) -> Result<()> {
        Ok(())
    }

    /// The rows [`Method::fit`] receives for one batch of the fit pass, made
    /// from the batch's pooled features and the taps the methods asked for in
    /// [`Method::forward_taps`], recorded in the same pass: the pooled
    /// features by default; Head2Toe's every block output, pooled. The
    /// backbone then runs once over the training split, whatever the method
    /// reads of it.
    ///
    /// # Shapes
    /// `pooled` `[b, hidden]` → `[b, d]` (float), `d` the same for every batch.
    fn fit_input(&self, pooled: &Tensor, _taps: &BTreeMap<Tap, Tensor>) -> Tensor {
        pooled.shallow_clone()
    }

    /// Optimiser options of the method's own parameter `name` (as named in its
    /// [`VarStore`]): learning-rate scale and weight decay.
    fn param_opts(&self, _name: &str) -> ParamOpts {
        ParamOpts::default()
    }

    /// Whether the method changes the backbone's forward pass (if no method does
    /// and the backbone is frozen, features are computed once and cached).
    fn alters_forward(&self) -> bool {
        false
    }

    /// The first block whose computation the method's hooks can change, as
    /// [`Model::block_of_site`] counts (0 for anything in the stem), or `None`
    /// if they change none. The default is the safe answer: block 0 for a
    /// method that alters the forward pass. Blocks before the first any method
    /// or trainable parameter touches are computed once and cached
    /// ([`crate::train::frozen_prefix`]).
    fn first_block(&self, _model: &Model) -> Option<usize> {
        self.alters_forward().then_some(0)
    }

    /// Whether the model's output is unchanged right after `prepare`, as for LoRA
    /// (B = 0). Checked by the conformance tests.
    fn identity_at_init(&self) -> bool {
        true
    }

    /// Taps the method needs from each training step (in [`StepOutput::taps`]).
    fn taps(&self) -> Vec<Tap> {
        Vec::new()
    }

    /// Taps the method reads in every forward pass, training or not (through
    /// [`Method::logits`]).
    fn forward_taps(&self) -> Vec<Tap> {
        Vec::new()
    }

    /// Transforms the logits of the head, given this forward pass's taps
    /// (VQT adds a linear map of its query tokens' outputs here).
    fn logits(&self, logits: Tensor, _taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        logits
    }

    /// The teacher taps the method needs with each training step, if it needs
    /// a teacher at all ([`StepOutput::teacher`]): the teacher's logits always
    /// come, these taps with them. A run whose methods need a teacher must
    /// be given one.
    fn teacher_taps(&self) -> Option<Vec<Tap>> {
        None
    }

    /// Whether the method runs the model's forward pass by itself, with no
    /// method's hooks (TPGM's validation passes, WiSE-FT's search over α): it
    /// then cannot share a strategy with a method that alters the forward pass.
    fn forwards_model_alone(&self) -> bool {
        false
    }

    /// What the method chose or learnt during the run that a reader of the
    /// record wants (WiSE-FT's α and its validation curve, TPGM's radii),
    /// kept in the run's record.
    fn summary(&self) -> Option<toml::Table> {
        None
    }

    /// An extra loss term added to the task loss.
    fn extra_loss(&self, _step: &StepOutput) -> Option<Tensor> {
        None
    }

    /// The head of the backbone's pre-training task as the method keeps it
    /// (`(weight [classes, hidden], bias [classes])`: LwF trains a copy of the
    /// shipped head with the backbone), which forgetting is then measured
    /// through instead of the shipped head; `None`: the shipped head.
    fn source_head(&self) -> Option<(Tensor, Tensor)> {
        None
    }

    /// Whether the method's variable `name` serves training only (a
    /// distillation projection to the teacher's width) and is left out of the
    /// run's artifact: a model restored from the artifact runs without it.
    fn training_only(&self, _name: &str) -> bool {
        false
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
