//! BERT parity with Hugging Face transformers (golden files from
//! `scripts/gen_bert_golden.py`) and checkpoint-loading errors.

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};
use zhijian_backbones::{Bert, BertConfig, load_pretrained};
use zhijian_core::{Ctx, Error, Input, Model, Tap};

use crate::{checkpoint, golden};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 100,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 40,
        ..BertConfig::minilm_l6()
    }
}

fn bert_model(config: &BertConfig) -> Model {
    Model::new(Device::Cpu, 2, |p| Box::new(Bert::new(p, config).unwrap()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Runs the model on the golden ids and compares every recorded tap.
fn compare(model: &Model, g: &std::collections::HashMap<String, Tensor>, blocks: &[usize], tol: f64) -> f64 {
    let input = Input::Tokens { ids: g["ids"].shallow_clone(), mask: g["mask"].shallow_clone() };
    let mut wanted: Vec<Tap> = blocks.iter().map(|&i| Tap::Block(i)).collect();
    wanted.push(Tap::Pooled);
    let cx = Ctx::new(false, &[], wanted);
    let _ = tch::no_grad(|| model.features(&cx, &input));
    let taps = cx.take_taps();
    let mut worst = 0.0f64;
    for &i in blocks {
        // Padded positions are not compared: their states are never read.
        let keep = g["mask"].unsqueeze(-1).to_kind(tch::Kind::Float);
        let d = max_abs_diff(&(&taps[&Tap::Block(i)] * &keep), &(&g[&format!("block.{i}")] * &keep));
        assert!(d < tol, "block {i}: max abs diff {d}");
        worst = worst.max(d);
    }
    let d = max_abs_diff(&taps[&Tap::Pooled], &g["pooled"]);
    assert!(d < tol, "pooled: max abs diff {d}");
    worst.max(d)
}

#[test]
fn tiny_random_bert_matches_transformers() {
    let g = golden("bert_tiny.safetensors");
    let model = bert_model(&tiny_config());
    let dir = tempfile::tempdir().unwrap();
    let report = load_pretrained(&model, &checkpoint(&g, "w.", dir.path())).unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let d = compare(&model, &g, &[0, 1], 1e-5);
    println!("tiny BERT vs transformers: max abs diff {d:.2e}");
}

#[test]
fn minilm_embeddings_match_transformers() {
    let weights = zhijian_assets::locate("all-minilm-l6-v2", "model.safetensors").unwrap();
    let config = BertConfig::from_json(&zhijian_assets::locate("all-minilm-l6-v2", "config.json").unwrap()).unwrap();
    assert_eq!(config, BertConfig::minilm_l6(), "preset drifted from the shipped config.json");
    let model = bert_model(&config);
    let report = load_pretrained(&model, &weights).unwrap();
    // 5 embedding + 6 × 16 layer tensors load; the pooler and the position_ids buffer do not.
    assert_eq!(report.loaded.len(), 101);
    assert_eq!(report.unexpected, ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]);
    assert_eq!(report.missing, ["head.bias", "head.weight"]);
    let d = compare(&model, &golden("minilm_golden.safetensors"), &[0, 5], 1e-4);
    println!("MiniLM-L6 sentence embeddings vs transformers: max abs diff {d:.2e}");
}

#[test]
fn missing_and_misshaped_weights_are_named() {
    let model = bert_model(&tiny_config());
    let g = golden("bert_tiny.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.safetensors");
    let partial: Vec<(String, Tensor)> = g
        .keys()
        .filter_map(|k| k.strip_prefix("w."))
        .filter(|n| !n.contains("layer.1.attention.self.key"))
        .map(|n| (n.to_string(), g[&format!("w.{n}")].shallow_clone()))
        .collect();
    Tensor::write_safetensors(&partial, &path).unwrap();
    match load_pretrained(&model, &path) {
        Err(Error::MissingWeights { names, .. }) => assert_eq!(names, ["encoder.layer.1.attention.self.key.bias", "encoder.layer.1.attention.self.key.weight"]),
        other => panic!("expected MissingWeights, got {other:?}"),
    }
    let wide = bert_model(&BertConfig { intermediate_size: 65, ..tiny_config() });
    let err = load_pretrained(&wide, &checkpoint(&g, "w.", dir.path())).unwrap_err();
    assert!(matches!(err, Error::MisshapenWeights { ref tensors, .. } if tensors.iter().any(|(n, ..)| n.contains("intermediate.dense"))), "{err}");
    assert!(err.to_string().contains("checkpoint.safetensors") && err.to_string().contains("(model [65, 32], file [64, 32])"), "{err}");
}

#[test]
fn corrupt_checkpoint_is_reported_with_its_path() {
    let model = bert_model(&tiny_config());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    let bytes = std::fs::read(fixture("bert_tiny.safetensors")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_pretrained(&model, &path).unwrap_err();
    assert!(matches!(err, Error::CorruptFile { .. }), "{err}");
    assert!(err.to_string().contains("broken.safetensors"), "{err}");
}

#[test]
fn sites_and_groups_follow_checkpoint_keys() {
    let model = bert_model(&tiny_config());
    let sites = model.sites();
    // The embeddings' LayerNorm, then 6 linear layers and 2 LayerNorms a layer, then the head.
    assert_eq!(sites.len(), 1 + 2 * 8 + 1);
    assert_eq!(sites[0].path, "embeddings.LayerNorm");
    assert_eq!(sites[1].path, "encoder.layer.0.attention.self.query");
    assert_eq!((sites[1].block, sites[0].block), (Some(0), None));
    assert_eq!(sites[16].path, "encoder.layer.1.output.LayerNorm");
    assert_eq!(sites.last().unwrap().path, "head");
    use zhijian_core::ParamGroup::*;
    assert_eq!(model.group("embeddings.word_embeddings.weight"), Stem);
    assert_eq!(model.group("encoder.layer.1.output.dense.weight"), Block(1));
    assert_eq!(model.group("head.weight"), Head);
}
