//! `compare` end to end on the real MiniLM weights and Rotten Tomatoes data,
//! with a tiny budget: records are appended, a rerun resumes, bad configs fail
//! before any training with messages that name the problem.

use std::path::Path;

use zhijian::bench::features::FeatureOrigin;
use zhijian::bench::{CompareOptions, DeviceChoice, Experiment, compare, read_records, table};

const TINY: &str = r#"
name = "tiny"
device = "cpu"
[backbone]
kind = "bert"
weights = "all-minilm-l6-v2"
[data]
kind = "rotten_tomatoes"
max_len = 32
fractions = [0.96, 0.02, 0.02]
train_limit = 64
[train]
max_steps = 2
batch_size = 16
eval_batch_size = 256
[[strategy]]
name = "probe"
methods = [{ method = "linear_probe" }]
train = { lr = 1e-2 }
[[strategy]]
name = "lora"
methods = [{ method = "lora", rank = 2, targets = ["query", "re:encoder\\.layer\\.5\\..*value"] }]
"#;

#[test]
fn compare_records_and_resumes() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    let exp = Experiment::load(&crate::write(dir.path(), "exp.toml", TINY), &registry).unwrap();
    let records = dir.path().join("records.jsonl");
    let opts = CompareOptions { records: Some(records.clone()), device: Some(DeviceChoice::Cpu), ..Default::default() };
    let first = compare(&exp, &registry, &opts).unwrap();
    assert_eq!(first.len(), 2);
    let (probe, lora) = (&first[0], &first[1]);
    assert_eq!((probe.strategy.as_str(), lora.strategy.as_str()), ("probe", "lora"));
    assert_eq!(probe.trainable_params, 384 * 2 + 2);
    assert!(probe.feature_seconds > 0.0 && lora.feature_seconds == 0.0);
    // Six query sites plus one value site, rank 2, in and out 384, plus the head.
    assert_eq!(lora.trainable_params, 7 * 2 * (384 + 384) + 384 * 2 + 2);
    assert!(lora.total_params > 22_000_000);
    for r in &first {
        assert!(r.test_n > 200 && (0.0..=1.0).contains(&r.test_top1), "{r:?}");
        assert_eq!(r.steps, 2);
        assert!(r.artifact_bytes > 0);
        // Batch-1 latency and throughput of the whole model, measured after training.
        assert!(r.latency_ms.is_some_and(|ms| ms > 0.0) && r.inference_per_s.is_some_and(|x| x > 0.0), "{r:?}");
    }
    assert!(table::markdown(&first).contains("| lora | 1 |"));
    // A rerun finds both runs recorded and trains nothing.
    let again = compare(&exp, &registry, &opts).unwrap();
    assert_eq!(again, first);
    assert_eq!(read_records(&records).unwrap().len(), 2);
    // Shard 1 of 2 is the second run of the grid (LoRA), already recorded too.
    let shard = CompareOptions { shard: Some("1/2".parse().unwrap()), ..opts.clone() };
    assert_eq!(compare(&exp, &registry, &shard).unwrap(), std::slice::from_ref(lora));
    assert!("2/2".parse::<zhijian::bench::Shard>().unwrap_err().to_string().contains("0 ≤ i < n"));
    assert!("x".parse::<zhijian::bench::Shard>().is_err());

    // A run does not depend on what ran before it in the process: LoRA alone
    // (as after an interruption) repeats the LoRA run of the full comparison.
    // `--strategies lora` runs it alone, under the key it has in the whole
    // comparison; an unknown name lists the experiment's strategies.
    let only = |names: &[&str], file: &str| CompareOptions {
        records: Some(dir.path().join(file)),
        strategies: Some(names.iter().map(|n| n.to_string()).collect()),
        ..opts.clone()
    };
    let solo = compare(&exp, &registry, &only(&["lora"], "alone.jsonl")).unwrap();
    assert_eq!(solo.len(), 1);
    assert_eq!((solo[0].key.as_str(), solo[0].final_loss, solo[0].test_top1), (lora.key.as_str(), lora.final_loss, lora.test_top1));
    let err = compare(&exp, &registry, &only(&["lora", "lroa"], "typo.jsonl")).unwrap_err().to_string();
    assert!(err.contains("no strategy `lroa`") && err.contains("its strategies: probe, lora"), "{err}");
    assert!(!dir.path().join("typo.jsonl").exists(), "nothing ran");
}

#[test]
fn bad_configs_fail_before_training_and_name_the_problem() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    let load = |text: String| Experiment::load(&crate::write(dir.path(), "exp.toml", &text), &registry).err().unwrap().to_string();
    let err = load(TINY.replace("batch_size = 16", "batch_sise = 16"));
    assert!(err.contains("batch_sise"), "{err}");
    let err = load(TINY.replace("\"linear_probe\"", "\"linear_prob\""));
    assert!(err.contains("unknown method `linear_prob`") && err.contains("full_finetune"), "{err}");
    let err = load(TINY.replace("rank = 2", "rank = 2, alpah = 4"));
    assert!(err.contains("alpah"), "{err}");
    let err = load(TINY.replace("train = { lr = 1e-2 }", "train = { learning_rate = 1e-2 }"));
    assert!(err.contains("learning_rate"), "{err}");

    let exp = Experiment::load(&crate::write(dir.path(), "exp.toml", &TINY.replace("all-minilm-l6-v2", "no-such-model")), &registry).unwrap();
    let err = compare(&exp, &registry, &CompareOptions { records: Some(dir.path().join("r.jsonl")), ..Default::default() }).err().unwrap().to_string();
    assert!(err.contains("no-such-model") && err.contains("all-minilm-l6-v2"), "{err}");
}

/// EfficientNet-Lite0 (its shipped weights, converted from the `.pth`) on a few
/// MNIST digits at 32 px, tested in distribution, on optdigits and on a corruption.
const VISION: &str = r#"
name = "tiny-vision"
device = "cpu"
[backbone]
kind = "efficientnet_lite"
weights = "efficientnet-lite0"
[data]
kind = "mnist"
image_size = 32
train_limit = 40
eval_limit = 30
ood = ["optdigits", "gaussian_noise:2"]
augment = { scale = [0.5, 1.0], hflip = false }
[source]
kind = "foolbox_imagenet"
[train]
max_steps = 2
batch_size = 8
[[strategy]]
name = "probe"
methods = [{ method = "linear_probe" }]
[[strategy]]
name = "lora"
methods = [{ method = "lora", rank = 2 }]
"#;

#[test]
fn vision_compare_tests_every_shift() {
    let _rng = crate::rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let registry = zhijian::bench::registry();
    let exp = Experiment::load(&crate::write(dir.path(), "exp.toml", VISION), &registry).unwrap();
    let cache = dir.path().join("features");
    let opts =
        CompareOptions { records: Some(dir.path().join("r.jsonl")), device: Some(DeviceChoice::Cpu), feature_cache: Some(cache.clone()), ..Default::default() };
    let records = compare(&exp, &registry, &opts).unwrap();
    assert_eq!(records.len(), 2);
    for r in &records {
        let shifts: Vec<&str> = r.ood.iter().map(|o| o.split.as_str()).collect();
        assert_eq!(shifts, ["optdigits", "gaussian_noise:2"], "{r:?}");
        assert!(r.ood.iter().all(|o| (25..=30).contains(&o.n) && (0.0..=1.0).contains(&o.top1)), "{r:?}");
        assert!(r.test_top5.is_some_and(|t5| t5 >= r.test_top1), "{r:?}");
        assert!(r.backbone.contains("pre-trained"), "{}", r.backbone);
    }
    // The probe trains the 1280 → 10 head on cached features; LoRA adapts the
    // 1×1 convolutions (rank 2 on each of the 32 pointwise sites) as well.
    assert!(records[0].cached_features && !records[1].cached_features);
    assert_eq!(records[0].trainable_params, 1280 * 10 + 10);
    assert!(records[1].trainable_params > records[0].trainable_params);
    let t = table::markdown(&records);
    assert!(t.contains("| optdigits top-1 (%) | gaussian_noise:2 top-1 (%) | forgetting on foolbox_imagenet (points) |"), "{t}");

    // Forgetting: the shipped ImageNet head over the backbone before and after.
    // The probe leaves the backbone as it was; LoRA's update changes it.
    let (probe, lora) = (records[0].source.clone().unwrap(), records[1].source.clone().unwrap());
    assert_eq!(probe.n, 20);
    assert!((16.0 / 20.0..=18.0 / 20.0).contains(&probe.before), "{probe:?}");
    assert_eq!((probe.after, lora.before), (probe.before, probe.before), "{probe:?} {lora:?}");

    // The probe's features were computed and kept on disk; a new comparison
    // reads them back (the same numbers), and a damaged file is computed anew.
    let probe_only = Experiment { strategies: exp.strategies[..1].to_vec(), ..exp.clone() };
    assert_eq!(records[0].feature_origin, Some(FeatureOrigin::Computed));
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let rerun = |name: &str| compare(&probe_only, &registry, &CompareOptions { records: Some(dir.path().join(name)), ..opts.clone() }).unwrap().remove(0);
    let from_disk = rerun("r2.jsonl");
    assert_eq!(from_disk.feature_origin, Some(FeatureOrigin::Disk));
    assert_eq!((from_disk.test_top1, &from_disk.ood, from_disk.final_loss), (records[0].test_top1, &records[0].ood, records[0].final_loss));
    std::fs::write(&files[0], b"not a safetensors file").unwrap();
    let recomputed = rerun("r3.jsonl");
    assert_eq!(recomputed.feature_origin, Some(FeatureOrigin::Computed));
    assert_eq!(recomputed.test_top1, records[0].test_top1);
    assert!(std::fs::read(&files[0]).unwrap().len() > 1000, "the damaged file was replaced");

    // Bad shifts and mismatched data name the problem before anything trains.
    let err =
        compare(&Experiment::load(&crate::write(dir.path(), "exp.toml", &VISION.replace("gaussian_noise:2", "fog:3")), &registry).unwrap(), &registry, &opts)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("fog:3") && err.contains("gaussian_noise"), "{err}");
    let err = compare(
        &Experiment::load(&crate::write(dir.path(), "exp.toml", &VISION.replace("\"efficientnet-lite0\"", "\"lite0.safetensors\"")), &registry).unwrap(),
        &registry,
        &opts,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lite0.safetensors") && err.contains("efficientnet-lite0"), "{err}");
    let text = VISION.replace("kind = \"mnist\"", "kind = \"rotten_tomatoes\"");
    assert!(Experiment::load(&crate::write(dir.path(), "exp.toml", &text), &registry).is_err(), "image fields on a text data set");
}

/// Every experiment file the project ships parses, and every method entry in
/// it names a registered method with a valid configuration; so does every rank file.
#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let tomls = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
        files.sort();
        files
    };
    let files = tomls(&dir);
    assert!(files.len() >= 5, "{files:?}");
    let registry = zhijian::bench::registry();
    // The experiments whose runs give rank candidates their fine-tuned accuracies live beside the rank files.
    for file in files.into_iter().chain(tomls(&dir.join("rank/finetune"))) {
        Experiment::load(&file, &registry).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    // The rank files (`zhijian rank`) have their own schema, in their own folder.
    let ranks = tomls(&dir.join("rank"));
    assert!(ranks.len() >= 2, "{ranks:?}");
    for file in ranks {
        zhijian::bench::rank::RankConfig::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}
