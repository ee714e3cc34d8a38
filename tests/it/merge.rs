//! `[[merge]]`: models merged in weight space, and output-space ensembles, from
//! recorded runs, evaluated and recorded like runs (small MLPs trained from
//! scratch on a few MNIST and Fashion-MNIST images: the plumbing, not the accuracy).

use zhijian::bench::{CompareOptions, DeviceChoice, Experiment, compare, read_records};

use crate::write;

const DIGITS: &str = r#"
name = "digits"
seeds = [0, 1]
device = "cpu"
[backbone]
kind = "mlp"
hidden = [32, 16]
[data]
kind = "mnist"
train_limit = 200
eval_limit = 100
holdout = [0.1, 0.1]
[train]
epochs = 2
batch_size = 32
lr = 3e-3
[[strategy]]
name = "ft"
methods = [{ method = "full_finetune" }]
[[strategy]]
name = "ft-slow"
methods = [{ method = "full_finetune" }]
train = { lr = 1e-3 }
[[merge]]
name = "soup"
strategies = ["ft", "ft-slow"]
rule = { kind = "soup" }
reset_batchnorm = 64
[[merge]]
name = "greedy-soup"
strategies = ["ft", "ft-slow"]
rule = { kind = "soup", greedy = true }
[[merge]]
name = "rebasin"
strategies = ["ft"]
across_seeds = true
rule = { kind = "rebasin" }
[[merge]]
name = "ties"
strategies = ["ft"]
with = [{ experiment = "clothes.toml", strategy = "ft", records = "clothes.jsonl" }]
rule = { kind = "ties", density = 0.5 }
[[merge]]
name = "regmean"
strategies = ["ft"]
with = [{ experiment = "clothes.toml", strategy = "ft", records = "clothes.jsonl" }]
rule = { kind = "regmean", examples = 64 }
[[merge]]
name = "fisher"
strategies = ["ft"]
with = [{ experiment = "clothes.toml", strategy = "ft", records = "clothes.jsonl" }]
rule = { kind = "fisher", examples = 16 }
"#;

#[test]
fn merges_are_recorded_like_runs_and_refuse_what_cannot_merge() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    // The "other task": the digits again, trained at another learning rate (the plumbing is the same).
    let clothes = DIGITS.replace("name = \"digits\"", "name = \"clothes\"").replace("lr = 3e-3", "lr = 5e-3");
    let clothes = &clothes[..clothes.find("[[merge]]").unwrap()];
    let clothes_path = write(dir.path(), "clothes.toml", clothes);
    let opts = |records: &str| CompareOptions { records: Some(dir.path().join(records)), device: Some(DeviceChoice::Cpu), ..Default::default() };
    // Merges whose runs are not all recorded wait for them: the merges of two tasks' experiments
    // happen when the second one runs.
    let digits = Experiment::load(&write(dir.path(), "digits.toml", DIGITS), &registry).unwrap();
    let first = compare(&digits, &registry, &opts("digits.jsonl")).unwrap();
    let names: Vec<&str> = first.iter().map(|r| r.strategy.as_str()).collect();
    assert_eq!(names, ["ft", "ft-slow", "ft", "ft-slow", "soup", "soup", "greedy-soup", "greedy-soup", "rebasin"]);
    compare(&Experiment::load(&clothes_path, &registry).unwrap(), &registry, &opts("clothes.jsonl")).unwrap();
    let records = compare(&digits, &registry, &opts("digits.jsonl")).unwrap();
    let names: Vec<(&str, u64)> = records.iter().map(|r| (r.strategy.as_str(), r.seed)).collect();
    let per_seed = ["soup", "greedy-soup", "ties", "regmean", "fisher"];
    let mut want = vec![("ft", 0), ("ft-slow", 0), ("ft", 1), ("ft-slow", 1)];
    for (name, seeds) in [("soup", [0, 1]), ("greedy-soup", [0, 1])] {
        want.extend(seeds.iter().map(|&s| (name, s)));
    }
    want.push(("rebasin", 0));
    for name in &per_seed[2..] {
        want.extend([(*name, 0), (*name, 1)]);
    }
    assert_eq!(names, want);
    for r in &records[4..] {
        assert!(r.finished() && r.steps == 0 && (0.0..=1.0).contains(&r.test_top1) && r.artifact_bytes > 0, "{r:?}");
        assert!(r.summaries["merge"]["runs"].as_array().is_some_and(|runs| runs.len() == 2), "{:?}", r.summaries);
    }
    // The greedy soup starts from the better run on validation and says what it kept.
    let greedy = &records[6].summaries["merge"]["chosen"];
    assert!(greedy["kept"].as_array().is_some_and(|k| !k.is_empty()) && greedy["alone"].as_array().is_some_and(|a| a.len() == 2), "{greedy}");
    // Re-basin: the barrier along the straight path, before and after alignment.
    let barrier = &records[8].summaries["merge"]["barrier"];
    let (naive, aligned) = (barrier["naive"]["loss_barrier"].as_f64().unwrap(), barrier["aligned"]["loss_barrier"].as_f64().unwrap());
    assert!(naive.is_finite() && aligned.is_finite() && barrier["naive"]["top1"].as_array().unwrap().len() == 11, "{barrier}");
    // Merged across tasks, the model keeps this task's head: the digits' test accuracy of the TIES merge is not
    // the clothes run's head's; and the merges of two tasks read both experiments' runs.
    assert!(records[9].summaries["merge"]["runs"][1].as_str().unwrap().contains("of clothes"), "{:?}", records[9].summaries);

    // A rerun records nothing new.
    let lines = |name: &str| read_records(&dir.path().join(name)).unwrap().len();
    let before = lines("digits.jsonl");
    compare(&digits, &registry, &opts("digits.jsonl")).unwrap();
    assert_eq!(lines("digits.jsonl"), before);

    // Methods whose effect lives outside the backbone's weights cannot be merged.
    let ncm = DIGITS.replace("methods = [{ method = \"full_finetune\" }]\ntrain", "methods = [{ method = \"ncm\" }]\ntrain");
    let ncm = Experiment::load(&write(dir.path(), "ncm.toml", &ncm), &registry).unwrap();
    let err = compare(&ncm, &registry, &opts("ncm.jsonl")).err().unwrap().to_string();
    assert!(err.contains("`ncm`") && err.contains("cannot be merged"), "{err}");

    // Bad entries are named before anything runs.
    let bad = |from: &str, to: &str| Experiment::load(&write(dir.path(), "bad.toml", &DIGITS.replace(from, to)), &registry).err().unwrap().to_string();
    let err = bad("rule = { kind = \"ties\", density = 0.5 }", "rule = { kind = \"ties\", densty = 0.5 }");
    assert!(err.contains("densty"), "{err}");
    let err = bad("rule = { kind = \"ties\", density = 0.5 }", "rule = { kind = \"ties\", density = 1.5 }");
    assert!(err.contains("density must be in (0, 1]"), "{err}");
    let err = bad("strategies = [\"ft\", \"ft-slow\"]\nrule = { kind = \"soup\" }", "strategies = [\"ft\", \"ft-fast\"]\nrule = { kind = \"soup\" }");
    assert!(err.contains("no strategy `ft-fast`") && err.contains("ft, ft-slow"), "{err}");
    let err = bad("rule = { kind = \"rebasin\" }", "rule = { kind = \"rebase\" }");
    assert!(err.contains("rebase") && err.contains("rebasin"), "{err}");
}

/// Two MLPs of other widths at other input sizes (28 and 14 pixels) on the same digits.
const WIDE: &str = r#"
name = "wide"
seeds = [0]
device = "cpu"
[backbone]
kind = "mlp"
hidden = [32, 16]
[data]
kind = "mnist"
train_limit = 200
eval_limit = 100
holdout = [0.1, 0.1]
ood = ["gaussian_noise:3"]
[train]
epochs = 2
batch_size = 32
lr = 3e-3
[[strategy]]
name = "ft"
methods = [{ method = "full_finetune" }]
[[merge]]
name = "ens-probabilities"
strategies = ["ft"]
with = [{ experiment = "small.toml", strategy = "ft", records = "small.jsonl" }]
rule = { kind = "ensemble", combine = "probabilities", weights = [1.0, 2.0] }
[[merge]]
name = "ens-features"
strategies = ["ft"]
with = [{ experiment = "small.toml", strategy = "ft", records = "small.jsonl" }]
rule = { kind = "ensemble", combine = "features", steps = 50 }
[[merge]]
name = "ens-self"
strategies = ["ft", "ft"]
rule = { kind = "ensemble", combine = "logits" }
"#;

#[test]
fn ensembles_combine_runs_of_other_backbones_and_refuse_other_examples() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    let opts = |records: &str| CompareOptions { records: Some(dir.path().join(records)), device: Some(DeviceChoice::Cpu), ..Default::default() };
    let small = WIDE.replace("name = \"wide\"", "name = \"small\"").replace("hidden = [32, 16]", "hidden = [24]\nimage_size = 14");
    let small = &small[..small.find("[[merge]]").unwrap()];
    compare(&Experiment::load(&write(dir.path(), "small.toml", small), &registry).unwrap(), &registry, &opts("small.jsonl")).unwrap();
    let wide = Experiment::load(&write(dir.path(), "wide.toml", WIDE), &registry).unwrap();
    let records = compare(&wide, &registry, &opts("wide.jsonl")).unwrap();
    let names: Vec<&str> = records.iter().map(|r| r.strategy.as_str()).collect();
    assert_eq!(names, ["ft", "ens-probabilities", "ens-features", "ens-self"]);
    let small_run = &read_records(&dir.path().join("small.jsonl")).unwrap()[0];
    let (ft, probabilities, features, itself) = (&records[0], &records[1], &records[2], &records[3]);
    for r in &records[1..] {
        assert!(r.finished() && (0.0..=1.0).contains(&r.test_top1) && r.val_top1.len() == 1 && r.ood.len() == 1, "{r:?}");
    }
    // Each member predicted through its own backbone and input size: alone, it scores as its run did.
    let merge = &probabilities.summaries["merge"];
    assert!(merge["members"][1].as_str().unwrap().contains("of small"), "{merge}");
    let alone: Vec<f64> = merge["member_test_top1"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(alone, [ft.test_top1, small_run.test_top1]);
    let weights: Vec<f64> = merge["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!((weights[0] - 1.0 / 3.0).abs() < 1e-12 && (weights[1] - 2.0 / 3.0).abs() < 1e-12, "{weights:?}");
    // It stores nothing new and runs both members.
    assert_eq!(probabilities.artifact_bytes, ft.artifact_bytes + small_run.artifact_bytes);
    let latency = ft.latency_ms.unwrap() + small_run.latency_ms.unwrap();
    assert!((probabilities.latency_ms.unwrap() - latency).abs() < 1e-9);
    assert!(probabilities.steps == 0 && probabilities.trainable_params == 0);
    // The feature ensemble fits one probe on 16 + 24 standardised features and saves it.
    assert_eq!((features.steps, features.trainable_params), (50, 10 * (16 + 24) + 10));
    assert_eq!(features.summaries["merge"]["probe"]["features"], 40);
    assert!(features.artifact_bytes > probabilities.artifact_bytes && dir.path().join("artifacts/wide/ens-features-seed0.safetensors").exists());
    // Its members' outputs were made by the first ensemble.
    assert_eq!(features.summaries["merge"]["outputs_reused"], serde_json::json!([false, false]));
    // A model ensembled with itself is that model.
    assert_eq!((itself.test_top1, &itself.ood[0].top1), (ft.test_top1, &ft.ood[0].top1));

    // Members must read the same examples: another eval_limit is refused, naming both experiments.
    let fewer = small.replace("name = \"small\"", "name = \"fewer\"").replace("eval_limit = 100", "eval_limit = 80");
    compare(&Experiment::load(&write(dir.path(), "fewer.toml", &fewer), &registry).unwrap(), &registry, &opts("fewer.jsonl")).unwrap();
    let mismatched = WIDE.replace("small.toml", "fewer.toml").replace("small.jsonl", "fewer.jsonl");
    let mismatched = Experiment::load(&write(dir.path(), "mismatched.toml", &mismatched), &registry).unwrap();
    let err = compare(&mismatched, &registry, &opts("wide.jsonl")).err().unwrap().to_string();
    assert!(err.contains("`fewer`") && err.contains("`wide`") && err.contains("same examples"), "{err}");

    // Bad entries are named before anything runs.
    let bad = |from: &str, to: &str| Experiment::load(&write(dir.path(), "bad.toml", &WIDE.replace(from, to)), &registry).err().unwrap().to_string();
    let err = bad("weights = [1.0, 2.0]", "weights = [1.0, 2.0, 3.0]");
    assert!(err.contains("ens-probabilities") && err.contains("3 weights for 2 members"), "{err}");
    let err = bad("weights = [1.0, 2.0]", "weights = [1.0, -2.0]");
    assert!(err.contains("weights[1] = -2") && err.contains("non-negative"), "{err}");
    let err = bad("combine = \"logits\"", "combine = \"logits\", steps = 10");
    assert!(err.contains("`steps`"), "{err}");
    let err = bad("combine = \"logits\" }", "combine = \"logits\" }\nreset_batchnorm = 64");
    assert!(err.contains("reset_batchnorm"), "{err}");
}
