//! Merger-stage reuse: how pre-trained knowledge is used at prediction time
//! (class prototypes and nearest neighbours over frozen features, heads
//! aligning them with a text tower's class descriptions) and which
//! backbone to reuse before any training (transferability scores). One method
//! per file; [`register`] adds the methods to a [`Registry`].

use zhijian_core::{Registry, Stage, parse_config};

pub mod contrastive_heads;
pub mod ensemble;
pub mod head2toe;
pub mod knn;
pub mod merge;
pub mod ncm;
pub mod prototypes;
pub mod score;
pub mod simpleshot;

pub use contrastive_heads::{Candidates, ContrastiveHeads, ContrastiveHeadsConfig};
pub use ensemble::{Combine, Ensemble, FeatureProbe};
pub use head2toe::{Head2Toe, Head2ToeConfig};
pub use knn::{Knn, KnnConfig, Weighting};
pub use ncm::{Ncm, NcmConfig};
pub use prototypes::Metric;
pub use simpleshot::{SimpleShot, SimpleShotConfig};

/// Adds every Merger-stage method to `r`, one line each.
pub fn register(r: &mut Registry) {
    r.register("ncm", Stage::Merger, "nearest class mean of frozen features, no gradient steps (Mensink et al. 2013)", |c| {
        Ok(Box::new(Ncm::new(parse_config("ncm", c)?)))
    });
    r.register("simpleshot", Stage::Merger, "nearest centroid of centred, L2-normalised frozen features, no gradient steps (Wang et al. 2019)", |c| {
        Ok(Box::new(SimpleShot::new(parse_config("simpleshot", c)?)))
    });
    r.register("knn", Stage::Merger, "weighted k-nearest-neighbour vote over frozen features, no gradient steps (Wu et al. 2018; DINO)", |c| {
        Ok(Box::new(Knn::new(parse_config("knn", c)?)))
    });
    r.register("head2toe", Stage::Merger, "linear head on group-lasso-selected features of every block of the frozen backbone (Evci et al. 2022)", |c| {
        Ok(Box::new(Head2Toe::new(parse_config("head2toe", c)?)))
    });
    r.register(
        "contrastive_heads",
        Stage::Merger,
        "projection heads aligning frozen image features with a frozen text tower's class descriptions, symmetric InfoNCE (CLIP/LiT)",
        |c| Ok(Box::new(ContrastiveHeads::new(parse_config("contrastive_heads", c)?))),
    );
}
