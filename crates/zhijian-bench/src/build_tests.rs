//! Backbones from folders, presets by name and their errors (needs the
//! `all-minilm-l6-v2` and `efficientnet-lite0` assets, as `cargo xtask test` fetches).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use zhijian_core::{Ctx, Input, Model};

use super::*;
use crate::presets::PRESETS;

const MINILM: &str = "all-minilm-l6-v2";
const SENTENCES: [&str; 3] = ["A gripping, beautifully shot thriller.", "The plot is a mess.", "Zhijian reuses pre-trained models from a folder."];

/// An experiment in `dir` whose `[backbone]` table is `backbone`.
fn experiment(dir: &Path, backbone: &str) -> zhijian_core::Result<Experiment> {
    let text = format!(
        "name = \"t\"\n[backbone]\n{backbone}\n[data]\nkind = \"rotten_tomatoes\"\n[[strategy]]\nname = \"lp\"\nmethods = [{{ method = \"linear_probe\" }}]\n"
    );
    Experiment::from_toml(&text, &dir.join("exp.toml"), &crate::registry())
}

/// Deletes the conversions a test caused from the shared cache, even when the test fails.
struct Converted(Vec<PathBuf>);

impl Drop for Converted {
    fn drop(&mut self) {
        for path in &self.0 {
            if path.starts_with(zhijian_assets::cache_dir().join("converted")) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Builds `exp`'s model with its weights (the head drawn from one seed) and
/// returns it with its text features on [`SENTENCES`], tokenised by the
/// experiment's own tokenizer.
fn text_features(exp: &Experiment) -> (Model, Tensor, Tensor) {
    tch::manual_seed(0);
    let (model, _) = build_model(exp, 2, Device::Cpu).unwrap();
    let tokenizer = zhijian_data::TextTokenizer::from_file(&tokenizer_file(exp).unwrap().unwrap(), 32).unwrap();
    let tokens = tokenizer.encode(&SENTENCES.map(String::from)).unwrap();
    let input = Input::Tokens { ids: tokens.ids.shallow_clone(), mask: tokens.mask };
    let features = tch::no_grad(|| model.features(&Ctx::new(false, &[], vec![]), &input));
    (model, tokens.ids, features)
}

/// Links the MiniLM asset's `files` into `dir/name`.
fn minilm_folder(dir: &Path, name: &str, files: &[&str]) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    for f in files {
        std::os::unix::fs::symlink(asset(MINILM, f).unwrap(), folder.join(f)).unwrap();
    }
    folder
}

fn minilm_tensors() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(asset(MINILM, "model.safetensors").unwrap()).unwrap()
}

/// The issue's test: the MiniLM asset's files in a folder, the same weights in
/// two shards with an index, and as a `BertForSequenceClassification`
/// checkpoint (`bert.` keys and a classifier) all give the asset's tokens,
/// parameters and features exactly, as do its preset's two spellings.
#[test]
fn minilm_from_a_folder_equals_the_asset() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    minilm_folder(base, "plain", &["config.json", "tokenizer.json", "model.safetensors"]);
    let sharded = minilm_folder(base, "sharded", &["config.json", "tokenizer.json"]);
    let tensors = minilm_tensors();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        Tensor::write_safetensors(part, sharded.join(shard)).unwrap();
        weight_map.extend(part.iter().map(|(k, _)| (k.clone(), shard.into())));
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let task = minilm_folder(base, "task", &["config.json", "tokenizer.json"]);
    let mut prefixed: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (format!("bert.{k}"), t.shallow_clone())).collect();
    prefixed.push(("classifier.weight".into(), Tensor::zeros([2, 384], (Kind::Float, Device::Cpu))));
    prefixed.push(("classifier.bias".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&prefixed, task.join("model.safetensors")).unwrap();

    let reference = experiment(base, &format!("kind = \"bert\"\nweights = \"{MINILM}\"")).unwrap();
    let (model, ids, features) = text_features(&reference);
    let mut converted = Converted(Vec::new());
    let spellings = [
        "kind = \"bert\"\nweights = \"plain\"",
        "kind = \"bert\"\nweights = \"sharded\"",
        "kind = \"bert\"\nweights = \"task\"",
        "kind = \"bert\"\nweights = \"all_minilm_l6_v2\"",
        "kind = \"preset\"\nname = \"all_minilm_l6_v2\"",
    ];
    for backbone in spellings {
        let exp = experiment(base, backbone).unwrap();
        let weights = weights_file(&exp).unwrap().unwrap();
        converted.0.push(weights.clone());
        let (other, other_ids, other_features) = text_features(&exp);
        assert!(ids.equal(&other_ids), "{backbone}: tokens differ");
        assert_eq!(model.num_params(), other.num_params(), "{backbone}");
        assert!(features.equal(&other_features), "{backbone}: features differ by {}", (&features - &other_features).abs().max());
        let converts = backbone.contains("sharded") || backbone.contains("task");
        assert_eq!(weights.starts_with(zhijian_assets::cache_dir().join("converted")), converts, "{backbone}: {}", weights.display());
    }
    // The classifier of the task model is not the encoder's: reported, not loaded.
    let report = zhijian_backbones::load_pretrained(&model, &converted.0[2]).unwrap();
    assert!(report.unexpected.iter().any(|k| k == "classifier.weight"), "{:?}", report.unexpected);
    // A second build reuses the conversion.
    assert_eq!(weights_file(&experiment(base, spellings[1]).unwrap()).unwrap().unwrap(), converted.0[1]);
}

/// `layers = 4` keeps MiniLM's first four layers: the features are the full
/// encoder's layer-3 output mean-pooled over real tokens (what `zhijian rank`
/// scores as `block = 3`), and the dropped layers' weights are neither built
/// nor loaded. Out-of-range counts are refused with the encoder's depth.
#[test]
fn bert_layers_keeps_the_first_layers() {
    let dir = tempfile::tempdir().unwrap();
    let full = experiment(dir.path(), &format!("kind = \"bert\"\nweights = \"{MINILM}\"")).unwrap();
    let kept = experiment(dir.path(), &format!("kind = \"bert\"\nweights = \"{MINILM}\"\nlayers = 4")).unwrap();
    let (full_model, ids, _) = text_features(&full);
    let (model, kept_ids, features) = text_features(&kept);
    assert!(ids.equal(&kept_ids));
    assert_eq!(model.backbone.num_blocks(), 4);
    let per_layer = 4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384 + 4 * 384;
    assert_eq!(full_model.num_params() - model.num_params(), 2 * per_layer, "two layers fewer");
    let (_, desc) = build_model(&kept, 2, Device::Cpu).unwrap();
    assert!(desc.contains("its first 4 of 6 layers"), "{desc}");

    let tokenizer = zhijian_data::TextTokenizer::from_file(&tokenizer_file(&full).unwrap().unwrap(), 32).unwrap();
    let tokens = tokenizer.encode(&SENTENCES.map(String::from)).unwrap();
    let input = Input::Tokens { ids: tokens.ids, mask: tokens.mask.shallow_clone() };
    let hidden = tch::no_grad(|| full_model.backbone.prefix(&Ctx::new(false, &[], vec![]), &input, 4)).unwrap();
    let Input::Hidden { states, .. } = hidden else { panic!("a text prefix is hidden states") };
    let mask = tokens.mask.to_kind(Kind::Float).unsqueeze(-1);
    let layer3 = (states * &mask).sum_dim_intlist(1, false, Kind::Float) / mask.sum_dim_intlist(1, false, Kind::Float);
    let d = (&features - &layer3).abs().max().double_value(&[]);
    assert!(d < 1e-5, "layers = 4 differs from layer 3's pooled output by {d}");

    for bad in [0, 7] {
        let exp = experiment(dir.path(), &format!("kind = \"bert\"\nweights = \"{MINILM}\"\nlayers = {bad}")).unwrap();
        let err = build_model(&exp, 2, Device::Cpu).err().unwrap().to_string();
        assert!(err.contains(&format!("backbone.layers = {bad}: `{MINILM}` has 6 layers; keep 1 … 6")), "{err}");
    }
}

/// An experiment naming the MPNet asset (or its preset) builds MPNet from the
/// asset's config.json and tokenises with MPNet's own tokenizer.json: the
/// tokens and sentence embeddings of `scripts/gen_mpnet_golden.py`'s sentences
/// are transformers'.
#[test]
#[ignore = "needs the 438 MB all-mpnet-base-v2 asset: cargo xtask fetch all-mpnet-base-v2"]
fn mpnet_asset_builds_mpnet_with_its_own_tokenizer() {
    // scripts/gen_mpnet_golden.py's SENTENCES.
    const GOLDEN: [&str; 8] = [
        "A man is playing a guitar.",
        "Someone is strumming an acoustic guitar on stage.",
        "A woman is slicing vegetables in the kitchen.",
        "The new movie is awesome.",
        "This film is absolutely fantastic.",
        "The stock market fell sharply on Monday.",
        "How do I bake bread at home?",
        "What is a simple recipe for homemade bread?",
    ];
    let golden: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(Path::new(env!("CARGO_MANIFEST_DIR")).join("../zhijian-backbones/tests/fixtures/mpnet_golden.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let dir = tempfile::tempdir().unwrap();
    for backbone in [
        "kind = \"bert\"\nweights = \"all-mpnet-base-v2\"",
        "kind = \"bert\"\nweights = \"all_mpnet_base_v2\"",
        "kind = \"preset\"\nname = \"all_mpnet_base_v2\"",
    ] {
        let exp = experiment(dir.path(), backbone).unwrap();
        let (model, desc) = build_model(&exp, 2, Device::Cpu).unwrap();
        assert!(desc.contains("bert `all") && desc.contains("(12 layers, hidden 768) (pre-trained)"), "{backbone}: {desc}");
        assert_eq!(model.backbone.arch(), "mpnet", "{backbone}");
        assert_eq!(model.num_params() - (768 * 2 + 2), 108_895_872, "{backbone}");
        let tokenizer_json = tokenizer_file(&exp).unwrap().unwrap();
        assert_eq!(tokenizer_json, zhijian_assets::locate("all-mpnet-base-v2", "tokenizer.json").unwrap());
        let tokens = zhijian_data::TextTokenizer::from_file(&tokenizer_json, 384).unwrap().encode(&GOLDEN.map(String::from)).unwrap();
        assert!(tokens.ids.equal(&golden["ids"]) && tokens.mask.equal(&golden["mask"]), "{backbone}: tokens differ from the reference tokenizer's");
        let input = Input::Tokens { ids: tokens.ids, mask: tokens.mask };
        let pooled = tch::no_grad(|| model.features(&Ctx::new(false, &[], vec![]), &input));
        let embeddings = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
        let d = (&embeddings - &golden["embeddings"]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{backbone}: sentence embeddings differ from transformers' by {d}");
    }
}

#[test]
fn folder_errors_name_the_folder_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let folder = minilm_folder(base, "no-tokenizer", &["config.json", "model.safetensors"]);
    let exp = experiment(base, "kind = \"bert\"\nweights = \"no-tokenizer\"").unwrap();
    let err = tokenizer_file(&exp).unwrap_err().to_string();
    assert!(err.contains(&folder.display().to_string()) && err.contains("`tokenizer.json`"), "{err}");
    assert!(err.contains("it holds: config.json, model.safetensors"), "{err}");
    // The data loader asks for the tokenizer first: the run fails before anything trains.
    assert!(crate::data::load_data(&exp, None, false).is_err());

    minilm_folder(base, "gpt", &["tokenizer.json", "model.safetensors"]);
    std::fs::write(base.join("gpt/config.json"), r#"{"model_type": "gpt2", "vocab_size": 10}"#).unwrap();
    let err = build_model(&experiment(base, "kind = \"bert\"\nweights = \"gpt\"").unwrap(), 2, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model_type `gpt2` is not supported; supported: bert, roberta, xlm-roberta"), "{err}");

    let err = weights_file(&experiment(base, "kind = \"bert\"\nweights = \"nowhere\"").unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("neither a folder") && err.contains("nor a text preset or an asset") && err.contains("all_minilm_l6_v2") && err.contains(MINILM),
        "{err}"
    );

    // Mismatched weights: the load report's keys are in the error.
    let small = minilm_folder(base, "small", &["tokenizer.json", "model.safetensors"]);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(asset(MINILM, "config.json").unwrap()).unwrap()).unwrap();
    config["intermediate_size"] = 1000.into();
    std::fs::write(small.join("config.json"), config.to_string()).unwrap();
    let err = build_model(&experiment(base, "kind = \"bert\"\nweights = \"small\"").unwrap(), 2, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("small/model.safetensors") && err.contains("`encoder.layer.0.intermediate.dense.bias`") && err.contains("1536"), "{err}");
}

#[test]
fn presets_by_name_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let err = experiment(base, "kind = \"preset\"\nname = \"resnet19\"").unwrap_err().to_string();
    assert!(err.contains("unknown preset `resnet19`; known presets: all_minilm_l6_v2, all_mpnet_base_v2, efficientnet_lite0.in1k,"), "{err}");
    let err = experiment(base, "kind = \"preset\"\nweights = \"resnet18\"").unwrap_err().to_string();
    assert!(err.contains("weights"), "{err}");
    let err = weights_file(&experiment(base, "kind = \"bert\"\nweights = \"efficientnet_lite0.in1k\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("`efficientnet_lite` backbone, not a text encoder"), "{err}");
    let err = weights_file(&experiment(base, "kind = \"resnet\"\ndepth = 18\nweights = \"efficientnet_lite0.in1k\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("kind = \"efficientnet_lite\", preset = \"lite0\"") && err.contains("kind = \"resnet\", depth = 18"), "{err}");
    let err = weights_file(&experiment(base, "kind = \"resnet\"\ndepth = 18\nweights = \"resnet18\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("ships no weights"), "{err}");
    let err = weights_file(&experiment(base, "kind = \"resnet\"\ndepth = 18\nweights = \"nowhere.safetensors\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("neither a file nor a folder") && err.contains("nowhere.safetensors") && err.contains("resnet18, resnet34"), "{err}");
    // A preset without weights builds at random init.
    let exp = experiment(base, "kind = \"preset\"\nname = \"resnet18\"").unwrap();
    assert_eq!(weights_file(&exp).unwrap(), None);
    assert_eq!(build_model(&exp, 3, Device::Cpu).unwrap().1, "preset `resnet18`: resnet-18 (random init)");
}

/// Every preset's parameter count, as the table states it, from the model built.
/// A text preset is sized by its asset's config.json; MPNet's asset (438 MB) is
/// not among the test assets, so where it is not fetched the backbones crate's
/// `BertConfig::mpnet_base` stands in (the ignored pre-trained test in
/// zhijian-backbones checks that it equals the shipped config.json).
#[test]
fn preset_parameter_counts_match_the_table() {
    let dir = tempfile::tempdir().unwrap();
    for p in &PRESETS {
        let exp = experiment(dir.path(), &format!("kind = \"preset\"\nname = \"{}\"", p.name)).unwrap();
        let (model, _) = match (p.asset, p.fetched()) {
            (Some("all-mpnet-base-v2"), Some(false)) => {
                eprintln!("{}: asset not fetched, counting BertConfig::mpnet_base()", p.name);
                let config = zhijian_backbones::BertConfig::mpnet_base();
                (Model::new(Device::Cpu, 1, |path| Box::new(zhijian_backbones::Bert::new(path, &config).unwrap())), String::new())
            }
            _ => new_model(&exp, p.head_classes.unwrap_or(1), Device::Cpu).unwrap(),
        };
        let head = match p.head_classes {
            Some(_) => 0,
            None => model.backbone.hidden_size() + 1,
        };
        assert_eq!(model.num_params() - head, p.params, "{}", p.name);
    }
}

/// The Lite0 asset's PyTorch pickle in a timm-style folder (`pytorch_model.bin`
/// and `config.json`) gives the asset's features; a folder whose architecture
/// is another backbone is refused, naming the fields that would build it.
#[test]
fn vision_folder_with_a_pytorch_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let folder = base.join("lite0");
    std::fs::create_dir(&folder).unwrap();
    let pth = asset("efficientnet-lite0", "efficientnet-lite0-57934424.pth").unwrap();
    std::os::unix::fs::symlink(&pth, folder.join("pytorch_model.bin")).unwrap();
    std::fs::write(folder.join("config.json"), r#"{"architecture": "efficientnet_lite0", "num_classes": 1000}"#).unwrap();
    let images = Tensor::rand([2, 3, 224, 224], (Kind::Float, Device::Cpu)) * 2 - 1;
    let features = |backbone: &str| {
        let exp = experiment(base, backbone).unwrap();
        let (model, _) = build_model(&exp, 2, Device::Cpu).unwrap();
        (weights_file(&exp).unwrap().unwrap(), tch::no_grad(|| model.features(&Ctx::new(false, &[], vec![]), &Input::Images(images.shallow_clone()))))
    };
    let (_, reference) = features("kind = \"efficientnet_lite\"\nweights = \"efficientnet-lite0\"");
    let (converted, from_folder) = features("kind = \"efficientnet_lite\"\nweights = \"lite0\"");
    let _cleanup = Converted(vec![converted]);
    assert!(reference.equal(&from_folder));
    let (_, from_preset) = features("kind = \"preset\"\nname = \"efficientnet_lite0.in1k\"");
    assert!(reference.equal(&from_preset));

    std::fs::write(folder.join("config.json"), r#"{"architecture": "resnet50"}"#).unwrap();
    let err = weights_file(&experiment(base, "kind = \"efficientnet_lite\"\nweights = \"lite0\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("architecture `resnet50` needs [backbone] kind = \"resnet\", depth = 50"), "{err}");
    assert!(err.contains("configures kind = \"efficientnet_lite\", preset = \"lite0\""), "{err}");
    std::fs::write(folder.join("config.json"), r#"{"architecture": "convnext_tiny"}"#).unwrap();
    let err = weights_file(&experiment(base, "kind = \"efficientnet_lite\"\nweights = \"lite0\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("`convnext_tiny` is not one zhijian builds; known: efficientnet_lite0,"), "{err}");
}
