//! A backbone with a classification head: what methods prepare and engines train.

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::backbone::{Backbone, Input, ParamGroup};
use crate::ctx::{Ctx, Tap};
use crate::layers::{Linear, Role, Site, is_buffer};

/// Default name of the head's variables (`head.weight`, `head.bias`), as timm names it.
pub const HEAD: &str = "head";

/// A backbone plus a linear head over its pooled features.
///
/// All of the backbone's and the head's parameters live in `vs`, named by their
/// checkpoint keys; methods keep their own parameters in their own stores.
pub struct Model {
    /// Backbone and head parameters.
    pub vs: VarStore,
    /// The feature extractor.
    pub backbone: Box<dyn Backbone>,
    /// Linear head `[num_classes, hidden]`.
    pub head: Linear,
}

impl Model {
    /// Builds the backbone with `build` under the store's root and adds a fresh
    /// head for `num_classes` classes.
    pub fn new(device: Device, num_classes: i64, build: impl FnOnce(tch::nn::Path) -> Box<dyn Backbone>) -> Model {
        let vs = VarStore::new(device);
        let backbone = build(vs.root());
        let head = Linear::new(vs.root() / backbone.head_name(), backbone.hidden_size(), num_classes, true, Role::Head);
        Model { vs, backbone, head }
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> i64 {
        self.head.site().out_features
    }

    /// Every hook site, the head's last, each with its block index.
    pub fn sites(&self) -> Vec<Site> {
        let mut sites = self.backbone.sites();
        for site in &mut sites {
            if let ParamGroup::Block(i) = self.backbone.group(&format!("{}.weight", site.path)) {
                site.block = Some(i);
            }
        }
        sites.push(self.head.site().clone());
        sites
    }

    /// Whether the backbone is a transformer whose blocks take token sequences
    /// (it has attention query projections): what token methods (prompts,
    /// prefixes, adapters around sub-layers) need.
    pub fn has_attention(&self) -> bool {
        self.backbone.sites().iter().any(|s| matches!(s.role, Role::Query | Role::Qkv))
    }

    /// The first block whose computation involves the site at `path`: 0 for
    /// the stem, `i` for block `i`, the number of blocks for the neck and head.
    pub fn block_of_site(&self, path: &str) -> usize {
        match self.group(&format!("{path}.weight")) {
            ParamGroup::Stem => 0,
            ParamGroup::Block(i) => i,
            ParamGroup::Neck | ParamGroup::Head => self.backbone.num_blocks(),
        }
    }

    /// The variable named `name` (a checkpoint key), or an error naming it.
    pub fn variable(&self, name: &str) -> crate::Result<Tensor> {
        self.vs.variables().remove(name).ok_or_else(|| crate::Error::MissingWeights { path: "<model>".into(), names: vec![name.to_string()] })
    }

    /// The group of a parameter of `vs`.
    pub fn group(&self, param: &str) -> ParamGroup {
        let head = &self.head.site().path;
        if param.strip_prefix(head.as_str()).is_some_and(|rest| rest.starts_with('.')) { ParamGroup::Head } else { self.backbone.group(param) }
    }

    /// Pooled features; `Input::Features` passes through untouched.
    ///
    /// # Shapes
    /// `input` → `[batch, hidden]`.
    pub fn features(&self, cx: &Ctx, input: &Input) -> Tensor {
        let pooled = match input {
            Input::Features(f) => f.shallow_clone(),
            // Pooled features are fp32 whatever the compute precision.
            other => crate::precision::to_fp32(&self.backbone.forward(cx, other)),
        };
        cx.tap(Tap::Pooled, &pooled);
        pooled
    }

    /// Logits.
    ///
    /// # Shapes
    /// `input` → `[batch, num_classes]`.
    pub fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let features = self.features(cx, input);
        cx.logits(crate::precision::to_fp32(&self.head.forward(cx, &features)))
    }

    /// Freezes every backbone parameter and leaves the head trainable: the
    /// starting point before methods choose what else trains.
    pub fn freeze_backbone(&self) {
        for (name, t) in self.vs.variables() {
            if !is_buffer(&name) {
                let _ = t.set_requires_grad(self.group(&name) == ParamGroup::Head);
            }
        }
    }

    /// Sets `requires_grad` on every backbone parameter `keep` selects (never on buffers).
    pub fn unfreeze_where(&self, keep: impl Fn(&str, ParamGroup) -> bool) {
        for (name, t) in self.vs.variables() {
            if !is_buffer(&name) && keep(&name, self.group(&name)) {
                let _ = t.set_requires_grad(true);
            }
        }
    }

    /// Trainable parameters of the model (not of methods), sorted by name.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether no backbone parameter trains (so features can be computed once).
    pub fn backbone_frozen(&self) -> bool {
        self.vs.variables().iter().all(|(n, t)| self.group(n) == ParamGroup::Head || !t.requires_grad())
    }

    /// Number of elements over all parameters of `vs` (buffers not counted).
    pub fn num_params(&self) -> i64 {
        self.vs.variables().iter().filter(|(n, _)| !is_buffer(n)).map(|(_, t)| t.numel() as i64).sum()
    }
}
