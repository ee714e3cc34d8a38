//! `zhijian export --peft` and `zhijian import --peft` on MiniLM-L6 (real
//! weights): the exported adapters, loaded by Hugging Face PEFT on
//! transformers' `BertModel` (scripts/peft_parity.py, in the set-up's venv),
//! give zhijian's logits; adapters PEFT itself made, imported, give PEFT's
//! features in zhijian; and an export imported back gives the same tensors
//! and the same logits.
//!
//! Each run is made here rather than trained: its adapter tensors and head are
//! drawn at random (LoRA's `B` is zero at initialisation, which would hide a
//! mapping error), saved where `compare` saves artifacts, and recorded in a
//! records file as `compare` records runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};
use zhijian_backbones::Pooling;
use zhijian_bench::{Record, append_record, peft};
use zhijian_core::train::{self, restore};
use zhijian_core::{Ctx, Input, Method, Model};

use crate::{stderr, zhijian};

const ASSET: &str = "all-minilm-l6-v2";
const CLASSES: i64 = 3;

/// The set-up's Python (`cargo xtask setup`), if it exists.
fn venv_python() -> Option<PathBuf> {
    let home = std::env::var_os("ZHIJIAN_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/zhijian")))?;
    Some(home.join("venv/bin/python")).filter(|p| p.is_file())
}

/// A few sentences as zhijian tokenises them (padded to the longest).
fn tokens() -> (Tensor, Tensor) {
    let tokenizer = zhijian_data::tokenize::TextTokenizer::from_file(&zhijian_assets::locate(ASSET, "tokenizer.json").unwrap(), 32).unwrap();
    let texts = ["A gripping, beautifully shot film.", "Dull.", "The plot wanders, but the actors carry it to a satisfying end.", "Not good"];
    let t = tokenizer.encode(&texts.map(String::from)).unwrap();
    (t.ids, t.mask)
}

/// A MiniLM model with `method` prepared and its parameters (and the head) drawn at random.
fn adapted(method: &toml::Table) -> (Model, Vec<Box<dyn Method>>) {
    let model = peft::bert_model(ASSET, Pooling::Mean, CLASSES, Device::Cpu).unwrap();
    let mut methods = vec![zhijian_bench::registry().build(method).unwrap()];
    train::prepare(&model, &mut methods, 0).unwrap();
    tch::no_grad(|| {
        for (name, t) in train::artifact(&model, &methods) {
            let noise = t.randn_like();
            // B away from zero, magnitudes and IA³ vectors away from their identity values.
            let value = if name.ends_with("lora_B") {
                noise * 0.05
            } else if name.ends_with("lora_magnitude") || name.ends_with("ia3_l") {
                &t * (noise * 0.2 + 1.0)
            } else if name.starts_with("head.") {
                noise * 0.5
            } else {
                continue;
            };
            t.shallow_clone().copy_(&value);
        }
    });
    (model, methods)
}

fn logits(model: &Model, methods: &[Box<dyn Method>], (ids, mask): &(Tensor, Tensor)) -> Tensor {
    let input = Input::Tokens { ids: ids.shallow_clone(), mask: mask.shallow_clone() };
    tch::no_grad(|| model.forward(&Ctx::new(false, methods, Vec::new()), &input))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Saves the run's artifact where `compare` would and records it in `records`.
fn record_run(records: &Path, strategy: &str, model: &Model, methods: &[Box<dyn Method>], method: &toml::Table) {
    let artifact = records.parent().unwrap().join("artifacts/parity").join(format!("{strategy}-seed0.safetensors"));
    zhijian_core::save_atomic(&train::artifact(model, methods), &artifact).unwrap();
    let record = Record {
        experiment: "parity".into(),
        strategy: strategy.into(),
        key: strategy.into(),
        config: serde_json::json!({ "backbone": { "kind": "bert", "weights": ASSET, "pooling": "mean" } }),
        methods: serde_json::json!([method]),
        ..Record::default()
    };
    append_record(records, &record).unwrap();
}

fn export(records: &Path, strategy: &str, dir: &Path) {
    let out = zhijian(&["export", records.to_str().unwrap(), "--strategy", strategy, "--seed", "0", "--peft", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The three strategies of the tests: LoRA with per-site ranks and alphas on
/// attention and FFN layers, DoRA with rsLoRA, IA³.
fn cases() -> Vec<(&'static str, toml::Table)> {
    [
        ("lora", "method = 'lora'\nrank = 4\nalpha = 8\ntargets = ['query', 'value', 'intermediate.dense']\nrank_pattern = { 're:.*layer\\.[0-2]\\..*' = 2 }\nalpha_pattern = { value = 3 }"),
        ("dora", "method = 'lora'\nrank = 8\nalpha = 16\nuse_dora = true\nrslora = true"),
        ("ia3", "method = 'ia3'"),
    ]
    .into_iter()
    .map(|(name, text)| (name, toml::from_str(text).unwrap()))
    .collect()
}

#[test]
fn exported_adapters_give_zhijians_logits_in_peft() {
    let Some(python) = venv_python() else {
        println!("skipped: no set-up venv (run `cargo xtask setup`; `cargo xtask test` does)");
        return;
    };
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records.jsonl");
    let input = tokens();
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("ids", &input.0), ("mask", &input.1)], &inputs).unwrap();
    let mut expected = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for (strategy, method) in cases() {
        let (model, methods) = adapted(&method);
        let ours = logits(&model, &methods, &input);
        // The adapter must matter, or equal logits would prove nothing.
        let change = max_abs_diff(&ours, &logits(&model, &[], &input));
        assert!(change > 1e-2, "{strategy}: the drawn adapter moves the logits by only {change:.2e}");
        println!("{strategy}: the adapter moves zhijian's logits by up to {change:.2e}");
        record_run(&records, strategy, &model, &methods, &method);
        let out = dir.path().join(format!("peft-{strategy}"));
        export(&records, strategy, &out);
        let sites = methods[0].var_store().unwrap().variables().keys().filter(|k| k.ends_with("lora_A") || k.ends_with("ia3_l")).count();
        args.extend(["--adapter".into(), format!("{strategy}={}", out.display())]);
        expected.push((strategy, ours, sites));
    }
    // Adapters PEFT makes itself (suffix and regex targets, patterns, DoRA, IA³), for the import direction.
    let made: Vec<(&str, PathBuf)> = ["lora", "dora", "ia3"].into_iter().map(|k| (k, dir.path().join(format!("made-{k}")))).collect();
    for (kind, path) in &made {
        args.extend(["--make".into(), format!("{kind}={}", path.display())]);
    }
    let base = zhijian_assets::locate(ASSET, "config.json").unwrap().parent().unwrap().to_path_buf();
    let result = dir.path().join("peft_logits.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/peft_parity.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--base", base.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", result.to_str().unwrap()])
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "peft_parity.py failed:\n{stdout}\n{}", stderr(&out));
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&result).unwrap().into_iter().collect();
    for (strategy, ours, sites) in &expected {
        // PEFT must have created every adapted module, not loaded the weights into nothing.
        assert!(
            stdout.contains(&format!("{strategy}: ")) && stdout.contains(&format!("{sites} adapted modules")),
            "{strategy}: expected {sites} modules:\n{stdout}"
        );
        let diff = max_abs_diff(ours, &theirs[*strategy].to_kind(Kind::Float));
        println!("export {strategy}: zhijian vs transformers + peft logits, max abs diff {diff:.2e} ({sites} modules)");
        assert!(diff < 1e-4, "{strategy}: max abs diff {diff:.2e}\nzhijian {ours}\npeft {}", theirs[*strategy]);
    }
    for (kind, path) in &made {
        // No --backbone: the adapter's base_model_name_or_path is the asset's folder.
        let artifact = dir.path().join(format!("made-{kind}.safetensors"));
        let out = zhijian(&["import", "--peft", path.to_str().unwrap(), "--out", artifact.to_str().unwrap()]);
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        let method = printed["strategy"][0]["methods"][0].as_table().unwrap().clone();
        let model = peft::bert_model(ASSET, Pooling::Mean, CLASSES, Device::Cpu).unwrap();
        let mut methods = vec![zhijian_bench::registry().build(&method).unwrap()];
        train::prepare(&model, &mut methods, 0).unwrap();
        restore(&model, &methods, &artifact).unwrap();
        let tokens = Input::Tokens { ids: input.0.shallow_clone(), mask: input.1.shallow_clone() };
        let features = |methods: &[Box<dyn Method>]| tch::no_grad(|| model.features(&Ctx::new(false, methods, Vec::new()), &tokens));
        let ours = features(&methods);
        let change = max_abs_diff(&ours, &features(&[]));
        assert!(change > 1e-2, "{kind}: the imported adapter moves the features by only {change:.2e}");
        let diff = max_abs_diff(&ours, &theirs[&format!("made-{kind}")].to_kind(Kind::Float));
        let imported = toml::Value::Table(method);
        println!(
            "import {kind}: zhijian vs transformers + peft pooled features, max abs diff {diff:.2e} (the adapter moves them by up to {change:.2e}); as {imported}"
        );
        assert!(diff < 1e-4, "{kind}: max abs diff {diff:.2e}");
    }
    println!("parity test: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn export_then_import_gives_the_same_tensors_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records.jsonl");
    let input = tokens();
    for (strategy, method) in cases() {
        let (model, methods) = adapted(&method);
        let ours = logits(&model, &methods, &input);
        record_run(&records, strategy, &model, &methods, &method);
        let folder = dir.path().join(format!("peft-{strategy}"));
        export(&records, strategy, &folder);
        let artifact = dir.path().join(format!("{strategy}-imported.safetensors"));
        let out = zhijian(&["import", "--peft", folder.to_str().unwrap(), "--out", artifact.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        // The printed strategy is the method to prepare; the artifact restores into it.
        let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        let method = printed["strategy"][0]["methods"][0].as_table().unwrap().clone();
        let fresh = peft::bert_model(ASSET, Pooling::Mean, CLASSES, Device::Cpu).unwrap();
        let mut back = vec![zhijian_bench::registry().build(&method).unwrap()];
        train::prepare(&fresh, &mut back, 1).unwrap();
        restore(&fresh, &back, &artifact).unwrap();
        let original: std::collections::BTreeMap<String, Tensor> = train::artifact(&model, &methods).into_iter().collect();
        let imported: std::collections::BTreeMap<String, Tensor> = train::artifact(&fresh, &back).into_iter().collect();
        assert_eq!(original.keys().collect::<Vec<_>>(), imported.keys().collect::<Vec<_>>(), "{strategy}");
        for (name, t) in &original {
            assert!(t.equal(&imported[name]), "{strategy}: {name} differs after export and import");
        }
        assert!(ours.equal(&logits(&fresh, &back, &input)), "{strategy}: logits differ after export and import");
    }
}

#[test]
fn export_and_import_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records.jsonl");
    let method: toml::Table = toml::from_str("method = 'bitfit'").unwrap();
    let (model, methods) = adapted(&method);
    record_run(&records, "bitfit", &model, &methods, &method);
    let peft_dir = dir.path().join("peft");
    let out = zhijian(&["export", records.to_str().unwrap(), "--strategy", "bitfit", "--peft", peft_dir.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("bitfit") && stderr(&out).contains("support lora"), "{}", stderr(&out));
    assert!(!peft_dir.join("adapter_config.json").exists());
    let out = zhijian(&["export", records.to_str().unwrap(), "--strategy", "lora", "--peft", peft_dir.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("no finished run of strategy `lora`") && stderr(&out).contains("bitfit seed 0"), "{}", stderr(&out));
    let out = zhijian(&["import", "--peft", dir.path().join("nothing").to_str().unwrap(), "--out", dir.path().join("a.safetensors").to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("adapter_config.json"), "{}", stderr(&out));
}
