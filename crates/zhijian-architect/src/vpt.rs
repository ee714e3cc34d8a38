//! VPT: visual prompt tuning (Jia et al., ECCV 2022, <https://arxiv.org/abs/2203.12119>).
//!
//! Learned prompt tokens `[tokens, hidden]` join the token sequence right after
//! the lead (class) token, through the `block_input` hook:
//! - **shallow**: inserted once, before block 0; every block attends to them and
//!   transforms them like any other token;
//! - **deep**: block 0 inserts them as in shallow, and before every later block
//!   `i` the prompt positions are overwritten with block `i`'s own prompts
//!   (the previous block's outputs at those positions are dropped), so each
//!   block has `tokens` fresh learned tokens.
//!
//! - trains: the prompts and the head; frozen: the whole backbone.
//! - pooling stays right through the token layout: ViT's token pooling reads
//!   the class token, its average pooling and BERT's mean pooling skip the
//!   inserted tokens; BERT's key mask lets every real token attend to the prompts.
//! - not identity at initialisation (the prompts are attended); does not merge
//!   (there is no weight to fold tokens into).
//! - artifact: `prompt_embeddings` `[tokens, hidden]` and, in deep mode,
//!   `deep_prompt_embeddings` `[blocks − 1, tokens, hidden]`, the reference
//!   implementation's names and shapes (KMnP/vpt `src/models/vit_prompt/vit.py`).
//!
//! Initialisation as the reference: uniform in `±√(6 / (fan_in + hidden))`
//! ("xavier" over the patch embedding), with `fan_in = in_chans · patch²` read
//! from the ViT's patch-embedding convolution (the reference hard-codes 3
//! channels). A text backbone has no patches; there `fan_in = hidden`, the same
//! xavier-style bound for a `hidden → hidden` map: `±√(3 / hidden)`.
//!
//! Defaults follow the reference code's config (`NUM_TOKENS = 5`, `DROPOUT = 0`,
//! no prompt projection); LAMDA-ZhiJian defaults to 3 tokens with dropout 0.5.
//! The reference keeps the frozen encoder in eval mode while training (no
//! backbone dropout); here the backbone's own dropout follows the training pass.
//! Two deep VPT instances in one strategy would overwrite each other's prompts
//! (`Tokens::replace_inserted` replaces the first inserted tokens, which are the
//! last inserter's): use one.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{Init, VarStore};
use zhijian_core::layers::dropout;
use zhijian_core::{Error, Method, Model, Result, Role, Tokens, config_table};

use crate::bottleneck::check_dropout;

/// Where the prompts live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VptMode {
    /// Prompts inserted once, before the first block.
    #[default]
    Shallow,
    /// Fresh prompts before every block.
    Deep,
}

/// Configuration of VPT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VptConfig {
    /// `shallow` (prompts before block 0 only) or `deep` (before every block). Default `shallow`.
    pub mode: VptMode,
    /// Number of prompt tokens (per block in deep mode). Default 5, as the reference code.
    pub tokens: i64,
    /// Dropout on the prompts during training. Default 0.
    pub dropout: f64,
}

impl Default for VptConfig {
    fn default() -> Self {
        VptConfig { mode: VptMode::Shallow, tokens: 5, dropout: 0.0 }
    }
}

/// The VPT method.
pub struct Vpt {
    config: VptConfig,
    vs: Option<VarStore>,
    /// `[tokens, hidden]`, inserted before block 0.
    shallow: Option<Tensor>,
    /// `[blocks − 1, tokens, hidden]`: row `i − 1` replaces the prompts before block `i` (deep mode).
    deep: Option<Tensor>,
}

impl Vpt {
    /// VPT with `config` (the prompts are created by `prepare`).
    pub fn new(config: VptConfig) -> Self {
        Vpt { config, vs: None, shallow: None, deep: None }
    }

    /// The prompts `[batch, tokens, hidden]` of one block, with dropout in training.
    fn batch_of(&self, prompts: &Tensor, batch: i64, train: bool) -> Tensor {
        let p = prompts.unsqueeze(0).expand([batch, -1, -1], false);
        dropout(&p, self.config.dropout, train)
    }
}

/// The initialisation of learned tokens, as VPT's code: uniform in
/// ±√(6 / (fan_in + hidden)), fan_in = the patch embedding's (channels·patch²)
/// on a ViT, `hidden` where there are no patches (BERT).
pub(crate) fn prompt_init(model: &Model) -> Init {
    let hidden = model.backbone.hidden_size();
    let stem = model.sites().into_iter().find(|s| s.role == Role::Stem);
    let fan_in = stem.and_then(|s| s.conv.map(|g| s.in_features / g.groups * g.kernel[0] * g.kernel[1])).unwrap_or(hidden);
    let bound = (6.0 / (fan_in + hidden) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

impl Method for Vpt {
    fn name(&self) -> &'static str {
        "vpt"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "vpt".into(), message });
        if c.tokens < 1 {
            return bad(format!("tokens must be ≥ 1, got {}", c.tokens));
        }
        check_dropout("vpt", c.dropout)?;
        let arch = model.backbone.arch();
        if !model.has_attention() {
            return bad(format!("needs a transformer backbone (bert, vit) to insert prompt tokens into; `{arch}` has no token sequence"));
        }
        let hidden = model.backbone.hidden_size();
        let blocks = model.backbone.num_blocks() as i64;
        let init = prompt_init(model);
        let vs = VarStore::new(model.device());
        let root = vs.root();
        self.shallow = Some(root.var("prompt_embeddings", &[c.tokens, hidden], init));
        self.deep = (c.mode == VptMode::Deep && blocks > 1).then(|| root.var("deep_prompt_embeddings", &[blocks - 1, c.tokens, hidden], init));
        self.vs = Some(vs);
        Ok(())
    }

    fn block_input(&self, block: usize, tokens: Tokens, train: bool) -> Tokens {
        let Some(shallow) = &self.shallow else { return tokens };
        let batch = tokens.x.size()[0];
        match (block, &self.deep) {
            (0, _) => tokens.insert(&self.batch_of(shallow, batch, train)),
            (i, Some(deep)) if (i as i64) <= deep.size()[0] => tokens.replace_inserted(&self.batch_of(&deep.get(i as i64 - 1), batch, train)),
            _ => tokens,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn identity_at_init(&self) -> bool {
        false
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
    use zhijian_core::{Ctx, Input, Layout, parse_config};

    fn prepared(model: &Model, mode: VptMode, tokens: i64) -> Vpt {
        let mut vpt = Vpt::new(VptConfig { mode, tokens, ..Default::default() });
        vpt.prepare(model).unwrap();
        vpt
    }

    /// 2 sequences of 5 tokens (width 16) with a class token leading; the second ends with 2 padding tokens.
    fn sequence() -> Tokens {
        let keep = Tensor::from_slice(&[true, true, true, true, true, true, true, true, false, false]).view([2, 5]);
        Tokens { x: Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)), keep: Some(keep), layout: Layout { lead: 1, inserted: 0, grid: None, observers: 0 } }
    }

    /// Block 0 puts the prompts right after the class token, as attendable
    /// tokens; the backbone's own tokens and their mask are untouched.
    #[test]
    fn block_zero_inserts_attendable_prompts_after_the_lead() {
        let model = testing::bert(0);
        let vpt = prepared(&model, VptMode::Shallow, 3);
        let before = sequence();
        let (x0, keep0) = (before.x.copy(), before.keep.as_ref().unwrap().copy());
        let after = vpt.block_input(0, before, false);
        assert_eq!(after.x.size(), [2, 8, 16]);
        assert_eq!(after.layout, Layout { lead: 1, inserted: 3, grid: None, observers: 0 });
        let prompts = vpt.shallow.as_ref().unwrap().unsqueeze(0).expand([2, 3, 16], false);
        assert!(after.x.narrow(1, 1, 3).equal(&prompts));
        assert!(after.x.narrow(1, 0, 1).equal(&x0.narrow(1, 0, 1)));
        assert!(after.x.narrow(1, 4, 4).equal(&x0.narrow(1, 1, 4)));
        let keep = after.keep.as_ref().unwrap();
        assert!(keep.narrow(1, 1, 3).all().int64_value(&[]) == 1);
        assert!(keep.narrow(1, 0, 1).equal(&keep0.narrow(1, 0, 1)));
        assert!(keep.narrow(1, 4, 4).equal(&keep0.narrow(1, 1, 4)));
        assert!(after.layout.own_tokens(&after.x).equal(&x0));
        // Shallow prompts are inserted once: later blocks leave the sequence alone.
        let again = vpt.block_input(1, after, false);
        assert_eq!(again.x.size(), [2, 8, 16]);
    }

    /// Deep mode overwrites the prompt positions with block i's own prompts; the
    /// sequence does not grow.
    #[test]
    fn deep_replaces_the_prompts_before_each_later_block() {
        let model = testing::bert(0);
        let vpt = prepared(&model, VptMode::Deep, 2);
        let deep = vpt.deep.as_ref().unwrap();
        assert_eq!(deep.size(), [1, 2, 16]); // 2 blocks: block 0 uses the shallow prompts
        let t = vpt.block_input(0, sequence(), false);
        let x0 = t.x.copy();
        let t = vpt.block_input(1, t, false);
        assert_eq!(t.x.size(), [2, 7, 16]);
        assert_eq!(t.layout.inserted, 2);
        assert!(t.x.narrow(1, 1, 2).equal(&deep.get(0).unsqueeze(0).expand([2, 2, 16], false)));
        assert!(t.x.narrow(1, 0, 1).equal(&x0.narrow(1, 0, 1)));
        assert!(t.x.narrow(1, 3, 4).equal(&x0.narrow(1, 3, 4)));
        assert_eq!(t.keep.as_ref().unwrap().size(), [2, 7]);
    }

    /// Prompts change nothing about padding: a padded sequence's pooled
    /// features equal those of the same sequence run alone, without padding.
    #[test]
    fn bert_real_tokens_ignore_padding_with_prompts_present() {
        let model = testing::bert(1);
        for mode in [VptMode::Shallow, VptMode::Deep] {
            let methods: Vec<Box<dyn Method>> = vec![Box::new(prepared(&model, mode, 3))];
            let cx = Ctx::new(false, &methods, vec![]);
            let Input::Tokens { ids, .. } = testing::tokens() else { unreachable!() };
            let padded = model.features(&cx, &testing::tokens());
            let alone = Input::Tokens { ids: ids.narrow(0, 0, 1).narrow(1, 0, 5), mask: Tensor::ones([1, 5], (Kind::Int64, Device::Cpu)) };
            let alone = model.features(&cx, &alone);
            assert!(padded.narrow(0, 0, 1).allclose(&alone, 1e-5, 1e-5, false), "{mode:?}");
            // The prompts are attended: the features differ from the plain backbone's.
            let plain = model.features(&Ctx::plain(false), &testing::tokens());
            assert!(!padded.allclose(&plain, 1e-3, 1e-3, false), "{mode:?}");
        }
    }

    /// ViT: prompts drawn from ±√(6 / (3·patch² + hidden)), and they change the class token.
    #[test]
    fn vit_prompts_use_the_patch_bound_and_are_attended() {
        let model = testing::vit(2);
        let vpt = prepared(&model, VptMode::Deep, 4);
        let bound = (6.0 / (3.0 * 16.0 + 16.0f64)).sqrt();
        for p in [vpt.shallow.as_ref().unwrap(), vpt.deep.as_ref().unwrap()] {
            assert!(p.abs().max().double_value(&[]) <= bound);
            assert!(p.abs().max().double_value(&[]) > bound / 2.0);
        }
        let methods: Vec<Box<dyn Method>> = vec![Box::new(vpt)];
        let out = model.features(&Ctx::new(false, &methods, vec![]), &testing::images());
        assert_eq!(out.size(), [6, 16]);
        assert!(!out.allclose(&model.features(&Ctx::plain(false), &testing::images()), 1e-3, 1e-3, false));
    }

    #[test]
    fn cnn_and_bad_configs_are_errors() {
        for model in [testing::cnn(0), testing::efficientnet(0)] {
            let err = Vpt::new(VptConfig::default()).prepare(&model).err().unwrap().to_string();
            assert!(err.contains("vpt") && err.contains(model.backbone.arch()), "{err}");
        }
        let model = testing::vit(0);
        assert!(Vpt::new(VptConfig { tokens: 0, ..Default::default() }).prepare(&model).is_err());
        assert!(Vpt::new(VptConfig { dropout: 1.0, ..Default::default() }).prepare(&model).is_err());
    }

    #[test]
    fn config_round_trips() {
        let vpt = Vpt::new(VptConfig { mode: VptMode::Deep, tokens: 7, dropout: 0.1 });
        assert_eq!(parse_config::<VptConfig>("vpt", &vpt.config()).unwrap(), vpt.config);
        assert_eq!(vpt.config()["mode"].as_str(), Some("deep"));
    }
}
