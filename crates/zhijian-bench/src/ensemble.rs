//! `[[merge]]` entries with `rule = { kind = "ensemble", … }`: an
//! output-space ensemble of recorded runs ([`zhijian_merger::ensemble`]).
//! The members are named as for the weight-space rules (this experiment's
//! strategies, `with` runs of other experiments), but may be of other
//! backbones: each member is rebuilt with its own experiment (backbone,
//! methods, artifact) and reads the evaluation splits through that
//! experiment's own data pipeline (tokenizer, image size). Those splits must
//! hold the same examples, in the same order, as this experiment's: the same
//! number and the same labels per split, or the ensemble is refused naming
//! both experiments.
//!
//! Each member predicts in evaluation mode, without gradients; the
//! probabilities or logits are combined, or (`combine = "features"`) one
//! linear probe is fitted on the concatenation of the members' pooled
//! features on the training split. The record scores the ensemble like a
//! merge (test, validation, shifted splits). What it costs: latency is the
//! sum of the members' recorded latencies (they all run), parameters and
//! artifact bytes the sum of the members' (a probability or logit ensemble
//! stores nothing new; a feature ensemble adds its probe's file), time the
//! members' restoring and passes (`feature_seconds`: measured once per
//! comparison, counted in every ensemble that uses them) plus the
//! combination or the probe's fit (`train_seconds`). No source-task
//! forgetting is measured: the members' backbones are the ensemble's, each
//! with its own head.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::Tensor;
use zhijian_core::metrics::reset_peak_rss;
use zhijian_core::train::{self, Split};
use zhijian_core::{Accuracy, Compute, Error, Input, Result, Tap};
use zhijian_merger::ensemble::{Combine, Ensemble, FeatureProbe};
use zhijian_merger::merge::MergeRule;

use crate::build::image_preset;
use crate::data::{Data, load_data};
use crate::experiment::{Experiment, MergeEntry};
use crate::merge::{MergeContext, Run, rebuilt};
use crate::record::{Record, SplitScore, append_record};
use crate::runner::{RecordedRun, Scores, artifact_path};

/// What the members computed, kept across the ensembles of one comparison:
/// an ensemble by probabilities and one by features of the same runs run
/// each member once. Also the other experiments' data, loaded once.
pub(crate) struct Outputs {
    /// Whether a feature ensemble is among the comparison's merges: then each
    /// member's pass over an evaluation split keeps its pooled features too,
    /// and its logits come from them through the head (one pass for both).
    with_features: bool,
    /// By artifact path.
    members: HashMap<PathBuf, MemberOutputs>,
    /// By experiment file.
    data: HashMap<PathBuf, Data>,
}

impl Outputs {
    /// Ready for the ensembles among `merges`.
    pub(crate) fn for_merges(merges: &[MergeEntry]) -> Outputs {
        let features = |m: &MergeEntry| matches!(MergeRule::from_table(&m.rule), Ok(MergeRule::Ensemble(e)) if e.combine == Combine::Features);
        Outputs { with_features: merges.iter().any(features), members: HashMap::new(), data: HashMap::new() }
    }
}

/// One member's outputs.
#[derive(Default)]
struct MemberOutputs {
    /// Seconds to build the model and restore the run (the first time).
    restore_seconds: f64,
    /// By split name.
    splits: HashMap<String, SplitOutputs>,
}

impl MemberOutputs {
    /// Rebuilds the member's run (with its own experiment) and runs it over
    /// `missing` (split, logits wanted, features wanted) in evaluation mode.
    fn make(&mut self, cx: &MergeContext, exp: &Experiment, run: &RecordedRun, classes: i64, missing: &[(&Split, bool, bool)]) -> Result<()> {
        let t = Instant::now();
        let (model, methods) = rebuilt(exp, cx.registry, run, classes, cx.device)?;
        if self.restore_seconds == 0.0 {
            self.restore_seconds = t.elapsed().as_secs_f64();
        }
        // The head alone turns pooled features into logits unless a method reads other taps.
        let head_only = methods.iter().all(|m| m.forward_taps().iter().all(|t| *t == Tap::Pooled));
        let batch = exp.train.eval_batch_size;
        for &(s, want_logits, want_features) in missing {
            let t = Instant::now();
            let out = self.splits.entry(s.name.clone()).or_default();
            if want_features && out.features.is_none() {
                out.features = Some(train::features(&model, &methods, &s.input, batch)?);
            }
            if want_logits && out.logits.is_none() {
                out.logits = Some(match &out.features {
                    Some(pooled) if head_only => train::predict(&model, &methods, &Input::Features(pooled.shallow_clone()), batch, Compute::Fp32)?,
                    _ => train::predict(&model, &methods, &s.input, batch, Compute::Fp32)?,
                });
            }
            out.seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

/// A member's outputs on one split.
#[derive(Default)]
struct SplitOutputs {
    /// Logits `[n, classes]` (evaluation splits).
    logits: Option<Tensor>,
    /// Pooled features `[n, d]` (for feature ensembles; the training split too).
    features: Option<Tensor>,
    /// Seconds of the passes that made them.
    seconds: f64,
}

/// The identity of the ensemble being made, as [`crate::merge`] computed it.
pub(crate) struct Made {
    /// Its run key.
    pub key: String,
    /// The configuration the key hashes.
    pub config: serde_json::Value,
    /// `merge NAME seed N`, for the log.
    pub label: String,
    /// The seed it is recorded under.
    pub seed: u64,
}

/// Checks an ensemble entry before anything runs: one weight per member
/// (this experiment's strategies and `with` entries, at each of `seeds`
/// with `across_seeds`), and no BatchNorm re-estimation (it runs models
/// as trained). Other rules pass.
pub(crate) fn check_entry(entry: &MergeEntry, rule: &MergeRule, seeds: usize) -> Result<()> {
    let MergeRule::Ensemble(ensemble) = rule else { return Ok(()) };
    let bad = |why: String| Err(Error::Config(format!("merge `{}`: {why}", entry.name)));
    if entry.reset_batchnorm.is_some() {
        return bad("`reset_batchnorm` re-estimates merged weights' statistics; an ensemble runs its members as trained".into());
    }
    let members = (entry.strategies.len() + entry.with.len()) * if entry.across_seeds { seeds } else { 1 };
    if let Err(Error::Config(why)) = ensemble.member_weights(members) {
        return bad(why);
    }
    Ok(())
}

/// The evaluation splits: validation, test, the shifted ones.
fn eval_splits(data: &Data) -> Vec<&Split> {
    [&data.val, &data.test].into_iter().chain(&data.ood).collect()
}

/// Refuses a member experiment whose splits are not this experiment's
/// examples (the same number, the same labels in the same order, per split);
/// the training split too when the probe fits on it.
fn check_same_examples(exp: &Experiment, data: &Data, other: &Experiment, path: &Path, odata: &Data, with_train: bool, entry: &str) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Data(format!(
            "ensemble `{entry}`: experiment `{}` ({}) {what} than this experiment `{}`; an ensemble's members must read the same examples: give them the same data set, limits, holdout and split seed",
            other.name,
            path.display(),
            exp.name
        )))
    };
    if data.classes.len() != odata.classes.len() {
        return refuse(format!("has {} classes, other", odata.classes.len()));
    }
    let names = |d: &Data| d.ood.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    if names(data) != names(odata) {
        return refuse(format!("has shifted splits {:?}, other", names(odata)));
    }
    let train = with_train.then_some((&data.train, &odata.train));
    for (ours, theirs) in train.into_iter().chain(eval_splits(data).into_iter().zip(eval_splits(odata))) {
        if ours.len() != theirs.len() || !ours.labels.equal(&theirs.labels) {
            return refuse(format!("reads {} `{}` examples ({} here), or other labels,", theirs.len(), ours.name, ours.len()));
        }
    }
    Ok(())
}

/// Runs one ensemble entry over `runs` and appends its record.
pub(crate) fn run(cx: &MergeContext, entry: &MergeEntry, rule: &Ensemble, runs: &[Run], made: Made, outputs: &mut Outputs) -> Result<()> {
    reset_peak_rss();
    let started = Instant::now();
    let features = rule.combine == Combine::Features;
    let weights = if features { Vec::new() } else { rule.member_weights(runs.len())? };
    let mut member_seconds = Vec::new();
    let mut reused = Vec::new();
    let mut names = Vec::new();
    for (other, run) in runs {
        let (exp, data) = match other {
            None => (cx.exp, cx.data),
            Some((oexp, path)) => {
                if !outputs.data.contains_key(path) {
                    outputs.data.insert(path.clone(), load_data(oexp, image_preset(oexp)?.as_ref(), cx.full)?);
                }
                let odata = &outputs.data[path];
                check_same_examples(cx.exp, cx.data, oexp, path, odata, features, &entry.name)?;
                (oexp, odata)
            }
        };
        let name = match other {
            None => format!("{} seed {}", run.record.strategy, run.record.seed),
            Some((oexp, _)) => format!("{} seed {} of {}", run.record.strategy, run.record.seed, oexp.name),
        };
        let member = outputs.members.entry(run.artifact.clone()).or_default();
        // (split, its logits wanted, its features wanted): the training split's features for a
        // probe; every evaluation split's logits, and features when any ensemble here takes them.
        let evals = eval_splits(data).into_iter().map(|s| (s, true, outputs.with_features));
        let wanted: Vec<(&Split, bool, bool)> = features.then_some((&data.train, false, true)).into_iter().chain(evals).collect();
        let lacks = |m: &MemberOutputs, (s, logits, features): &(&Split, bool, bool)| {
            m.splits.get(&s.name).is_none_or(|o| (*logits && o.logits.is_none()) || (*features && o.features.is_none()))
        };
        let missing: Vec<(&Split, bool, bool)> = wanted.iter().copied().filter(|w| lacks(member, w)).collect();
        reused.push(missing.is_empty());
        if !missing.is_empty() {
            eprintln!("{}: running {name}", made.label);
            member.make(cx, exp, run, data.classes.len() as i64, &missing)?;
        }
        // What making this member's outputs costs, whether measured now or by an earlier ensemble.
        member_seconds.push(member.restore_seconds + wanted.iter().map(|(s, ..)| member.splits[&s.name].seconds).sum::<f64>());
        names.push(name);
    }
    let combine_started = Instant::now();
    let members: Vec<&MemberOutputs> = runs.iter().map(|(_, r)| &outputs.members[&r.artifact]).collect();
    let ours = eval_splits(cx.data);
    let logits = |m: &MemberOutputs, s: &Split| m.splits[&s.name].logits.as_ref().expect("every evaluation split's logits").shallow_clone();
    let pooled = |m: &MemberOutputs, s: &Split| m.splits[&s.name].features.as_ref().expect("a feature ensemble's features").shallow_clone();
    let own = |m: &MemberOutputs, s: &Split| Accuracy::from_logits(&logits(m, s), &s.labels).top1();
    let member_test: Vec<f64> = members.iter().map(|m| own(m, &cx.data.test)).collect();
    let member_val: Vec<f64> = members.iter().map(|m| own(m, &cx.data.val)).collect();
    let classes = cx.data.classes.len() as i64;
    // The ensemble's scores on each evaluation split (their ranking is its prediction).
    let (scores, probe) = if features {
        let of = |s: &Split| members.iter().map(|m| pooled(m, s)).collect::<Vec<_>>();
        let t = Instant::now();
        let (probe, loss) = FeatureProbe::fit(&of(&cx.data.train).iter().collect::<Vec<_>>(), &cx.data.train.labels, classes, rule.probe())?;
        let fit_seconds = t.elapsed().as_secs_f64();
        let scores = ours.iter().map(|s| probe.logits(&of(s).iter().collect::<Vec<_>>())).collect::<Result<Vec<_>>>()?;
        (scores, Some((probe, loss, fit_seconds)))
    } else {
        let of = |s: &Split| members.iter().map(|m| logits(m, s)).collect::<Vec<_>>();
        let scores = ours.iter().map(|s| rule.combine(&of(s).iter().collect::<Vec<_>>(), &weights)).collect::<Result<Vec<_>>>()?;
        (scores, None)
    };
    let accuracies: Vec<Accuracy> = ours.iter().zip(&scores).map(|(s, x)| Accuracy::from_logits(x, &s.labels)).collect();
    let combine_seconds = combine_started.elapsed().as_secs_f64();
    let recorded = |f: fn(&Record) -> Option<f64>| runs.iter().map(|(_, r)| f(&r.record)).collect::<Option<Vec<f64>>>();
    let latencies = recorded(|r| r.latency_ms);
    let rates = recorded(|r| r.inference_per_s);
    let top5 = |a: &Accuracy| (classes > 5).then(|| a.top5());
    let scores = Scores {
        test: accuracies[1],
        test_top5: top5(&accuracies[1]),
        ood: cx.data.ood.iter().zip(&accuracies[2..]).map(|(s, a)| SplitScore { split: s.name.clone(), top1: a.top1(), top5: top5(a), n: a.n }).collect(),
        source: None,
        // Every member runs on every example: their times add.
        latency_ms: latencies.as_ref().map_or(f64::NAN, |l| l.iter().sum()),
        inference_per_s: rates.as_ref().map_or(f64::NAN, |r| 1.0 / r.iter().map(|x| 1.0 / x).sum::<f64>()),
    };
    let member_bytes: Vec<u64> = runs.iter().map(|(_, r)| r.record.artifact_bytes).collect();
    let mut summary = serde_json::json!({
        "rule": rule.name(), "combine": rule.combine.name(), "members": names,
        "weights": (!features).then_some(&weights),
        "member_test_top1": member_test, "member_val_top1": member_val,
        "member_latency_ms": latencies, "member_artifact_bytes": member_bytes,
        "member_seconds": member_seconds, "outputs_reused": reused, "combine_seconds": combine_seconds,
    });
    let mut artifact_bytes: u64 = member_bytes.iter().sum();
    let mut params = 0;
    if let Some((probe, loss, fit_seconds)) = &probe {
        let bytes = zhijian_core::save_atomic(&probe.tensors(), &artifact_path(cx.artifacts, &entry.name, made.seed))?;
        artifact_bytes += bytes;
        params = probe.num_params();
        let settings = rule.probe();
        summary["probe"] = serde_json::json!({
            "features": probe.mean.size()[0], "steps": settings.steps, "lr": settings.lr, "weight_decay": settings.weight_decay,
            "final_loss": loss, "bytes": bytes, "fit_seconds": fit_seconds,
        });
    }
    let seconds = member_seconds.iter().sum::<f64>() + combine_seconds;
    let backbones: Vec<&str> = runs.iter().map(|(_, r)| r.record.backbone.as_str()).collect();
    let backbone = format!("ensemble of {}: {}", runs.len(), backbones.join(" + "));
    let record = scores.into_record(Record {
        trainable_params: params,
        total_params: runs.iter().map(|(_, r)| r.record.total_params).sum::<i64>() + params,
        // The members' passes as features were for a probe on cached features (†); the combination as training.
        cached_features: features,
        feature_seconds: member_seconds.iter().sum(),
        train_seconds: combine_seconds,
        // Full batch: every step reads every training example.
        train_samples_per_s: probe.as_ref().map_or(f64::NAN, |(.., fit)| (cx.data.train.len() * rule.probe().steps as i64) as f64 / fit),
        steps: if probe.is_some() { rule.probe().steps } else { 0 },
        final_loss: probe.as_ref().map_or(f64::NAN, |(_, loss, _)| *loss),
        val_top1: vec![accuracies[0].top1()],
        artifact_bytes,
        summaries: [("merge".to_string(), summary)].into_iter().collect(),
        ..cx.record(&entry.name, made.seed, made.key, made.config, &MergeRule::Ensemble(rule.clone()), backbone)
    });
    append_record(cx.records, &record)?;
    let alone: Vec<String> = member_test.iter().map(|a| format!("{:.2}%", 100.0 * a)).collect();
    eprintln!(
        "{}: {} of {} models, test top-1 {:.2}% (members alone {}) in {seconds:.1} s ({:.1} s here), record appended to {}",
        made.label,
        rule.name(),
        runs.len(),
        100.0 * record.test_top1,
        alone.join(", "),
        started.elapsed().as_secs_f64(),
        cx.records.display()
    );
    Ok(())
}
