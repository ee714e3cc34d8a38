//! The `zhijian` command: compare reuse strategies on real pre-trained models.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zhijian_bench::sweep::Axis;
use zhijian_bench::{CompareOptions, DeviceChoice, Experiment, Shard, read_records, table};

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
    Compare {
        /// Experiment file, e.g. configs/demo.toml.
        config: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a grid of strategy variants: each combination of the values given
    /// by `--vary` becomes a strategy of its own; the experiment's other
    /// strategies run as baselines. Records, resuming and `--shard` as for `compare`.
    Sweep {
        /// Experiment file, e.g. configs/demo.toml.
        config: PathBuf,
        /// An axis `STRATEGY.train.FIELD=V1,V2,…` or `STRATEGY.methods.I.FIELD=V1,V2,…`
        /// (STRATEGY may be `*`; values are TOML, a bare word a string), e.g.
        /// `--vary lora-r8.train.lr=1e-4,1e-3 --vary lora-r8.methods.0.rank=4,16`.
        #[arg(long = "vary", value_name = "AXIS", required = true, value_parser = parse_axis)]
        axes: Vec<Axis>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Print the comparison table of a records file and write its plots
    /// (accuracy vs trainable parameters, vs train time, in- vs out-of-distribution;
    /// PNG and SVG).
    Report {
        /// Records file (JSONL) written by `compare`.
        records: PathBuf,
        /// Only this experiment's records.
        #[arg(long)]
        experiment: Option<String>,
        /// Folder for the plots; default `plots/` beside the records file.
        #[arg(long)]
        plots: Option<PathBuf>,
    },
    /// List the registered reuse methods.
    Methods,
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
    /// Download and verify assets (weights, data sets) into the cache.
    Fetch {
        /// Asset names (see `datasets/`); none with --all.
        names: Vec<String>,
        /// Fetch every asset.
        #[arg(long)]
        all: bool,
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
    /// slice k mod N), e.g. `--shard 0/2` here and `--shard 1/2` elsewhere;
    /// the records files concatenate into the whole comparison.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<Shard>,
    /// Seeds to run instead of the experiment's, e.g. `--seeds 0,1,2`.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Do not read or write the frozen-backbone feature cache
    /// (`$ZHIJIAN_CACHE/features/`); features are then computed once per comparison.
    #[arg(long)]
    no_feature_cache: bool,
    /// Recompute the frozen blocks below the first trainable one at every step,
    /// instead of caching their output once per example (for measuring the saving).
    #[arg(long)]
    no_prefix_cache: bool,
}

impl RunArgs {
    fn options(self) -> CompareOptions {
        CompareOptions {
            full: self.full,
            records: self.records,
            device: self.device,
            artifacts: None,
            shard: self.shard,
            seeds: self.seeds,
            feature_cache: (!self.no_feature_cache).then(|| zhijian_assets::cache_dir().join("features")),
            no_prefix_cache: self.no_prefix_cache,
        }
    }
}

/// Runs `exp`, prints its table and writes its plots beside the records.
fn run_experiment(exp: &Experiment, registry: &zhijian_core::Registry, run: RunArgs) -> anyhow::Result<()> {
    let options = run.options();
    let records = zhijian_bench::compare(exp, registry, &options)?;
    println!("\n## {}\n\n{}", exp.name, table::markdown(&records));
    let records_path = options.records.unwrap_or_else(|| exp.records_path());
    print_plots(&records, &plots_dir(&records_path), &exp.name)
}

/// `plots/` beside a records file.
fn plots_dir(records: &Path) -> PathBuf {
    records.parent().unwrap_or(Path::new(".")).join("plots")
}

fn print_plots(records: &[zhijian_bench::Record], dir: &Path, stem: &str) -> anyhow::Result<()> {
    let files = zhijian_bench::plot::write_plots(records, dir, stem)?;
    println!("plots: {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

fn parse_axis(s: &str) -> Result<Axis, String> {
    s.parse().map_err(|e: zhijian_core::Error| e.to_string())
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compare { config, run } => {
            let registry = zhijian_bench::registry();
            run_experiment(&Experiment::load(&config, &registry)?, &registry, run)?;
        }
        Command::Sweep { config, axes, run } => {
            let registry = zhijian_bench::registry();
            let exp = zhijian_bench::sweep::expand(&Experiment::load(&config, &registry)?, &axes, &registry)?;
            eprintln!("sweep: {} strategies × {} seed(s)", exp.strategies.len(), run.seeds.as_ref().unwrap_or(&exp.seeds).len());
            run_experiment(&exp, &registry, run)?;
        }
        Command::Report { records, experiment, plots } => {
            let all = read_records(&records)?;
            let chosen: Vec<_> = all.into_iter().filter(|r| experiment.as_ref().is_none_or(|e| &r.experiment == e)).collect();
            anyhow::ensure!(!chosen.is_empty(), "no records in {}", records.display());
            println!("{}", table::markdown(&chosen));
            let stem = experiment.unwrap_or_else(|| records.file_stem().map_or("report".into(), |s| s.to_string_lossy().into_owned()));
            print_plots(&chosen, &plots.unwrap_or_else(|| plots_dir(&records)), &stem)?;
        }
        Command::Methods => {
            for e in zhijian_bench::registry().entries() {
                println!("{:<16} {:<10} {}", e.name, format!("{:?}", e.stage).to_lowercase(), e.summary);
            }
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
