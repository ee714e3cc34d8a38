//! EfficientNet-Lite parity with timm's `tf_efficientnet_lite` (golden file from
//! `scripts/gen_efficientnet_golden.py`, reduced width and depth, random
//! weights and BatchNorm statistics, keys renamed to lukemelas'), at an even
//! and an odd input size (asymmetric TensorFlow "same" padding).

use tch::{Device, Tensor};
use zhijian_backbones::{EfficientNetLite, EfficientNetLiteConfig, load_pretrained};
use zhijian_core::{Ctx, Input, Model, ParamGroup, Role, Tap};

use crate::{checkpoint, golden};

fn tiny() -> EfficientNetLiteConfig {
    EfficientNetLiteConfig { width: 0.25, depth: 0.5, image_size: 32, in_chans: 3, stages: None }
}

#[test]
fn efficientnet_lite_matches_timm() {
    let g = golden("efficientnet_lite_tiny.safetensors");
    let model = Model::new(Device::Cpu, 7, |p| Box::new(EfficientNetLite::new(p, &tiny()).unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let report = load_pretrained(&model, &checkpoint(&g, "w.", dir.path())).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty() && report.mismatched.is_empty(), "{report:?}");
    let mut worst = 0.0f64;
    for size in [32, 45] {
        let taps: Vec<Tap> = (0..7).map(Tap::Block).chain([Tap::Pooled]).collect();
        let cx = Ctx::new(false, &[], taps);
        let logits = tch::no_grad(|| model.forward(&cx, &Input::Images(g[&format!("images{size}")].shallow_clone())));
        let got = cx.take_taps();
        let mut pairs: Vec<(Tensor, String)> = (0..7).map(|i| (got[&Tap::Block(i)].shallow_clone(), format!("block.{i}"))).collect();
        pairs.push((got[&Tap::Pooled].shallow_clone(), "pooled".into()));
        pairs.push((logits, "logits".into()));
        for (t, key) in &pairs {
            let want = &g[&format!("{size}.{key}")];
            assert_eq!(t.size(), want.size(), "{size} px {key}");
            let d = (t - want).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{size} px {key}: max abs diff {d}");
            worst = worst.max(d);
        }
    }
    println!("EfficientNet-Lite vs timm tf_efficientnet_lite (32 and 45 px): max abs diff {worst:.2e}");
}

/// `stages = k` cuts the network after stage k − 1: loaded from the same
/// checkpoint (the later stages and `_conv_head` reported as unused), its
/// features are timm's stage k − 1 output average-pooled, and it is narrower.
#[test]
fn efficientnet_lite_cut_after_a_stage_pools_that_stage() {
    let g = golden("efficientnet_lite_tiny.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(&g, "w.", dir.path());
    for kept in [1, 4, 7] {
        let config = EfficientNetLiteConfig { stages: Some(kept), ..tiny() };
        let model = Model::new(Device::Cpu, 7, |p| Box::new(EfficientNetLite::new(p, &config).unwrap()));
        let report = load_pretrained(&model, &weights).unwrap();
        assert!(report.missing.is_empty(), "{report:?}");
        assert!(report.unexpected.iter().any(|k| k.starts_with("_conv_head.")), "{report:?}");
        assert_eq!(model.backbone.num_blocks(), kept);
        let features = tch::no_grad(|| model.features(&Ctx::new(false, &[], vec![]), &Input::Images(g["images32"].shallow_clone())));
        let want = g[&format!("32.block.{}", kept - 1)].mean_dim([2, 3].as_slice(), false, tch::Kind::Float);
        assert_eq!(features.size(), want.size(), "stages = {kept}");
        assert_eq!(model.backbone.hidden_size(), want.size()[1]);
        let d = (&features - &want).abs().max().double_value(&[]);
        assert!(d < 1e-4, "stages = {kept}: max abs diff {d} from timm's pooled stage output");
    }
    let bad = EfficientNetLiteConfig { stages: Some(8), ..tiny() };
    assert!(EfficientNetLite::new(tch::nn::VarStore::new(Device::Cpu).root(), &bad).err().unwrap().to_string().contains("stages = 8; keep 1 … 7"));
}

#[test]
fn efficientnet_lite_presets_count_like_timm_and_expose_sites() {
    // timm's `tf_efficientnet_lite{0,2}` parameter counts, 1000-class head (buffers excluded).
    for (config, want) in [(EfficientNetLiteConfig::lite0(), 4_652_008), (EfficientNetLiteConfig::lite2(), 6_092_072)] {
        let model = Model::new(Device::Cpu, 1000, |p| Box::new(EfficientNetLite::new(p, &config).unwrap()));
        assert_eq!(model.num_params(), want, "{config:?}");
    }
    let model = Model::new(Device::Cpu, 3, |p| Box::new(EfficientNetLite::new(p, &EfficientNetLiteConfig::lite0()).unwrap()));
    let sites = model.sites();
    let count = |role: Role| sites.iter().filter(|s| s.role == role).count();
    // 16 blocks: 16 depthwise; 15 expansions + 16 projections + the 1×1 head conv; one stem.
    assert_eq!((count(Role::Stem), count(Role::Depthwise), count(Role::Pointwise)), (1, 16, 32));
    // A BatchNorm after every convolution.
    assert_eq!(count(Role::Norm), 1 + 16 + 32);
    assert_eq!((sites[1].path.as_str(), sites[2].path.as_str()), ("_bn0", "_blocks.0._depthwise_conv"));
    assert_eq!(model.group("_blocks.0._bn1.weight"), ParamGroup::Block(0));
    assert_eq!(model.group("_blocks.15._project_conv.weight"), ParamGroup::Block(6));
    assert_eq!(model.group("_bn0.bias"), ParamGroup::Stem);
    assert_eq!(model.group("_conv_head.weight"), ParamGroup::Neck);
    assert_eq!(model.group("_fc.weight"), ParamGroup::Head);
    let preset = model.backbone.image_preset().unwrap();
    assert_eq!(preset.size, 224);
    assert!(EfficientNetLiteConfig::by_name("lite9").unwrap_err().to_string().contains("lite4"));
}
