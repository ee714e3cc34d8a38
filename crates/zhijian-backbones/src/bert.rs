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

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};
use zhijian_core::layers::{Embedding, LayerNorm, Linear, Role, Site, attention, dropout};
use zhijian_core::{Backbone, Ctx, Error, Input, Kv, Layout, ParamGroup, Result, SubLayer, Tap, Tokens, block_index};

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
    /// `pad_token_id` (so that row is never a real token's). Not an upstream
    /// key: [`Self::from_json`] derives it from `model_type`. Default 0.
    #[serde(default)]
    pub position_offset: i64,
}

/// The `model_type`s of `config.json` that [`BertConfig::from_json`] reads.
pub const SUPPORTED_MODEL_TYPES: [&str; 3] = ["bert", "roberta", "xlm-roberta"];

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
    /// derived from `pad_token_id` (default 1).
    ///
    /// Errors: [`Error::Config`] naming the file for another family, an
    /// activation other than `gelu` or relative position embeddings, which
    /// this encoder does not compute; [`Error::CorruptFile`] for bad JSON.
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
        let mut config: BertConfig = serde_json::from_value(raw.clone()).map_err(corrupt)?;
        config.position_offset = match model_type {
            "bert" => 0,
            // transformers' `create_position_ids_from_input_ids`: padding_idx + cumulative count.
            _ => raw.get("pad_token_id").and_then(|v| v.as_i64()).unwrap_or(1) + 1,
        };
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
    [("XLMRoberta", "xlm-roberta"), ("Roberta", "roberta"), ("Bert", "bert")]
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
        let this = &attn / "self";
        Layer {
            query: Linear::new(&this / "query", h, h, true, Role::Query),
            key: Linear::new(&this / "key", h, h, true, Role::Key),
            value: Linear::new(&this / "value", h, h, true, Role::Value),
            attn_out: Linear::new(&attn / "output" / "dense", h, h, true, Role::AttnOut),
            attn_norm: LayerNorm::new(&attn / "output" / "LayerNorm", h, c.layer_norm_eps),
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
    /// block-input, key/value and sub-layer hooks at their places.
    fn forward(&self, cx: &Ctx, block: usize, t: Tokens, c: &BertConfig) -> Tokens {
        let t = cx.block_input(block, t);
        let x = &t.x;
        let q = self.query.forward(cx, x);
        let kv = cx.attn_kv(block, Kv { k: self.key.forward(cx, x), v: self.value.forward(cx, x), keep: t.attention_mask() });
        let a = attention(cx, &q, &kv.k, &kv.v, kv.keep.as_ref(), c.num_attention_heads, c.attention_probs_dropout_prob);
        let a = cx.sublayer(block, SubLayer::Attn, x, self.attn_out.forward(cx, &a), &t.layout);
        let x = self.attn_norm.forward(cx, &(dropout(cx, &a, c.hidden_dropout_prob) + x));
        // Hugging Face's "gelu" is the exact erf form, not the tanh approximation.
        let f = self.down.forward(cx, &self.up.forward(cx, &x).gelu("none"));
        let f = cx.sublayer(block, SubLayer::Mlp, &x, f, &t.layout);
        let x = self.out_norm.forward(cx, &(dropout(cx, &f, c.hidden_dropout_prob) + x));
        Tokens { x, ..t }
    }
}

/// A BERT encoder without pooler or head (the pooler is unused by mean pooling;
/// its checkpoint keys are reported as unexpected, not loaded).
pub struct Bert {
    config: BertConfig,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
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
            token_type: Embedding::new(&e / "token_type_embeddings", config.type_vocab_size, h),
            norm: LayerNorm::new(&e / "LayerNorm", h, config.layer_norm_eps),
            layers: (0..config.num_hidden_layers).map(|i| Layer::new(&p / "encoder" / "layer" / i, config)).collect(),
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
        let x = self.word.forward(ids) + self.position.forward(&positions) + self.token_type.forward(&ids.zeros_like());
        let x = dropout(cx, &self.norm.forward(cx, &x), self.config.hidden_dropout_prob);
        Self::tokens(x, mask)
    }

    /// States of the backbone's own tokens, before any method inserted some.
    fn tokens(x: Tensor, mask: &Tensor) -> Tokens {
        Tokens { x, keep: Some(mask.gt(0)), layout: Layout { lead: 1, ..Default::default() } }
    }

    fn run_layers(&self, cx: &Ctx, mut t: Tokens, layers: std::ops::Range<usize>) -> Tokens {
        for i in layers {
            t = self.layers[i].forward(cx, i, t, &self.config);
            cx.tap(Tap::Block(i), &t.x);
        }
        t
    }
}

impl Backbone for Bert {
    fn arch(&self) -> &str {
        "bert"
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
        if param.starts_with("embeddings.") {
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
