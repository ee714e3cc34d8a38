//! The teacher a run gets when one of its methods asks for one
//! ([`zhijian_core::Method::teacher_taps`]): the run of another experiment
//! its `[teacher]` table names (distillation), else the pre-trained model
//! itself, backbone and the head its weights ship (ImageNet's for the vision
//! backbones), frozen (DELTA holds the feature maps to it, LwF the old
//! task's outputs).

use tch::Device;
use zhijian_core::weights::read_safetensors;
use zhijian_core::{Error, Registry, Result, Teacher};

use crate::build::{build_model, image_preset, new_model, weights_file};
use crate::data::{Data, load_data};
use crate::experiment::{Experiment, RunRef};
use crate::runner::{RecordedRun, recorded_run};

/// The experiment's backbone as pre-trained, with the head its weights ship
/// when they have one (else a head of `task_classes` zeros: only the
/// backbone's maps matter then), frozen.
pub fn pretrained_teacher(exp: &Experiment, task_classes: i64, device: Device) -> Result<Teacher> {
    let head_name = new_model(exp, task_classes, Device::Cpu)?.0.head.site().path.clone();
    let shipped = match weights_file(exp)? {
        Some(path) => read_safetensors(&path)?.into_iter().find(|(n, _)| *n == format!("{head_name}.weight")).map(|(_, t)| t.size()[0]),
        None => None,
    };
    let (model, desc) = build_model(exp, shipped.unwrap_or(task_classes), device)?;
    if shipped.is_none() {
        tch::no_grad(|| {
            let _ = model.head.ws.shallow_clone().zero_();
        });
    }
    let head = match shipped {
        Some(classes) => format!("its shipped {classes}-class head"),
        None => "no head".to_string(),
    };
    Ok(Teacher::new(model, Vec::new(), format!("{desc} with {head}")))
}

/// The teacher a `[teacher]` table names: the recorded run of another
/// experiment, its backbone built and its methods prepared as that run's,
/// its artifact restored, frozen; with that experiment's own view of the
/// training split (its tokenizer, its image size), which must hold the same
/// examples in the same order as the student's.
pub fn configured_teacher(exp: &Experiment, config: &RunRef, registry: &Registry, student: &Data, device: Device, full: bool) -> Result<Teacher> {
    let path = exp.base.join(&config.experiment);
    let texp = Experiment::load(&path, registry)?;
    let RecordedRun { record: run, artifact } = recorded_run(&texp, &path, config.records.as_ref().map(|r| exp.base.join(r)), &config.strategy, config.seed)
        .map_err(|e| Error::Config(format!("[teacher]: {e}")))?;
    let data = load_data(&texp, image_preset(&texp)?.as_ref(), full)?;
    if data.train.len() != student.train.len() || !data.train.labels.equal(&student.train.labels) {
        return Err(Error::Data(format!(
            "[teacher]: {} reads other training examples than this experiment ({} against {}, or other labels): give both the same data, limits and holdout",
            path.display(),
            data.train.len(),
            student.train.len()
        )));
    }
    let (model, desc) = build_model(&texp, data.classes.len() as i64, device)?;
    let entries: Vec<toml::Table> =
        serde_json::from_value(run.methods.clone()).map_err(|e| Error::Config(format!("[teacher]: the run's methods do not parse: {e}")))?;
    let mut methods = entries.iter().map(|m| registry.build(m)).collect::<Result<Vec<_>>>()?;
    crate::class_text::for_restore(&texp, data.classes.len() as i64, &mut methods)?;
    zhijian_core::train::prepare(&model, &mut methods, config.seed)?;
    zhijian_core::train::restore(&model, &methods, &artifact)?;
    let description = format!("{desc}, `{}` seed {} of {} (test top-1 {:.2}%)", config.strategy, config.seed, texp.name, 100.0 * run.test_top1);
    let mut teacher = Teacher::new(model, methods, description);
    teacher.train_input = Some(data.train.input);
    Ok(teacher)
}
