//! RoBERTa-family parity with Hugging Face transformers (golden files from
//! `scripts/gen_roberta_golden.py`) and how `config.json` picks the family.

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};
use zhijian_backbones::{Bert, BertConfig, load_pretrained};
use zhijian_core::{Ctx, Error, Input, Model, Tap};

use crate::{checkpoint, golden};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn model(config: &BertConfig) -> Model {
    Model::new(Device::Cpu, 2, |p| Box::new(Bert::new(p, config).unwrap()))
}

/// The largest difference over every recorded output (padded positions included:
/// transformers numbers them too) against the golden file.
fn worst_diff(model: &Model, g: &std::collections::HashMap<String, Tensor>) -> f64 {
    let input = Input::Tokens { ids: g["ids"].shallow_clone(), mask: g["mask"].shallow_clone() };
    let cx = Ctx::new(false, &[], vec![Tap::Block(0), Tap::Block(1), Tap::Pooled]);
    let _ = tch::no_grad(|| model.features(&cx, &input));
    let taps = cx.take_taps();
    let diff = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[])
    };
    let blocks = (0..2).map(|i| diff(&taps[&Tap::Block(i)], &g[&format!("block.{i}")]));
    blocks.chain([diff(&taps[&Tap::Pooled], &g["pooled"])]).fold(0.0, f64::max)
}

#[test]
fn tiny_random_roberta_matches_transformers() {
    let config = BertConfig::from_json(&fixture("roberta_tiny.config.json")).unwrap();
    // pad_token_id 1: real tokens start at position 2.
    assert_eq!((config.position_offset, config.type_vocab_size, config.layer_norm_eps), (2, 1, 1e-5));
    let g = golden("roberta_tiny.safetensors");
    let roberta = model(&config);
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(&g, "w.", dir.path());
    let report = load_pretrained(&roberta, &weights).unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let d = worst_diff(&roberta, &g);
    assert!(d < 1e-5, "tiny RoBERTa vs transformers: max abs diff {d}");
    println!("tiny RoBERTa vs transformers: max abs diff {d:.2e}");
    // The same weights read as BERT (positions from 0) do not match: the offset is what makes it RoBERTa.
    let as_bert = model(&BertConfig { position_offset: 0, ..config });
    load_pretrained(&as_bert, &weights).unwrap();
    assert!(worst_diff(&as_bert, &g) > 1e-2);
}

fn from_json(text: &str) -> zhijian_core::Result<BertConfig> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    BertConfig::from_json(&path)
}

const SIZES: &str = r#""vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "max_position_embeddings": 42, "type_vocab_size": 1, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-5"#;

#[test]
fn the_family_comes_from_model_type_or_architectures() {
    let offset = |extra: &str| from_json(&format!("{{{SIZES}, {extra}}}")).unwrap().position_offset;
    assert_eq!(offset(r#""model_type": "bert""#), 0);
    assert_eq!(offset(r#""model_type": "xlm-roberta", "pad_token_id": 1"#), 2);
    assert_eq!(offset(r#""model_type": "roberta", "pad_token_id": 0"#), 1);
    assert_eq!(offset(r#""architectures": ["XLMRobertaForSequenceClassification"]"#), 2);
    assert_eq!(offset(r#""architectures": ["BertForMaskedLM"]"#), 0);
    // A file older than `model_type`, naming neither: BERT.
    assert_eq!(offset(r#""pad_token_id": 0"#), 0);
}

#[test]
fn unsupported_families_and_layers_are_named() {
    let err = |extra: &str| match from_json(&format!("{{{SIZES}, {extra}}}")) {
        Err(Error::Config(why)) => why,
        other => panic!("expected a config error for {extra}, got {other:?}"),
    };
    let why = err(r#""model_type": "gpt2""#);
    assert!(why.contains("config.json") && why.contains("model_type `gpt2` is not supported; supported: bert, roberta, xlm-roberta"), "{why}");
    let why = err(r#""architectures": ["DistilBertModel"]"#);
    assert!(why.contains("`DistilBertModel`") && why.contains("bert, roberta, xlm-roberta"), "{why}");
    assert!(err(r#""model_type": "bert", "hidden_act": "gelu_new""#).contains("hidden_act `gelu_new`"));
    assert!(err(r#""model_type": "bert", "position_embedding_type": "relative_key""#).contains("relative_key"));
    assert!(matches!(from_json("{\"model_type\": \"bert\""), Err(Error::CorruptFile { .. })));
    let tight = BertConfig { position_offset: 42, ..from_json(&format!("{{{SIZES}}}")).unwrap() };
    assert!(tight.validate().unwrap_err().to_string().contains("position_offset 42"));
}
