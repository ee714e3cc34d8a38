//! Builds an experiment's backbone, with a fresh head, and loads its weights.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use tch::Device;
use zhijian_backbones::{
    Bert, BertConfig, EfficientNetLite, EfficientNetLiteConfig, Mlp, MlpConfig, ResNet, ResNetConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig, load_pretrained,
};
use zhijian_core::{Backbone, Error, ImagePreset, Model, Result};

use crate::experiment::{BackboneConfig, Experiment};
use crate::folder::{ModelDir, checkpoint_file};
use crate::presets::{self, Arch};

/// A located asset file, or a data error saying how to fetch it.
pub fn asset(name: &str, file: &str) -> Result<PathBuf> {
    zhijian_assets::locate(name, file).map_err(|e| Error::Data(e.to_string()))
}

/// The safetensors file of a `weights` entry: an asset name (its first file;
/// a PyTorch `.pth` is converted once into `<cache>/converted/`) or a path
/// relative to the experiment file.
pub fn resolve_weights(spec: &str, base: &Path) -> Result<PathBuf> {
    let Ok(manifest) = zhijian_assets::manifest(spec) else {
        let path = base.join(spec);
        if path.is_file() {
            return Ok(path);
        }
        let known: Vec<String> = zhijian_assets::manifests().unwrap_or_default().into_iter().map(|m| m.name).collect();
        return Err(Error::Config(format!("weights `{spec}` is neither a file ({}) nor an asset; known assets: {}", path.display(), known.join(", "))));
    };
    let file = manifest.files.first().ok_or_else(|| Error::Config(format!("asset `{spec}` lists no files")))?;
    let path = asset(spec, &file.path)?;
    if path.extension().is_some_and(|e| e == "pth") {
        let converted = zhijian_assets::cache_dir().join("converted").join(format!("{spec}.safetensors"));
        if !converted.is_file() {
            eprintln!("converting {} to {}", path.display(), converted.display());
            zhijian_core::pth::convert_pth(&path, &converted)?;
        }
        return Ok(converted);
    }
    Ok(path)
}

/// Builds the experiment's backbone with a fresh `num_classes` head and loads
/// its weights; returns the model and a one-line description.
pub fn build_model(exp: &Experiment, num_classes: i64, device: Device) -> Result<(Model, String)> {
    let (model, desc) = new_model(exp, num_classes, device)?;
    match weights_file(exp)? {
        Some(path) => {
            load_pretrained(&model, &path)?;
            Ok((model, format!("{desc} (pre-trained)")))
        }
        None => Ok((model, format!("{desc} (random init)"))),
    }
}

/// The safetensors file the experiment's backbone loads, located (a `.pth`
/// converted once, a folder's shards merged, a task model's key prefix
/// stripped: see [`crate::folder`]); none for a backbone at random init.
pub fn weights_file(exp: &Experiment) -> Result<Option<PathBuf>> {
    let backbone = concrete(&exp.backbone)?;
    match &*backbone {
        BackboneConfig::Bert { weights, .. } => TextModel::resolve(weights, &exp.base)?.checkpoint().map(Some),
        BackboneConfig::EfficientnetLite { weights, .. } | BackboneConfig::Resnet { weights, .. } | BackboneConfig::Vit { weights, .. } => {
            weights.as_deref().map(|spec| vision_weights(&backbone, spec, &exp.base)).transpose()
        }
        BackboneConfig::SmallCnn { .. } | BackboneConfig::Mlp { .. } => Ok(None),
        BackboneConfig::Preset { .. } => unreachable!("`concrete` expands presets"),
    }
}

/// The `tokenizer.json` of the experiment's text encoder; none when the
/// backbone is not a text encoder.
pub fn tokenizer_file(exp: &Experiment) -> Result<Option<PathBuf>> {
    match &*concrete(&exp.backbone)? {
        BackboneConfig::Bert { weights, .. } => TextModel::resolve(weights, &exp.base)?.file("tokenizer.json").map(Some),
        _ => Ok(None),
    }
}

/// How raw images become the experiment's backbone input (`None` for text).
/// Builds the backbone at random init and loads (or converts) no weights.
pub fn image_preset(exp: &Experiment) -> Result<Option<ImagePreset>> {
    Ok(new_model(exp, 2, Device::Cpu)?.0.backbone.image_preset())
}

/// The backbone a configuration builds, a preset expanded into the
/// configuration it stands for.
pub fn concrete(backbone: &BackboneConfig) -> Result<Cow<'_, BackboneConfig>> {
    match backbone {
        BackboneConfig::Preset { name } => Ok(Cow::Owned(presets::preset(name)?.backbone())),
        other => Ok(Cow::Borrowed(other)),
    }
}

/// A key every BERT-family checkpoint has.
const BERT_ROOT: &str = "embeddings.word_embeddings.weight";

/// A key every checkpoint of the architecture has: it finds a task model's
/// key prefix ([`crate::folder::prefix_to_strip`]).
fn root_key(backbone: &BackboneConfig) -> &'static str {
    match backbone {
        BackboneConfig::EfficientnetLite { .. } => "_conv_stem.weight",
        BackboneConfig::Resnet { .. } => "conv1.weight",
        BackboneConfig::Vit { .. } => "patch_embed.proj.weight",
        _ => BERT_ROOT,
    }
}

/// Where a BERT-family encoder's files (`config.json`, `tokenizer.json`, the
/// weights) are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextModel {
    /// A fetched asset (see `datasets/`).
    Asset(String),
    /// A Hugging Face model folder.
    Folder(ModelDir),
}

impl TextModel {
    /// Resolves a `bert` backbone's `weights`: the name of a `bert` preset
    /// (its asset), an asset name, or a folder relative to the experiment
    /// file (`base`), in that order. Anything else is an error listing the
    /// presets and assets.
    pub fn resolve(weights: &str, base: &Path) -> Result<TextModel> {
        if let Some(p) = presets::find(weights) {
            return match (p.arch, p.asset) {
                (Arch::Bert, Some(asset)) => Ok(TextModel::Asset(asset.into())),
                _ => Err(Error::Config(format!(
                    "preset `{weights}` is a `{}` backbone, not a text encoder; use [backbone] kind = \"preset\", name = \"{weights}\"",
                    p.arch.kind()
                ))),
            };
        }
        if zhijian_assets::manifest(weights).is_ok() {
            return Ok(TextModel::Asset(weights.into()));
        }
        let path = base.join(weights);
        if path.is_dir() {
            return Ok(TextModel::Folder(ModelDir::open(&path)?));
        }
        Err(Error::Config(format!(
            "bert weights `{weights}` are neither a folder ({} is none), nor a text preset or an asset; text presets: {}; assets: {}",
            path.display(),
            presets::PRESETS.iter().filter(|p| p.arch == Arch::Bert).map(|p| p.name).collect::<Vec<_>>().join(", "),
            known_assets()
        )))
    }

    /// A file of the model (`config.json`, `tokenizer.json`), located.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        match self {
            TextModel::Asset(asset_name) => asset(asset_name, name),
            TextModel::Folder(dir) => dir.file(name),
        }
    }

    /// The weights as one safetensors file under the encoder's key names.
    pub fn checkpoint(&self) -> Result<PathBuf> {
        match self {
            TextModel::Asset(asset_name) => asset(asset_name, "model.safetensors"),
            // config.json first: a folder without it cannot build the encoder anyway.
            TextModel::Folder(dir) => dir.file("config.json").and_then(|_| dir.checkpoint(BERT_ROOT)),
        }
    }
}

/// The weights of a vision backbone (`backbone`, presets expanded) from its
/// `weights` entry: a preset of the same architecture, an asset
/// ([`resolve_weights`]), a weights file or a folder relative to `base`. A
/// folder's timm `config.json`, when it has one, must name the same architecture.
fn vision_weights(backbone: &BackboneConfig, spec: &str, base: &Path) -> Result<PathBuf> {
    if let Some(p) = presets::find(spec) {
        if !p.arch.builds(backbone) {
            return Err(Error::Config(format!("weights `{spec}` are a preset for {}, but the backbone is {}", p.arch.config_toml(), describe_arch(backbone))));
        }
        let asset = p.asset.ok_or_else(|| Error::Config(format!("preset `{spec}` ships no weights (random init); leave `weights` out")))?;
        return resolve_weights(asset, base);
    }
    if zhijian_assets::manifest(spec).is_ok() {
        return resolve_weights(spec, base);
    }
    let path = base.join(spec);
    if path.is_dir() {
        let dir = ModelDir::open(&path)?;
        if let Some(config) = dir.config() {
            check_architecture(&config, backbone)?;
        }
        return dir.checkpoint(root_key(backbone));
    }
    if path.is_file() {
        return checkpoint_file(&path, root_key(backbone));
    }
    Err(Error::Config(format!(
        "weights `{spec}` are neither a file nor a folder ({} is none), nor a preset or an asset; presets: {}; assets: {}",
        path.display(),
        presets::names().join(", "),
        known_assets()
    )))
}

/// Checks that a timm `config.json`'s `architecture` (`resnet50`,
/// `vit_tiny_patch16_224`, `efficientnet_lite0`; `tf_` variants too) is the
/// configured backbone; the error says which `[backbone]` fields would build it.
fn check_architecture(config: &Path, backbone: &BackboneConfig) -> Result<()> {
    let text = std::fs::read_to_string(config).map_err(Error::io(config))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::CorruptFile { path: config.into(), reason: e.to_string() })?;
    // Hugging Face configs name `architectures` (a list) instead; only timm's single name is checked.
    let Some(arch) = json.get("architecture").and_then(|a| a.as_str()) else { return Ok(()) };
    let name = arch.strip_prefix("tf_").unwrap_or(arch);
    let Some(preset) = presets::PRESETS.iter().find(|p| p.arch_name() == name) else {
        let known: Vec<&str> = presets::PRESETS.iter().filter(|p| p.asset.is_none()).map(|p| p.arch_name()).collect();
        return Err(Error::Config(format!("{}: architecture `{arch}` is not one zhijian builds; known: {}", config.display(), known.join(", "))));
    };
    if preset.arch.builds(backbone) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{}: architecture `{arch}` needs [backbone] {}, but the experiment configures {}",
        config.display(),
        preset.arch.config_toml(),
        describe_arch(backbone)
    )))
}

/// `kind = "resnet", depth = 18`-style description of a configured backbone.
fn describe_arch(backbone: &BackboneConfig) -> String {
    Arch::of(backbone).map_or_else(|| format!("{backbone:?}"), |a| a.config_toml())
}

fn known_assets() -> String {
    zhijian_assets::manifests().unwrap_or_default().into_iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The experiment's model at random init, and its description.
pub(crate) fn new_model(exp: &Experiment, num_classes: i64, device: Device) -> Result<(Model, String)> {
    // Each config is validated first: the backbone is built inside `Model::new`,
    // which cannot return an error.
    let new = |build: &dyn Fn(tch::nn::Path) -> Box<dyn Backbone>| Model::new(device, num_classes, build);
    let backbone = concrete(&exp.backbone)?;
    let (model, desc) = match &*backbone {
        BackboneConfig::Bert { weights, pooling, layers } => {
            let mut config = BertConfig { pooling: *pooling, ..BertConfig::from_json(&TextModel::resolve(weights, &exp.base)?.file("config.json")?)? };
            let all = config.num_hidden_layers;
            let layers_desc = match *layers {
                None => format!("{all} layers"),
                Some(kept) if (1..=all).contains(&kept) => {
                    config.num_hidden_layers = kept;
                    format!("its first {kept} of {all} layers")
                }
                Some(kept) => return Err(Error::Config(format!("backbone.layers = {kept}: `{weights}` has {all} layers; keep 1 … {all}"))),
            };
            config.validate()?;
            let model = new(&|p| Box::new(Bert::new(p, &config).expect("validated")));
            (model, format!("bert `{weights}` ({layers_desc}, hidden {})", config.hidden_size))
        }
        BackboneConfig::EfficientnetLite { preset, stages, .. } => {
            let config = EfficientNetLiteConfig { stages: *stages, ..EfficientNetLiteConfig::by_name(preset)? };
            config.validate()?;
            let desc = stages.map_or(format!("efficientnet-{preset}"), |kept| format!("efficientnet-{preset} (its first {kept} of 7 stages)"));
            (new(&|p| Box::new(EfficientNetLite::new(p, &config).expect("validated"))), desc)
        }
        BackboneConfig::Resnet { depth, .. } => {
            let config = ResNetConfig::by_depth(*depth)?;
            (new(&|p| Box::new(ResNet::new(p, &config).expect("validated"))), format!("resnet-{depth}"))
        }
        BackboneConfig::Vit { preset, .. } => {
            let config = VitConfig::by_name(preset)?;
            config.validate()?;
            (new(&|p| Box::new(Vit::new(p, &config).expect("validated"))), format!("vit-{preset}"))
        }
        BackboneConfig::SmallCnn { channels, image_size } => {
            let config = SmallCnnConfig { image_size: *image_size, in_chans: 3, channels: channels.clone() };
            config.validate()?;
            (new(&|p| Box::new(SmallCnn::new(p, &config).expect("validated"))), format!("small-cnn {channels:?}"))
        }
        BackboneConfig::Mlp { hidden, image_size } => {
            let config = MlpConfig { image_size: *image_size, in_chans: 3, hidden: hidden.clone() };
            config.validate()?;
            (new(&|p| Box::new(Mlp::new(p, &config).expect("validated"))), format!("mlp {hidden:?}"))
        }
        BackboneConfig::Preset { .. } => unreachable!("`concrete` expands presets"),
    };
    match &exp.backbone {
        BackboneConfig::Preset { name } => Ok((model, format!("preset `{name}`: {desc}"))),
        _ => Ok((model, desc)),
    }
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
