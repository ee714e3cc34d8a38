//! `[[merge]]` entries: models made in weight space from the artifacts of
//! recorded runs ([`zhijian_merger::merge`]), evaluated on the experiment's
//! splits and recorded like runs. A comparison runs its merges after its
//! strategies (all of them: not in a sharded run), skipping merges already
//! recorded; a merge's key hashes its entry and the keys of the runs it reads,
//! so a rerun of any of them makes it merge again.
//!
//! Each run is rebuilt as it trained (its backbone, its methods prepared and
//! restored from its artifact), adapters are folded into the backbone's
//! weights (LoRA and the other methods that [`Method::can_merge`]), and the
//! whole state is read. A run whose methods keep weights outside the backbone
//! (prompts, adapters that do not fold, class means) cannot be merged, and
//! says so. The merged model is the plain backbone and head.
//!
//! The `ensemble` rule is the exception: it reads no weights, so its runs may
//! be of other backbones and keep any methods; [`crate::ensemble`] runs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::Device;
use zhijian_core::metrics::{peak_rss_bytes, reset_peak_rss};
use zhijian_core::train::{self, Split};
use zhijian_core::{Compute, Error, Method, Model, Registry, Result};
use zhijian_merger::merge::{MergeInputs, MergeRule, Weights, align, batchnorm, check_compatible, fisher, rebasin, regmean};

use crate::build::{build_model, image_preset};
use crate::data::{Data, load_data};
use crate::experiment::{Experiment, MergeEntry};
use crate::record::{Record, append_record};
use crate::runner::{RecordedRun, Scores, artifact_path, find_run, missing_run, run_key};
use crate::source::Source;

/// What the merges of a comparison share with its runs.
pub(crate) struct MergeContext<'a> {
    pub exp: &'a Experiment,
    pub registry: &'a Registry,
    pub data: &'a Data,
    pub data_desc: &'a str,
    pub source: Option<&'a Source>,
    pub device: Device,
    pub full: bool,
    pub records: &'a Path,
    pub artifacts: &'a Path,
    pub rev: &'a str,
    pub done: &'a HashMap<&'a str, &'a Record>,
}

impl MergeContext<'_> {
    /// A merge's record with what every merge rule fills alike: its name, seed,
    /// key and config, the rule as its one method, no training, fp32
    /// evaluation, this process's peak RSS and the time it finishes.
    pub(crate) fn record(&self, name: &str, seed: u64, key: String, config: serde_json::Value, rule: &MergeRule, backbone: String) -> Record {
        Record {
            experiment: self.exp.name.clone(),
            strategy: name.to_string(),
            seed,
            key,
            config,
            methods: serde_json::json!([{ "merge": with_defaults(rule) }]),
            train: serde_json::Value::Null,
            backbone,
            data: self.data_desc.to_string(),
            device: format!("{:?}", self.device).to_lowercase(),
            git_rev: self.rev.to_string(),
            finished_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            eval_compute: Some(Compute::Fp32),
            peak_rss_bytes: peak_rss_bytes(),
            ..Record::default()
        }
    }
}

/// One model a merge reads.
struct Ingredient {
    /// `strategy seed N` (of `experiment` when another's).
    label: String,
    /// Its weights, adapters folded in.
    weights: Weights,
    /// Its Fisher or Grams, when the rule reads them.
    fisher: Option<Weights>,
    grams: Option<Weights>,
}

/// Runs every merge of the experiment at `seeds` not yet recorded whose runs
/// are all recorded (others are skipped, saying which run they wait for);
/// returns the keys of those recorded.
pub(crate) fn run_merges(cx: &MergeContext, seeds: &[u64]) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    // Ensembles of the same runs (by probabilities, then by features) run each member once.
    let mut outputs = crate::ensemble::Outputs::for_merges(&cx.exp.merges);
    for entry in &cx.exp.merges {
        let groups: Vec<Vec<u64>> = if entry.across_seeds { vec![seeds.to_vec()] } else { seeds.iter().map(|&s| vec![s]).collect() };
        for group in groups {
            keys.extend(merge_one(cx, entry, &group, &mut outputs)?);
        }
    }
    Ok(keys)
}

/// A run a merge reads, and the other experiment it belongs to (none: this one's).
pub(crate) type Run = (Option<(Experiment, PathBuf)>, RecordedRun);

/// The runs `entry` reads at `seeds`: this experiment's (strategy-major), then
/// each `with` experiment's; or why not all are recorded yet. A weight-space
/// rule (`one_backbone`) refuses another experiment's backbone.
fn runs_of(cx: &MergeContext, entry: &MergeEntry, seeds: &[u64], one_backbone: bool) -> Result<std::result::Result<Vec<Run>, String>> {
    let mut runs = Vec::new();
    for strategy in &entry.strategies {
        for &seed in seeds {
            match find_run(cx.exp, cx.records, strategy, seed)? {
                Some(run) => runs.push((None, run)),
                None => return Ok(Err(format!("no finished run of strategy `{strategy}` seed {seed} in {}", cx.records.display()))),
            }
        }
    }
    for other in &entry.with {
        let path = cx.exp.base.join(&other.experiment);
        let oexp = Experiment::load(&path, cx.registry)?;
        if one_backbone && serde_json::to_value(&oexp.backbone).ok() != serde_json::to_value(&cx.exp.backbone).ok() {
            return Err(Error::Config(format!(
                "merge `{}`: {} has another backbone; only fine-tunes of one pre-trained backbone merge in weight space (`kind = \"ensemble\"` combines the outputs of any backbones)",
                entry.name,
                path.display()
            )));
        }
        let records = other.records.as_ref().map(|r| cx.exp.base.join(r)).unwrap_or_else(|| oexp.records_path());
        for &seed in seeds {
            match find_run(&oexp, &records, &other.strategy, seed)? {
                Some(run) => runs.push((Some((oexp.clone(), path.clone())), run)),
                None => return Ok(Err(missing_run(&path, &records, &other.strategy, seed))),
            }
        }
    }
    Ok(Ok(runs))
}

fn merge_one(cx: &MergeContext, entry: &MergeEntry, seeds: &[u64], outputs: &mut crate::ensemble::Outputs) -> Result<Option<String>> {
    let seed = seeds[0];
    let rule = MergeRule::from_table(&entry.rule)?;
    let runs = match runs_of(cx, entry, seeds, !matches!(rule, MergeRule::Ensemble(_)))? {
        Ok(runs) => runs,
        // Two experiments merging each other's runs each run first without the other's.
        Err(why) => {
            eprintln!("merge {} seed {seed}: skipped for now, {why}", entry.name);
            return Ok(None);
        }
    };
    let mut written = serde_json::to_value(entry).unwrap_or_default();
    written["rule"] = with_defaults(&rule);
    let config = serde_json::json!({
        "merge": written, "seeds": seeds, "runs": runs.iter().map(|(_, r)| &r.record.key).collect::<Vec<_>>(),
        "backbone": serde_json::to_value(&cx.exp.backbone).unwrap_or_default(),
        "data": serde_json::to_value(&cx.exp.data).unwrap_or_default(), "full": cx.full,
    });
    let key = run_key(&config);
    let label = format!("merge {} seed {seed}", entry.name);
    if cx.done.contains_key(key.as_str()) {
        eprintln!("{label}: already recorded in {}, skipped", cx.records.display());
        return Ok(Some(key));
    }
    if let MergeRule::Ensemble(ensemble) = &rule {
        let made = crate::ensemble::Made { key: key.clone(), config, label, seed };
        crate::ensemble::run(cx, entry, ensemble, &runs, made, outputs)?;
        return Ok(Some(key));
    }
    reset_peak_rss();
    let started = Instant::now();
    let needs = rule.needs();
    let classes = cx.data.classes.len() as i64;
    // The pre-trained weights with the head every run of this seed started from.
    tch::manual_seed(seed as i64);
    let (target, backbone_desc) = build_model(cx.exp, classes, cx.device)?;
    let head = format!("{}.", target.head.site().path);
    let cross_task = !entry.with.is_empty();
    let keep_out = |w: &mut Weights| {
        if cross_task {
            w.retain(|k, _| !k.starts_with(&head));
        }
    };
    let mut base = state(&target);
    keep_out(&mut base);
    let mut ingredients = Vec::new();
    let mut own_head = Weights::new();
    let mut other_data: HashMap<PathBuf, Data> = HashMap::new();
    for (other, run) in &runs {
        let (exp, data) = match other {
            None => (cx.exp, cx.data),
            Some((oexp, path)) => {
                if !other_data.contains_key(path) {
                    other_data.insert(path.clone(), load_data(oexp, image_preset(oexp)?.as_ref(), cx.full)?);
                }
                (oexp, &other_data[path])
            }
        };
        let name = match other {
            None => format!("{} seed {}", run.record.strategy, run.record.seed),
            Some((oexp, _)) => format!("{} seed {} of {}", run.record.strategy, run.record.seed, oexp.name),
        };
        eprintln!("{label}: reading {name}");
        let model = restored(exp, cx.registry, run, data.classes.len() as i64, cx.device)?;
        let mut fisher = needs.fisher.map(|n| fisher::diagonal(&model, &data.train, n, seed)).transpose()?;
        let mut grams = needs.grams.map(|n| regmean::grams(&model, &data.train, n, cx.exp.train.eval_batch_size)).transpose()?;
        let mut weights = state(&model);
        // This task's head, from its first run, when other tasks' heads are left out.
        if cross_task && other.is_none() && own_head.is_empty() {
            own_head = weights.iter().filter(|(k, _)| k.starts_with(&head)).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        }
        keep_out(&mut weights);
        fisher.iter_mut().chain(grams.iter_mut()).for_each(keep_out);
        ingredients.push(Ingredient { label: name, weights, fisher, grams });
    }
    let names: Vec<String> = ingredients.iter().map(|i| i.label.clone()).collect();
    let models: Vec<Weights> = ingredients.iter().map(|i| shallow(&i.weights)).collect();
    check_compatible(&names, &models, needs.base.then_some(&base))?;
    let spec = needs.permutations.then(|| rebasin::PermutationSpec::chain(&target)).transpose()?;
    let fishers: Vec<Weights> = ingredients.iter().filter_map(|i| i.fisher.as_ref().map(shallow)).collect();
    let grams: Vec<Weights> = ingredients.iter().filter_map(|i| i.grams.as_ref().map(shallow)).collect();
    let inputs = MergeInputs { base: &base, models: &models, fishers: &fishers, grams: &grams, permutations: spec.as_ref(), seed };
    let batch = cx.exp.train.eval_batch_size;
    // Writes a merged state into the model, with this task's head and, if asked, BatchNorm statistics.
    let install = |w: &Weights| -> Result<()> {
        load(&target, w)?;
        load(&target, &own_head)?;
        if let Some(n) = entry.reset_batchnorm {
            batchnorm::reestimate(&target, &cx.data.train, n, batch)?;
        }
        Ok(())
    };
    let val_top1 = |w: &Weights| {
        install(w)?;
        Ok(train::evaluate(&target, &[], &cx.data.val, batch, Compute::Fp32)?.top1())
    };
    let (merged, chosen) = rule.merge(&inputs, val_top1)?;
    install(&merged)?;
    let merge_seconds = started.elapsed().as_secs_f64();
    let mut summary = serde_json::json!({ "rule": rule.name(), "runs": names, "chosen": chosen });
    if let (MergeRule::Rebasin { max_iters }, [a, b], Some(spec)) = (&rule, models.as_slice(), &spec) {
        let (aligned, _) = align(spec, a, b, *max_iters, seed)?;
        summary["barrier"] = serde_json::json!({
            "naive": barrier(a, b, &install, &target, &cx.data.test, batch)?,
            "aligned": barrier(a, &aligned, &install, &target, &cx.data.test, batch)?,
        });
        install(&merged)?;
    }
    let scores = Scores::of(&target, &[], &cx.data.test, &cx.data.ood, &cx.data.test, cx.source, batch, Compute::Fp32)?;
    let artifact = artifact_path(cx.artifacts, &entry.name, seed);
    let artifact_bytes = zhijian_core::save_atomic(&target.vs.variables().into_iter().collect::<Vec<_>>(), &artifact)?;
    let record = scores.into_record(Record {
        total_params: target.num_params(),
        train_seconds: merge_seconds,
        train_samples_per_s: f64::NAN,
        final_loss: f64::NAN,
        artifact_bytes,
        summaries: [("merge".to_string(), summary)].into_iter().collect(),
        ..cx.record(&entry.name, seed, key.clone(), config, &rule, backbone_desc)
    });
    append_record(cx.records, &record)?;
    eprintln!(
        "{label}: {} of {} models, test top-1 {:.2}% in {merge_seconds:.1} s, record appended to {}",
        rule.name(),
        models.len(),
        100.0 * record.test_top1,
        cx.records.display()
    );
    Ok(Some(key))
}

/// The rule as a `rule` table with every setting: `kind`, then the settings
/// with their defaults filled in (what the run key hashes).
pub(crate) fn with_defaults(rule: &MergeRule) -> serde_json::Value {
    let mut table = serde_json::Map::new();
    if let serde_json::Value::Object(tagged) = serde_json::to_value(rule).unwrap_or_default() {
        for (kind, settings) in tagged {
            table.insert("kind".into(), kind.into());
            if let serde_json::Value::Object(settings) = settings {
                table.extend(settings);
            }
        }
    }
    serde_json::Value::Object(table)
}

/// A recorded run rebuilt as it trained: its backbone, its methods prepared
/// with its seed and restored from its artifact, folded into the weights.
fn restored(exp: &Experiment, registry: &Registry, run: &RecordedRun, classes: i64, device: Device) -> Result<Model> {
    let (model, mut methods) = rebuilt(exp, registry, run, classes, device)?;
    fold(&model, &mut methods, &run.record.strategy)?;
    Ok(model)
}

/// A recorded run rebuilt as it trained and restored from its artifact, its
/// methods beside the backbone (what an ensemble runs).
pub(crate) fn rebuilt(exp: &Experiment, registry: &Registry, run: &RecordedRun, classes: i64, device: Device) -> Result<(Model, Vec<Box<dyn Method>>)> {
    let (model, _) = build_model(exp, classes, device)?;
    let entries: Vec<toml::Table> = serde_json::from_value(run.record.methods.clone())
        .map_err(|e| Error::Config(format!("{} seed {}: the run's methods do not parse: {e}", run.record.strategy, run.record.seed)))?;
    let mut methods = entries.iter().map(|m| registry.build(m)).collect::<Result<Vec<_>>>()?;
    crate::class_text::for_restore(exp, classes, &mut methods)?;
    train::prepare(&model, &mut methods, run.record.seed)?;
    train::restore(&model, &methods, &run.artifact)?;
    Ok((model, methods))
}

/// Folds each method into the backbone's weights, or refuses a method whose
/// effect would be lost (it changes the forward pass or keeps weights of its own).
fn fold(model: &Model, methods: &mut [Box<dyn Method>], strategy: &str) -> Result<()> {
    for m in methods.iter_mut() {
        if m.can_merge() {
            m.merge(model)?;
            continue;
        }
        let keeps_weights = m.var_store().is_some_and(|vs| vs.variables().keys().any(|n| !m.training_only(n)));
        if m.alters_forward() || keeps_weights {
            return Err(Error::Config(format!(
                "strategy `{strategy}`: `{}` keeps its effect outside the backbone's weights and cannot fold it in, so its runs cannot be merged (runs of full fine-tuning, LoRA and the other methods that merge can)",
                m.name()
            )));
        }
    }
    Ok(())
}

/// A copy of every tensor of `model`, detached.
fn state(model: &Model) -> Weights {
    tch::no_grad(|| model.vs.variables().into_iter().map(|(k, t)| (k, t.detach().copy())).collect())
}

/// Shallow copies of `w`'s tensors.
fn shallow(w: &Weights) -> Weights {
    w.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
}

/// Writes `w` into `model`'s tensors of the same names.
fn load(model: &Model, w: &Weights) -> Result<()> {
    let vars = model.vs.variables();
    tch::no_grad(|| {
        for (k, t) in w {
            let v = vars.get(k).ok_or_else(|| Error::Config(format!("merged weights hold `{k}`, which the model does not have")))?;
            v.shallow_clone().copy_(t);
        }
        Ok(())
    })
}

/// Test loss and accuracy along the straight path (1 − α) a + α b, α = 0, 0.1, …, 1,
/// and the loss barrier: the largest rise above the line between the two ends.
fn barrier(a: &Weights, b: &Weights, install: &dyn Fn(&Weights) -> Result<()>, model: &Model, test: &Split, batch: i64) -> Result<serde_json::Value> {
    let alphas: Vec<f64> = (0..=10).map(|i| f64::from(i) / 10.0).collect();
    let (mut losses, mut accuracies) = (Vec::new(), Vec::new());
    for &alpha in &alphas {
        let point: Weights = tch::no_grad(|| a.iter().map(|(k, t)| (k.clone(), t * (1.0 - alpha) + &b[k] * alpha)).collect());
        install(&point)?;
        let logits = train::predict(model, &[], &test.input, batch, Compute::Fp32)?;
        losses.push(logits.cross_entropy_for_logits(&test.labels.to_device(logits.device())).double_value(&[]));
        accuracies.push(zhijian_core::Accuracy::from_logits(&logits, &test.labels).top1());
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    let rise = alphas.iter().zip(&losses).map(|(&al, &l)| l - ((1.0 - al) * first + al * last)).fold(f64::MIN, f64::max);
    Ok(serde_json::json!({ "alpha": alphas, "loss": losses, "top1": accuracies, "loss_barrier": rise }))
}
