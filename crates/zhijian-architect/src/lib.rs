//! Architect-stage methods: what is added to, or unfrozen in, a pre-trained
//! backbone. One method per file; [`register`] adds them all to a [`Registry`].
//!
//! Each method is usable on its own, without the registry or TOML:
//! `Lora::new(LoraConfig { rank: 4, ..Default::default() })`.

pub mod adapter;
pub mod adaptformer;
pub mod bitfit;
pub mod bottleneck;
pub mod convpass;
pub mod diff_pruning;
pub mod fact;
pub mod full_finetune;
pub mod ia3;
pub mod linear_probe;
pub mod ln_tuning;
pub mod lora;
pub mod partial_k;
pub mod prefix_tuning;
pub mod sparse_adapter;
pub mod sparse_ft;
pub mod ssf;
pub mod vpt;
pub mod vqt;

#[cfg(test)]
pub(crate) mod testing;

pub use adapter::{Adapter, AdapterConfig};
pub use adaptformer::{AdaptFormer, AdaptFormerConfig};
pub use bitfit::{BitFit, BitFitConfig};
pub use convpass::{Convpass, ConvpassConfig};
pub use diff_pruning::{DiffPruning, DiffPruningConfig};
pub use fact::{Fact, FactConfig, FactKind};
pub use full_finetune::{FullFinetune, FullFinetuneConfig};
pub use ia3::{Ia3, Ia3Config};
pub use linear_probe::{LinearProbe, LinearProbeConfig};
pub use ln_tuning::{LnTuning, LnTuningConfig};
pub use lora::{Lora, LoraConfig};
pub use partial_k::{PartialK, PartialKConfig};
pub use prefix_tuning::{PrefixTuning, PrefixTuningConfig};
pub use sparse_adapter::{SparseAdapter, SparseAdapterConfig};
pub use sparse_ft::{Selection, SparseFt, SparseFtConfig};
pub use ssf::{Ssf, SsfConfig};
pub use vpt::{Vpt, VptConfig, VptMode};
pub use vqt::{Vqt, VqtConfig};

use zhijian_core::{Registry, Stage, parse_config};

/// Registers every Architect method.
pub fn register(r: &mut Registry) {
    r.register("linear_probe", Stage::Architect, "train only a linear head on frozen, cached features", |c| {
        Ok(Box::new(LinearProbe::new(parse_config("linear_probe", c)?)))
    });
    r.register("full_finetune", Stage::Architect, "train every backbone parameter and the head", |c| {
        Ok(Box::new(FullFinetune::new(parse_config("full_finetune", c)?)))
    });
    r.register("lora", Stage::Architect, "low-rank updates B·A on chosen layers (Hu et al. 2021), with DoRA, rsLoRA and per-site ranks as options", |c| {
        let config: LoraConfig = parse_config("lora", c)?;
        config.validate()?;
        Ok(Box::new(Lora::new(config)))
    });
    r.register("bitfit", Stage::Architect, "train only the bias terms (Ben Zaken et al. 2022)", |c| Ok(Box::new(BitFit::new(parse_config("bitfit", c)?))));
    r.register("ln_tuning", Stage::Architect, "train only the norms' scales and shifts (Qi et al. 2022; BatchNorm affine on CNNs)", |c| {
        Ok(Box::new(LnTuning::new(parse_config("ln_tuning", c)?)))
    });
    r.register("partial_k", Stage::Architect, "train only the last k blocks (Yosinski et al. 2014)", |c| {
        Ok(Box::new(PartialK::new(parse_config("partial_k", c)?)))
    });
    r.register("vqt", Stage::Architect, "learned query tokens summarise every block for the head; backbone untouched (Tu et al. 2023)", |c| {
        Ok(Box::new(Vqt::new(parse_config("vqt", c)?)))
    });
    r.register("adapter", Stage::Architect, "sequential bottleneck adapters after attention and MLP (Houlsby et al. 2019)", |c| {
        Ok(Box::new(Adapter::new(parse_config("adapter", c)?)))
    });
    r.register("adaptformer", Stage::Architect, "scaled bottleneck in parallel with each MLP (Chen et al. 2022)", |c| {
        Ok(Box::new(AdaptFormer::new(parse_config("adaptformer", c)?)))
    });
    r.register("convpass", Stage::Architect, "3×3 convolutional bypasses over the ViT patch grid (Jie & Deng 2022)", |c| {
        Ok(Box::new(Convpass::new(parse_config("convpass", c)?)))
    });
    r.register("sparse_adapter", Stage::Architect, "adapters pruned at initialisation by SNIP, magnitude or at random (He et al. 2022)", |c| {
        Ok(Box::new(SparseAdapter::new(parse_config("sparse_adapter", c)?)))
    });
    r.register("ia3", Stage::Architect, "learned vectors rescaling attention keys, values and FFN activations (Liu et al. 2022)", |c| {
        Ok(Box::new(Ia3::new(parse_config("ia3", c)?)))
    });
    r.register("ssf", Stage::Architect, "per-channel scale and shift after linear, conv and norm layers (Lian et al. 2022)", |c| {
        Ok(Box::new(Ssf::new(parse_config("ssf", c)?)))
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
    r.register(
        "sparse_ft",
        Stage::Architect,
        "train a fixed sparse subset of the backbone's weights, chosen by gradient (SAFT), at random or by magnitude (SHiRA)",
        |c| Ok(Box::new(SparseFt::new(parse_config("sparse_ft", c)?))),
    );
    r.register(
        "diff_pruning",
        Stage::Architect,
        "a sparse diff θ₀ + z⊙w with hard-concrete L0 gates, cut to the largest entries (Guo et al. 2021)",
        |c| Ok(Box::new(DiffPruning::new(parse_config("diff_pruning", c)?))),
    );
}
