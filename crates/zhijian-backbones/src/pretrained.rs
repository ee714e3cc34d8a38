//! Loading upstream checkpoints into a [`Model`].

use std::path::Path;

use zhijian_core::weights::load_into;
use zhijian_core::{LoadReport, Model, Result};

/// Loads a checkpoint into `model`'s backbone. Every backbone parameter must be
/// present with the right shape (else the error lists the missing keys); the
/// head is new unless the checkpoint has one of the same shape. Extra
/// checkpoint keys (an unused pooler, buffers) are reported, not loaded.
pub fn load_pretrained(model: &Model, path: &Path) -> Result<LoadReport> {
    let report = load_into(&model.vs, path, |key| Some(key.to_string()))?;
    let head = format!("{}.", model.head.site().path);
    report.require_complete(path, |name| name.starts_with(&head))?;
    Ok(report)
}
