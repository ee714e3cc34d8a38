//! Contrastive heads end to end: a small MLP image tower on MNIST digits and
//! the real all-MiniLM-L6-v2 text tower embedding the class descriptions;
//! zero-shot splits (`train_classes`, `eval_classes`), k-shot training
//! (`shots`), a strategy that starts from a recorded run (`init`), and the
//! errors a user meets.

use std::path::Path;

use crate::write;

use zhijian::bench::{CompareOptions, DeviceChoice, Experiment, compare};

const ZERO_SHOT: &str = r#"
name = "zero-shot"
device = "cpu"
seeds = [0]
[backbone]
kind = "mlp"
hidden = [32]
[data]
kind = "mnist"
train_limit = 200
eval_limit = 100
train_classes = [0, 1, 2, 3, 4]
eval_classes = [5, 6, 7, 8, 9]
[class_text]
template = "a handwritten digit {}"
[train]
epochs = 2
batch_size = 32
lr = 1e-2
[[strategy]]
name = "heads"
methods = [{ method = "contrastive_heads", dim = 16, predict = "unseen" }]
[[strategy]]
name = "heads-all"
methods = [{ method = "contrastive_heads", dim = 16 }]
[[merge]]
name = "heads-ensemble"
strategies = ["heads-all"]
with = [{ experiment = "zero-shot.toml", strategy = "heads-all", records = "zero-shot.jsonl" }]
rule = { kind = "ensemble" }
"#;

#[test]
fn contrastive_heads_classify_unseen_classes_by_their_descriptions() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    let exp = Experiment::load(&write(dir.path(), "zero-shot.toml", ZERO_SHOT), &registry).unwrap();
    let records = dir.path().join("zero-shot.jsonl");
    let opts = CompareOptions { records: Some(records.clone()), device: Some(DeviceChoice::Cpu), ..Default::default() };
    let mut runs = compare(&exp, &registry, &opts).unwrap();
    // A contrastive run restored as an ensemble member, twice (its heads sized
    // from the class texts, then its own texts restored), predicts as it did.
    let ensemble = runs.pop().unwrap();
    assert_eq!((ensemble.strategy.as_str(), ensemble.test_top1), ("heads-ensemble", runs[1].test_top1));
    assert_eq!(runs.len(), 2);
    for r in &runs {
        // Trained on 200 examples of the 5 seen digits, tested on 100 of the unseen ones.
        assert!(r.data.contains("train 200 /"), "{}", r.data);
        assert_eq!(r.test_n, 100, "{r:?}");
        assert!(r.cached_features && r.steps > 0, "{r:?}");
        assert_eq!(r.summaries["contrastive_heads"]["seen_classes"], 5, "{r:?}");
        assert!(r.config["class_text"]["template"] == "a handwritten digit {}", "{}", r.config);
    }
    // Among the 5 unseen classes a guess is right 1 time in 5; among all 10
    // the heads pull every image to the seen classes' texts, which are wrong here.
    assert!((0.0..=1.0).contains(&runs[0].test_top1));
    assert!(runs[1].test_top1 <= runs[0].test_top1, "{} > {}", runs[1].test_top1, runs[0].test_top1);

    // A run does not depend on what ran before it: the second strategy alone
    // (where it embeds the class texts itself) repeats its run.
    let mut alone = exp.clone();
    alone.strategies.retain(|s| s.name == "heads-all");
    let solo = compare(&alone, &registry, &CompareOptions { records: Some(dir.path().join("alone.jsonl")), ..opts.clone() }).unwrap();
    assert_eq!((solo[0].key.as_str(), solo[0].test_top1, solo[0].final_loss), (runs[1].key.as_str(), runs[1].test_top1, runs[1].final_loss));

    // k-shot training on all classes, starting from the zero-shot run's heads.
    let few = ZERO_SHOT[..ZERO_SHOT.find("[[merge]]").unwrap()]
        .replace("name = \"zero-shot\"", "name = \"few\"")
        .replace("train_classes = [0, 1, 2, 3, 4]\neval_classes = [5, 6, 7, 8, 9]", "shots = 3")
        .replace(
            "predict = \"unseen\" }]",
            "predict = \"unseen\" }]\ninit = { experiment = \"zero-shot.toml\", strategy = \"heads\", records = \"zero-shot.jsonl\" }",
        );
    let exp = Experiment::load(&write(dir.path(), "few.toml", &few), &registry).unwrap();
    let opts = CompareOptions { records: Some(dir.path().join("few.jsonl")), ..opts.clone() };
    let runs = compare(&exp, &registry, &opts).unwrap();
    assert!(runs[0].data.contains("train 30 /"), "{}", runs[0].data);
    assert_eq!(runs[0].config["init"]["key"], serde_json::Value::from(compare_key(&records, "heads")), "{}", runs[0].config);
    assert!(runs[1].config.get("init").is_none());
    // Every class is seen now, so `unseen` leaves every class a candidate.
    assert_eq!(runs[0].summaries["contrastive_heads"]["seen_classes"], 10);

    // What a user gets wrong is named.
    let bad = |text: &str| {
        let path = write(dir.path(), "bad.toml", text);
        match Experiment::load(&path, &registry) {
            Err(e) => e.to_string(),
            Ok(exp) => compare(&exp, &registry, &CompareOptions { records: Some(dir.path().join("bad.jsonl")), ..opts.clone() }).unwrap_err().to_string(),
        }
    };
    let err = bad(&ZERO_SHOT.replace("template = \"a handwritten digit {}\"", "descriptions = [\"zero\", \"one\"]"));
    assert!(err.contains("class_text.descriptions has 2 entries for 10 classes"), "{err}");
    let err = bad(&ZERO_SHOT.replace("eval_classes = [5, 6, 7, 8, 9]", "eval_classes = [5, 10]"));
    assert!(err.contains("data.eval_classes") && err.contains("class 10"), "{err}");
    let err = bad(&ZERO_SHOT.replace("template =", "templat ="));
    assert!(err.contains("templat"), "{err}");
    let err = bad(&few.replace("strategy = \"heads\", records", "strategy = \"nope\", records"));
    assert!(err.contains("nope") && err.contains("zhijian compare"), "{err}");
    // A recorded run whose artifact is not on this machine: say how to remake it.
    std::fs::remove_file(dir.path().join("artifacts/zero-shot/heads-seed0.safetensors")).unwrap();
    let err = bad(&few);
    assert!(err.contains("heads-seed0.safetensors") && err.contains("delete that record's line"), "{err}");
}

/// The key of `strategy`'s last record in `records`.
fn compare_key(records: &Path, strategy: &str) -> String {
    zhijian::bench::read_records(records).unwrap().into_iter().rev().find(|r| r.strategy == strategy).unwrap().key
}
