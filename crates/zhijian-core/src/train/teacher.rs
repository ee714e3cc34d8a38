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

    /// The teacher's logits and pooled features on every example of `input`,
    /// computed once ([`TeacherCache`]) and reused by later runs whose
    /// training split has the same labels (a comparison's strategies and seeds
    /// share one split), whichever of the two they read. Returns the cache and
    /// whether it was computed now.
    pub fn outputs_once(&self, input: &Input, labels: &Tensor, batch_size: i64) -> Result<(TeacherCache, bool)> {
        let mut memo = self.memo.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(m) = memo.as_ref().filter(|m| m.labels.size() == labels.size() && m.labels.equal(labels)) {
            return Ok((m.cache.shallow_clone(), false));
        }
        // Pooled features too, even for a loss on logits alone: a later run's may read them.
        let cache = tch::no_grad(|| TeacherCache::compute(self, input, &[Tap::Pooled], batch_size))?;
        *memo = Some(Memo { labels: labels.shallow_clone(), cache: cache.shallow_clone() });
        Ok((cache, true))
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

/// The teacher's outputs on every training example, computed once: what a
/// frozen teacher gives when its inputs are the same at every epoch (in
/// memory, or its own view of the split, which it reads without
/// augmentation) and the methods want only its logits and pooled features.
pub struct TeacherCache {
    logits: Tensor,
    pooled: Option<Tensor>,
}

impl TeacherCache {
    /// Whether the teacher's outputs on `input` (its own view of the split,
    /// or the student's) can be computed once for `taps`: the student's lazy
    /// images may be augmented anew at every epoch, the rest is fixed.
    pub fn applies(teacher: &Teacher, input: &Input, taps: &[Tap]) -> bool {
        (teacher.train_input.is_some() || !matches!(input, Input::Lazy(_))) && taps.iter().all(|t| *t == Tap::Pooled)
    }

    /// Runs `teacher` over every example of `input` (on the CPU, in example order).
    pub fn compute(teacher: &Teacher, input: &Input, taps: &[Tap], batch_size: i64) -> Result<TeacherCache> {
        if !Self::applies(teacher, input, taps) {
            return Err(Error::Config("the teacher's outputs can be cached only for fixed inputs and pooled taps".into()));
        }
        let pooled = taps.contains(&Tap::Pooled);
        let weights = WeightCache::new();
        let classes = teacher.num_classes();
        // One pass, logits and pooled features side by side.
        let both = in_length_order(input, batch_size, teacher.model.device(), |batch| {
            let out = teacher.run(batch, taps, &weights);
            match out.taps.get(&Tap::Pooled) {
                Some(p) if pooled => Tensor::cat(&[out.logits, crate::precision::to_fp32(p)], 1),
                _ => out.logits,
            }
        })?;
        let logits = both.narrow(1, 0, classes);
        let pooled = pooled.then(|| both.narrow(1, classes, both.size()[1] - classes));
        Ok(TeacherCache { logits, pooled })
    }

    /// The same outputs, sharing their storage.
    pub fn shallow_clone(&self) -> TeacherCache {
        TeacherCache { logits: self.logits.shallow_clone(), pooled: self.pooled.as_ref().map(Tensor::shallow_clone) }
    }

    /// The outputs for the examples at `idx` (int64 on the CPU), on `device`.
    pub fn select(&self, idx: &Tensor, device: Device) -> TeacherOutput {
        let mut taps = BTreeMap::new();
        if let Some(p) = &self.pooled {
            taps.insert(Tap::Pooled, p.index_select(0, idx).to_device(device));
        }
        TeacherOutput { logits: self.logits.index_select(0, idx).to_device(device), taps }
    }

    /// Bytes held.
    pub fn bytes(&self) -> i64 {
        let size = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        size(&self.logits) + self.pooled.as_ref().map_or(0, size)
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
