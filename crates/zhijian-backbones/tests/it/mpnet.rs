//! MPNet parity with Hugging Face transformers (golden files from
//! `scripts/gen_mpnet_golden.py`): a tiny random-init model, and the
//! pre-trained all-mpnet-base-v2 sentence embeddings (`#[ignore]`d: the asset
//! is 438 MB and not among the test assets; run it with
//! `cargo xtask fetch all-mpnet-base-v2 && cargo test -p zhijian-backbones --test it mpnet -- --ignored`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use zhijian_backbones::{Bert, BertConfig, Family, load_pretrained, mpnet_relative_buckets};
use zhijian_core::{Ctx, Error, Input, Model, ParamGroup, Role, Tap};

use crate::{checkpoint, golden};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn model(config: &BertConfig) -> Model {
    Model::new(Device::Cpu, 2, |p| Box::new(Bert::new(p, config).unwrap()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Every layer's output (padded positions included: transformers computes them
/// too) and the mean-pooled features: the largest difference to the golden file.
fn worst_diff(model: &Model, g: &HashMap<String, Tensor>) -> f64 {
    let input = Input::Tokens { ids: g["ids"].shallow_clone(), mask: g["mask"].shallow_clone() };
    let cx = Ctx::new(false, &[], vec![Tap::Block(0), Tap::Block(1), Tap::Pooled]);
    let _ = tch::no_grad(|| model.features(&cx, &input));
    let taps = cx.take_taps();
    let blocks = (0..2).map(|i| max_abs_diff(&taps[&Tap::Block(i)], &g[&format!("block.{i}")]));
    blocks.chain([max_abs_diff(&taps[&Tap::Pooled], &g["pooled"])]).fold(0.0, f64::max)
}

#[test]
fn relative_buckets_are_transformers_buckets() {
    let g = golden("mpnet_tiny.safetensors");
    let ours = mpnet_relative_buckets(140, Device::Cpu);
    assert!(ours.equal(&g["buckets"].to_kind(Kind::Int64)), "buckets differ from transformers'");
    // Exact below 8 either way, log-spaced after, the last bucket from distance 91 on
    // (clamped from 128 on, where the log scale would pass it).
    let row: Vec<i64> = Vec::try_from(ours.get(0)).unwrap();
    assert_eq!(&row[..9], [0, 17, 18, 19, 20, 21, 22, 23, 24]);
    assert_eq!((row[90], row[91], row[128], row[139]), (30, 31, 31, 31));
    let col: Vec<i64> = Vec::try_from(ours.select(1, 0)).unwrap();
    assert_eq!((col[7], col[8], col[139]), (7, 8, 15));
}

#[test]
fn tiny_random_mpnet_matches_transformers() {
    let config = BertConfig::from_json(&fixture("mpnet_tiny.config.json")).unwrap();
    assert_eq!((config.family, config.position_offset, config.type_vocab_size, config.layer_norm_eps), (Family::Mpnet, 2, 0, 1e-5));
    let g = golden("mpnet_tiny.safetensors");
    let mpnet = model(&config);
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(&g, "w.", dir.path());
    let report = load_pretrained(&mpnet, &weights).unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    assert_eq!(report.missing, ["head.bias", "head.weight"]);
    let d = worst_diff(&mpnet, &g);
    assert!(d < 1e-5, "tiny MPNet vs transformers: max abs diff {d}");
    println!("tiny MPNet vs transformers (140 tokens, every bucket kind): max abs diff {d:.2e}");

    // Without the relative position bias the outputs are far off: it is what makes it MPNet.
    tch::no_grad(|| {
        let table = mpnet.vs.variables()["encoder.relative_attention_bias.weight"].shallow_clone();
        let _ = table.shallow_clone().zero_();
    });
    assert!(worst_diff(&mpnet, &g) > 1e-2);
}

#[test]
fn mpnet_sites_keys_and_groups() {
    let config = BertConfig::from_json(&fixture("mpnet_tiny.config.json")).unwrap();
    let mpnet = model(&config);
    assert_eq!(mpnet.backbone.arch(), "mpnet");
    let sites = mpnet.sites();
    // The embeddings' LayerNorm, then 6 linear layers and 2 LayerNorms a layer, then the head.
    assert_eq!(sites.len(), 1 + 2 * 8 + 1);
    let layer0: Vec<(&str, Role)> = sites[1..9].iter().map(|s| (s.path.as_str(), s.role)).collect();
    assert_eq!(
        layer0,
        [
            ("encoder.layer.0.attention.attn.q", Role::Query),
            ("encoder.layer.0.attention.attn.k", Role::Key),
            ("encoder.layer.0.attention.attn.v", Role::Value),
            ("encoder.layer.0.attention.attn.o", Role::AttnOut),
            ("encoder.layer.0.attention.LayerNorm", Role::Norm),
            ("encoder.layer.0.intermediate.dense", Role::MlpUp),
            ("encoder.layer.0.output.dense", Role::MlpDown),
            ("encoder.layer.0.output.LayerNorm", Role::Norm),
        ]
    );
    assert!(sites[1..17].iter().all(|s| s.block.is_some()));
    assert_eq!(mpnet.group("encoder.relative_attention_bias.weight"), ParamGroup::Stem);
    assert_eq!(mpnet.group("encoder.layer.1.attention.attn.o.weight"), ParamGroup::Block(1));
    let names = mpnet.vs.variables();
    assert!(!names.keys().any(|n| n.contains("token_type")), "MPNet has no token types");
}

#[test]
fn mpnet_configs_that_would_compute_otherwise_are_refused() {
    let text = std::fs::read_to_string(fixture("mpnet_tiny.config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text.replace("\"relative_attention_num_buckets\": 32", "\"relative_attention_num_buckets\": 64")).unwrap();
    match BertConfig::from_json(&path) {
        Err(Error::Config(why)) => assert!(why.contains("relative_attention_num_buckets 64") && why.contains("32"), "{why}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    // Found by the architecture too (files without `model_type`).
    std::fs::write(&path, text.replace("\"model_type\": \"mpnet\",", "\"architectures\": [\"MPNetForMaskedLM\"],")).unwrap();
    assert_eq!(BertConfig::from_json(&path).unwrap().family, Family::Mpnet);
    let with_types = BertConfig { type_vocab_size: 2, ..BertConfig::mpnet_base() };
    assert!(with_types.validate().unwrap_err().to_string().contains("type_vocab_size 2"));
}

/// The pre-trained check: all-mpnet-base-v2's sentence embeddings (mean
/// pooling, then L2 normalisation, as sentence-transformers' modules.json
/// says) against transformers', and the cosine similarity of sentence pairs,
/// ranked as the reference ranks them.
#[test]
#[ignore = "needs the 438 MB all-mpnet-base-v2 asset: cargo xtask fetch all-mpnet-base-v2"]
fn all_mpnet_base_v2_embeddings_match_transformers() {
    let weights = zhijian_assets::locate("all-mpnet-base-v2", "model.safetensors").unwrap();
    let config = BertConfig::from_json(&zhijian_assets::locate("all-mpnet-base-v2", "config.json").unwrap()).unwrap();
    assert_eq!(config, BertConfig::mpnet_base(), "preset drifted from the shipped config.json");
    let mpnet = model(&config);
    let report = load_pretrained(&mpnet, &weights).unwrap();
    // 5 embedding and bias tensors + 12 × 16 layer tensors load; the pooler and the position_ids buffer do not.
    assert_eq!(report.loaded.len(), 197);
    assert_eq!(report.unexpected, ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]);
    assert_eq!(report.missing, ["head.bias", "head.weight"]);
    assert_eq!(mpnet.num_params() - (768 * 2 + 2), 108_895_872);

    let g = golden("mpnet_golden.safetensors");
    let input = Input::Tokens { ids: g["ids"].shallow_clone(), mask: g["mask"].shallow_clone() };
    let pooled = tch::no_grad(|| mpnet.features(&Ctx::plain(false), &input));
    let d_pooled = max_abs_diff(&pooled, &g["pooled"]);
    let embeddings = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
    let d = max_abs_diff(&embeddings, &g["embeddings"]);
    let pairs = &g["pairs"];
    let cosines = (embeddings.index_select(0, &pairs.select(1, 0)) * embeddings.index_select(0, &pairs.select(1, 1))).sum_dim_intlist(1, false, None);
    let d_cos = max_abs_diff(&cosines, &g["cosines"]);
    println!("all-mpnet-base-v2 vs transformers: max abs diff {d_pooled:.2e} (mean-pooled), {d:.2e} (normalised embeddings), {d_cos:.2e} (pair cosines)");
    let ours: Vec<f32> = Vec::try_from(&cosines).unwrap();
    println!("pair cosines: {ours:.4?}");
    assert!(d_pooled < 1e-4 && d < 1e-5 && d_cos < 1e-5, "pooled {d_pooled}, embeddings {d}, cosines {d_cos}");
    let order = |c: &Tensor| Vec::<i64>::try_from(c.argsort(0, true)).unwrap();
    assert_eq!(order(&cosines), order(&g["cosines"]), "pairs rank differently from sentence-transformers' cosine ordering");
    // Paraphrases (the first pair of each topic) score above every unrelated pair.
    let reference: Vec<f32> = Vec::try_from(&g["cosines"]).unwrap();
    let (paraphrase, unrelated) = ([0, 2, 4], [1, 3, 5, 6]);
    assert!(paraphrase.iter().all(|&p| unrelated.iter().all(|&u| ours[p] > ours[u] + 0.3 && reference[p] > reference[u])), "{ours:?}");
}
