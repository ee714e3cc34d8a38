//! The toy backbones of the tuner's unit tests ([`zhijian_backbones::toys`])
//! and the step outputs its losses are called with.

pub use zhijian_backbones::toys::*;

use tch::Tensor;
use zhijian_core::StepOutput;

/// A step output of one example with no taps and no teacher, for methods
/// whose loss reads only their own state.
pub fn empty_step() -> StepOutput {
    StepOutput {
        logits: Tensor::zeros([1, 2], tch::kind::FLOAT_CPU),
        labels: Tensor::from_slice(&[0i64]),
        index: Tensor::from_slice(&[0i64]),
        taps: Default::default(),
        teacher: None,
    }
}
