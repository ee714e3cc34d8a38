//! Backbones from a folder, as Hugging Face and timm save them: a `config.json`,
//! the weights as `model.safetensors`, as shards listed by
//! `model.safetensors.index.json`, or as `pytorch_model.bin`, and for a text
//! encoder its `tokenizer.json`.
//!
//! Whatever the layout, the weights become one safetensors file under the
//! backbone's own key names, which the loader and the feature cache read:
//! the folder's `model.safetensors` itself when it needs nothing, else a
//! conversion written once into `<cache>/converted/` (shards merged, a PyTorch
//! pickle read, a task model's prefix such as `bert.` or `roberta.` stripped).
//! A conversion is keyed by the sources' paths, sizes and modification times,
//! so replacing a file converts again (and the older conversion is removed).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tch::Tensor;
use zhijian_core::{Error, Result};

/// The weights files a folder may hold, in the order they are looked for.
pub const WEIGHT_FILES: [&str; 3] = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"];

/// Bumped when a conversion's output changes for the same sources.
const CONVERSION_VERSION: u32 = 1;

/// A backbone folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDir {
    /// The folder.
    pub path: PathBuf,
}

impl ModelDir {
    /// `path` as a backbone folder; an error unless it is a folder.
    pub fn open(path: &Path) -> Result<ModelDir> {
        if !path.is_dir() {
            return Err(Error::Config(format!("backbone folder {} does not exist or is not a folder", path.display())));
        }
        Ok(ModelDir { path: path.to_path_buf() })
    }

    /// The folder's `name`; when it is absent the error names the folder, the
    /// file and the files the folder does hold.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        if path.is_file() { Ok(path) } else { Err(self.missing(&format!("`{name}`"))) }
    }

    /// The folder's `config.json`, if it has one.
    pub fn config(&self) -> Option<PathBuf> {
        Some(self.path.join("config.json")).filter(|p| p.is_file())
    }

    /// The folder's weights as one safetensors file under the model's key
    /// names (see the module documentation); `root` is a key the model has
    /// (`embeddings.word_embeddings.weight`), by which a prefix is found.
    pub fn checkpoint(&self, root: &str) -> Result<PathBuf> {
        let file = WEIGHT_FILES.iter().map(|f| self.path.join(f)).find(|p| p.is_file());
        let file = file.ok_or_else(|| self.missing(&format!("weights file (one of {})", WEIGHT_FILES.join(", "))))?;
        checkpoint_file(&file, root)
    }

    /// "folder F has no WHAT; it holds: …".
    fn missing(&self, what: &str) -> Error {
        let mut held: Vec<String> = std::fs::read_dir(&self.path)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        held.sort();
        let held = if held.is_empty() { "nothing".to_string() } else { held.join(", ") };
        Error::Config(format!("backbone folder {} has no {what}; it holds: {held}", self.path.display()))
    }
}

/// A weights file as one safetensors file under the model's key names: a
/// `.safetensors` file as it is (converted only to strip a prefix), a shard
/// index (`*.safetensors.index.json`) merged, a PyTorch pickle (`.bin`, `.pth`,
/// `.pt`) converted. `root` is a key the model has, by which a prefix is found.
pub fn checkpoint_file(path: &Path, root: &str) -> Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".safetensors") {
        let keys = safetensors_keys(path)?;
        return match prefix_to_strip(keys.iter().map(String::as_str), root) {
            None => Ok(path.to_path_buf()),
            Some(prefix) => convert(&[path.to_path_buf()], path, &|| Ok((Tensor::read_safetensors(path).map_err(corrupt(path))?, Some(prefix.clone())))),
        };
    }
    if name.ends_with(".json") {
        let shards = shard_files(path)?;
        let sources: Vec<PathBuf> = std::iter::once(path.to_path_buf()).chain(shards.iter().cloned()).collect();
        return convert(&sources, path, &|| {
            let mut tensors = Vec::new();
            for shard in &shards {
                tensors.extend(Tensor::read_safetensors(shard).map_err(corrupt(shard))?);
            }
            let prefix = prefix_to_strip(tensors.iter().map(|(k, _)| k.as_str()), root);
            Ok((tensors, prefix))
        });
    }
    if [".bin", ".pth", ".pt"].iter().any(|e| name.ends_with(e)) {
        return convert(&[path.to_path_buf()], path, &|| {
            let tensors = zhijian_core::pth::read_pth(path)?.tensors;
            let prefix = prefix_to_strip(tensors.iter().map(|(k, _)| k.as_str()), root);
            Ok((tensors, prefix))
        });
    }
    Err(Error::Config(format!("weights file {}: expected .safetensors, a shard index (.safetensors.index.json) or a PyTorch .bin/.pth/.pt", path.display())))
}

fn corrupt(path: &Path) -> impl Fn(tch::TchError) -> Error + '_ {
    move |e| Error::CorruptFile { path: path.into(), reason: e.to_string() }
}

/// The tensor names of a safetensors file, read from its header alone.
pub fn safetensors_keys(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let bad = |reason: String| Error::CorruptFile { path: path.into(), reason };
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map_err(Error::io(path))?.len();
    if len > size.saturating_sub(8) {
        return Err(bad(format!("header of {len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    Ok(header.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__").collect())
}

/// The prefix a task model's checkpoint puts before the backbone's keys
/// (`bert.` in `BertForSequenceClassification`, `module.` after
/// `DataParallel`): none when `root` is a key as it is; else what precedes the
/// first key ending in `.root`.
pub fn prefix_to_strip<'a>(keys: impl Iterator<Item = &'a str> + Clone, root: &str) -> Option<String> {
    if keys.clone().any(|k| k == root) {
        return None;
    }
    let dotted = format!(".{root}");
    keys.filter_map(|k| k.strip_suffix(dotted.as_str())).min_by_key(|p| p.len()).map(|p| format!("{p}."))
}

/// The shard files a `model.safetensors.index.json` lists (its `weight_map`
/// values), in order, each checked to exist.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(Error::io(index))?;
    let bad = |reason: String| Error::CorruptFile { path: index.into(), reason };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<&str> =
        map.values().map(|v| v.as_str().ok_or_else(|| bad(format!("weight_map value {v} is not a file name")))).collect::<Result<_>>()?;
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(bad("the weight_map is empty".into()));
    }
    let dir = ModelDir { path: index.parent().unwrap_or(Path::new(".")).to_path_buf() };
    names.into_iter().map(|n| dir.file(n)).collect()
}

type Tensors = Vec<(String, Tensor)>;

/// The conversion of `sources` (read by `read`, which also says the prefix to
/// strip) under `<cache>/converted/`, written once per version of the sources.
fn convert(sources: &[PathBuf], label: &Path, read: &dyn Fn() -> Result<(Tensors, Option<String>)>) -> Result<PathBuf> {
    let mut h = Sha256::new();
    h.update(format!("zhijian converted v{CONVERSION_VERSION}\n"));
    for source in sources {
        let meta = std::fs::metadata(source).map_err(Error::io(source))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let path = source.canonicalize().map_err(Error::io(source))?;
        h.update(format!("{} {} {mtime}\n", path.display(), meta.len()));
    }
    let label_path = label.canonicalize().map_err(Error::io(label))?;
    // `<folder>_<file>-<where>-<which version>`: a new version of the same
    // sources replaces the old conversion instead of piling up beside it.
    let name = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().replace('.', "_")).unwrap_or_default();
    let place = hex::encode(&Sha256::digest(label_path.display().to_string().as_bytes())[..4]);
    let family = format!("{}_{}-{place}-", name(label_path.parent()), name(Some(&label_path)));
    let dir = zhijian_assets::cache_dir().join("converted");
    let out = dir.join(format!("{family}{}.safetensors", hex::encode(&h.finalize()[..8])));
    if out.is_file() {
        return Ok(out);
    }
    let (tensors, prefix) = read()?;
    let tensors: Tensors = match &prefix {
        None => tensors,
        Some(p) => tensors.into_iter().map(|(k, t)| (k.strip_prefix(p.as_str()).map(String::from).unwrap_or(k), t)).collect(),
    };
    let how = match (&prefix, sources.len()) {
        (Some(p), 1) => format!("keys `{p}*` read as `*`"),
        (Some(p), n) => format!("{} shards merged, keys `{p}*` read as `*`", n - 1),
        (None, 1) => "converted".into(),
        (None, n) => format!("{} shards merged", n - 1),
    };
    eprintln!("weights {} ({how}) -> {}", label.display(), out.display());
    zhijian_core::weights::save_atomic(&tensors, &out)?;
    for old in std::fs::read_dir(&dir).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()) {
        let stale = old != out && old.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&family));
        if stale {
            // Best effort: a conversion left behind costs disk, not correctness.
            let _ = std::fs::remove_file(&old);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_found_by_the_root_key() {
        let root = "embeddings.word_embeddings.weight";
        let plain = ["embeddings.word_embeddings.weight", "pooler.dense.weight"];
        assert_eq!(prefix_to_strip(plain.iter().copied(), root), None);
        let task = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight", "classifier.weight"];
        assert_eq!(prefix_to_strip(task.iter().copied(), root).as_deref(), Some("bert."));
        let ddp = ["module.roberta.embeddings.word_embeddings.weight"];
        assert_eq!(prefix_to_strip(ddp.iter().copied(), root).as_deref(), Some("module.roberta."));
        assert_eq!(prefix_to_strip(["conv1.weight"].iter().copied(), root), None);
    }

    #[test]
    fn a_missing_file_names_the_folder_and_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("vocab.txt"), "").unwrap();
        let folder = ModelDir::open(dir.path()).unwrap();
        let err = folder.file("tokenizer.json").unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().display().to_string()) && err.contains("`tokenizer.json`") && err.contains("it holds: config.json, vocab.txt"),
            "{err}"
        );
        let err = folder.checkpoint("x").unwrap_err().to_string();
        assert!(err.contains("model.safetensors, model.safetensors.index.json, pytorch_model.bin"), "{err}");
        let err = ModelDir::open(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("not a folder"), "{err}");
    }

    #[test]
    fn header_keys_and_bad_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        Tensor::write_safetensors(&[("b.x", Tensor::zeros([2], tch::kind::FLOAT_CPU)), ("a.y", Tensor::ones([1], tch::kind::FLOAT_CPU))], &file).unwrap();
        let mut keys = safetensors_keys(&file).unwrap();
        keys.sort();
        assert_eq!(keys, ["a.y", "b.x"]);
        std::fs::write(dir.path().join("short.safetensors"), [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(matches!(safetensors_keys(&dir.path().join("short.safetensors")), Err(Error::CorruptFile { .. })));
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index, r#"{"weight_map": {"a.y": "w.safetensors", "b.x": "model-00002-of-00002.safetensors"}}"#).unwrap();
        let err = checkpoint_file(&index, "a.y").unwrap_err().to_string();
        assert!(err.contains("`model-00002-of-00002.safetensors`") && err.contains("it holds:"), "{err}");
        std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
        assert!(checkpoint_file(&index, "a.y").unwrap_err().to_string().contains("weight_map"));
    }
}
