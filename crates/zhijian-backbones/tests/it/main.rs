//! Integration tests of the backbones (one binary: each links LibTorch).

mod bert;
mod efficientnet;
mod mpnet;
mod resnet;
mod roberta;
mod small;
mod vit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

/// Reads a golden file of `tests/fixtures/`.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Writes the golden tensors named `<prefix>…` to `dir/checkpoint.safetensors`
/// without the prefix: a checkpoint under the upstream key names.
pub fn checkpoint(g: &HashMap<String, Tensor>, prefix: &str, dir: &Path) -> PathBuf {
    let weights: Vec<(String, Tensor)> = g.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.shallow_clone()))).collect();
    let path = dir.join("checkpoint.safetensors");
    Tensor::write_safetensors(&weights, &path).unwrap();
    path
}
