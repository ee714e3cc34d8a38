//! Architect-stage methods: what is added to, or unfrozen in, a pre-trained
//! backbone. One method per file; [`register`] adds them all to a [`Registry`].
//!
//! Each method is usable on its own, without the registry or TOML:
//! `Lora::new(LoraConfig { rank: 4, ..Default::default() })`.

pub mod diff_pruning;
pub mod full_finetune;
pub mod linear_probe;
pub mod lora;
pub mod sparse_ft;

#[cfg(test)]
pub(crate) mod testing;

pub use diff_pruning::{DiffPruning, DiffPruningConfig};
pub use full_finetune::{FullFinetune, FullFinetuneConfig};
pub use linear_probe::{LinearProbe, LinearProbeConfig};
pub use lora::{Lora, LoraConfig};
pub use sparse_ft::{Selection, SparseFt, SparseFtConfig};

use zhijian_core::{parse_config, Registry, Stage};

/// Registers every Architect method.
pub fn register(r: &mut Registry) {
    r.register("linear_probe", Stage::Architect, "train only a linear head on frozen, cached features", |c| {
        Ok(Box::new(LinearProbe::new(parse_config("linear_probe", c)?)))
    });
    r.register("full_finetune", Stage::Architect, "train every backbone parameter and the head", |c| {
        Ok(Box::new(FullFinetune::new(parse_config("full_finetune", c)?)))
    });
    r.register("lora", Stage::Architect, "low-rank updates B·A on chosen linear layers (Hu et al. 2021)", |c| {
        Ok(Box::new(Lora::new(parse_config("lora", c)?)))
    });
    r.register("sparse_ft", Stage::Architect, "train a fixed sparse subset of the backbone's weights, chosen by gradient (SAFT), at random or by magnitude (SHiRA)", |c| {
        Ok(Box::new(SparseFt::new(parse_config("sparse_ft", c)?)))
    });
    r.register("diff_pruning", Stage::Architect, "a sparse diff θ₀ + z⊙w with hard-concrete L0 gates, cut to the largest entries (Guo et al. 2021)", |c| {
        Ok(Box::new(DiffPruning::new(parse_config("diff_pruning", c)?)))
    });
}
