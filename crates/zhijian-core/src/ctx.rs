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

use crate::layers::Site;
use crate::method::Method;

/// An intermediate a method (or the caller) can ask a backbone to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    /// The output of block `i` (0-based), before pooling: `[batch, tokens, hidden]`
    /// for transformers, `[batch, channels, h, w]` for CNNs.
    Block(usize),
    /// The pooled feature vector the head sees: `[batch, hidden]`.
    Pooled,
}

/// The context of one forward pass.
pub struct Ctx<'a> {
    train: bool,
    methods: &'a [Box<dyn Method>],
    wanted: Vec<Tap>,
    taps: RefCell<BTreeMap<Tap, Tensor>>,
}

impl<'a> Ctx<'a> {
    /// A context with active methods and the taps to record.
    pub fn new(train: bool, methods: &'a [Box<dyn Method>], wanted: Vec<Tap>) -> Self {
        Ctx { train, methods, wanted, taps: RefCell::new(BTreeMap::new()) }
    }

    /// A context with no methods and no taps: the plain backbone.
    pub fn plain(train: bool) -> Ctx<'static> {
        Ctx { train, methods: &[], wanted: Vec::new(), taps: RefCell::new(BTreeMap::new()) }
    }

    /// Whether this is a training pass (dropout active).
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Called by a hookable linear layer at `site` with its input
    /// and the frozen layer's output; returns the output after every method.
    pub fn linear(&self, site: &str, x: &Tensor, base: Tensor) -> Tensor {
        self.methods.iter().fold(base, |out, m| m.linear(site, x, out, self.train))
    }

    /// Called by a hookable convolution with its (padded) input and the frozen
    /// layer's output; returns the output after every method.
    pub fn conv(&self, site: &Site, x: &Tensor, base: Tensor) -> Tensor {
        self.methods.iter().fold(base, |out, m| m.conv(site, x, out, self.train))
    }

    /// Records `value` under `tap` if someone asked for it.
    pub fn tap(&self, tap: Tap, value: &Tensor) {
        if self.wanted.contains(&tap) {
            self.taps.borrow_mut().insert(tap, value.shallow_clone());
        }
    }

    /// Whether `tap` was requested (lets a backbone skip work nobody reads).
    pub fn wants(&self, tap: Tap) -> bool {
        self.wanted.contains(&tap)
    }

    /// Takes the recorded taps, leaving the context empty.
    pub fn take_taps(&self) -> BTreeMap<Tap, Tensor> {
        std::mem::take(&mut self.taps.borrow_mut())
    }
}
