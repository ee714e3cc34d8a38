//! SparseAdapter: adapters pruned at initialisation (He et al., Findings of
//! EMNLP 2022, "SparseAdapter: An Easy Approach for Improving the
//! Parameter-Efficiency of Adapters", <https://arxiv.org/abs/2210.04284>;
//! reference Shwai-He/SparseAdapter `src/transformers/pruning/`).
//!
//! The sequential [`Adapter`] (same places, same bottleneck), with a fixed 0/1
//! mask on each projection weight: the forward pass uses `W ⊙ mask`. Before
//! training, exactly `round(sparsity · n)` of the `n` adapter weights are
//! pruned (biases are not, as the reference's `prune_bias = False`), those
//! with the lowest score:
//! - `"snip"` (default; the paper finds SNIP the best criterion):
//!   `|∂L/∂W ⊙ W|` (Lee et al. 2019), the gradient of the task loss summed
//!   over `snip_batches` random training batches, with the fresh head, in
//!   evaluation mode (the reference scores with `model.eval()`). Computed in `before_train`.
//! - `"magnitude"`: `|W|`; `"random"`: uniform noise. Computed in `prepare`.
//!
//! `scope = "global"` (the reference's default) ranks all adapter weights
//! together; `"local"` prunes each matrix to the sparsity on its own.
//! Pruned weights are set to zero and the masks keep their gradients at zero,
//! so they stay zero through training.
//!
//! - trains: the unpruned adapter weights, the biases and the head; frozen: the whole backbone.
//! - merges: no (non-linear).
//! - artifact: the adapter's variables (see [`Adapter`]) and the masks
//!   `<block>.adapter_<attn|mlp>.<down|up>.mask` (variables without gradient).
//!   Restored masks are kept: `before_train` computes SNIP masks only while
//!   every mask is still all ones.
//!
//! Initialisation: a zero `up` (the adapter's default) makes every score
//! degenerate — `∂L/∂W_down = 0` because nothing flows back through `up = 0`,
//! and `W_up ⊙ ∂L/∂W_up = 0` because `W_up = 0` — and magnitudes of `up` all
//! tie at 0. So the default is the reference's `init_option = "bert"`: both
//! weights N(0, 0.02²), biases zero (`init = "normal"`); `"snip"` and
//! `"magnitude"` refuse `init = "zero_up"`. The adapter is then close to, but
//! not exactly, the identity at initialisation (`identity_at_init` is false,
//! unless `criterion = "random"` with `init = "zero_up"`).
//!
//! Deviations: the reference's GraSP and SynFlow pruners and its iterative
//! (multi-round) pruning are not offered; the reference's `sparsity` is the
//! fraction kept, ours the fraction pruned, as the paper reports it. Other
//! defaults are those of [`Adapter`] (bottleneck 8, QuickGELU; the reference
//! uses ReLU and wider bottlenecks on RoBERTa), so the two compare directly.
//!
//! Applies to transformer backbones (BERT, ViT); `prepare` refuses CNNs.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use zhijian_core::train::batches;
use zhijian_core::{Ctx, Error, Layout, Method, Model, Result, RunData, Split, SubLayer, TrainConfig, config_table};

use crate::adapter::{Adapter, AdapterConfig};
use crate::bottleneck::{Activation, BlockSet, Bottleneck, Init};

/// How weights are scored for pruning (the lowest scores are pruned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// `|W|`.
    Magnitude,
    /// `|∂L/∂W ⊙ W|` on training batches (connection sensitivity).
    Snip,
    /// Uniform noise: a random mask.
    Random,
}

/// Over which weights the sparsity is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// All adapter weights ranked together.
    Global,
    /// Each weight matrix pruned to the sparsity on its own.
    Local,
}

/// Configuration of SparseAdapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SparseAdapterConfig {
    /// Fraction of adapter weights pruned (0 ≤ sparsity < 1). Default 0.8.
    pub sparsity: f64,
    /// Pruning criterion: `"snip"`, `"magnitude"`, `"random"`. Default `"snip"`.
    pub criterion: Criterion,
    /// `"global"` or `"local"` ranking. Default `"global"`.
    pub scope: Scope,
    /// Training batches (of the run's batch size) whose gradients SNIP sums. Default 4.
    pub snip_batches: usize,
    /// Sub-layers followed by an adapter: `"attn"`, `"mlp"`. Default both.
    pub at: Vec<SubLayer>,
    /// Bottleneck width. Default (when neither this nor `reduction` is set) 8.
    pub bottleneck: Option<i64>,
    /// Alternatively, the width as hidden size / `reduction`. Default unset.
    pub reduction: Option<i64>,
    /// Non-linearity: `"gelu"`, `"relu"`, `"quick_gelu"`. Default `"quick_gelu"`.
    pub activation: Activation,
    /// Dropout after the activation, in training. Default 0.
    pub dropout: f64,
    /// Initialisation: `"normal"`, `"near_identity"`, `"xavier"`, `"zero_up"`. Default `"normal"`.
    pub init: Init,
    /// Blocks to adapt: `"all"`, `"a..b"`, `"a.."`, `"..b"` or a list. Default `"all"`.
    pub blocks: BlockSet,
}

impl Default for SparseAdapterConfig {
    fn default() -> Self {
        let a = AdapterConfig::default();
        SparseAdapterConfig {
            sparsity: 0.8,
            criterion: Criterion::Snip,
            scope: Scope::Global,
            snip_batches: 4,
            at: a.at,
            bottleneck: a.bottleneck,
            reduction: a.reduction,
            activation: a.activation,
            dropout: a.dropout,
            init: Init::Normal,
            blocks: a.blocks,
        }
    }
}

impl SparseAdapterConfig {
    /// The dense adapter this one prunes.
    pub fn adapter(&self) -> AdapterConfig {
        AdapterConfig {
            at: self.at.clone(),
            bottleneck: self.bottleneck,
            reduction: self.reduction,
            activation: self.activation,
            dropout: self.dropout,
            init: self.init,
            blocks: self.blocks.clone(),
        }
    }
}

/// The SparseAdapter method.
pub struct SparseAdapter {
    config: SparseAdapterConfig,
    adapter: Adapter,
}

impl SparseAdapter {
    /// SparseAdapter with `config` (parameters and masks are created by `prepare`).
    pub fn new(config: SparseAdapterConfig) -> Self {
        let adapter = Adapter::named(config.adapter(), "sparse_adapter");
        SparseAdapter { config, adapter }
    }

    /// The (masked) adapter.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Every pruned weight with its mask, `down` then `up` of each bottleneck in block order.
    fn weights_and_masks(&self) -> Vec<(Tensor, Tensor)> {
        self.adapter
            .bottlenecks()
            .flat_map(|b: &Bottleneck| {
                let masks = b.masks.as_ref().expect("sparse adapters have masks");
                [(b.down.shallow_clone(), masks[0].shallow_clone()), (b.up.shallow_clone(), masks[1].shallow_clone())]
            })
            .collect()
    }

    /// Whether the masks are still all ones (not pruned yet, nor restored).
    fn masks_pending(&self) -> bool {
        self.weights_and_masks().iter().all(|(_, m)| m.min().double_value(&[]) == 1.0)
    }

    /// Sets the masks from `scores` (one per weight, as [`Self::weights_and_masks`]):
    /// exactly `round(sparsity · n)` lowest-scored weights pruned per scope, and
    /// zeroes the pruned weights.
    fn prune(&self, scores: &[Tensor]) {
        let pairs = self.weights_and_masks();
        let keep = |scores: &Tensor| {
            let n = scores.numel() as i64;
            let k = (self.config.sparsity * n as f64).round() as i64;
            let mask = Tensor::ones([n], (Kind::Float, scores.device()));
            let lowest = scores.flatten(0, -1).argsort(0, false).narrow(0, 0, k);
            mask.index_fill(0, &lowest, 0.0)
        };
        let masks: Vec<Tensor> = match self.config.scope {
            Scope::Local => scores.iter().map(|s| keep(s).view_as(s)).collect(),
            Scope::Global => {
                let flat = keep(&Tensor::cat(&scores.iter().map(|s| s.flatten(0, -1)).collect::<Vec<_>>(), 0));
                let sizes: Vec<i64> = scores.iter().map(|s| s.numel() as i64).collect();
                flat.split_with_sizes(sizes, 0).iter().zip(scores).map(|(m, s)| m.view_as(s)).collect()
            }
        };
        tch::no_grad(|| {
            for ((w, m), new) in pairs.iter().zip(&masks) {
                m.shallow_clone().copy_(new);
                let _ = w.shallow_clone().g_mul_(new);
            }
        });
    }

    /// The scores of the criteria that need no data (magnitude, random).
    fn scores_at_init(&self) -> Option<Vec<Tensor>> {
        let weights = self.weights_and_masks().into_iter().map(|(w, _)| w);
        match self.config.criterion {
            Criterion::Magnitude => Some(weights.map(|w| w.abs().detach()).collect()),
            Criterion::Random => Some(weights.map(|w| w.rand_like()).collect()),
            Criterion::Snip => None,
        }
    }

    /// SNIP scores `|Σ_batches ∂L/∂W ⊙ W|` with only this adapter active.
    fn snip_scores(&self, model: &Model, train: &Split, cfg: &TrainConfig) -> Result<Vec<Tensor>> {
        let weights: Vec<Tensor> = self.weights_and_masks().into_iter().map(|(w, _)| w).collect();
        let probe: Vec<Box<dyn Method>> = vec![Box::new(self.adapter.share())];
        let cx = Ctx::new(false, &probe, Vec::new());
        let device = model.device();
        // The same examples for the same seed; the engine reseeds before its first step.
        tch::manual_seed(cfg.seed as i64);
        let order = Tensor::randperm(train.len(), (Kind::Int64, Device::Cpu));
        let take = (cfg.batch_size * self.config.snip_batches as i64).min(train.len());
        let mut sums: Vec<Tensor> = weights.iter().map(Tensor::zeros_like).collect();
        for idx in batches(take, cfg.batch_size) {
            let idx = order.index_select(0, &idx);
            let input = train.input.select(&idx, device)?;
            let labels = train.labels.index_select(0, &idx).to_device(device);
            let loss = model.forward(&cx, &input).cross_entropy_for_logits(&labels);
            let grads = Tensor::run_backward(&[loss], &weights, false, false);
            for (sum, g) in sums.iter_mut().zip(grads) {
                if g.defined() {
                    *sum += g;
                }
            }
        }
        Ok(sums.iter().zip(&weights).map(|(g, w)| (g * w).abs().detach()).collect())
    }
}

impl Method for SparseAdapter {
    fn name(&self) -> &'static str {
        "sparse_adapter"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "sparse_adapter".into(), message });
        if !(0.0..1.0).contains(&c.sparsity) {
            return bad(format!("sparsity (the fraction pruned) must be in [0, 1), got {}", c.sparsity));
        }
        if c.criterion != Criterion::Random && !c.init.dense() {
            return bad(format!(
                "criterion {:?} needs both projections non-zero at initialisation, but init = \"zero_up\" zeroes `up` (every score would be 0); use init = \"normal\" or criterion = \"random\"",
                c.criterion
            ));
        }
        if c.criterion == Criterion::Snip && c.snip_batches == 0 {
            return bad("snip_batches must be ≥ 1".into());
        }
        self.adapter = Adapter::named(c.adapter(), "sparse_adapter");
        self.adapter.prepare(model)?;
        self.adapter.add_masks();
        if let Some(scores) = self.scores_at_init() {
            self.prune(&scores);
        }
        Ok(())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let train = data.train;
        if self.config.criterion == Criterion::Snip && self.config.sparsity > 0.0 && self.masks_pending() {
            if train.is_empty() {
                return Err(Error::MethodConfig {
                    method: "sparse_adapter".into(),
                    message: "SNIP needs training examples to score the adapter weights".into(),
                });
            }
            let scores = self.snip_scores(model, train, cfg)?;
            self.prune(&scores);
        }
        Ok(())
    }

    fn sublayer(&self, block: usize, at: SubLayer, x: &Tensor, out: Tensor, layout: &Layout, train: bool) -> Tensor {
        self.adapter.sublayer(block, at, x, out, layout, train)
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn first_block(&self, model: &Model) -> Option<usize> {
        self.adapter.first_block(model)
    }

    fn identity_at_init(&self) -> bool {
        self.config.init.zero_output()
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.adapter.var_store()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.adapter.var_store_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use zhijian_core::train::{artifact, restore};
    use zhijian_core::{Input, parse_config, save_atomic};

    fn zeros(t: &Tensor) -> i64 {
        t.eq(0.0).sum(Kind::Int64).int64_value(&[])
    }

    fn split(input: Input) -> Split {
        Split { name: "train".into(), input, labels: testing::labels() }
    }

    fn cfg() -> TrainConfig {
        TrainConfig { batch_size: 6, ..Default::default() }
    }

    fn prepared(model: &Model, config: SparseAdapterConfig) -> SparseAdapter {
        let mut m = SparseAdapter::new(config);
        m.prepare(model).unwrap();
        m
    }

    fn flat(tensors: impl Iterator<Item = Tensor>) -> Tensor {
        Tensor::cat(&tensors.map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)
    }

    /// Exactly round(0.8·n) masked weights, globally or per matrix, for every
    /// criterion; masks are 0/1 without gradient; pruned weights are zero.
    #[test]
    fn masks_have_the_exact_sparsity() {
        let model = testing::vit(0);
        for criterion in [Criterion::Random, Criterion::Magnitude, Criterion::Snip] {
            for scope in [Scope::Global, Scope::Local] {
                let mut m = prepared(&model, SparseAdapterConfig { criterion, scope, bottleneck: Some(5), ..Default::default() });
                assert_eq!(m.masks_pending(), criterion == Criterion::Snip);
                m.before_train(&model, &RunData::train_only(&split(testing::images())), &cfg()).unwrap();
                let pairs = m.weights_and_masks();
                assert_eq!(pairs.len(), 8); // 2 blocks × 2 sub-layers × (down, up)
                assert!(pairs.iter().all(|(w, _)| w.numel() == 80));
                let masked: i64 = pairs.iter().map(|(_, m)| zeros(m)).sum();
                assert_eq!(masked, 512, "{criterion:?} {scope:?}"); // round(0.8 · 640)
                if scope == Scope::Local {
                    assert!(pairs.iter().all(|(_, m)| zeros(m) == 64), "{criterion:?}"); // round(0.8 · 80)
                }
                for (w, mask) in &pairs {
                    assert_eq!(zeros(mask) + zeros(&(mask - 1.0)), 80, "masks are 0/1");
                    assert_eq!((w * mask.eq(0.0).to_kind(Kind::Float)).abs().max().double_value(&[]), 0.0, "pruned weights are zero");
                    assert!(!mask.requires_grad() && w.requires_grad());
                }
            }
        }
        // round(), not floor: 0.55 of 80 weights per matrix is 44.
        let mut m = prepared(
            &model,
            SparseAdapterConfig { criterion: Criterion::Random, scope: Scope::Local, sparsity: 0.55, bottleneck: Some(5), ..Default::default() },
        );
        m.before_train(&model, &RunData::train_only(&split(testing::images())), &cfg()).unwrap();
        assert!(m.weights_and_masks().iter().all(|(_, m)| zeros(m) == 44));
    }

    /// Magnitude keeps the largest |W|; SNIP the largest |∂L/∂W ⊙ W|, with the
    /// gradient of the mean loss over the split computed here independently.
    #[test]
    fn criteria_keep_the_highest_scores() {
        let (model, data) = (testing::bert(0), split(testing::tokens()));
        for criterion in [Criterion::Magnitude, Criterion::Snip] {
            // Prepared as SNIP, the adapter is still dense: its initial weights can be read.
            let mut m = prepared(&model, SparseAdapterConfig { criterion: Criterion::Snip, bottleneck: Some(4), ..Default::default() });
            let w0: Vec<Tensor> = m.weights_and_masks().iter().map(|(w, _)| w.detach().copy()).collect();
            let scores = match criterion {
                Criterion::Magnitude => w0.iter().map(Tensor::abs).collect::<Vec<_>>(),
                _ => {
                    let probe: Vec<Box<dyn Method>> = vec![Box::new(m.adapter.share())];
                    let loss = model.forward(&Ctx::new(false, &probe, Vec::new()), &data.input).cross_entropy_for_logits(&data.labels);
                    loss.backward();
                    m.weights_and_masks().iter().zip(&w0).map(|((w, _), w0)| (w.grad() * w0).abs()).collect()
                }
            };
            m.config.criterion = criterion;
            match criterion {
                Criterion::Magnitude => m.prune(&m.scores_at_init().unwrap()),
                _ => m.before_train(&model, &RunData::train_only(&data), &cfg()).unwrap(),
            }
            let mask = flat(m.weights_and_masks().into_iter().map(|(_, m)| m));
            let score = flat(scores.into_iter());
            let kept_min = score.masked_select(&mask.eq(1.0)).min().double_value(&[]);
            let pruned_max = score.masked_select(&mask.eq(0.0)).max().double_value(&[]);
            assert!(kept_min >= pruned_max * (1.0 - 1e-4), "{criterion:?}: kept {kept_min} < pruned {pruned_max}");
            assert!(pruned_max > 0.0, "{criterion:?}: the scores are not degenerate");
            // Kept weights are untouched.
            let now = flat(m.weights_and_masks().into_iter().map(|(w, _)| w.detach()));
            assert!(now.allclose(&(flat(w0.into_iter()) * &mask), 0.0, 0.0, false));
        }
    }

    /// The hook is the adapter with `W ⊙ mask`, whatever the weights hold
    /// under the mask, and no gradient reaches the pruned weights.
    #[test]
    fn hook_uses_the_masked_weights() {
        let model = testing::vit(0);
        let m = prepared(&model, SparseAdapterConfig { criterion: Criterion::Random, at: vec![SubLayer::Attn], ..Default::default() });
        let b = m.adapter().bottleneck(0, SubLayer::Attn).unwrap();
        assert!(m.adapter().bottleneck(0, SubLayer::Mlp).is_none());
        tch::no_grad(|| {
            b.down.shallow_clone().copy_(&b.down.randn_like());
            b.up.shallow_clone().copy_(&b.up.randn_like());
        });
        let [md, mu] = b.masks.as_ref().unwrap();
        let (x, out) = (Tensor::randn([2, 17, 16], (Kind::Float, Device::Cpu)), Tensor::randn([2, 17, 16], (Kind::Float, Device::Cpu)));
        let layout = Layout { lead: 1, inserted: 0, grid: Some([4, 4]), observers: 0 };
        let got = m.sublayer(0, SubLayer::Attn, &x, out.shallow_clone(), &layout, true);
        let h = out.matmul(&(&b.down * md).tr()) + &b.down_bias;
        let want = &out + (&h * (&h * 1.702).sigmoid()).matmul(&(&b.up * mu).tr()) + &b.up_bias;
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
        got.sum(Kind::Float).backward();
        for (w, mask) in [(&b.down, md), (&b.up, mu)] {
            let g = w.grad();
            assert_eq!(g.masked_select(&mask.eq(0.0)).abs().max().double_value(&[]), 0.0);
            assert!(g.masked_select(&mask.eq(1.0)).abs().max().double_value(&[]) > 0.0);
        }
    }

    /// Masks (and weights) written to an artifact come back into a fresh
    /// method, and a restored SNIP adapter is not pruned again.
    #[test]
    fn masks_survive_save_and_restore() {
        let model = testing::vit(0);
        let dir = std::env::temp_dir().join(format!("zhijian-sparse-adapter-{}", std::process::id()));
        for criterion in [Criterion::Random, Criterion::Snip] {
            let config = SparseAdapterConfig { criterion, ..Default::default() };
            let mut saved = prepared(&model, config.clone());
            saved.before_train(&model, &RunData::train_only(&split(testing::images())), &cfg()).unwrap();
            let path = dir.join(format!("{criterion:?}.safetensors"));
            let methods: Vec<Box<dyn Method>> = vec![Box::new(saved)];
            let names: Vec<String> = artifact(&model, &methods).into_iter().map(|(n, _)| n).collect();
            assert!(names.contains(&"sparse_adapter/blocks.1.adapter_mlp.up.mask".to_string()), "{names:?}");
            save_atomic(&artifact(&model, &methods), &path).unwrap();
            let before = flat(methods[0].var_store().unwrap().variables().into_iter().filter(|(n, _)| n.ends_with(".mask")).map(|(_, t)| t));

            let mut fresh = SparseAdapter::new(config);
            fresh.prepare(&model).unwrap();
            let mut restored: Vec<Box<dyn Method>> = vec![Box::new(fresh)];
            restore(&model, &restored, &path).unwrap();
            restored[0].before_train(&model, &RunData::train_only(&split(testing::images())), &cfg()).unwrap();
            let mut a: Vec<(String, Tensor)> = methods[0].var_store().unwrap().variables().into_iter().collect();
            let mut b: Vec<(String, Tensor)> = restored[0].var_store().unwrap().variables().into_iter().collect();
            a.sort_by(|x, y| x.0.cmp(&y.0));
            b.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(a.len(), b.len());
            for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
                assert_eq!(na, nb);
                assert!(ta.equal(tb), "{criterion:?}: {na} differs after restore");
            }
            assert_eq!(zeros(&before), 819); // round(0.8 · 8 matrices · 128)
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn identity_only_with_a_random_mask_on_a_zero_up() {
        let (model, input) = (testing::bert(0), testing::tokens());
        let plain = model.forward(&Ctx::plain(false), &input);
        for (config, identity) in [
            (SparseAdapterConfig { criterion: Criterion::Random, init: Init::ZeroUp, ..Default::default() }, true),
            (SparseAdapterConfig { criterion: Criterion::Random, ..Default::default() }, false),
            (SparseAdapterConfig::default(), false),
        ] {
            let m = prepared(&model, config);
            assert_eq!(m.identity_at_init(), identity);
            let methods: Vec<Box<dyn Method>> = vec![Box::new(m)];
            let out = model.forward(&Ctx::new(false, &methods, Vec::new()), &input);
            assert_eq!(out.allclose(&plain, 1e-6, 1e-6, false), identity);
        }
    }

    #[test]
    fn cnns_and_bad_configs_are_errors() {
        let err = SparseAdapter::new(SparseAdapterConfig::default()).prepare(&testing::cnn(0)).unwrap_err().to_string();
        assert!(err.contains("sparse_adapter") && err.contains("small_cnn"), "{err}");
        let model = testing::vit(0);
        for c in [
            SparseAdapterConfig { sparsity: 1.0, ..Default::default() },
            SparseAdapterConfig { sparsity: -0.1, ..Default::default() },
            SparseAdapterConfig { init: Init::ZeroUp, ..Default::default() },
            SparseAdapterConfig { init: Init::ZeroUp, criterion: Criterion::Magnitude, ..Default::default() },
            SparseAdapterConfig { snip_batches: 0, ..Default::default() },
            SparseAdapterConfig { bottleneck: Some(0), ..Default::default() },
        ] {
            let err = SparseAdapter::new(c.clone()).prepare(&model).expect_err(&format!("{c:?}"));
            assert!(matches!(&err, Error::MethodConfig { method, .. } if method == "sparse_adapter"), "{err}");
        }
        let table: toml::Table = toml::from_str("sparsity = 0.5\ncriterion = \"grasp\"").unwrap();
        assert!(parse_config::<SparseAdapterConfig>("sparse_adapter", &table).is_err());
    }

    #[test]
    fn config_round_trips() {
        let c = SparseAdapterConfig {
            sparsity: 0.4,
            criterion: Criterion::Magnitude,
            scope: Scope::Local,
            snip_batches: 2,
            reduction: Some(4),
            blocks: BlockSet::List(vec![1]),
            ..Default::default()
        };
        for c in [SparseAdapterConfig::default(), c] {
            assert_eq!(parse_config::<SparseAdapterConfig>("sparse_adapter", &SparseAdapter::new(c.clone()).config()).unwrap(), c);
        }
    }
}
