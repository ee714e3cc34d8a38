//! The teacher a run gets when one of its methods asks for one
//! ([`zhijian_core::Method::teacher_taps`]): the pre-trained model itself,
//! backbone and the head its weights ship (ImageNet's for the vision
//! backbones), frozen. DELTA holds the feature maps to it, LwF the old
//! task's outputs.

use tch::Device;
use zhijian_core::weights::read_safetensors;
use zhijian_core::{Result, Teacher};

use crate::build::{build_model, new_model, weights_file};
use crate::experiment::Experiment;

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
