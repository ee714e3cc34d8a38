//! EfficientNet-Lite0 with its shipped ImageNet weights (the legacy `.pth`,
//! converted by zhijian's own reader) on foolbox's 20 labelled ImageNet
//! photos, through the evaluation transform of the backbone's preset. An
//! independent numpy forward pass measured top-1 17/20 and top-5 19/20.

use zhijian::backbones::{EfficientNetLite, EfficientNetLiteConfig, load_pretrained};
use zhijian::core::train::predict;
use zhijian::core::{Accuracy, Compute, Model};
use zhijian::data::{ImageLoader, ImageTransform, foolbox_imagenet};

#[test]
fn efficientnet_lite0_classifies_foolbox_imagenet_samples() {
    // Building the model draws its random initialisation from the global generator.
    let _rng = crate::rng_lock();
    let pth = zhijian::assets::locate("efficientnet-lite0", "efficientnet-lite0-57934424.pth").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("lite0.safetensors");
    zhijian::core::pth::convert_pth(&pth, &weights).unwrap();

    let model = Model::new(tch::Device::Cpu, 1000, |p| Box::new(EfficientNetLite::new(p, &EfficientNetLiteConfig::lite0()).unwrap()));
    let report = load_pretrained(&model, &weights).unwrap();
    // Every parameter and buffer, the 1000-class head `_fc` included.
    assert!(report.missing.is_empty() && report.mismatched.is_empty() && report.unexpected.is_empty(), "{report:?}");

    let samples = foolbox_imagenet().unwrap();
    assert_eq!(samples.len(), 20);
    let preset = model.backbone.image_preset().unwrap();
    let loader = ImageLoader::from_files(&samples, ImageTransform::from_preset(&preset)).unwrap();
    let split = loader.split("foolbox", &(0..20).collect::<Vec<_>>()).unwrap();
    let logits = predict(&model, &[], &split.input, 10, Compute::Fp32).unwrap();
    let accuracy = Accuracy::from_logits(&logits, &split.labels);
    let (top1, top5) = ((accuracy.top1() * 20.0).round() as i64, (accuracy.top5() * 20.0).round() as i64);
    println!("EfficientNet-Lite0 on foolbox's 20 ImageNet samples: top-1 {top1}/20, top-5 {top5}/20");
    // Resizing differs from the reference's in its filter (antialiased bilinear here,
    // bicubic in TensorFlow), which may move one borderline photo either way.
    assert!((16..=18).contains(&top1), "top-1 {top1}/20, reference 17/20");
    assert!(top5 >= 18, "top-5 {top5}/20, reference 19/20");
}
