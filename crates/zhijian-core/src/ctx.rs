//! The step context: how a backbone's layers consult the active methods.
//!
//! tch has no forward hooks and we do not monkey-patch. Instead every hookable
//! layer calls the context at its site (`cx.linear(path, x, base_out)`), and the
//! context lets each active method transform the output in order. Methods that
//! only observe request [`Tap`]s, which the backbone records as it runs.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::hooks::{Kv, Layout, SubLayer, Tokens};
use crate::layers::Site;
use crate::method::Method;
use crate::precision::{Compute, WeightCache};

/// An intermediate a method (or the caller) can ask a backbone to record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    /// The output of block `i` (0-based), before pooling: `[batch, tokens, hidden]`
    /// for transformers, `[batch, channels, h, w]` for CNNs.
    Block(usize),
    /// The pooled feature vector the head sees: `[batch, hidden]`.
    Pooled,
    /// The output of the hook site at this path (a linear layer, convolution
    /// or norm), after every method acted on it.
    Site(String),
}

/// The context of one forward pass.
pub struct Ctx<'a> {
    train: bool,
    methods: &'a [Box<dyn Method>],
    wanted: Vec<Tap>,
    taps: RefCell<BTreeMap<Tap, Tensor>>,
    compute: Compute,
    weights: Option<&'a WeightCache>,
}

impl<'a> Ctx<'a> {
    /// A context with active methods and the taps to record.
    /// Taps methods read in every forward pass ([`Method::forward_taps`]) are
    /// recorded too.
    pub fn new(train: bool, methods: &'a [Box<dyn Method>], mut wanted: Vec<Tap>) -> Self {
        for tap in methods.iter().flat_map(|m| m.forward_taps()) {
            if !wanted.contains(&tap) {
                wanted.push(tap);
            }
        }
        Ctx { train, methods, wanted, taps: RefCell::new(BTreeMap::new()), compute: Compute::Fp32, weights: None }
    }

    /// A context with no methods and no taps: the plain backbone.
    pub fn plain(train: bool) -> Ctx<'static> {
        Ctx { train, methods: &[], wanted: Vec::new(), taps: RefCell::new(BTreeMap::new()), compute: Compute::Fp32, weights: None }
    }

    /// The same context computing its matmuls in `compute` (fp32 by default).
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// The same context reading bf16 copies of frozen weights from `cache`
    /// instead of casting them at every use.
    pub fn with_weight_cache(mut self, cache: &'a WeightCache) -> Self {
        self.weights = Some(cache);
        self
    }

    /// Whether this is a training pass (dropout active).
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// What the matmuls of this pass compute in.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// A layer's input in the compute precision (floats only).
    pub fn cast(&self, x: &Tensor) -> Tensor {
        let kind = self.compute.kind();
        if x.kind() == kind || !x.is_floating_point() { x.shallow_clone() } else { x.to_kind(kind) }
    }

    /// A layer's weight in the compute precision: frozen weights come from the
    /// weight cache when the pass has one; trainable ones are cast
    /// differentiably, so their gradients reach the fp32 masters.
    pub fn weight(&self, w: &Tensor) -> Tensor {
        let kind = self.compute.kind();
        match self.weights {
            Some(cache) => cache.get(w, kind),
            None if w.kind() == kind => w.shallow_clone(),
            None => w.to_kind(kind),
        }
    }

    /// Called by a hookable linear layer with its input before the matmul;
    /// returns the input after every method (IA3 scales FFN activations here).
    pub fn linear_input(&self, site: &Site, x: &Tensor) -> Tensor {
        self.methods.iter().fold(x.shallow_clone(), |x, m| m.linear_input(site, x, self.train))
    }

    /// Called by a hookable linear layer at `site` with its input
    /// and the frozen layer's output; returns the output after every method.
    pub fn linear(&self, site: &Site, x: &Tensor, base: Tensor) -> Tensor {
        let out = self.methods.iter().fold(base, |out, m| m.linear(site, x, out, self.train));
        self.tap_site(site, out)
    }

    /// Called by a hookable convolution with its (padded) input and the frozen
    /// layer's output; returns the output after every method.
    pub fn conv(&self, site: &Site, x: &Tensor, base: Tensor) -> Tensor {
        let out = self.methods.iter().fold(base, |out, m| m.conv(site, x, out, self.train));
        self.tap_site(site, out)
    }

    /// Called by a norm layer (LayerNorm, BatchNorm) with its input and its
    /// affine output; returns the output after every method (SSF).
    pub fn norm(&self, site: &Site, x: &Tensor, base: Tensor) -> Tensor {
        let out = self.methods.iter().fold(base, |out, m| m.norm(site, x, out, self.train));
        self.tap_site(site, out)
    }

    /// Called by a transformer before block `block` with the tokens entering
    /// it; returns them after every method (VPT inserts prompt tokens here).
    pub fn block_input(&self, block: usize, tokens: Tokens) -> Tokens {
        self.methods.iter().fold(tokens, |t, m| m.block_input(block, t, self.train))
    }

    /// Called by block `block`'s attention with its keys and values; returns
    /// them after every method (prefix tuning prepends keys and values here).
    pub fn attn_kv(&self, block: usize, kv: Kv) -> Kv {
        self.methods.iter().fold(kv, |kv, m| m.attn_kv(block, kv, self.train))
    }

    /// Called by block `block` around its sub-layer `at`, with what the
    /// sub-layer saw (`x`, after any pre-norm) and its output (before dropout
    /// and the residual); returns the output after every method (adapters).
    pub fn sublayer(&self, block: usize, at: SubLayer, x: &Tensor, out: Tensor, layout: &Layout) -> Tensor {
        self.methods.iter().fold(out, |out, m| m.sublayer(block, at, x, out, layout, self.train))
    }

    /// Called by the model with the head's logits; returns them after every method.
    pub fn logits(&self, logits: Tensor) -> Tensor {
        if self.methods.is_empty() {
            return logits;
        }
        let taps = self.taps.borrow();
        self.methods.iter().fold(logits, |l, m| m.logits(l, &taps, self.train))
    }

    fn tap_site(&self, site: &Site, out: Tensor) -> Tensor {
        if !self.wanted.is_empty() {
            let tap = Tap::Site(site.path.clone());
            if self.wanted.contains(&tap) {
                self.taps.borrow_mut().insert(tap, out.shallow_clone());
            }
        }
        out
    }

    /// Records `value` under `tap` if someone asked for it.
    pub fn tap(&self, tap: Tap, value: &Tensor) {
        if !self.wanted.is_empty() && self.wanted.contains(&tap) {
            self.taps.borrow_mut().insert(tap, value.shallow_clone());
        }
    }

    /// Whether `tap` was requested (lets a backbone skip work nobody reads).
    pub fn wants(&self, tap: &Tap) -> bool {
        self.wanted.contains(tap)
    }

    /// Takes the recorded taps, leaving the context empty.
    pub fn take_taps(&self) -> BTreeMap<Tap, Tensor> {
        std::mem::take(&mut self.taps.borrow_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{LayerNorm, Linear, Role};
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    /// `Tap::Site` records exactly the asked-for site's output, after the methods.
    #[test]
    fn site_taps_record_the_output_of_that_site() {
        let vs = VarStore::new(Device::Cpu);
        let linear = Linear::new(vs.root() / "proj", 4, 3, true, Role::Other);
        let norm = LayerNorm::new(vs.root() / "norm", 3, 1e-5);
        let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let cx = Ctx::new(false, &[], vec![Tap::Site("proj".into())]);
        let out = norm.forward(&cx, &linear.forward(&cx, &x));
        let taps = cx.take_taps();
        assert_eq!(taps.len(), 1, "only the asked-for site is recorded");
        assert!(taps[&Tap::Site("proj".into())].equal(&x.linear(&linear.ws, linear.bs.as_ref())));
        assert!(!out.equal(&taps[&Tap::Site("proj".into())]), "the tap is the linear output, not the norm's");
    }
}
