//! ViT parity with timm (golden file from `scripts/gen_vit_golden.py`):
//! class-token and average pooling, at the training size and at a larger
//! input that needs the position embeddings resampled.

use std::collections::HashMap;

use tch::{Device, Tensor};
use zhijian_backbones::{Vit, VitConfig, VitPooling, load_pretrained};
use zhijian_core::{Ctx, Input, Model, ParamGroup, Tap};

use crate::{checkpoint, golden};

fn config(pooling: VitPooling) -> VitConfig {
    VitConfig { img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4, mlp_ratio: 2.0, pooling, ..VitConfig::tiny_patch4_32() }
}

fn loaded(pooling: VitPooling, prefix: &str, g: &HashMap<String, Tensor>) -> Model {
    let model = Model::new(Device::Cpu, 5, |p| Box::new(Vit::new(p, &config(pooling)).unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let report = load_pretrained(&model, &checkpoint(g, &format!("{prefix}.w."), dir.path())).unwrap();
    // Everything, the 5-class head included, comes from the timm checkpoint.
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");
    model
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn vit_matches_timm_with_both_poolings_and_resampled_positions() {
    let g = golden("vit_tiny.safetensors");
    let mut worst = 0.0f64;
    for (pooling, prefix) in [(VitPooling::Token, "token"), (VitPooling::Avg, "avg")] {
        let model = loaded(pooling, prefix, &g);
        for size in [32, 48] {
            let cx = Ctx::new(false, &[], vec![Tap::Block(0), Tap::Block(1), Tap::Pooled]);
            let logits = tch::no_grad(|| model.forward(&cx, &Input::Images(g[&format!("images{size}")].shallow_clone())));
            let taps = cx.take_taps();
            let key = |what: &str| format!("{prefix}.{size}.{what}");
            for (got, want) in [
                (&taps[&Tap::Block(0)], &g[&key("block.0")]),
                (&taps[&Tap::Block(1)], &g[&key("block.1")]),
                (&taps[&Tap::Pooled], &g[&key("pooled")]),
                (&logits, &g[&key("logits")]),
            ] {
                let d = max_diff(got, want);
                assert!(d < 1e-5, "{prefix} pooling at {size} px: max abs diff {d}");
                worst = worst.max(d);
            }
        }
    }
    println!("ViT vs timm (token / avg pooling, 32 and 48 px): max abs diff {worst:.2e}");
}

#[test]
fn vit_sites_groups_and_presets() {
    let model = Model::new(Device::Cpu, 3, |p| Box::new(Vit::new(p, &config(VitPooling::Token)).unwrap()));
    let sites: Vec<String> = model.sites().into_iter().map(|s| s.path).collect();
    assert_eq!(
        &sites[..7],
        ["patch_embed.proj", "blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.norm2", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    );
    assert_eq!(model.group("pos_embed"), ParamGroup::Stem);
    assert_eq!(model.group("blocks.1.norm2.weight"), ParamGroup::Block(1));
    assert_eq!(model.group("norm.bias"), ParamGroup::Neck);
    // Parameter counts of timm's presets (backbone and a 1000-class head).
    for (preset, want) in [(VitConfig::tiny_patch16_224(), 5_717_416), (VitConfig::small_patch16_224(), 22_050_664)] {
        let m = Model::new(Device::Cpu, 1000, |p| Box::new(Vit::new(p, &preset).unwrap()));
        assert_eq!(m.num_params(), want);
    }
    assert!(Vit::new(tch::nn::VarStore::new(Device::Cpu).root(), &VitConfig { patch_size: 5, ..config(VitPooling::Token) }).is_err());
}
