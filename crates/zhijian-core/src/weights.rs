//! Weight I/O: safetensors in, with key remapping and a report; artifacts out, atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;
use tch::nn::VarStore;

use crate::error::{Error, Result};

/// What a checkpoint load found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Parameters filled from the checkpoint.
    pub loaded: Vec<String>,
    /// Parameters of the model the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint keys the model has no parameter for (e.g. an unused pooler).
    pub unexpected: Vec<String>,
    /// Keys present in both with different shapes: (name, model shape, checkpoint shape).
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl LoadReport {
    /// Fails unless every parameter not accepted by `may_be_missing` was loaded
    /// with the right shape. Mis-shaped keys (all of them, with the file) are
    /// reported before missing ones.
    pub fn require_complete(&self, path: &Path, may_be_missing: impl Fn(&str) -> bool) -> Result<()> {
        let misshapen: Vec<_> = self.mismatched.iter().filter(|(n, ..)| !may_be_missing(n)).cloned().collect();
        if !misshapen.is_empty() {
            return Err(Error::MisshapenWeights { path: path.into(), tensors: misshapen });
        }
        let names: Vec<String> = self.missing.iter().filter(|n| !may_be_missing(n)).cloned().collect();
        if names.is_empty() { Ok(()) } else { Err(Error::MissingWeights { path: path.into(), names }) }
    }
}

/// Reads every tensor of a safetensors file (on CPU). A truncated or foreign
/// file is a [`Error::CorruptFile`] naming the path.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(Error::Io { path: path.into(), source: std::io::ErrorKind::NotFound.into() });
    }
    Tensor::read_safetensors(path).map_err(|e| Error::CorruptFile { path: path.into(), reason: e.to_string() })
}

/// Copies the tensors of a safetensors file into `vs`. `remap` turns a checkpoint
/// key into a parameter name (or `None` to skip the key). Nothing is copied if
/// the file cannot be read; shape-mismatched keys are left untouched.
pub fn load_into(vs: &VarStore, path: &Path, remap: impl Fn(&str) -> Option<String>) -> Result<LoadReport> {
    let tensors = read_safetensors(path)?;
    let mut params: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut report = LoadReport::default();
    tch::no_grad(|| {
        for (key, value) in tensors {
            let Some(name) = remap(&key) else { continue };
            match params.remove(&name) {
                None => report.unexpected.push(key),
                Some(mut p) if p.size() == value.size() => {
                    p.copy_(&value.to_kind(p.kind()).to_device(p.device()));
                    report.loaded.push(name);
                }
                Some(p) => report.mismatched.push((name, p.size(), value.size())),
            }
        }
    });
    let mismatched: Vec<&String> = report.mismatched.iter().map(|(n, ..)| n).collect();
    report.missing = params.into_keys().filter(|n| !mismatched.contains(&n)).collect();
    // Sorted, so the first error reported does not depend on the file's key order.
    report.unexpected.sort();
    report.loaded.sort();
    report.mismatched.sort();
    Ok(report)
}

/// Writes `tensors` to a safetensors file atomically: a temporary file in the
/// same folder, then a rename, so a crash never leaves a half-written artifact.
pub fn save_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<u64> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let tmp = tmp_sibling(path);
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, &tmp)?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))?;
    Ok(std::fs::metadata(path).map_err(Error::io(path))?.len())
}

/// Makes `bytes` the whole of `path` atomically (its folder created if
/// needed): written and synced to a temporary sibling, then renamed over it,
/// so `path` is the old file or the new one at every moment.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    let tmp = tmp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(Error::io(path))
}

/// `dir/.name.tmp-<pid>`: a temporary name next to `path`.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
