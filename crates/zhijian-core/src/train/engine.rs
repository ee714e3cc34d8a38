//! The training engine: prepare methods, train, evaluate.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use super::optim::{Optimizer, OptimizerConfig, ParamOpts};
use super::schedule::Schedule;
use crate::backbone::{Input, ParamGroup};
use crate::ctx::{Ctx, Tap};
use crate::error::{Error, Result};
use crate::layers::DropoutMasks;
use crate::method::{Method, RunData, StepCx, StepOutput};
use crate::metrics::Accuracy;
use crate::model::Model;
use crate::precision::{Compute, Precision, Probe, WeightCache};
use crate::weights::save_atomic;

use super::teacher::{Teacher, TeacherCache, teacher_taps};

/// Training hyper-parameters. Every field has a default, so a config names only
/// what it changes; an unknown field is an error naming it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training split. Default 1.
    pub epochs: usize,
    /// Stop after this many optimiser steps (0 = no limit). Default 0.
    pub max_steps: usize,
    /// Examples per optimiser step. Default 32.
    pub batch_size: i64,
    /// Examples per evaluation batch. Default 128.
    pub eval_batch_size: i64,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Decoupled (AdamW) or L2 (SGD) weight decay on matrices. Default 0.01.
    pub weight_decay: f64,
    /// Optimiser. Default AdamW (0.9, 0.999, 1e-8).
    pub optimizer: OptimizerConfig,
    /// Schedule after warm-up. Default cosine.
    pub schedule: Schedule,
    /// Fraction of steps spent in linear warm-up. Default 0.1.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (0 = off). Default 1.0.
    pub grad_clip: f64,
    /// Label smoothing of the cross-entropy. Default 0.
    pub label_smoothing: f64,
    /// Seed of shuffling, dropout and method initialisation. Default 0.
    pub seed: u64,
    /// Precision of the training passes' matmuls, convolutions and attention:
    /// `fp32`, `bf16` (fp32 master weights, optimiser state, norms and loss)
    /// or `auto` (bf16 where a matmul probe finds it faster). Default fp32, so
    /// records are comparable across machines.
    #[serde(skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// The same for evaluation and inference. Default fp32.
    #[serde(skip_serializing_if = "Precision::is_fp32")]
    pub eval_precision: Precision,
    /// Batch text of similar lengths together, as Hugging Face's
    /// `group_by_length`: each epoch's shuffled order is cut into mega-batches
    /// of 50 batches, each sorted by length (longest first), so batches carry
    /// less padding. Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub group_by_length: bool,
    /// Which random masks dropout draws: `fast` (on the CPU, one pass of a
    /// counter-based generator, a fraction of LibTorch's cost) or `torch`
    /// (LibTorch's own, the masks PyTorch draws after the same seed: for a run
    /// that must match a PyTorch run step by step). Default fast.
    #[serde(skip_serializing_if = "DropoutMasks::is_fast")]
    pub dropout_masks: DropoutMasks,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            max_steps: 0,
            batch_size: 32,
            eval_batch_size: 128,
            lr: 1e-3,
            weight_decay: 0.01,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::Cosine,
            warmup_ratio: 0.1,
            grad_clip: 1.0,
            label_smoothing: 0.0,
            seed: 0,
            precision: Precision::Fp32,
            eval_precision: Precision::Fp32,
            group_by_length: false,
            dropout_masks: DropoutMasks::Fast,
        }
    }
}

impl TrainConfig {
    /// Rejects values that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("train.{field} {why}")));
        if self.batch_size < 1 {
            return bad("batch_size", "must be at least 1");
        }
        if self.eval_batch_size < 1 {
            return bad("eval_batch_size", "must be at least 1");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs", "must be at least 1 (or set max_steps)");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("label_smoothing", "must be in [0, 1)");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be a non-negative number");
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", "must be a non-negative number (0 = off)");
        }
        self.optimizer.validate()?;
        Ok(())
    }

    /// Optimiser steps a run over `n` training examples takes.
    pub fn total_steps(&self, n: i64) -> usize {
        let per_epoch = ((n + self.batch_size - 1) / self.batch_size) as usize;
        let all = per_epoch * self.epochs.max(1);
        if self.max_steps > 0 { all.min(self.max_steps) } else { all }
    }
}

/// Examples with integer labels, held in memory.
#[derive(Debug)]
pub struct Split {
    /// Name (`train`, `test`, `ood:optdigits`, …).
    pub name: String,
    /// Inputs of every example.
    pub input: Input,
    /// Labels `[n]`, int64.
    pub labels: Tensor,
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Freezes the backbone (the head stays trainable), then lets each method, in
/// order, add its parameters and choose what else trains.
pub fn prepare(model: &Model, methods: &mut [Box<dyn Method>], seed: u64) -> Result<()> {
    tch::manual_seed(seed as i64);
    model.freeze_backbone();
    for m in methods.iter_mut() {
        m.prepare(model)?;
    }
    Ok(())
}

/// The name each method instance's variables go under in artifacts: the
/// method's name, and `name#k` for its `k`-th use in one strategy (k ≥ 2), so
/// two LoRA configurations on different sites keep apart.
pub fn instance_names(methods: &[Box<dyn Method>]) -> Vec<String> {
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    methods
        .iter()
        .map(|m| {
            let k = seen.entry(m.name()).or_default();
            *k += 1;
            if *k == 1 { m.name().to_string() } else { format!("{}#{k}", m.name()) }
        })
        .collect()
}

/// Every variable of every method (trainable parameters and persistent
/// state), named `instance/param` (the names artifacts use, see
/// [`instance_names`]), sorted within each method.
pub fn method_variables(methods: &[Box<dyn Method>]) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    for (m, instance) in methods.iter().zip(instance_names(methods)) {
        all.extend(own_variables(m.as_ref()).into_iter().map(|(n, t)| (format!("{instance}/{n}"), t)));
    }
    all
}

/// A method's own variables under their names in its store, sorted.
fn own_variables(m: &dyn Method) -> Vec<(String, Tensor)> {
    let mut own: Vec<_> = m.var_store().map(|vs| vs.variables()).unwrap_or_default().into_iter().collect();
    own.sort_by(|a, b| a.0.cmp(&b.0));
    own
}

/// Every parameter that trains: the model's, then each method's (named
/// `instance/param`), sorted within each group.
pub fn trainable(model: &Model, methods: &[Box<dyn Method>]) -> Vec<(String, Tensor)> {
    let mut all = model.trainable();
    all.extend(method_variables(methods).into_iter().filter(|(_, t)| t.requires_grad()));
    all
}

/// Every trainable parameter with its optimiser options: the model's take the
/// defaults, each method's are the method's [`Method::param_opts`].
fn trainable_with_options(model: &Model, methods: &[Box<dyn Method>]) -> Vec<(Tensor, ParamOpts)> {
    let mut all: Vec<_> = model.trainable().into_iter().map(|(_, t)| (t, ParamOpts::default())).collect();
    for m in methods {
        all.extend(own_variables(m.as_ref()).into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, t)| (t, m.param_opts(&n))));
    }
    all
}

/// What a run's artifact holds: every trainable tensor, every method's
/// persistent state (its variables without gradient: masks, indices), except
/// what serves training only ([`Method::training_only`]), plus the
/// buffers (BatchNorm running statistics) of layers whose parameters train,
/// since training changed those too.
pub fn artifact(model: &Model, methods: &[Box<dyn Method>]) -> Vec<(String, Tensor)> {
    let mut all = model.trainable();
    for (m, instance) in methods.iter().zip(instance_names(methods)) {
        let kept = own_variables(m.as_ref()).into_iter().filter(|(n, _)| !m.training_only(n));
        all.extend(kept.map(|(n, t)| (format!("{instance}/{n}"), t)));
    }
    let params = model.vs.variables();
    let mut buffers: Vec<(String, Tensor)> = params
        .iter()
        .filter(|(name, _)| crate::layers::is_buffer(name))
        .filter(|(name, _)| {
            let layer = &name[..name.rfind('.').unwrap_or(0)];
            params.get(&format!("{layer}.weight")).is_some_and(Tensor::requires_grad)
        })
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    all.extend(buffers);
    all
}

/// Loads an artifact written from [`artifact`] back into `model` and `methods`
/// (after [`prepare`]): the inverse of saving the trainable parameters. Every
/// tensor of the file must land somewhere with the right shape, except a
/// method's growable state: a variable without gradient that `prepare` made
/// with a first dimension of 0 (kNN's memory of training features, whose
/// length only fitting knows) takes the saved length, its other dimensions equal.
pub fn restore(model: &Model, methods: &[Box<dyn Method>], path: &std::path::Path) -> Result<usize> {
    let mut targets: std::collections::HashMap<String, Tensor> = model.vs.variables();
    targets.extend(method_variables(methods));
    let tensors = crate::weights::read_safetensors(path)?;
    let unknown: Vec<String> = tensors.iter().filter(|(n, _)| !targets.contains_key(n)).map(|(n, _)| n.clone()).collect();
    if !unknown.is_empty() {
        return Err(Error::CorruptFile { path: path.into(), reason: format!("tensors the model does not have: {}", unknown.join(", ")) });
    }
    // Every shape is checked before anything is copied: a bad file changes nothing.
    let growable = |t: &Tensor, v: &Tensor| !t.requires_grad() && t.size().first() == Some(&0) && t.size().get(1..) == v.size().get(1..);
    let misshapen: Vec<_> = tensors
        .iter()
        .filter(|(n, v)| targets[n].size() != v.size() && !(n.contains('/') && growable(&targets[n], v)))
        .map(|(n, v)| (n.clone(), targets[n].size(), v.size()))
        .collect();
    if !misshapen.is_empty() {
        return Err(Error::MisshapenWeights { path: path.into(), tensors: misshapen });
    }
    tch::no_grad(|| {
        for (name, value) in &tensors {
            let mut target = targets[name].shallow_clone();
            if target.size() == value.size() {
                target.copy_(&value.to_device(target.device()));
            } else {
                // Growable state: the variable itself takes the saved data, so its store sees the new length.
                target.set_data(&value.to_kind(target.kind()).to_device(target.device()));
            }
        }
    });
    Ok(tensors.len())
}

/// Whether the backbone's output cannot change during training, so pooled
/// features can be computed once and the head trained on them.
pub fn features_cacheable(model: &Model, methods: &[Box<dyn Method>]) -> bool {
    // A teacher runs on the real inputs, which cached features no longer are.
    // Cached features are pooled: a method that reads other taps, in training or in every pass, needs the backbone to run.
    let pooled_only = |taps: Vec<Tap>| taps.iter().all(|t| *t == Tap::Pooled);
    model.backbone_frozen()
        && teacher_taps(methods).is_none()
        && methods.iter().all(|m| !m.alters_forward() && pooled_only(m.taps()) && pooled_only(m.forward_taps()))
}

/// The first block training can change, when it is past the first: blocks
/// before it see only frozen weights and no method acts there, so their output
/// can be computed once per example and training resumed from it (partial-k,
/// LoRA or adapters on the top blocks only). `None` when block 0 can change,
/// when nothing in the blocks can, or when a method reads taps (they would come
/// from blocks that no longer run).
pub fn frozen_prefix(model: &Model, methods: &[Box<dyn Method>]) -> Option<usize> {
    if methods.iter().any(|m| !m.taps().is_empty() || !m.forward_taps().is_empty()) || teacher_taps(methods).is_some() {
        return None;
    }
    let blocks = model.backbone.num_blocks();
    let params = model.trainable().into_iter().filter_map(|(name, _)| match model.group(&name) {
        ParamGroup::Stem => Some(0),
        ParamGroup::Block(i) => Some(i),
        ParamGroup::Neck => Some(blocks),
        ParamGroup::Head => None,
    });
    let first = params.chain(methods.iter().filter_map(|m| m.first_block(model))).min()?;
    (first > 0 && first < blocks).then_some(first)
}

/// Runs the frozen blocks before `block` over `split` once (in evaluation
/// mode: no dropout in frozen layers) and returns the states entering `block`
/// as a split of [`Input::Hidden`] (on the CPU), or `None` if the input is not
/// tokens or the backbone cannot resume from a block. Padding does not change
/// real tokens' states, so batches are run at their own length.
pub fn cache_prefix(model: &Model, methods: &[Box<dyn Method>], split: &Split, block: usize, batch_size: i64, label: &str) -> Result<Option<Split>> {
    let Input::Tokens { ids, mask } = &split.input else { return Ok(None) };
    let cx = Ctx::new(false, methods, Vec::new());
    let width = ids.size()[1];
    let bar = progress_bar(split.len() as u64, &format!("{label}: blocks 0..{block} of {}", split.name));
    let mut resumable = true;
    // Batches come trimmed to their longest text; their states are zero-padded
    // back to the stored width so every example's line up.
    let states = tch::no_grad(|| {
        in_length_order(&split.input, batch_size, model.device(), |batch| {
            bar.inc(batch.len() as u64);
            match model.backbone.prefix(&cx, batch, block) {
                Some(Input::Hidden { states, .. }) => states.constant_pad_nd([0, 0, 0, width - states.size()[1]]),
                // A backbone that cannot resume cannot for any batch: this placeholder is dropped.
                _ => {
                    resumable = false;
                    Tensor::zeros([batch.len(), 0], (Kind::Float, Device::Cpu))
                }
            }
        })
    })?;
    bar.finish_and_clear();
    if !resumable {
        return Ok(None);
    }
    let input = Input::Hidden { block, states, mask: mask.shallow_clone() };
    Ok(Some(Split { name: split.name.clone(), input, labels: split.labels.shallow_clone() }))
}

/// Runs the frozen backbone over `split` once, computing in `compute`, and
/// returns its pooled features (fp32) as a split of `Input::Features` (held on
/// the CPU; batches move to the model's device).
pub fn cache_features(model: &Model, split: &Split, batch_size: i64, compute: Compute, label: &str) -> Result<Split> {
    let bar = progress_bar(split.len() as u64, &format!("{label}: features of {}", split.name));
    let weights = WeightCache::new();
    let cx = Ctx::plain(false).with_compute(compute).with_weight_cache(&weights);
    let features = tch::no_grad(|| {
        in_length_order(&split.input, batch_size, model.device(), |batch| {
            bar.inc(batch.len() as u64);
            model.features(&cx, batch)
        })
    })?;
    bar.finish_and_clear();
    Ok(Split { name: split.name.clone(), input: Input::Features(features), labels: split.labels.shallow_clone() })
}

/// Applies `f` to batches of `input` and concatenates the results in the
/// original order. Token inputs are batched shortest first, so each batch is
/// padded only to its own longest text: inference on short reviews then costs
/// about half as much as with random batches.
pub(crate) fn in_length_order(input: &Input, batch_size: i64, device: Device, mut f: impl FnMut(&Input) -> Tensor) -> Result<Tensor> {
    let n = input.len();
    let order = match input {
        Input::Tokens { mask, .. } | Input::Hidden { mask, .. } => mask.sum_dim_intlist(1, false, Kind::Int64).argsort(0, false),
        _ => Tensor::arange(n, (Kind::Int64, Device::Cpu)),
    };
    let mut chunks = Vec::new();
    let idx = batches(n, batch_size).map(|b| order.index_select(0, &b)).collect();
    for_each_batch(input, idx, None, |_, batch| {
        chunks.push(f(&batch.to_device(device)).to_device(Device::Cpu));
        Ok(true)
    })?;
    if chunks.is_empty() {
        return Err(Error::Data("nothing to run: the split is empty".into()));
    }
    // Row k of the concatenation belongs to example order[k]; undo the permutation.
    Ok(Tensor::cat(&chunks, 0).index_select(0, &order.argsort(0, false)))
}

/// How many batches of lazy examples are made ahead of the one in use.
const PREFETCH: usize = 2;

/// Calls `each(idx, batch)` for the batches `idx` of `input` in order, with
/// the batch on the CPU, until it returns `false`. Lazy inputs are made
/// [`PREFETCH`] batches ahead on another thread, so decoding and augmentation
/// overlap the model's work; `augment` seeds their augmentation.
fn for_each_batch(input: &Input, idx: Vec<Tensor>, augment: Option<u64>, mut each: impl FnMut(&Tensor, Input) -> Result<bool>) -> Result<()> {
    let Input::Lazy(source) = input else {
        for i in &idx {
            if !each(i, input.select(i, Device::Cpu)?)? {
                break;
            }
        }
        return Ok(());
    };
    let rows: Vec<Vec<i64>> = idx.iter().map(|i| Vec::<i64>::try_from(i).expect("int64 indices")).collect();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH);
        let source = source.clone();
        scope.spawn(move || {
            for r in &rows {
                // A closed channel means the consumer stopped early: stop too.
                if tx.send(source.batch(r, augment)).is_err() {
                    break;
                }
            }
        });
        // `rx` drops when this closure returns, which ends the producer before the scope joins it.
        for i in &idx {
            let batch = rx.recv().expect("the batch producer ends only after sending every batch")?;
            if !each(i, Input::Images(batch))? {
                break;
            }
        }
        Ok(())
    })
}

/// What a training run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainReport {
    /// Optimiser steps taken.
    pub steps: usize,
    /// Examples processed (with repeats over epochs).
    pub samples: u64,
    /// Wall time of the training loop, seconds, without per-epoch validation.
    pub seconds: f64,
    /// Wall time of the per-epoch validation passes, seconds.
    pub eval_seconds: f64,
    /// Mean task loss over the last epoch.
    pub final_loss: f64,
    /// Validation top-1 after each epoch, if a validation split was given.
    pub val_top1: Vec<f64>,
    /// Training seconds (without validation) at the end of each epoch, from
    /// the start of the run: with `val_top1`, the accuracy-against-time curve.
    pub epoch_seconds: Vec<f64>,
    /// What the training passes computed in.
    pub compute: Compute,
    /// The matmul probe, when `precision = "auto"` asked for it.
    pub probe: Option<Probe>,
    /// With a teacher: whether its outputs were computed once before the
    /// first step (`true`) or on every batch (`false`).
    pub teacher_cached: Option<bool>,
    /// Seconds spent computing the teacher's cached outputs (inside
    /// `seconds`); 0 when an earlier run with the same teacher and training
    /// split computed them.
    pub teacher_cache_seconds: f64,
    /// What each method chose or learnt ([`Method::summary`]), by instance name.
    pub summaries: std::collections::BTreeMap<String, toml::Table>,
}

impl TrainReport {
    /// Training throughput.
    pub fn samples_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.samples as f64 / self.seconds } else { 0.0 }
    }
}

/// Options of [`train`] that are not hyper-parameters.
#[derive(Clone, Default)]
pub struct TrainOptions<'a> {
    /// Shown on the progress bar.
    pub label: String,
    /// If set, the trainable parameters are saved here (atomically) after each epoch.
    pub checkpoint: Option<PathBuf>,
    /// The frozen model whose outputs come with each step, for methods that
    /// ask for one ([`Method::teacher_taps`]).
    pub teacher: Option<&'a Teacher>,
    /// Run the teacher on every batch even where its outputs could be
    /// computed once (to measure what the cache saves).
    pub no_teacher_cache: bool,
}

/// Trains the trainable parameters of `model` and `methods` on `train`
/// (call [`prepare`] first). The same seed on CPU repeats the run exactly.
pub fn train(
    model: &Model,
    methods: &mut [Box<dyn Method>],
    train: &Split,
    val: Option<&Split>,
    cfg: &TrainConfig,
    opts: &TrainOptions,
) -> Result<TrainReport> {
    cfg.validate()?;
    check_combination(methods, opts.teacher)?;
    // Every training pass of this run, on this thread, draws these masks.
    let _masks = cfg.dropout_masks.set();
    let device = model.device();
    // `auto`'s probe runs once per process, before the clock starts.
    let (compute, probe) = cfg.precision.resolve(device);
    let (eval_compute, _) = cfg.eval_precision.resolve(device);
    // Selection before training (SAFT's gradient passes, SNIP) is part of the
    // method's training cost, so the clock starts here.
    let start = Instant::now();
    let start_params = trainable(model, methods);
    let data = RunData { train, val, teacher: opts.teacher, params: &start_params };
    for m in methods.iter_mut() {
        m.before_train(model, &data, cfg)?;
    }
    let params = trainable_with_options(model, methods);
    let fits = methods.iter().any(|m| m.fits_features());
    if params.is_empty() && !fits {
        return Err(Error::Config("nothing to train: every parameter is frozen".into()));
    }
    // A strategy fitted only on features (NCM alone) takes no step: the
    // methods' fitting below is all its training, inside the clock.
    let total = if params.is_empty() { 0 } else { cfg.total_steps(train.len()) };
    let mut opt = Optimizer::with_options(cfg.optimizer.clone(), params, cfg.weight_decay);
    let warmup = (cfg.warmup_ratio * total as f64).round() as usize;
    let taps: Vec<Tap> = methods.iter().flat_map(|m| m.taps()).collect();
    let named_params = trainable(model, methods);
    let wanted_of_teacher = teacher_taps(methods);
    let mut teacher_cache = None;
    let mut report = TrainReport { compute, probe, ..Default::default() };
    if let (Some(teacher), Some(wanted)) = (opts.teacher, &wanted_of_teacher) {
        let teacher_input = teacher.train_input.as_ref().unwrap_or(&train.input);
        if teacher_input.len() != train.len() {
            return Err(Error::Data(format!("the teacher's copy of the training split has {} examples, the split {}", teacher_input.len(), train.len())));
        }
        if !opts.no_teacher_cache && TeacherCache::applies(teacher, teacher_input, wanted) {
            let t = Instant::now();
            if let Some((cache, computed)) = teacher.outputs_once(teacher_input, &train.labels, wanted, cfg.eval_batch_size)? {
                if computed {
                    report.teacher_cache_seconds = t.elapsed().as_secs_f64();
                }
                teacher_cache = Some(cache);
            }
        }
        report.teacher_cached = Some(teacher_cache.is_some());
    }
    let teacher_weights = WeightCache::new();
    // Frozen weights keep their bf16 copies for the whole run: nothing
    // writes them between here and the end of training.
    let weights = WeightCache::new();
    let bar = progress_bar(total as u64, &opts.label);
    tch::manual_seed(cfg.seed as i64);
    for epoch in 0..cfg.epochs.max(1) {
        if report.steps >= total {
            break;
        }
        let mut order = Tensor::randperm(train.len(), (Kind::Int64, Device::Cpu));
        if cfg.group_by_length {
            order = grouped_by_length(&train.input, &order, cfg.batch_size);
        }
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        let idx = batches(train.len(), cfg.batch_size).map(|b| order.index_select(0, &b)).collect();
        // Each epoch draws new augmentations, the same ones for the same seed.
        let augment = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch as u64);
        for_each_batch(&train.input, idx, Some(augment), |idx, input| {
            if report.steps >= total {
                return Ok(false);
            }
            let input = input.to_device(device);
            let labels = train.labels.index_select(0, idx).to_device(device);
            let (task, loss) = {
                let cx = Ctx::new(true, methods, taps.clone()).with_compute(compute).with_weight_cache(&weights);
                let logits = model.forward(&cx, &input);
                let task = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, cfg.label_smoothing);
                let teacher = match (&teacher_cache, opts.teacher, &wanted_of_teacher) {
                    (Some(cache), _, _) => Some(cache.select(idx, device)),
                    (None, Some(t), Some(wanted)) => Some(match &t.train_input {
                        Some(own) => t.run(&own.select(idx, device)?, wanted, &teacher_weights),
                        None => t.run(&input, wanted, &teacher_weights),
                    }),
                    _ => None,
                };
                let step = StepOutput { logits, labels, index: idx.shallow_clone(), taps: cx.take_taps(), teacher };
                let loss = methods.iter().filter_map(|m| m.extra_loss(&step)).fold(task.shallow_clone(), |a, b| a + b);
                (task, loss)
            };
            opt.zero_grad();
            loss.backward();
            let lr = cfg.lr * cfg.schedule.factor(report.steps, total, warmup);
            let step_cx = StepCx { model, step: report.steps + 1, total, lr, params: &named_params };
            for m in methods.iter_mut() {
                m.after_backward(&step_cx)?;
            }
            if cfg.grad_clip > 0.0 {
                opt.clip_grad_norm(cfg.grad_clip);
            }
            opt.step(lr);
            for m in methods.iter_mut() {
                m.after_step(&step_cx)?;
            }
            let (task_loss, total_loss) = (task.double_value(&[]), loss.double_value(&[]));
            if !total_loss.is_finite() {
                bar.abandon();
                return Err(Error::Diverged { step: report.steps, loss: total_loss });
            }
            loss_sum += task_loss;
            loss_n += 1;
            report.steps += 1;
            report.samples += idx.size()[0] as u64;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4}  {:.0} samples/s",
                loss_sum / loss_n as f64,
                report.samples as f64 / (start.elapsed().as_secs_f64() - report.eval_seconds)
            ));
            Ok(true)
        })?;
        report.final_loss = loss_sum / loss_n.max(1) as f64;
        report.epoch_seconds.push(start.elapsed().as_secs_f64() - report.eval_seconds);
        if let Some(val) = val {
            let t = Instant::now();
            report.val_top1.push(evaluate(model, methods, val, cfg.eval_batch_size, eval_compute)?.top1());
            report.eval_seconds += t.elapsed().as_secs_f64();
        }
        if let Some(path) = &opts.checkpoint {
            save_atomic(&artifact(model, methods), path)?;
        }
    }
    for m in methods.iter_mut() {
        m.after_train(model, &data)?;
    }
    if fits {
        let rows = fit_inputs(model, methods, &train.input, cfg.eval_batch_size)?;
        for (m, rows) in methods.iter_mut().filter(|m| m.fits_features()).zip(rows) {
            m.fit(&rows, &train.labels)?;
        }
    }
    report.seconds = start.elapsed().as_secs_f64() - report.eval_seconds;
    report.summaries = methods.iter().zip(instance_names(methods)).filter_map(|(m, name)| Some((name, m.summary()?))).collect();
    bar.finish_and_clear();
    Ok(report)
}

/// Refuses strategies whose methods cannot work together: a method that runs
/// the model alone beside one that alters the forward pass, or a method that
/// needs a teacher in a run without one.
fn check_combination(methods: &[Box<dyn Method>], teacher: Option<&Teacher>) -> Result<()> {
    if let Some(alone) = methods.iter().find(|m| m.forwards_model_alone())
        && let Some(other) = methods.iter().find(|m| m.alters_forward())
    {
        return Err(Error::Config(format!(
            "`{}` runs the model's forward pass without other methods' hooks, so it cannot be combined with `{}`, which alters that pass",
            alone.name(),
            other.name()
        )));
    }
    if teacher.is_none()
        && let Some(needs) = methods.iter().find(|m| m.teacher_taps().is_some())
    {
        return Err(Error::Config(format!("`{}` needs a teacher, and this run has none (give the experiment a [teacher])", needs.name())));
    }
    Ok(())
}

/// Logits (fp32) of every example of `input`, in order, without gradients,
/// computed in `compute` (frozen weights cast once for the whole call).
pub fn predict(model: &Model, methods: &[Box<dyn Method>], input: &Input, batch_size: i64, compute: Compute) -> Result<Tensor> {
    let weights = WeightCache::new();
    let cx = Ctx::new(false, methods, Vec::new()).with_compute(compute).with_weight_cache(&weights);
    tch::no_grad(|| in_length_order(input, batch_size, model.device(), |batch| model.forward(&cx, batch)))
}

/// Pooled features of `input` through the backbone as `methods` leave it, in
/// evaluation mode (what the head sees; another head can be applied to them).
///
/// # Shapes
/// `input` → `[n, hidden]`, on the CPU.
pub fn features(model: &Model, methods: &[Box<dyn Method>], input: &Input, batch_size: i64) -> Result<Tensor> {
    let cx = Ctx::new(false, methods, Vec::new());
    tch::no_grad(|| in_length_order(input, batch_size, model.device(), |batch| model.features(&cx, batch)))
}

/// What each method that [`Method::fits_features`] is fitted on, in
/// strategy order: the rows its [`Method::fit_input`] makes of every batch of
/// `input` (pooled features by default), in one pass through the backbone as
/// `methods` leave it, in evaluation mode, without gradients.
///
/// # Shapes
/// `input` → one `[n, d]` per fitting method, on the CPU.
pub fn fit_inputs(model: &Model, methods: &[Box<dyn Method>], input: &Input, batch_size: i64) -> Result<Vec<Tensor>> {
    let cx = Ctx::new(false, methods, Vec::new());
    let fitting: Vec<&dyn Method> = methods.iter().filter(|m| m.fits_features()).map(|m| m.as_ref()).collect();
    let mut widths = Vec::new();
    let all = tch::no_grad(|| {
        in_length_order(input, batch_size, model.device(), |batch| {
            let pooled = model.features(&cx, batch);
            let taps = cx.take_taps();
            let rows: Vec<Tensor> = fitting.iter().map(|m| m.fit_input(&pooled, &taps).to_kind(Kind::Float)).collect();
            widths = rows.iter().map(|r| r.size()[1]).collect();
            Tensor::cat(&rows, 1)
        })
    })?;
    Ok(if fitting.len() == 1 { vec![all] } else { all.split_with_sizes(widths.as_slice(), 1).iter().map(Tensor::contiguous).collect() })
}

/// Top-1 / top-5 accuracy on `split`, computed in `compute`.
pub fn evaluate(model: &Model, methods: &[Box<dyn Method>], split: &Split, batch_size: i64, compute: Compute) -> Result<Accuracy> {
    Ok(Accuracy::from_logits(&predict(model, methods, &split.input, batch_size, compute)?, &split.labels))
}

/// Batches per mega-batch of [`TrainConfig::group_by_length`] (Hugging Face's `LengthGroupedSampler` uses 50).
const MEGA_BATCH: i64 = 50;

/// `order` with each run of [`MEGA_BATCH`] batches sorted by text length,
/// longest first; the mega-batch holding the longest text goes first, so a
/// run that runs out of memory does so at once. Inputs without a mask keep
/// their order.
pub fn grouped_by_length(input: &Input, order: &Tensor, batch_size: i64) -> Tensor {
    let (Input::Tokens { mask, .. } | Input::Hidden { mask, .. }) = input else { return order.shallow_clone() };
    let lengths = mask.sum_dim_intlist(1, false, Kind::Int64).index_select(0, order);
    let mega = (MEGA_BATCH * batch_size).max(1);
    let mut groups: Vec<(i64, Tensor)> = (0..order.size()[0])
        .step_by(mega as usize)
        .map(|start| {
            let len = mega.min(order.size()[0] - start);
            let (sorted, by_length) = lengths.narrow(0, start, len).sort_stable(true, 0, true);
            (sorted.int64_value(&[0]), order.narrow(0, start, len).index_select(0, &by_length))
        })
        .collect();
    if let Some(longest) = (0..groups.len()).max_by_key(|&i| (groups[i].0, std::cmp::Reverse(i))) {
        groups.swap(0, longest);
    }
    Tensor::cat(&groups.into_iter().map(|(_, g)| g).collect::<Vec<_>>(), 0)
}

/// Consecutive index batches `[0, b), [b, 2b), …` over `n` examples.
pub fn batches(n: i64, batch_size: i64) -> impl Iterator<Item = Tensor> {
    (0..n).step_by(batch_size.max(1) as usize).map(move |s| Tensor::arange_start(s, (s + batch_size).min(n), (Kind::Int64, Device::Cpu)))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouping by length permutes the shuffled order only within mega-batches
    /// of 50 batches, each sorted longest first, the longest text's group first.
    #[test]
    fn group_by_length_sorts_within_mega_batches() {
        let n = 230;
        // Length of example i: (7 i) mod 13 + 1, over 16 tokens.
        let lengths: Vec<i64> = (0..n).map(|i| (7 * i) % 13 + 1).collect();
        let mask = Tensor::arange(16, (Kind::Int64, Device::Cpu)).unsqueeze(0).lt_tensor(&Tensor::from_slice(&lengths).unsqueeze(1)).to_kind(Kind::Int64);
        let input = Input::Tokens { ids: mask.ones_like(), mask };
        let order = Tensor::from_slice(&(0..n).rev().collect::<Vec<i64>>());
        // Batches of 2: mega-batches of 100, 100 and 30 examples.
        let grouped = Vec::<i64>::try_from(grouped_by_length(&input, &order, 2)).unwrap();
        let mut sorted = grouped.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation of the examples");
        let original = Vec::<i64>::try_from(&order).unwrap();
        let sizes = [100, 100, 30];
        let mut groups: Vec<Vec<i64>> = Vec::new();
        let mut at = 0;
        for size in sizes {
            groups.push(grouped[at..at + size].to_vec());
            at += size;
        }
        for g in &groups {
            let l: Vec<i64> = g.iter().map(|&i| lengths[i as usize]).collect();
            assert!(l.windows(2).all(|w| w[0] >= w[1]), "sorted longest first: {l:?}");
        }
        // Every group is one of the original mega-batches (the first has the longest text: 13 tokens).
        let mega: Vec<Vec<i64>> = sizes
            .iter()
            .scan(0, |at, &s| {
                *at += s;
                Some(original[*at - s..*at].to_vec())
            })
            .collect();
        for g in &groups {
            let mut g = g.clone();
            g.sort();
            assert!(mega.iter().any(|m| {
                let mut m = m.clone();
                m.sort();
                m == g
            }));
        }
        assert_eq!(lengths[groups[0][0] as usize], 13);
        // Inputs without a mask keep their order.
        let images = Input::Images(Tensor::zeros([4, 1], (Kind::Float, Device::Cpu)));
        let o = Tensor::from_slice(&[2i64, 0, 3, 1]);
        assert!(grouped_by_length(&images, &o, 2).equal(&o));
    }
}
