//! The unified comparison protocol: an [`Experiment`] (backbone, data, budget,
//! strategies, seeds) runs every strategy under the same splits and budget, and
//! each run appends a [`Record`] to a JSONL file atomically; reruns skip runs
//! already recorded. [`table::markdown`] renders the comparison.

pub mod build;
pub mod class_text;
#[cfg(test)]
mod config_fuzz;
pub mod data;
mod ensemble;
pub mod experiment;
pub mod features;
pub mod folder;
pub mod merge;
pub mod peft;
pub mod plot;
mod plot_text;
pub mod presets;
pub mod rank;
pub mod record;
pub mod runner;
pub mod slurm;
pub mod source;
pub mod sweep;
pub mod table;
pub mod teacher;

pub use experiment::{BackboneConfig, DataConfig, DeviceChoice, Experiment, MergeEntry, SourceTask, Strategy};
pub use record::{Record, append_record, read_records};
pub use runner::{CompareOptions, Shard, compare};

/// A registry with every method zhijian ships.
pub fn registry() -> zhijian_core::Registry {
    let mut r = zhijian_core::Registry::new();
    zhijian_architect::register(&mut r);
    zhijian_tuner::register(&mut r);
    zhijian_merger::register(&mut r);
    r
}
