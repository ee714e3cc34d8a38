//! AdaptFormer: a scaled bottleneck in parallel with the MLP (Chen et al.,
//! NeurIPS 2022, "AdaptFormer: Adapting Vision Transformers for Scalable Visual
//! Recognition", <https://arxiv.org/abs/2205.13535>).
//!
//! In every chosen block the MLP's output becomes `MLP(x) + s · up(dropout(relu(down(x))))`,
//! where `x` is what the MLP saw: `LN(x′)` in a pre-norm ViT (the paper's
//! eq. 3: `x̃ = ReLU(LN(x′) · W_down) · W_up`), and the attention block's
//! normalised output in BERT's post-norm layer. The block then adds the
//! residual as usual.
//!
//! - trains: the bottlenecks and the head; frozen: the whole backbone.
//! - merges: no (ReLU).
//! - artifact: `<block>.adaptmlp.<down|up>.<weight|bias>` (the official module name).
//! - identity at initialisation with the default `init = "zero_up"`: `down`
//!   Kaiming-uniform, `up` and both biases zero, as the official `init_option = "lora"`.
//!
//! Defaults are the official code's (ShoufaChen/AdaptFormer, LAMDA-ZhiJian):
//! bottleneck 64, `s = 0.1`, ReLU, dropout 0.1 (the official block hard-codes
//! `dropout = 0.1`). Deliberate deviation: the official ViT block feeds the
//! adapter the un-normalised residual stream `x′` (`adapter_layernorm_option =
//! "none"`), not `LN(x′)` as the paper writes; the sub-layer hook sees the MLP's
//! input, so we follow the paper. The official `learnable_scalar` option is not offered.
//!
//! Applies to transformer backbones (BERT, ViT); `prepare` refuses CNNs.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use zhijian_core::{Error, Layout, Method, Model, Result, SubLayer, config_table};

use crate::bottleneck::{Activation, BlockSet, Bottleneck, Init, block_prefixes, bottleneck_width, check_dropout, require_transformer};

/// Configuration of AdaptFormer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptFormerConfig {
    /// Bottleneck width. Default (when neither this nor `reduction` is set) 64.
    pub bottleneck: Option<i64>,
    /// Alternatively, the width as hidden size / `reduction`. Default unset.
    pub reduction: Option<i64>,
    /// Scale `s` of the parallel branch. Default 0.1.
    pub scale: f64,
    /// Non-linearity: `"relu"`, `"gelu"`, `"quick_gelu"`. Default `"relu"`.
    pub activation: Activation,
    /// Dropout after the activation, in training. Default 0.1.
    pub dropout: f64,
    /// Initialisation: `"zero_up"`, `"near_identity"`, `"xavier"`, `"normal"`. Default `"zero_up"`.
    pub init: Init,
    /// Blocks to adapt: `"all"`, `"a..b"`, `"a.."`, `"..b"` or a list. Default `"all"`.
    pub blocks: BlockSet,
}

impl Default for AdaptFormerConfig {
    fn default() -> Self {
        AdaptFormerConfig {
            bottleneck: None,
            reduction: None,
            scale: 0.1,
            activation: Activation::Relu,
            dropout: 0.1,
            init: Init::ZeroUp,
            blocks: BlockSet::default(),
        }
    }
}

/// The AdaptFormer method.
pub struct AdaptFormer {
    config: AdaptFormerConfig,
    vs: Option<VarStore>,
    /// Per block, its parallel branch, if adapted.
    blocks: Vec<Option<Bottleneck>>,
}

impl AdaptFormer {
    /// AdaptFormer with `config` (parameters are created by `prepare`).
    pub fn new(config: AdaptFormerConfig) -> Self {
        AdaptFormer { config, vs: None, blocks: Vec::new() }
    }

    /// The parallel branch of block `block`, if adapted.
    pub fn bottleneck(&self, block: usize) -> Option<&Bottleneck> {
        self.blocks.get(block).and_then(Option::as_ref)
    }
}

impl Method for AdaptFormer {
    fn name(&self) -> &'static str {
        "adaptformer"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        require_transformer(model, "adaptformer")?;
        let dim = model.backbone.hidden_size();
        let hidden = bottleneck_width("adaptformer", dim, c.bottleneck, c.reduction, 64)?;
        check_dropout("adaptformer", c.dropout)?;
        if !c.scale.is_finite() {
            return Err(Error::MethodConfig { method: "adaptformer".into(), message: format!("scale must be a finite number, got {}", c.scale) });
        }
        let prefixes = block_prefixes(model);
        let chosen = c.blocks.resolve(prefixes.len(), "adaptformer")?;
        let vs = VarStore::new(model.device());
        self.blocks = (0..prefixes.len())
            .map(|i| {
                chosen.contains(&i).then(|| {
                    let p = format!("{}.adaptmlp", prefixes[i]).split('.').fold(vs.root(), |p, part| p / part);
                    Bottleneck::new(&p, dim, hidden, c.activation, c.dropout, c.init)
                })
            })
            .collect();
        self.vs = Some(vs);
        Ok(())
    }

    fn sublayer(&self, block: usize, at: SubLayer, x: &Tensor, out: Tensor, _layout: &Layout, train: bool) -> Tensor {
        match self.bottleneck(block) {
            Some(b) if at == SubLayer::Mlp => {
                let branch = b.forward(x, train) * self.config.scale;
                out + branch
            }
            _ => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    /// The first block with an adapter: the blocks below it can be cached.
    fn first_block(&self, _model: &Model) -> Option<usize> {
        self.blocks.iter().position(Option::is_some)
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

    /// `MLP(x) + s · up(relu(down x))` from the MLP's input `x`, not its output;
    /// the attention sub-layer is left alone.
    #[test]
    fn hook_adds_the_scaled_branch_of_the_mlp_input() {
        let model = testing::bert(0);
        let mut af = AdaptFormer::new(AdaptFormerConfig { bottleneck: Some(4), scale: 0.5, ..Default::default() });
        af.prepare(&model).unwrap();
        let b = af.bottleneck(0).unwrap();
        assert_eq!(b.down.size(), [4, 16]);
        tch::no_grad(|| {
            b.up.shallow_clone().copy_(&randn(&[16, 4]));
            b.down_bias.shallow_clone().copy_(&randn(&[4]));
        });
        let layout = Layout { lead: 1, inserted: 0, grid: None, observers: 0 };
        let (x, out) = (randn(&[3, 5, 16]), randn(&[3, 5, 16]));
        let got = af.sublayer(0, SubLayer::Mlp, &x, out.shallow_clone(), &layout, false);
        let want = &out + ((x.matmul(&b.down.tr()) + &b.down_bias).relu().matmul(&b.up.tr()) + &b.up_bias) * 0.5;
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
        let from_out = &out + ((out.matmul(&b.down.tr()) + &b.down_bias).relu().matmul(&b.up.tr()) + &b.up_bias) * 0.5;
        assert!(!got.allclose(&from_out, 1e-3, 1e-3, false));
        assert!(af.sublayer(0, SubLayer::Attn, &x, out.shallow_clone(), &layout, false).equal(&out));
        // Dropout 0.1 acts in training only.
        assert!(!af.sublayer(0, SubLayer::Mlp, &x, out.shallow_clone(), &layout, true).allclose(&want, 1e-5, 1e-5, false));
        let mut names: Vec<String> = af.var_store().unwrap().variables().into_keys().filter(|n| n.starts_with("encoder.layer.1.")).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "encoder.layer.1.adaptmlp.down.bias",
                "encoder.layer.1.adaptmlp.down.weight",
                "encoder.layer.1.adaptmlp.up.bias",
                "encoder.layer.1.adaptmlp.up.weight"
            ]
        );
    }

    #[test]
    fn identity_at_init_on_vit_and_bert() {
        for (model, input) in [(testing::vit(0), testing::images()), (testing::bert(0), testing::tokens())] {
            let plain = model.forward(&Ctx::plain(false), &input);
            let mut af = AdaptFormer::new(AdaptFormerConfig::default());
            af.prepare(&model).unwrap();
            assert!(af.identity_at_init());
            assert_eq!(af.bottleneck(1).unwrap().down.size(), [64, 16]);
            let methods: Vec<Box<dyn Method>> = vec![Box::new(af)];
            assert!(model.forward(&Ctx::new(true, &methods, Vec::new()), &input).allclose(&plain, 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn cnns_and_bad_configs_are_errors() {
        let err = AdaptFormer::new(AdaptFormerConfig::default()).prepare(&testing::efficientnet(0)).unwrap_err().to_string();
        assert!(err.contains("adaptformer") && err.contains("efficientnet_lite"), "{err}");
        let model = testing::vit(0);
        for c in [
            AdaptFormerConfig { scale: f64::NAN, ..Default::default() },
            AdaptFormerConfig { bottleneck: Some(0), ..Default::default() },
            AdaptFormerConfig { dropout: -0.5, ..Default::default() },
            AdaptFormerConfig { blocks: BlockSet::Spec("1..1".into()), ..Default::default() },
        ] {
            let err = AdaptFormer::new(c.clone()).prepare(&model).expect_err(&format!("{c:?}"));
            assert!(matches!(&err, Error::MethodConfig { method, .. } if method == "adaptformer"), "{err}");
        }
    }

    #[test]
    fn config_round_trips() {
        let c = AdaptFormerConfig { reduction: Some(8), scale: 1.0, dropout: 0.0, blocks: BlockSet::List(vec![1]), ..Default::default() };
        for c in [AdaptFormerConfig::default(), c] {
            assert_eq!(parse_config::<AdaptFormerConfig>("adaptformer", &AdaptFormer::new(c.clone()).config()).unwrap(), c);
        }
    }
}
