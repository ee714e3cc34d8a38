//! `zhijian rank CONFIG`: transferability scores of candidate backbones (or
//! intermediate layers of one, or one seen at several input resolutions) on a
//! target task, from their frozen features on the task's training split,
//! before any fine-tuning; each score's ranking checked against the
//! accuracies the candidates reach (Kendall's τ-b per score).
//!
//! A rank file names the data (as an experiment's `[data]`), the candidates
//! (`[[candidate]]`: a name, a `backbone` table as in experiments, optionally
//! `block = k` for block k's output, average-pooled over positions (CNNs) or
//! over real tokens (transformers), instead of the pooled features, and
//! `image_size`), the scores (default all; LEEP and NCE are left blank for
//! candidates without the source model's predictions), and where the
//! accuracies come from: an `[accuracy]` table (candidate = top-1 in [0, 1]),
//! a `records` file of earlier comparisons (the mean test top-1 of the runs
//! whose strategy is the candidate's `strategy`, default its name), or a
//! `[probe]`: a linear probe trained here on the same cached features and
//! tested on the test split. A probe is a weaker reference than fine-tuning;
//! the table says which reference each accuracy is.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use zhijian_core::train::{batches, progress_bar};
use zhijian_core::weights::read_safetensors;
use zhijian_core::{Ctx, Error, Input, Model, Result, Split, Tap, TrainConfig};
use zhijian_merger::score::{Score, kendall_tau_b};

use crate::build::{build_model, image_preset, weights_file};
use crate::data::{Data, load_data};
use crate::experiment::{BackboneConfig, DataConfig, DeviceChoice, Experiment};
use crate::record::read_records;

/// A rank file, as written in `configs/rank/*.toml`. Paths are relative to the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankConfig {
    /// Name of the ranking (its table's title).
    pub name: String,
    /// `cpu`, `cuda` or `auto`. Default `auto`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Examples per forward pass when computing features. Default 64.
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    /// Scores to compute, by name (`logme`, `leep`, `nce`, `hscore`, `gbc`, `transrate`). Default all.
    #[serde(default = "all_scores")]
    pub scores: Vec<Score>,
    /// The target task; its training split is what the scores see.
    pub data: DataConfig,
    /// The candidates (`[[candidate]]` tables), at least two.
    #[serde(rename = "candidate")]
    pub candidates: Vec<Candidate>,
    /// Accuracies to rank against, candidate name → test top-1 in [0, 1]; they take precedence over `records` and `probe`.
    #[serde(default)]
    pub accuracy: BTreeMap<String, f64>,
    /// A records file (JSONL of `compare`): a candidate's accuracy is the mean test top-1 of its strategy's finished runs.
    #[serde(default)]
    pub records: Option<PathBuf>,
    /// Train a linear probe on each candidate's features for the candidates no other source gives an accuracy.
    #[serde(default)]
    pub probe: Option<ProbeConfig>,
    /// Folder of the rank file: relative paths in it start here.
    #[serde(skip)]
    pub base: PathBuf,
}

fn default_batch_size() -> i64 {
    64
}

fn all_scores() -> Vec<Score> {
    Score::ALL.to_vec()
}

/// One candidate: a backbone, and which of its features at which input size.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Its name in the table (and in `[accuracy]`).
    pub name: String,
    /// The backbone, as an experiment's `[backbone]`.
    pub backbone: BackboneConfig,
    /// Take block `block`'s output (0-based, as `Tap::Block`), average-pooled, instead of the pooled features. Default: pooled.
    #[serde(default)]
    pub block: Option<usize>,
    /// Input side in pixels (image data only); default the data's `image_size`, else the backbone's preset.
    #[serde(default)]
    pub image_size: Option<i64>,
    /// Its strategy's name in `records`; default the candidate's name.
    #[serde(default)]
    pub strategy: Option<String>,
}

/// The linear probe that serves as the accuracy reference: multinomial
/// logistic regression on the standardised features, full batch, Adam.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Optimiser steps. Default 300.
    #[serde(default = "default_probe_steps")]
    pub steps: usize,
    /// Learning rate. Default 0.01.
    #[serde(default = "default_probe_lr")]
    pub lr: f64,
    /// Decoupled weight decay (AdamW). Default 1e-4.
    #[serde(default = "default_probe_wd")]
    pub weight_decay: f64,
    /// Seed of the head's initialisation. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_probe_steps() -> usize {
    300
}
fn default_probe_lr() -> f64 {
    0.01
}
fn default_probe_wd() -> f64 {
    1e-4
}

impl RankConfig {
    /// Reads and checks a rank file.
    pub fn load(path: &Path) -> Result<RankConfig> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let mut cfg: RankConfig = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        cfg.base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        cfg.check().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Rejects what cannot work, naming the field, before anything loads.
    pub fn check(&self) -> Result<()> {
        self.data.validate()?;
        if self.candidates.len() < 2 {
            return Err(Error::Config(format!("a ranking needs at least two [[candidate]] tables, got {}", self.candidates.len())));
        }
        let mut names: Vec<&str> = self.candidates.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Config(format!("candidate names must differ: `{}` is used twice", w[0])));
        }
        if self.scores.is_empty() {
            return Err(Error::Config("scores is empty; leave it out for all of them".into()));
        }
        if self.batch_size < 1 {
            return Err(Error::Config(format!("batch_size must be at least 1, got {}", self.batch_size)));
        }
        let image = self.data.image_task().is_some();
        for c in &self.candidates {
            match c.image_size {
                Some(_) if !image => return Err(Error::Config(format!("candidate `{}`: image_size needs image data, not `{}`", c.name, self.data.name()))),
                Some(s) if s < 8 => return Err(Error::Config(format!("candidate `{}`: image_size must be at least 8 pixels, got {s}", c.name))),
                _ => {}
            }
        }
        for (name, &top1) in &self.accuracy {
            if !self.candidates.iter().any(|c| &c.name == name) {
                return Err(Error::Config(format!(
                    "accuracy.{name}: no such candidate; candidates: {}",
                    self.candidates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
            if !(0.0..=1.0).contains(&top1) {
                return Err(Error::Config(format!("accuracy.{name} must be a top-1 in [0, 1], got {top1}")));
            }
        }
        Ok(())
    }

    /// The experiment that builds candidate `c`'s model and data.
    fn experiment(&self, c: &Candidate, device: DeviceChoice) -> Experiment {
        let mut data = self.data.clone();
        if let (Some(size), Some(task)) = (c.image_size, data.image_task_mut()) {
            task.image_size = Some(size);
        }
        Experiment {
            name: format!("{}/{}", self.name, c.name),
            seeds: vec![0],
            records: None,
            device,
            backbone: c.backbone.clone(),
            data,
            source: None,
            teacher: None,
            class_text: None,
            train: TrainConfig::default(),
            strategies: Vec::new(),
            merges: Vec::new(),
            base: self.base.clone(),
        }
    }
}

/// Options of a ranking that are not part of the rank file.
#[derive(Clone, Debug, Default)]
pub struct RankOptions {
    /// Override the file's device.
    pub device: Option<DeviceChoice>,
    /// Lift the data's `train_limit` and `eval_limit`.
    pub full: bool,
}

/// Where a candidate's accuracy came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccuracySource {
    /// The rank file's `[accuracy]` table.
    Given,
    /// The mean of this many finished runs in the records file.
    Records(usize),
    /// A linear probe trained here.
    Probe,
}

/// One candidate's row of the ranking.
#[derive(Clone, Debug, Serialize)]
pub struct RankRow {
    /// The candidate's name.
    pub candidate: String,
    /// Dimension of its features.
    pub dim: i64,
    /// One per configured score: the value, or why there is none.
    pub scores: Vec<std::result::Result<f64, String>>,
    /// Test top-1 in [0, 1] and where it came from.
    pub accuracy: Option<(f64, AccuracySource)>,
    /// Seconds spent computing its features (shared passes count once, for the first candidate of a pass).
    pub feature_seconds: f64,
}

/// A finished ranking: the table and Kendall's τ-b per score.
#[derive(Clone, Debug, Serialize)]
pub struct RankReport {
    /// The ranking's name.
    pub name: String,
    /// The data, as loaded (first candidate's).
    pub data: String,
    /// The scores, in column order.
    pub scores: Vec<Score>,
    /// One row per candidate, in file order.
    pub rows: Vec<RankRow>,
    /// Per score: τ-b against the accuracies and the number of candidates it used (none: fewer than two, or constant).
    pub taus: Vec<(Option<f64>, usize)>,
    /// Caveats printed under the table.
    pub notes: Vec<String>,
}

/// A candidate's features on the training split (and on the test split for a probe), and its source predictions.
struct Features {
    train: Tensor,
    test: Option<Tensor>,
    source_probs: Option<Tensor>,
}

/// Computes every candidate's features and scores, and the accuracies to rank against.
pub fn rank(cfg: &RankConfig, opts: &RankOptions) -> Result<RankReport> {
    let device_choice = opts.device.unwrap_or(cfg.device);
    let device = device_choice.resolve()?;
    let records = match &cfg.records {
        Some(p) => read_records(&cfg.base.join(p))?,
        None => Vec::new(),
    };
    let mut data_desc = String::new();
    let mut train_examples = None;
    let mut rows = Vec::new();
    // Candidates that share a backbone and input size share one pass over the data.
    let mut done: HashMap<String, (Data, HashMap<Option<usize>, Features>)> = HashMap::new();
    for (i, c) in cfg.candidates.iter().enumerate() {
        let exp = cfg.experiment(c, device_choice);
        let key = pass_key(&exp)?;
        let mut feature_seconds = 0.0;
        if !done.contains_key(&key) {
            let t = Instant::now();
            let data = load_data(&exp, image_preset(&exp)?.as_ref(), opts.full)?;
            if data_desc.is_empty() {
                data_desc = data.describe(exp.data.name());
                eprintln!("rank: data {data_desc}");
            }
            let (model, desc) = build_model(&exp, data.classes.len() as i64, device)?;
            let mut taps: Vec<Option<usize>> = Vec::new();
            for o in &cfg.candidates[i..] {
                if pass_key(&cfg.experiment(o, device_choice))? == key && !taps.contains(&o.block) {
                    taps.push(o.block);
                }
            }
            for block in taps.iter().flatten() {
                if *block >= model.backbone.num_blocks() {
                    return Err(Error::Config(format!("block = {block}: {desc} has blocks 0..{}", model.backbone.num_blocks())));
                }
            }
            let head = source_head(&exp, &model)?;
            let label = format!("rank {}", c.name);
            let train = tapped_features(&model, &data.train, &taps, cfg.batch_size, &label)?;
            let test = if cfg.probe.is_some() { Some(tapped_features(&model, &data.test, &taps, cfg.batch_size, &label)?) } else { None };
            let mut by_tap = HashMap::new();
            for (k, tap) in taps.iter().enumerate() {
                let source_probs = match (tap, &head) {
                    (None, Some((w, b))) => Some(train[k].linear(w, Some(b)).softmax(1, Kind::Double)),
                    _ => None,
                };
                by_tap.insert(*tap, Features { train: train[k].shallow_clone(), test: test.as_ref().map(|t| t[k].shallow_clone()), source_probs });
            }
            feature_seconds = t.elapsed().as_secs_f64();
            eprintln!("rank: {desc} at {} computed in {feature_seconds:.1} s", describe_taps(&taps));
            done.insert(key.clone(), (data, by_tap));
        }
        let (data, by_tap) = &done[&key];
        train_examples = Some(data.train.len());
        let f = &by_tap[&c.block];
        let scores = cfg
            .scores
            .iter()
            .map(|s| {
                let t = Instant::now();
                let value = s.compute(&f.train, &data.train.labels, f.source_probs.as_ref()).map_err(|e| e.to_string());
                eprintln!(
                    "rank: {} {s} = {} in {:.2} s",
                    c.name,
                    value.as_ref().map_or_else(|e| format!("n/a ({e})"), |v| format!("{v:.4}")),
                    t.elapsed().as_secs_f64()
                );
                value
            })
            .collect();
        let accuracy = match accuracy_of(cfg, c, &records) {
            Some(a) => Some(a),
            None => match (&cfg.probe, &f.test) {
                (Some(p), Some(test)) => {
                    let top1 = probe(p, &f.train, &data.train.labels, test, &data.test.labels)?;
                    eprintln!("rank: {} linear probe test top-1 {:.2}%", c.name, 100.0 * top1);
                    Some((top1, AccuracySource::Probe))
                }
                _ => None,
            },
        };
        rows.push(RankRow { candidate: c.name.clone(), dim: f.train.size()[1], scores, accuracy, feature_seconds });
    }
    let taus = (0..cfg.scores.len())
        .map(|k| {
            let pairs: Vec<(f64, f64)> = rows.iter().filter_map(|r| Some((snap(*r.scores[k].as_ref().ok()?), r.accuracy.as_ref()?.0))).collect();
            let (x, y): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
            (kendall_tau_b(&x, &y), pairs.len())
        })
        .collect();
    let mut notes = Vec::new();
    let n = train_examples.unwrap_or(0);
    let wide: Vec<&str> = rows.iter().filter(|r| r.dim >= n - 1).map(|r| r.candidate.as_str()).collect();
    if cfg.scores.contains(&Score::Hscore) && !wide.is_empty() {
        notes.push(format!(
            "hscore: {} ha{} at least as many dimensions as training examples − 1 ({n} examples): there tr(cov(f)⁺ cov(E[f|y])) is the trace of two \
             projections, exactly the number of classes − 1 whatever the features, so H-score ties them",
            wide.join(", "),
            if wide.len() == 1 { "s" } else { "ve" }
        ));
    }
    Ok(RankReport { name: cfg.name.clone(), data: data_desc, scores: cfg.scores.clone(), rows, taus, notes })
}

/// What decides a pass over the data: candidates with equal keys (same backbone, same data and size) share one.
fn pass_key(exp: &Experiment) -> Result<String> {
    serde_json::to_string(&(&exp.backbone, &exp.data)).map_err(|e| Error::Config(e.to_string()))
}

fn describe_taps(taps: &[Option<usize>]) -> String {
    taps.iter().map(|t| t.map_or("pooled".into(), |b| format!("block {b}"))).collect::<Vec<_>>().join(", ")
}

/// The accuracy `[accuracy]` or the records give candidate `c`.
fn accuracy_of(cfg: &RankConfig, c: &Candidate, records: &[crate::Record]) -> Option<(f64, AccuracySource)> {
    if let Some(&top1) = cfg.accuracy.get(&c.name) {
        return Some((top1, AccuracySource::Given));
    }
    let strategy = c.strategy.as_deref().unwrap_or(&c.name);
    let runs: Vec<f64> = records.iter().filter(|r| r.strategy == strategy && r.failed.is_none()).map(|r| r.test_top1).collect();
    (!runs.is_empty()).then(|| (runs.iter().sum::<f64>() / runs.len() as f64, AccuracySource::Records(runs.len())))
}

/// The pre-training head the weights ship (`<head>.weight` `[z, hidden]` and
/// its bias), as f64 on the CPU: what LEEP and NCE read. None when the
/// weights have none (sentence encoders) or there are no weights.
fn source_head(exp: &Experiment, model: &Model) -> Result<Option<(Tensor, Tensor)>> {
    let Some(path) = weights_file(exp)? else { return Ok(None) };
    let head = model.backbone.head_name().to_string();
    let mut tensors: HashMap<String, Tensor> = read_safetensors(&path)?.into_iter().collect();
    let (Some(w), Some(b)) = (tensors.remove(&format!("{head}.weight")), tensors.remove(&format!("{head}.bias"))) else { return Ok(None) };
    if w.dim() != 2 || w.size()[1] != model.backbone.hidden_size() || b.size() != [w.size()[0]] {
        return Err(Error::ShapeMismatch {
            name: format!("{}: `{head}.weight` (the source head)", path.display()),
            expected: vec![-1, model.backbone.hidden_size()],
            got: w.size(),
        });
    }
    Ok(Some((w.to_kind(Kind::Double), b.to_kind(Kind::Double))))
}

/// Features of `split` at each tap (`None`: pooled; `Some(k)`: block k's
/// output averaged over positions or real tokens), in one pass, as f64 on the CPU.
fn tapped_features(model: &Model, split: &Split, taps: &[Option<usize>], batch_size: i64, label: &str) -> Result<Vec<Tensor>> {
    let wanted: Vec<Tap> = taps.iter().flatten().map(|&b| Tap::Block(b)).collect();
    let bar = progress_bar(split.len() as u64, &format!("{label}: features of {}", split.name));
    let mut chunks: Vec<Vec<Tensor>> = taps.iter().map(|_| Vec::new()).collect();
    tch::no_grad(|| -> Result<()> {
        for idx in batches(split.len(), batch_size) {
            let batch = split.input.select(&idx, model.device())?;
            let cx = Ctx::new(false, &[], wanted.clone());
            let pooled = model.features(&cx, &batch);
            let recorded = cx.take_taps();
            for (k, tap) in taps.iter().enumerate() {
                let f = match tap {
                    None => pooled.shallow_clone(),
                    Some(b) => {
                        pool_block(recorded.get(&Tap::Block(*b)).ok_or_else(|| Error::Data(format!("the backbone recorded no tap of block {b}")))?, &batch)?
                    }
                };
                chunks[k].push(f.to_device(Device::Cpu).to_kind(Kind::Double));
            }
            bar.inc(idx.size()[0] as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(chunks.iter().map(|c| Tensor::cat(c, 0)).collect())
}

/// A block's output pooled to `[batch, channels]`: CNN maps `[b, c, h, w]`
/// averaged over positions, token states `[b, t, h]` over real tokens.
fn pool_block(x: &Tensor, batch: &Input) -> Result<Tensor> {
    let x = x.to_kind(Kind::Float);
    match (x.dim(), batch) {
        (4, _) => Ok(x.mean_dim([2, 3].as_slice(), false, Kind::Float)),
        (3, Input::Tokens { mask, .. } | Input::Hidden { mask, .. }) if mask.size()[1] == x.size()[1] => {
            let m = mask.to_kind(Kind::Float).unsqueeze(2);
            Ok((&x * &m).sum_dim_intlist(1, false, Kind::Float) / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0))
        }
        (3, _) => Ok(x.mean_dim(1, false, Kind::Float)),
        _ => Err(Error::ShapeMismatch { name: "a block's output".into(), expected: vec![-1, -1, -1], got: x.size() }),
    }
}

/// Test top-1 of a linear probe trained on `train` features (standardised by
/// their mean and deviation) and tested on `test`.
fn probe(p: &ProbeConfig, train: &Tensor, train_labels: &Tensor, test: &Tensor, test_labels: &Tensor) -> Result<f64> {
    let (mean, std) = (train.mean_dim(0, true, Kind::Double), train.std_dim(0, true, true).clamp_min(1e-8));
    let standard = |f: &Tensor| ((f - &mean) / &std).to_kind(Kind::Float);
    let (x, x_test) = (standard(train), standard(test));
    let classes = train_labels.max().int64_value(&[]).max(test_labels.max().int64_value(&[])) + 1;
    tch::manual_seed(p.seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let head = nn::linear(vs.root() / "probe", x.size()[1], classes, Default::default());
    let mut opt = nn::AdamW { wd: p.weight_decay, ..Default::default() }.build(&vs, p.lr)?;
    let y = train_labels.to_kind(Kind::Int64);
    for _ in 0..p.steps {
        let loss = x.apply(&head).cross_entropy_for_logits(&y);
        opt.backward_step(&loss);
    }
    let predicted = tch::no_grad(|| x_test.apply(&head).argmax(1, false));
    Ok(predicted.eq_tensor(&test_labels.to_kind(Kind::Int64)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]))
}

impl RankReport {
    /// The ranking as markdown: one row per candidate with each score and its
    /// rank among the candidates (1 = best), the accuracy and its rank, then
    /// Kendall's τ-b of each score against the accuracies.
    pub fn markdown(&self) -> String {
        let ranks = |values: Vec<Option<f64>>| -> Vec<Option<usize>> {
            let values: Vec<Option<f64>> = values.into_iter().map(|v| v.map(snap)).collect();
            values.iter().map(|v| v.map(|v| 1 + values.iter().flatten().filter(|&&o| o > v).count())).collect()
        };
        let accuracy_ranks = ranks(self.rows.iter().map(|r| r.accuracy.as_ref().map(|a| a.0)).collect());
        let score_ranks: Vec<Vec<Option<usize>>> =
            (0..self.scores.len()).map(|k| ranks(self.rows.iter().map(|r| r.scores[k].as_ref().ok().copied()).collect())).collect();
        let mut out = format!("### {} — {}\n\n", self.name, self.data);
        out.push_str("| candidate | dim | top-1 (%) | reference |");
        for s in &self.scores {
            out.push_str(&format!(" {s} |"));
        }
        out.push_str(&format!("\n|---|---|---|---|{}\n", "---|".repeat(self.scores.len())));
        let mut notes: Vec<String> = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            let (acc, reference) = match (&r.accuracy, accuracy_ranks[i]) {
                (Some((a, source)), Some(rank)) => (
                    format!("{:.2} ({rank})", 100.0 * a),
                    match source {
                        AccuracySource::Given => "given".to_string(),
                        AccuracySource::Records(n) => format!("records ({n} run{})", if *n == 1 { "" } else { "s" }),
                        AccuracySource::Probe => "linear probe".to_string(),
                    },
                ),
                _ => ("—".into(), "—".into()),
            };
            out.push_str(&format!("| {} | {} | {acc} | {reference} |", r.candidate, r.dim));
            for (k, s) in r.scores.iter().enumerate() {
                match (s, score_ranks[k][i]) {
                    (Ok(v), Some(rank)) => out.push_str(&format!(" {} ({rank}) |", short(*v))),
                    (Err(why), _) => {
                        let note = format!("{}: {why}", self.scores[k]);
                        let n = notes.iter().position(|x| x == &note).unwrap_or_else(|| {
                            notes.push(note);
                            notes.len() - 1
                        });
                        out.push_str(&format!(" n/a [{}] |", n + 1));
                    }
                    _ => out.push_str(" — |"),
                }
            }
            out.push('\n');
        }
        out.push_str("| **Kendall's τ-b** vs top-1 | | | |");
        for (tau, n) in &self.taus {
            out.push_str(&match tau {
                Some(t) => format!(" **{t:+.2}** (n={n}) |"),
                None => format!(" — (n={n}) |"),
            });
        }
        out.push_str("\n\n(rank among the candidates in parentheses, 1 = highest; every score is higher-is-better)\n");
        for (i, note) in notes.iter().enumerate() {
            out.push_str(&format!("\n[{}] {note}", i + 1));
        }
        for note in &self.notes {
            out.push_str(&format!("\n{note}"));
        }
        if !notes.is_empty() || !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// `v` at nine significant digits: scores equal up to round-off (H-score is
/// exactly C − 1 for every candidate with at least n − 1 dimensions) tie in
/// the ranks and in τ instead of being ordered by noise.
fn snap(v: f64) -> f64 {
    format!("{v:.8e}").parse().unwrap_or(v)
}

/// Four significant digits, plain or scientific by magnitude.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) { format!("{v:.3e}") } else { format!("{v:.4}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> std::result::Result<RankConfig, String> {
        let text = format!(
            "name = \"r\"\n{extra}\n[data]\nkind = \"mnist\"\n\
             [[candidate]]\nname = \"a\"\nbackbone = {{ kind = \"small_cnn\" }}\n\
             [[candidate]]\nname = \"b\"\nblock = 1\nbackbone = {{ kind = \"small_cnn\" }}\n"
        );
        let cfg: RankConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.check().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn parses_defaults_and_names_mistakes() {
        let cfg = config("").unwrap();
        assert_eq!(cfg.scores, Score::ALL.to_vec());
        assert_eq!(cfg.candidates[1].block, Some(1));
        assert_eq!(config("scores = [\"logme\", \"gbc\"]").unwrap().scores, vec![Score::Logme, Score::Gbc]);
        assert!(config("scores = [\"logmee\"]").unwrap_err().contains("logmee"));
        assert!(config("[accuracy]\nc = 0.5").unwrap_err().contains("accuracy.c"));
        assert!(config("[accuracy]\na = 95.0").unwrap_err().contains("[0, 1]"));
        assert!(config("bogus = 1").unwrap_err().contains("bogus"));
        assert_eq!(config("[probe]\nsteps = 10").unwrap().probe.unwrap().lr, 0.01);
    }

    /// Candidate sizes replace the data's; other candidates keep it.
    #[test]
    fn image_size_reaches_the_candidate_experiment_only() {
        let mut cfg = config("").unwrap();
        cfg.candidates[0].image_size = Some(64);
        let size = |c: &Candidate| match cfg.experiment(c, DeviceChoice::Cpu).data {
            DataConfig::Mnist(task) => task.image_size,
            _ => unreachable!(),
        };
        assert_eq!((size(&cfg.candidates[0]), size(&cfg.candidates[1])), (Some(64), None));
        let key = |cfg: &RankConfig, k: usize| pass_key(&cfg.experiment(&cfg.candidates[k], DeviceChoice::Cpu)).unwrap();
        assert_ne!(key(&cfg, 0), key(&cfg, 1), "another size: another pass");
        cfg.candidates[0].image_size = None;
        assert_eq!(key(&cfg, 0), key(&cfg, 1), "another block only: one pass");
    }

    /// Blocks of a CNN are averaged over positions; of a transformer over real tokens only.
    #[test]
    fn block_pooling_skips_padding() {
        let maps = Tensor::arange(2 * 3 * 4, (Kind::Float, Device::Cpu)).reshape([2, 3, 2, 2]);
        let pooled = pool_block(&maps, &Input::Images(maps.shallow_clone())).unwrap();
        assert_eq!(Vec::<f32>::try_from(pooled.get(0)).unwrap(), vec![1.5, 5.5, 9.5]);
        let states = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 100.0]).reshape([1, 4, 1]);
        let tokens = Input::Tokens { ids: Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu)), mask: Tensor::from_slice(&[1i64, 1, 1, 0]).reshape([1, 4]) };
        assert_eq!(pool_block(&states, &tokens).unwrap().double_value(&[0, 0]), 2.0);
    }

    /// Ranks, τ and notes as printed: a refused score is n/a with its reason below.
    #[test]
    fn markdown_ranks_and_taus() {
        let row = |name: &str, s: f64, a: f64| RankRow {
            candidate: name.into(),
            dim: 8,
            scores: vec![Ok(s), Err("needs a source head".into())],
            accuracy: Some((a, AccuracySource::Probe)),
            feature_seconds: 0.0,
        };
        let report = RankReport {
            name: "r".into(),
            data: "mnist".into(),
            scores: vec![Score::Logme, Score::Leep],
            rows: vec![row("a", -1.0, 0.9), row("b", 2.0, 0.95)],
            taus: vec![(Some(1.0), 2), (None, 0)],
            notes: vec!["a caveat".into()],
        };
        let md = report.markdown();
        assert!(md.contains("| a | 8 | 90.00 (2) | linear probe | -1.0000 (2) | n/a [1] |"), "{md}");
        assert!(md.contains("| b | 8 | 95.00 (1) | linear probe | 2.0000 (1) | n/a [1] |"), "{md}");
        assert!(md.contains("**+1.00** (n=2)") && md.contains("— (n=0)") && md.contains("[1] leep: needs a source head"), "{md}");
        assert!(md.trim_end().ends_with("a caveat"), "{md}");
        assert_eq!((snap(9.000000000001), snap(9.0)), (9.0, 9.0), "round-off ties");
        assert!(snap(1.0000001) > snap(1.0));
    }

    /// A probe separates separable features and is tested on the test split.
    #[test]
    fn probe_learns_separable_features() {
        tch::manual_seed(0);
        let labels = Tensor::arange(2, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(50, 0, None);
        let f = Tensor::randn([100, 4], (Kind::Double, Device::Cpu)) + labels.to_kind(Kind::Double).unsqueeze(1) * 6.0;
        let p = ProbeConfig { steps: 100, lr: 0.05, weight_decay: 0.0, seed: 0 };
        assert!(probe(&p, &f, &labels, &f, &labels).unwrap() > 0.98);
        let noise = Tensor::randn([100, 4], (Kind::Double, Device::Cpu));
        assert!(probe(&p, &noise, &labels, &Tensor::randn([100, 4], (Kind::Double, Device::Cpu)), &labels).unwrap() < 0.8);
    }
}
