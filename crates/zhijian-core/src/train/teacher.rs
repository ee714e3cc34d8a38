//! The teacher slot: a frozen model run beside the one training, on the same
//! batches. It is the pre-trained model itself for methods that keep what it
//! knows (DELTA's feature maps, LwF's old-task outputs) and a configured,
//! possibly fine-tuned, model for distillation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tch::{Device, Tensor};

use super::engine::in_length_order;
use crate::backbone::Input;
use crate::ctx::{Ctx, Tap};
use crate::error::{Error, Result};
use crate::method::{Method, TeacherOutput};
use crate::model::Model;
use crate::precision::{Compute, WeightCache};

/// A frozen model with the methods its artifact was trained with.
pub struct Teacher {
    /// The model (backbone and head), every parameter frozen.
    pub model: Model,
    /// Methods the teacher's forward pass runs with (LoRA of a fine-tuned
    /// teacher), prepared and restored.
    pub methods: Vec<Box<dyn Method>>,
    /// What the teacher computes in.
    pub compute: Compute,
    /// Described in records (`pre-trained efficientnet_lite0 with its ImageNet head`).
    pub description: String,
    /// The training split as the teacher reads it, row for row, when it
    /// reads it differently from the student (its own tokenizer, its own
    /// image size); `None`: the student's inputs, augmented as the student
    /// sees them. Its own view is read without augmentation.
    pub train_input: Option<Input>,
    /// The outputs computed once, kept for the next run on the same split.
    memo: Mutex<Option<Memo>>,
}

/// Cached outputs and the labels of the split they were computed on.
struct Memo {
    labels: Tensor,
    cache: TeacherCache,
}

impl Teacher {
    /// A teacher from a prepared model and methods; freezes every parameter,
    /// the methods' too, so the student's optimiser cannot reach them.
    pub fn new(model: Model, methods: Vec<Box<dyn Method>>, description: impl Into<String>) -> Teacher {
        for (_, t) in model.vs.variables() {
            let _ = t.set_requires_grad(false);
        }
        for (_, t) in super::engine::method_variables(&methods) {
            let _ = t.set_requires_grad(false);
        }
        Teacher { model, methods, compute: Compute::Fp32, description: description.into(), train_input: None, memo: Mutex::new(None) }
    }

    /// The teacher's logits, pooled features and `taps` on every example of
    /// `input`, computed once ([`TeacherCache`]) and reused by later runs
    /// whose training split has the same labels (a comparison's strategies
    /// and seeds share one split), whichever of the two views they read. A
    /// run wanting taps the memo lacks computes those and adds them. Returns
    /// the cache and whether anything was computed now, or `None` where the
    /// cache would outgrow [`TEACHER_CACHE_BUDGET`] (the teacher then runs on
    /// every batch).
    pub fn outputs_once(&self, input: &Input, labels: &Tensor, taps: &[Tap], batch_size: i64) -> Result<Option<(TeacherCache, bool)>> {
        let mut memo = self.memo.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if memo.as_ref().is_some_and(|m| m.labels.size() != labels.size() || !m.labels.equal(labels)) {
            *memo = None;
        }
        // Pooled features too, even for a loss on logits alone: a later run's may read them.
        let mut missing = vec![Tap::Pooled];
        missing.extend(taps.iter().filter(|t| **t != Tap::Pooled).cloned());
        missing.retain(|t| !memo.as_ref().is_some_and(|m| m.cache.taps.contains_key(t)));
        if missing.is_empty()
            && let Some(m) = memo.as_ref()
        {
            return Ok(Some((m.cache.shallow_clone(), false)));
        }
        let budget = TEACHER_CACHE_BUDGET - memo.as_ref().map_or(0, |m| m.cache.bytes());
        let Some(computed) = tch::no_grad(|| TeacherCache::compute(self, input, &missing, batch_size, budget))? else {
            return Ok(None);
        };
        let memo = match memo.as_mut() {
            Some(m) => {
                m.cache.taps.extend(computed.taps);
                m
            }
            None => memo.insert(Memo { labels: labels.shallow_clone(), cache: computed }),
        };
        Ok(Some((memo.cache.shallow_clone(), true)))
    }

    /// Number of the teacher's output classes.
    pub fn num_classes(&self) -> i64 {
        self.model.num_classes()
    }

    /// The teacher's logits and `taps` on `input` (a batch on the teacher's
    /// device), in evaluation mode, without gradients.
    pub fn run(&self, input: &Input, taps: &[Tap], weights: &WeightCache) -> TeacherOutput {
        let cx = Ctx::new(false, &self.methods, taps.to_vec()).with_compute(self.compute).with_weight_cache(weights);
        let logits = tch::no_grad(|| self.model.forward(&cx, input));
        TeacherOutput { logits: crate::precision::to_fp32(&logits), taps: cx.take_taps() }
    }
}

/// The most memory a teacher's cached outputs may take (2 GiB): block maps of
/// a large split at a large image size can exceed it, and the teacher then
/// runs on every batch instead.
pub const TEACHER_CACHE_BUDGET: i64 = 2 << 30;

/// The teacher's outputs on every training example, computed once: what a
/// frozen teacher gives when its inputs are the same at every epoch (in
/// memory, or its own view of the split, which it reads without
/// augmentation). Logits always; pooled features, and block or site outputs
/// where every example's has the same shape (images).
pub struct TeacherCache {
    logits: Tensor,
    taps: BTreeMap<Tap, Tensor>,
}

impl TeacherCache {
    /// Whether the teacher's outputs on `input` (its own view of the split,
    /// or the student's) can be computed once for `taps`: the student's lazy
    /// images may be augmented anew at every epoch, the rest is fixed; and
    /// a text batch's block outputs are as long as its longest review, so
    /// for text only pooled features have one shape for every example.
    pub fn applies(teacher: &Teacher, input: &Input, taps: &[Tap]) -> bool {
        let fixed = teacher.train_input.is_some() || !matches!(input, Input::Lazy(_));
        let images = matches!(input, Input::Images(_) | Input::Lazy(_));
        fixed && taps.iter().all(|t| *t == Tap::Pooled || images)
    }

    /// Runs `teacher` over every example of `input` (on the CPU, in example
    /// order), or returns `None` when its logits and `taps` would take more
    /// than `budget` bytes (sized from the first example's outputs).
    pub fn compute(teacher: &Teacher, input: &Input, taps: &[Tap], batch_size: i64, budget: i64) -> Result<Option<TeacherCache>> {
        if !Self::applies(teacher, input, taps) {
            return Err(Error::Config("the teacher's outputs can be cached only for fixed inputs, and block outputs only for images".into()));
        }
        if input.is_empty() {
            return Err(Error::Data("nothing to run: the split is empty".into()));
        }
        let weights = WeightCache::new();
        let device = teacher.model.device();
        // Each output's shape per example, from the first example.
        let first = teacher.run(&input.select(&Tensor::from_slice(&[0i64]), device)?, taps, &weights);
        let mut shapes = vec![first.logits.size()[1..].to_vec()];
        for t in taps {
            let out = first.taps.get(t).ok_or_else(|| Error::Config(format!("the teacher produces no {t:?} output")))?;
            shapes.push(out.size()[1..].to_vec());
        }
        let widths: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
        if input.len() * widths.iter().sum::<i64>() * 4 > budget {
            return Ok(None);
        }
        // One pass, every output of an example flattened side by side in one
        // row, split apart after.
        let rows = in_length_order(input, batch_size, device, |batch| {
            let out = teacher.run(batch, taps, &weights);
            let b = out.logits.size()[0];
            let parts: Vec<Tensor> =
                std::iter::once(out.logits).chain(taps.iter().map(|t| crate::precision::to_fp32(&out.taps[t]))).map(|p| p.reshape([b, -1])).collect();
            Tensor::cat(&parts, 1)
        })?;
        let mut start = 0;
        let mut outputs = shapes.iter().zip(&widths).map(|(shape, &width)| {
            let part = rows.narrow(1, start, width).reshape([&[-1][..], shape].concat());
            start += width;
            part
        });
        let logits = outputs.next().expect("the logits come first");
        Ok(Some(TeacherCache { logits, taps: taps.iter().cloned().zip(outputs).collect() }))
    }

    /// The same outputs, sharing their storage.
    pub fn shallow_clone(&self) -> TeacherCache {
        TeacherCache { logits: self.logits.shallow_clone(), taps: self.taps.iter().map(|(t, v)| (t.clone(), v.shallow_clone())).collect() }
    }

    /// The outputs for the examples at `idx` (int64 on the CPU), on `device`.
    pub fn select(&self, idx: &Tensor, device: Device) -> TeacherOutput {
        let taps = self.taps.iter().map(|(t, v)| (t.clone(), v.index_select(0, idx).to_device(device))).collect();
        TeacherOutput { logits: self.logits.index_select(0, idx).to_device(device), taps }
    }

    /// Bytes held.
    pub fn bytes(&self) -> i64 {
        let size = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        size(&self.logits) + self.taps.values().map(size).sum::<i64>()
    }
}

/// Every teacher tap the methods want, or `None` if none needs a teacher.
pub fn teacher_taps(methods: &[Box<dyn Method>]) -> Option<Vec<Tap>> {
    let mut wanted: Option<Vec<Tap>> = None;
    for taps in methods.iter().filter_map(|m| m.teacher_taps()) {
        let all = wanted.get_or_insert_with(Vec::new);
        for t in taps {
            if !all.contains(&t) {
                all.push(t);
            }
        }
    }
    wanted
}
