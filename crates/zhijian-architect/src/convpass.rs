//! Convpass: convolutional bypasses beside the attention and the MLP of a ViT
//! (Jie & Deng 2022, "Convolutional Bypasses Are Better Vision Transformer
//! Adapters", <https://arxiv.org/abs/2207.07039>; reference JieShibo/PETL-ViT `convpass/vtab/convpass.py`).
//!
//! Beside each chosen sub-layer, given what it saw (`x = LN(x′)`), the output becomes
//! `out + s · up(dropout(qgelu(conv(qgelu(down(x))))))`: `down: d → c` per
//! token (a 1×1 convolution), the content (patch) tokens reshaped to the patch
//! grid `[rows, cols]` and convolved 3×3 (`c → c`, padding 1), QuickGELU
//! before and after it, dropout 0.1, `up: c → d` per token. Tokens outside the
//! grid (the class token, tokens other methods inserted) go through the same
//! convolution as 1×1 images, as the reference does for the class token: with
//! padding 1 only the kernel's centre tap and the bias act on them.
//!
//! - trains: the bypasses and the head; frozen: the whole backbone.
//! - merges: no (non-linear).
//! - artifact: `<block>.convpass_<attn|mlp>.<down|conv|up>.<weight|bias>`.
//! - identity at initialisation: `up` (weight and bias) is zero, as in the reference.
//!
//! Initialisation as the reference: `down` Xavier-uniform with zero bias; the
//! convolution's bias zero and its weight either Xavier-uniform
//! (`conv_init = "xavier"`, LAMDA-ZhiJian's default and most reference VTAB
//! configs) or the identity at the centre tap (`"identity"`: zeros plus `I`
//! at `[:, :, 1, 1]`, the reference's `xavier_init = False`; it hard-codes
//! `I₈`, here `I_c`). Defaults: `dim` 8, `s` 0.01 (LAMDA-ZhiJian; the reference
//! tunes `s` per dataset in {0.01, …, 100}), bypasses beside both sub-layers
//! (`at = ["attn"]` is the reference's `convpass_attn`). Deviation: the
//! reference's drop-path on the bypass is not offered (the backbones here have none).
//!
//! ViT only: BERT's tokens are a 1-d sequence with no patch grid, and CNNs
//! have no token sequence; `prepare` says so.

use serde::{Deserialize, Serialize};
use tch::nn::{Path, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Layout, Method, Model, Result, Role, SubLayer, config_table};

use crate::adapter::{slot, sublayer_name};
use crate::bottleneck::{Activation, BlockSet, block_prefixes, check_dropout, xavier_uniform};
use zhijian_core::layers;
use zhijian_core::precision::cast_like;

/// How the 3×3 convolution of a bypass starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvInit {
    /// Xavier-uniform weight (fan = 9·dim both ways).
    Xavier,
    /// Zero weight plus the identity at the centre tap: the convolution starts as the identity map.
    Identity,
}

/// Configuration of Convpass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvpassConfig {
    /// Sub-layers with a bypass beside them: `"attn"`, `"mlp"`. Default both.
    pub at: Vec<SubLayer>,
    /// Channels `c` of the bypass. Default 8.
    pub dim: i64,
    /// Scale `s` of the bypass. Default 0.01.
    pub scale: f64,
    /// Initialisation of the convolution: `"xavier"` or `"identity"`. Default `"xavier"`.
    pub conv_init: ConvInit,
    /// Dropout before `up`, in training. Default 0.1 (the reference's).
    pub dropout: f64,
    /// Blocks to adapt: `"all"`, `"a..b"`, `"a.."`, `"..b"` or a list. Default `"all"`.
    pub blocks: BlockSet,
}

impl Default for ConvpassConfig {
    fn default() -> Self {
        ConvpassConfig { at: vec![SubLayer::Attn, SubLayer::Mlp], dim: 8, scale: 0.01, conv_init: ConvInit::Xavier, dropout: 0.1, blocks: BlockSet::default() }
    }
}

/// One convolutional bypass.
#[derive(Debug)]
pub struct Bypass {
    /// `down` weight `[c, d]`.
    pub down: Tensor,
    /// `down` bias `[c]`.
    pub down_bias: Tensor,
    /// Convolution weight `[c, c, 3, 3]`.
    pub conv: Tensor,
    /// Convolution bias `[c]`.
    pub conv_bias: Tensor,
    /// `up` weight `[d, c]`.
    pub up: Tensor,
    /// `up` bias `[d]`.
    pub up_bias: Tensor,
}

impl Bypass {
    fn new(p: &Path, d: i64, c: i64, conv_init: ConvInit) -> Bypass {
        let opts = (Kind::Float, p.device());
        let conv = match conv_init {
            ConvInit::Xavier => xavier_uniform([c, c, 3, 3], 9 * c, 9 * c, p),
            ConvInit::Identity => {
                let w = Tensor::zeros([c, c, 3, 3], opts);
                w.select(3, 1).select(2, 1).copy_(&Tensor::eye(c, opts));
                w
            }
        };
        let (pd, pc, pu) = (p / "down", p / "conv", p / "up");
        Bypass {
            down: pd.add("weight", xavier_uniform([c, d], d, c, p), true),
            down_bias: pd.add("bias", Tensor::zeros([c], opts), true),
            conv: pc.add("weight", conv, true),
            conv_bias: pc.add("bias", Tensor::zeros([c], opts), true),
            up: pu.add("weight", Tensor::zeros([d, c], opts), true),
            up_bias: pu.add("bias", Tensor::zeros([d], opts), true),
        }
    }

    /// The bypass output (before the scale).
    ///
    /// # Shapes
    /// `x`: `[batch, lead + inserted + rows·cols, d]` → same.
    fn forward(&self, x: &Tensor, layout: &Layout, dropout: f64, train: bool) -> Tensor {
        let qgelu = |t: &Tensor| Activation::QuickGelu.apply(t);
        let [rows, cols] = layout.grid.expect("convpass: the backbone gave no patch grid (prepare checks for a ViT)");
        // In the activations' precision (bf16 under mixed precision).
        let [down, down_bias, conv, conv_bias, up, up_bias] =
            [&self.down, &self.down_bias, &self.conv, &self.conv_bias, &self.up, &self.up_bias].map(|w| cast_like(w, x));
        let h = qgelu(&x.linear(&down, Some(&down_bias)));
        let (b, t, c) = h.size3().expect("convpass input must be [batch, tokens, dim]");
        let start = layout.content_start();
        assert_eq!(t - start, rows * cols, "convpass: {t} tokens with {start} before the content do not fit a {rows}×{cols} patch grid");
        let grid = h.narrow(1, start, rows * cols).reshape([b, rows, cols, c]).permute([0, 3, 1, 2]);
        let grid = grid.conv2d(&conv, Some(&conv_bias), [1, 1], [1, 1], [1, 1], 1).permute([0, 2, 3, 1]).reshape([b, rows * cols, c]);
        // A 3×3 convolution with padding 1 of a 1×1 image sees only its centre tap.
        let single = h.narrow(1, 0, start).linear(&conv.select(3, 1).select(2, 1), Some(&conv_bias));
        let h = qgelu(&Tensor::cat(&[single, grid], 1));
        let h = layers::dropout(&h, dropout, train);
        h.linear(&up, Some(&up_bias))
    }
}

/// The Convpass method.
pub struct Convpass {
    config: ConvpassConfig,
    vs: Option<VarStore>,
    /// Per block, the bypasses beside its attention and its MLP.
    blocks: Vec<[Option<Bypass>; 2]>,
}

impl Convpass {
    /// Convpass with `config` (parameters are created by `prepare`).
    pub fn new(config: ConvpassConfig) -> Self {
        Convpass { config, vs: None, blocks: Vec::new() }
    }

    /// The bypass beside sub-layer `at` of block `block`, if adapted.
    pub fn bypass(&self, block: usize, at: SubLayer) -> Option<&Bypass> {
        self.blocks.get(block).and_then(|pair| pair[slot(at)].as_ref())
    }
}

impl Method for Convpass {
    fn name(&self) -> &'static str {
        "convpass"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "convpass".into(), message });
        let arch = model.backbone.arch();
        // A ViT's tokens come from a convolutional patch embedding: that is where the grid is.
        let has_grid = model.sites().iter().any(|s| s.role == Role::Stem && s.conv.is_some());
        if !model.has_attention() {
            return bad(format!("needs a vision transformer (vit) with a patch grid; {arch} has no token sequence"));
        }
        if !has_grid {
            return bad(format!("needs a vision transformer (vit) with a patch grid; {arch}'s tokens are a 1-d sequence with no grid to convolve over"));
        }
        if c.dim < 1 {
            return bad(format!("dim must be ≥ 1, got {}", c.dim));
        }
        if !c.scale.is_finite() {
            return bad(format!("scale must be a finite number, got {}", c.scale));
        }
        if c.at.is_empty() {
            return bad("`at` is empty: name \"attn\", \"mlp\" or both".into());
        }
        check_dropout("convpass", c.dropout)?;
        let prefixes = block_prefixes(model);
        let chosen = c.blocks.resolve(prefixes.len(), "convpass")?;
        let d = model.backbone.hidden_size();
        let vs = VarStore::new(model.device());
        let mut blocks: Vec<[Option<Bypass>; 2]> = (0..prefixes.len()).map(|_| [None, None]).collect();
        for &i in &chosen {
            for at in [SubLayer::Attn, SubLayer::Mlp].into_iter().filter(|at| c.at.contains(at)) {
                let path = format!("{}.convpass_{}", prefixes[i], sublayer_name(at));
                let p = path.split('.').fold(vs.root(), |p, part| p / part);
                blocks[i][slot(at)] = Some(Bypass::new(&p, d, c.dim, c.conv_init));
            }
        }
        self.blocks = blocks;
        self.vs = Some(vs);
        Ok(())
    }

    fn sublayer(&self, block: usize, at: SubLayer, x: &Tensor, out: Tensor, layout: &Layout, train: bool) -> Tensor {
        match self.bypass(block, at) {
            Some(bypass) => {
                let branch = bypass.forward(x, layout, self.config.dropout, train) * self.config.scale;
                out + branch
            }
            None => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn identity_at_init(&self) -> bool {
        true
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
    use tch::Device;
    use zhijian_core::{Ctx, parse_config};

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn qgelu(t: &Tensor) -> Tensor {
        t * (t * 1.702).sigmoid()
    }

    /// The bypass written out token by token: the 3×3 neighbourhood of each
    /// patch (row-major token order, zeros outside the grid), and the centre
    /// tap alone for the class and inserted tokens.
    fn by_hand(p: &Bypass, x: &Tensor, layout: &Layout, s: f64) -> Tensor {
        let [rows, cols] = layout.grid.unwrap();
        let start = layout.content_start();
        let h = qgelu(&(x.matmul(&p.down.tr()) + &p.down_bias)); // [b, t, c]
        let mut tokens = Vec::new();
        for t in 0..start {
            tokens.push(h.select(1, t).matmul(&p.conv.select(3, 1).select(2, 1).tr()) + &p.conv_bias);
        }
        for r in 0..rows {
            for c in 0..cols {
                let mut acc = h.select(1, 0).zeros_like() + &p.conv_bias;
                for dr in -1..=1i64 {
                    for dc in -1..=1i64 {
                        let (rr, cc) = (r + dr, c + dc);
                        if (0..rows).contains(&rr) && (0..cols).contains(&cc) {
                            let tap = p.conv.select(3, dc + 1).select(2, dr + 1); // [c_out, c_in]
                            acc += h.select(1, start + rr * cols + cc).matmul(&tap.tr());
                        }
                    }
                }
                tokens.push(acc);
            }
        }
        (qgelu(&Tensor::stack(&tokens, 1)).matmul(&p.up.tr()) + &p.up_bias) * s
    }

    fn randomise_up(p: &Bypass) {
        tch::no_grad(|| {
            p.up.shallow_clone().copy_(&randn(&p.up.size()));
            p.up_bias.shallow_clone().copy_(&randn(&p.up_bias.size()));
            p.conv_bias.shallow_clone().copy_(&randn(&p.conv_bias.size()));
        });
    }

    #[test]
    fn hook_is_the_convolutional_bypass_of_the_input() {
        let model = testing::vit(0);
        let mut cp = Convpass::new(ConvpassConfig { dim: 3, scale: 0.5, ..Default::default() });
        cp.prepare(&model).unwrap();
        let p = cp.bypass(1, SubLayer::Mlp).unwrap();
        assert_eq!((p.down.size(), p.conv.size(), p.up.size()), (vec![3, 16], vec![3, 3, 3, 3], vec![16, 3]));
        randomise_up(p);
        // The ViT's own layout, and one with two inserted (prompt) tokens on a 3×5 grid.
        for (layout, t) in
            [(Layout { lead: 1, inserted: 0, grid: Some([4, 4]), observers: 0 }, 17), (Layout { lead: 1, inserted: 2, grid: Some([3, 5]), observers: 0 }, 18)]
        {
            let (x, out) = (randn(&[2, t, 16]), randn(&[2, t, 16]));
            let got = cp.sublayer(1, SubLayer::Mlp, &x, out.shallow_clone(), &layout, false);
            let want = &out + by_hand(p, &x, &layout, 0.5);
            assert!(got.allclose(&want, 1e-4, 1e-5, false), "{layout:?}");
        }
        // The attention bypass of block 1 is another one, still zero.
        let (x, out) = (randn(&[2, 17, 16]), randn(&[2, 17, 16]));
        let layout = Layout { lead: 1, inserted: 0, grid: Some([4, 4]), observers: 0 };
        assert!(cp.sublayer(1, SubLayer::Attn, &x, out.shallow_clone(), &layout, false).equal(&out));
        let mut names: Vec<String> = cp.var_store().unwrap().variables().into_keys().filter(|n| n.starts_with("blocks.0.convpass_attn")).collect();
        names.sort();
        assert_eq!(names.len(), 6);
        assert_eq!(names[0], "blocks.0.convpass_attn.conv.bias");
    }

    /// The identity-initialised convolution leaves the grid as it is; the class
    /// token's 1×1 convolution agrees with LibTorch's convolution of a 1×1 image.
    #[test]
    fn identity_conv_and_single_tokens() {
        let model = testing::vit(0);
        let mut cp = Convpass::new(ConvpassConfig { conv_init: ConvInit::Identity, at: vec![SubLayer::Attn], ..Default::default() });
        cp.prepare(&model).unwrap();
        assert!(cp.bypass(0, SubLayer::Mlp).is_none());
        let p = cp.bypass(0, SubLayer::Attn).unwrap();
        tch::no_grad(|| {
            p.up.shallow_clone().copy_(&randn(&[16, 8]));
        });
        let layout = Layout { lead: 1, inserted: 0, grid: Some([4, 4]), observers: 0 };
        let (x, out) = (randn(&[2, 17, 16]), randn(&[2, 17, 16]));
        let got = cp.sublayer(0, SubLayer::Attn, &x, out.shallow_clone(), &layout, false);
        let h = qgelu(&(x.matmul(&p.down.tr()) + &p.down_bias));
        let want = &out + qgelu(&h).matmul(&p.up.tr()) * 0.01;
        assert!(got.allclose(&want, 1e-5, 1e-6, false));

        let conv = randn(&[8, 8, 3, 3]);
        let bias = randn(&[8]);
        let token = randn(&[2, 8]);
        let image = token.view([2, 8, 1, 1]).conv2d(&conv, Some(&bias), [1, 1], [1, 1], [1, 1], 1).view([2, 8]);
        assert!(token.linear(&conv.select(3, 1).select(2, 1), Some(&bias)).allclose(&image, 1e-5, 1e-5, false));
    }

    #[test]
    fn identity_at_init_on_vit() {
        let (model, input) = (testing::vit(0), testing::images());
        let plain = model.forward(&Ctx::plain(false), &input);
        let mut cp = Convpass::new(ConvpassConfig::default());
        cp.prepare(&model).unwrap();
        let down = &cp.bypass(0, SubLayer::Attn).unwrap().down;
        let bound = (6.0f64 / 24.0).sqrt();
        assert!(down.abs().max().double_value(&[]) <= bound && down.abs().max().double_value(&[]) > 0.5 * bound);
        let methods: Vec<Box<dyn Method>> = vec![Box::new(cp)];
        assert!(model.forward(&Ctx::new(true, &methods, Vec::new()), &input).allclose(&plain, 1e-6, 1e-6, false));
    }

    #[test]
    fn bert_cnns_and_bad_configs_are_errors() {
        let err = Convpass::new(ConvpassConfig::default()).prepare(&testing::bert(0)).unwrap_err().to_string();
        assert!(err.contains("convpass") && err.contains("bert") && err.contains("no grid"), "{err}");
        let err = Convpass::new(ConvpassConfig::default()).prepare(&testing::cnn(0)).unwrap_err().to_string();
        assert!(err.contains("convpass") && err.contains("small_cnn") && err.contains("no token sequence"), "{err}");
        let model = testing::vit(0);
        for c in [
            ConvpassConfig { dim: 0, ..Default::default() },
            ConvpassConfig { scale: f64::INFINITY, ..Default::default() },
            ConvpassConfig { dropout: 1.5, ..Default::default() },
            ConvpassConfig { at: vec![], ..Default::default() },
            ConvpassConfig { blocks: BlockSet::List(vec![0, 7]), ..Default::default() },
        ] {
            let err = Convpass::new(c.clone()).prepare(&model).expect_err(&format!("{c:?}"));
            assert!(matches!(&err, Error::MethodConfig { method, .. } if method == "convpass"), "{err}");
        }
    }

    #[test]
    fn config_round_trips() {
        let c =
            ConvpassConfig { at: vec![SubLayer::Attn], dim: 4, scale: 10.0, conv_init: ConvInit::Identity, dropout: 0.0, blocks: BlockSet::Spec("1..".into()) };
        for c in [ConvpassConfig::default(), c] {
            assert_eq!(parse_config::<ConvpassConfig>("convpass", &Convpass::new(c.clone()).config()).unwrap(), c);
        }
    }
}
