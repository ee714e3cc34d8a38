//! Features of a frozen backbone, computed once and reused: by every strategy
//! and seed of a comparison that trains only a head on them (linear probe, …),
//! and across runs through files keyed by everything that decides them.
//!
//! The key hashes the backbone's configuration, the contents of its weights
//! file (or, at random init, the seed that drew them), the device, and each
//! split's fingerprint: its token ids and mask or pixels, examples, transform
//! and corruption ([`ImageSource::fingerprint`](zhijian_core::ImageSource)),
//! and labels. [`FORMAT`] changes whenever the way features are computed does.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use zhijian_core::train::cache_features;
use zhijian_core::weights::read_safetensors;
use zhijian_core::{Compute, Error, Input, Model, Result, Split};

use crate::data::Data;
use crate::experiment::Experiment;

/// Version of the cached features: part of every key, so files written by an
/// older way of computing features are never read as current.
pub const FORMAT: u32 = 1;

/// Pooled features of every split of an experiment's data.
pub struct FeatureSet {
    /// Training split.
    pub train: Split,
    /// Validation split.
    pub val: Split,
    /// Test split.
    pub test: Split,
    /// Out-of-distribution splits, in the data's order.
    pub ood: Vec<Split>,
}

impl FeatureSet {
    fn splits(&self) -> impl Iterator<Item = &Split> {
        [&self.train, &self.val, &self.test].into_iter().chain(&self.ood)
    }
}

/// Where a run's features came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureOrigin {
    /// The backbone ran over every split in this run.
    Computed,
    /// An earlier run of the same comparison computed or loaded them.
    Memory,
    /// Read from the cache folder, written by an earlier comparison.
    Disk,
}

/// The features of one key held in memory, and optionally a folder that keeps
/// them across runs.
pub struct FeatureCache {
    dir: Option<PathBuf>,
    held: Option<(String, FeatureSet)>,
}

impl FeatureCache {
    /// A cache in memory only (`dir` none) or also in `dir`.
    pub fn new(dir: Option<PathBuf>) -> FeatureCache {
        FeatureCache { dir, held: None }
    }

    /// The features under `key`: held, read from disk, or computed by `model`
    /// (and then written to disk, atomically). A file that cannot be read or
    /// does not fit the data is reported and replaced, never trusted; a file
    /// that cannot be written is reported and the run goes on.
    pub fn get(&mut self, key: &str, model: &Model, data: &Data, batch_size: i64, label: &str) -> Result<(&FeatureSet, FeatureOrigin)> {
        if self.held.as_ref().is_some_and(|(k, _)| k == key) {
            return Ok((&self.held.as_ref().expect("checked").1, FeatureOrigin::Memory));
        }
        let file = self.dir.as_ref().map(|d| d.join(format!("{key}.safetensors")));
        let from_disk = match &file {
            Some(f) if f.is_file() => match read(f, data) {
                Ok(set) => Some(set),
                Err(e) => {
                    eprintln!("{label}: ignoring the cached features {}: {e}; computing them again", f.display());
                    None
                }
            },
            _ => None,
        };
        let (set, origin) = match from_disk {
            Some(set) => (set, FeatureOrigin::Disk),
            None => {
                // fp32 whatever the runs' precision: the cache is shared by every
                // strategy and kept on disk, and its key does not hold a precision.
                let features = |s: &Split| cache_features(model, s, batch_size, Compute::Fp32, label);
                let set = FeatureSet {
                    train: features(&data.train)?,
                    val: features(&data.val)?,
                    test: features(&data.test)?,
                    ood: data.ood.iter().map(features).collect::<Result<_>>()?,
                };
                if let Some(f) = &file {
                    let named: Vec<(String, Tensor)> = set.splits().enumerate().map(|(i, s)| (tensor_name(i), feature_tensor(s).shallow_clone())).collect();
                    // A cache that cannot be written costs later runs time, not this run its result.
                    if let Err(e) = zhijian_core::save_atomic(&named, f) {
                        eprintln!("{label}: could not keep the features in the cache: {e}");
                    }
                }
                (set, FeatureOrigin::Computed)
            }
        };
        self.held = Some((key.to_string(), set));
        Ok((&self.held.as_ref().expect("just set").1, origin))
    }
}

fn tensor_name(i: usize) -> String {
    format!("split.{i}")
}

fn feature_tensor(s: &Split) -> &Tensor {
    match &s.input {
        Input::Features(f) => f,
        _ => unreachable!("cache_features returns features"),
    }
}

/// Reads a feature file for `data`: one `[n, hidden]` float tensor per split,
/// each with that split's number of examples.
fn read(path: &Path, data: &Data) -> Result<FeatureSet> {
    let mut tensors: std::collections::HashMap<String, Tensor> = read_safetensors(path)?.into_iter().collect();
    let splits: Vec<&Split> = [&data.train, &data.val, &data.test].into_iter().chain(&data.ood).collect();
    let mut out = Vec::with_capacity(splits.len());
    for (i, s) in splits.iter().enumerate() {
        let f = tensors.remove(&tensor_name(i)).ok_or_else(|| Error::CorruptFile { path: path.into(), reason: format!("no `{}`", tensor_name(i)) })?;
        if f.dim() != 2 || f.size()[0] != s.len() || f.kind() != Kind::Float {
            return Err(Error::CorruptFile {
                path: path.into(),
                reason: format!("`{}` is {:?} {:?}, split `{}` has {} examples", tensor_name(i), f.kind(), f.size(), s.name, s.len()),
            });
        }
        out.push(Split { name: s.name.clone(), input: Input::Features(f), labels: s.labels.shallow_clone() });
    }
    let mut out = out.into_iter();
    let mut next = || out.next().expect("one per split");
    Ok(FeatureSet { train: next(), val: next(), test: next(), ood: out.collect() })
}

/// The key of an experiment's features: see the module's documentation.
/// `weights` is the digest of the weights file ([`file_digest`]); without
/// weights the backbone is drawn from `seed`, which then joins the key.
pub fn feature_key(exp: &Experiment, weights: Option<&str>, seed: u64, device: Device, data: &Data) -> Result<String> {
    let mut h = Sha256::new();
    let backbone = serde_json::to_string(&exp.backbone).map_err(|e| Error::Config(e.to_string()))?;
    h.update(format!("zhijian features v{FORMAT} {}\n{backbone}\n", env!("CARGO_PKG_VERSION")));
    match weights {
        Some(digest) => h.update(format!("weights {digest}\n")),
        None => h.update(format!("random init, seed {seed}\n")),
    }
    h.update(format!("{device:?}\n"));
    for s in [&data.train, &data.val, &data.test].into_iter().chain(&data.ood) {
        h.update(format!("{} {}\n", s.name, split_fingerprint(s)?));
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

/// SHA-256 of a file's contents, hex.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).map_err(Error::io(path))?;
    Ok(hex::encode(h.finalize()))
}

/// A digest of a split's inputs and labels.
fn split_fingerprint(s: &Split) -> Result<String> {
    let mut h = Sha256::new();
    match &s.input {
        Input::Tokens { ids, mask } => {
            h.update("tokens");
            h.update(tensor_bytes(ids));
            h.update(tensor_bytes(mask));
        }
        Input::Images(t) => {
            h.update("images");
            h.update(tensor_bytes(t));
        }
        Input::Features(t) => {
            h.update("features");
            h.update(tensor_bytes(t));
        }
        Input::Hidden { block, states, mask } => {
            h.update(format!("hidden at block {block}"));
            h.update(tensor_bytes(states));
            h.update(tensor_bytes(mask));
        }
        Input::Lazy(source) => {
            h.update("lazy");
            h.update(source.fingerprint()?);
        }
    }
    h.update(tensor_bytes(&s.labels));
    Ok(hex::encode(h.finalize()))
}

/// The bytes of a tensor (with its kind and shape), whatever its kind.
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let mut out = format!("{:?} {:?}:", t.kind(), t.size()).into_bytes();
    let flat = t.to_device(Device::Cpu).contiguous().flatten(0, -1);
    out.extend(Vec::<u8>::try_from(flat.view_dtype(Kind::Uint8)).expect("uint8 view of a contiguous CPU tensor"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(backbone: &str) -> Experiment {
        let text = format!(
            "name = \"k\"\n[backbone]\n{backbone}\n[data]\nkind = \"mnist\"\n[[strategy]]\nname = \"p\"\nmethods = [{{ method = \"linear_probe\" }}]\n"
        );
        toml::from_str(&text).unwrap()
    }

    fn data(first_label: i64) -> Data {
        let split = |name: &str, n: i64| Split {
            name: name.into(),
            input: Input::Images(Tensor::arange(n * 3 * 4, (Kind::Float, Device::Cpu)).reshape([n, 3, 2, 2])),
            labels: Tensor::from_slice(&[first_label, 1, 0][..n as usize]),
        };
        Data { train: split("train", 3), val: split("val", 2), test: split("test", 2), ood: vec![split("noise", 1)], classes: vec!["a".into(), "b".into()] }
    }

    /// Features are shared across seeds for loaded weights, never for a backbone drawn
    /// from the seed; every input of the computation moves the key.
    #[test]
    fn keys_follow_what_decides_the_features() {
        let (cnn, lite) = (experiment("kind = \"small_cnn\""), experiment("kind = \"efficientnet_lite\"\nweights = \"w.safetensors\""));
        let key = |e: &Experiment, w: Option<&str>, seed: u64, label: i64| feature_key(e, w, seed, Device::Cpu, &data(label)).unwrap();
        let base = key(&lite, Some("d1"), 0, 0);
        assert_eq!(base, key(&lite, Some("d1"), 7, 0), "weights loaded: the seed does not matter");
        assert_ne!(key(&cnn, None, 0, 0), key(&cnn, None, 1, 0), "random init: the seed draws the backbone");
        assert_ne!(base, key(&lite, Some("d2"), 0, 0), "other weights");
        assert_ne!(base, key(&lite, Some("d1"), 0, 1), "other labels");
        assert_ne!(base, key(&experiment("kind = \"efficientnet_lite\"\npreset = \"lite1\"\nweights = \"w.safetensors\""), Some("d1"), 0, 0));
        let mut shifted = data(0);
        shifted.test.input = Input::Images(Tensor::ones([2, 3, 2, 2], (Kind::Float, Device::Cpu)));
        assert_ne!(base, feature_key(&lite, Some("d1"), 0, Device::Cpu, &shifted).unwrap(), "other test images");
    }

    #[test]
    fn tensor_bytes_see_kind_shape_and_every_value() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let base = tensor_bytes(&a);
        assert_eq!(base.len(), format!("{:?} {:?}:", Kind::Float, [4]).len() + 16);
        assert_eq!(base, tensor_bytes(&a.copy()));
        assert_ne!(base, tensor_bytes(&a.reshape([2, 2])));
        assert_ne!(base, tensor_bytes(&a.to_kind(Kind::Double)));
        let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.5]);
        assert_ne!(base, tensor_bytes(&b));
        // A strided view is read in its logical order.
        let t = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([2, 2]);
        assert_eq!(tensor_bytes(&t.tr()), tensor_bytes(&Tensor::from_slice(&[1i64, 3, 2, 4]).reshape([2, 2])));
    }
}
