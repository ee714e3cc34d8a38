//! Adapter: sequential bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient
//! Transfer Learning for NLP", <https://arxiv.org/abs/1902.00751>).
//!
//! After the attention sub-layer and after the MLP sub-layer of every chosen
//! block, before the residual add, the sub-layer output `h` becomes
//! `h + up(dropout(act(down(h))))` with a [`Bottleneck`] `d → r → d`.
//!
//! - trains: the bottlenecks and the head; frozen: the whole backbone.
//! - merges: no (the bottleneck is non-linear).
//! - artifact: the bottlenecks, named `<block>.adapter_<attn|mlp>.<down|up>.<weight|bias>`
//!   (`blocks.3.adapter_mlp.down.weight` in a ViT, `encoder.layer.3.adapter_attn.up.bias` in BERT).
//! - identity at initialisation with the default `init = "zero_up"` (`up` = 0).
//!
//! Defaults follow LAMDA-ZhiJian's adapter (bottleneck 8, QuickGELU, dropout 0)
//! at Houlsby's places (both sub-layers). Deliberate deviations:
//! - LAMDA-ZhiJian initialises both projections Xavier-uniform (`init = "xavier"`)
//!   and Houlsby's adapter-bert both from a ±2σ truncated normal with σ = 1e-3
//!   (`init = "near_identity"`); the default here zero-initialises `up`, so the
//!   pre-trained model is exactly unchanged at the start (as LoRA and AdaptFormer do).
//! - Houlsby applies the adapter after the sub-layer's dropout; here it sees
//!   the output before dropout (where the hook is); with the backbone's
//!   dropout off, as in PETL practice, the two are the same.
//! - Houlsby also trains the layer norms; combine with a norm-tuning method for that.
//!
//! Applies to transformer backbones (BERT, ViT); `prepare` refuses CNNs.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use zhijian_core::{Error, Layout, Method, Model, Result, SubLayer, config_table};

use crate::bottleneck::{Activation, BlockSet, Bottleneck, Init, block_prefixes, bottleneck_width, check_dropout, require_transformer};

/// Configuration of the sequential adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterConfig {
    /// Sub-layers followed by an adapter: `"attn"`, `"mlp"`. Default both (Houlsby).
    pub at: Vec<SubLayer>,
    /// Bottleneck width `r`. Default (when neither this nor `reduction` is set) 8, as LAMDA-ZhiJian.
    pub bottleneck: Option<i64>,
    /// Alternatively, the width as hidden size / `reduction`. Default unset.
    pub reduction: Option<i64>,
    /// Non-linearity: `"gelu"`, `"relu"`, `"quick_gelu"`. Default `"quick_gelu"` (LAMDA-ZhiJian).
    pub activation: Activation,
    /// Dropout after the activation, in training. Default 0.
    pub dropout: f64,
    /// Initialisation: `"zero_up"`, `"near_identity"`, `"xavier"`, `"normal"`. Default `"zero_up"`.
    pub init: Init,
    /// Blocks to adapt: `"all"`, `"a..b"`, `"a.."`, `"..b"` or a list. Default `"all"`.
    pub blocks: BlockSet,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            at: vec![SubLayer::Attn, SubLayer::Mlp],
            bottleneck: None,
            reduction: None,
            activation: Activation::QuickGelu,
            dropout: 0.0,
            init: Init::ZeroUp,
            blocks: BlockSet::default(),
        }
    }
}

/// Index of a sub-layer in a block's pair of adapters.
pub(crate) fn slot(at: SubLayer) -> usize {
    match at {
        SubLayer::Attn => 0,
        SubLayer::Mlp => 1,
    }
}

/// Name of a sub-layer in variable paths.
pub(crate) fn sublayer_name(at: SubLayer) -> &'static str {
    match at {
        SubLayer::Attn => "attn",
        SubLayer::Mlp => "mlp",
    }
}

/// The sequential adapter method.
pub struct Adapter {
    config: AdapterConfig,
    vs: Option<VarStore>,
    /// Per block, the adapters after its attention and its MLP sub-layer.
    blocks: Vec<[Option<Bottleneck>; 2]>,
    /// Per block, its variable prefix.
    prefixes: Vec<String>,
    name: &'static str,
}

impl Adapter {
    /// The adapter with `config` (parameters are created by `prepare`).
    pub fn new(config: AdapterConfig) -> Self {
        Adapter { config, vs: None, blocks: Vec::new(), prefixes: Vec::new(), name: "adapter" }
    }

    /// An adapter that reports errors as `name` (for methods built on it).
    pub(crate) fn named(config: AdapterConfig, name: &'static str) -> Self {
        Adapter { name, ..Adapter::new(config) }
    }

    /// The bottleneck after sub-layer `at` of block `block`, if adapted.
    pub fn bottleneck(&self, block: usize, at: SubLayer) -> Option<&Bottleneck> {
        self.blocks.get(block).and_then(|pair| pair[slot(at)].as_ref())
    }

    /// Gives every bottleneck all-ones masks (`<path>.down.mask`, `<path>.up.mask`) in the store.
    pub(crate) fn add_masks(&mut self) {
        let vs = self.vs.as_ref().expect("masks are added after prepare");
        for (pair, prefix) in self.blocks.iter_mut().zip(&self.prefixes) {
            for at in [SubLayer::Attn, SubLayer::Mlp] {
                if let Some(b) = pair[slot(at)].as_mut() {
                    b.add_masks(&Adapter::path(prefix, at).split('.').fold(vs.root(), |p, part| p / part));
                }
            }
        }
    }

    /// Every bottleneck, in block order (attention first).
    pub fn bottlenecks(&self) -> impl Iterator<Item = &Bottleneck> {
        self.blocks.iter().flat_map(|pair| pair.iter().flatten())
    }

    /// The variable prefix of the adapter after `at` in the block at `prefix`.
    pub(crate) fn path(prefix: &str, at: SubLayer) -> String {
        format!("{prefix}.adapter_{}", sublayer_name(at))
    }

    /// The same adapter over the same tensors, without a store of its own: a
    /// method to put in a [`zhijian_core::Ctx`] for gradients of these parameters.
    pub(crate) fn share(&self) -> Adapter {
        Adapter {
            config: self.config.clone(),
            vs: None,
            blocks: self.blocks.iter().map(|pair| [0, 1].map(|i| pair[i].as_ref().map(Bottleneck::share))).collect(),
            prefixes: self.prefixes.clone(),
            name: self.name,
        }
    }
}

impl Method for Adapter {
    fn name(&self) -> &'static str {
        self.name
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        require_transformer(model, self.name)?;
        let dim = model.backbone.hidden_size();
        let hidden = bottleneck_width(self.name, dim, c.bottleneck, c.reduction, 8)?;
        check_dropout(self.name, c.dropout)?;
        if c.at.is_empty() {
            return Err(Error::MethodConfig { method: self.name.into(), message: "`at` is empty: name \"attn\", \"mlp\" or both".into() });
        }
        let prefixes = block_prefixes(model);
        let chosen = c.blocks.resolve(prefixes.len(), self.name)?;
        let vs = VarStore::new(model.device());
        let mut blocks: Vec<[Option<Bottleneck>; 2]> = (0..prefixes.len()).map(|_| [None, None]).collect();
        for &i in &chosen {
            for at in [SubLayer::Attn, SubLayer::Mlp].into_iter().filter(|at| c.at.contains(at)) {
                let p = Adapter::path(&prefixes[i], at).split('.').fold(vs.root(), |p, part| p / part);
                blocks[i][slot(at)] = Some(Bottleneck::new(&p, dim, hidden, c.activation, c.dropout, c.init));
            }
        }
        self.blocks = blocks;
        self.prefixes = prefixes;
        self.vs = Some(vs);
        Ok(())
    }

    fn sublayer(&self, block: usize, at: SubLayer, _x: &Tensor, out: Tensor, _layout: &Layout, train: bool) -> Tensor {
        match self.bottleneck(block, at) {
            Some(b) => {
                let delta = b.forward(&out, train);
                out + delta
            }
            None => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    /// The first block with an adapter: the blocks below it can be cached.
    fn first_block(&self, _model: &Model) -> Option<usize> {
        self.blocks.iter().position(|pair| pair.iter().any(Option::is_some))
    }

    fn identity_at_init(&self) -> bool {
        self.config.init.zero_output()
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::{Device, Kind};
    use zhijian_core::{Ctx, parse_config};

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn layout() -> Layout {
        Layout { lead: 1, inserted: 0, grid: Some([4, 4]), observers: 0 }
    }

    /// `h + up(quick_gelu(down h))` on the sub-layer output, nothing where no adapter sits.
    #[test]
    fn hook_adds_the_bottleneck_of_the_output() {
        let model = testing::vit(0);
        let mut adapter = Adapter::new(AdapterConfig { at: vec![SubLayer::Mlp], blocks: BlockSet::List(vec![1]), ..Default::default() });
        adapter.prepare(&model).unwrap();
        let b = adapter.bottleneck(1, SubLayer::Mlp).unwrap();
        assert_eq!((b.down.size(), b.up.size()), (vec![8, 16], vec![16, 8]));
        tch::no_grad(|| {
            b.up.shallow_clone().copy_(&randn(&[16, 8]));
            b.up_bias.shallow_clone().copy_(&randn(&[16]));
        });
        let (x, out) = (randn(&[2, 17, 16]), randn(&[2, 17, 16]));
        let got = adapter.sublayer(1, SubLayer::Mlp, &x, out.shallow_clone(), &layout(), false);
        let h = out.matmul(&b.down.tr()) + &b.down_bias;
        let want = &out + (&h * (&h * 1.702).sigmoid()).matmul(&b.up.tr()) + &b.up_bias;
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
        assert!(!got.allclose(&out, 1e-3, 1e-3, false));
        // No adapter after block 1's attention, nor anywhere in block 0.
        assert!(adapter.sublayer(1, SubLayer::Attn, &x, out.shallow_clone(), &layout(), false).equal(&out));
        assert!(adapter.sublayer(0, SubLayer::Mlp, &x, out.shallow_clone(), &layout(), false).equal(&out));
        let mut names: Vec<String> = adapter.var_store().unwrap().variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["blocks.1.adapter_mlp.down.bias", "blocks.1.adapter_mlp.down.weight", "blocks.1.adapter_mlp.up.bias", "blocks.1.adapter_mlp.up.weight"]
        );
    }

    /// With `up` = 0 the whole model is unchanged (ViT and BERT, every block,
    /// both sub-layers); Xavier init is not the identity.
    #[test]
    fn identity_at_init_on_vit_and_bert() {
        for (model, input) in [(testing::vit(0), testing::images()), (testing::bert(0), testing::tokens())] {
            let plain = model.forward(&Ctx::plain(false), &input);
            let mut adapter = Adapter::new(AdapterConfig { reduction: Some(4), ..Default::default() });
            adapter.prepare(&model).unwrap();
            assert!(adapter.identity_at_init());
            assert_eq!(adapter.bottlenecks().count(), 4);
            assert_eq!(adapter.bottleneck(0, SubLayer::Attn).unwrap().down.size(), [4, 16]);
            let methods: Vec<Box<dyn Method>> = vec![Box::new(adapter)];
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).allclose(&plain, 1e-6, 1e-6, false));

            let mut xavier = Adapter::new(AdapterConfig { init: Init::Xavier, ..Default::default() });
            xavier.prepare(&model).unwrap();
            assert!(!xavier.identity_at_init());
            let methods: Vec<Box<dyn Method>> = vec![Box::new(xavier)];
            assert!(!model.forward(&Ctx::new(false, &methods, Vec::new()), &input).allclose(&plain, 1e-4, 1e-4, false));
        }
    }

    #[test]
    fn cnns_and_bad_configs_are_errors() {
        for model in [testing::cnn(0), testing::efficientnet(0)] {
            let err = Adapter::new(AdapterConfig::default()).prepare(&model).unwrap_err().to_string();
            assert!(err.contains("adapter") && err.contains(model.backbone.arch()) && err.contains("bert, vit"), "{err}");
        }
        let model = testing::bert(0);
        let bad = [
            AdapterConfig { bottleneck: Some(0), ..Default::default() },
            AdapterConfig { bottleneck: Some(4), reduction: Some(4), ..Default::default() },
            AdapterConfig { dropout: 1.0, ..Default::default() },
            AdapterConfig { at: vec![], ..Default::default() },
            AdapterConfig { blocks: BlockSet::List(vec![2]), ..Default::default() },
        ];
        for c in bad {
            let err = Adapter::new(c.clone()).prepare(&model).expect_err(&format!("{c:?}"));
            assert!(matches!(&err, Error::MethodConfig { method, .. } if method == "adapter"), "{err}");
        }
        let unknown: toml::Table = toml::from_str("bottlenek = 4").unwrap();
        assert!(parse_config::<AdapterConfig>("adapter", &unknown).unwrap_err().to_string().contains("bottlenek"));
    }

    #[test]
    fn config_round_trips() {
        for c in [
            AdapterConfig::default(),
            AdapterConfig {
                at: vec![SubLayer::Attn],
                bottleneck: Some(16),
                activation: Activation::Gelu,
                dropout: 0.1,
                init: Init::NearIdentity,
                blocks: BlockSet::Spec("1..".into()),
                ..Default::default()
            },
            AdapterConfig { reduction: Some(4), blocks: BlockSet::List(vec![0, 2]), ..Default::default() },
        ] {
            let table = Adapter::new(c.clone()).config();
            assert_eq!(parse_config::<AdapterConfig>("adapter", &table).unwrap(), c, "{table}");
        }
        let table: toml::Table = toml::from_str("at = [\"mlp\"]\nactivation = \"relu\"\nblocks = \"..1\"").unwrap();
        let c: AdapterConfig = parse_config("adapter", &table).unwrap();
        assert_eq!((c.at, c.activation, c.blocks), (vec![SubLayer::Mlp], Activation::Relu, BlockSet::Spec("..1".into())));
    }
}
