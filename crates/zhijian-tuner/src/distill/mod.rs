//! Knowledge-distillation losses: each a function of the student's and the
//! teacher's outputs on one batch, one file each, with the weight the
//! reference suites use (RepDistiller, torchdistill; see `shared/METHODS.md`).
//!
//! Every loss but [`distill_token`] is a [`DistillLoss`] run by the one
//! [`Distiller`] method, which does what they share:
//!
//! - **Which features.** A feature loss reads one tap on each side, chosen by
//!   its `student` and `teacher` fields ([`Feature`]): `"pooled"` (what the
//!   head sees), `"last"` (the last block's output) or a block index (negative
//!   counts from the end). Student and teacher may differ in depth, so each
//!   side is resolved against its own network. Logit losses (`kd_logits`,
//!   `dist`) read the logits, and need as many teacher classes as student classes.
//! - **Matching shapes** ([`Form`]): a block's output is a vector per example
//!   (`[b, d]`, MLPs), a token sequence (`[b, tokens, d]`, BERT, ViT) or a
//!   feature map (`[b, c, h, w]`, CNNs); widths always may differ.
//!   - Losses over per-example vectors (SP, RKD, PKT, CC, CRD) take vectors as
//!     they are, flatten maps (the reference's `view(b, -1)`), and read a token
//!     sequence's first token (ViT's class token, BERT's `[CLS]`): the mean over
//!     tokens would mix padding into BERT's (the taps carry no mask).
//!   - Losses over positions (AT, NST, factor transfer; FitNet and VID on block
//!     outputs) need the same form on both sides. Maps of different sizes are
//!     brought to the smaller one by adaptive average pooling, as RepDistiller
//!     does; token sequences are compared position by position only when their
//!     lengths match (same tokenizer or patch grid, no tokens inserted on one
//!     side only), and otherwise the first step fails with an error that says
//!     so and suggests `"pooled"`. AT, NST and factor transfer refuse vectors
//!     outright: over one position their maps are constant.
//! - **Learned parts** (FitNet's regressor, CC's and CRD's embeddings, CRD's
//!   memory banks, VID's regressor and variances, factor transfer's paraphraser
//!   and translator) depend on the teacher's widths, so they are made in
//!   `before_train`, after one no-gradient pass of two training examples
//!   through each network shows the tapped shapes. They live in the method's
//!   own store and train with the run's optimiser; every one of them is
//!   training-only, so the artifact holds none of them and a distilled student
//!   runs alone.
//! - **Precision and devices**: features are read in fp32 and the teacher's
//!   moved to the student's device.
//!
//! The losses read whatever the strategy lets train: combine them with a method
//! that unfreezes the student (`full_finetune`, `lora`, …); alone, only the
//! head learns from logit losses, and feature losses train only their own parts.

use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::train::{ParamOpts, TrainConfig};
use zhijian_core::{Ctx, Error, Method, Model, Result, RunData, StepCx, StepOutput, Tap, Teacher, WeightCache, config_table};

pub mod at;
pub mod cc;
pub mod crd;
pub mod dist;
pub mod distill_token;
pub mod factor_transfer;
pub mod fitnet;
pub mod kd_logits;
pub mod nst;
pub mod pkt;
pub mod rkd;
pub mod sp;
pub mod vid;

pub use at::{At, AtConfig};
pub use cc::{Cc, CcConfig};
pub use crd::{Crd, CrdConfig};
pub use dist::{Dist, DistConfig};
pub use distill_token::{DistillToken, DistillTokenConfig};
pub use factor_transfer::{FactorTransfer, FactorTransferConfig};
pub use fitnet::{FitNet, FitNetConfig};
pub use kd_logits::{KdLogits, KdLogitsConfig};
pub use nst::{Nst, NstConfig};
pub use pkt::{Pkt, PktConfig};
pub use rkd::{Rkd, RkdConfig};
pub use sp::{Sp, SpConfig};
pub use vid::{Vid, VidConfig};

/// Which output of a network a feature loss reads. In TOML: `"pooled"`,
/// `"last"`, or a block index (`2`; `-1` is the last block, `-2` the one before).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FeatureRepr", into = "FeatureRepr")]
pub enum Feature {
    /// The pooled features the head sees, `[b, hidden]`.
    Pooled,
    /// The last block's output.
    Last,
    /// Block `i`'s output (0-based; negative counts from the end).
    Block(i64),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum FeatureRepr {
    Index(i64),
    Name(String),
}

impl TryFrom<FeatureRepr> for Feature {
    type Error = String;

    fn try_from(r: FeatureRepr) -> std::result::Result<Feature, String> {
        match r {
            FeatureRepr::Index(i) => Ok(Feature::Block(i)),
            FeatureRepr::Name(n) if n == "pooled" => Ok(Feature::Pooled),
            FeatureRepr::Name(n) if n == "last" => Ok(Feature::Last),
            FeatureRepr::Name(n) => Err(format!("unknown feature `{n}`: expected \"pooled\", \"last\" or a block index")),
        }
    }
}

impl From<Feature> for FeatureRepr {
    fn from(f: Feature) -> FeatureRepr {
        match f {
            Feature::Pooled => FeatureRepr::Name("pooled".into()),
            Feature::Last => FeatureRepr::Name("last".into()),
            Feature::Block(i) => FeatureRepr::Index(i),
        }
    }
}

impl Feature {
    /// The tap of a network with `blocks` blocks (of architecture `arch`)
    /// that this feature names; `side` (`student`, `teacher`) names the field
    /// in errors.
    pub fn tap(self, blocks: usize, side: &str, arch: &str) -> std::result::Result<Tap, String> {
        let n = blocks as i64;
        let i = match self {
            Feature::Pooled => return Ok(Tap::Pooled),
            Feature::Last => n - 1,
            Feature::Block(i) if i < 0 => n + i,
            Feature::Block(i) => i,
        };
        if (0..n).contains(&i) { Ok(Tap::Block(i as usize)) } else { Err(format!("{side} = {self:?} names no block: the {side} ({arch}) has {n} blocks")) }
    }
}

/// What one example's tapped feature is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `[b, d]`: pooled features, MLP blocks.
    Vector,
    /// `[b, tokens, d]`: transformer blocks.
    Tokens,
    /// `[b, c, h, w]`: CNN blocks.
    Map,
}

impl Form {
    /// The form of a feature of shape `shape` (batch first).
    pub fn of(shape: &[i64]) -> std::result::Result<Form, String> {
        match shape.len() {
            2 => Ok(Form::Vector),
            3 => Ok(Form::Tokens),
            4 => Ok(Form::Map),
            _ => Err(format!("a tapped feature of shape {shape:?} is neither [b, d], [b, tokens, d] nor [b, c, h, w]")),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Form::Vector => "a vector per example",
            Form::Tokens => "a token sequence",
            Form::Map => "a feature map",
        }
    }

    /// `p` (`[c]`) shaped to broadcast over a feature of this form's channel axis.
    pub fn per_channel(self, p: &Tensor) -> Tensor {
        match self {
            Form::Vector => p.view([1, -1]),
            Form::Tokens => p.view([1, 1, -1]),
            Form::Map => p.view([1, -1, 1, 1]),
        }
    }

    /// The number of channels of a feature of this form with shape `shape`.
    pub fn channels(self, shape: &[i64]) -> i64 {
        match self {
            Form::Map => shape[1],
            Form::Vector | Form::Tokens => shape[shape.len() - 1],
        }
    }
}

/// One vector per example: vectors as they are, token sequences their first
/// token, maps flattened.
///
/// # Shapes
/// `[b, d]`, `[b, t, d]` or `[b, c, h, w]` → `[b, d]`, `[b, d]`, `[b, c·h·w]`.
pub fn per_sample(x: &Tensor) -> Tensor {
    match x.dim() {
        3 => x.select(1, 0),
        2 => x.shallow_clone(),
        _ => x.flatten(1, -1),
    }
}

/// The width of [`per_sample`] for a feature of shape `shape`.
pub fn per_sample_width(shape: &[i64]) -> i64 {
    match shape.len() {
        4 => shape[1] * shape[2] * shape[3],
        _ => *shape.last().unwrap_or(&0),
    }
}

/// Brings two features of the same form to the same positions: maps of
/// different sizes both to the smaller height and width (adaptive average
/// pooling); token sequences must have the same length.
pub fn align(s: &Tensor, t: &Tensor) -> std::result::Result<(Tensor, Tensor), String> {
    let (ss, ts) = (s.size(), t.size());
    match (ss.len(), ts.len()) {
        (4, 4) => {
            let (h, w) = (ss[2].min(ts[2]), ss[3].min(ts[3]));
            let pool = |x: &Tensor, size: &[i64]| if size[2] == h && size[3] == w { x.shallow_clone() } else { x.adaptive_avg_pool2d([h, w]) };
            Ok((pool(s, &ss), pool(t, &ts)))
        }
        (3, 3) if ss[1] != ts[1] => Err(format!(
            "the student's token sequence has {} tokens and the teacher's {}: positions can be compared only between sequences of one length \
             (same tokenizer or patch grid, no tokens inserted on one side); use student = \"pooled\" and teacher = \"pooled\"",
            ss[1], ts[1]
        )),
        (a, b) if a == b => Ok((s.shallow_clone(), t.shallow_clone())),
        _ => Err(format!("the student's feature {ss:?} and the teacher's {ts:?} are of different forms")),
    }
}

/// Channels first, positions flattened: `[b, c, positions]` (a vector is one position).
pub fn by_position(x: &Tensor) -> Tensor {
    match x.dim() {
        2 => x.unsqueeze(2),
        3 => x.transpose(1, 2),
        _ => x.flatten(2, -1),
    }
}

/// Rows scaled to unit L2 norm (`F.normalize`: divided by `max(‖x‖, 1e-12)`) along `dim`.
pub fn normalize(x: &Tensor, dim: i64) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12);
    x / norm
}

/// Refuses forms a loss over positions cannot use: vectors (one position) and
/// a student and teacher of different forms.
pub fn need_positions(s: Form, t: Form) -> std::result::Result<(), String> {
    if s == Form::Vector || t == Form::Vector {
        return Err(format!(
            "compares features position by position, and the {} feature is one vector per example; choose a block output \
             (student = \"last\", teacher = \"last\") of a CNN or transformer",
            if s == Form::Vector { "student's" } else { "teacher's" }
        ));
    }
    need_same_form(s, t)
}

/// Refuses a student and teacher of different forms (a map against tokens).
pub fn need_same_form(s: Form, t: Form) -> std::result::Result<(), String> {
    if s != t {
        return Err(format!(
            "the student's feature is {} and the teacher's {}: choose features of one form (student = \"pooled\", teacher = \"pooled\")",
            s.describe(),
            t.describe()
        ));
    }
    Ok(())
}

/// The activation after a layer of a [`Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `max(x, 0.1·x)` (factor transfer's paraphraser and translator).
    Leaky,
}

/// One layer of a [`Stack`].
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    /// Input channels.
    pub c_in: i64,
    /// Output channels.
    pub c_out: i64,
    /// Kernel size on maps (odd; padded to keep the size); 1 on vectors and tokens, always.
    pub kernel: i64,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Whether batch normalisation (batch statistics, learned scale and
    /// shift) follows the layer: the parts run in training only, where
    /// PyTorch's BatchNorm uses batch statistics too.
    pub batch_norm: bool,
    /// Activation last.
    pub act: Act,
}

struct Layer {
    w: Tensor,
    b: Option<Tensor>,
    bn: Option<(Tensor, Tensor)>,
    act: Act,
    pad: i64,
}

/// A stack of per-channel layers over a feature of one [`Form`]: convolutions
/// on maps, linear maps (per token) on vectors and token sequences. The
/// projection builder of the learned parts.
pub struct Stack {
    form: Form,
    layers: Vec<Layer>,
}

impl Stack {
    /// An empty stack for features of `form`.
    pub fn new(form: Form) -> Stack {
        Stack { form, layers: Vec::new() }
    }

    /// Adds a layer with PyTorch's default initialisation (weights and bias
    /// uniform in ±1/√fan_in) under `p / name`.
    pub fn push(mut self, p: &tch::nn::Path, name: &str, spec: LayerSpec) -> Stack {
        let k = if self.form == Form::Map { spec.kernel } else { 1 };
        let dims: Vec<i64> = if self.form == Form::Map { vec![spec.c_out, spec.c_in, k, k] } else { vec![spec.c_out, spec.c_in] };
        let bound = 1.0 / ((spec.c_in * k * k) as f64).sqrt();
        let q = p / name;
        let w = q.var("weight", &dims, Init::Uniform { lo: -bound, up: bound });
        let b = spec.bias.then(|| q.var("bias", &[spec.c_out], Init::Uniform { lo: -bound, up: bound }));
        let bn = spec.batch_norm.then(|| {
            let q = &q / "bn";
            (q.ones("weight", &[spec.c_out]), q.zeros("bias", &[spec.c_out]))
        });
        self.layers.push(Layer { w, b, bn, act: spec.act, pad: k / 2 });
        self
    }

    /// Runs the stack.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for l in &self.layers {
            x = match self.form {
                Form::Map => x.conv2d(&l.w, l.b.as_ref(), [1, 1], [l.pad, l.pad], [1, 1], 1),
                Form::Vector | Form::Tokens => x.linear(&l.w, l.b.as_ref()),
            };
            if let Some((gamma, beta)) = &l.bn {
                let dims: &[i64] = match self.form {
                    Form::Map => &[0, 2, 3],
                    Form::Tokens => &[0, 1],
                    Form::Vector => &[0],
                };
                let mean = x.mean_dim(dims, true, Kind::Float);
                let var = (&x - &mean).square().mean_dim(dims, true, Kind::Float);
                x = (&x - &mean) / (var + 1e-5).sqrt() * self.form.per_channel(gamma) + self.form.per_channel(beta);
            }
            x = match l.act {
                Act::Identity => x,
                Act::Relu => x.relu(),
                Act::Leaky => x.maximum(&(&x * 0.1)),
            };
        }
        x
    }
}

/// A linear embedding (with bias) of per-example features of width `c_in`
/// into `dim` dimensions, under `root / name` (CC's and CRD's embeddings).
pub fn linear_embed(root: &tch::nn::Path, name: &str, c_in: i64, dim: i64) -> Stack {
    Stack::new(Form::Vector).push(root, name, LayerSpec { c_in, c_out: dim, kernel: 1, bias: true, batch_norm: false, act: Act::Identity })
}

/// What a loss may look at when it makes its learned parts, in `before_train`.
pub struct Setup<'a> {
    /// The student.
    pub model: &'a Model,
    /// The teacher.
    pub teacher: &'a Teacher,
    /// The run's data.
    pub data: &'a RunData<'a>,
    /// The run's training settings.
    pub cfg: &'a TrainConfig,
    /// The student's tap and the shape it had on two training examples (feature losses).
    pub student: Option<(Tap, Vec<i64>)>,
    /// The teacher's tap and its shape on the same examples (feature losses).
    pub teacher_tap: Option<(Tap, Vec<i64>)>,
}

impl Setup<'_> {
    /// The shapes of the student's and the teacher's features (feature losses only).
    pub fn shapes(&self) -> (&[i64], &[i64]) {
        match (&self.student, &self.teacher_tap) {
            (Some((_, s)), Some((_, t))) => (s, t),
            _ => (&[], &[]),
        }
    }

    /// The forms of the student's and the teacher's features (feature losses only).
    pub fn forms(&self) -> std::result::Result<(Form, Form), String> {
        let (s, t) = self.shapes();
        Ok((Form::of(s)?, Form::of(t)?))
    }
}

/// A distillation loss run by [`Distiller`]: the math and its learned parts.
pub trait DistillLoss: Send + Sized + 'static {
    /// Registered name.
    const NAME: &'static str;
    /// The configuration (serde, `deny_unknown_fields`, defaults on every field).
    type Config: Serialize + DeserializeOwned + Clone;

    /// The loss with `config`, refusing out-of-range values (naming the field).
    fn new(config: Self::Config) -> Result<Self>;

    /// Its configuration.
    fn config(&self) -> &Self::Config;

    /// The loss's weight β in the total loss (the task's cross-entropy weighs 1).
    fn weight(&self) -> f64;

    /// The student's and the teacher's feature; `None`: the logits.
    fn features(&self) -> Option<(Feature, Feature)>;

    /// Refuses features of forms the loss cannot compare.
    fn check(&self, _student: Form, _teacher: Form) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Makes the learned parts in `vs` (and pre-trains what must be).
    fn build(&mut self, _setup: &Setup, _vs: &VarStore) -> Result<()> {
        Ok(())
    }

    /// The unweighted loss on one batch: `s` the student's feature (or
    /// logits), `t` the teacher's (fp32, no gradient, on the student's
    /// device). An `Err` stops the run after this step with the message.
    fn loss(&self, s: &Tensor, t: &Tensor, step: &StepOutput) -> std::result::Result<Tensor, String>;

    /// Optimiser options of the learned parameter `name`.
    fn param_opts(&self, _name: &str) -> ParamOpts {
        ParamOpts::default()
    }

    /// What the loss's preparation found, for the run's record.
    fn summary(&self) -> Option<toml::Table> {
        None
    }
}

/// A distillation method: a [`DistillLoss`] with the teacher, the taps and
/// the learned parts wired to the engine.
pub struct Distiller<L: DistillLoss> {
    loss: L,
    student: Option<Tap>,
    teacher: Option<Tap>,
    vs: Option<VarStore>,
    /// An error met in `extra_loss` (which cannot return one), returned by
    /// the next `after_backward`.
    failure: Mutex<Option<String>>,
}

impl<L: DistillLoss> Distiller<L> {
    /// The method with `config`.
    pub fn new(config: L::Config) -> Result<Self> {
        Ok(Distiller { loss: L::new(config)?, student: None, teacher: None, vs: None, failure: Mutex::new(None) })
    }

    /// The loss.
    pub fn loss(&self) -> &L {
        &self.loss
    }

    fn bad(message: impl Into<String>) -> Error {
        Error::MethodConfig { method: L::NAME.into(), message: message.into() }
    }
}

/// Runs two training examples through the student (no methods, evaluation
/// mode) and the teacher and returns the shapes of `student` and `teacher`.
fn probe(model: &Model, teacher: &Teacher, data: &RunData, student: &Tap, teacher_tap: &Tap) -> std::result::Result<(Vec<i64>, Vec<i64>), String> {
    let n = data.train.len().min(2);
    if n == 0 {
        return Err("the training split is empty".into());
    }
    let idx = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu));
    let input = data.train.input.select(&idx, model.device()).map_err(|e| e.to_string())?;
    let cx = Ctx::new(false, &[], vec![student.clone()]);
    let _ = tch::no_grad(|| model.forward(&cx, &input));
    let s = cx.take_taps().remove(student).ok_or_else(|| format!("the student ({}) gives no {student:?} on its input", model.backbone.arch()))?;
    let t_input = teacher.train_input.as_ref().unwrap_or(&data.train.input).select(&idx, teacher.model.device()).map_err(|e| e.to_string())?;
    let out = teacher.run(&t_input, std::slice::from_ref(teacher_tap), &WeightCache::new());
    let t = out.taps.get(teacher_tap).ok_or_else(|| format!("the teacher ({}) gives no {teacher_tap:?} on its input", teacher.model.backbone.arch()))?;
    Ok((s.size(), t.size()))
}

impl<L: DistillLoss> Method for Distiller<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn config(&self) -> toml::Table {
        config_table(self.loss.config())
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        if let Some((s, _)) = self.loss.features() {
            self.student = Some(s.tap(model.backbone.num_blocks(), "student", model.backbone.arch()).map_err(Self::bad)?);
        }
        Ok(())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let teacher = data.teacher.ok_or_else(|| Self::bad("needs a teacher, and this run has none (give the experiment a [teacher])"))?;
        let (mut student, mut teacher_tap) = (None, None);
        match (self.loss.features(), &self.student) {
            (Some((_, t)), Some(s)) => {
                let tb = &teacher.model.backbone;
                let t = t.tap(tb.num_blocks(), "teacher", tb.arch()).map_err(Self::bad)?;
                let (s_shape, t_shape) = probe(model, teacher, data, s, &t).map_err(Self::bad)?;
                let forms = (Form::of(&s_shape).map_err(Self::bad)?, Form::of(&t_shape).map_err(Self::bad)?);
                self.loss.check(forms.0, forms.1).map_err(Self::bad)?;
                student = Some((s.clone(), s_shape));
                teacher_tap = Some((t.clone(), t_shape));
                self.teacher = Some(t);
            }
            (Some(_), None) => return Err(Self::bad("before_train before prepare")),
            (None, _) => {
                let (s, t) = (model.num_classes(), teacher.num_classes());
                if s != t {
                    return Err(Self::bad(format!("compares logits class by class, and the student has {s} classes, the teacher {t}")));
                }
            }
        }
        let vs = VarStore::new(model.device());
        let setup = Setup { model, teacher, data, cfg, student, teacher_tap };
        self.loss.build(&setup, &vs)?;
        self.vs = Some(vs);
        *self.failure.lock().expect("not poisoned") = None;
        Ok(())
    }

    fn taps(&self) -> Vec<Tap> {
        self.student.iter().cloned().collect()
    }

    fn teacher_taps(&self) -> Option<Vec<Tap>> {
        Some(self.teacher.iter().cloned().collect())
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        let teacher = step.teacher.as_ref()?;
        let pair = match (&self.student, &self.teacher) {
            (Some(s), Some(t)) => match (step.taps.get(s), teacher.taps.get(t)) {
                (Some(s), Some(t)) => Ok((s, t)),
                _ => Err(format!("the step lacks the student's {s:?} or the teacher's {t:?}")),
            },
            (None, None) if self.loss.features().is_none() => Ok((&step.logits, &teacher.logits)),
            _ => Err("the loss was not prepared: call before_train with the teacher".to_string()),
        };
        let loss = pair.and_then(|(s, t)| {
            let s = s.to_kind(Kind::Float);
            let t = t.to_kind(Kind::Float).to_device(s.device()).detach();
            self.loss.loss(&s, &t, step)
        });
        match loss {
            Ok(l) => Some(l * self.loss.weight()),
            Err(message) => {
                self.failure.lock().expect("not poisoned").get_or_insert(message);
                None
            }
        }
    }

    fn after_backward(&mut self, _cx: &StepCx) -> Result<()> {
        match self.failure.lock().expect("not poisoned").take() {
            Some(message) => Err(Self::bad(message)),
            None => Ok(()),
        }
    }

    fn param_opts(&self, name: &str) -> ParamOpts {
        self.loss.param_opts(name)
    }

    fn summary(&self) -> Option<toml::Table> {
        self.loss.summary()
    }

    fn training_only(&self, _name: &str) -> bool {
        true
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref().filter(|vs| !vs.variables().is_empty())
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut().filter(|vs| !vs.variables().is_empty())
    }
}

/// Rejects a weight that is negative or not finite.
pub(crate) fn check_weight(method: &str, field: &str, value: f64) -> Result<()> {
    if value >= 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::MethodConfig { method: method.into(), message: format!("{field} must be a non-negative number, got {value}") })
    }
}

/// Rejects a value that is not a positive number.
pub(crate) fn check_positive(method: &str, field: &str, value: f64) -> Result<()> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::MethodConfig { method: method.into(), message: format!("{field} must be a positive number, got {value}") })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Toy students, teachers and batches for the distillation tests.

    use std::collections::BTreeMap;

    use tch::{Device, Kind, Tensor};
    use zhijian_backbones::{Bert, BertConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig};
    use zhijian_core::train::{self, TrainConfig, TrainOptions};
    use zhijian_core::{Input, Method, Model, Split, StepOutput, Teacher, TeacherOutput};

    /// A small CNN on 16 px images with these stage widths, 3 classes.
    pub fn cnn(seed: i64, channels: &[i64]) -> Model {
        tch::manual_seed(seed);
        let config = SmallCnnConfig { image_size: 16, in_chans: 3, channels: channels.to_vec() };
        Model::new(Device::Cpu, 3, |p| Box::new(SmallCnn::new(p, &config).unwrap()))
    }

    /// A 2-block ViT on 16 px images of width `width` and patch size `patch`, 3 classes.
    pub fn vit(seed: i64, width: i64, patch: i64) -> Model {
        tch::manual_seed(seed);
        let config = VitConfig { img_size: 16, patch_size: patch, embed_dim: width, depth: 2, num_heads: 2, dropout: 0.0, ..VitConfig::tiny_patch4_32() };
        Model::new(Device::Cpu, 3, |p| Box::new(Vit::new(p, &config).unwrap()))
    }

    /// A BERT with `layers` layers of width `width` (vocabulary 50), 3 classes, no dropout.
    pub fn bert(seed: i64, width: i64, layers: usize) -> Model {
        tch::manual_seed(seed);
        let config = BertConfig {
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            vocab_size: 50,
            hidden_size: width,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 2 * width,
            max_position_embeddings: 16,
            ..BertConfig::minilm_l6()
        };
        Model::new(Device::Cpu, 3, |p| Box::new(Bert::new(p, &config).unwrap()))
    }

    /// `model` as a frozen teacher.
    pub fn teacher(model: Model) -> Teacher {
        Teacher::new(model, vec![], "toy")
    }

    /// 12 random 16 px images with labels 0‥3.
    pub fn images(seed: i64) -> Split {
        tch::manual_seed(seed);
        let x = Tensor::randn([12, 3, 16, 16], (Kind::Float, Device::Cpu));
        Split { name: "train".into(), input: Input::Images(x), labels: Tensor::arange(12, (Kind::Int64, Device::Cpu)).remainder(3) }
    }

    /// 12 random sequences of 6 tokens (the first 3 padded after 4), labels 0‥3.
    pub fn tokens(seed: i64) -> Split {
        tch::manual_seed(seed);
        let ids = Tensor::randint_low(1, 50, [12, 6], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([12, 6], (Kind::Int64, Device::Cpu));
        let _ = mask.narrow(0, 0, 3).narrow(1, 4, 2).fill_(0);
        Split { name: "train".into(), input: Input::Tokens { ids, mask }, labels: Tensor::arange(12, (Kind::Int64, Device::Cpu)).remainder(3) }
    }

    /// A training step's output with these logits and teacher logits (for logit losses).
    pub fn logit_step(s: &Tensor, t: &Tensor) -> StepOutput {
        let b = s.size()[0];
        StepOutput {
            logits: s.shallow_clone(),
            labels: Tensor::zeros([b], (Kind::Int64, Device::Cpu)),
            index: Tensor::arange(b, (Kind::Int64, Device::Cpu)),
            taps: BTreeMap::new(),
            teacher: Some(TeacherOutput { logits: t.shallow_clone(), taps: BTreeMap::new() }),
        }
    }

    /// A tensor of `shape` from `values` (row-major).
    pub fn t(values: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).to_kind(Kind::Float).view(shape)
    }

    /// The scalar value of `x`.
    pub fn value(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    /// Asserts `got` (computed in fp32) is within a relative 1e-4 of `want`, or an absolute 1e-5 near zero.
    pub fn close(got: f64, want: f64) {
        assert!((got - want).abs() <= 1e-4 * want.abs().max(0.1), "got {got}, want {want}");
    }

    /// Trains `method` for 2 steps (batch 4) on `split` with `teacher`, the
    /// student's every parameter trainable; checks that the run ends with a
    /// finite loss and the student's backbone moved, and that the method's
    /// loss alone then sends a gradient into it; returns the method.
    pub fn train_two_steps(student: &Model, teacher: &Teacher, split: &Split, method: Box<dyn Method>) -> Box<dyn Method> {
        let name = method.name();
        let mut methods = vec![method];
        train::prepare(student, &mut methods, 0).unwrap();
        student.unfreeze_where(|_, _| true);
        let before: Vec<(String, Tensor)> = student.trainable().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        let cfg = TrainConfig { epochs: 1, max_steps: 2, batch_size: 4, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        let opts = TrainOptions { teacher: Some(teacher), ..Default::default() };
        let report = train::train(student, &mut methods, split, None, &cfg, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.steps, 2, "{name}");
        assert!(report.final_loss.is_finite(), "{name}");
        let now = student.vs.variables();
        assert!(before.iter().any(|(n, t)| !n.starts_with("head") && !now[n].equal(t)), "{name}: the student's backbone did not move");

        let idx = Tensor::arange(4, (Kind::Int64, Device::Cpu));
        let input = split.input.select(&idx, Device::Cpu).unwrap();
        let cx = zhijian_core::Ctx::new(true, &methods, methods[0].taps());
        let logits = student.forward(&cx, &input);
        let out = teacher.run(&input, &methods[0].teacher_taps().unwrap(), &zhijian_core::WeightCache::new());
        let step = StepOutput { logits, labels: split.labels.index_select(0, &idx), index: idx, taps: cx.take_taps(), teacher: Some(out) };
        let loss = methods[0].extra_loss(&step).unwrap_or_else(|| panic!("{name}: no loss"));
        assert!(loss.double_value(&[]).is_finite(), "{name}: loss {loss}");
        let backbone: Vec<Tensor> = student.trainable().into_iter().filter(|(n, _)| !n.starts_with("head")).map(|(_, t)| t).collect();
        let grads = Tensor::run_backward(&[&loss], &backbone, false, false);
        let reached = grads.iter().any(|g| g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(reached, "{name}: no gradient reaches the student's backbone");
        methods.pop().unwrap()
    }

    /// The loss `method` adds on one batch of `split` (4 examples), with
    /// `student`'s and `teacher`'s taps; after `before_train`.
    pub fn one_loss(student: &Model, teacher: &Teacher, split: &Split, method: &dyn Method) -> Tensor {
        let idx = Tensor::arange(4, (Kind::Int64, Device::Cpu));
        let input = split.input.select(&idx, Device::Cpu).unwrap();
        let cx = zhijian_core::Ctx::new(true, &[], method.taps());
        let logits = student.forward(&cx, &input);
        let out = teacher.run(&input, &method.teacher_taps().unwrap(), &zhijian_core::WeightCache::new());
        let step = StepOutput { logits, labels: split.labels.index_select(0, &idx), index: idx, taps: cx.take_taps(), teacher: Some(out) };
        method.extra_loss(&step).expect("a loss")
    }

    /// Asserts the variables of `method` named in `expect` have those shapes and are all training-only.
    pub fn assert_parts(method: &dyn Method, expect: &[(&str, &[i64])]) {
        let vars = method.var_store().expect("learned parts").variables();
        for (name, shape) in expect {
            assert_eq!(vars.get(*name).unwrap_or_else(|| panic!("no {name} in {:?}", vars.keys())).size(), *shape, "{name}");
        }
        assert!(vars.keys().all(|n| method.training_only(n)));
    }

    /// A run's data with `teacher`.
    pub fn run_data<'a>(split: &'a Split, teacher: &'a Teacher) -> zhijian_core::RunData<'a> {
        zhijian_core::RunData { train: split, val: None, teacher: Some(teacher), params: &[] }
    }
}

#[cfg(test)]
mod tests {
    use super::testing;
    use super::*;
    use zhijian_core::Registry;

    /// The cache holds what the teacher computes, once per training split:
    /// logits and pooled features from the first run (a later run reads
    /// whichever it wants), and the block maps a later run wants, added to
    /// the same memo.
    #[test]
    fn the_teacher_cache_is_the_teachers_outputs_computed_once() {
        use zhijian_core::train::TeacherCache;
        let teacher = zhijian_core::Teacher::new(zhijian_backbones::toys::cnn(1), Vec::new(), "toy");
        let (input, labels) = (zhijian_backbones::toys::images(), zhijian_backbones::toys::labels());
        let once = |taps: &[Tap]| teacher.outputs_once(&input, &labels, taps, 4).unwrap().expect("within the budget");
        let block = Tap::Block(1);
        let computed = [once(&[]).1, once(&[Tap::Pooled]).1, once(std::slice::from_ref(&block)).1];
        let (cache, again) = once(&[Tap::Pooled, block.clone()]);
        assert_eq!(computed, [true, false, true], "pooled features with the logits; the block map when first wanted");
        assert!(!again);
        let idx = Tensor::from_slice(&[0i64, 3, 5]);
        let cached = cache.select(&idx, tch::Device::Cpu);
        let live = teacher.run(&input.select(&idx, tch::Device::Cpu).unwrap(), &[Tap::Pooled, block.clone()], &WeightCache::new());
        assert!(cached.logits.allclose(&live.logits, 1e-5, 1e-6, false));
        for tap in [Tap::Pooled, block.clone()] {
            assert_eq!(cached.taps[&tap].size(), live.taps[&tap].size(), "{tap:?}");
            assert!(cached.taps[&tap].allclose(&live.taps[&tap], 1e-5, 1e-6, false), "{tap:?}");
        }
        // Over the memory budget nothing is cached; a tap the teacher lacks is named.
        assert!(TeacherCache::compute(&teacher, &input, std::slice::from_ref(&block), 4, 64).unwrap().is_none());
        let err = TeacherCache::compute(&teacher, &input, &[Tap::Block(99)], 4, 1 << 30).err().expect("no block 99").to_string();
        assert!(err.contains("Block(99)"), "{err}");
        // A text batch's block outputs are as long as its longest review: only pooled features are cached.
        let tokens = zhijian_backbones::toys::tokens();
        assert!(TeacherCache::applies(&teacher, &tokens, &[Tap::Pooled]));
        assert!(!TeacherCache::applies(&teacher, &tokens, std::slice::from_ref(&block)));
        // Another split (other labels) is computed anew.
        assert!(teacher.outputs_once(&input, &labels.flip([0]), &[], 4).unwrap().unwrap().1);
    }

    const ALL: [&str; 13] = ["kd_logits", "fitnet", "at", "sp", "rkd", "pkt", "nst", "cc", "vid", "factor_transfer", "dist", "crd", "distill_token"];

    /// Every method, registered under its name, trains a CNN student from a
    /// deeper, wider CNN teacher (a ViT student for the token), and its loss
    /// reaches the student; its config round-trips.
    #[test]
    fn every_method_trains_a_student_from_a_teacher() {
        let mut r = Registry::new();
        crate::register(&mut r);
        for name in ALL {
            let method = r.build_default(name).unwrap();
            let mut again = method.config();
            again.insert("method".into(), name.into());
            assert_eq!(r.build(&again).unwrap().config(), method.config(), "{name}");
            let student = if name == "distill_token" { testing::vit(0, 16, 4) } else { testing::cnn(0, &[4, 8]) };
            let teacher = testing::teacher(testing::cnn(1, &[6, 12, 12]));
            let method = testing::train_two_steps(&student, &teacher, &testing::images(0), method);
            // Feature losses' parts are training-only; the token's are not.
            if let Some(vs) = method.var_store() {
                assert!(vs.variables().keys().all(|n| method.training_only(n) == (name != "distill_token")), "{name}");
            }
        }
    }

    /// The same on token sequences: a 2-layer BERT student from a wider 3-layer one.
    #[test]
    fn every_method_trains_a_bert_student_from_a_bert_teacher() {
        let mut r = Registry::new();
        crate::register(&mut r);
        for name in ALL {
            let (student, teacher) = (testing::bert(0, 16, 2), testing::teacher(testing::bert(1, 24, 3)));
            testing::train_two_steps(&student, &teacher, &testing::tokens(0), r.build_default(name).unwrap());
        }
    }

    /// Features parse from `"pooled"`, `"last"` and integers and name themselves in errors;
    /// blocks resolve against each side's depth.
    #[test]
    fn features_parse_resolve_and_refuse() {
        let mut r = Registry::new();
        crate::register(&mut r);
        let parse = |text: &str| r.build(&toml::from_str::<toml::Table>(&format!("method = \"fitnet\"\n{text}")).unwrap());
        let m = parse("student = \"last\"\nteacher = -2").unwrap();
        assert_eq!(m.config()["student"].as_str(), Some("last"));
        assert_eq!(m.config()["teacher"].as_integer(), Some(-2));
        let err = parse("student = \"middle\"").err().unwrap().to_string();
        assert!(err.contains("fitnet") && err.contains("student") && err.contains("middle"), "{err}");
        let err = parse("weight = -1.0").err().unwrap().to_string();
        assert!(err.contains("weight") && err.contains("-1"), "{err}");
        let err = parse("wieght = 1.0").err().unwrap().to_string();
        assert!(err.contains("wieght"), "{err}");
        assert_eq!(Feature::Block(-1).tap(3, "teacher", "x"), Ok(Tap::Block(2)));
        assert_eq!(Feature::Last.tap(3, "teacher", "x"), Ok(Tap::Block(2)));
        assert_eq!(Feature::Pooled.tap(3, "teacher", "x"), Ok(Tap::Pooled));
        let err = Feature::Block(3).tap(3, "teacher", "bert").unwrap_err();
        assert!(err.contains("teacher") && err.contains("3 blocks"), "{err}");
        // A block the teacher lacks is refused before training.
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12])));
        let split = testing::images(0);
        let mut m = parse("teacher = 5").unwrap();
        m.prepare(&student).unwrap();
        let err = m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap_err().to_string();
        assert!(err.contains("teacher = Block(5)") && err.contains("2 blocks"), "{err}");
    }

    /// Logit losses refuse a teacher with other classes, naming both counts.
    #[test]
    fn logit_losses_need_the_students_classes() {
        let mut r = Registry::new();
        crate::register(&mut r);
        let student = testing::cnn(0, &[4, 8]);
        let teacher = testing::teacher(Model::new(tch::Device::Cpu, 5, |p| {
            let config = zhijian_backbones::SmallCnnConfig { image_size: 16, in_chans: 3, channels: vec![4] };
            Box::new(zhijian_backbones::SmallCnn::new(p, &config).unwrap())
        }));
        let split = testing::images(0);
        for name in ["kd_logits", "dist"] {
            let mut m = r.build_default(name).unwrap();
            m.prepare(&student).unwrap();
            let err = m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("3 classes") && err.contains("teacher 5"), "{err}");
        }
    }

    /// Maps of different sizes are pooled to the smaller; tokens of one
    /// length pass; helpers shape features as documented.
    #[test]
    fn shapes_are_matched_as_documented() {
        let s = Tensor::ones([2, 3, 8, 6], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::ones([2, 5, 4, 7], (Kind::Float, tch::Device::Cpu));
        let (a, b) = align(&s, &t).unwrap();
        assert_eq!((a.size(), b.size()), (vec![2, 3, 4, 6], vec![2, 5, 4, 6]));
        assert_eq!(per_sample(&s).size(), [2, 3 * 8 * 6]);
        assert_eq!(per_sample_width(&[2, 3, 8, 6]), 144);
        let tokens = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([2, 3, 2]);
        assert_eq!(Vec::<f32>::try_from(per_sample(&tokens).flatten(0, -1)).unwrap(), [0.0, 1.0, 6.0, 7.0]);
        assert_eq!(by_position(&tokens).size(), [2, 2, 3]);
        assert!(align(&tokens, &Tensor::ones([2, 4, 2], (Kind::Float, tch::Device::Cpu))).is_err());
        assert!(need_positions(Form::Vector, Form::Vector).is_err() && need_same_form(Form::Map, Form::Tokens).is_err());
    }
}
