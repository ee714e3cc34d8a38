//! Builds an experiment's backbone, with a fresh head, and loads its weights.

use std::path::{Path, PathBuf};

use tch::Device;
use zhijian_backbones::{
    Bert, BertConfig, EfficientNetLite, EfficientNetLiteConfig, Mlp, MlpConfig, ResNet, ResNetConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig, load_pretrained,
};
use zhijian_core::{Backbone, Error, ImagePreset, Model, Result};

use crate::experiment::{BackboneConfig, Experiment};

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
/// converted once); none for a backbone at random init.
pub fn weights_file(exp: &Experiment) -> Result<Option<PathBuf>> {
    let weights = match &exp.backbone {
        BackboneConfig::Bert { weights, .. } => Some(Weights::AssetFile(weights, "model.safetensors")),
        BackboneConfig::EfficientnetLite { weights, .. } | BackboneConfig::Resnet { weights, .. } | BackboneConfig::Vit { weights, .. } => {
            weights.as_deref().map(Weights::Entry)
        }
        BackboneConfig::SmallCnn { .. } | BackboneConfig::Mlp { .. } => None,
    };
    weights.map(|w| w.path(&exp.base)).transpose()
}

/// How raw images become the experiment's backbone input (`None` for text).
/// Builds the backbone at random init and loads (or converts) no weights.
pub fn image_preset(exp: &Experiment) -> Result<Option<ImagePreset>> {
    Ok(new_model(exp, 2, Device::Cpu)?.0.backbone.image_preset())
}

/// Where a backbone's weights come from; located (and converted) only when they load.
enum Weights<'a> {
    /// A file of an asset.
    AssetFile(&'a str, &'static str),
    /// A `weights` entry of the experiment ([`resolve_weights`]).
    Entry(&'a str),
}

impl Weights<'_> {
    fn path(&self, base: &Path) -> Result<PathBuf> {
        match self {
            Weights::AssetFile(name, file) => asset(name, file),
            Weights::Entry(spec) => resolve_weights(spec, base),
        }
    }
}

/// The experiment's model at random init, and its description.
fn new_model(exp: &Experiment, num_classes: i64, device: Device) -> Result<(Model, String)> {
    // Each config is validated first: the backbone is built inside `Model::new`,
    // which cannot return an error.
    let new = |build: &dyn Fn(tch::nn::Path) -> Box<dyn Backbone>| Model::new(device, num_classes, build);
    Ok(match &exp.backbone {
        BackboneConfig::Bert { weights, pooling } => {
            let config = BertConfig { pooling: *pooling, ..BertConfig::from_json(&asset(weights, "config.json")?)? };
            config.validate()?;
            let model = new(&|p| Box::new(Bert::new(p, &config).expect("validated")));
            let desc = format!("bert `{weights}` ({} layers, hidden {})", config.num_hidden_layers, config.hidden_size);
            (model, desc)
        }
        BackboneConfig::EfficientnetLite { preset, .. } => {
            let config = EfficientNetLiteConfig::by_name(preset)?;
            (new(&|p| Box::new(EfficientNetLite::new(p, &config).expect("validated"))), format!("efficientnet-{preset}"))
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
    })
}
