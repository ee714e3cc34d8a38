//! Prefix tuning (Li & Liang, ACL 2021, <https://arxiv.org/abs/2101.00190>).
//!
//! At every block's attention, `p` learned key vectors and `p` learned value
//! vectors are prepended (through the `attn_kv` hook) to the keys and values
//! the block computed from its tokens, so every query can also attend to them.
//! The prefixes live after the key/value projections, per block, as Hugging
//! Face's `past_key_values`; the sequence itself does not grow.
//!
//! The prefix of all blocks is one matrix `P` `[p, blocks · 2 · hidden]`,
//! laid out as PEFT's `PrefixEncoder` output: block `i`'s keys are columns
//! `[2i·hidden, (2i+1)·hidden)`, its values the next `hidden` columns.
//! - `reparameterize = true` (the paper's choice for stable optimisation, and
//!   PEFT's `prefix_projection`): `P = MLP(P′)` with `P′` `[p, hidden]` and the
//!   MLP `hidden → mlp_hidden → tanh → blocks·2·hidden` (biases on both layers).
//!   `P` is computed once per forward pass (at block 0, reused by the later
//!   blocks, released after the last), not once per block: it costs
//!   `p · (hidden·mlp_hidden + mlp_hidden·2·blocks·hidden)` multiply-adds per
//!   pass, small next to the backbone (MiniLM-L6, p = 10: ~25 M).
//! - `reparameterize = false`: `P` itself is the parameter.
//!
//! Initialisation as PEFT: `P′` (or `P`) N(0, 1) as `nn.Embedding`, the MLP
//! layers as `nn.Linear` (uniform `±1/√fan_in`). The reference code
//! (XiangLi1999/PrefixTuning) defaults to `mid_dim = 512` and no prefix
//! dropout; the paper uses prefix length 10 for table-to-text and 200 for
//! summarisation, the default here is 10.
//!
//! - trains: the prefix parameters and the head; frozen: the whole backbone.
//! - not identity at initialisation (every query attends to the prefixes);
//!   does not merge (attention over extra keys is not a weight change).
//! - artifact: what trains. With the reparameterisation that is `P′` and the
//!   MLP (`embedding`, `transform.0.weight`, `transform.0.bias`,
//!   `transform.2.weight`, `transform.2.bias`, PEFT's names), not `P`: PEFT
//!   drops the MLP at save time, here the saved adapter can resume training.
//!   To drop it after training, [`PrefixTuning::prefix`] gives `P`, which loads
//!   as `embedding` into a `reparameterize = false` instance and gives the same
//!   outputs without the MLP.
//!
//! Padding stays invisible: prepended keys are always attendable, padded keys
//! stay masked, so the real tokens' outputs do not depend on padding.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{Init, VarStore};
use zhijian_core::{Error, Kv, Method, Model, Result, config_table};

/// Configuration of prefix tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixTuningConfig {
    /// Prefix length `p`: keys and values prepended at every block. Default 10.
    pub tokens: i64,
    /// Compute the prefix as `MLP(P′)` (the paper) instead of learning it
    /// directly. Default true.
    pub reparameterize: bool,
    /// Hidden width of the reparameterising MLP. Default 512, as the reference code.
    pub mlp_hidden: i64,
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        PrefixTuningConfig { tokens: 10, reparameterize: true, mlp_hidden: 512 }
    }
}

/// The two layers of the reparameterising MLP.
struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

/// The prefix-tuning method.
pub struct PrefixTuning {
    config: PrefixTuningConfig,
    vs: Option<VarStore>,
    /// `P′` `[p, hidden]` with the MLP, or `P` `[p, blocks·2·hidden]` without.
    embedding: Option<Tensor>,
    mlp: Option<Mlp>,
    hidden: i64,
    blocks: usize,
    /// `P` of the forward pass under way (reparameterised only): computed at
    /// block 0, released after the last block.
    current: Mutex<Option<Tensor>>,
}

impl PrefixTuning {
    /// Prefix tuning with `config` (parameters are created by `prepare`).
    pub fn new(config: PrefixTuningConfig) -> Self {
        PrefixTuning { config, vs: None, embedding: None, mlp: None, hidden: 0, blocks: 0, current: Mutex::new(None) }
    }

    /// The prefix of every block, `P` `[p, blocks·2·hidden]` (block `i`'s keys,
    /// then its values, each `hidden` wide), computed from the current
    /// parameters. `None` before `prepare`.
    pub fn prefix(&self) -> Option<Tensor> {
        let e = self.embedding.as_ref()?;
        Some(match &self.mlp {
            Some(m) => e.linear(&m.w1, Some(&m.b1)).tanh().linear(&m.w2, Some(&m.b2)),
            None => e.shallow_clone(),
        })
    }

    /// `P` for block `block` of the pass under way: computed at block 0 (or if
    /// missing), kept for the later blocks, dropped after the last one.
    fn prefix_at(&self, block: usize) -> Option<Tensor> {
        if self.mlp.is_none() {
            return self.prefix();
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let p = match current.as_ref() {
            Some(p) if block > 0 => p.shallow_clone(),
            _ => self.prefix()?,
        };
        *current = (block + 1 < self.blocks).then(|| p.shallow_clone());
        Some(p)
    }
}

impl Method for PrefixTuning {
    fn name(&self) -> &'static str {
        "prefix_tuning"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "prefix_tuning".into(), message });
        if c.tokens < 1 {
            return bad(format!("tokens must be ≥ 1, got {}", c.tokens));
        }
        if c.reparameterize && c.mlp_hidden < 1 {
            return bad(format!("mlp_hidden must be ≥ 1, got {}", c.mlp_hidden));
        }
        let arch = model.backbone.arch();
        if !model.has_attention() {
            return bad(format!("needs a transformer backbone (bert, vit) whose attention takes prefix keys and values; `{arch}` has no attention"));
        }
        let (hidden, blocks) = (model.backbone.hidden_size(), model.backbone.num_blocks());
        let width = blocks as i64 * 2 * hidden;
        let vs = VarStore::new(model.device());
        let root = vs.root();
        let normal = Init::Randn { mean: 0.0, stdev: 1.0 };
        let uniform = |fan_in: i64| Init::Uniform { lo: -1.0 / (fan_in as f64).sqrt(), up: 1.0 / (fan_in as f64).sqrt() };
        if c.reparameterize {
            self.embedding = Some(root.var("embedding", &[c.tokens, hidden], normal));
            let t = &root / "transform";
            self.mlp = Some(Mlp {
                w1: (&t / 0).var("weight", &[c.mlp_hidden, hidden], uniform(hidden)),
                b1: (&t / 0).var("bias", &[c.mlp_hidden], uniform(hidden)),
                w2: (&t / 2).var("weight", &[width, c.mlp_hidden], uniform(c.mlp_hidden)),
                b2: (&t / 2).var("bias", &[width], uniform(c.mlp_hidden)),
            });
        } else {
            self.embedding = Some(root.var("embedding", &[c.tokens, width], normal));
            self.mlp = None;
        }
        self.hidden = hidden;
        self.blocks = blocks;
        self.vs = Some(vs);
        Ok(())
    }

    fn attn_kv(&self, block: usize, kv: Kv, _train: bool) -> Kv {
        let Some(p) = self.prefix_at(block) else { return kv };
        let (batch, d, at) = (kv.k.size()[0], self.hidden, 2 * block as i64 * self.hidden);
        let per_example = |t: Tensor| t.unsqueeze(0).expand([batch, -1, -1], false);
        let (k, v) = (per_example(p.narrow(1, at, d)), per_example(p.narrow(1, at + d, d)));
        kv.prepend(&k, &v)
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
    use zhijian_core::{Ctx, Input, parse_config};

    fn prepared(model: &Model, reparameterize: bool) -> PrefixTuning {
        let mut m = PrefixTuning::new(PrefixTuningConfig { tokens: 3, reparameterize, mlp_hidden: 8 });
        m.prepare(model).unwrap();
        m
    }

    /// Keys and values of 2 examples, 4 tokens, width 16; the second example's last token is padding.
    fn kv() -> Kv {
        let keep = Tensor::from_slice(&[true, true, true, true, true, true, true, false]).view([2, 1, 1, 4]);
        Kv { k: Tensor::randn([2, 4, 16], (Kind::Float, Device::Cpu)), v: Tensor::randn([2, 4, 16], (Kind::Float, Device::Cpu)), keep: Some(keep) }
    }

    /// Each block gets p more keys and values, its own slice of P, all attendable.
    #[test]
    fn keys_and_values_lengthen_by_p_with_each_blocks_slice() {
        let model = testing::bert(0);
        for reparameterize in [true, false] {
            let m = prepared(&model, reparameterize);
            let p = m.prefix().unwrap();
            for block in 0..2i64 {
                let before = kv();
                let (k0, v0, keep0) = (before.k.copy(), before.v.copy(), before.keep.as_ref().unwrap().copy());
                let after = m.attn_kv(block as usize, before, false);
                assert_eq!(after.k.size(), [2, 7, 16]);
                assert_eq!(after.v.size(), [2, 7, 16]);
                let keys = p.narrow(1, 32 * block, 16).unsqueeze(0).expand([2, 3, 16], false);
                let values = p.narrow(1, 32 * block + 16, 16).unsqueeze(0).expand([2, 3, 16], false);
                assert!(after.k.narrow(1, 0, 3).allclose(&keys, 1e-6, 1e-6, false));
                assert!(after.v.narrow(1, 0, 3).allclose(&values, 1e-6, 1e-6, false));
                assert!(after.k.narrow(1, 3, 4).equal(&k0) && after.v.narrow(1, 3, 4).equal(&v0));
                let keep = after.keep.unwrap();
                assert_eq!(keep.size(), [2, 1, 1, 7]);
                assert_eq!(keep.narrow(3, 0, 3).all().int64_value(&[]), 1);
                assert!(keep.narrow(3, 3, 4).equal(&keep0));
            }
        }
    }

    /// Without the reparameterisation, P is the stored tensor itself.
    #[test]
    fn unreparameterized_prefix_is_the_stored_tensor() {
        let model = testing::vit(0);
        let m = prepared(&model, false);
        let stored = m.var_store().unwrap().variables()["embedding"].shallow_clone();
        assert_eq!(stored.size(), [3, 2 * 2 * 16]);
        assert!(stored.requires_grad());
        assert!(m.prefix().unwrap().equal(&stored));
        assert_eq!(m.var_store().unwrap().variables().len(), 1);
    }

    /// P = W₂ tanh(W₁ P′ + b₁) + b₂ row by row, `[p, blocks·2·hidden]`, and a
    /// forward pass computes it once: every block reads the same tensor.
    #[test]
    fn mlp_output_is_the_two_layer_formula() {
        let model = testing::bert(0);
        let m = prepared(&model, true);
        let vars = m.var_store().unwrap().variables();
        assert_eq!(vars["embedding"].size(), [3, 16]);
        assert_eq!(vars["transform.0.weight"].size(), [8, 16]);
        assert_eq!(vars["transform.2.weight"].size(), [64, 8]);
        let h = (vars["embedding"].matmul(&vars["transform.0.weight"].tr()) + &vars["transform.0.bias"]).tanh();
        let want = h.matmul(&vars["transform.2.weight"].tr()) + &vars["transform.2.bias"];
        let p = m.prefix().unwrap();
        assert_eq!(p.size(), [3, 64]);
        assert!(p.allclose(&want, 1e-5, 1e-6, false));
        let first = m.prefix_at(0).unwrap();
        assert!(m.current.lock().unwrap().is_some());
        let last = m.prefix_at(1).unwrap();
        assert_eq!(first.data_ptr(), last.data_ptr());
        assert!(m.current.lock().unwrap().is_none(), "released after the last block");
    }

    /// Padded keys stay masked and prefix keys are always attended: a padded
    /// sequence's pooled features equal those of the same sequence alone.
    #[test]
    fn bert_real_tokens_ignore_padding_with_prefixes_present() {
        let model = testing::bert(1);
        let methods: Vec<Box<dyn Method>> = vec![Box::new(prepared(&model, true))];
        let cx = Ctx::new(false, &methods, vec![]);
        let Input::Tokens { ids, .. } = testing::tokens() else { unreachable!() };
        let padded = model.features(&cx, &testing::tokens());
        let alone = Input::Tokens { ids: ids.narrow(0, 0, 1).narrow(1, 0, 5), mask: Tensor::ones([1, 5], (Kind::Int64, Device::Cpu)) };
        assert!(padded.narrow(0, 0, 1).allclose(&model.features(&cx, &alone), 1e-5, 1e-5, false));
        assert!(!padded.allclose(&model.features(&Ctx::plain(false), &testing::tokens()), 1e-3, 1e-3, false));
    }

    /// The exported P, loaded into a `reparameterize = false` instance, gives the
    /// same outputs without the MLP.
    #[test]
    fn exported_prefix_drops_the_mlp() {
        let model = testing::vit(3);
        let with_mlp = prepared(&model, true);
        let direct = prepared(&model, false);
        tch::no_grad(|| direct.embedding.as_ref().unwrap().shallow_clone().copy_(&with_mlp.prefix().unwrap()));
        let with_mlp: Vec<Box<dyn Method>> = vec![Box::new(with_mlp)];
        let direct: Vec<Box<dyn Method>> = vec![Box::new(direct)];
        let a = model.features(&Ctx::new(false, &with_mlp, vec![]), &testing::images());
        let b = model.features(&Ctx::new(false, &direct, vec![]), &testing::images());
        assert!(a.allclose(&b, 1e-5, 1e-5, false));
        assert!(!a.allclose(&model.features(&Ctx::plain(false), &testing::images()), 1e-3, 1e-3, false));
    }

    #[test]
    fn cnn_and_bad_configs_are_errors() {
        let model = testing::cnn(0);
        let err = PrefixTuning::new(PrefixTuningConfig::default()).prepare(&model).err().unwrap().to_string();
        assert!(err.contains("prefix_tuning") && err.contains(model.backbone.arch()), "{err}");
        let model = testing::bert(0);
        assert!(PrefixTuning::new(PrefixTuningConfig { tokens: 0, ..Default::default() }).prepare(&model).is_err());
        assert!(PrefixTuning::new(PrefixTuningConfig { mlp_hidden: 0, ..Default::default() }).prepare(&model).is_err());
        let c = PrefixTuningConfig { tokens: 4, reparameterize: false, mlp_hidden: 64 };
        assert_eq!(parse_config::<PrefixTuningConfig>("prefix_tuning", &PrefixTuning::new(c.clone()).config()).unwrap(), c);
    }
}
