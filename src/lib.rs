//! zhijian: reuse pre-trained models.
//!
//! The facade re-exports each crate under a short name; a downstream project
//! can depend on any one of them alone (e.g. `zhijian-architect` for LoRA).

pub use zhijian_architect as architect;
pub use zhijian_assets as assets;
pub use zhijian_backbones as backbones;
pub use zhijian_bench as bench;
pub use zhijian_core as core;
pub use zhijian_data as data;
pub use zhijian_merger as merger;
pub use zhijian_tuner as tuner;
