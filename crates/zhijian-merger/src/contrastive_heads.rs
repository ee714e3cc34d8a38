//! Contrastive heads: two frozen towers, the backbone's pooled image features
//! and a text encoder's embeddings of each class's description, aligned by
//! small projection heads trained with a symmetric InfoNCE loss and a learned
//! temperature (CLIP, Radford et al. 2021, <https://arxiv.org/abs/2103.00020>,
//! on frozen towers as in LiT, Zhai et al. 2022, <https://arxiv.org/abs/2111.07991>,
//! with both towers locked and only the heads learnt).
//!
//! - logits: `s · ĝ(x) · ĥ(t_c)ᵀ` for every class `c`, where `x` is the
//!   image's pooled features and `t_c` the embedding of class `c`'s
//!   description (both L2-normalised first), `g` and `h` linear maps to
//!   `dim` (one per modality, or one `shared` map over features zero-padded
//!   to the wider tower; or, with `text_head = false`, `h` the identity and
//!   `g` to the text width, DeViSE's fixed target space; `center_text`
//!   subtracts the class texts' mean first), `ĝ`, `ĥ` their L2-normalised
//!   outputs and `s = exp(log_scale)`, learnt from CLIP's 1/0.07 and clamped at 100 as
//!   CLIP does. They replace the head's logits, which is frozen.
//! - loss: METHODS.md's `L = ½[CE(s·ÎT̂ᵀ, I) + CE(s·T̂Îᵀ, I)]` with the class
//!   descriptions as texts, where several images of a batch share a class:
//!   the image → text half is the engine's cross-entropy over the classes'
//!   texts; the text → image half ([`text_to_image_loss`], the method's extra
//!   loss) is, for each class in the batch, the cross-entropy over the
//!   batch's images with its images as equal positives. The engine adds the
//!   two, so the loss is `2L`: the same minimiser, and Adam's normalised steps
//!   barely see the factor. With one image per class it is exactly `2L` (unit test).
//! - zero-shot: classes without training examples are left out of the
//!   training loss's candidates (a text whose class never appears is not a
//!   negative the heads could learn from: it would leak the unseen classes);
//!   `predict = "unseen"` then classifies among those classes alone, by their
//!   descriptions (`all`, the default, among every class).
//! - trains: the two heads (or the shared one) and the temperature; frozen:
//!   the backbone and its head. The features of both towers are computed
//!   once: the image features by the engine's feature cache (the method reads
//!   only pooled features), the class texts by the runner before `prepare`
//!   ([`Method::set_class_text`]).
//! - artifact: `contrastive_heads/{image,text}` (or `/shared`) `[dim, d]`,
//!   `/log_scale`, and as persistent state `/class_text` `[classes, d_text]`
//!   and `/seen` `[classes]` (1 for classes the heads were trained on): a
//!   restored run predicts with the texts it was trained with, written over
//!   the ones the runner embeds for `prepare` to size the heads from (as a
//!   strategy's `init`, a teacher or an ensemble member).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, RunData, StepOutput, Tap, TrainConfig, config_table};

use crate::prototypes::freeze_head;

/// CLIP's initial logit scale, 1/0.07.
const CLIP_SCALE: f64 = 1.0 / 0.07;
/// CLIP clamps the learnt logit scale at 100.
const MAX_SCALE: f64 = 100.0;
/// What a left-out class scores: far below any `s · cos`, finite in fp32 so a softmax stays defined.
const LEFT_OUT: f64 = -1e4;

/// Which classes compete when the heads predict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    /// Every class of the task.
    #[default]
    All,
    /// Only the classes the heads never saw in training (zero-shot by text).
    Unseen,
}

/// The contrastive heads' settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContrastiveHeadsConfig {
    /// Width of the joint embedding space. Default 256.
    pub dim: i64,
    /// One head for both modalities (features zero-padded to the wider
    /// tower) instead of one per modality. Default false.
    pub shared: bool,
    /// Learn a text head. Default true; false keeps the text tower's own
    /// space (its L2-normalised embeddings) and learns only the image head,
    /// to the text width (`dim` is then the text tower's): DeViSE's frozen
    /// target space (Frome et al. 2013), where descriptions of classes never
    /// trained on keep their place among the others'.
    pub text_head: bool,
    /// Centre the class texts (subtract their mean over the classes) before
    /// normalising them: descriptions from one template share most of their
    /// embedding, and what tells classes apart is the rest. Uses the class
    /// names only, of every class. Default false.
    pub center_text: bool,
    /// Initial logit scale `s = 1/τ`. Default 1/0.07 (CLIP).
    pub init_scale: f64,
    /// Learn the temperature. Default true; false keeps `init_scale`.
    pub learn_scale: bool,
    /// Classes that compete at prediction: `all` (default) or `unseen`.
    pub predict: Candidates,
}

impl Default for ContrastiveHeadsConfig {
    fn default() -> Self {
        ContrastiveHeadsConfig {
            dim: 256,
            shared: false,
            text_head: true,
            center_text: false,
            init_scale: CLIP_SCALE,
            learn_scale: true,
            predict: Candidates::All,
        }
    }
}

struct Heads {
    vs: VarStore,
    /// `[dim, d_image]`, or the shared `[dim, max(d_image, d_text)]`.
    image: Tensor,
    /// `[dim, d_text]`; the shared map when `shared`; none without a text head.
    text: Option<Tensor>,
    log_scale: Tensor,
    class_text: Tensor,
    seen: Tensor,
}

/// The contrastive-heads method.
pub struct ContrastiveHeads {
    config: ContrastiveHeadsConfig,
    class_text: Option<Tensor>,
    heads: Option<Heads>,
}

impl ContrastiveHeads {
    /// Contrastive heads with `config`; the class texts come with [`Method::set_class_text`].
    pub fn new(config: ContrastiveHeadsConfig) -> Self {
        ContrastiveHeads { config, class_text: None, heads: None }
    }
}

/// `x` zero-padded on its last dimension to `width`.
fn pad_to(x: &Tensor, width: i64) -> Tensor {
    let d = *x.size().last().expect("features have a width");
    if d == width { x.shallow_clone() } else { x.constant_pad_nd([0, width - d]) }
}

fn unit_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

impl Heads {
    fn scale(&self) -> Tensor {
        self.log_scale.exp().clamp_max(MAX_SCALE)
    }

    /// `[batch, classes]` scores `s · ĝ(x) · ĥ(t)ᵀ` of pooled features `x`.
    fn scores(&self, x: &Tensor) -> Tensor {
        let x = unit_rows(&x.to_kind(Kind::Float));
        let t = unit_rows(&self.class_text);
        let width = self.image.size()[1];
        let image = unit_rows(&pad_to(&x, width).matmul(&self.image.tr()));
        let text = match &self.text {
            Some(w) => unit_rows(&pad_to(&t, w.size()[1]).matmul(&w.tr())),
            None => t,
        };
        image.matmul(&text.tr()) * self.scale()
    }
}

/// The text → image half of the symmetric InfoNCE loss over a batch's
/// `[batch, classes]` scores: for each class present in `labels`, the
/// cross-entropy of a softmax over the batch's images (the class's column)
/// with its images as equal positives, averaged over the classes present.
pub fn text_to_image_loss(scores: &Tensor, labels: &Tensor) -> Tensor {
    let classes = scores.size()[1];
    let positives = labels.one_hot(classes).to_kind(Kind::Float);
    let counts = positives.sum_dim_intlist(0, false, Kind::Float);
    let log_p = scores.log_softmax(0, Kind::Float);
    let per_class = -(log_p * &positives).sum_dim_intlist(0, false, Kind::Float) / counts.clamp_min(1.0);
    let present = counts.gt(0.0);
    per_class.masked_select(&present).mean(Kind::Float)
}

/// METHODS.md's symmetric InfoNCE of `n` paired rows (row `i` of `image`
/// matches row `i` of `text`), both already projected:
/// `½[CE(s·ÎT̂ᵀ, I) + CE(s·T̂Îᵀ, I)]`.
pub fn symmetric_info_nce(image: &Tensor, text: &Tensor, scale: f64) -> Tensor {
    let logits = unit_rows(image).matmul(&unit_rows(text).tr()) * scale;
    let target = Tensor::arange(image.size()[0], (Kind::Int64, image.device()));
    let ce = |l: &Tensor| l.cross_entropy_for_logits(&target);
    (ce(&logits) + ce(&logits.tr())) * 0.5
}

impl Method for ContrastiveHeads {
    fn name(&self) -> &'static str {
        "contrastive_heads"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn reads_class_text(&self) -> bool {
        true
    }

    fn set_class_text(&mut self, embeddings: &Tensor) -> Result<()> {
        if embeddings.dim() != 2 || embeddings.size()[0] < 1 {
            return Err(Error::Config(format!("contrastive_heads: the class texts' embeddings must be [classes, d], got {:?}", embeddings.size())));
        }
        self.class_text = Some(embeddings.to_kind(Kind::Float).to_device(tch::Device::Cpu));
        Ok(())
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        if c.dim < 1 || !(c.init_scale > 0.0 && c.init_scale <= MAX_SCALE) {
            return Err(Error::Config(format!(
                "contrastive_heads: dim must be at least 1 and init_scale in (0, {MAX_SCALE}], got dim = {} and init_scale = {}",
                c.dim, c.init_scale
            )));
        }
        let Some(class_text) = &self.class_text else {
            return Err(Error::Config(
                "contrastive_heads needs the embeddings of the class descriptions: give the experiment a [class_text] table (its text encoder and descriptions)"
                    .into(),
            ));
        };
        let (classes, d_text) = (class_text.size()[0], class_text.size()[1]);
        if classes != model.num_classes() {
            return Err(Error::Config(format!(
                "contrastive_heads: {classes} class descriptions for a task of {} classes: give one per class, in label order",
                model.num_classes()
            )));
        }
        freeze_head(model);
        let d_image = model.backbone.hidden_size();
        let vs = VarStore::new(model.device());
        let root = vs.root();
        // CLIP's projections start at std width^-½; a shared map reads the wider tower's width.
        let init = |d: i64| Init::Randn { mean: 0.0, stdev: (d as f64).powf(-0.5) };
        let (image, text) = match (c.shared, c.text_head) {
            (true, false) => return Err(Error::Config("contrastive_heads: a shared head needs the text head (text_head = true)".into())),
            (true, true) => {
                let width = d_image.max(d_text);
                let shared = root.var("shared", &[c.dim, width], init(width));
                (shared.shallow_clone(), Some(shared))
            }
            (false, true) => (root.var("image", &[c.dim, d_image], init(d_image)), Some(root.var("text", &[c.dim, d_text], init(d_text)))),
            (false, false) => (root.var("image", &[d_text, d_image], init(d_image)), None),
        };
        let log_scale = root.var("log_scale", &[], Init::Const(c.init_scale.ln()));
        if !c.learn_scale {
            let _ = log_scale.set_requires_grad(false);
        }
        let stored = root.zeros_no_train("class_text", &[classes, d_text]);
        let seen = root.ones_no_train("seen", &[classes]);
        let class_text = if c.center_text { class_text - class_text.mean_dim(0, true, Kind::Float) } else { class_text.shallow_clone() };
        tch::no_grad(|| stored.shallow_clone().copy_(&class_text.to_device(model.device())));
        self.heads = Some(Heads { vs, image, text, log_scale, class_text: stored, seen });
        Ok(())
    }

    fn before_train(&mut self, _model: &Model, data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        if let Some(h) = &self.heads {
            let classes = h.seen.size()[0];
            let seen = data.train.labels.one_hot(classes).sum_dim_intlist(0, false, Kind::Float).gt(0.0).to_kind(Kind::Float);
            tch::no_grad(|| h.seen.shallow_clone().copy_(&seen.to_device(h.seen.device())));
        }
        Ok(())
    }

    fn forward_taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, train: bool) -> Tensor {
        let (Some(h), Some(x)) = (&self.heads, taps.get(&Tap::Pooled)) else {
            return logits;
        };
        let scores = h.scores(x);
        // Training competes among the seen classes; prediction among those `predict` names.
        let keep = match (train, self.config.predict) {
            (true, _) => h.seen.gt(0.5),
            (false, Candidates::All) => return scores,
            (false, Candidates::Unseen) => h.seen.lt(0.5),
        };
        if keep.any().int64_value(&[]) == 0 {
            return scores;
        }
        scores.masked_fill(&keep.logical_not().unsqueeze(0), LEFT_OUT)
    }

    fn extra_loss(&self, step: &StepOutput) -> Option<Tensor> {
        self.heads.as_ref().map(|_| text_to_image_loss(&step.logits, &step.labels))
    }

    fn summary(&self) -> Option<toml::Table> {
        let h = self.heads.as_ref()?;
        let mut t = toml::Table::new();
        t.insert("logit_scale".into(), toml::Value::Float(h.scale().double_value(&[])));
        t.insert("seen_classes".into(), toml::Value::Integer(h.seen.sum(Kind::Float).double_value(&[]) as i64));
        Some(t)
    }

    fn identity_at_init(&self) -> bool {
        false
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.heads.as_ref().map(|h| &h.vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.heads.as_mut().map(|h| &mut h.vs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prototypes::testing;

    fn t(v: &[f32], cols: i64) -> Tensor {
        Tensor::from_slice(v).view([-1, cols])
    }

    fn ln_softmax(row: &[f64], i: usize) -> f64 {
        row[i] - row.iter().map(|v| v.exp()).sum::<f64>().ln()
    }

    /// Two pairs in 2-d, s = 2: image 0 = (1, 0), image 1 = (0, 1); text 0 =
    /// (1, 0), text 1 = (0.6, 0.8). Cosines: [[1, 0.6], [0, 0.8]].
    #[test]
    fn symmetric_info_nce_matches_a_hand_computed_value() {
        let (image, text) = (t(&[1.0, 0.0, 0.0, 1.0], 2), t(&[1.0, 0.0, 0.6, 0.8], 2));
        let s = [[2.0, 1.2], [0.0, 1.6]];
        let i2t = -(ln_softmax(&s[0], 0) + ln_softmax(&s[1], 1)) / 2.0;
        let t2i = -(ln_softmax(&[s[0][0], s[1][0]], 0) + ln_softmax(&[s[0][1], s[1][1]], 1)) / 2.0;
        let want = 0.5 * (i2t + t2i);
        let got = symmetric_info_nce(&image, &text, 2.0).double_value(&[]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// With one image per class, the engine's cross-entropy plus the text →
    /// image half is twice the symmetric InfoNCE of the image–description
    /// pairs; with two images of one class, each is an equal positive.
    #[test]
    fn the_two_halves_make_twice_the_symmetric_info_nce() {
        let scores = t(&[3.0, -1.0, 0.5, 0.2, 2.0, -0.3, -0.4, 0.1, 1.5], 3);
        let labels = Tensor::from_slice(&[0i64, 1, 2]);
        let i2t = scores.cross_entropy_for_logits(&labels);
        let total = (i2t + text_to_image_loss(&scores, &labels)).double_value(&[]);
        // Here the scores are already s·ÎT̂ᵀ: the symmetric loss of the pairs by hand.
        let s: Vec<Vec<f64>> = (0..3).map(|i| (0..3).map(|j| scores.double_value(&[i, j])).collect()).collect();
        let rows: f64 = (0..3).map(|i| -ln_softmax(&s[i], i)).sum::<f64>() / 3.0;
        let cols: f64 = (0..3).map(|j| -ln_softmax(&(0..3).map(|i| s[i][j]).collect::<Vec<_>>(), j)).sum::<f64>() / 3.0;
        assert!((total - (rows + cols)).abs() < 1e-5, "{total} vs 2 × {}", (rows + cols) / 2.0);

        // Images 0 and 2 of class 0, image 1 of class 1; class 2 absent.
        let labels = Tensor::from_slice(&[0i64, 1, 0]);
        let c0 = [s[0][0], s[1][0], s[2][0]];
        let c1 = [s[0][1], s[1][1], s[2][1]];
        let want = (-(ln_softmax(&c0, 0) + ln_softmax(&c0, 2)) / 2.0 - ln_softmax(&c1, 1)) / 2.0;
        let got = text_to_image_loss(&scores, &labels).double_value(&[]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    fn prepared(config: ContrastiveHeadsConfig, text: &Tensor) -> (Model, ContrastiveHeads) {
        let model = testing::model(0, 3);
        let mut m = ContrastiveHeads::new(config);
        m.set_class_text(text).unwrap();
        m.prepare(&model).unwrap();
        (model, m)
    }

    /// The scores are `s · cos` of the projections; classes absent from
    /// training are left out of training's candidates, and `unseen` predicts among them alone.
    #[test]
    fn scores_are_scaled_cosines_and_candidates_follow_the_seen_classes() {
        let text = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2);
        let config = ContrastiveHeadsConfig { dim: 4, predict: Candidates::Unseen, ..Default::default() };
        let (_, mut m) = prepared(config, &text);
        let x = t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], 3);
        let taps = testing::pooled(&x);
        let h = m.heads.as_ref().unwrap();
        let g = unit_rows(&unit_rows(&x).matmul(&h.image.tr()));
        let e = unit_rows(&unit_rows(&text).matmul(&h.text.as_ref().unwrap().tr()));
        let want = g.matmul(&e.tr()) * CLIP_SCALE;
        let got = m.logits(Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)), &taps, false);
        assert!(got.allclose(&want, 1e-5, 1e-5, false), "{got} vs {want}");

        let train = testing::split(1, 4, 3);
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let train = zhijian_core::Split { labels, ..train };
        m.before_train(&testing::model(0, 3), &RunData::train_only(&train), &TrainConfig::default()).unwrap();
        let trained = m.logits(Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)), &taps, true);
        assert!(trained.narrow(1, 0, 2).allclose(&want.narrow(1, 0, 2), 1e-5, 1e-5, false));
        assert!(trained.narrow(1, 2, 1).eq(LEFT_OUT).all().int64_value(&[]) == 1, "class 2 never trained: {trained}");
        let unseen = m.logits(Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)), &taps, false);
        assert!(unseen.narrow(1, 0, 2).eq(LEFT_OUT).all().int64_value(&[]) == 1 && unseen.narrow(1, 2, 1).allclose(&want.narrow(1, 2, 1), 1e-5, 1e-5, false));
    }

    /// One shared map reads both towers, the narrower zero-padded; bad settings and missing texts are named.
    #[test]
    fn a_shared_head_pads_the_narrower_tower_and_bad_input_is_named() {
        let text = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2);
        let (_, m) = prepared(ContrastiveHeadsConfig { dim: 5, shared: true, ..Default::default() }, &text);
        let names: Vec<String> = m.var_store().unwrap().variables().into_keys().collect();
        assert!(names.contains(&"shared".to_string()) && !names.contains(&"image".to_string()), "{names:?}");
        assert_eq!(m.heads.as_ref().unwrap().image.size(), [5, 3]);

        // Without a text head the image head maps to the text width, and the texts are their own embeddings.
        let (_, m) = prepared(ContrastiveHeadsConfig { dim: 5, text_head: false, ..Default::default() }, &text);
        let h = m.heads.as_ref().unwrap();
        assert!(h.text.is_none() && h.image.size() == [2, 3]);
        let x = t(&[1.0, 2.0, 0.5], 3);
        let want = unit_rows(&unit_rows(&x).matmul(&h.image.tr())).matmul(&unit_rows(&text).tr()) * CLIP_SCALE;
        assert!(h.scores(&x).allclose(&want, 1e-5, 1e-5, false));

        let model = testing::model(0, 3);
        let bad = ContrastiveHeadsConfig { shared: true, text_head: false, ..Default::default() };
        let mut m = ContrastiveHeads::new(bad);
        m.set_class_text(&text).unwrap();
        assert!(m.prepare(&model).unwrap_err().to_string().contains("text_head"));
        let err = ContrastiveHeads::new(ContrastiveHeadsConfig::default()).prepare(&model).unwrap_err().to_string();
        assert!(err.contains("[class_text]"), "{err}");
        let mut m = ContrastiveHeads::new(ContrastiveHeadsConfig::default());
        m.set_class_text(&t(&[1.0, 0.0], 2)).unwrap();
        let err = m.prepare(&model).unwrap_err().to_string();
        assert!(err.contains("1 class descriptions") && err.contains("3 classes"), "{err}");
        let err = zhijian_core::parse_config::<ContrastiveHeadsConfig>("contrastive_heads", &toml::from_str("dimm = 3").unwrap()).unwrap_err().to_string();
        assert!(err.contains("dimm"), "{err}");
    }
}
