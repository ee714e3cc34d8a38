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
pub mod bss;
pub mod delta;
pub mod distill;
pub mod ftp;
pub mod l2;
pub mod l2_sp;
pub mod lp_ft;
pub mod lwf;
pub mod probe;
pub mod spectral_norm;
#[cfg(test)]
pub(crate) mod testing;
pub mod tpgm;
pub mod wise_ft;

pub use bss::{Bss, BssConfig};
pub use delta::{Delta, DeltaConfig};
pub use ftp::{Ftp, FtpConfig};
pub use l2::{L2, L2Config};
pub use l2_sp::{L2Sp, L2SpConfig};
pub use lp_ft::{LpFt, LpFtConfig};
pub use lwf::{Lwf, LwfConfig};
pub use probe::ProbeConfig;
pub use spectral_norm::{SpectralMode, SpectralNorm, SpectralNormConfig};
pub use tpgm::{Norm, Tpgm, TpgmConfig};
pub use wise_ft::{WiseFt, WiseFtConfig};

/// Adds every Tuner-stage method to `r`, one line each.
pub fn register(r: &mut Registry) {
    r.register("l2", Stage::Tuner, "explicit ½α‖w‖² on the reused weights and ½β‖w‖² on the head (the L2-SP paper's baseline)", |c| {
        Ok(Box::new(L2::new(parse_config("l2", c)?)))
    });
    r.register("l2_sp", Stage::Tuner, "½α‖w − w⁰‖² toward the pre-trained weights, ½β‖w‖² on the head (Li et al. 2018)", |c| {
        Ok(Box::new(L2Sp::new(parse_config("l2_sp", c)?)))
    });
    r.register(
        "delta",
        Stage::Tuner,
        "feature maps held to the pre-trained model's, channels weighted by their importance to the task (Li et al. 2019)",
        |c| {
            let config: DeltaConfig = parse_config("delta", c)?;
            config.validate()?;
            Ok(Box::new(Delta::new(config)))
        },
    );
    r.register("bss", Stage::Tuner, "shrink the smallest singular values of each batch's features (Chen et al. 2019)", |c| {
        let config: BssConfig = parse_config("bss", c)?;
        config.validate()?;
        Ok(Box::new(Bss::new(config)))
    });
    r.register(
        "spectral_norm",
        Stage::Tuner,
        "bound each layer's spectral norm after every step (Gouk et al. 2021), or penalise it (Yoshida & Miyato 2017)",
        |c| {
            let config: SpectralNormConfig = parse_config("spectral_norm", c)?;
            config.validate()?;
            Ok(Box::new(SpectralNorm::new(config)))
        },
    );
    r.register(
        "lwf",
        Stage::Tuner,
        "keep the pre-trained head's outputs on the new data while learning it: learning without forgetting (Li & Hoiem 2016)",
        |c| {
            let config: LwfConfig = parse_config("lwf", c)?;
            config.validate()?;
            Ok(Box::new(Lwf::new(config)))
        },
    );
    r.register("lp_ft", Stage::Tuner, "fit a linear probe on frozen features, then fine-tune from it (Kumar et al. 2022)", |c| {
        let config: LpFtConfig = parse_config("lp_ft", c)?;
        config.probe.validate("lp_ft")?;
        Ok(Box::new(LpFt::new(config)))
    });
    r.register(
        "wise_ft",
        Stage::Tuner,
        "interpolate pre-trained and fine-tuned weights, α chosen on validation without retraining (Wortsman et al. 2022)",
        |c| {
            let config: WiseFtConfig = parse_config("wise_ft", c)?;
            config.validate()?;
            Ok(Box::new(WiseFt::new(config)))
        },
    );
    r.register("ftp", Stage::Tuner, "after each step, pull the weights back within a learnt radius of the pre-trained ones, per row (Tian et al. 2023)", |c| {
        let config: FtpConfig = parse_config("ftp", c)?;
        config.validate()?;
        Ok(Box::new(Ftp::new(config)))
    });
    r.register("tpgm", Stage::Tuner, "project toward the pre-trained weights with per-layer radii learnt on the validation split (Tian et al. 2023)", |c| {
        let config: TpgmConfig = parse_config("tpgm", c)?;
        config.validate()?;
        Ok(Box::new(Tpgm::new(config)))
    });
    // Knowledge distillation from a frozen teacher (crate::distill).
    r.register("kd_logits", Stage::Tuner, "match the teacher's temperature-softened class probabilities, KL·T² (Hinton et al. 2015)", |c| {
        Ok(Box::new(distill::KdLogits::new(parse_config("kd_logits", c)?)?))
    });
    r.register("fitnet", Stage::Tuner, "regress the teacher's features from the student's through a learned map, MSE (Romero et al. 2015)", |c| {
        Ok(Box::new(distill::FitNet::new(parse_config("fitnet", c)?)?))
    });
    r.register("at", Stage::Tuner, "match the teacher's spatial attention maps (Zagoruyko & Komodakis 2017)", |c| {
        Ok(Box::new(distill::At::new(parse_config("at", c)?)?))
    });
    r.register("sp", Stage::Tuner, "match the teacher's batch similarity (Gram) matrix (Tung & Mori 2019)", |c| {
        Ok(Box::new(distill::Sp::new(parse_config("sp", c)?)?))
    });
    r.register("rkd", Stage::Tuner, "match the distances and angles among the teacher's features (Park et al. 2019)", |c| {
        Ok(Box::new(distill::Rkd::new(parse_config("rkd", c)?)?))
    });
    r.register("pkt", Stage::Tuner, "match the teacher's cosine-similarity distributions, KL (Passalis & Tefas 2018)", |c| {
        Ok(Box::new(distill::Pkt::new(parse_config("pkt", c)?)?))
    });
    r.register("nst", Stage::Tuner, "match the distribution of the teacher's neuron activations, polynomial-kernel MMD (Huang & Wang 2017)", |c| {
        Ok(Box::new(distill::Nst::new(parse_config("nst", c)?)?))
    });
    r.register("cc", Stage::Tuner, "correlation congruence of embedded student and teacher features (Peng et al. 2019)", |c| {
        Ok(Box::new(distill::Cc::new(parse_config("cc", c)?)?))
    });
    r.register("vid", Stage::Tuner, "maximise a variational bound on the student–teacher mutual information, Gaussian NLL (Ahn et al. 2019)", |c| {
        Ok(Box::new(distill::Vid::new(parse_config("vid", c)?)?))
    });
    r.register("factor_transfer", Stage::Tuner, "a student translator matches a paraphraser pre-trained on the teacher (Kim et al. 2018)", |c| {
        Ok(Box::new(distill::FactorTransfer::new(parse_config("factor_transfer", c)?)?))
    });
    r.register("dist", Stage::Tuner, "match the teacher's predictions by Pearson correlation, per example and per class (Huang et al. 2022)", |c| {
        Ok(Box::new(distill::Dist::new(parse_config("dist", c)?)?))
    });
    r.register("crd", Stage::Tuner, "contrastive representation distillation with memory banks of negatives (Tian et al. 2020)", |c| {
        Ok(Box::new(distill::Crd::new(parse_config("crd", c)?)?))
    });
    r.register("distill_token", Stage::Tuner, "a distillation token learns the teacher's decisions; both heads vote (DeiT, Touvron et al. 2021)", |c| {
        Ok(Box::new(distill::DistillToken::new(parse_config("distill_token", c)?)?))
    });
}
