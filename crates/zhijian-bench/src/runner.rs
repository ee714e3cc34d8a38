//! Runs an experiment: every strategy × seed under the same splits and budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tch::Tensor;
use zhijian_core::metrics::{peak_rss_bytes, reset_peak_rss};
use zhijian_core::train::{self, TrainOptions, features_cacheable};
use zhijian_core::{Compute, Error, Method, Model, Registry, Result, Split};

use crate::build::{build_model, image_preset, weights_file};
use crate::class_text::ClassTexts;
use crate::data::load_data;
use crate::experiment::{DeviceChoice, Experiment, RunRef, Strategy};
use crate::features::{FeatureCache, FeatureOrigin, feature_key, file_digest};
use crate::record::{Record, SplitScore, TeacherUse, append_record, find_record, read_records};
use crate::source::Source;
use crate::teacher::{configured_teacher, pretrained_teacher};

/// Options of a comparison that are not part of the experiment file.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// Lift the data config's `train_limit` and `eval_limit` (use the whole data set).
    pub full: bool,
    /// Override the experiment's records file.
    pub records: Option<PathBuf>,
    /// Override the experiment's device.
    pub device: Option<DeviceChoice>,
    /// Folder for saved artifacts; default `artifacts/` beside the records file.
    pub artifacts: Option<PathBuf>,
    /// Run only this deterministic slice of the seed × strategy grid.
    pub shard: Option<Shard>,
    /// Run these seeds instead of the experiment's.
    pub seeds: Option<Vec<u64>>,
    /// Run only these strategies (by name; the grid keeps the file's order).
    /// Their runs have the keys they have in the whole comparison, so a later
    /// comparison of the whole file skips them.
    pub strategies: Option<Vec<String>>,
    /// Folder that keeps a frozen backbone's features across runs
    /// ([`crate::features`]); none: features are kept for this comparison only.
    pub feature_cache: Option<PathBuf>,
    /// Recompute frozen lower blocks at every step instead of caching their
    /// output ([`zhijian_core::train::frozen_prefix`]).
    pub no_prefix_cache: bool,
}

/// Slice `index` of `count` of a grid: run `k` (seeds outer, strategies inner,
/// in file order) belongs to shard `k mod count`. Shards of one grid can run on
/// different machines; their JSONL records concatenate into the whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Which slice, from 0.
    pub index: usize,
    /// How many slices.
    pub count: usize,
}

impl Shard {
    /// Whether run `k` of the grid belongs to this shard.
    pub fn has(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// `i/n` with `0 ≤ i < n`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::Config(format!("shard `{s}` must be `i/n` with 0 ≤ i < n, e.g. 0/2"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// The folder a comparison writes its artifacts to, by default: `artifacts/<experiment>/` beside its records.
pub fn default_artifacts(records: &Path, experiment: &str) -> PathBuf {
    records.parent().unwrap_or(Path::new(".")).join("artifacts").join(experiment)
}

/// The artifact of one run in `artifacts`.
pub fn artifact_path(artifacts: &Path, strategy: &str, seed: u64) -> PathBuf {
    artifacts.join(format!("{strategy}-seed{seed}.safetensors"))
}

/// A finished run of an experiment, found in its records, and its artifact.
pub struct RecordedRun {
    /// The run's record.
    pub record: Record,
    /// Where its artifact was saved.
    pub artifact: PathBuf,
}

/// The last finished run of `strategy` with `seed` in `records`, if there is one.
pub fn find_run(exp: &Experiment, records: &Path, strategy: &str, seed: u64) -> Result<Option<RecordedRun>> {
    let Some(record) = read_records(records)?.into_iter().rev().find(|r| r.strategy == strategy && r.seed == seed && r.finished()) else {
        return Ok(None);
    };
    let artifact = artifact_path(&default_artifacts(records, &exp.name), strategy, seed);
    // Artifacts stay on the machine that made them (they are not committed): say how to remake one.
    if !artifact.is_file() {
        return Err(Error::Config(format!(
            "`{strategy}` seed {seed} is recorded in {} but its artifact {} is not here (artifacts stay where the run ran): delete that record's line and run its experiment again to remake it",
            records.display(),
            artifact.display()
        )));
    }
    Ok(Some(RecordedRun { record, artifact }))
}

/// What to run so that [`find_run`] finds `strategy` seed `seed` of the experiment at `path`.
pub fn missing_run(path: &Path, records: &Path, strategy: &str, seed: u64) -> String {
    format!(
        "no finished run of strategy `{strategy}` seed {seed} in {}; run `zhijian compare {} --records {}` first",
        records.display(),
        path.display(),
        records.display()
    )
}

/// The last finished run of `strategy` with `seed` in the records of `exp`
/// (read from `path`): `records` if given, else the experiment's own. Its
/// absence is an error that says how to make the run.
pub fn recorded_run(exp: &Experiment, path: &Path, records: Option<PathBuf>, strategy: &str, seed: u64) -> Result<RecordedRun> {
    let records = records.unwrap_or_else(|| exp.records_path());
    find_run(exp, &records, strategy, seed)?.ok_or_else(|| Error::Config(missing_run(path, &records, strategy, seed)))
}

/// Everything that defines a run, as the record keeps it and its key hashes.
fn run_config(exp: &Experiment, strategy: &Strategy, train: &serde_json::Value, seed: u64, full: bool, uses: Uses) -> serde_json::Value {
    let methods = serde_json::to_value(&strategy.methods).unwrap_or_default();
    let mut canonical = serde_json::json!({
        "backbone": serde_json::to_value(&exp.backbone).unwrap_or_default(),
        "data": serde_json::to_value(&exp.data).unwrap_or_default(),
        "full": full, "methods": methods, "train": train, "seed": seed,
    });
    // Only what a teacher changes, and only when a method uses one, so other runs keep their keys.
    if uses.teacher {
        if let Some(teacher) = &exp.teacher {
            canonical["teacher"] = serde_json::to_value(teacher).unwrap_or_default();
        }
        if !strategy.teacher_cache {
            canonical["teacher_cache"] = false.into();
        }
    }
    // Only when set, so experiments without a source task keep their keys.
    if let Some(source) = &exp.source {
        canonical["source"] = serde_json::to_value(source).unwrap_or_default();
    }
    if uses.class_text {
        canonical["class_text"] = serde_json::to_value(exp.class_text.clone().unwrap_or_default()).unwrap_or_default();
    }
    // The run started from, by its key: rerunning it reruns this one.
    if let (Some(init), Some(key)) = (&strategy.init, uses.init_key) {
        canonical["init"] = serde_json::json!({ "run": serde_json::to_value(init).unwrap_or_default(), "key": key });
    }
    canonical
}

/// What of the experiment beyond backbone, data and budget a run uses, so
/// that it keys the run only then (other runs keep their keys).
#[derive(Clone, Copy, Default)]
struct Uses<'a> {
    /// A method needs a teacher.
    teacher: bool,
    /// A method reads the class texts.
    class_text: bool,
    /// The key of the recorded run the strategy starts from.
    init_key: Option<&'a str>,
}

/// The recorded run a strategy's `init` names, with its experiment file.
fn init_run(exp: &Experiment, init: &RunRef, registry: &Registry) -> Result<RecordedRun> {
    let path = exp.base.join(&init.experiment);
    let iexp = Experiment::load(&path, registry)?;
    recorded_run(&iexp, &path, init.records.as_ref().map(|r| exp.base.join(r)), &init.strategy, init.seed)
        .map_err(|e| Error::Config(format!("strategy init: {e}")))
}

/// The hash of a run's configuration: a rerun skips runs whose key is recorded.
pub(crate) fn run_key(config: &serde_json::Value) -> String {
    hex::encode(&Sha256::digest(config.to_string().as_bytes())[..8])
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn numel(ts: &[(String, Tensor)]) -> i64 {
    ts.iter().map(|(_, t)| t.numel() as i64).sum()
}

/// Examples timed one by one for the batch-1 latency.
const LATENCY_EXAMPLES: i64 = 16;
/// Examples timed in batches for the inference throughput.
const THROUGHPUT_EXAMPLES: i64 = 256;

/// Inference speed of the trained model on the first test examples, backbone
/// included even when training used cached features: the median batch-1
/// latency in milliseconds, and examples per second at `batch_size`. Inputs
/// are made (decoded, tokenised) before the clock starts; one warm-up pass
/// runs first.
fn inference_speed(model: &Model, methods: &[Box<dyn Method>], test: &Split, batch_size: i64, compute: Compute) -> Result<(f64, f64)> {
    let first = |n: i64| test.input.select(&Tensor::arange(n.min(test.len()), (tch::Kind::Int64, tch::Device::Cpu)), tch::Device::Cpu);
    let bulk = first(THROUGHPUT_EXAMPLES)?;
    let _warm_up = train::predict(model, methods, &bulk, batch_size, compute)?;
    let t = Instant::now();
    let _ = train::predict(model, methods, &bulk, batch_size, compute)?;
    let per_s = bulk.len() as f64 / t.elapsed().as_secs_f64();
    let singles = first(LATENCY_EXAMPLES)?;
    let mut times: Vec<f64> = (0..singles.len())
        .map(|i| {
            let one = singles.select(&Tensor::from_slice(&[i]), tch::Device::Cpu)?;
            let t = Instant::now();
            let _ = train::predict(model, methods, &one, 1, compute)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], per_s))
}

/// What a trained or merged model scores under the protocol.
pub(crate) struct Scores {
    /// Test accuracy.
    pub test: zhijian_core::Accuracy,
    /// Test top-5, with more than 5 classes.
    pub test_top5: Option<f64>,
    /// Each shifted split's accuracy.
    pub ood: Vec<SplitScore>,
    /// The source task's accuracy before and after, when the experiment has one.
    pub source: Option<crate::source::SourceScore>,
    /// Median batch-1 latency (ms).
    pub latency_ms: f64,
    /// Examples per second at the evaluation batch size.
    pub inference_per_s: f64,
}

impl Scores {
    /// Scores `model` with `methods` on `test` and `ood` (features, when the
    /// run cached them), the source task, and its inference speed on the raw
    /// `raw_test` inputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn of(
        model: &Model,
        methods: &[Box<dyn Method>],
        test: &Split,
        ood: &[Split],
        raw_test: &Split,
        source: Option<&Source>,
        batch_size: i64,
        compute: Compute,
    ) -> Result<Scores> {
        let accuracy = train::evaluate(model, methods, test, batch_size, compute)?;
        let top5 = |a: &zhijian_core::Accuracy| (model.num_classes() > 5).then(|| a.top5());
        let ood = ood
            .iter()
            .map(|s| {
                let a = train::evaluate(model, methods, s, batch_size, compute)?;
                Ok(SplitScore { split: s.name.clone(), top1: a.top1(), top5: top5(&a), n: a.n })
            })
            .collect::<Result<Vec<_>>>()?;
        let source = source.map(|s| s.score(model, methods, batch_size)).transpose()?;
        let (latency_ms, inference_per_s) = inference_speed(model, methods, raw_test, batch_size, compute)?;
        Ok(Scores { test_top5: top5(&accuracy), test: accuracy, ood, source, latency_ms, inference_per_s })
    }

    /// `record` with these scores written into it (a run's and a merge's records share them).
    pub(crate) fn into_record(self, record: Record) -> Record {
        Record {
            test_top1: self.test.top1(),
            test_top5: self.test_top5,
            test_n: self.test.n,
            ood: self.ood,
            source: self.source,
            latency_ms: Some(self.latency_ms),
            inference_per_s: Some(self.inference_per_s),
            host: Some(crate::record::Host::now()),
            ..record
        }
    }
}

/// Runs every strategy × seed not yet recorded (of the shard, if one is given),
/// appending a record after each run. Returns those runs' records (earlier ones
/// included), in grid order.
pub fn compare(exp: &Experiment, registry: &Registry, opts: &CompareOptions) -> Result<Vec<Record>> {
    if let Some(wanted) = &opts.strategies {
        let known: Vec<&str> = exp.strategies.iter().map(|s| s.name.as_str()).collect();
        if let Some(unknown) = wanted.iter().find(|w| !known.contains(&w.as_str())) {
            return Err(Error::Config(format!("no strategy `{unknown}` in experiment `{}`; its strategies: {}", exp.name, known.join(", "))));
        }
    }
    let device = opts.device.unwrap_or(exp.device).resolve()?;
    let records_path = opts.records.clone().unwrap_or_else(|| exp.records_path());
    let artifacts = opts.artifacts.clone().unwrap_or_else(|| default_artifacts(&records_path, &exp.name));
    let existing = read_records(&records_path)?;
    let done: HashMap<&str, &Record> = existing.iter().map(|r| (r.key.as_str(), r)).collect();
    if let Some(why) = crate::record::Host::now().oversubscribed() {
        eprintln!("warning: {why}");
    }
    // The data's transforms follow the backbone's preset (size, normalisation).
    let data = load_data(exp, image_preset(exp)?.as_ref(), opts.full)?;
    let data_desc = data.describe(exp.data.name());
    eprintln!("data: {data_desc}");
    let source = match &exp.source {
        Some(task) => {
            let weights = weights_file(exp)?.ok_or_else(|| Error::Config("a source task needs pre-trained weights, with their head".into()))?;
            let (model, _) = build_model(exp, data.classes.len() as i64, device)?;
            let source = Source::new(task, &weights, &model, exp.train.eval_batch_size)?;
            eprintln!("source task: {}", source.describe());
            Some(source)
        }
        None => None,
    };
    let mut features = FeatureCache::new(opts.feature_cache.clone());
    // Built the first time a strategy's methods ask for it, then shared: it is frozen.
    let mut teacher = None;
    // Embedded the first time a strategy's methods read them, then shared.
    let mut class_texts: Option<ClassTexts> = None;
    let mut weights_digest: Option<Option<String>> = None;
    let mut keys = Vec::new();
    let rev = git_rev();
    let seeds = opts.seeds.as_ref().unwrap_or(&exp.seeds);
    if seeds.is_empty() {
        return Err(Error::Config("no seeds to run".into()));
    }
    let chosen: Vec<&Strategy> = exp.strategies.iter().filter(|s| opts.strategies.as_ref().is_none_or(|w| w.contains(&s.name))).collect();
    let grid = seeds.iter().flat_map(|&seed| chosen.iter().map(move |&s| (seed, s)));
    for (_, (seed, strategy)) in grid.enumerate().filter(|(k, _)| opts.shard.is_none_or(|s| s.has(*k))) {
        let cfg = strategy.train_config(&exp.train)?;
        let cfg = zhijian_core::TrainConfig { seed, ..cfg };
        let methods_json = serde_json::to_value(&strategy.methods).unwrap_or_default();
        let train_json = serde_json::to_value(&cfg).unwrap_or_default();
        let mut methods: Vec<Box<dyn Method>> = strategy.methods.iter().map(|m| registry.build(m)).collect::<Result<_>>()?;
        let init = strategy.init.as_ref().map(|r| init_run(exp, r, registry)).transpose()?;
        let uses = Uses {
            teacher: methods.iter().any(|m| m.teacher_taps().is_some()),
            class_text: methods.iter().any(|m| m.reads_class_text()),
            init_key: init.as_ref().map(|r| r.record.key.as_str()),
        };
        let config = run_config(exp, strategy, &train_json, seed, opts.full, uses);
        let key = run_key(&config);
        keys.push(key.clone());
        // Read anew before each run: another process on the same records file
        // (`--seeds` or `--strategies` beside this comparison) may have
        // recorded it since this one started.
        let recorded_since = if done.contains_key(key.as_str()) { None } else { find_record(&records_path, &key)? };
        if let Some(earlier) = done.get(key.as_str()).copied().or(recorded_since.as_ref()) {
            match &earlier.failed {
                None => eprintln!("{} seed {seed}: already recorded in {}, skipped", strategy.name, records_path.display()),
                Some(why) => eprintln!("{} seed {seed}: recorded as failed ({why}); delete its line from {} to retry", strategy.name, records_path.display()),
            }
            continue;
        }
        let label = format!("{} seed {seed}", strategy.name);
        // Embedded before the seed is set: building the text tower draws from
        // the random stream, which the run's own initialisation must not see.
        if uses.class_text && class_texts.is_none() {
            let texts = ClassTexts::embed(exp, &exp.class_text.clone().unwrap_or_default(), &data.classes, device)?;
            eprintln!("class texts: {}", texts.description);
            class_texts = Some(texts);
        }
        reset_peak_rss();
        // Seeded before the model exists: the new head's initialisation is part of
        // the run, so neither the strategy order nor a resumed comparison changes it.
        tch::manual_seed(seed as i64);
        let (model, backbone_desc) = build_model(exp, data.classes.len() as i64, device)?;
        if let Some(texts) = &class_texts {
            texts.give(&mut methods)?;
        }
        train::prepare(&model, &mut methods, seed)?;
        if let (Some(run), Some(r)) = (&init, &strategy.init) {
            train::restore(&model, &methods, &run.artifact)
                .map_err(|e| Error::Config(format!("strategy `{}` init from `{}` of {}: {e}", strategy.name, r.strategy, r.experiment.display())))?;
            eprintln!("{label}: starts from `{}` seed {} of {} (test top-1 {:.2}%)", r.strategy, r.seed, r.experiment.display(), 100.0 * run.record.test_top1);
        }
        let trainable = train::trainable(&model, &methods);
        if train::teacher_taps(&methods).is_some() && teacher.is_none() {
            let t = match &exp.teacher {
                Some(config) => configured_teacher(exp, config, registry, &data, device, opts.full)?,
                None => pretrained_teacher(exp, data.classes.len() as i64, device)?,
            };
            eprintln!("teacher: {}", t.description);
            teacher = Some(t);
        }
        let run_teacher = train::teacher_taps(&methods).and(teacher.as_ref());
        let method_params = numel(&train::method_variables(&methods));
        let mut feature_seconds = 0.0;
        let cached = features_cacheable(&model, &methods);
        let mut feature_origin = None;
        let (mut prefix_block, mut prefix_splits) = (None, None);
        let (train_split, val_split, test_split, ood_splits) = if cached {
            let digest = match &weights_digest {
                Some(d) => d.clone(),
                None => weights_digest.insert(weights_file(exp)?.map(|p| file_digest(&p)).transpose()?).clone(),
            };
            let key = feature_key(exp, digest.as_deref(), seed, device, &data)?;
            let t = Instant::now();
            let (f, origin) = features.get(&key, &model, &data, cfg.eval_batch_size, &label)?;
            if origin != FeatureOrigin::Memory {
                feature_seconds = t.elapsed().as_secs_f64();
                eprintln!("{label}: features {} in {feature_seconds:.1} s", if origin == FeatureOrigin::Disk { "read from the cache" } else { "computed" });
            }
            feature_origin = Some(origin);
            (&f.train, &f.val, &f.test, &f.ood)
        } else if let Some(block) = (!opts.no_prefix_cache).then(|| train::frozen_prefix(&model, &methods)).flatten() {
            // Blocks below the first one training can change run once per example.
            let t = Instant::now();
            let cache = |s: &Split| train::cache_prefix(&model, &methods, s, block, cfg.eval_batch_size, &label);
            if let (Some(tr), Some(va), Some(te)) = (cache(&data.train)?, cache(&data.val)?, cache(&data.test)?) {
                let ood = data.ood.iter().map(|s| cache(s)?.ok_or_else(|| Error::Data(format!("{}: no prefix", s.name)))).collect::<Result<Vec<_>>>()?;
                feature_seconds = t.elapsed().as_secs_f64();
                eprintln!("{label}: blocks 0..{block} computed once, in {feature_seconds:.1} s");
                prefix_block = Some(block);
                prefix_splits = Some((tr, va, te, ood));
            }
            match &prefix_splits {
                Some((tr, va, te, ood)) => (tr, va, te, ood),
                None => (&data.train, &data.val, &data.test, &data.ood),
            }
        } else {
            (&data.train, &data.val, &data.test, &data.ood)
        };
        // What the record says whether or not the run finishes.
        let identity = Record {
            experiment: exp.name.clone(),
            strategy: strategy.name.clone(),
            seed,
            key,
            config,
            methods: methods_json,
            train: train_json,
            backbone: backbone_desc,
            data: data_desc.clone(),
            device: format!("{device:?}").to_lowercase(),
            git_rev: rev.clone(),
            trainable_params: numel(&trainable),
            total_params: model.num_params() + method_params,
            cached_features: cached,
            feature_origin,
            feature_seconds,
            cached_prefix_block: prefix_block,
            ..Record::default()
        };
        let started = Instant::now();
        let report = match train::train(
            &model,
            &mut methods,
            train_split,
            Some(val_split),
            &cfg,
            &TrainOptions { label: label.clone(), teacher: run_teacher, no_teacher_cache: !strategy.teacher_cache, ..Default::default() },
        ) {
            Ok(report) => report,
            // The run is lost, the comparison is not: record why, go on.
            Err(e @ Error::Diverged { step, .. }) => {
                let failed = Record {
                    failed: Some(e.to_string()),
                    finished_at: unix_now(),
                    train_seconds: started.elapsed().as_secs_f64(),
                    steps: step,
                    train_samples_per_s: f64::NAN,
                    final_loss: f64::NAN,
                    test_top1: f64::NAN,
                    peak_rss_bytes: peak_rss_bytes(),
                    host: Some(crate::record::Host::now()),
                    ..identity
                };
                append_record(&records_path, &failed)?;
                eprintln!("{label}: FAILED, {e}; recorded as failed in {}, going on", records_path.display());
                continue;
            }
            Err(e) => return Err(e),
        };
        let (eval_compute, _) = cfg.eval_precision.resolve(device);
        let scores = Scores::of(&model, &methods, test_split, ood_splits, &data.test, source.as_ref(), cfg.eval_batch_size, eval_compute)?;
        let peak = peak_rss_bytes();
        let artifact = artifact_path(&artifacts, &strategy.name, seed);
        let artifact_bytes = zhijian_core::save_atomic(&train::artifact(&model, &methods), &artifact)?;
        let record = scores.into_record(Record {
            finished_at: unix_now(),
            compute: Some(report.compute),
            eval_compute: Some(eval_compute),
            precision_probe: report.probe,
            train_seconds: report.seconds,
            eval_seconds: report.eval_seconds,
            train_samples_per_s: report.samples_per_s(),
            steps: report.steps,
            final_loss: report.final_loss,
            val_top1: report.val_top1.clone(),
            epoch_seconds: report.epoch_seconds.clone(),
            peak_rss_bytes: peak,
            artifact_bytes,
            teacher: run_teacher.map(|t| TeacherUse {
                model: t.description.clone(),
                cached: report.teacher_cached == Some(true),
                cache_seconds: report.teacher_cache_seconds,
            }),
            summaries: report.summaries.iter().map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default())).collect(),
            ..identity
        });
        append_record(&records_path, &record)?;
        let mut shifted: String = record.ood.iter().map(|o| format!(", {} {:.2}%", o.split, 100.0 * o.top1)).collect();
        if let Some(s) = &record.source {
            shifted.push_str(&format!(", forgetting {:.1} points on {}", s.forgetting(), s.task));
        }
        eprintln!(
            "{label}: test top-1 {:.2}%{shifted} in {:.1} s ({} steps), record appended to {}",
            100.0 * record.test_top1,
            feature_seconds + report.seconds,
            report.steps,
            records_path.display()
        );
    }
    // Merges read every strategy's runs: a shard leaves them to an unsharded rerun.
    if opts.shard.is_none() && !exp.merges.is_empty() {
        let cx = crate::merge::MergeContext {
            exp,
            registry,
            data: &data,
            data_desc: &data_desc,
            source: source.as_ref(),
            device,
            full: opts.full,
            records: &records_path,
            artifacts: &artifacts,
            rev: &rev,
            done: &done,
        };
        keys.extend(crate::merge::run_merges(&cx, seeds)?);
    }
    let all = read_records(&records_path)?;
    Ok(keys.iter().filter_map(|k| all.iter().rev().find(|r| &r.key == k).cloned()).collect())
}
