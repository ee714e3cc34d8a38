//! Hookable layers shared by every backbone.
//!
//! Each layer knows its own path, which equals its checkpoint key prefix
//! (`encoder.layer.3.attention.self.query`), and consults the [`Ctx`] at its
//! site so methods can inject without any change to backbone code.

use serde::Serialize;
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use crate::ctx::Ctx;
use crate::precision::to_fp32;

/// What a backbone's sub-layer does; lets methods pick sensible default targets
/// across backbone families (LoRA defaults to the attention query and value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Attention query projection.
    Query,
    /// Attention key projection.
    Key,
    /// Attention value projection.
    Value,
    /// Fused query-key-value projection (timm ViT).
    Qkv,
    /// Attention output projection.
    AttnOut,
    /// First MLP / feed-forward projection.
    MlpUp,
    /// Second MLP / feed-forward projection.
    MlpDown,
    /// The classification head.
    Head,
    /// The first convolution (or patch embedding) that sees the pixels.
    Stem,
    /// A 1×1 convolution: a linear map over channels at every pixel.
    Pointwise,
    /// A k×k convolution mixing all input channels.
    Spatial,
    /// A depthwise (one filter per channel) convolution.
    Depthwise,
    /// A normalisation layer (LayerNorm, BatchNorm): its affine output is a site.
    Norm,
    /// Anything else (poolers, stems, …).
    Other,
}

/// A place in a backbone where methods can act.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Site {
    /// Path of the layer, equal to its checkpoint key prefix.
    pub path: String,
    /// Input features of the layer.
    pub in_features: i64,
    /// Output features of the layer.
    pub out_features: i64,
    /// What the layer does.
    pub role: Role,
    /// For a convolution: how it slides over its input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv: Option<ConvGeometry>,
    /// The block the layer belongs to, if any ([`crate::Model::sites`] fills it
    /// in from the backbone's parameter groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<usize>,
}

impl Site {
    /// A site of a layer at `path` mapping `in_features` to `out_features`.
    pub fn new(path: String, in_features: i64, out_features: i64, role: Role) -> Site {
        Site { path, in_features, out_features, role, conv: None, block: None }
    }
}

/// How a convolution slides: what a method needs to run a convolution of its
/// own beside the site's (as LoRA does on convolutions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConvGeometry {
    /// Kernel height and width.
    pub kernel: [i64; 2],
    /// Stride in both directions.
    pub stride: i64,
    /// Zero padding on each side applied to the input the hook sees (already
    /// padded inputs, as with TensorFlow "same" padding, have 0 here).
    pub padding: i64,
    /// Channel groups (`in_features` for a depthwise convolution).
    pub groups: i64,
}

/// Joins a tch path's components with dots, as checkpoint keys are written.
pub fn path_name(p: &Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// A linear layer `y = x Wᵀ + b` with PyTorch's `[out, in]` weight layout,
/// whose output every active method may transform.
#[derive(Debug)]
pub struct Linear {
    /// Weight `[out_features, in_features]`.
    pub ws: Tensor,
    /// Bias `[out_features]`, if any.
    pub bs: Option<Tensor>,
    site: Site,
}

impl Linear {
    /// Creates the layer's variables under `p` (`p.weight`, `p.bias`) with
    /// PyTorch's default initialisation (Kaiming-uniform, a = √5).
    pub fn new(p: Path, in_features: i64, out_features: i64, bias: bool, role: Role) -> Linear {
        let bound = 1.0 / (in_features as f64).sqrt();
        let ws = p.var("weight", &[out_features, in_features], Init::Uniform { lo: -bound, up: bound });
        let bs = bias.then(|| p.var("bias", &[out_features], Init::Uniform { lo: -bound, up: bound }));
        Linear { ws, bs, site: Site::new(path_name(&p), in_features, out_features, role) }
    }

    /// The layer's hook site.
    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Computes in the context's precision; methods see the input and output
    /// in it too.
    ///
    /// # Shapes
    /// `x`: `[..., in_features]` → `[..., out_features]`.
    pub fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let x = cx.cast(&cx.linear_input(&self.site, x));
        let base = x.linear(&cx.weight(&self.ws), self.bs.as_ref().map(|b| cx.weight(b)).as_ref());
        cx.linear(&self.site, &x, base)
    }
}

/// Layer normalisation over the last dimension (`weight`, `bias` as in PyTorch).
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale `[dim]`.
    pub ws: Tensor,
    /// Shift `[dim]`.
    pub bs: Tensor,
    eps: f64,
    site: Site,
}

impl LayerNorm {
    /// Creates `p.weight` (ones) and `p.bias` (zeros).
    pub fn new(p: Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm { ws: p.ones("weight", &[dim]), bs: p.zeros("bias", &[dim]), eps, site: Site::new(path_name(&p), dim, dim, Role::Norm) }
    }

    /// The layer's hook site ([`Role::Norm`]).
    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Normalises in fp32 whatever the context's precision, then lets every
    /// active method transform the output (`cx.norm`).
    ///
    /// # Shapes
    /// `x`: `[..., dim]` → same.
    pub fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let x = &to_fp32(x);
        let out = x.layer_norm([self.site.in_features], Some(&self.ws), Some(&self.bs), self.eps, true);
        cx.norm(&self.site, x, out)
    }

    /// `forward(dropout(branch, p) + residual)`: what a post-LN block (BERT)
    /// does after each sub-layer. On the CPU with fast dropout masks it is one
    /// fused node ([`zhijian_kernels::residual_layer_norm`]: the same mask,
    /// sum and normalisation in one pass each way); elsewhere the separate
    /// operations. Methods see the same sum and output either way.
    ///
    /// # Shapes
    /// `branch`, `residual`: `[..., dim]` → same.
    pub fn forward_residual(&self, cx: &Ctx, branch: &Tensor, residual: &Tensor, p: f64) -> Tensor {
        let p = if cx.is_train() { p } else { 0.0 };
        let fusable = branch.device() == Device::Cpu
            && matches!(branch.kind(), Kind::Float | Kind::BFloat16)
            && branch.size() == residual.size()
            && self.ws.kind() == Kind::Float
            && (p == 0.0 || fast_masks_on(branch));
        if !fusable {
            return self.forward(cx, &(dropout(branch, p, cx.is_train()) + residual));
        }
        let (out, sum) = zhijian_kernels::residual_layer_norm(
            &branch.contiguous(),
            &to_fp32(residual).contiguous(),
            &self.ws.contiguous(),
            &self.bs.contiguous(),
            p,
            self.eps,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.site.path));
        cx.norm(&self.site, &sum, out)
    }
}

/// A lookup table `p.weight` of shape `[num, dim]`.
#[derive(Debug)]
pub struct Embedding {
    /// Table `[num, dim]`.
    pub ws: Tensor,
}

impl Embedding {
    /// Creates `p.weight`, initialised N(0, 1) as PyTorch does.
    pub fn new(p: Path, num: i64, dim: i64) -> Embedding {
        Embedding { ws: p.randn_standard("weight", &[num, dim]) }
    }

    /// # Shapes
    /// `ids`: `[...]` (int64) → `[..., dim]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.ws, ids, -1, false, false)
    }
}

/// Which random masks training-mode dropout draws (`train.dropout_masks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropoutMasks {
    /// On the CPU, one pass of a counter-based generator
    /// ([`zhijian_kernels::dropout_mask`]) seeded from LibTorch's generator:
    /// the same Bernoulli masks in distribution, several times cheaper than
    /// LibTorch's `bernoulli_`, which takes a fifth of a MiniLM fine-tuning
    /// step. On a GPU, LibTorch's fused dropout. The default.
    #[default]
    Fast,
    /// LibTorch's own masks everywhere: the ones PyTorch draws after the same
    /// `manual_seed`, for a run that must match a PyTorch run step by step.
    Torch,
}

thread_local! {
    static DROPOUT_MASKS: std::cell::Cell<DropoutMasks> = const { std::cell::Cell::new(DropoutMasks::Fast) };
}

impl DropoutMasks {
    /// The masks dropout draws on this thread (fast unless set).
    pub fn current() -> DropoutMasks {
        DROPOUT_MASKS.with(|m| m.get())
    }

    /// Makes dropout on this thread draw these masks until the guard drops.
    /// A per-thread setting, like the training loop that sets it (the engine,
    /// from its config): tests training on parallel threads do not see each
    /// other's.
    pub fn set(self) -> DropoutMasksGuard {
        DropoutMasksGuard(DROPOUT_MASKS.with(|m| m.replace(self)))
    }

    /// Whether this is the default (configs leave it out then).
    pub fn is_fast(&self) -> bool {
        *self == DropoutMasks::Fast
    }
}

/// Restores the dropout masks that were in force before [`DropoutMasks::set`].
#[must_use = "the setting lasts only while the guard lives"]
pub struct DropoutMasksGuard(DropoutMasks);

impl Drop for DropoutMasksGuard {
    fn drop(&mut self) {
        DROPOUT_MASKS.with(|m| m.set(self.0));
    }
}

/// Whether dropout of `x` draws zhijian's own masks ([`zhijian_kernels::dropout_mask`]:
/// on the CPU under [`DropoutMasks::Fast`]) rather than LibTorch's.
fn fast_masks_on(x: &Tensor) -> bool {
    x.device() == Device::Cpu && DropoutMasks::current().is_fast()
}

/// Inverted dropout of probability `p`, active only in training passes
/// (`train`), drawing [`DropoutMasks::current`]'s masks.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    if p < 1.0 && fast_masks_on(x) {
        // p is in (0, 1) and the mask is made contiguous on the CPU: the kernel cannot refuse it.
        return x * zhijian_kernels::dropout_mask(x, p).unwrap_or_else(|e| panic!("dropout mask: {e}"));
    }
    x.dropout(p, true)
}

/// Multi-head scaled dot-product attention over already projected `q`, `k`, `v`,
/// shared by every transformer backbone (fused kernel where LibTorch has one),
/// in the context's precision (the fused kernel accumulates its softmax in fp32).
///
/// The mask is either boolean (true where a key may be attended) or an
/// additive float bias on the attention scores, `-inf` where a key may not be
/// attended (MPNet's relative position bias with the key mask folded in); a
/// float mask is cast to the compute precision and its gradient flows.
///
/// # Shapes
/// `q`: `[batch, queries, heads·head_dim]`; `k`, `v`: `[batch, keys, heads·head_dim]`;
/// `mask`: optional, broadcastable to `[batch, heads, queries, keys]` (a key
/// mask is `[batch, 1, 1, keys]`) → `[batch, queries, heads·head_dim]`.
pub fn attention(cx: &Ctx, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, heads: i64, dropout_p: f64) -> Tensor {
    let (b, t, d) = q.size3().expect("attention input must be [batch, tokens, dim]");
    let split = |x: &Tensor| cx.cast(x).view([b, -1, heads, d / heads]).transpose(1, 2);
    let p = if cx.is_train() { dropout_p } else { 0.0 };
    let mask = mask.map(|m| cx.cast(m));
    let (q, k, v) = (split(q), split(k), split(v));
    let out = if p > 0.0 && fast_masks_on(&q) {
        attention_with_fast_dropout(&q, &k, &v, mask.as_ref(), p)
    } else {
        Tensor::scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), p, false, None, false)
    };
    out.transpose(1, 2).reshape([b, t, d])
}

/// The path LibTorch's scaled dot-product attention takes on the CPU whenever
/// its probabilities drop out (its "math" path), written out so the mask can
/// come from [`dropout`]: q, k and v in fp32 (the math path computes reduced
/// precision in fp32 too), each scaled by head_dim^(-¼), the mask added (−∞
/// where a boolean mask is false), softmax, dropout, times v, back to q's kind.
///
/// # Shapes
/// `q`: `[batch, heads, queries, head_dim]`; `k`, `v`: `[batch, heads, keys, head_dim]`.
fn attention_with_fast_dropout(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, p: f64) -> Tensor {
    let kind = q.kind();
    let scale = (q.size()[3] as f64).powf(-0.25);
    let float = |x: &Tensor| x.to_kind(Kind::Float);
    let mut scores = (float(q) * scale).matmul(&(float(k) * scale).transpose(-2, -1));
    if let Some(m) = mask {
        scores = if m.kind() == Kind::Bool { scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY) } else { scores + float(m) };
    }
    dropout(&scores.softmax(-1, Kind::Float), p, true).matmul(&float(v)).to_kind(kind)
}

/// Whether a checkpoint key names a buffer (running statistics), not a parameter:
/// buffers never train and are not counted as parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var") || name.ends_with(".num_batches_tracked")
}

/// Zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// The same padding on every side.
    Fixed(i64),
    /// TensorFlow's "SAME": the output has `ceil(in / stride)` pixels, and an
    /// odd total padding puts the extra pixel at the bottom and right. Models
    /// trained in TensorFlow (EfficientNet-Lite) need it to match.
    TfSame,
}

/// A 2-d convolution with PyTorch's `[out, in/groups, kh, kw]` weight layout,
/// whose output every active method may transform (`cx.conv`).
#[derive(Debug)]
pub struct Conv2d {
    /// Weight `[out, in/groups, kh, kw]`.
    pub ws: Tensor,
    /// Bias `[out]`, if any.
    pub bs: Option<Tensor>,
    padding: Padding,
    site: Site,
}

impl Conv2d {
    /// A square-kernel convolution with `p.weight` (and `p.bias`) initialised as
    /// PyTorch does. The role follows from the shape: 1×1 → pointwise,
    /// one filter per channel → depthwise, else spatial.
    #[allow(clippy::too_many_arguments)]
    pub fn new(p: Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, padding: Padding, groups: i64, bias: bool) -> Conv2d {
        let fan_in = c_in / groups * kernel * kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let role = if kernel == 1 {
            Role::Pointwise
        } else if groups == c_in && groups > 1 {
            Role::Depthwise
        } else {
            Role::Spatial
        };
        let hook_padding = match padding {
            Padding::Fixed(n) => n,
            Padding::TfSame => 0,
        };
        Conv2d {
            ws: p.var("weight", &[c_out, c_in / groups, kernel, kernel], init),
            bs: bias.then(|| p.var("bias", &[c_out], init)),
            padding,
            site: Site {
                conv: Some(ConvGeometry { kernel: [kernel; 2], stride, padding: hook_padding, groups }),
                ..Site::new(path_name(&p), c_in, c_out, role)
            },
        }
    }

    /// Overrides the role guessed from the shape (e.g. [`Role::Stem`]).
    pub fn with_role(mut self, role: Role) -> Conv2d {
        self.site.role = role;
        self
    }

    /// The layer's hook site.
    pub fn site(&self) -> &Site {
        &self.site
    }

    /// # Shapes
    /// `x`: `[batch, c_in, h, w]` → `[batch, c_out, h', w']`.
    pub fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let g = self.site.conv.expect("a convolution site has a geometry");
        let x = match self.padding {
            Padding::Fixed(_) => x.shallow_clone(),
            Padding::TfSame => {
                let (h, w) = (x.size()[2], x.size()[3]);
                let total = |size: i64, k: i64| ((size + g.stride - 1) / g.stride - 1) * g.stride + k - size;
                let (ph, pw) = (total(h, g.kernel[0]).max(0), total(w, g.kernel[1]).max(0));
                if ph == 0 && pw == 0 { x.shallow_clone() } else { x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2]) }
            }
        };
        let x = cx.cast(&x);
        let base = x.conv2d(&cx.weight(&self.ws), self.bs.as_ref().map(|b| cx.weight(b)).as_ref(), [g.stride; 2], [g.padding; 2], [1, 1], g.groups);
        cx.conv(&self.site, &x, base)
    }
}

/// Batch normalisation over channels, with `running_mean`, `running_var` and
/// `num_batches_tracked` buffers as PyTorch names them.
#[derive(Debug)]
pub struct BatchNorm2d {
    /// Scale `[c]`.
    pub ws: Tensor,
    /// Shift `[c]`.
    pub bs: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    batches_tracked: Tensor,
    eps: f64,
    momentum: f64,
    site: Site,
}

impl BatchNorm2d {
    /// Creates the parameters (ones / zeros) and buffers (zeros / ones / 0).
    pub fn new(p: Path, c: i64, eps: f64, momentum: f64) -> BatchNorm2d {
        BatchNorm2d {
            ws: p.ones("weight", &[c]),
            bs: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            batches_tracked: p.add("num_batches_tracked", Tensor::zeros([], (tch::Kind::Int64, p.device())), false),
            eps,
            momentum,
            site: Site::new(path_name(&p), c, c, Role::Norm),
        }
    }

    /// The layer's hook site ([`Role::Norm`]).
    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Uses batch statistics (and updates the running ones) only in a training
    /// pass where this layer's own parameters train. A frozen layer keeps its
    /// pre-trained statistics, so a frozen backbone computes the same features
    /// in training and evaluation, and methods on it start from the model as shipped.
    ///
    /// Normalises in fp32 whatever the context's precision.
    ///
    /// # Shapes
    /// `x`: `[batch, c, h, w]` → same.
    pub fn forward(&self, cx: &Ctx, x: &Tensor) -> Tensor {
        let x = &to_fp32(x);
        let train = cx.is_train() && self.ws.requires_grad();
        if train {
            tch::no_grad(|| {
                let _ = self.batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        let out = x.batch_norm(Some(&self.ws), Some(&self.bs), Some(&self.running_mean), Some(&self.running_var), train, self.momentum, self.eps, false);
        cx.norm(&self.site, x, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precision::{Compute, WeightCache};
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// Under bf16 a linear layer computes `x Wᵀ + b` on bf16 copies, returns
    /// bf16, and its gradient reaches the fp32 weight; frozen weights are cast once.
    #[test]
    fn linear_computes_in_the_contexts_precision() {
        let vs = VarStore::new(Device::Cpu);
        let layer = Linear::new(vs.root() / "proj", 8, 4, true, Role::Other);
        let x = randn(&[3, 8]);
        let cache = WeightCache::new();
        let cx = Ctx::plain(true).with_compute(Compute::Bf16).with_weight_cache(&cache);
        let y = layer.forward(&cx, &x);
        assert_eq!(y.kind(), Kind::BFloat16);
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let want = bf(&x).linear(&bf(&layer.ws), Some(&bf(layer.bs.as_ref().unwrap())));
        assert!(y.equal(&want), "the same bf16 matmul");
        y.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert_eq!(layer.ws.grad().kind(), Kind::Float);
        assert!(cache.is_empty(), "trainable weights are not cached");

        let _ = layer.ws.set_requires_grad(false);
        let _ = layer.bs.as_ref().unwrap().set_requires_grad(false);
        let _ = layer.forward(&cx, &x);
        let _ = layer.forward(&cx, &x);
        assert_eq!(cache.len(), 2, "the frozen weight and bias, cast once");
        let fp32 = layer.forward(&Ctx::plain(false), &x);
        assert_eq!(fp32.kind(), Kind::Float);
        assert!(fp32.allclose(&y.to_kind(Kind::Float), 5e-2, 5e-2, false));
    }

    /// A float mask is added to the scores (as MPNet's relative position bias
    /// is), `-inf` where a boolean mask says no, and its gradient flows.
    #[test]
    fn attention_takes_an_additive_bias() {
        let (b, t, heads, hd) = (2, 5, 2, 3);
        let (q, k, v) = (randn(&[b, t, heads * hd]), randn(&[b, t + 1, heads * hd]), randn(&[b, t + 1, heads * hd]));
        let keep = Tensor::from_slice(&[true, true, true, false, true, true, true, true, true, true, true, false]).view([b, 1, 1, t + 1]);
        let mut bias = randn(&[1, heads, t, t + 1]).set_requires_grad(true);
        let mask = &bias + Tensor::zeros([b, 1, 1, t + 1], (Kind::Float, Device::Cpu)).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
        let cx = Ctx::plain(false);
        let out = attention(&cx, &q, &k, &v, Some(&mask), heads, 0.0);

        let split = |x: &Tensor| x.view([b, -1, heads, hd]).transpose(1, 2);
        let scores = split(&q).matmul(&split(&k).transpose(-1, -2)) / (hd as f64).sqrt() + &mask;
        let manual = scores.softmax(-1, Kind::Float).matmul(&split(&v)).transpose(1, 2).reshape([b, t, heads * hd]);
        assert!(out.allclose(&manual, 1e-5, 1e-5, false), "{}", (&out - &manual).abs().max());

        out.sum(Kind::Float).backward();
        let from_sdpa = bias.grad().copy();
        bias.zero_grad();
        manual.sum(Kind::Float).backward();
        assert!(from_sdpa.abs().sum(Kind::Float).double_value(&[]) > 1e-3, "the bias gets a gradient");
        assert!(from_sdpa.allclose(&bias.grad(), 1e-4, 1e-4, false));

        // Zero bias with -inf at masked keys is the boolean mask.
        let zero = Tensor::zeros([b, 1, 1, t + 1], (Kind::Float, Device::Cpu)).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
        let as_bool = attention(&cx, &q, &k, &v, Some(&keep), heads, 0.0);
        assert!(attention(&cx, &q, &k, &v, Some(&zero), heads, 0.0).allclose(&as_bool, 1e-6, 1e-6, false));
        // Under bf16 the float mask follows the compute precision.
        let bf16 = attention(&cx.with_compute(Compute::Bf16), &q, &k, &v, Some(&mask), heads, 0.0);
        assert!(bf16.to_kind(Kind::Float).allclose(&manual, 5e-2, 5e-2, false));
    }

    /// Fast masks drop a fraction p and scale the rest by 1 / (1 − p), repeat
    /// under one seed, and are not LibTorch's; `torch` masks are LibTorch's
    /// exactly. Evaluation passes, p = 0 and the guard's end change nothing.
    #[test]
    fn dropout_draws_the_masks_in_force() {
        let x = Tensor::ones([400, 500], (Kind::Float, Device::Cpu));
        // LibTorch's generator is global and tests run on parallel threads: a
        // draw elsewhere between the seed and ours can change our mask, so a
        // comparison after re-seeding gets a few tries (a wrong mask never matches).
        let same_after_seed = |f: &dyn Fn() -> Tensor, g: &dyn Fn() -> Tensor| {
            (0..5).any(|_| {
                tch::manual_seed(11);
                let a = f();
                tch::manual_seed(11);
                a.equal(&g())
            })
        };
        assert_eq!(DropoutMasks::current(), DropoutMasks::Fast);
        let fast = dropout(&x, 0.2, true);
        let dropped = fast.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!((dropped - 0.2).abs() < 0.005, "dropped {dropped}");
        assert!((fast.mean(Kind::Double).double_value(&[]) - 1.0).abs() < 0.01);
        assert!(same_after_seed(&|| dropout(&x, 0.2, true), &|| dropout(&x, 0.2, true)), "the seed repeats the mask");
        assert!(!same_after_seed(&|| dropout(&x, 0.2, true), &|| x.dropout(0.2, true)), "fast masks are not LibTorch's");
        {
            let _guard = DropoutMasks::Torch.set();
            assert_eq!(DropoutMasks::current(), DropoutMasks::Torch);
            assert!(same_after_seed(&|| dropout(&x, 0.2, true), &|| x.dropout(0.2, true)), "torch masks are LibTorch's");
        }
        assert_eq!(DropoutMasks::current(), DropoutMasks::Fast, "the guard restores the setting");
        assert!(dropout(&x, 0.2, false).equal(&x));
        assert!(dropout(&x, 0.0, true).equal(&x));
        let grad_in = x.set_requires_grad(true);
        let y = dropout(&grad_in, 0.5, true);
        y.sum(Kind::Float).backward();
        assert!(grad_in.grad().equal(&y.detach()), "the gradient goes through the same mask");
    }

    /// With fast masks, training attention runs the math path written out: at
    /// p = 0 it is LibTorch's attention (boolean and float masks, fp32 and
    /// bf16); at p > 0 it drops whole attention weights, and gradients flow.
    #[test]
    fn attention_with_fast_dropout_is_the_math_path() {
        let (b, t, heads, hd) = (2, 5, 2, 4);
        let split = |x: &Tensor| x.view([b, -1, heads, hd]).transpose(1, 2);
        let (q, k, v) = (split(&randn(&[b, t, heads * hd])), split(&randn(&[b, t, heads * hd])), split(&randn(&[b, t, heads * hd])));
        let keep = Tensor::from_slice(&[true, true, true, false, true, true, true, true, true, false]).view([b, 1, 1, t]);
        let bias = randn(&[b, heads, t, t]);
        for mask in [None, Some(&keep), Some(&bias)] {
            let want = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
            let got = attention_with_fast_dropout(&q, &k, &v, mask, 0.0);
            assert!(got.allclose(&want, 1e-5, 1e-5, false), "{}", (&got - &want).abs().max());
            let bf = |x: &Tensor| x.to_kind(Kind::BFloat16);
            let got = attention_with_fast_dropout(
                &bf(&q),
                &bf(&k),
                &bf(&v),
                mask.map(|m| if m.kind() == Kind::Bool { m.shallow_clone() } else { bf(m) }).as_ref(),
                0.0,
            );
            assert_eq!(got.kind(), Kind::BFloat16);
            assert!(got.to_kind(Kind::Float).allclose(&want, 5e-2, 5e-2, false));
        }
        let q = q.set_requires_grad(true);
        let merge = |x: &Tensor| x.transpose(1, 2).reshape([b, t, heads * hd]);
        let run = |train: bool| attention(&Ctx::plain(train), &merge(&q), &merge(&k), &merge(&v), None, heads, 0.5);
        let (dropped, full) = (run(true), run(false));
        assert!(!dropped.allclose(&full, 1e-3, 1e-3, false), "training drops attention weights");
        dropped.sum(Kind::Float).backward();
        assert!(q.grad().isfinite().all().int64_value(&[]) == 1 && q.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    /// A post-LN block's dropout, residual add and LayerNorm: the fused node
    /// gives what the separate operations give with the same mask (fp32 and a
    /// bf16 branch, training and evaluation), and takes LibTorch's path under
    /// `torch` masks.
    #[test]
    fn forward_residual_is_norm_of_dropout_plus_residual() {
        let vs = VarStore::new(Device::Cpu);
        let ln = LayerNorm::new(vs.root() / "ln", 16, 1e-12);
        tch::no_grad(|| {
            let _ = ln.ws.shallow_clone().g_add_(&(randn(&[16]) * 0.1));
        });
        let residual = randn(&[3, 5, 16]);
        for kind in [Kind::Float, Kind::BFloat16] {
            let branch = randn(&[3, 5, 16]).to_kind(kind);
            for train in [true, false] {
                let cx = Ctx::plain(train);
                let unfused = || ln.forward(&cx, &(dropout(&branch, 0.2, train) + &residual));
                // Other tests draw from LibTorch's global generator in parallel: retry.
                let same = (0..5).any(|_| {
                    tch::manual_seed(5);
                    let fused = ln.forward_residual(&cx, &branch, &residual, 0.2);
                    tch::manual_seed(5);
                    // The unfused bf16 product is rounded to bf16; the fused one stays fp32.
                    let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                    fused.allclose(&unfused(), tol, tol, false)
                });
                assert!(same, "{kind:?}, train {train}");
            }
        }
        let _guard = DropoutMasks::Torch.set();
        let cx = Ctx::plain(true);
        let same = (0..5).any(|_| {
            tch::manual_seed(5);
            let a = ln.forward_residual(&cx, &residual, &residual, 0.2);
            tch::manual_seed(5);
            a.equal(&ln.forward(&cx, &(residual.dropout(0.2, true) + &residual)))
        });
        assert!(same, "torch masks: LibTorch's dropout");
    }

    /// Norms are fp32 whatever comes in; convolutions and attention follow the context.
    #[test]
    fn norms_stay_fp32_and_convolutions_and_attention_follow_the_context() {
        let vs = VarStore::new(Device::Cpu);
        let cx = Ctx::plain(false).with_compute(Compute::Bf16);
        let ln = LayerNorm::new(vs.root() / "ln", 8, 1e-5);
        let x = randn(&[2, 3, 8]);
        let normed = ln.forward(&cx, &x.to_kind(Kind::BFloat16));
        assert_eq!(normed.kind(), Kind::Float);
        assert!(normed.allclose(&ln.forward(&Ctx::plain(false), &x), 2e-2, 2e-2, false));

        let conv = Conv2d::new(vs.root() / "conv", 3, 4, 3, 1, Padding::Fixed(1), 1, true);
        let bn = BatchNorm2d::new(vs.root() / "bn", 4, 1e-5, 0.1);
        let images = randn(&[2, 3, 5, 5]);
        let c = conv.forward(&cx, &images);
        assert_eq!(c.kind(), Kind::BFloat16);
        assert!(c.to_kind(Kind::Float).allclose(&conv.forward(&Ctx::plain(false), &images), 5e-2, 5e-2, false));
        assert_eq!(bn.forward(&cx, &c).kind(), Kind::Float);

        let (q, k, v) = (randn(&[2, 3, 8]), randn(&[2, 3, 8]), randn(&[2, 3, 8]));
        let a = attention(&cx, &q, &k, &v, None, 2, 0.0);
        assert_eq!(a.kind(), Kind::BFloat16);
        assert!(a.to_kind(Kind::Float).allclose(&attention(&Ctx::plain(false), &q, &k, &v, None, 2, 0.0), 5e-2, 5e-2, false));
    }
}
