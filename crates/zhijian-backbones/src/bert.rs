//! BERT-family text encoders (Devlin et al. 2019, <https://arxiv.org/abs/1810.04805>)
//! with Hugging Face `BertModel` key names (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.query`, …), so `model.safetensors` files load as they are.
//!
//! Presets: [`BertConfig::minilm_l6`] (sentence-transformers/all-MiniLM-L6-v2) and
//! [`BertConfig::bert_base`]. Pooling is mean over real tokens, as
//! sentence-transformers does, or the `[CLS]` token.
//!
//! RoBERTa and XLM-RoBERTa (Liu et al. 2019, <https://arxiv.org/abs/1907.11692>)
//! share the architecture and the key names; what differs is where position ids
//! start ([`BertConfig::position_offset`]), read from `config.json` by
//! [`BertConfig::from_json`].
//!
//! MPNet (Song et al. 2020, <https://arxiv.org/abs/2004.09297>; Hugging Face
//! `MPNetModel`, [`Family::Mpnet`], preset [`BertConfig::mpnet_base`] for
//! sentence-transformers/all-mpnet-base-v2) has the same post-norm blocks under
//! other key names (`encoder.layer.N.attention.attn.{q,k,v,o}`,
//! `encoder.layer.N.attention.LayerNorm`), RoBERTa's positions, no token types,
//! and a relative position bias (`encoder.relative_attention_bias`, T5-style
//! buckets) computed once per forward pass and added to every layer's
//! attention scores.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};
use zhijian_core::layers::{Embedding, LayerNorm, Linear, Role, Site, attention, dropout};
use zhijian_core::{Backbone, Ctx, Error, Input, Kv, Layout, ParamGroup, Result, SubLayer, Tap, Tokens, block_index};

/// Which member of the family the encoder follows: the blocks are the same,
/// the key names, the embeddings and the position information differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT, RoBERTa, XLM-RoBERTa: absolute positions and token types;
    /// `attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`.
    #[default]
    Bert,
    /// MPNet: absolute positions (no token types) and a relative position bias
    /// shared by all layers; `attention.attn.{q,k,v,o}`, `attention.LayerNorm`.
    Mpnet,
}

/// Buckets of MPNet's relative position bias. transformers' `MPNetEncoder`
/// computes with 32 whatever `relative_attention_num_buckets` says, so
/// [`BertConfig::from_json`] accepts only 32.
pub const MPNET_BUCKETS: i64 = 32;

/// Relative distance from which MPNet's buckets stop growing.
const MPNET_MAX_DISTANCE: f64 = 128.0;

/// How token states become one feature vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over real (unmasked) tokens, as sentence-transformers does.
    #[default]
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
}

/// Architecture hyper-parameters, mirroring Hugging Face's `config.json`
/// (unknown upstream keys are ignored so real files parse).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of token states.
    pub hidden_size: i64,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer.
    pub intermediate_size: i64,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: i64,
    /// Number of token types (segments).
    pub type_vocab_size: i64,
    /// Dropout on hidden states during training.
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    pub attention_probs_dropout_prob: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Feature pooling (not in upstream `config.json`; sentence-transformers keeps it apart).
    #[serde(default)]
    pub pooling: Pooling,
    /// Position id of the first real token. 0 for BERT (positions `0, 1, …`);
    /// `pad_token_id + 1` for RoBERTa, whose padding tokens take position
    /// `pad_token_id` (so that row is never a real token's); 2 for MPNet. Not an
    /// upstream key: [`Self::from_json`] derives it from `model_type`. Default 0.
    #[serde(default)]
    pub position_offset: i64,
    /// The family's key names, embeddings and position information. Not an
    /// upstream key: [`Self::from_json`] derives it from `model_type`. Default BERT.
    #[serde(default)]
    pub family: Family,
}

/// The `model_type`s of `config.json` that [`BertConfig::from_json`] reads.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["bert", "roberta", "xlm-roberta", "mpnet"];

impl BertConfig {
    /// all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, 22.7 M parameters, mean pooling.
    pub fn minilm_l6() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            layer_norm_eps: 1e-12,
            pooling: Pooling::Mean,
            position_offset: 0,
            family: Family::Bert,
        }
    }

    /// all-mpnet-base-v2 (MPNet-base): 12 layers, hidden 768, 12 heads, 108.9 M
    /// parameters (the unused pooler aside), mean pooling (sentence-transformers
    /// L2-normalises after it).
    pub fn mpnet_base() -> Self {
        BertConfig {
            vocab_size: 30527,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 514,
            type_vocab_size: 0,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            layer_norm_eps: 1e-5,
            pooling: Pooling::Mean,
            position_offset: 2,
            family: Family::Mpnet,
        }
    }

    /// BERT-base: 12 layers, hidden 768, 12 heads, `[CLS]` pooling.
    pub fn bert_base() -> Self {
        BertConfig { hidden_size: 768, num_hidden_layers: 12, intermediate_size: 3072, pooling: Pooling::Cls, ..Self::minilm_l6() }
    }

    /// Reads a Hugging Face `config.json` of a BERT-family encoder
    /// ([`SUPPORTED_MODEL_TYPES`]). The family comes from `model_type`, else from
    /// `architectures` (`BertModel`, `RobertaForSequenceClassification`, …), else
    /// BERT (files older than `model_type`). RoBERTa's position offset is
    /// derived from `pad_token_id` (default 1); MPNet's is 2 (transformers
    /// fixes its padding index at 1) and it has no token types.
    ///
    /// Errors: [`Error::Config`] naming the file for another family, an
    /// activation other than `gelu`, BERT's relative position embeddings or an
    /// MPNet bucket count other than 32, which this encoder does not compute;
    /// [`Error::CorruptFile`] for bad JSON.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let corrupt = |e: serde_json::Error| Error::CorruptFile { path: path.into(), reason: e.to_string() };
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(corrupt)?;
        let unsupported = |what: String| Error::Config(format!("{}: {what}", path.display()));
        let model_type = model_type(&raw).map_err(unsupported)?;
        let str_field = |key: &str| raw.get(key).and_then(|v| v.as_str());
        // Hugging Face's "gelu" is the erf form the layers compute; "gelu_new" and others differ.
        if let Some(act) = str_field("hidden_act").filter(|a| *a != "gelu") {
            return Err(unsupported(format!("hidden_act `{act}` is not supported; the encoder computes `gelu` (the erf form)")));
        }
        if let Some(kind) = str_field("position_embedding_type").filter(|k| *k != "absolute") {
            return Err(unsupported(format!("position_embedding_type `{kind}` is not supported; only `absolute`")));
        }
        let mut raw = raw;
        if model_type == "mpnet" {
            let buckets = raw.get("relative_attention_num_buckets").and_then(|v| v.as_i64()).unwrap_or(MPNET_BUCKETS);
            if buckets != MPNET_BUCKETS {
                return Err(unsupported(format!(
                    "relative_attention_num_buckets {buckets} is not supported; transformers' MPNet computes with {MPNET_BUCKETS}"
                )));
            }
            // MPNet embeds no token types; its config.json has no such key.
            if let Some(fields) = raw.as_object_mut() {
                fields.entry("type_vocab_size").or_insert(0.into());
            }
        }
        let mut config: BertConfig = serde_json::from_value(raw.clone()).map_err(corrupt)?;
        config.position_offset = match model_type {
            "bert" => 0,
            // transformers' MPNetEmbeddings: padding_idx is 1 whatever pad_token_id says.
            "mpnet" => 2,
            // transformers' `create_position_ids_from_input_ids`: padding_idx + cumulative count.
            _ => raw.get("pad_token_id").and_then(|v| v.as_i64()).unwrap_or(1) + 1,
        };
        config.family = if model_type == "mpnet" { Family::Mpnet } else { Family::Bert };
        Ok(config)
    }

    /// Rejects inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!("bert: hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads)));
        }
        if !(0..self.max_position_embeddings).contains(&self.position_offset) {
            return Err(Error::Config(format!(
                "bert: position_offset {} leaves no room in max_position_embeddings {}",
                self.position_offset, self.max_position_embeddings
            )));
        }
        if self.family == Family::Mpnet && self.type_vocab_size != 0 {
            return Err(Error::Config(format!("mpnet: type_vocab_size {} must be 0 (MPNet embeds no token types)", self.type_vocab_size)));
        }
        Ok(())
    }
}

/// The supported family a `config.json` describes, by `model_type`, else by
/// its first `architectures` entry, else BERT; the error lists the supported ones.
fn model_type(raw: &serde_json::Value) -> std::result::Result<&'static str, String> {
    let supported = || SUPPORTED_MODEL_TYPES.join(", ");
    if let Some(t) = raw.get("model_type").and_then(|v| v.as_str()) {
        return SUPPORTED_MODEL_TYPES.into_iter().find(|s| *s == t).ok_or_else(|| format!("model_type `{t}` is not supported; supported: {}", supported()));
    }
    let Some(arch) = raw.get("architectures").and_then(|v| v.get(0)).and_then(|v| v.as_str()) else { return Ok("bert") };
    // Longest prefix first: `XLMRoberta…` before `Roberta…`.
    [("XLMRoberta", "xlm-roberta"), ("Roberta", "roberta"), ("Bert", "bert"), ("MPNet", "mpnet")]
        .into_iter()
        .find(|(prefix, _)| arch.starts_with(prefix))
        .map(|(_, t)| t)
        .ok_or_else(|| format!("architecture `{arch}` is not a BERT-family encoder; supported model types: {}", supported()))
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

impl Layer {
    fn new(p: nn::Path, c: &BertConfig) -> Layer {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let attn = &p / "attention";
        // The same four projections and norm under each family's key names.
        let (this, [q, k, v], out, norm) = match c.family {
            Family::Bert => (&attn / "self", ["query", "key", "value"], &attn / "output" / "dense", &attn / "output" / "LayerNorm"),
            Family::Mpnet => (&attn / "attn", ["q", "k", "v"], &attn / "attn" / "o", &attn / "LayerNorm"),
        };
        Layer {
            query: Linear::new(&this / q, h, h, true, Role::Query),
            key: Linear::new(&this / k, h, h, true, Role::Key),
            value: Linear::new(&this / v, h, h, true, Role::Value),
            attn_out: Linear::new(out, h, h, true, Role::AttnOut),
            attn_norm: LayerNorm::new(norm, h, c.layer_norm_eps),
            up: Linear::new(&p / "intermediate" / "dense", h, i, true, Role::MlpUp),
            down: Linear::new(&p / "output" / "dense", i, h, true, Role::MlpDown),
            out_norm: LayerNorm::new(&p / "output" / "LayerNorm", h, c.layer_norm_eps),
        }
    }

    /// Every hook site of the layer, in forward order.
    fn sites(&self) -> [Site; 8] {
        let linear = |l: &Linear| l.site().clone();
        [
            linear(&self.query),
            linear(&self.key),
            linear(&self.value),
            linear(&self.attn_out),
            self.attn_norm.site().clone(),
            linear(&self.up),
            linear(&self.down),
            self.out_norm.site().clone(),
        ]
    }

    /// Post-norm block: `x ← LN(x + Attn(x))`, `x ← LN(x + FFN(x))`, with the
    /// block-input, key/value and sub-layer hooks at their places. `bias`:
    /// MPNet's relative position bias over the backbone's own tokens.
    fn forward(&self, cx: &Ctx, block: usize, t: Tokens, c: &BertConfig, bias: Option<&Tensor>) -> Tokens {
        let t = cx.block_input(block, t);
        let x = &t.x;
        let q = self.query.forward(cx, x);
        let kv = cx.attn_kv(block, Kv { k: self.key.forward(cx, x), v: self.value.forward(cx, x), keep: t.attention_mask() });
        let mask = match bias {
            Some(bias) => Some(widen_bias(bias, &t.layout, kv.k.size()[1], kv.keep.as_ref())),
            None => kv.keep,
        };
        let a = attention(cx, &q, &kv.k, &kv.v, mask.as_ref(), c.num_attention_heads, c.attention_probs_dropout_prob);
        let a = cx.sublayer(block, SubLayer::Attn, x, self.attn_out.forward(cx, &a), &t.layout);
        let x = self.attn_norm.forward_residual(cx, &a, x, c.hidden_dropout_prob);
        // Hugging Face's "gelu" is the exact erf form, not the tanh approximation.
        let f = self.down.forward(cx, &self.up.forward(cx, &x).gelu("none"));
        let f = cx.sublayer(block, SubLayer::Mlp, &x, f, &t.layout);
        let x = self.out_norm.forward_residual(cx, &f, &x, c.hidden_dropout_prob);
        Tokens { x, ..t }
    }
}

/// T5's bidirectional buckets of relative positions, as transformers'
/// `MPNetEncoder.relative_position_bucket` computes them (32 buckets, maximum
/// distance 128): half the buckets for keys after the query, half for keys
/// before it; within each half, distances below 8 get a bucket each, longer
/// ones share log-spaced buckets, the last taking every distance from 91 on.
///
/// # Shapes
/// `[n, n]` int64: entry `(i, j)` is the bucket of query `i` attending to key `j`.
pub fn mpnet_relative_buckets(n: i64, device: tch::Device) -> Tensor {
    let half = MPNET_BUCKETS / 2;
    let exact = half / 2;
    let pos = Tensor::arange(n, (Kind::Int64, device));
    // transformers' `n = -(memory - context)`: positive when the key comes first.
    let d = pos.unsqueeze(1) - pos.unsqueeze(0);
    let side = d.lt(0).to_kind(Kind::Int64) * half;
    let d = d.abs();
    // The same float operations as transformers, so that boundary distances land alike
    // (distance 0 gives log 0 = -inf here, but takes the exact branch).
    let large = ((d.to_kind(Kind::Float) / exact as f64).log() / (MPNET_MAX_DISTANCE / exact as f64).ln() * (half - exact) as f64).to_kind(Kind::Int64) + exact;
    side + d.where_self(&d.lt(exact), &large.clamp_max(half - 1))
}

/// The relative position bias of the backbone's own tokens (`[1, heads, n, n]`)
/// as one layer's attention mask: zero bias to and from the tokens methods
/// inserted after the lead tokens (they have no position, as in BERT, where
/// prompts come after the position embeddings) and for keys an `attn_kv`
/// hook prepended (prefixes), `-inf` where `keep` (`[batch, 1, 1, keys]`) is false.
///
/// # Shapes
/// → `[1 or batch, heads, queries, keys]` with `queries = n + layout.inserted`.
fn widen_bias(bias: &Tensor, layout: &Layout, keys: i64, keep: Option<&Tensor>) -> Tensor {
    let zeros_at = |x: &Tensor, dim: usize, at: i64, count: i64| {
        if count == 0 {
            return x.shallow_clone();
        }
        let mut size = x.size();
        let len = size[dim];
        size[dim] = count;
        let dim = dim as i64;
        Tensor::cat(&[x.narrow(dim, 0, at), Tensor::zeros(size, (x.kind(), x.device())), x.narrow(dim, at, len - at)], dim)
    };
    let b = zeros_at(bias, 2, layout.lead, layout.inserted);
    let b = zeros_at(&b, 3, layout.lead, layout.inserted);
    let prepended = keys - b.size()[3];
    assert!(prepended >= 0, "attention has {keys} keys but {} tokens: a hook removed keys", b.size()[3]);
    let b = zeros_at(&b, 3, 0, prepended);
    match keep {
        Some(keep) => b + Tensor::zeros(keep.size(), (Kind::Float, keep.device())).masked_fill(&keep.logical_not(), f64::NEG_INFINITY),
        None => b,
    }
}

/// A BERT-family encoder without pooler or head (the pooler is unused by mean
/// pooling; its checkpoint keys are reported as unexpected, not loaded).
pub struct Bert {
    config: BertConfig,
    word: Embedding,
    position: Embedding,
    /// BERT's and RoBERTa's token types; MPNet has none.
    token_type: Option<Embedding>,
    norm: LayerNorm,
    layers: Vec<Layer>,
    /// MPNet's relative position bias table `[buckets, heads]`.
    relative_bias: Option<Embedding>,
}

impl Bert {
    /// Creates the encoder's variables under `p` (random init; load weights after).
    pub fn new(p: nn::Path, config: &BertConfig) -> Result<Bert> {
        config.validate()?;
        let e = &p / "embeddings";
        let h = config.hidden_size;
        Ok(Bert {
            word: Embedding::new(&e / "word_embeddings", config.vocab_size, h),
            position: Embedding::new(&e / "position_embeddings", config.max_position_embeddings, h),
            token_type: (config.type_vocab_size > 0).then(|| Embedding::new(&e / "token_type_embeddings", config.type_vocab_size, h)),
            norm: LayerNorm::new(&e / "LayerNorm", h, config.layer_norm_eps),
            layers: (0..config.num_hidden_layers).map(|i| Layer::new(&p / "encoder" / "layer" / i, config)).collect(),
            relative_bias: (config.family == Family::Mpnet)
                .then(|| Embedding::new(&p / "encoder" / "relative_attention_bias", MPNET_BUCKETS, config.num_attention_heads)),
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Token states after the last layer, with their layout: `[CLS]` leads,
    /// tokens that methods insert (prompts) follow it.
    ///
    /// # Shapes
    /// `ids`, `mask`: `[batch, seq]` int64 → `[batch, seq + inserted, hidden]`.
    pub fn encode(&self, cx: &Ctx, ids: &Tensor, mask: &Tensor) -> Tokens {
        self.run_layers(cx, self.embed(cx, ids, mask), 0..self.layers.len())
    }

    /// The embeddings' output: the tokens entering layer 0.
    fn embed(&self, cx: &Ctx, ids: &Tensor, mask: &Tensor) -> Tokens {
        let positions = match self.config.position_offset {
            0 => Tensor::arange(ids.size()[1], (Kind::Int64, ids.device())).unsqueeze(0),
            // RoBERTa: real tokens count up from the offset, padding sits at `offset - 1`
            // (= pad_token_id), as transformers numbers them (it finds padding by the pad id).
            offset => {
                let real = mask.gt(0).to_kind(Kind::Int64);
                real.cumsum(1, Kind::Int64) * &real + (offset - 1)
            }
        };
        let mut x = self.word.forward(ids) + self.position.forward(&positions);
        if let Some(token_type) = &self.token_type {
            x += token_type.forward(&ids.zeros_like());
        }
        let x = dropout(&self.norm.forward(cx, &x), self.config.hidden_dropout_prob, cx.is_train());
        Self::tokens(x, mask)
    }

    /// States of the backbone's own tokens, before any method inserted some.
    fn tokens(x: Tensor, mask: &Tensor) -> Tokens {
        Tokens { x, keep: Some(mask.gt(0)), layout: Layout { lead: 1, ..Default::default() } }
    }

    /// MPNet's relative position bias for `n` tokens, `[1, heads, n, n]`.
    fn position_bias(&self, n: i64, device: tch::Device) -> Option<Tensor> {
        let table = self.relative_bias.as_ref()?;
        Some(table.forward(&mpnet_relative_buckets(n, device)).permute([2, 0, 1]).unsqueeze(0))
    }

    fn run_layers(&self, cx: &Ctx, mut t: Tokens, layers: std::ops::Range<usize>) -> Tokens {
        // Once per pass, over the backbone's own tokens (none inserted yet).
        let bias = if layers.is_empty() { None } else { self.position_bias(t.x.size()[1] - t.layout.inserted, t.x.device()) };
        for i in layers {
            t = self.layers[i].forward(cx, i, t, &self.config, bias.as_ref());
            cx.tap(Tap::Block(i), &t.x);
        }
        t
    }
}

impl Backbone for Bert {
    fn arch(&self) -> &str {
        match self.config.family {
            Family::Bert => "bert",
            Family::Mpnet => "mpnet",
        }
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    fn num_blocks(&self) -> usize {
        self.layers.len()
    }

    fn sites(&self) -> Vec<Site> {
        std::iter::once(self.norm.site().clone()).chain(self.layers.iter().flat_map(Layer::sites)).collect()
    }

    fn group(&self, param: &str) -> ParamGroup {
        // MPNet's relative position bias feeds every layer from the first: position information, like the embeddings.
        if param.starts_with("embeddings.") || param.starts_with("encoder.relative_attention_bias.") {
            return ParamGroup::Stem;
        }
        block_index(param, "encoder.layer.").map_or(ParamGroup::Neck, ParamGroup::Block)
    }

    /// Runs the embeddings and the layers before `block`.
    fn prefix(&self, cx: &Ctx, input: &Input, block: usize) -> Option<Input> {
        let Input::Tokens { ids, mask } = input else { return None };
        let block = block.min(self.layers.len());
        let t = self.run_layers(cx, self.embed(cx, ids, mask), 0..block);
        Some(Input::Hidden { block, states: t.x, mask: mask.shallow_clone() })
    }

    fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
        let (tokens, mask) = match input {
            Input::Tokens { ids, mask } => (self.encode(cx, ids, mask), mask),
            Input::Hidden { block, states, mask } => (self.run_layers(cx, Self::tokens(states.shallow_clone(), mask), *block..self.layers.len()), mask),
            _ => panic!("bert takes Input::Tokens; the data config must produce tokens"),
        };
        match self.config.pooling {
            Pooling::Cls => tokens.x.select(1, 0),
            Pooling::Mean => {
                // Over the real tokens of the input: inserted tokens are not part of the text.
                let states = tokens.layout.own_tokens(&tokens.x);
                let m = mask.unsqueeze(-1).to_kind(states.kind());
                (states * &m).sum_dim_intlist(1, false, None) / m.sum_dim_intlist(1, false, None).clamp_min(1e-9)
            }
        }
    }
}
