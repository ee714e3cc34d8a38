//! Training: optimisers, schedules and the engine.

pub mod engine;
pub mod optim;
pub mod schedule;

pub use engine::{
    artifact, batches, instance_names, cache_features, evaluate, features, features_cacheable, method_variables, predict, prepare, progress_bar, restore, train, trainable, Split,
    TrainConfig, TrainOptions, TrainReport,
};
pub use optim::{Optimizer, OptimizerConfig, ParamOpts};
pub use schedule::Schedule;
