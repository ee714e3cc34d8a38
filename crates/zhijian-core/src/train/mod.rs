//! Training: optimisers, schedules and the engine.

pub mod engine;
pub mod optim;
pub mod schedule;
pub mod teacher;

pub use engine::{
    Split, TrainConfig, TrainOptions, TrainReport, artifact, batches, cache_features, cache_prefix, evaluate, features, features_cacheable, fit_inputs,
    frozen_prefix, instance_names, method_variables, predict, prepare, progress_bar, restore, train, trainable,
};
pub use optim::{Optimizer, OptimizerConfig, ParamOpts};
pub use schedule::Schedule;
pub use teacher::{TEACHER_CACHE_BUDGET, Teacher, TeacherCache, teacher_taps};
