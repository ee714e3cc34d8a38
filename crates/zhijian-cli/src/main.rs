//! The `zhijian` command: compare reuse strategies on real pre-trained models.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zhijian_bench::record::{merge_records, write_records};
use zhijian_bench::slurm::{ArrayJob, Resources, shell_quote};
use zhijian_bench::sweep::Axis;
use zhijian_bench::{CompareOptions, DeviceChoice, Experiment, Shard, table};

#[derive(Parser)]
#[command(name = "zhijian", version, about = "Reuse pre-trained models: compare reuse strategies under one protocol.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train and evaluate every strategy of an experiment file; print the table.
    ///
    /// Each finished run is appended to the records file at once (atomically);
    /// runs already recorded there are skipped, so an interrupted comparison resumes.
    /// Then the file's `[[merge]]` entries merge recorded runs in weight space,
    /// or ensemble their outputs (`kind = "ensemble"`, runs of any backbones),
    /// and record the results the same way (a merge whose runs are not all
    /// recorded yet waits for a later comparison, saying which).
    Compare {
        /// Experiment file, e.g. configs/demo.toml.
        config: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a grid of strategy variants: each combination of the values given
    /// by `--vary` becomes a strategy of its own; the experiment's other
    /// strategies run as baselines. Records, resuming, `--shard` and `--slurm` as for `compare`.
    Sweep {
        /// Experiment file, e.g. configs/demo.toml.
        config: PathBuf,
        /// An axis `STRATEGY.train.FIELD=V1,V2,…` or `STRATEGY.methods.I.FIELD=V1,V2,…`
        /// (STRATEGY may be `*`; values are TOML, a bare word a string), e.g.
        /// `--vary lora-r8.train.lr=1e-4,1e-3 --vary lora-r8.methods.0.rank=4,16`.
        #[arg(long = "vary", value_name = "AXIS", required = true, value_parser = check_axis)]
        axes: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Print the comparison table of one or more records files and write its
    /// plots (accuracy vs trainable parameters, vs train time, in- vs
    /// out-of-distribution; PNG and SVG).
    ///
    /// Several files (the shards of a comparison) are merged into one record
    /// per run (per key): a record repeated with the same results is a
    /// duplicate and dropped, a failed run retried and finished keeps the
    /// finished record, and a run recorded with different results is a
    /// conflict: each is named, and the command fails unless `--keep-first`.
    Report {
        /// Records files (JSONL) written by `compare` or `sweep`; each must exist.
        #[arg(required = true, value_name = "RECORDS")]
        records: Vec<PathBuf>,
        /// Only this experiment's records.
        #[arg(long)]
        experiment: Option<String>,
        /// Folder for the plots; default `plots/` beside `--out`, else beside the first records file.
        #[arg(long)]
        plots: Option<PathBuf>,
        /// Write the merged records (of `--experiment`, when given) to this JSONL
        /// file, atomically. An existing file is only replaced when it is one of
        /// the records files read, so no run in it is lost.
        #[arg(long, value_name = "MERGED")]
        out: Option<PathBuf>,
        /// On a conflict keep the record read first (files in the order given)
        /// instead of failing.
        #[arg(long)]
        keep_first: bool,
    },
    /// List the registered reuse methods.
    Methods,
    /// List the named backbones (`arch.tag`, as timm names them; a bare
    /// architecture is random init): kind, parameters (with the pre-training
    /// head where the weights have one), whether the weights are fetched,
    /// source and license.
    ///
    /// An experiment uses one with `[backbone]` `kind = "preset"`,
    /// `name = "efficientnet_lite0.in1k"`; a `bert` backbone's `weights` may
    /// also name a text preset.
    Presets,
    /// Convert a PyTorch checkpoint (.pth/.pt, legacy or zip layout) to safetensors.
    ///
    /// Reads the pickle without Python and without running anything in it; only
    /// tensors, parameters and (nested) dicts are read, and nested keys are joined
    /// with dots (`state_dict.layer.weight`). Entries that are not tensors (an epoch
    /// counter, a config) are left out and listed. The output is written atomically.
    Convert {
        /// The PyTorch checkpoint to read.
        input: PathBuf,
        /// The safetensors file to write (its folder is created if needed).
        output: PathBuf,
    },
    /// Rank candidate backbones (layers, input sizes) for a task by transferability
    /// scores of their frozen features on its training split (LogME, LEEP, NCE,
    /// H-score, GBC, TransRate), before any fine-tuning; print the table and
    /// Kendall's τ-b of each score against the candidates' accuracies.
    Rank {
        /// Rank file, e.g. configs/rank/lite0-mnist.toml.
        config: PathBuf,
        /// Device: cpu, cuda or auto; default: the file's `device`.
        #[arg(long, value_parser = parse_device)]
        device: Option<DeviceChoice>,
        /// Lift the data's `train_limit` and `eval_limit`.
        #[arg(long)]
        full: bool,
        /// Also write the table (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Download and verify assets (weights, data sets) into the cache.
    Fetch {
        /// Asset names (see `datasets/`); none with --all.
        names: Vec<String>,
        /// Fetch every asset.
        #[arg(long)]
        all: bool,
    },
    /// Write a finished run's adapter in Hugging Face PEFT's layout, for
    /// `peft.PeftModel.from_pretrained(BertModel.from_pretrained(BASE), DIR)`.
    ///
    /// The run is named by its records file, strategy and seed; its tensors are
    /// read from `artifacts/<experiment>/<strategy>-seed<K>.safetensors` beside
    /// the records file, where `compare` saved them. DIR receives
    /// `adapter_config.json` and `adapter_model.safetensors` (PEFT's, task type
    /// FEATURE_EXTRACTION on a BertModel), and `zhijian_head.safetensors`
    /// (`weight`, `bias`) with `zhijian_head.json` (the pooling): the run's
    /// classifier over pooled features, which PEFT does not read. Supported:
    /// a strategy whose only method is `lora` (DoRA, rsLoRA, rank/alpha
    /// patterns) or `ia3`, on a bert backbone; anything else is refused.
    /// scripts/peft_parity.py checks the logits against zhijian's.
    Export {
        /// Records file (JSONL) written by `compare` or `sweep`.
        records: PathBuf,
        /// The run's strategy name.
        #[arg(long)]
        strategy: String,
        /// The run's seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The run's experiment, when the records file holds several with this strategy and seed.
        #[arg(long)]
        experiment: Option<String>,
        /// Read the run's tensors from this artifact instead.
        #[arg(long, value_name = "FILE")]
        artifact: Option<PathBuf>,
        /// Folder to write the PEFT adapter into (created if needed; each file written atomically).
        #[arg(long, value_name = "DIR")]
        peft: PathBuf,
    },
    /// Turn a PEFT LoRA or IA3 adapter folder into a zhijian artifact and print
    /// the method entry (TOML) that creates matching parameters.
    ///
    /// Every tensor of `adapter_model.safetensors` must match a layer of the
    /// backbone (those that do not are listed); `zhijian_head.safetensors`,
    /// when present (folders written by `zhijian export`), becomes the head.
    /// The artifact loads with `zhijian_core::train::restore` into a model
    /// prepared with the printed method.
    Import {
        /// The PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
        #[arg(long, value_name = "DIR")]
        peft: PathBuf,
        /// The artifact (safetensors) to write, atomically.
        #[arg(long, value_name = "ARTIFACT")]
        out: PathBuf,
        /// The backbone asset (e.g. all-minilm-l6-v2); default: the asset whose
        /// Hugging Face name is the adapter's `base_model_name_or_path`.
        #[arg(long, value_name = "ASSET")]
        backbone: Option<String>,
    },
}

/// Options shared by `compare` and `sweep`.
#[derive(clap::Args)]
struct RunArgs {
    /// Use the whole data set: lift the data's `train_limit` and `eval_limit`.
    #[arg(long)]
    full: bool,
    /// Records file (JSONL); default: the experiment's `records`.
    #[arg(long)]
    records: Option<PathBuf>,
    /// Device: cpu, cuda or auto; default: the experiment's `device`.
    #[arg(long, value_parser = parse_device)]
    device: Option<DeviceChoice>,
    /// Run only slice I of N of the seed × strategy grid (run k belongs to
    /// slice k mod N), e.g. `--shard 0/2` here and `--shard 1/2` elsewhere,
    /// each with its own `--records`; `zhijian report` merges the files. No
    /// plots are drawn for a slice, and `[[merge]]` entries wait for an
    /// unsharded comparison.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<Shard>,
    /// Seeds to run instead of the experiment's, e.g. `--seeds 0,1,2`.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Run only these strategies, e.g. `--strategies full-finetune,lora`; their
    /// records are the ones the whole comparison would write, so it skips them later.
    #[arg(long, value_delimiter = ',')]
    strategies: Option<Vec<String>>,
    /// Do not read or write the frozen-backbone feature cache
    /// (`$ZHIJIAN_CACHE/features/`); features are then computed once per comparison.
    #[arg(long)]
    no_feature_cache: bool,
    /// Recompute the frozen blocks below the first trainable one at every step,
    /// instead of caching their output once per example (for measuring the saving).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Run nothing: write an sbatch script for a Slurm job array of N tasks,
    /// task k running `--shard k/N` into its own records file
    /// (`STEM.shard-k-of-N.jsonl` beside the records file), and print the
    /// `sbatch` command. The script ends with the `zhijian report` command
    /// that merges the shard files into the records file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "shard")]
    slurm: Option<u32>,
    /// Where `--slurm` writes the script; default `EXPERIMENT.sbatch` beside the records file.
    #[arg(long, value_name = "PATH", requires = "slurm")]
    slurm_script: Option<PathBuf>,
    /// Time limit of each Slurm task (`--time`), e.g. 2:00:00; default: the partition's.
    #[arg(long, value_name = "TIME", requires = "slurm")]
    slurm_time: Option<String>,
    /// CPUs of each Slurm task (`--cpus-per-task`; LibTorch uses that many threads); default: the cluster's.
    #[arg(long, value_name = "N", requires = "slurm")]
    slurm_cpus: Option<u32>,
    /// Memory of each Slurm task (`--mem`), e.g. 8G; default: the cluster's.
    #[arg(long, value_name = "SIZE", requires = "slurm")]
    slurm_mem: Option<String>,
    /// Slurm partition (`--partition`); default: the cluster's.
    #[arg(long, value_name = "NAME", requires = "slurm")]
    slurm_partition: Option<String>,
    /// GPUs of each Slurm task (`--gres=gpu:N`), for `--device cuda`.
    #[arg(long, value_name = "N", requires = "slurm")]
    slurm_gpus: Option<u32>,
}

impl RunArgs {
    fn options(&self) -> CompareOptions {
        CompareOptions {
            full: self.full,
            records: self.records.clone(),
            device: self.device,
            artifacts: None,
            shard: self.shard,
            seeds: self.seeds.clone(),
            strategies: self.strategies.clone(),
            feature_cache: (!self.no_feature_cache).then(|| zhijian_assets::cache_dir().join("features")),
            no_prefix_cache: self.no_prefix_cache,
        }
    }

    /// The options every task of a Slurm array passes on as given; `--records`
    /// and `--shard` are the script's own, the `--slurm*` ones are spent.
    fn passed_to_tasks(&self) -> Vec<String> {
        // Destructured in full, so that a new option must say whether tasks get it.
        let RunArgs {
            full,
            records: _,
            device,
            shard: _,
            seeds,
            strategies,
            no_feature_cache,
            no_prefix_cache,
            slurm: _,
            slurm_script: _,
            slurm_time: _,
            slurm_cpus: _,
            slurm_mem: _,
            slurm_partition: _,
            slurm_gpus: _,
        } = self;
        let mut args = Vec::new();
        if *full {
            args.push("--full".to_string());
        }
        if let Some(d) = device {
            let name = match d {
                DeviceChoice::Auto => "auto",
                DeviceChoice::Cpu => "cpu",
                DeviceChoice::Cuda => "cuda",
            };
            args.extend(["--device".to_string(), name.to_string()]);
        }
        if let Some(seeds) = seeds {
            args.extend(["--seeds".to_string(), seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(",")]);
        }
        if let Some(strategies) = strategies {
            args.extend(["--strategies".to_string(), strategies.join(",")]);
        }
        if *no_feature_cache {
            args.push("--no-feature-cache".to_string());
        }
        if *no_prefix_cache {
            args.push("--no-prefix-cache".to_string());
        }
        args
    }
}

/// Runs `exp`, prints its table and writes its plots beside the records; with
/// `--slurm`, writes the job array's script instead. `command` is the
/// subcommand with its own arguments (paths absolute), for the script.
fn run_experiment(exp: &Experiment, registry: &zhijian_core::Registry, run: RunArgs, command: Vec<String>) -> anyhow::Result<()> {
    if let Some(tasks) = run.slurm {
        return write_slurm_script(exp, &run, command, tasks as usize);
    }
    let options = run.options();
    let records = zhijian_bench::compare(exp, registry, &options)?;
    println!("\n## {}\n\n{}", exp.name, table::markdown(&records));
    if options.shard.is_some() {
        // Every slice would draw over the same files, each with part of the runs.
        println!("plots: not drawn for one shard; `zhijian report` the merged records to draw them");
        return Ok(());
    }
    let records_path = options.records.unwrap_or_else(|| exp.records_path());
    print_plots(&records, &plots_dir(&records_path), &exp.name)
}

/// Writes the sbatch script of `exp` as an array of `tasks` shards (atomically,
/// the log folder created), and says how to submit and merge it.
fn write_slurm_script(exp: &Experiment, run: &RunArgs, mut command: Vec<String>, tasks: usize) -> anyhow::Result<()> {
    let records = std::path::absolute(run.records.clone().unwrap_or_else(|| exp.records_path()))?;
    let folder = records.parent().unwrap_or(Path::new("/")).to_path_buf();
    let script = std::path::absolute(run.slurm_script.clone().unwrap_or_else(|| folder.join(format!("{}.sbatch", exp.name))))?;
    let seeds = run.seeds.as_ref().unwrap_or(&exp.seeds).len();
    command.extend(run.passed_to_tasks());
    let job = ArrayJob {
        binary: std::env::current_exe()?,
        workdir: std::env::current_dir()?,
        command,
        tasks,
        runs: seeds * exp.strategies.len(),
        records_exist: records.exists(),
        records,
        resources: Resources {
            job_name: exp.name.clone(),
            cpus_per_task: run.slurm_cpus,
            time: run.slurm_time.clone(),
            mem: run.slurm_mem.clone(),
            partition: run.slurm_partition.clone(),
            gpus: run.slurm_gpus,
            log_dir: folder.join("slurm-logs"),
        },
    };
    let text = job.script()?;
    // Slurm writes no log into a folder that does not exist.
    let logs = &job.resources.log_dir;
    std::fs::create_dir_all(logs).map_err(|e| anyhow::anyhow!("creating {}: {e}", logs.display()))?;
    zhijian_core::write_atomic(&script, text.as_bytes())?;
    println!(
        "slurm: wrote {}: a job array of {tasks} task(s) over {} run(s), task k writing {}; logs in {}",
        script.display(),
        job.runs,
        folder.join(format!("{}.shard-K-of-{tasks}.jsonl", job.records.file_stem().unwrap_or_default().to_string_lossy())).display(),
        job.resources.log_dir.display()
    );
    println!("submit it with:\n  sbatch {}", shell_quote(&script.to_string_lossy()));
    println!("when every task has finished, merge the shard records with:\n  {}", job.merge_command()?);
    Ok(())
}

/// The subcommand and its arguments as a Slurm task repeats them: the
/// experiment file made absolute (the task may start elsewhere), then `extra`.
fn task_command(sub: &str, config: &Path, extra: Vec<String>) -> anyhow::Result<Vec<String>> {
    let config = std::path::absolute(config)?;
    let config = config.to_str().ok_or_else(|| anyhow::anyhow!("experiment path {} is not UTF-8", config.display()))?;
    Ok([vec![sub.to_string(), config.to_string()], extra].concat())
}

/// `plots/` beside a records file.
fn plots_dir(records: &Path) -> PathBuf {
    records.parent().unwrap_or(Path::new(".")).join("plots")
}

fn print_plots(records: &[zhijian_bench::Record], dir: &Path, stem: &str) -> anyhow::Result<()> {
    let files = zhijian_bench::plot::write_plots(records, dir, stem)?;
    if files.is_empty() {
        println!("plots: none, no run finished");
        return Ok(());
    }
    println!("plots: {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

/// A sweep axis, checked as clap reads it and kept as written (a Slurm task repeats it).
fn check_axis(s: &str) -> Result<String, String> {
    s.parse::<Axis>().map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse().map_err(|e: zhijian_core::Error| e.to_string())
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda),
        "auto" => Ok(DeviceChoice::Auto),
        other => Err(format!("unknown device `{other}`; use cpu, cuda or auto")),
    }
}

/// `zhijian report`: merges `files`, says what the merge dropped, fails on a
/// conflict unless `keep_first`, writes `out`, prints the table and the plots.
fn report(files: &[PathBuf], experiment: Option<String>, plots: Option<PathBuf>, out: Option<PathBuf>, keep_first: bool) -> anyhow::Result<()> {
    let merged = merge_records(files)?;
    if merged.duplicates > 0 {
        eprintln!("report: {} duplicate record(s) dropped (a run recorded twice with the same results)", merged.duplicates);
    }
    if merged.retried > 0 {
        eprintln!("report: {} failed record(s) dropped for a finished record of the same run", merged.retried);
    }
    for c in &merged.conflicts {
        eprintln!("conflict: {c}");
    }
    if !merged.conflicts.is_empty() {
        anyhow::ensure!(
            keep_first,
            "{} run(s) recorded with different results (above); remove the records you do not trust, or pass --keep-first to keep the one read first",
            merged.conflicts.len()
        );
        eprintln!("report: kept the record read first of each of the {} conflicting run(s) (--keep-first)", merged.conflicts.len());
    }
    let chosen: Vec<_> = merged.records.into_iter().filter(|r| experiment.as_ref().is_none_or(|e| &r.experiment == e)).collect();
    let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    match &experiment {
        Some(e) => anyhow::ensure!(!chosen.is_empty(), "no records of experiment `{e}` in {names}"),
        None => anyhow::ensure!(!chosen.is_empty(), "no records in {names}"),
    }
    if let Some(out) = &out {
        let same = |f: &PathBuf| std::fs::canonicalize(f).ok() == std::fs::canonicalize(out).ok();
        anyhow::ensure!(
            !out.exists() || files.iter().any(same),
            "--out {} exists and is not one of the records files read; name it among them to merge its runs in, or write elsewhere",
            out.display()
        );
        write_records(out, &chosen)?;
        eprintln!("report: {} record(s) from {} file(s) written to {}", chosen.len(), files.len(), out.display());
    }
    println!("{}", table::markdown(&chosen));
    let base = out.as_ref().unwrap_or(&files[0]);
    let stem = experiment.unwrap_or_else(|| base.file_stem().map_or("report".into(), |s| s.to_string_lossy().into_owned()));
    print_plots(&chosen, &plots.unwrap_or_else(|| plots_dir(base)), &stem)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compare { config, run } => {
            let registry = zhijian_bench::registry();
            let exp = Experiment::load(&config, &registry)?;
            let command = if run.slurm.is_some() { task_command("compare", &config, Vec::new())? } else { Vec::new() };
            run_experiment(&exp, &registry, run, command)?;
        }
        Command::Sweep { config, axes, run } => {
            let registry = zhijian_bench::registry();
            let parsed: Vec<Axis> = axes.iter().map(|a| a.parse()).collect::<Result<_, zhijian_core::Error>>()?;
            let exp = zhijian_bench::sweep::expand(&Experiment::load(&config, &registry)?, &parsed, &registry)?;
            eprintln!("sweep: {} strategies × {} seed(s)", exp.strategies.len(), run.seeds.as_ref().unwrap_or(&exp.seeds).len());
            let command = match run.slurm {
                Some(_) => task_command("sweep", &config, axes.into_iter().flat_map(|a| ["--vary".to_string(), a]).collect())?,
                None => Vec::new(),
            };
            run_experiment(&exp, &registry, run, command)?;
        }
        Command::Report { records, experiment, plots, out, keep_first } => report(&records, experiment, plots, out, keep_first)?,
        Command::Methods => {
            for e in zhijian_bench::registry().entries() {
                println!("{:<16} {:<10} {}", e.name, format!("{:?}", e.stage).to_lowercase(), e.summary);
            }
        }
        Command::Presets => {
            print!("{}", zhijian_bench::presets::table());
            println!("\nuse one in an experiment: [backbone] kind = \"preset\", name = \"NAME\"");
        }
        Command::Convert { input, output } => {
            let started = std::time::Instant::now();
            let report = zhijian_core::convert_pth(&input, &output)?;
            println!(
                "{}: {} tensors, {} parameters ({} layout) -> {} ({} bytes) in {:.2} s",
                input.display(),
                report.tensors,
                report.parameters,
                report.format,
                output.display(),
                report.bytes,
                started.elapsed().as_secs_f64()
            );
            if !report.skipped.is_empty() {
                println!("skipped {} entries that are not tensors:", report.skipped.len());
                for s in &report.skipped {
                    println!("  {} ({})", s.name, s.kind);
                }
            }
        }
        Command::Rank { config, device, full, out } => {
            let cfg = zhijian_bench::rank::RankConfig::load(&config)?;
            let report = zhijian_bench::rank::rank(&cfg, &zhijian_bench::rank::RankOptions { device, full })?;
            let table = report.markdown();
            if let Some(out) = &out {
                if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(out, &table)?;
                eprintln!("rank: table written to {}", out.display());
            }
            println!("{table}");
        }
        Command::Fetch { names, all } => {
            let names: Vec<String> = if all {
                zhijian_assets::manifests()?.into_iter().map(|m| m.name).collect()
            } else {
                anyhow::ensure!(!names.is_empty(), "name assets to fetch, or pass --all");
                names
            };
            for name in names {
                let paths = zhijian_assets::fetch(&name, |msg| eprintln!("{name}: {msg}"))?;
                println!("{name}: {} file(s) verified", paths.len());
            }
        }
        Command::Export { records, strategy, seed, experiment, artifact, peft } => {
            let r = zhijian_bench::peft::export_run(&records, experiment.as_deref(), &strategy, seed, artifact.as_deref(), &peft)?;
            println!(
                "{strategy} seed {seed}: {} adapter of {} modules from {} -> {} (base model {})",
                r.peft_type,
                r.modules,
                r.artifact.display(),
                peft.display(),
                r.base_model
            );
        }
        Command::Import { peft, out, backbone } => {
            let r = zhijian_bench::peft::import_dir(&peft, backbone.as_deref(), &out)?;
            let head = if r.head { "with zhijian's head" } else { "without a head (a PEFT adapter has none; the model's head stays as initialised)" };
            eprintln!("{}: {} tensors {head} -> {} (backbone {}, pooling {:?})", peft.display(), r.tensors, out.display(), r.asset, r.pooling);
            print!("{}", r.strategy_toml("imported"));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
