//! `[[merge]]`: models merged in weight space from recorded runs, evaluated
//! and recorded like runs (small MLPs trained from scratch on a few MNIST and
//! Fashion-MNIST images: the plumbing, not the accuracy).

use std::path::Path;

use zhijian::bench::{CompareOptions, DeviceChoice, Experiment, compare, read_records};

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

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

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
