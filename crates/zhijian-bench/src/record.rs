//! Run records: one JSON object per line, appended atomically.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zhijian_core::weights::write_atomic;

use crate::features::FeatureOrigin;
use crate::source::SourceScore;
use zhijian_core::precision::Probe;
use zhijian_core::{Compute, Error, Result};

/// Everything measured in one run of one strategy with one seed.
///
/// A run that failed (its loss diverged) is recorded too, with `failed` saying
/// why; its accuracies are NaN here and `null` in the file, never a number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Experiment name.
    pub experiment: String,
    /// Strategy name.
    pub strategy: String,
    /// Seed of the run.
    pub seed: u64,
    /// Hash of everything that defines the run (backbone, data, budget, methods,
    /// seed): a rerun skips runs whose key is already recorded.
    pub key: String,
    /// The exact configuration of the run the key hashes: backbone, data,
    /// source task, methods, budget, seed, `full`. (Absent in older records.)
    #[serde(default)]
    pub config: serde_json::Value,
    /// The method entries as configured.
    pub methods: serde_json::Value,
    /// The effective training budget.
    pub train: serde_json::Value,
    /// Backbone description.
    pub backbone: String,
    /// Data description (sizes of each split).
    pub data: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `git describe` of the code that ran.
    pub git_rev: String,
    /// Why the run stopped without a result (`training diverged: …`); none
    /// for a finished run. A resumed comparison does not retry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Seconds since the Unix epoch when the run finished.
    pub finished_at: u64,
    /// Parameters that trained (model and methods).
    pub trainable_params: i64,
    /// All parameters (model and methods).
    pub total_params: i64,
    /// Whether the head trained on features computed once by the frozen backbone.
    /// (Absent in records written before this field existed: false.)
    #[serde(default)]
    pub cached_features: bool,
    /// Where those features came from (none when the backbone ran each step).
    /// (Absent in older records.)
    #[serde(default)]
    pub feature_origin: Option<FeatureOrigin>,
    /// Seconds spent computing those features, or reading them from the
    /// cache folder, in this run (0 when the backbone ran each step, or when
    /// an earlier run of the comparison computed them).
    pub feature_seconds: f64,
    /// The block training resumed from, when the frozen blocks below it ran
    /// once per example (their time is `feature_seconds`). (Absent in older records.)
    #[serde(default)]
    pub cached_prefix_block: Option<usize>,
    /// What the training passes computed in (`train.precision` resolved).
    /// (Absent in older records: fp32.)
    #[serde(default)]
    pub compute: Option<Compute>,
    /// What evaluation and the inference timings computed in.
    #[serde(default)]
    pub eval_compute: Option<Compute>,
    /// The matmul probe behind `precision = "auto"`, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision_probe: Option<Probe>,
    /// Seconds of the training loop (without validation).
    pub train_seconds: f64,
    /// Seconds of the per-epoch validation passes. (Absent in older records: 0.)
    #[serde(default)]
    pub eval_seconds: f64,
    /// Training examples per second of the training loop.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_samples_per_s: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Mean training loss over the last epoch.
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f64,
    /// Validation top-1 after each epoch.
    pub val_top1: Vec<f64>,
    /// Training seconds at the end of each epoch (with `val_top1`, accuracy
    /// against time). (Absent in older records.)
    #[serde(default)]
    pub epoch_seconds: Vec<f64>,
    /// Test top-1.
    #[serde(deserialize_with = "nan_if_null")]
    pub test_top1: f64,
    /// Test top-5, where there are more than 5 classes. (Absent in older records.)
    #[serde(default)]
    pub test_top5: Option<f64>,
    /// Test examples.
    pub test_n: i64,
    /// Accuracy on each out-of-distribution split, in the experiment's order.
    /// (Absent in older records: none.)
    #[serde(default)]
    pub ood: Vec<SplitScore>,
    /// The source task's top-1 before and after the run, where the experiment
    /// has one (its drop is forgetting). (Absent in older records.)
    #[serde(default)]
    pub source: Option<SourceScore>,
    /// Median wall time of one example through the trained model (batch 1,
    /// backbone included, methods as trained), milliseconds. (Absent in older records.)
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Test examples per second through the trained model at the evaluation
    /// batch size, inputs already made. (Absent in older records.)
    #[serde(default)]
    pub inference_per_s: Option<f64>,
    /// Peak resident memory of the run in bytes (CPU).
    pub peak_rss_bytes: Option<u64>,
    /// Size of the saved artifact (trainable parameters only) in bytes.
    pub artifact_bytes: u64,
    /// The frozen teacher beside the student, if a method needed one.
    /// (Absent in older records.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherUse>,
    /// What each method chose or learnt, by instance name (WiSE-FT's α,
    /// TPGM's radii). (Absent in older records.)
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub summaries: std::collections::BTreeMap<String, serde_json::Value>,
    /// The machine and its load when the record was written: compare times
    /// only between records of one CPU and a quiet load. (Absent in older records.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
}

/// Where a run's times were taken.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// The CPU's model name (`/proc/cpuinfo`, as `lscpu` prints it); empty where unknown.
    pub cpu: String,
    /// Logical CPUs this process may run on.
    pub cpus: usize,
    /// LibTorch's intra-op threads (`OMP_NUM_THREADS`, default one per CPU).
    pub threads: i64,
    /// The one-minute load average (`/proc/loadavg`); NaN where unknown.
    #[serde(deserialize_with = "nan_if_null")]
    pub load: f64,
    /// Other `zhijian` processes running at the time.
    pub other_zhijian: usize,
}

impl Host {
    /// This machine, now.
    pub fn now() -> Host {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN);
        Host {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            threads: tch::get_num_threads() as i64,
            load,
            other_zhijian: other_zhijian_processes().len(),
        }
    }

    /// Why this host's times may be slow, if they may: other `zhijian`
    /// processes beside LibTorch threads that together outnumber the CPUs.
    /// OpenMP's threads spin at their barriers, so oversubscribed processes
    /// slow each other far more than their share (10–50× measured here).
    pub fn oversubscribed(&self) -> Option<String> {
        let wanted = (self.other_zhijian + 1) * self.threads.max(1) as usize;
        (self.other_zhijian > 0 && wanted > self.cpus).then(|| {
            format!(
                "{} other zhijian process{} running, and this one uses {} LibTorch threads on {} CPUs: oversubscribed OpenMP threads spin and can make \
                 every process many times slower; run one at a time, or give each OMP_NUM_THREADS=1 (or CPUs ÷ processes)",
                self.other_zhijian,
                if self.other_zhijian == 1 { " is" } else { "es are" },
                self.threads,
                self.cpus
            )
        })
    }
}

/// Process ids of other running processes whose executable is named `zhijian…`
/// (a copied binary such as `zhijian.study` included).
fn other_zhijian_processes() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with("zhijian")))
        .collect()
}

/// How a run used its teacher.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherUse {
    /// Which model (`pre-trained efficientnet_lite0 …`, or a configured teacher).
    pub model: String,
    /// Whether its outputs were computed once before the first step.
    pub cached: bool,
    /// Seconds spent computing the cached outputs (inside `train_seconds`).
    pub cache_seconds: f64,
}

impl Record {
    /// Whether the run finished with a result.
    pub fn finished(&self) -> bool {
        self.failed.is_none()
    }
}

/// A figure JSON holds as `null` because it is not a number (serde_json
/// writes NaN and infinities so), read back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Accuracy on one evaluation split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitScore {
    /// Split name (`optdigits`, `gaussian_noise:3`, …).
    pub split: String,
    /// Top-1.
    pub top1: f64,
    /// Top-5, where there are more than 5 classes.
    pub top5: Option<f64>,
    /// Examples.
    pub n: i64,
}

/// Reads every record of a JSONL file (none if it does not exist). A line that
/// does not parse is an error naming the line, never silently dropped.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: path.into(), source: e }),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::CorruptFile { path: path.into(), reason: format!("line {}: {e}", i + 1) }))
        .collect()
}

/// Appends `record` by writing the whole file anew beside it and renaming it
/// over the old one: a crash at any moment leaves either the old or the new
/// file, never a torn line, and finished records are never lost. Processes
/// appending to one file at once (a `--seeds` or `--strategies` run beside a
/// whole comparison) take turns ([`lock_folder`]), so none renames over a
/// record another has just added.
pub fn append_record(path: &Path, record: &Record) -> Result<()> {
    let _turn = lock_folder(path)?;
    let mut content = match std::fs::read(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::Io { path: path.into(), source: e }),
    };
    if !content.is_empty() && !content.ends_with(b"\n") {
        content.push(b'\n');
    }
    push_line(&mut content, record)?;
    write_atomic(path, &content)
}

/// The most recent record of run `key` in `path`, if any: what another process
/// appending to the same file may have recorded since this one read it.
pub fn find_record(path: &Path, key: &str) -> Result<Option<Record>> {
    Ok(read_records(path)?.into_iter().rev().find(|r| r.key == key))
}

/// An exclusive lock on the folder of `path`, held until the returned handle
/// drops. The folder, not the file: the file is replaced by a rename at every
/// append, so a lock on it would guard an inode the next writer no longer
/// opens; a lock file beside it would be one more file in every records
/// folder.
fn lock_folder(path: &Path) -> Result<std::fs::File> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let handle = std::fs::File::open(dir).map_err(Error::io(dir))?;
    handle.lock().map_err(Error::io(dir))?;
    Ok(handle)
}

/// Writes `records`, one per line, as the whole of `path`, atomically (a
/// temporary file beside it, then a rename): the file is the old one or the
/// new one at every moment. Its folder is created if needed.
pub fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let mut content = Vec::new();
    for r in records {
        push_line(&mut content, r)?;
    }
    write_atomic(path, &content)
}

/// `record` as one JSON line at the end of `content`.
fn push_line(content: &mut Vec<u8>, record: &Record) -> Result<()> {
    content.extend_from_slice(serde_json::to_string(record).map_err(|e| Error::Config(e.to_string()))?.as_bytes());
    content.push(b'\n');
    Ok(())
}

/// Fields that say when, where and how fast a run ran, not what it found:
/// two records of one run (one key) that differ only here are duplicates.
pub const MERGE_IGNORES: &[&str] = &[
    "finished_at",
    "git_rev",
    "device",
    "feature_origin",
    "feature_seconds",
    "cached_prefix_block",
    "precision_probe",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_s",
    "epoch_seconds",
    "latency_ms",
    "inference_per_s",
    "peak_rss_bytes",
    "host",
];

/// Where a record was read: file and line (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The records file.
    pub file: std::path::PathBuf,
    /// Its line.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Two finished records of one run (one key) whose results differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The run's key.
    pub key: String,
    /// Its experiment.
    pub experiment: String,
    /// Its strategy.
    pub strategy: String,
    /// Its seed.
    pub seed: u64,
    /// Where the record read first (the one kept) came from.
    pub kept: Origin,
    /// Where the other one came from.
    pub other: Origin,
    /// The fields that differ, each `field: KEPT vs OTHER` (JSON values).
    pub differences: Vec<String>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} ({} / {} seed {}): {} and {} differ in {}",
            self.key,
            self.experiment,
            self.strategy,
            self.seed,
            self.kept,
            self.other,
            self.differences.join("; ")
        )
    }
}

/// The records of several files merged into one per run: what [`merge_records`] returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    /// One record per key, in the order keys first appear (files in the order given).
    pub records: Vec<Record>,
    /// Records dropped because one read earlier has the same key and the same
    /// results (fields in [`MERGE_IGNORES`] aside), or both failed.
    pub duplicates: usize,
    /// Failed records dropped for a finished record of the same key (a run
    /// that failed once and was retried), whichever was read first.
    pub retried: usize,
    /// Runs recorded twice with different results; the record read first is kept.
    pub conflicts: Vec<Conflict>,
}

/// Reads every record of `files` (each must exist) and keeps one per key: a
/// finished record beats a failed one, identical results are duplicates,
/// different results are conflicts (the first record is kept; the caller
/// decides whether that is an error).
pub fn merge_records(files: &[std::path::PathBuf]) -> Result<Merged> {
    let mut merged = Merged::default();
    let mut seen: std::collections::HashMap<String, (usize, Origin)> = std::collections::HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(Error::io(file))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let record: Record = serde_json::from_str(line).map_err(|e| Error::CorruptFile { path: file.clone(), reason: format!("line {}: {e}", i + 1) })?;
            let origin = Origin { file: file.clone(), line: i + 1 };
            let Some((at, first)) = seen.get(&record.key).cloned() else {
                seen.insert(record.key.clone(), (merged.records.len(), origin));
                merged.records.push(record);
                continue;
            };
            let kept = &merged.records[at];
            match (kept.finished(), record.finished()) {
                (false, true) => {
                    merged.retried += 1;
                    seen.insert(record.key.clone(), (at, origin));
                    merged.records[at] = record;
                }
                (true, false) => merged.retried += 1,
                (false, false) => merged.duplicates += 1,
                (true, true) => {
                    let differences = result_differences(kept, &record);
                    if differences.is_empty() {
                        merged.duplicates += 1;
                    } else {
                        merged.conflicts.push(Conflict {
                            key: record.key.clone(),
                            experiment: record.experiment.clone(),
                            strategy: record.strategy.clone(),
                            seed: record.seed,
                            kept: first,
                            other: origin,
                            differences,
                        });
                    }
                }
            }
        }
    }
    Ok(merged)
}

/// The fields (outside [`MERGE_IGNORES`]) whose values differ, as `field: A vs B`.
fn result_differences(a: &Record, b: &Record) -> Vec<String> {
    let as_map = |r: &Record| match serde_json::to_value(r) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (as_map(a), as_map(b));
    let mut fields: Vec<&String> = a.keys().chain(b.keys()).filter(|k| !MERGE_IGNORES.contains(&k.as_str())).collect();
    fields.sort();
    fields.dedup();
    let null = serde_json::Value::Null;
    fields
        .into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
            (x != y).then(|| format!("{k}: {} vs {}", short(x), short(y)))
        })
        .collect()
}

/// A JSON value cut to a readable length for a message.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= 80 { s } else { format!("{}…", s.chars().take(80).collect::<String>()) }
}

#[cfg(test)]
pub(crate) fn sample(strategy: &str, seed: u64, top1: f64) -> Record {
    Record {
        experiment: "e".into(),
        strategy: strategy.into(),
        seed,
        key: format!("{strategy}-{seed}"),
        config: serde_json::json!({}),
        methods: serde_json::json!([]),
        train: serde_json::json!({}),
        backbone: "b".into(),
        data: "d".into(),
        device: "cpu".into(),
        git_rev: "x".into(),
        failed: None,
        finished_at: 0,
        trainable_params: 10,
        total_params: 100,
        cached_features: false,
        feature_origin: None,
        feature_seconds: 0.0,
        cached_prefix_block: None,
        compute: None,
        eval_compute: None,
        precision_probe: None,
        train_seconds: 2.0,
        eval_seconds: 0.5,
        train_samples_per_s: 50.0,
        steps: 3,
        final_loss: 0.5,
        val_top1: vec![top1],
        epoch_seconds: vec![2.0],
        test_top1: top1,
        test_top5: None,
        test_n: 10,
        ood: Vec::new(),
        source: None,
        latency_ms: Some(12.5),
        inference_per_s: Some(400.0),
        peak_rss_bytes: Some(1 << 30),
        artifact_bytes: 4096,
        teacher: None,
        summaries: Default::default(),
        host: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oversubscription is other zhijian processes whose LibTorch threads,
    /// with this one's, outnumber the CPUs; a host survives a JSON round trip
    /// (an unknown load as null).
    #[test]
    fn host_says_when_processes_oversubscribe_the_cpus() {
        let host = |other_zhijian, threads| Host { cpu: "x".into(), cpus: 2, threads, load: f64::NAN, other_zhijian };
        assert_eq!(host(0, 2).oversubscribed(), None, "alone");
        assert_eq!(host(1, 1).oversubscribed(), None, "two processes, one thread each, two CPUs");
        let why = host(1, 2).oversubscribed().unwrap();
        assert!(why.starts_with("1 other zhijian process is running, and this one uses 2 LibTorch threads on 2 CPUs"), "{why}");
        assert!(host(3, 1).oversubscribed().unwrap().contains("3 other zhijian processes are running"));
        let now = Host::now();
        assert!(now.cpus >= 1 && now.threads >= 1, "{now:?}");
        let json = serde_json::to_string(&host(0, 2)).unwrap();
        assert!(json.contains("\"load\":null"), "{json}");
        let back: Host = serde_json::from_str(&json).unwrap();
        assert!(back.load.is_nan() && back.cpus == 2 && back.cpu == "x");
    }

    #[test]
    fn append_keeps_every_record_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/records.jsonl");
        append_record(&path, &sample("a", 0, 0.5)).unwrap();
        append_record(&path, &sample("b", 1, 0.7)).unwrap();
        let got = read_records(&path).unwrap();
        assert_eq!(got, vec![sample("a", 0, 0.5), sample("b", 1, 0.7)]);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        std::fs::write(&path, "{\"not\": \"a record\"}\n").unwrap();
        let err = read_records(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    /// Eight writers appending to one file at once lose none of each other's
    /// records, and each finds the others' by key.
    #[test]
    fn concurrent_appends_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        std::thread::scope(|s| {
            for w in 0..8 {
                let path = &path;
                s.spawn(move || {
                    for k in 0..12 {
                        append_record(path, &sample(&format!("w{w}-{k}"), k, 0.5)).unwrap();
                    }
                });
            }
        });
        let got = read_records(&path).unwrap();
        assert_eq!(got.len(), 8 * 12);
        let found = find_record(&path, &sample("w3-7", 7, 0.5).key).unwrap().expect("w3-7 is recorded");
        assert_eq!(found.strategy, "w3-7");
        assert!(find_record(&path, "no such key").unwrap().is_none());
    }

    /// Duplicates are dropped, a retried failure gives way to its finished
    /// run, different results for one key are conflicts naming both lines.
    #[test]
    fn merging_keeps_one_record_per_run_and_names_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let failed = Record { failed: Some("training diverged".into()), test_top1: f64::NAN, ..sample("c", 0, 0.0) };
        for r in [sample("a", 0, 0.5), failed.clone(), sample("b", 0, 0.7)] {
            append_record(&a, &r).unwrap();
        }
        // The same run again, finished later on another machine: a duplicate.
        let again = Record { finished_at: 99, git_rev: "y".into(), train_seconds: 7.0, latency_ms: None, host: Some(Host::now()), ..sample("a", 0, 0.5) };
        for r in [again, sample("c", 0, 0.9), sample("b", 0, 0.6), sample("d", 1, 0.1), failed] {
            append_record(&b, &r).unwrap();
        }
        let m = merge_records(&[a.clone(), b.clone()]).unwrap();
        let got: Vec<(&str, f64)> = m.records.iter().map(|r| (r.strategy.as_str(), r.test_top1)).collect();
        assert_eq!(got, [("a", 0.5), ("c", 0.9), ("b", 0.7), ("d", 0.1)], "first-seen order; the finished c replaces the failed one");
        assert_eq!((m.duplicates, m.retried), (1, 2));
        assert_eq!(m.conflicts.len(), 1);
        let c = &m.conflicts[0];
        assert_eq!((c.kept.line, c.other.line, c.seed), (3, 3, 0));
        assert_eq!(c.differences, ["test_top1: 0.7 vs 0.6", "val_top1: [0.7] vs [0.6]"]);
        let text = c.to_string();
        assert!(text.starts_with("run b-0 (e / b seed 0): ") && text.contains("a.jsonl:3 and ") && text.contains("b.jsonl:3 differ in test_top1"), "{text}");

        let out = dir.path().join("out/merged.jsonl");
        write_records(&out, &m.records).unwrap();
        assert_eq!(read_records(&out).unwrap(), m.records);
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1, "no temporary file left");

        let missing = dir.path().join("nope.jsonl");
        let err = merge_records(&[a, missing]).unwrap_err().to_string();
        assert!(err.contains("nope.jsonl"), "{err}");
    }

    /// A failed run's accuracies are `null` in the file and NaN when read back.
    #[test]
    fn failed_runs_round_trip_without_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let failed =
            Record { failed: Some("training diverged: loss NaN at step 3".into()), test_top1: f64::NAN, final_loss: f64::INFINITY, ..sample("a", 0, 0.5) };
        append_record(&path, &failed).unwrap();
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.contains("\"test_top1\":null") && line.contains("\"final_loss\":null") && line.contains("\"failed\":\"training diverged"), "{line}");
        let back = read_records(&path).unwrap().remove(0);
        assert!(back.test_top1.is_nan() && back.final_loss.is_nan() && !back.finished());
        append_record(&path, &sample("b", 0, 0.5)).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().lines().nth(1).unwrap().contains("failed"), "a finished run has no `failed` field");
    }
}
