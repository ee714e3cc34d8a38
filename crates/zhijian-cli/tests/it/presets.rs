//! `zhijian presets`, a preset named by an experiment, and a backbone from a
//! folder: the MiniLM asset's files in a folder record what the asset records
//! (needs the `all-minilm-l6-v2` asset, as `cargo xtask test` fetches).

use std::path::Path;
use std::process::Command;

use zhijian_bench::{Record, read_records};

use crate::{stderr, zhijian};

#[test]
fn presets_lists_each_with_params_source_license_and_fetch_state() {
    // An empty cache: nothing is fetched there.
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zhijian")).arg("presets").env("ZHIJIAN_CACHE", cache.path()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("no `{name}` row in\n{text}")).to_string();
    let minilm = row("all_minilm_l6_v2");
    for cell in ["bert", "22.6M", "no: zhijian fetch all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0"] {
        assert!(minilm.contains(cell), "`{cell}` missing from {minilm}");
    }
    assert!(row("efficientnet_lite0.in1k").contains("4.65M"), "{text}");
    let resnet = row("resnet18");
    assert!(resnet.contains("resnet") && resnet.contains("11.7M") && resnet.contains("no weights shipped"), "{resnet}");
    assert!(text.contains("kind = \"preset\", name = \"NAME\""), "{text}");
}

#[test]
fn an_unknown_preset_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exp.toml");
    std::fs::write(
        &config,
        "name = \"x\"\n[backbone]\nkind = \"preset\"\nname = \"vit_tiny\"\n[data]\nkind = \"mnist\"\n[[strategy]]\nname = \"lp\"\nmethods = [{ method = \"linear_probe\" }]\n",
    )
    .unwrap();
    let out = zhijian(&["compare", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown preset `vit_tiny`") && err.contains("vit_tiny_patch16_224") && err.contains("all_minilm_l6_v2"), "{err}");
}

/// A two-class CSV of short reviews the probe separates from MiniLM features.
fn reviews(path: &Path) {
    let good = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute", "a delightful surprise", "beautifully shot, superb"];
    let bad = ["a dull, tedious mess", "awful script and wooden acting", "I hated every minute", "a boring waste of time", "clumsy and badly shot"];
    let mut csv = String::from("text,label\n");
    for i in 0..6 {
        for (texts, label) in [(good, "pos"), (bad, "neg")] {
            for t in texts {
                csv.push_str(&format!("\"{t}, take {i}\",{label}\n"));
            }
        }
    }
    std::fs::write(path, csv).unwrap();
}

/// Runs `zhijian compare` on the reviews with the given `bert` weights; returns its records.
fn compare(dir: &Path, weights: &str, records: &str) -> Vec<Record> {
    let text = format!(
        "name = \"folder\"\ndevice = \"cpu\"\n[backbone]\nkind = \"bert\"\nweights = \"{weights}\"\n\
         [data]\nkind = \"text\"\npath = \"reviews.csv\"\ntext_column = \"text\"\nlabel_column = \"label\"\nmax_len = 16\n\
         [train]\nepochs = 2\nbatch_size = 8\nlr = 1e-3\n\
         [[strategy]]\nname = \"lp\"\nmethods = [{{ method = \"linear_probe\" }}]\n\
         [[strategy]]\nname = \"lora\"\nmethods = [{{ method = \"lora\", rank = 2 }}]\ntrain = {{ max_steps = 3 }}\n"
    );
    let config = dir.join(format!("{records}.toml"));
    std::fs::write(&config, text).unwrap();
    let records = dir.join(format!("{records}.jsonl"));
    let out = zhijian(&["compare", config.to_str().unwrap(), "--records", records.to_str().unwrap(), "--no-feature-cache"]);
    assert!(out.status.success(), "{weights}: {}", stderr(&out));
    read_records(&records).unwrap()
}

/// The "done": a folder holding the asset's config.json,
/// model.safetensors and tokenizer.json gives the same records (accuracies,
/// losses, parameter counts) as the asset's name; only the run keys differ,
/// since they hash the configuration as written.
#[test]
fn a_folder_of_the_assets_files_records_what_the_asset_records() {
    let dir = tempfile::tempdir().unwrap();
    reviews(&dir.path().join("reviews.csv"));
    let folder = dir.path().join("my-minilm");
    std::fs::create_dir(&folder).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(zhijian_assets::locate("all-minilm-l6-v2", file).unwrap(), folder.join(file)).unwrap();
    }
    let from_asset = compare(dir.path(), "all-minilm-l6-v2", "asset");
    let from_folder = compare(dir.path(), "my-minilm", "folder");
    assert_eq!(from_asset.len(), 2);
    assert_eq!(from_folder.len(), 2);
    for (a, f) in from_asset.iter().zip(&from_folder) {
        assert!(a.failed.is_none() && f.failed.is_none(), "{:?} {:?}", a.failed, f.failed);
        assert_eq!((&a.strategy, a.trainable_params, a.total_params, a.steps), (&f.strategy, f.trainable_params, f.total_params, f.steps));
        assert_eq!((a.test_top1, &a.val_top1, a.final_loss), (f.test_top1, &f.val_top1, f.final_loss), "{}", a.strategy);
        assert_ne!(a.key, f.key, "records key on the configuration as written");
        assert!(f.backbone.contains("my-minilm"), "{}", f.backbone);
    }
}
