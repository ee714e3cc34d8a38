//! The one error type of zhijian's library crates.
//!
//! Each variant carries what a user needs to fix the problem without reading
//! the source: the known names, the available sites, the missing keys.

use std::path::PathBuf;

/// Result alias used across zhijian.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in zhijian's library crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A strategy names a method that no registry entry provides.
    #[error("unknown method `{name}`; known methods: {}", known.join(", "))]
    UnknownMethod {
        /// The name as written.
        name: String,
        /// Every registered method name.
        known: Vec<String>,
    },
    /// A method's config could not be parsed (a misspelt field names itself here).
    #[error("invalid config for method `{method}`: {message}")]
    MethodConfig {
        /// The method whose config is wrong.
        method: String,
        /// The parser's message, which names the offending field.
        message: String,
    },
    /// Any other invalid configuration value.
    #[error("invalid config: {0}")]
    Config(String),
    /// A target pattern matched no hook site of the backbone.
    #[error("pattern `{pattern}` matches no hook site; sites are: {}", sites.join(", "))]
    NoMatchingSites {
        /// The pattern as written.
        pattern: String,
        /// Every site the backbone offers (of the kind the method can use).
        sites: Vec<String>,
    },
    /// A checkpoint lacks weights the model needs.
    #[error("{} weights missing from {path}: {}", names.len(), names.join(", "))]
    MissingWeights {
        /// The checkpoint.
        path: PathBuf,
        /// The missing parameter names.
        names: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// What the tensor is (a parameter name, or an input).
        name: String,
        /// The shape the model needs.
        expected: Vec<i64>,
        /// The shape found.
        got: Vec<i64>,
    },
    /// A checkpoint or artifact holds tensors whose shapes do not fit the
    /// model (another size of the architecture, a head for other classes).
    #[error("{path}: {} tensor(s) have the wrong shape for this model: {}", tensors.len(), tensors.iter().map(|(n, model, file)| format!("`{n}` (model {model:?}, file {file:?})")).collect::<Vec<_>>().join(", "))]
    MisshapenWeights {
        /// The checkpoint.
        path: PathBuf,
        /// Each mis-shaped tensor: name, the model's shape, the file's shape.
        tensors: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
    /// A file exists but cannot be read as what it claims to be.
    #[error("cannot read {path}: {reason}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An operation the method does not support (e.g. merging a prompt).
    #[error("method `{method}` does not support {operation}")]
    Unsupported {
        /// The method.
        method: String,
        /// What was asked.
        operation: String,
    },
    /// Training produced a non-finite loss: the run cannot go on, but a
    /// comparison can (the harness records the run as failed and moves on).
    #[error("training diverged: loss {loss} at step {step}; lower train.lr or set train.grad_clip")]
    Diverged {
        /// Optimiser steps finished before the loss stopped being finite.
        step: usize,
        /// The loss (NaN or infinite).
        loss: f64,
    },
    /// A data set could not be loaded.
    #[error("data: {0}")]
    Data(String),
    /// An I/O error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An error raised by LibTorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
