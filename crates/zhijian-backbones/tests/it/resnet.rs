//! ResNet parity with timm (golden file from `scripts/gen_resnet_golden.py`):
//! basic and bottleneck blocks, evaluation mode with random BatchNorm
//! statistics, and a training-mode pass (batch statistics, running-mean update).

use tch::{Device, Tensor};
use zhijian_backbones::{BlockKind, ResNet, ResNetConfig, load_pretrained};
use zhijian_core::{Ctx, Input, Model, ParamGroup, Tap};

use crate::{checkpoint, golden};

fn tiny(block: BlockKind) -> ResNetConfig {
    ResNetConfig { block, layers: vec![2, 1, 1, 1], channels: vec![8, 12, 16, 20], stem_width: 64, in_chans: 3 }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn resnet_matches_timm_in_eval_and_train_mode() {
    let g = golden("resnet_tiny.safetensors");
    let images = Input::Images(g["images"].shallow_clone());
    let mut worst = 0.0f64;
    for (block, name) in [(BlockKind::Basic, "basic"), (BlockKind::Bottleneck, "bottleneck")] {
        let model = Model::new(Device::Cpu, 5, |p| Box::new(ResNet::new(p, &tiny(block)).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let report = load_pretrained(&model, &checkpoint(&g, &format!("{name}.w."), dir.path())).unwrap();
        assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");

        let taps: Vec<Tap> = (0..4).map(Tap::Block).chain([Tap::Pooled]).collect();
        let cx = Ctx::new(false, &[], taps);
        let logits = tch::no_grad(|| model.forward(&cx, &images));
        let got = cx.take_taps();
        let mut pairs: Vec<(Tensor, String)> = (0..4).map(|i| (got[&Tap::Block(i)].shallow_clone(), format!("block.{i}"))).collect();
        pairs.push((got[&Tap::Pooled].shallow_clone(), "pooled".into()));
        pairs.push((logits, "logits".into()));
        for (t, key) in &pairs {
            let d = max_diff(t, &g[&format!("{name}.{key}")]);
            assert!(d < 1e-4, "{name} {key}: max abs diff {d}");
            worst = worst.max(d);
        }

        // Frozen BatchNorm keeps its statistics even in a training pass ...
        model.freeze_backbone();
        let frozen = tch::no_grad(|| model.forward(&Ctx::plain(true), &images));
        assert!(max_diff(&frozen, &g[&format!("{name}.logits")]) < 1e-4);
        // ... and uses batch statistics, updating the running ones, once it trains.
        model.unfreeze_where(|_, _| true);
        let trained = tch::no_grad(|| model.forward(&Ctx::plain(true), &images));
        let d = max_diff(&trained, &g[&format!("{name}.train.logits")]);
        assert!(d < 1e-4, "{name} train-mode logits: max abs diff {d}");
        let mean = &model.vs.variables()["bn1.running_mean"];
        assert!(max_diff(mean, &g[&format!("{name}.train.bn1.running_mean")]) < 1e-5);
        assert_eq!(model.vs.variables()["bn1.num_batches_tracked"].int64_value(&[]), 1);
        worst = worst.max(d);
    }
    println!("ResNet vs timm (basic / bottleneck, eval and train mode): max abs diff {worst:.2e}");
}

#[test]
fn resnet_presets_count_like_torchvision_and_group_by_stage() {
    // torchvision's parameter counts (buffers excluded), 1000-class head `fc`.
    for (config, want) in [(ResNetConfig::resnet18(), 11_689_512), (ResNetConfig::resnet50(), 25_557_032)] {
        let model = Model::new(Device::Cpu, 1000, |p| Box::new(ResNet::new(p, &config).unwrap()));
        assert_eq!(model.num_params(), want);
        assert!(model.vs.variables().contains_key("fc.weight"));
    }
    // ResNet-18: the stem, 16 convolutions in the blocks, 3 downsampling shortcuts, then the head.
    let model = Model::new(Device::Cpu, 10, |p| Box::new(ResNet::new(p, &ResNetConfig::resnet18()).unwrap()));
    let sites = model.sites();
    // 20 convolutions, each followed by its BatchNorm, and the head.
    assert_eq!(sites.len(), 41);
    assert_eq!(sites[40].path, "fc");
    assert_eq!((sites[0].path.as_str(), sites[0].role), ("conv1", zhijian_core::Role::Stem));
    assert!(sites.iter().any(|s| s.path == "layer2.0.downsample.0" && s.role == zhijian_core::Role::Pointwise));
    let model = Model::new(Device::Cpu, 3, |p| Box::new(ResNet::new(p, &tiny(BlockKind::Basic)).unwrap()));
    assert_eq!(model.group("conv1.weight"), ParamGroup::Stem);
    assert_eq!(model.group("layer3.0.bn2.weight"), ParamGroup::Block(2));
    assert_eq!(model.group("fc.bias"), ParamGroup::Head);
    // Buffers never train, even when everything else does.
    model.unfreeze_where(|_, _| true);
    assert!(!model.vs.variables()["layer1.0.bn1.running_var"].requires_grad());
    let bad = ResNetConfig { layers: vec![2, 2], ..ResNetConfig::resnet18() };
    assert!(ResNet::new(tch::nn::VarStore::new(Device::Cpu).root(), &bad).is_err());
}
