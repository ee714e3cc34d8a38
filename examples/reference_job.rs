//! zhijian's side of `cargo xtask reference`, which runs the same training
//! jobs here and in PyTorch + transformers + peft (`benches/reference/peft_job.py`)
//! and compares speed, memory, accuracy and model FLOP/s.
//!
//! ```text
//! reference_job prepare --steps N | --full --out FILE [--config configs/demo.toml]
//! reference_job job --method linear_probe|full_finetune|lora [--precision fp32|bf16] [--epochs E] [--group-by-length] [--torch-dropout] --data FILE --out JSON
//! reference_job ceiling --out JSON
//! ```
//!
//! `prepare` loads Rotten Tomatoes through zhijian's own data path with the
//! experiment's split and tokeniser (a stratified subset of `N × batch`
//! training reviews, as `train_limit` makes it, and the whole test split) and
//! writes one safetensors file both sides read: the tokens (`train.ids`,
//! `train.mask`, `train.labels`, `test.*`), the initial head and LoRA matrices
//! (`init/head.*`, `init/lora/<site>.lora_A|B`, made as a zhijian run with the
//! experiment's seed makes them) and, in its metadata (`plan`), the
//! hyper-parameters of the experiment's `full_finetune` and `lora` strategies
//! as zhijian parsed them, with one epoch. `--full` takes the whole training
//! split instead (the time-to-accuracy jobs).
//!
//! `job --epochs E` trains E epochs and evaluates the test split after each
//! (the `curve`: training seconds against test top-1); `--group-by-length`
//! batches reviews of similar length together (`train.group_by_length`);
//! `--torch-dropout` draws LibTorch's dropout masks (`train.dropout_masks =
//! "torch"`), the ones PyTorch draws after the same seed, so the two sides'
//! losses agree step by step (zhijian's default masks are cheaper, and only
//! equal in distribution). `linear_probe` runs the frozen backbone once over both splits (in the
//! job's precision; that time is part of its training time) and trains the
//! head on the features.
//!
//! `job` trains MiniLM with its real weights through zhijian's engine for that
//! one epoch (`N` steps), evaluates test top-1 and writes JSON: training
//! samples/s, seconds, peak RSS, accuracy, trainable parameters, tokens
//! computed (batch rows × padded length, summed) and model FLOPs.
//!
//! `ceiling` measures achievable matmul FLOP/s through tch in fp32 and bf16.
//!
//! # Model FLOPs
//!
//! One convention, identical in `peft_job.py` and the README: a matmul of
//! `[m, k]` by `[k, n]` costs `2mkn`; its backward costs `2mkn` for the input
//! gradient, plus `2mkn` for the weight gradient when the weight trains. Per
//! batch of `rows` sequences padded to `seq` tokens (`T = rows · seq`):
//!
//! ```text
//! 2 T (2 P_frozen + 3 P_trained) + 12 L h rows seq² + 6 h C rows
//! ```
//!
//! with `P` the weights of the per-token linear layers (full fine-tuning: the
//! encoder's `L (4h² + 2h·i)`, all trained; LoRA: those frozen, the adapters'
//! `A` and `B` trained), attention's two matmuls (`QKᵀ`, `AV`: `4 L h seq²`
//! per sequence forward, twice that backward, both operands needing gradients)
//! and the head (`C` classes). Input gradients are counted for every layer;
//! autograd skips a few of them in LoRA (the first layer's frozen
//! projections), which `peft_job.py flops-check` measures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, View};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};
use zhijian::backbones::{BertConfig, Pooling};
use zhijian::bench::build::{asset, build_model};
use zhijian::bench::data::load_data;
use zhijian::bench::{BackboneConfig, DataConfig, Experiment};
use zhijian::core::metrics::peak_rss_bytes;
use zhijian::core::train::{self, TrainOptions};
use zhijian::core::weights::{read_safetensors, tmp_sibling};
use zhijian::core::{Compute, DropoutMasks, Input, Method, Precision, Split, TrainConfig};

const USAGE: &str = "\
usage: reference_job prepare --steps N | --full --out FILE [--config configs/demo.toml]
       reference_job job --method linear_probe|full_finetune|lora [--precision fp32|bf16] [--epochs E] [--group-by-length] [--torch-dropout] --data FILE --out JSON
       reference_job ceiling --out JSON";

/// The methods both sides run, by the name of their (only) method entry.
const METHODS: [&str; 3] = ["linear_probe", "full_finetune", "lora"];

fn main() {
    if let Err(e) = run() {
        // The chain, not anyhow's Debug form: that adds a backtrace whenever RUST_BACKTRACE is set.
        eprintln!("reference_job: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        bail!("no command given\n{USAGE}");
    }
    let command = args.remove(0);
    match command.as_str() {
        "prepare" => {
            let full = args.iter().position(|a| a == "--full").map(|i| args.remove(i)).is_some();
            let steps = match flag(&mut args, "--steps")? {
                Some(n) if !full => Some(n.parse::<usize>().context("--steps takes a number")?),
                None if full => None,
                _ => bail!("give either --steps N or --full\n{USAGE}"),
            };
            let out = PathBuf::from(required(&mut args, "--out")?);
            let config = PathBuf::from(flag(&mut args, "--config")?.unwrap_or_else(|| "configs/demo.toml".into()));
            no_more(&args)?;
            prepare(&config, steps, &out)
        }
        "job" => {
            let method = required(&mut args, "--method")?;
            let precision = flag(&mut args, "--precision")?.unwrap_or_else(|| "fp32".into());
            let epochs = flag(&mut args, "--epochs")?.map(|e| e.parse::<usize>().context("--epochs takes a number")).transpose()?;
            let group_by_length = args.iter().position(|a| a == "--group-by-length").map(|i| args.remove(i)).is_some();
            let torch_dropout = args.iter().position(|a| a == "--torch-dropout").map(|i| args.remove(i)).is_some();
            let data = PathBuf::from(required(&mut args, "--data")?);
            let out = PathBuf::from(required(&mut args, "--out")?);
            no_more(&args)?;
            if !METHODS.contains(&method.as_str()) {
                bail!("--method must be one of {METHODS:?}, got `{method}`");
            }
            let precision = match precision.as_str() {
                "fp32" => Precision::Fp32,
                "bf16" => Precision::Bf16,
                other => bail!("--precision must be fp32 or bf16, got `{other}`"),
            };
            let masks = if torch_dropout { DropoutMasks::Torch } else { DropoutMasks::Fast };
            job(&method, precision, epochs, group_by_length, masks, &data, &out)
        }
        "ceiling" => {
            let out = PathBuf::from(required(&mut args, "--out")?);
            no_more(&args)?;
            ceiling(&out)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// Removes `name VALUE` from `args` and returns the value.
fn flag(args: &mut Vec<String>, name: &str) -> Result<Option<String>> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(None) };
    if i + 1 >= args.len() {
        bail!("{name} needs a value\n{USAGE}");
    }
    let value = args.remove(i + 1);
    args.remove(i);
    Ok(Some(value))
}

fn required(args: &mut Vec<String>, name: &str) -> Result<String> {
    flag(args, name)?.with_context(|| format!("{name} is required\n{USAGE}"))
}

fn no_more(args: &[String]) -> Result<()> {
    match args.first() {
        Some(extra) => bail!("unexpected argument `{extra}`\n{USAGE}"),
        None => Ok(()),
    }
}

/// Writes `value` as pretty JSON to `path` atomically (temporary file, then rename).
fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// A CPU tensor's bytes, as the safetensors writer takes them.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn new(t: &Tensor) -> Result<Raw> {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Int64 => Dtype::I64,
            Kind::Float => Dtype::F32,
            other => bail!("cannot store a {other:?} tensor"),
        };
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        Ok(Raw { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The token tensors of a split: `(ids, mask, labels)`.
fn tokens(split: &Split) -> Result<(&Tensor, &Tensor, &Tensor)> {
    match &split.input {
        Input::Tokens { ids, mask } => Ok((ids, mask, &split.labels)),
        _ => bail!("split `{}` does not hold tokens", split.name),
    }
}

/// The experiment's strategy whose only method is `method`.
fn strategy<'a>(exp: &'a Experiment, method: &str) -> Result<&'a zhijian::bench::Strategy> {
    exp.strategies
        .iter()
        .find(|s| s.methods.len() == 1 && s.methods[0].get("method").and_then(|m| m.as_str()) == Some(method))
        .with_context(|| format!("experiment `{}` has no strategy whose only method is `{method}`", exp.name))
}

/// Writes the data file: `steps` batches of training reviews (a stratified
/// subset), or the whole training split when `steps` is `None`.
fn prepare(config: &Path, steps: Option<usize>, out: &Path) -> Result<()> {
    let registry = zhijian::bench::registry();
    // Absolute, so the jobs find it from any folder.
    let config = &config.canonicalize().with_context(|| format!("no experiment file {}", config.display()))?;
    let mut exp = Experiment::load(config, &registry)?;
    let BackboneConfig::Bert { weights, pooling, layers: None } = exp.backbone.clone() else {
        bail!("{}: the reference jobs need a whole `bert` backbone (no `layers`)", config.display());
    };
    if pooling != Pooling::Mean {
        bail!("{}: the reference jobs use mean pooling (PyTorch's side does too)", config.display());
    }
    let batch = exp.train.batch_size as usize;
    let wanted = steps.map(|s| s.checked_mul(batch).filter(|&n| n > 0).context("--steps must be at least 1")).transpose()?;
    let max_len = match &mut exp.data {
        DataConfig::RottenTomatoes { train_limit, max_len, .. } => {
            *train_limit = wanted;
            *max_len
        }
        other => bail!("{}: the reference jobs need `rotten_tomatoes` data, not `{}`", config.display(), other.name()),
    };
    let seed = *exp.seeds.first().context("the experiment has no seed")?;
    let data = load_data(&exp, None, false)?;
    eprintln!("prepare: {}", data.describe(exp.data.name()));
    let steps = steps.unwrap_or_else(|| (data.train.len() as usize).div_ceil(batch));
    if let Some(wanted) = wanted.filter(|&w| data.train.len() as usize != w) {
        bail!(
            "{steps} steps of {batch} need {wanted} training reviews, but the training split has {}: at most {} steps",
            data.train.len(),
            data.train.len() as usize / batch
        );
    }

    // The starting point of both sides: what a zhijian run with this seed makes
    // (the runner seeds before building the model; `prepare` seeds the methods).
    tch::manual_seed(seed as i64);
    let (model, _) = build_model(&exp, data.classes.len() as i64, Device::Cpu)?;
    let lora = strategy(&exp, "lora")?;
    let mut methods: Vec<Box<dyn Method>> = lora.methods.iter().map(|m| registry.build(m)).collect::<zhijian::core::Result<_>>()?;
    train::prepare(&model, &mut methods, seed)?;
    let init = train::trainable(&model, &methods);
    let sites: Vec<String> = init.iter().filter_map(|(n, _)| n.strip_prefix("lora/").and_then(|s| s.strip_suffix(".lora_A")).map(String::from)).collect();
    let adapter_params: i64 = init.iter().filter(|(n, _)| n.starts_with("lora/")).map(|(_, t)| t.numel() as i64).sum();

    let mut jobs = serde_json::Map::new();
    for method in METHODS {
        let s = strategy(&exp, method)?;
        let cfg = TrainConfig { epochs: 1, max_steps: 0, seed, ..s.train_config(&exp.train)? };
        cfg.validate()?;
        // Each entry with every field at its value (defaults filled in), as the method parsed it.
        let entries: Vec<Value> = s
            .methods
            .iter()
            .map(|m| {
                let mut table = registry.build(m)?.config();
                table.insert("method".into(), toml::Value::String(method.into()));
                Ok(serde_json::to_value(table)?)
            })
            .collect::<Result<_>>()?;
        let mut job = json!({ "strategy": s.name, "methods": entries, "train": cfg });
        if method == "lora" {
            job["lora_sites"] = json!(sites);
            job["adapter_params"] = json!(adapter_params);
        }
        jobs.insert(method.into(), job);
    }
    let bert = BertConfig::from_json(&asset(&weights, "config.json")?)?;
    let plan = json!({
        "format": "zhijian-reference/1",
        "config": config,
        "experiment": exp.name,
        "backbone": exp.backbone,
        "weights": {
            "asset": weights,
            "config": asset(&weights, "config.json")?,
            "model": asset(&weights, "model.safetensors")?,
        },
        "bert": bert,
        "pooling": pooling,
        "classes": data.classes,
        "steps": steps,
        "batch_size": batch,
        "max_len": max_len,
        "seed": seed,
        "train_examples": data.train.len(),
        "test_examples": data.test.len(),
        "jobs": jobs,
    });

    let (ids, mask, labels) = tokens(&data.train)?;
    let (test_ids, test_mask, test_labels) = tokens(&data.test)?;
    let mut tensors: Vec<(String, Raw)> = vec![
        ("train.ids".into(), Raw::new(ids)?),
        ("train.mask".into(), Raw::new(mask)?),
        ("train.labels".into(), Raw::new(labels)?),
        ("test.ids".into(), Raw::new(test_ids)?),
        ("test.mask".into(), Raw::new(test_mask)?),
        ("test.labels".into(), Raw::new(test_labels)?),
    ];
    for (name, t) in &init {
        tensors.push((format!("init/{name}"), Raw::new(t)?));
    }
    let metadata = HashMap::from([("plan".to_string(), serde_json::to_string(&plan)?)]);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = tmp_sibling(out);
    safetensors::tensor::serialize_to_file(tensors.iter().map(|(n, r)| (n.as_str(), r)), &Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    eprintln!(
        "prepare: {} training reviews ({steps} steps of {batch}), {} test reviews, {} LoRA sites → {}",
        data.train.len(),
        data.test.len(),
        sites.len(),
        out.display()
    );
    Ok(())
}

/// The tensors of a prepared file and its plan.
fn read_prepared(path: &Path) -> Result<(HashMap<String, Tensor>, Value)> {
    if !path.is_file() {
        bail!("no data file {}; make it with `reference_job prepare --steps N --out {}`", path.display(), path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let plan = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("plan"))
        .with_context(|| format!("{} has no plan in its metadata; was it written by `reference_job prepare`?", path.display()))?;
    let plan: Value = serde_json::from_str(plan).context("parsing the plan")?;
    Ok((read_safetensors(path)?.into_iter().collect(), plan))
}

/// Model FLOPs of one training step on `rows` sequences padded to `seq`
/// tokens, by the convention of this file's header (the same formula as
/// `train_flops` in `peft_job.py`). `adapter_params` is `None` for full
/// fine-tuning, else the number of LoRA parameters (all trained, the encoder frozen).
fn train_flops(bert: &BertConfig, classes: i64, adapter_params: Option<i64>, rows: i64, seq: i64) -> i64 {
    let (layers, h, inter) = (bert.num_hidden_layers as i64, bert.hidden_size, bert.intermediate_size);
    let encoder = layers * (4 * h * h + 2 * h * inter);
    let (frozen, trained) = match adapter_params {
        None => (0, encoder),
        Some(adapters) => (encoder, adapters),
    };
    let tokens = rows * seq;
    2 * tokens * (2 * frozen + 3 * trained) + 12 * layers * h * rows * seq * seq + 6 * h * classes * rows
}

/// Trains `method` on the prepared data (for `epochs`, else the plan's one);
/// `bf16` computes training and the test evaluation in bf16, as the PyTorch
/// side's autocast does.
fn job(method: &str, precision: Precision, epochs: Option<usize>, group_by_length: bool, masks: DropoutMasks, data: &Path, out: &Path) -> Result<()> {
    let (tensors, plan) = read_prepared(data)?;
    let get = |name: &str| tensors.get(name).map(Tensor::shallow_clone).with_context(|| format!("{} lacks tensor `{name}`", data.display()));
    let jp = &plan["jobs"][method];
    let mut cfg: TrainConfig = serde_json::from_value(jp["train"].clone()).context("the plan's train config")?;
    (cfg.precision, cfg.eval_precision) = (precision, precision);
    cfg.epochs = epochs.unwrap_or(cfg.epochs);
    cfg.group_by_length = group_by_length;
    cfg.dropout_masks = masks;
    let (compute, _) = precision.resolve(Device::Cpu);
    let precision_name = if compute == Compute::Bf16 { "bf16" } else { "fp32" };
    let registry = zhijian::bench::registry();
    let config = PathBuf::from(plan["config"].as_str().context("the plan names no config")?);
    let exp = Experiment::load(&config, &registry)?;
    if serde_json::to_value(&exp.backbone)? != plan["backbone"] {
        bail!("{}'s backbone changed since {} was prepared; prepare it again", config.display(), data.display());
    }
    let classes = plan["classes"].as_array().context("the plan lists no classes")?.len() as i64;

    tch::manual_seed(cfg.seed as i64);
    let (model, desc) = build_model(&exp, classes, Device::Cpu)?;
    let entries: Vec<toml::Table> = serde_json::from_value(jp["methods"].clone()).context("the plan's method entries")?;
    let mut methods: Vec<Box<dyn Method>> = entries.iter().map(|m| registry.build(m)).collect::<zhijian::core::Result<_>>()?;
    train::prepare(&model, &mut methods, cfg.seed)?;
    // Start where PyTorch's side starts (this is what `prepare` made with the same seed).
    let trainable = train::trainable(&model, &methods);
    tch::no_grad(|| -> Result<()> {
        for (name, t) in &trainable {
            if let Some(init) = tensors.get(&format!("init/{name}")) {
                t.shallow_clone().copy_(init);
            } else if name.starts_with("head.") || name.starts_with("lora/") {
                bail!("{} has no initial value for `{name}`", data.display());
            }
        }
        Ok(())
    })?;

    let train_split = Split { name: "train".into(), input: Input::Tokens { ids: get("train.ids")?, mask: get("train.mask")? }, labels: get("train.labels")? };
    let test = Split { name: "test".into(), input: Input::Tokens { ids: get("test.ids")?, mask: get("test.mask")? }, labels: get("test.labels")? };
    let label = format!("zhijian {method} {precision_name}");
    eprintln!("{label}: {desc}, {} training reviews, {} threads", train_split.len(), tch::get_num_threads());
    let start = std::time::Instant::now();
    // The probe's frozen backbone runs once over both splits; the head then
    // trains on the features (what the harness does with its feature cache).
    let (train_split, test) = if method == "linear_probe" {
        let features = |s: &Split| train::cache_features(&model, s, cfg.eval_batch_size, compute, &label);
        (features(&train_split)?, features(&test)?)
    } else {
        (train_split, test)
    };
    let feature_seconds = start.elapsed().as_secs_f64();
    // With several epochs the test split is evaluated after each (not timed as training).
    let val = (cfg.epochs > 1).then_some(&test);
    let report = train::train(&model, &mut methods, &train_split, val, &cfg, &TrainOptions { label: label.clone(), ..Default::default() })?;
    let accuracy = train::evaluate(&model, &methods, &test, cfg.eval_batch_size, compute)?;
    let curve: Vec<Value> = report
        .epoch_seconds
        .iter()
        .zip(&report.val_top1)
        .enumerate()
        .map(|(i, (s, top1))| json!({ "epoch": i + 1, "seconds": feature_seconds + s, "test_top1": top1 }))
        .collect();

    // The batches the engine made: `randperm` right after seeding, consecutive
    // chunks of it, each trimmed to its longest real sequence (`Input::select`).
    tch::manual_seed(cfg.seed as i64);
    let order = Tensor::randperm(train_split.len(), (Kind::Int64, Device::Cpu));
    let mask = get("train.mask")?;
    let bert: BertConfig = serde_json::from_value(plan["bert"].clone()).context("the plan's bert config")?;
    let adapters = (method == "lora").then(|| jp["adapter_params"].as_i64()).flatten();
    if method == "lora" && adapters.is_none() {
        bail!("the plan lacks lora adapter_params");
    }
    let (mut tokens_computed, mut flops) = (0i64, 0i64);
    // One epoch's batches in shuffled order: the reference jobs train one
    // (the time-to-accuracy jobs, several epochs or grouped batches, do not
    // report FLOPs). The probe's steps see features.
    let counted = cfg.epochs == 1 && !group_by_length && method != "linear_probe";
    for idx in train::batches(train_split.len(), cfg.batch_size).take(if counted { report.steps } else { 0 }) {
        let rows = mask.index_select(0, &order.index_select(0, &idx));
        let seq = rows.sum_dim_intlist(1, false, Kind::Int64).max().int64_value(&[]).max(1);
        let n = rows.size()[0];
        tokens_computed += n * seq;
        flops += train_flops(&bert, classes, adapters, n, seq);
    }
    let numel = |ts: &[(String, Tensor)]| ts.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    let value = json!({
        "side": "zhijian",
        "method": method,
        "precision": precision_name,
        "steps": report.steps,
        "samples": report.samples,
        "seconds": report.seconds,
        "feature_seconds": feature_seconds,
        "epochs": cfg.epochs,
        "group_by_length": group_by_length,
        "dropout_masks": masks,
        "curve": curve,
        "samples_per_s": report.samples_per_s(),
        "final_loss": report.final_loss,
        "test_top1": accuracy.top1(),
        "test_n": accuracy.n,
        "trainable_params": numel(&trainable),
        "total_params": model.num_params() + numel(&train::method_variables(&methods)),
        "tokens": counted.then_some(tokens_computed),
        "model_flops": counted.then_some(flops),
        "model_flops_per_s": counted.then(|| flops as f64 / report.seconds),
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": tch::get_num_threads(),
    });
    write_json(out, &value)?;
    eprintln!("{label}: {:.1} samples/s, test top-1 {:.2}%", report.samples_per_s(), 100.0 * accuracy.top1());
    Ok(())
}

/// Square sizes the ceiling is measured at.
const CEILING_SIZES: [i64; 4] = [512, 1024, 2048, 4096];

/// A size whose one matmul would take longer than this at the best rate so far
/// is skipped: without AVX-512 BF16 / AMX, bf16 matmuls take a slow path (~0.4
/// GFLOP/s on a Zen 3 core pair), where n = 4096 alone would take minutes.
const MAX_CALL_SECONDS: f64 = 10.0;

/// Best sustained FLOP/s of `n`×`n` matmuls of `kind`: three timed runs of at
/// least 0.4 s each, after a warm-up (as `matmul_rate` in `peft_job.py`).
fn matmul_rate(n: i64, kind: Kind) -> f64 {
    tch::manual_seed(0);
    let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu)).to_kind(kind);
    let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu)).to_kind(kind);
    for _ in 0..2 {
        let _ = a.matmul(&b);
    }
    let t = Instant::now();
    let _ = a.matmul(&b);
    let reps = (0.4 / t.elapsed().as_secs_f64().max(1e-6)).ceil().max(1.0) as usize;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b);
        }
        best = best.max(2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn ceiling(out: &Path) -> Result<()> {
    let mut value = json!({ "side": "zhijian", "threads": tch::get_num_threads(), "sizes": CEILING_SIZES });
    for (name, kind) in [("fp32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let mut rates: Vec<Option<f64>> = Vec::new();
        for &n in &CEILING_SIZES {
            let best = rates.iter().flatten().copied().reduce(f64::max);
            let too_slow = best.is_some_and(|r| 2.0 * (n as f64).powi(3) / r > MAX_CALL_SECONDS);
            rates.push((!too_slow).then(|| matmul_rate(n, kind)));
        }
        let shown: Vec<String> =
            CEILING_SIZES.iter().zip(&rates).map(|(n, r)| r.map_or(format!("n={n} skipped (too slow)"), |r| format!("n={n} {:.0}", r / 1e9))).collect();
        eprintln!("  zhijian (tch) {name}: {} GFLOP/s", shown.join(", "));
        value[name] = json!({ "by_size": rates, "best": rates.iter().flatten().copied().fold(0.0, f64::max) });
    }
    write_json(out, &value)
}
