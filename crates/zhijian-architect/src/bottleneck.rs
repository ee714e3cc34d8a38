//! The bottleneck block shared by the adapter methods ([`crate::Adapter`],
//! [`crate::AdaptFormer`], [`crate::SparseAdapter`]), and what they share about
//! where they go: which blocks ([`BlockSet`]), under which variable prefix
//! ([`block_prefixes`]), on which backbones ([`require_transformer`]).
//!
//! A bottleneck maps `[…, d]` to `[…, d]` as
//! `up(dropout(act(down(x))))`, with `down: d → r` and `up: r → d` (weights in
//! PyTorch's `[out, in]` layout, each with a bias). The caller adds it to the
//! sub-layer output (sequentially or in parallel, scaled or not). Its variables
//! live in the caller's [`VarStore`](tch::nn::VarStore) under the path it is
//! given: `<p>.down.weight`, `<p>.down.bias`, `<p>.up.weight`, `<p>.up.bias`,
//! and, for a pruned bottleneck, the masks `<p>.down.mask` and `<p>.up.mask`
//! (variables without gradient, so artifacts keep them).

use serde::{Deserialize, Serialize};
use tch::nn::Path;
use tch::{Kind, Tensor};
use zhijian_core::layers::dropout;
use zhijian_core::precision::cast_like;
use zhijian_core::{Error, Model, Result};

/// The non-linearity between the two projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact (erf) GELU.
    Gelu,
    /// `max(x, 0)` (AdaptFormer, SparseAdapter).
    Relu,
    /// CLIP's `x · σ(1.702 x)` (LAMDA-ZhiJian's adapter, Convpass).
    QuickGelu,
}

impl Activation {
    /// Applies the non-linearity element-wise.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
        }
    }
}

/// How a bottleneck's projections start (biases are zero unless said otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// `down` Kaiming-uniform (PyTorch's `Linear` default, bound `1/√d`), `up`
    /// zero: the block outputs exactly 0, so an adapter is the identity at
    /// initialisation (LoRA's scheme; AdaptFormer's `init_option = "lora"`).
    ZeroUp,
    /// Both weights from a normal truncated at ±2σ with σ = 1e-3 (Houlsby et
    /// al.'s adapter-bert): near, not exactly, the identity.
    NearIdentity,
    /// Both weights Xavier-uniform, biases N(0, 1e-6²) (LAMDA-ZhiJian's adapter).
    Xavier,
    /// Both weights N(0, 0.02²) (BERT's init; SparseAdapter's default
    /// `init_option = "bert"`, which keeps gradient-based pruning scores non-zero).
    Normal,
}

impl Init {
    /// Whether a bottleneck starting this way outputs exactly zero.
    pub fn zero_output(self) -> bool {
        self == Init::ZeroUp
    }

    /// Whether both weights start non-zero (needed by pruning criteria that
    /// score weights by their magnitude or their gradient).
    pub fn dense(self) -> bool {
        self != Init::ZeroUp
    }

    /// The weight `[out, inp]` and bias `[out]` of a projection that is the
    /// `up` one or not.
    fn draw(self, out: i64, inp: i64, up: bool, p: &Path) -> (Tensor, Tensor) {
        let opts = (Kind::Float, p.device());
        let zeros = || Tensor::zeros([out], opts);
        match self {
            Init::ZeroUp if up => (Tensor::zeros([out, inp], opts), zeros()),
            Init::ZeroUp => {
                let bound = 1.0 / (inp as f64).sqrt();
                (Tensor::rand([out, inp], opts) * (2.0 * bound) - bound, zeros())
            }
            Init::NearIdentity => (truncated_normal([out, inp], 1e-3, p), zeros()),
            Init::Xavier => (xavier_uniform([out, inp], inp, out, p), Tensor::randn([out], opts) * 1e-6),
            Init::Normal => (Tensor::randn([out, inp], opts) * 0.02, zeros()),
        }
    }
}

/// A normal N(0, σ²) truncated at ±2σ, as TensorFlow's
/// `truncated_normal_initializer`, by inverting the CDF of a uniform draw.
pub fn truncated_normal(shape: impl Into<Vec<i64>>, std: f64, p: &Path) -> Tensor {
    // erf(2/√2) = P(|z| < 2) for z ~ N(0, 1).
    let edge = 0.954_499_736_103_642;
    let u = Tensor::rand(shape.into(), (Kind::Float, p.device())) * (2.0 * edge) - edge;
    u.erfinv() * (std * std::f64::consts::SQRT_2)
}

/// Xavier (Glorot) uniform: bound `√(6 / (fan_in + fan_out))`.
pub fn xavier_uniform(shape: impl Into<Vec<i64>>, fan_in: i64, fan_out: i64, p: &Path) -> Tensor {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Tensor::rand(shape.into(), (Kind::Float, p.device())) * (2.0 * bound) - bound
}

/// The bottleneck `up(dropout(act(down(x))))`.
#[derive(Debug)]
pub struct Bottleneck {
    /// `down` weight `[r, d]`.
    pub down: Tensor,
    /// `down` bias `[r]`.
    pub down_bias: Tensor,
    /// `up` weight `[d, r]`.
    pub up: Tensor,
    /// `up` bias `[d]`.
    pub up_bias: Tensor,
    /// 0/1 masks of `down` and `up` (a pruned bottleneck uses `W ⊙ mask`).
    pub masks: Option<[Tensor; 2]>,
    activation: Activation,
    dropout: f64,
}

impl Bottleneck {
    /// Creates the block's trainable variables under `p` for width `dim` and
    /// bottleneck `hidden`.
    pub fn new(p: &Path, dim: i64, hidden: i64, activation: Activation, dropout: f64, init: Init) -> Bottleneck {
        let (down, down_bias) = init.draw(hidden, dim, false, p);
        let (up, up_bias) = init.draw(dim, hidden, true, p);
        let (pd, pu) = (p / "down", p / "up");
        Bottleneck {
            down: pd.add("weight", down, true),
            down_bias: pd.add("bias", down_bias, true),
            up: pu.add("weight", up, true),
            up_bias: pu.add("bias", up_bias, true),
            masks: None,
            activation,
            dropout,
        }
    }

    /// Adds all-ones masks `<p>.down.mask`, `<p>.up.mask` (no gradient) under
    /// the same `p` the block was created with.
    pub fn add_masks(&mut self, p: &Path) {
        let mask = |name: &str, w: &Tensor| (p / name).add("mask", w.ones_like().detach(), false);
        self.masks = Some([mask("down", &self.down), mask("up", &self.up)]);
    }

    /// The two weight matrices, `down` then `up`.
    pub fn weights(&self) -> [&Tensor; 2] {
        [&self.down, &self.up]
    }

    /// The same block over the same tensors (shallow clones: one set of
    /// variables, so gradients through the copy reach the original's).
    pub fn share(&self) -> Bottleneck {
        Bottleneck {
            down: self.down.shallow_clone(),
            down_bias: self.down_bias.shallow_clone(),
            up: self.up.shallow_clone(),
            up_bias: self.up_bias.shallow_clone(),
            masks: self.masks.as_ref().map(|[d, u]| [d.shallow_clone(), u.shallow_clone()]),
            activation: self.activation,
            dropout: self.dropout,
        }
    }

    /// The weights the forward pass uses: `W ⊙ mask` when masked.
    pub fn effective(&self) -> [Tensor; 2] {
        match &self.masks {
            Some([md, mu]) => [&self.down * md, &self.up * mu],
            None => [self.down.shallow_clone(), self.up.shallow_clone()],
        }
    }

    /// # Shapes
    /// `x`: `[…, d]` → `[…, d]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // In the activations' precision (bf16 under mixed precision).
        let [down, up] = self.effective().map(|w| cast_like(&w, x));
        let [down_bias, up_bias] = [&self.down_bias, &self.up_bias].map(|b| cast_like(b, x));
        let h = self.activation.apply(&x.linear(&down, Some(&down_bias)));
        let h = dropout(&h, self.dropout, train);
        h.linear(&up, Some(&up_bias))
    }
}

/// The blocks a method adapts: `"all"` (the default), a range `"a..b"`,
/// `"a.."`, `"..b"` (0-based, end exclusive), or a list `[0, 3, 5]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockSet {
    /// Explicit block indices.
    List(Vec<usize>),
    /// `"all"` or a range.
    Spec(String),
}

impl Default for BlockSet {
    fn default() -> Self {
        BlockSet::Spec("all".into())
    }
}

impl BlockSet {
    /// The sorted, distinct block indices out of `n` blocks, or an error for
    /// `method` naming what is wrong.
    pub fn resolve(&self, n: usize, method: &str) -> Result<Vec<usize>> {
        let bad = |message: String| Error::MethodConfig { method: method.into(), message };
        let mut blocks: Vec<usize> = match self {
            BlockSet::List(list) => list.clone(),
            BlockSet::Spec(s) if s.trim() == "all" => (0..n).collect(),
            BlockSet::Spec(s) => {
                let (a, b) = s.split_once("..").ok_or_else(|| bad(format!("blocks = \"{s}\": expected \"all\", \"a..b\", \"a..\", \"..b\" or a list")))?;
                let parse = |t: &str, default: usize| -> Result<usize> {
                    let t = t.trim();
                    if t.is_empty() { Ok(default) } else { t.parse().map_err(|_| bad(format!("blocks = \"{s}\": `{t}` is not a block index"))) }
                };
                let (a, b) = (parse(a, 0)?, parse(b, n)?);
                if a >= b {
                    return Err(bad(format!("blocks = \"{s}\" is empty")));
                }
                (a..b).collect()
            }
        };
        blocks.sort_unstable();
        blocks.dedup();
        if blocks.is_empty() {
            return Err(bad("blocks is empty".into()));
        }
        if let Some(&last) = blocks.last().filter(|&&b| b >= n) {
            return Err(bad(format!("block {last} does not exist: the backbone has {n} blocks (0..{n})")));
        }
        Ok(blocks)
    }
}

/// The variable prefix of each transformer block: the longest common
/// dot-prefix of its sites' paths (`blocks.3` in a ViT, `encoder.layer.3` in
/// BERT), so an adapter's variables sit next to the block's own keys.
pub fn block_prefixes(model: &Model) -> Vec<String> {
    let sites = model.sites();
    (0..model.backbone.num_blocks())
        .map(|i| {
            let mut paths = sites.iter().filter(|s| s.block == Some(i)).map(|s| s.path.split('.').collect::<Vec<_>>());
            let Some(mut common) = paths.next() else { return format!("block{i}") };
            for p in paths {
                let same = common.iter().zip(&p).take_while(|(a, b)| a == b).count();
                common.truncate(same);
            }
            if common.is_empty() { format!("block{i}") } else { common.join(".") }
        })
        .collect()
}

/// An error for `method` unless the backbone is a transformer (BERT, ViT).
pub fn require_transformer(model: &Model, method: &str) -> Result<()> {
    if model.has_attention() {
        return Ok(());
    }
    Err(Error::MethodConfig {
        method: method.into(),
        message: format!("needs a transformer backbone (bert, vit) with attention and MLP sub-layers; {} has none", model.backbone.arch()),
    })
}

/// The bottleneck width from a method's `bottleneck` / `reduction` settings
/// (at most one of them set; neither gives `default`), validated.
pub fn bottleneck_width(method: &str, dim: i64, bottleneck: Option<i64>, reduction: Option<i64>, default: i64) -> Result<i64> {
    let bad = |message: String| Err(Error::MethodConfig { method: method.into(), message });
    let r = match (bottleneck, reduction) {
        (Some(_), Some(_)) => return bad("set `bottleneck` or `reduction`, not both".into()),
        (Some(b), None) => b,
        (None, Some(f)) if f >= 1 => dim / f,
        (None, Some(f)) => return bad(format!("reduction must be ≥ 1, got {f}")),
        (None, None) => default,
    };
    if r < 1 {
        return bad(format!("the bottleneck width must be ≥ 1, got {r} (width {dim})"));
    }
    Ok(r)
}

/// An error for `method` unless `p` is a dropout probability in [0, 1).
pub fn check_dropout(method: &str, p: f64) -> Result<()> {
    if (0.0..1.0).contains(&p) { Ok(()) } else { Err(Error::MethodConfig { method: method.into(), message: format!("dropout must be in [0, 1), got {p}") }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::Device;
    use tch::nn::VarStore;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn activations_follow_their_formulas() {
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.7, 3.0]);
        let close = |a: &Tensor, b: &Tensor| assert!(a.allclose(b, 1e-6, 1e-6, false), "{a} vs {b}");
        close(&Activation::Relu.apply(&x), &x.clamp_min(0.0));
        close(&Activation::QuickGelu.apply(&x), &(&x / (1.0 + (&x * -1.702).exp())));
        let erf = (&x / std::f64::consts::SQRT_2).erf();
        close(&Activation::Gelu.apply(&x), &(&x * 0.5 * (erf + 1.0)));
    }

    /// `up(act(down x))` with each projection's bias, and with `W ⊙ mask` once masked.
    #[test]
    fn forward_is_up_act_down_with_masks() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root() / "b";
        let mut b = Bottleneck::new(&p, 6, 3, Activation::QuickGelu, 0.0, Init::Normal);
        let x = randn(&[2, 4, 6]);
        let qgelu = |t: Tensor| &t * (&t * 1.702).sigmoid();
        let want = qgelu(x.matmul(&b.down.tr()) + &b.down_bias).matmul(&b.up.tr()) + &b.up_bias;
        assert!(b.forward(&x, false).allclose(&want, 1e-5, 1e-6, false));
        // Dropout 0 is off in training too.
        assert!(b.forward(&x, true).allclose(&want, 1e-5, 1e-6, false));

        b.add_masks(&p);
        let [md, mu] = b.masks.as_ref().unwrap();
        tch::no_grad(|| {
            md.shallow_clone().copy_(&randn(&[3, 6]).gt(0.0).to_kind(Kind::Float));
            mu.shallow_clone().copy_(&randn(&[6, 3]).gt(0.0).to_kind(Kind::Float));
        });
        let want = qgelu(x.matmul(&(&b.down * md).tr()) + &b.down_bias).matmul(&(&b.up * mu).tr()) + &b.up_bias;
        assert!(b.forward(&x, false).allclose(&want, 1e-5, 1e-6, false));
        let names: Vec<String> = {
            let mut n: Vec<String> = vs.variables().into_keys().collect();
            n.sort();
            n
        };
        assert_eq!(names, ["b.down.bias", "b.down.mask", "b.down.weight", "b.up.bias", "b.up.mask", "b.up.weight"]);
        assert!(!md.requires_grad() && b.down.requires_grad() && b.up_bias.requires_grad());
    }

    #[test]
    fn inits_have_their_distributions() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root();
        let make = |init, name: &str| Bottleneck::new(&(&p / name), 64, 32, Activation::Relu, 0.0, init);
        let zero = make(Init::ZeroUp, "zero");
        assert_eq!(zero.up.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(zero.down.abs().max().double_value(&[]) <= 1.0 / 8.0 && zero.down.abs().max().double_value(&[]) > 0.1);
        assert!(zero.forward(&randn(&[3, 64]), false).equal(&Tensor::zeros([3, 64], (Kind::Float, Device::Cpu))));

        let near = make(Init::NearIdentity, "near");
        let max = near.down.abs().max().double_value(&[]);
        let std = near.down.std(true).double_value(&[]);
        // A normal truncated at 2σ has std ≈ 0.88σ.
        assert!(max <= 2e-3 && max > 1.8e-3, "{max}");
        assert!((std - 0.88e-3).abs() < 0.08e-3, "{std}");

        let xavier = make(Init::Xavier, "xavier");
        let bound = (6.0f64 / 96.0).sqrt();
        assert!(xavier.up.abs().max().double_value(&[]) <= bound && xavier.up.abs().max().double_value(&[]) > 0.9 * bound);
        assert!(xavier.up_bias.abs().max().double_value(&[]) < 1e-5);

        let normal = make(Init::Normal, "normal");
        assert!((normal.up.std(true).double_value(&[]) - 0.02).abs() < 0.002);
        assert!(Init::Normal.dense() && !Init::ZeroUp.dense() && Init::ZeroUp.zero_output());
    }

    #[test]
    fn block_sets_resolve_or_name_the_problem() {
        let r = |b: BlockSet| b.resolve(6, "adapter");
        assert_eq!(r(BlockSet::default()).unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(r(BlockSet::Spec("4..".into())).unwrap(), [4, 5]);
        assert_eq!(r(BlockSet::Spec("..2".into())).unwrap(), [0, 1]);
        assert_eq!(r(BlockSet::Spec("1..3".into())).unwrap(), [1, 2]);
        assert_eq!(r(BlockSet::List(vec![5, 0, 5])).unwrap(), [0, 5]);
        for bad in [
            BlockSet::List(vec![6]),
            BlockSet::List(vec![]),
            BlockSet::Spec("3..3".into()),
            BlockSet::Spec("x..2".into()),
            BlockSet::Spec("2".into()),
            BlockSet::Spec("0..9".into()),
        ] {
            let err = r(bad.clone()).expect_err(&format!("{bad:?}"));
            assert!(matches!(&err, Error::MethodConfig { method, .. } if method == "adapter"), "{err}");
        }
    }

    #[test]
    fn block_prefixes_are_the_checkpoint_prefixes() {
        assert_eq!(block_prefixes(&testing::vit(0)), ["blocks.0", "blocks.1"]);
        assert_eq!(block_prefixes(&testing::bert(0)), ["encoder.layer.0", "encoder.layer.1"]);
        assert!(require_transformer(&testing::vit(0), "x").is_ok());
        let err = require_transformer(&testing::cnn(0), "x").unwrap_err().to_string();
        assert!(err.contains("small_cnn") && err.contains("bert, vit"), "{err}");
    }

    #[test]
    fn widths_come_from_bottleneck_or_reduction() {
        assert_eq!(bottleneck_width("m", 768, None, None, 8).unwrap(), 8);
        assert_eq!(bottleneck_width("m", 768, Some(64), None, 8).unwrap(), 64);
        assert_eq!(bottleneck_width("m", 768, None, Some(16), 8).unwrap(), 48);
        assert!(bottleneck_width("m", 768, Some(8), Some(16), 8).is_err());
        assert!(bottleneck_width("m", 768, Some(0), None, 8).is_err());
        assert!(bottleneck_width("m", 16, None, Some(32), 8).is_err());
        assert!(bottleneck_width("m", 16, None, Some(0), 8).is_err());
        assert!(check_dropout("m", 0.1).is_ok() && check_dropout("m", 1.0).is_err() && check_dropout("m", -0.1).is_err());
    }
}
