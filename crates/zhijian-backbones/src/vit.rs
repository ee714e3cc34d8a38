//! Vision Transformer (Dosovitskiy et al. 2021, <https://arxiv.org/abs/2010.11929>)
//! with timm's key names (`patch_embed.proj`, `cls_token`, `pos_embed`,
//! `blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, `norm` / `fc_norm`), so timm
//! checkpoints converted to safetensors load as they are.
//!
//! Presets at patch 16 / 224 px (tiny, small, base) and patch 4 / 32 px for
//! small images. When the input size differs from the preset's, the position
//! embedding grid is resampled as timm does (bicubic, antialiased).

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};
use zhijian_core::layers::{Conv2d, LayerNorm, Linear, Padding, Role, Site, attention, dropout};
use zhijian_core::precision::to_fp32;
use zhijian_core::{Backbone, Ctx, Error, ImagePreset, Input, Kv, Layout, ParamGroup, Result, SubLayer, Tap, Tokens, block_index};

/// How token states become one feature vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitPooling {
    /// The class token after the final `norm` (timm `global_pool="token"`).
    #[default]
    Token,
    /// Mean of the patch tokens, then `fc_norm` (timm `global_pool="avg"`).
    Avg,
}

/// Architecture hyper-parameters, named as timm's `VisionTransformer` arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Side of the square training image, px (sets the position-embedding grid).
    pub img_size: i64,
    /// Side of a square patch, px.
    pub patch_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Token width.
    pub embed_dim: i64,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: i64,
    /// MLP width as a multiple of `embed_dim`.
    pub mlp_ratio: f64,
    /// Whether `qkv` has a bias.
    pub qkv_bias: bool,
    /// Feature pooling.
    pub pooling: VitPooling,
    /// LayerNorm epsilon (timm: 1e-6).
    pub norm_eps: f64,
    /// Dropout on token states during training (timm `proj_drop_rate`).
    pub dropout: f64,
}

impl VitConfig {
    fn preset(embed_dim: i64, num_heads: i64, img_size: i64, patch_size: i64) -> Self {
        VitConfig {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth: 12,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            pooling: VitPooling::Token,
            norm_eps: 1e-6,
            dropout: 0.0,
        }
    }

    /// `vit_tiny_patch16_224`: width 192, 3 heads, 5.7 M parameters.
    pub fn tiny_patch16_224() -> Self {
        Self::preset(192, 3, 224, 16)
    }

    /// `vit_small_patch16_224`: width 384, 6 heads, 22 M parameters.
    pub fn small_patch16_224() -> Self {
        Self::preset(384, 6, 224, 16)
    }

    /// `vit_base_patch16_224`: width 768, 12 heads, 86 M parameters.
    pub fn base_patch16_224() -> Self {
        Self::preset(768, 12, 224, 16)
    }

    /// A preset by name: `tiny_patch16_224`, `small_patch16_224`,
    /// `base_patch16_224` or `tiny_patch4_32`.
    pub fn by_name(name: &str) -> Result<Self> {
        Ok(match name {
            "tiny_patch16_224" => Self::tiny_patch16_224(),
            "small_patch16_224" => Self::small_patch16_224(),
            "base_patch16_224" => Self::base_patch16_224(),
            "tiny_patch4_32" => Self::tiny_patch4_32(),
            other => {
                return Err(Error::Config(format!(
                    "unknown ViT preset `{other}`; known: tiny_patch16_224, small_patch16_224, base_patch16_224, tiny_patch4_32"
                )));
            }
        })
    }

    /// A ViT-Tiny for 32 px images (CIFAR, MNIST resized): patch 4, 64 patches.
    pub fn tiny_patch4_32() -> Self {
        Self::preset(192, 3, 32, 4)
    }

    /// Rejects inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        if self.embed_dim % self.num_heads != 0 {
            return Err(Error::Config(format!("vit: embed_dim {} is not a multiple of num_heads {}", self.embed_dim, self.num_heads)));
        }
        if self.img_size % self.patch_size != 0 {
            return Err(Error::Config(format!("vit: img_size {} is not a multiple of patch_size {}", self.img_size, self.patch_size)));
        }
        Ok(())
    }

    fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(p: nn::Path, c: &VitConfig) -> Block {
        let (d, hidden) = (c.embed_dim, (c.embed_dim as f64 * c.mlp_ratio) as i64);
        Block {
            norm1: LayerNorm::new(&p / "norm1", d, c.norm_eps),
            qkv: Linear::new(&p / "attn" / "qkv", d, 3 * d, c.qkv_bias, Role::Qkv),
            proj: Linear::new(&p / "attn" / "proj", d, d, true, Role::AttnOut),
            norm2: LayerNorm::new(&p / "norm2", d, c.norm_eps),
            fc1: Linear::new(&p / "mlp" / "fc1", d, hidden, true, Role::MlpUp),
            fc2: Linear::new(&p / "mlp" / "fc2", hidden, d, true, Role::MlpDown),
        }
    }

    /// Every hook site of the block, in forward order.
    fn sites(&self) -> [Site; 6] {
        [
            self.norm1.site().clone(),
            self.qkv.site().clone(),
            self.proj.site().clone(),
            self.norm2.site().clone(),
            self.fc1.site().clone(),
            self.fc2.site().clone(),
        ]
    }

    /// Pre-norm block: `x ← x + Attn(LN(x))`, `x ← x + MLP(LN(x))`, with the
    /// block-input, key/value and sub-layer hooks at their places.
    fn forward(&self, cx: &Ctx, block: usize, t: Tokens, c: &VitConfig) -> Tokens {
        let t = cx.block_input(block, t);
        let x = &t.x;
        let h = self.norm1.forward(cx, x);
        // timm's fused qkv lays out the output as [q | k | v].
        let qkv = self.qkv.forward(cx, &h).chunk(3, -1);
        let kv = cx.attn_kv(block, Kv { k: qkv[1].shallow_clone(), v: qkv[2].shallow_clone(), keep: t.attention_mask() });
        let a = attention(cx, &qkv[0], &kv.k, &kv.v, kv.keep.as_ref(), c.num_heads, 0.0);
        let a = cx.sublayer(block, SubLayer::Attn, &h, self.proj.forward(cx, &a), &t.layout);
        let x = x + dropout(&a, c.dropout, cx.is_train());
        let h = self.norm2.forward(cx, &x);
        let f = self.fc2.forward(cx, &self.fc1.forward(cx, &h).gelu("none"));
        let f = cx.sublayer(block, SubLayer::Mlp, &h, f, &t.layout);
        Tokens { x: &x + dropout(&f, c.dropout, cx.is_train()), ..t }
    }
}

/// A ViT feature extractor (the head lives in [`zhijian_core::Model`]).
pub struct Vit {
    config: VitConfig,
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
}

impl Vit {
    /// Creates the variables under `p` (random init; load weights after).
    pub fn new(p: nn::Path, config: &VitConfig) -> Result<Vit> {
        config.validate()?;
        let (d, ps) = (config.embed_dim, config.patch_size);
        let pe = &p / "patch_embed" / "proj";
        let tokens = config.grid() * config.grid() + 1;
        let trunc = Init::Randn { mean: 0.0, stdev: 0.02 };
        Ok(Vit {
            patch_embed: Conv2d::new(pe, config.in_chans, d, ps, ps, Padding::Fixed(0), 1, true).with_role(Role::Stem),
            cls_token: p.var("cls_token", &[1, 1, d], Init::Randn { mean: 0.0, stdev: 1e-6 }),
            pos_embed: p.var("pos_embed", &[1, tokens, d], trunc),
            blocks: (0..config.depth).map(|i| Block::new(&p / "blocks" / i, config)).collect(),
            // timm swaps `norm` for `fc_norm` under average pooling.
            final_norm: match config.pooling {
                VitPooling::Token => LayerNorm::new(&p / "norm", d, config.norm_eps),
                VitPooling::Avg => LayerNorm::new(&p / "fc_norm", d, config.norm_eps),
            },
            config: config.clone(),
        })
    }

    /// Position embeddings for a `grid_h × grid_w` patch grid: the stored ones,
    /// or resampled bicubically (antialiased) as timm's `resample_abs_pos_embed`.
    ///
    /// # Shapes
    /// → `[1, 1 + grid_h·grid_w, embed_dim]`.
    pub fn pos_embed_for(&self, grid_h: i64, grid_w: i64) -> Tensor {
        let g = self.config.grid();
        if (grid_h, grid_w) == (g, g) {
            return self.pos_embed.shallow_clone();
        }
        let d = self.config.embed_dim;
        let prefix = self.pos_embed.narrow(1, 0, 1);
        let grid = self.pos_embed.narrow(1, 1, g * g).reshape([1, g, g, d]).permute([0, 3, 1, 2]);
        let resized = grid
            .to_kind(Kind::Float)
            .internal_upsample_bicubic2d_aa([grid_h, grid_w], false, None, None)
            .permute([0, 2, 3, 1])
            .reshape([1, grid_h * grid_w, d])
            .to_kind(self.pos_embed.kind());
        Tensor::cat(&[prefix, resized], 1)
    }

    /// Token states after the last block (before the final norm), with their
    /// layout: the class token leads, tokens that methods insert (prompts)
    /// follow it, then the patches.
    ///
    /// # Shapes
    /// `images`: `[batch, in_chans, h, w]`, h and w multiples of the patch size →
    /// `[batch, 1 + inserted + (h/patch)·(w/patch), embed_dim]`.
    pub fn encode(&self, cx: &Ctx, images: &Tensor) -> Tokens {
        let patches = self.patch_embed.forward(cx, images);
        let (b, d, gh, gw) = patches.size4().expect("conv output is 4-d");
        // The residual stream is fp32 whatever the compute precision.
        let tokens = to_fp32(&patches.flatten(2, 3).transpose(1, 2));
        let x = Tensor::cat(&[self.cls_token.expand([b, 1, d], false), tokens], 1) + self.pos_embed_for(gh, gw);
        let mut t = Tokens { x, keep: None, layout: Layout { lead: 1, grid: Some([gh, gw]), ..Default::default() } };
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(cx, i, t, &self.config);
            cx.tap(Tap::Block(i), &t.x);
        }
        t
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }
}

impl Backbone for Vit {
    fn arch(&self) -> &str {
        "vit"
    }

    fn hidden_size(&self) -> i64 {
        self.config.embed_dim
    }

    /// timm's ViT recipe: mean and std 0.5, crop 0.9, at the preset's size.
    fn image_preset(&self) -> Option<ImagePreset> {
        Some(ImagePreset { size: self.config.img_size, mean: [0.5; 3], std: [0.5; 3], crop_pct: 0.9 })
    }

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn sites(&self) -> Vec<Site> {
        let blocks = self.blocks.iter().flat_map(Block::sites);
        std::iter::once(self.patch_embed.site().clone()).chain(blocks).chain([self.final_norm.site().clone()]).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        if param.starts_with("patch_embed.") || param == "cls_token" || param == "pos_embed" {
            return ParamGroup::Stem;
        }
        block_index(param, "blocks.").map_or(ParamGroup::Neck, ParamGroup::Block)
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let Input::Images(images) = input else { panic!("vit takes Input::Images; the data config must produce images") };
        let Tokens { x, layout, .. } = self.encode(cx, images);
        match self.config.pooling {
            VitPooling::Token => self.final_norm.forward(cx, &x).select(1, 0),
            VitPooling::Avg => {
                let start = layout.content_start();
                self.final_norm.forward(cx, &x.narrow(1, start, x.size()[1] - start).mean_dim(1, false, None))
            }
        }
    }
}
