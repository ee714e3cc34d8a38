//! Architect-stage methods: what is added to, or unfrozen in, a pre-trained
//! backbone. One method per file; [`register`] adds them all to a [`Registry`].
//!
//! Each method is usable on its own, without the registry or TOML:
//! `Lora::new(LoraConfig { rank: 4, ..Default::default() })`.

pub mod fact;
pub mod full_finetune;
pub mod linear_probe;
pub mod lora;
pub mod prefix_tuning;
pub mod vpt;

#[cfg(test)]
pub(crate) mod testing;

pub use fact::{Fact, FactConfig, FactKind};
pub use full_finetune::{FullFinetune, FullFinetuneConfig};
pub use linear_probe::{LinearProbe, LinearProbeConfig};
pub use lora::{Lora, LoraConfig};
pub use prefix_tuning::{PrefixTuning, PrefixTuningConfig};
pub use vpt::{Vpt, VptConfig, VptMode};

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
    r.register("vpt", Stage::Architect, "learned prompt tokens after the class token, shallow or per block (Jia et al. 2022)", |c| {
        Ok(Box::new(Vpt::new(parse_config("vpt", c)?)))
    });
    r.register("prefix_tuning", Stage::Architect, "learned keys and values prepended at every attention layer (Li & Liang 2021)", |c| {
        Ok(Box::new(PrefixTuning::new(parse_config("prefix_tuning", c)?)))
    });
    r.register("fact", Stage::Architect, "weight updates factorised with factors shared across layers, TT or Tucker (Jie & Deng 2023)", |c| {
        Ok(Box::new(Fact::new(parse_config("fact", c)?)))
    });
}
