//! Run records: one JSON object per line, appended atomically.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zhijian_core::weights::tmp_sibling;

use crate::features::FeatureOrigin;
use crate::source::SourceScore;
use zhijian_core::precision::Probe;
use zhijian_core::{Compute, Error, Result};

/// Everything measured in one run of one strategy with one seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    pub train_samples_per_s: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Mean training loss over the last epoch.
    pub final_loss: f64,
    /// Validation top-1 after each epoch.
    pub val_top1: Vec<f64>,
    /// Training seconds at the end of each epoch (with `val_top1`, accuracy
    /// against time). (Absent in older records.)
    #[serde(default)]
    pub epoch_seconds: Vec<f64>,
    /// Test top-1.
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
/// file, never a torn line, and finished records are never lost.
pub fn append_record(path: &Path, record: &Record) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    let mut content = match std::fs::read(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::Io { path: path.into(), source: e }),
    };
    if !content.is_empty() && !content.ends_with(b"\n") {
        content.push(b'\n');
    }
    let line = serde_json::to_string(record).map_err(|e| Error::Config(e.to_string()))?;
    content.extend_from_slice(line.as_bytes());
    content.push(b'\n');
    let tmp = tmp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(Error::io(path))
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
