//! Forgetting: the backbone's pre-training task, tested with the head its
//! weights ship, on the pre-trained backbone and again after each run (the
//! backbone as the run's methods leave it). The drop in top-1 is the run's
//! forgetting; a strategy that leaves the backbone untouched forgets nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use zhijian_core::train::features;
use zhijian_core::weights::read_safetensors;
use zhijian_core::{Accuracy, Error, ImagePreset, Method, Model, Result, Split};
use zhijian_data::{ImageLoader, ImageTransform, foolbox_imagenet};

use crate::experiment::SourceTask;

/// Top-1 on the source task before and after a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceScore {
    /// The task (`foolbox_imagenet`).
    pub task: String,
    /// Top-1 of the pre-trained model.
    pub before: f64,
    /// Top-1 after the run, through the shipped head, or through the copy
    /// of it a method trained with the backbone (LwF's old-task head).
    pub after: f64,
    /// Examples.
    pub n: i64,
}

impl SourceScore {
    /// Top-1 lost, in points of percentage (negative: improved).
    pub fn forgetting(&self) -> f64 {
        100.0 * (self.before - self.after)
    }
}

/// The source task's examples, the shipped head, and the pre-trained score.
pub struct Source {
    task: &'static str,
    split: Split,
    weight: Tensor,
    bias: Tensor,
    before: f64,
}

impl Source {
    /// Loads the task's examples (through the backbone's own evaluation
    /// preset) and the head `head_name` from `weights`, and scores the
    /// pre-trained `model` (fresh from its weights, before any training).
    pub fn new(task: &SourceTask, weights: &Path, model: &Model, batch_size: i64) -> Result<Source> {
        let preset: ImagePreset =
            model.backbone.image_preset().ok_or_else(|| Error::Config("a source task needs an image backbone: `foolbox_imagenet` is images".into()))?;
        let (name, files) = match task {
            SourceTask::FoolboxImagenet => ("foolbox_imagenet", foolbox_imagenet()?),
        };
        let loader = ImageLoader::from_files(&files, ImageTransform::from_preset(&preset))?;
        let split = loader.split(name, &(0..loader.labels().len()).collect::<Vec<_>>())?;
        let head = model.backbone.head_name().to_string();
        let mut tensors: std::collections::HashMap<String, Tensor> = read_safetensors(weights)?.into_iter().collect();
        let mut take = |part: &str| {
            tensors.remove(&format!("{head}.{part}")).ok_or_else(|| {
                Error::Config(format!("source task `{name}` needs the head the weights ship, `{head}.{part}`, and {} has none", weights.display()))
            })
        };
        let (weight, bias) = (take("weight")?.to_kind(Kind::Float), take("bias")?.to_kind(Kind::Float));
        let classes = loader.classes().len() as i64;
        if weight.size() != [classes, model.backbone.hidden_size()] {
            return Err(Error::Config(format!(
                "source task `{name}` has {classes} classes over {} features; the shipped head `{head}.weight` is {:?}",
                model.backbone.hidden_size(),
                weight.size()
            )));
        }
        let mut source = Source { task: name, split, weight, bias, before: 0.0 };
        source.before = source.top1(model, &[], batch_size)?;
        Ok(source)
    }

    /// Top-1 of the shipped head over the backbone as `methods` leave it.
    fn top1(&self, model: &Model, methods: &[Box<dyn Method>], batch_size: i64) -> Result<f64> {
        let f = features(model, methods, &self.split.input, batch_size)?.to_device(Device::Cpu);
        let (weight, bias) = match methods.iter().find_map(|m| m.source_head()) {
            Some((w, b)) if w.size() == self.weight.size() => (w.detach().to_device(Device::Cpu), b.detach().to_device(Device::Cpu)),
            _ => (self.weight.shallow_clone(), self.bias.shallow_clone()),
        };
        Ok(Accuracy::from_logits(&f.linear(&weight, Some(&bias)), &self.split.labels).top1())
    }

    /// `task: top-1 X% of the pre-trained model on n examples`.
    pub fn describe(&self) -> String {
        format!("{}: top-1 {:.1}% of the pre-trained model on {} examples", self.task, 100.0 * self.before, self.split.len())
    }

    /// The score of a trained model.
    pub fn score(&self, model: &Model, methods: &[Box<dyn Method>], batch_size: i64) -> Result<SourceScore> {
        Ok(SourceScore { task: self.task.into(), before: self.before, after: self.top1(model, methods, batch_size)?, n: self.split.len() })
    }
}
