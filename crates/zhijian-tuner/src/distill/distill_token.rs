//! Distillation token, DeiT's hard distillation (Touvron, Cord, Douze, Massa,
//! Sablayrolles & Jégou, "Training data-efficient image transformers &
//! distillation through attention", ICML 2021, <https://arxiv.org/abs/2012.12877>;
//! reference `facebookresearch/deit`, `models.py: DistilledVisionTransformer`,
//! `losses.py: DistillationLoss`).
//!
//! A learned token joins the student's sequence before the first block,
//! right after the lead token ([`zhijian_core::Tokens::insert`]); every block
//! attends to it and it to them. A second head reads its state after the last
//! block and learns the teacher's hard decisions:
//!
//! ```text
//! training:  loss = CE(head(x_cls), y) + w · CE(head_dist(x_dist), argmax teacher logits)
//! inference: logits = (head(x_cls) + head_dist(x_dist)) / 2
//! ```
//!
//! - DeiT weighs the two terms ½ and ½; the engine weighs the cross-entropy
//!   1, so weight 1 keeps DeiT's balance (the whole loss is then twice
//!   DeiT's, which Adam's updates do not see).
//! - `head_dist` reads the token's output of the last block through its own
//!   LayerNorm (`head_norm`, ε 1e-6), then a linear map to the classes: DeiT's
//!   two heads share the backbone's final norm, which the last block's tap
//!   here comes before (ViT), or which the backbone does not have per token
//!   (BERT, whose blocks end in their own LayerNorm). The class head is the
//!   model's own, on its own pooled feature.
//! - token and head initialised from N(0, 0.02²) (DeiT's truncated normal),
//!   biases and the norm's shift 0, its scale 1. DeiT's token also gets a
//!   learned position embedding; a learned token absorbs one, so there is none.
//! - needs a transformer student (BERT, ViT) and a teacher with the student's
//!   number of classes; CNN and MLP students are refused.
//! - trains: the token, `head_norm`, `head_dist` and whatever the strategy
//!   trains; they stay in the artifact (inference uses them). Alters the
//!   forward pass; does not merge.
//! - position: the token's place is tracked through the sequence's layout, so
//!   methods that insert tokens before the first block after it (VPT's
//!   prompts, VQT's queries) move it without confusion, as long as they
//!   insert at the first block (all do), and, on a one-block backbone, are
//!   listed before it.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::train::TrainConfig;
use zhijian_core::{Error, Method, Model, Result, RunData, StepOutput, Tap, Tokens, config_table};

use super::check_weight;

/// Configuration of the distillation token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillTokenConfig {
    /// Weight of the distillation head's cross-entropy against the teacher's
    /// decisions, beside the class head's (weight 1). Default 1 (DeiT's ½ : ½).
    pub weight: f64,
}

impl Default for DistillTokenConfig {
    fn default() -> Self {
        DistillTokenConfig { weight: 1.0 }
    }
}

/// The learned parts: the token `[1, hidden]`, the head's norm and linear map.
struct Parts {
    vs: VarStore,
    token: Tensor,
    norm: (Tensor, Tensor),
    head: (Tensor, Tensor),
    last: usize,
}

/// The `distill_token` method.
pub struct DistillToken {
    config: DistillTokenConfig,
    parts: Option<Parts>,
    /// Non-observer tokens other methods had inserted when this one inserted
    /// its token, in the current forward pass.
    before: Cell<i64>,
    /// The token's index in the current forward pass's sequence.
    position: Cell<i64>,
}

impl DistillToken {
    /// The method with `config`, refusing a negative or non-finite weight.
    pub fn new(config: DistillTokenConfig) -> Result<Self> {
        check_weight("distill_token", "weight", config.weight)?;
        Ok(DistillToken { config, parts: None, before: Cell::new(0), position: Cell::new(0) })
    }

    /// The distillation head's logits from this pass's last-block tap.
    fn head_logits(&self, taps: &BTreeMap<Tap, Tensor>) -> Option<Tensor> {
        let p = self.parts.as_ref()?;
        let x = taps.get(&Tap::Block(p.last))?.select(1, self.position.get()).to_kind(Kind::Float);
        let hidden = x.size()[1];
        let x = x.layer_norm([hidden], Some(&p.norm.0), Some(&p.norm.1), 1e-6, false);
        Some(x.linear(&p.head.0, Some(&p.head.1)))
    }
}

impl Method for DistillToken {
    fn name(&self) -> &'static str {
        "distill_token"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let arch = model.backbone.arch();
        if !model.has_attention() {
            return Err(Error::MethodConfig {
                method: "distill_token".into(),
                message: format!("needs a transformer backbone (bert, vit) to insert its distillation token into; `{arch}` has no token sequence"),
            });
        }
        let (hidden, classes) = (model.backbone.hidden_size(), model.num_classes());
        let vs = VarStore::new(model.device());
        let root = vs.root();
        let normal = Init::Randn { mean: 0.0, stdev: 0.02 };
        let token = root.var("dist_token", &[1, hidden], normal);
        let (n, h) = (&root / "head_norm", &root / "head_dist");
        let norm = (n.ones("weight", &[hidden]), n.zeros("bias", &[hidden]));
        let head = (h.var("weight", &[classes, hidden], normal), h.zeros("bias", &[classes]));
        self.parts = Some(Parts { vs, token, norm, head, last: model.backbone.num_blocks() - 1 });
        Ok(())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        let teacher =
            data.teacher.ok_or_else(|| Error::MethodConfig { method: "distill_token".into(), message: "needs a teacher, and this run has none".into() })?;
        let (s, t) = (model.num_classes(), teacher.num_classes());
        if s != t {
            return Err(Error::MethodConfig {
                method: "distill_token".into(),
                message: format!("learns the teacher's decisions over the student's classes, and the student has {s} classes, the teacher {t}"),
            });
        }
        Ok(())
    }

    fn block_input(&self, block: usize, tokens: Tokens, _train: bool) -> Tokens {
        let Some(p) = &self.parts else { return tokens };
        let mut tokens = tokens;
        if block == 0 {
            self.before.set(tokens.layout.inserted - tokens.layout.observers);
            let b = tokens.x.size()[0];
            tokens = tokens.insert(&p.token.unsqueeze(0).expand([b, -1, -1], false));
        }
        // Tokens inserted at the lead after ours push it back; observers sit after it.
        let l = tokens.layout;
        self.position.set(l.lead + (l.inserted - l.observers) - 1 - self.before.get());
        tokens
    }

    fn forward_taps(&self) -> Vec<Tap> {
        self.parts.as_ref().map(|p| vec![Tap::Block(p.last)]).unwrap_or_default()
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, train: bool) -> Tensor {
        match self.head_logits(taps) {
            Some(dist) if !train => (logits + dist) / 2.0,
            _ => logits,
        }
    }

    fn teacher_taps(&self) -> Option<Vec<Tap>> {
        Some(Vec::new())
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        let teacher = step.teacher.as_ref()?;
        let dist = self.head_logits(&step.taps)?;
        let target = teacher.logits.argmax(1, false).to_device(dist.device());
        Some(dist.cross_entropy_for_logits(&target) * self.config.weight)
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn identity_at_init(&self) -> bool {
        false
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.parts.as_ref().map(|p| &p.vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.parts.as_mut().map(|p| &mut p.vs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, value};
    use tch::Device;
    use zhijian_core::Ctx;

    fn prepared(model: &Model) -> DistillToken {
        model.freeze_backbone();
        let mut m = DistillToken::new(DistillTokenConfig { weight: 2.0 }).unwrap();
        m.prepare(model).unwrap();
        m
    }

    /// The head's loss on a known token state, against the norm, map and cross-entropy written out.
    #[test]
    fn distill_token_loss_matches_the_head_written_out() {
        let model = testing::vit(0, 16, 4);
        let m = prepared(&model);
        let vars = m.var_store().unwrap().variables();
        let (w, b) = (vars["head_dist.weight"].shallow_clone(), vars["head_dist.bias"].shallow_clone());
        tch::no_grad(|| {
            b.shallow_clone().copy_(&testing::t(&[0.1, -0.2, 0.3], &[3]));
            let _ = vars["head_norm.weight"].shallow_clone().fill_(2.0);
        });
        // Two examples, 4 tokens; the token sits at position 1.
        tch::manual_seed(3);
        let states = Tensor::randn([2, 4, 16], (Kind::Float, Device::Cpu));
        m.position.set(1);
        let teacher_logits = testing::t(&[0.0, 1.0, 0.5, 2.0, -1.0, 0.0], &[2, 3]);
        let mut step = testing::logit_step(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)), &teacher_logits);
        step.taps = BTreeMap::from([(Tap::Block(1), states.shallow_clone())]);
        let got = m.extra_loss(&step).unwrap();

        let w: Vec<f64> = Vec::try_from(w.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let bias = [0.1, -0.2, 0.3];
        let target = [1usize, 0];
        let mut want = 0.0;
        for i in 0..2 {
            let x: Vec<f64> = Vec::try_from(states.get(i).get(1).to_kind(Kind::Double)).unwrap();
            let mean = x.iter().sum::<f64>() / 16.0;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 16.0;
            let y: Vec<f64> = x.iter().map(|v| 2.0 * (v - mean) / (var + 1e-6).sqrt()).collect();
            let z: Vec<f64> = (0..3).map(|c| (0..16).map(|k| w[16 * c + k] * y[k]).sum::<f64>() + bias[c]).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            want += lse - z[target[i as usize]];
        }
        close(value(&got), 2.0 * want / 2.0);
    }

    /// Training passes give the class head's logits; inference averages them
    /// with the distillation head's, read at the token's place even when
    /// another method inserts tokens after it.
    #[test]
    fn distill_token_averages_the_heads_at_inference() {
        struct Prompts(Tensor);
        impl Method for Prompts {
            fn name(&self) -> &'static str {
                "prompts"
            }
            fn config(&self) -> toml::Table {
                toml::Table::new()
            }
            fn prepare(&mut self, _model: &Model) -> Result<()> {
                Ok(())
            }
            fn block_input(&self, block: usize, tokens: Tokens, _train: bool) -> Tokens {
                if block == 0 {
                    let b = tokens.x.size()[0];
                    tokens.insert(&self.0.expand([b, -1, -1], false))
                } else {
                    tokens
                }
            }
        }
        for (model, input) in [(testing::vit(0, 16, 4), testing::images(1).input), (testing::bert(0, 16, 2), testing::tokens(1).input)] {
            let m = prepared(&model);
            tch::no_grad(|| {
                let w = &m.var_store().unwrap().variables()["head_dist.weight"];
                w.shallow_clone().copy_(&(w.randn_like() * 3.0))
            });
            let prompts = Prompts(Tensor::randn([1, 2, 16], (Kind::Float, Device::Cpu)));
            let methods: Vec<Box<dyn Method>> = vec![Box::new(m), Box::new(prompts)];
            let input = input.select(&Tensor::arange(4, (Kind::Int64, Device::Cpu)), Device::Cpu).unwrap();
            let train_cx = Ctx::new(true, &methods, Vec::new());
            let class = model.forward(&train_cx, &input);
            let states = train_cx.take_taps().remove(&Tap::Block(1)).unwrap();
            let eval = model.forward(&Ctx::new(false, &methods, Vec::new()), &input);
            // Our token went in first, right after the lead token; the 2 prompts inserted after it pushed it to 1 + 2.
            let vars = methods[0].var_store().unwrap().variables();
            let dist = states
                .select(1, 3)
                .layer_norm([16], Some(&vars["head_norm.weight"]), Some(&vars["head_norm.bias"]), 1e-6, false)
                .linear(&vars["head_dist.weight"], Some(&vars["head_dist.bias"]));
            assert!((eval - (&class + dist) / 2.0).abs().max().double_value(&[]) < 1e-4);
        }
    }

    /// CNN students are refused naming the method and the architecture; a
    /// teacher with other classes is refused; the parts stay in the artifact.
    #[test]
    fn distill_token_refuses_cnns_and_other_classes() {
        let err = DistillToken::new(DistillTokenConfig::default()).unwrap().prepare(&testing::cnn(0, &[4, 8])).err().unwrap().to_string();
        assert!(err.contains("distill_token") && err.contains("small_cnn"), "{err}");
        let model = testing::vit(0, 16, 4);
        let mut m = prepared(&model);
        assert!(m.var_store().unwrap().variables().keys().all(|n| !m.training_only(n)));
        let teacher = testing::teacher(Model::new(Device::Cpu, 5, |p| {
            let config = zhijian_backbones::SmallCnnConfig { image_size: 16, in_chans: 3, channels: vec![4] };
            Box::new(zhijian_backbones::SmallCnn::new(p, &config).unwrap())
        }));
        let split = testing::images(0);
        let err = m.before_train(&model, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap_err().to_string();
        assert!(err.contains("3 classes") && err.contains("teacher 5"), "{err}");
    }
}
