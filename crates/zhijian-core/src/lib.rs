//! Core of zhijian: the one error type, the [`Backbone`] and [`Method`] traits,
//! hookable layers and the step context, the method [`Registry`], weight I/O and
//! the training engine.
//!
//! Backbones are plain structs written with [`layers`]: each layer knows its path
//! (= checkpoint key) and asks the [`Ctx`] at its site, so methods inject or
//! observe without any change to backbone code.

pub mod backbone;
pub mod ctx;
pub mod error;
pub mod hooks;
pub mod layers;
pub mod method;
pub mod metrics;
pub mod model;
pub mod precision;
pub mod pth;
pub mod registry;
pub mod rng;
pub mod targets;
pub mod train;
pub mod weights;

pub use backbone::{Backbone, ImagePreset, ImageSource, Input, ParamGroup, block_index};
pub use ctx::{Ctx, Tap};
pub use error::{Error, Result};
pub use hooks::{Kv, Layout, SubLayer, Tokens};
pub use layers::{DropoutMasks, Linear, Role, Site};
pub use method::{Method, RunData, Stage, StepCx, StepOutput, TeacherOutput};
pub use metrics::Accuracy;
pub use model::Model;
pub use precision::{Compute, Precision, WeightCache};
pub use pth::{ConvertReport, PthContents, PthFormat, Skipped, convert_pth, read_pth};
pub use registry::{Registry, config_table, from_table, parse_config};
pub use rng::SplitMix64;
pub use train::{Split, Teacher, TrainConfig};
pub use weights::{LoadReport, load_into, save_atomic, write_atomic};
