//! Architect-stage methods: what is added to, or unfrozen in, a pre-trained
//! backbone. One method per file; [`register`] adds them all to a [`Registry`].
//!
//! Each method is usable on its own, without the registry or TOML:
//! `Lora::new(LoraConfig { rank: 4, ..Default::default() })`.

pub mod full_finetune;
pub mod ia3;
pub mod linear_probe;
pub mod lora;
pub mod ssf;

#[cfg(test)]
pub(crate) mod testing;

pub use full_finetune::{FullFinetune, FullFinetuneConfig};
pub use ia3::{Ia3, Ia3Config};
pub use linear_probe::{LinearProbe, LinearProbeConfig};
pub use lora::{Lora, LoraConfig};
pub use ssf::{Ssf, SsfConfig};

use zhijian_core::{parse_config, Registry, Stage};

/// Registers every Architect method.
pub fn register(r: &mut Registry) {
    r.register("linear_probe", Stage::Architect, "train only a linear head on frozen, cached features", |c| {
        Ok(Box::new(LinearProbe::new(parse_config("linear_probe", c)?)))
    });
    r.register("full_finetune", Stage::Architect, "train every backbone parameter and the head", |c| {
        Ok(Box::new(FullFinetune::new(parse_config("full_finetune", c)?)))
    });
    r.register("lora", Stage::Architect, "low-rank updates B·A on chosen layers (Hu et al. 2021), with DoRA, rsLoRA and per-site ranks as options", |c| {
        Ok(Box::new(Lora::new(parse_config("lora", c)?)))
    });
    r.register("ia3", Stage::Architect, "learned vectors rescaling attention keys, values and FFN activations (Liu et al. 2022)", |c| {
        Ok(Box::new(Ia3::new(parse_config("ia3", c)?)))
    });
    r.register("ssf", Stage::Architect, "per-channel scale and shift after linear, conv and norm layers (Lian et al. 2022)", |c| {
        Ok(Box::new(Ssf::new(parse_config("ssf", c)?)))
    });
}
