//! `cargo xtask reference`: the same training jobs in zhijian and in PyTorch +
//! transformers + peft, side by side, and the machine's matmul ceiling.
//!
//! zhijian's side is `examples/reference_job.rs` (built in release), PyTorch's
//! `benches/reference/peft_job.py` (run with the set-up's venv). Both read one
//! file `reference_job prepare` writes (tokens, initial head and LoRA matrices,
//! hyper-parameters), and every job runs in its own process, so each peak RSS
//! is that job's own. Jobs of one method run back to back, so a change in the
//! machine's load hits both sides alike.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use std::{env, fs};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{DEMO_ASSETS, cargo, fetch_assets, repo_root, setup, spawn, step};

/// Default optimiser steps (of 32 reviews) per job: the whole command then
/// took 10 minutes after the build on a 2-core Zen 3 machine, where the bf16
/// jobs skip themselves (where they run, they add to that).
pub const DEFAULT_STEPS: usize = 100;

/// One process the command runs.
struct Stage {
    label: String,
    command: Command,
    /// The JSON file the stage writes, if any.
    out: Option<PathBuf>,
}

/// Runs one stage in its own process and keeps the JSON it wrote under the file's stem.
fn run_stage(mut stage: Stage, k: usize, total: usize, t_run: Instant, results: &mut serde_json::Map<String, Value>) -> Result<()> {
    step(&format!("[{k}/{total}] {} (elapsed {})", stage.label, clock(t_run.elapsed().as_secs_f64())));
    let t = Instant::now();
    if let Some(out) = &stage.out {
        // A stale file from an earlier run must not pass for this one's.
        let _ = fs::remove_file(out);
    }
    let status = spawn(&mut stage.command, &stage.label, "a reference stage")?;
    if !status.success() {
        bail!("stage `{}` failed ({status})", stage.label);
    }
    step(&format!("[{k}/{total}] {} done in {:.0} s", stage.label, t.elapsed().as_secs_f64()));
    if let Some(out) = stage.out {
        let text = fs::read_to_string(&out).with_context(|| format!("stage `{}` wrote no {}", stage.label, out.display()))?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
        let name = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        results.insert(name, value);
    }
    Ok(())
}

/// Epochs of each time-to-accuracy job: the probe's head as many as the
/// demo gives it (it trains on features), LoRA and full fine-tuning as long
/// as PyTorch + PEFT needed for its best accuracy in the measurement.
const TIME_TO_ACCURACY: [(&str, Option<usize>); 3] = [("linear_probe", Some(30)), ("lora", Some(3)), ("full_finetune", Some(2))];

/// Runs `cargo xtask reference [--steps N | --time-to-accuracy]`.
pub fn reference(args: &[String]) -> Result<()> {
    if args.first().is_some_and(|a| a == "--time-to-accuracy") {
        return time_to_accuracy(&tta_methods(&args[1..])?);
    }
    let steps = parse_steps(args)?;
    let t0 = Instant::now();
    let env = JobEnv::new()?;
    let root = env.root.clone();
    let dir = env.dir.clone();
    let data = dir.join(format!("data-{steps}-steps.safetensors"));
    let json_out = |name: &str| env.json_out(name);
    let zhijian = |label: &str, args: &[&str], out: Option<PathBuf>| env.zhijian(label, args, out);
    let pytorch = |label: &str, args: &[&str], out: PathBuf| env.pytorch(label, args, out);
    let data_arg = data.to_str().context("the repository path is not UTF-8")?;
    let steps_arg = steps.to_string();
    let mut prepare = zhijian("prepare the data (zhijian's tokens and split)", &["prepare", "--steps", &steps_arg], None);
    prepare.command.arg("--out").arg(&data);
    let first = vec![
        prepare,
        zhijian("matmul ceiling, zhijian (tch)", &["ceiling"], Some(json_out("ceiling-zhijian"))),
        pytorch("matmul ceiling, PyTorch", &["ceiling"], json_out("ceiling-pytorch")),
        pytorch("model FLOPs: formula vs FlopCounterMode", &["flops-check", "--data", data_arg], json_out("flops-check")),
    ];
    // Eight jobs follow; bf16 ones only where bf16 matmuls beat fp32 ones.
    let total = first.len() + 8;
    let t_run = Instant::now();
    let mut results = serde_json::Map::new();
    let mut k = 0;
    for stage in first {
        k += 1;
        run_stage(stage, k, total, t_run, &mut results)?;
    }
    let skip_bf16 = bf16_skip_reason(&results);
    // Each precision's two sides run back to back.
    for method in ["full_finetune", "lora"] {
        for precision in ["fp32", "bf16"] {
            for side in ["zhijian", "PyTorch"] {
                k += 1;
                let label = format!("{side} {method} {precision}");
                if let (Some(why), "bf16") = (&skip_bf16, precision) {
                    step(&format!("[{k}/{total}] {label} skipped: {why}"));
                    continue;
                }
                let mut args = vec!["job", "--method", method, "--precision", precision, "--data", data_arg];
                // In fp32 zhijian draws LibTorch's dropout masks, so the two
                // sides' losses agree step by step (the parity table); in bf16
                // it runs its default, cheaper masks.
                if side == "zhijian" && precision == "fp32" {
                    args.push("--torch-dropout");
                }
                let out = json_out(&format!("{}-{method}-{precision}", side.to_lowercase()));
                let stage = if side == "zhijian" { zhijian(&label, &args, Some(out)) } else { pytorch(&label, &args, out) };
                run_stage(stage, k, total, t_run, &mut results)?;
            }
        }
    }
    let run_seconds = t_run.elapsed().as_secs_f64();
    let meta = json!({
        "bf16_skipped": skip_bf16,
        "steps": steps,
        "commit": git(&root, &["describe", "--always", "--dirty"]),
        "date_utc": today_utc(),
        "cpu": cpu_model(),
        "run_seconds": run_seconds,
        "command": format!("cargo xtask reference --steps {steps}"),
    });
    let report = json!({ "meta": meta, "results": results });
    let table = render(&report)?;
    println!("\n{table}");
    write_atomic(&dir.join("reference.json"), &(serde_json::to_string_pretty(&report)? + "\n"))?;
    write_atomic(&dir.join("table.md"), &table)?;
    step(&format!(
        "reference done in {} ({} for the stages after the build); table and raw JSON in {}",
        clock(t0.elapsed().as_secs_f64()),
        clock(run_seconds),
        dir.display()
    ));
    Ok(())
}

/// What every stage of the command needs: the built zhijian job, the venv's
/// python with PyTorch's job script, and the results folder.
struct JobEnv {
    root: PathBuf,
    exe: PathBuf,
    python: PathBuf,
    script: PathBuf,
    dir: PathBuf,
    jobs_dir: PathBuf,
}

impl JobEnv {
    /// Sets up the venv, fetches the demo assets and builds the zhijian job in release.
    fn new() -> Result<JobEnv> {
        let python = setup()?;
        fetch_assets(DEMO_ASSETS)?;
        let root = repo_root();
        step("cargo build --release --example reference_job");
        let t = Instant::now();
        let status = spawn(
            cargo().current_dir(&root).args(["build", "--release", "-p", "zhijian", "--example", "reference_job"]),
            "cargo",
            "building the reference job",
        )?;
        if !status.success() {
            bail!("building examples/reference_job.rs failed ({status})");
        }
        step(&format!("built in {:.0} s", t.elapsed().as_secs_f64()));
        let dir = root.join("results/reference");
        let jobs_dir = dir.join("jobs");
        fs::create_dir_all(&jobs_dir).with_context(|| format!("creating {}", jobs_dir.display()))?;
        Ok(JobEnv {
            exe: target_dir(&root).join("release/examples/reference_job"),
            script: root.join("benches/reference/peft_job.py"),
            python,
            root,
            dir,
            jobs_dir,
        })
    }

    fn json_out(&self, name: &str) -> PathBuf {
        self.jobs_dir.join(format!("{name}.json"))
    }

    fn zhijian(&self, label: &str, args: &[&str], out: Option<PathBuf>) -> Stage {
        let mut command = Command::new(&self.exe);
        command.current_dir(&self.root).args(args);
        if let Some(o) = &out {
            command.arg("--out").arg(o);
        }
        Stage { label: label.to_string(), command, out }
    }

    fn pytorch(&self, label: &str, args: &[&str], out: PathBuf) -> Stage {
        let mut command = Command::new(&self.python);
        command.current_dir(&self.root).arg(&self.script).args(args).arg("--out").arg(&out);
        // No hub access: the weights are zhijian's cached asset files.
        command.env("HF_HUB_OFFLINE", "1").env("TRANSFORMERS_OFFLINE", "1");
        Stage { label: label.to_string(), command, out: Some(out) }
    }
}

/// Why the bf16 jobs are skipped, if PyTorch's bf16 matmuls are no faster than its fp32 ones.
fn bf16_skip_reason(results: &serde_json::Map<String, Value>) -> Option<String> {
    let best = |precision: &str| results["ceiling-pytorch"][precision]["best"].as_f64().unwrap_or(0.0);
    let (fp32, bf16) = (best("fp32"), best("bf16"));
    (bf16 <= fp32).then(|| {
        format!(
            "bf16 matmuls run at {:.1} GFLOP/s on this CPU against {:.0} GFLOP/s in fp32 (no AVX-512 BF16 or AMX), \
             so fp32 is the best setting here and the bf16 jobs were skipped",
            bf16 / 1e9,
            fp32 / 1e9
        )
    })
}

/// `cargo xtask reference --time-to-accuracy`: on the whole training split,
/// each of linear probe, LoRA and full fine-tuning in zhijian and in PyTorch +
/// PEFT, at each side's best precision (bf16 where bf16 matmuls are faster),
/// the test top-1 after every epoch against the time spent training; the
/// table gives the time each side took to reach PyTorch's final accuracy.
fn time_to_accuracy(methods: &[&str]) -> Result<()> {
    let t0 = Instant::now();
    let env = JobEnv::new()?;
    let data = env.dir.join("data-full.safetensors");
    let data_arg = data.to_str().context("the repository path is not UTF-8")?.to_string();
    let mut prepare = env.zhijian("prepare the data (every training review)", &["prepare", "--full"], None);
    prepare.command.arg("--out").arg(&data);
    let first = vec![prepare, env.pytorch("matmul ceiling, PyTorch", &["ceiling"], env.json_out("ceiling-pytorch"))];
    let chosen = || TIME_TO_ACCURACY.into_iter().filter(|(m, _)| methods.contains(m));
    let total = first.len() + chosen().map(|(m, _)| tta_jobs(m).len()).sum::<usize>();
    let t_run = Instant::now();
    let mut results = serde_json::Map::new();
    let mut k = 0;
    for stage in first {
        k += 1;
        run_stage(stage, k, total, t_run, &mut results)?;
    }
    let skipped = bf16_skip_reason(&results);
    let precision = if skipped.is_some() { "fp32" } else { "bf16" };
    for (method, epochs) in chosen() {
        for (side, grouped) in tta_jobs(method) {
            k += 1;
            let epochs = epochs.map(|e| e.to_string());
            let mut args = vec!["job", "--method", method, "--precision", precision, "--data", &data_arg];
            if let Some(e) = &epochs {
                args.extend(["--epochs", e]);
            }
            if grouped {
                args.push("--group-by-length");
            }
            let name = tta_name(side, method, grouped);
            let label = format!("{side} {method} {precision}{}", if grouped { ", grouped by length" } else { "" });
            let out = env.json_out(&name);
            let stage = if side == "zhijian" { env.zhijian(&label, &args, Some(out)) } else { env.pytorch(&label, &args, out) };
            run_stage(stage, k, total, t_run, &mut results)?;
        }
    }
    let meta = json!({
        "precision": precision,
        "bf16_skipped": skipped,
        "commit": git(&env.root, &["describe", "--always", "--dirty"]),
        "date_utc": today_utc(),
        "cpu": cpu_model(),
        "run_seconds": t_run.elapsed().as_secs_f64(),
        "command": if methods.len() == TIME_TO_ACCURACY.len() {
            "cargo xtask reference --time-to-accuracy".to_string()
        } else {
            format!("cargo xtask reference --time-to-accuracy --methods {}", methods.join(","))
        },
        "methods": methods,
    });
    let report = json!({ "meta": meta, "results": results });
    let table = render_time_to_accuracy(&report)?;
    println!("\n{table}");
    write_atomic(&env.dir.join("time-to-accuracy.json"), &(serde_json::to_string_pretty(&report)? + "\n"))?;
    write_atomic(&env.dir.join("time-to-accuracy.md"), &table)?;
    step(&format!("time to accuracy done in {}; table and raw JSON in {}", clock(t0.elapsed().as_secs_f64()), env.dir.display()));
    Ok(())
}

/// The methods of `--time-to-accuracy [--methods a,b]`: all three unless named.
fn tta_methods(args: &[String]) -> Result<Vec<&'static str>> {
    let known = TIME_TO_ACCURACY.map(|(m, _)| m);
    match args {
        [] => Ok(known.to_vec()),
        [flag, list] if flag == "--methods" => list
            .split(',')
            .map(|name| {
                known.into_iter().find(|k| *k == name.trim()).with_context(|| format!("--methods: unknown method `{name}`; known: {}", known.join(", ")))
            })
            .collect(),
        other => bail!("--time-to-accuracy takes only `--methods a,b` (of {}), got {other:?}", known.join(", ")),
    }
}

/// The time-to-accuracy jobs of `method`: `(side, grouped by length)`, each
/// side as PyTorch + PEFT's reference setting has it (dynamic padding) and
/// with length grouping (both sides' `group_by_length`; nothing to group for
/// the probe, whose head trains on features).
fn tta_jobs(method: &str) -> Vec<(&'static str, bool)> {
    let plain = [("zhijian", false), ("PyTorch", false)];
    if method == "linear_probe" { plain.to_vec() } else { [&plain[..], &[("zhijian", true), ("PyTorch", true)]].concat() }
}

/// The result name of a time-to-accuracy job.
fn tta_name(side: &str, method: &str, grouped: bool) -> String {
    format!("tta-{}-{method}{}", side.to_lowercase(), if grouped { "-grouped" } else { "" })
}

/// The first point of a job's curve at or above `target` top-1: `(epoch, seconds)`.
fn reached(job: &Value, target: f64) -> Option<(u64, f64)> {
    job["curve"]
        .as_array()?
        .iter()
        .find(|p| p["test_top1"].as_f64().is_some_and(|a| a >= target))
        .map(|p| (p["epoch"].as_u64().unwrap_or(0), p["seconds"].as_f64().unwrap_or(0.0)))
}

/// The markdown table of the time-to-accuracy jobs: each job's time to the
/// top-1 PyTorch + PEFT reaches in its reference setting (dynamic padding),
/// and its speed-up over that.
fn render_time_to_accuracy(report: &Value) -> Result<String> {
    let r = &report["results"];
    let m = &report["meta"];
    let mut out = String::new();
    writeln!(
        out,
        "## Time to accuracy: MiniLM-L6 → Rotten Tomatoes, every training review\n\n{} on both sides, batch 32, dynamic padding, AdamW \
         (ATen's fused kernel on both sides), warm-up + cosine over the whole run; zhijian draws its default dropout masks; \
         test top-1 after every epoch. {}, commit {}, {}, `{}`, {}.\n",
        m["precision"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        m["date_utc"].as_str().unwrap_or("?"),
        m["command"].as_str().unwrap_or("?"),
        clock(m["run_seconds"].as_f64().unwrap_or(0.0)),
    )?;
    writeln!(
        out,
        "| method | side | batches | epochs | final top-1 (%) | target (%) | time to target | speed-up over PyTorch | whole run, PyTorch's time ÷ this one's (same batches) | top-1 per epoch (%, training time) | peak RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let per_epoch = |job: &Value| -> String {
        job["curve"].as_array().map_or(String::new(), |c| {
            c.iter()
                .map(|p| format!("{:.2} ({:.0} s)", 100.0 * p["test_top1"].as_f64().unwrap_or(0.0), p["seconds"].as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    // PyTorch's time ÷ this job's, where both are known.
    let times = |theirs: Option<f64>, ours: Option<f64>| match (theirs, ours) {
        (Some(theirs), Some(ours)) if ours > 0.0 => format!("{:.2}×", theirs / ours),
        _ => "—".to_string(),
    };
    // The whole run's training time: the last epoch's point of the curve.
    let total = |job: &Value| job["curve"].as_array().and_then(|c| c.last()).and_then(|p| p["seconds"].as_f64()).filter(|s| *s > 0.0);
    let methods: Vec<&str> =
        m["methods"].as_array().map_or_else(|| TIME_TO_ACCURACY.map(|(m, _)| m).to_vec(), |a| a.iter().filter_map(Value::as_str).collect());
    for method in methods {
        let reference = &r[tta_name("PyTorch", method, false)];
        let target = reference["test_top1"].as_f64().with_context(|| format!("no PyTorch result for {method}"))?;
        let base = reached(reference, target).map(|(_, s)| s);
        for (side, grouped) in tta_jobs(method) {
            let job = &r[tta_name(side, method, grouped)];
            let Some(top1) = job["test_top1"].as_f64() else { continue };
            let hit = reached(job, target);
            let time = hit.map_or("not reached".to_string(), |(e, s)| format!("{s:.0} s (epoch {e})"));
            let speedup = times(base, hit.map(|(_, s)| s));
            // Throughput against PyTorch batched the same way: unlike the time to
            // target, it does not hinge on where one run's accuracy lands.
            let whole = times(total(&r[tta_name("PyTorch", method, grouped)]), total(job));
            let rss = job["peak_rss_bytes"].as_f64().map_or("—".into(), bytes);
            let batches = if grouped { "grouped by length" } else { "dynamic padding" };
            writeln!(
                out,
                "| {method} | {side} | {batches} | {} | {:.2} | {:.2} | {time} | {speedup} | {whole} | {} | {rss} |",
                job["epochs"],
                100.0 * top1,
                100.0 * target,
                per_epoch(job)
            )?;
        }
    }
    if let Some(why) = m["bf16_skipped"].as_str() {
        writeln!(out, "\n{why}.")?;
    }
    writeln!(
        out,
        "\nThe target is the final top-1 of PyTorch + PEFT with dynamic padding (the issue's reference setting). Times are training wall time \
         from the start of the job — for the probe, the frozen encoder's pass over both splits, then the head — without the per-epoch test evaluations."
    )?;
    Ok(out)
}

fn parse_steps(args: &[String]) -> Result<usize> {
    match args {
        [] => Ok(DEFAULT_STEPS),
        [flag, n] if flag == "--steps" => {
            let steps: usize = n.parse().with_context(|| format!("--steps takes a positive number, got `{n}`"))?;
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            Ok(steps)
        }
        _ => bail!("usage: cargo xtask reference [--steps N | --time-to-accuracy] (default {DEFAULT_STEPS} steps); got `{}`", args.join(" ")),
    }
}

/// Cargo's target folder: `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()).map_or_else(|| root.join("target"), PathBuf::from)
}

/// `m:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

fn git(root: &Path, args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Today's date in UTC, `YYYY-MM-DD` (Howard Hinnant's civil-from-days).
fn today_utc() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The CPU's model name and logical core count, from `/proc/cpuinfo`.
fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()));
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{} ({cores} logical cores)", model.unwrap_or_else(|| "unknown CPU".into()))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 * 1024.0 { format!("{:.2} GiB", b / (1024.0f64).powi(3)) } else { format!("{:.0} MiB", b / (1024.0f64).powi(2)) }
}

/// The markdown report of `cargo xtask reference`'s results.
fn render(report: &Value) -> Result<String> {
    let r = &report["results"];
    let m = &report["meta"];
    let job = |side: &str, method: &str, precision: &str| -> Option<&Value> { Some(&r[format!("{side}-{method}-{precision}")]).filter(|v| !v.is_null()) };
    let need = |side: &str, method: &str, precision: &str| -> Result<&Value> {
        job(side, method, precision).with_context(|| format!("no result for {side} {method} {precision}"))
    };
    let f = |v: &Value, key: &str| -> Result<f64> { v[key].as_f64().with_context(|| format!("a result lacks `{key}`: {v}")) };
    let ceiling = |precision: &str| -> Result<f64> {
        let best = |side: &str| r[format!("ceiling-{side}")][precision]["best"].as_f64();
        best("zhijian").into_iter().chain(best("pytorch")).reduce(f64::max).context("no ceiling measured")
    };
    let version = |v: &Value, package: &str| v["versions"][package].as_str().unwrap_or("?").to_string();
    let zf = need("zhijian", "full_finetune", "fp32")?;
    let pf = need("pytorch", "full_finetune", "fp32")?;
    let pl = need("pytorch", "lora", "fp32")?;
    let methods = [("full_finetune", "full fine-tuning"), ("lora", "LoRA r8")];
    let mut out = String::new();
    writeln!(out, "## zhijian vs PyTorch {} + transformers {} + peft {}\n", version(pf, "torch"), version(pf, "transformers"), version(pl, "peft"))?;
    writeln!(
        out,
        "MiniLM-L6 → Rotten Tomatoes, batch 32, {} steps: one epoch over {} training reviews, the same tokens, batches \
         and initial head and LoRA matrices on both sides; test top-1 on {} reviews. In fp32 zhijian draws LibTorch's \
         dropout masks (`train.dropout_masks = \"torch\"`): both sides train on the same masks. In bf16 it draws \
         its own, cheaper ones (the default). Both sides run ATen's fused AdamW. {}, {} threads. Commit {}, {}, \
         `{}`, {} after the build.\n",
        m["steps"],
        zf["samples"],
        zf["test_n"],
        m["cpu"].as_str().unwrap_or("?"),
        zf["threads"],
        m["commit"].as_str().unwrap_or("?"),
        m["date_utc"].as_str().unwrap_or("?"),
        m["command"].as_str().unwrap_or("?"),
        clock(f(m, "run_seconds")?),
    )?;
    writeln!(
        out,
        "| job | samples/s zhijian | samples/s PyTorch | zhijian ÷ PyTorch | peak RSS zhijian | peak RSS PyTorch | \
         test top-1 zhijian (%) | test top-1 PyTorch (%) | model TFLOP/s zhijian | model TFLOP/s PyTorch | \
         of ceiling zhijian | of ceiling PyTorch |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (method, name) in methods {
        for (precision, shown) in [("fp32", "fp32"), ("bf16", "bf16 (zhijian's layers / PyTorch autocast)")] {
            let (Some(z), Some(p)) = (job("zhijian", method, precision), job("pytorch", method, precision)) else {
                writeln!(out, "| {name}, {shown} | skipped ‡ | skipped ‡ | | | | | | | | | |")?;
                continue;
            };
            let c = ceiling(precision)?;
            writeln!(
                out,
                "| {name}, {shown} | {:.1} | {:.1} | {:.2} | {} | {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0}% | {:.0}% |",
                f(z, "samples_per_s")?,
                f(p, "samples_per_s")?,
                f(z, "samples_per_s")? / f(p, "samples_per_s")?,
                bytes(f(z, "peak_rss_bytes")?),
                bytes(f(p, "peak_rss_bytes")?),
                100.0 * f(z, "test_top1")?,
                100.0 * f(p, "test_top1")?,
                f(z, "model_flops_per_s")? / 1e12,
                f(p, "model_flops_per_s")? / 1e12,
                100.0 * f(z, "model_flops_per_s")? / c,
                100.0 * f(p, "model_flops_per_s")? / c,
            )?;
        }
    }
    if let Some(why) = m["bf16_skipped"].as_str() {
        writeln!(out, "\n‡ {why}.")?;
    }

    writeln!(out, "\n| matmul ceiling (best over n = 512 … 4096) | fp32 TFLOP/s | bf16 TFLOP/s |")?;
    writeln!(out, "|---|---|---|")?;
    for (side, name) in [("zhijian", "zhijian (tch)"), ("pytorch", "PyTorch")] {
        let c = &r[format!("ceiling-{side}")];
        let best = |p: &str| c[p]["best"].as_f64().map_or("?".into(), |v| format!("{:.3}", v / 1e12));
        writeln!(out, "| {name} | {} | {} |", best("fp32"), best("bf16"))?;
    }
    writeln!(out, "\nA job's fraction is of the higher of the two ceilings at the job's precision.\n")?;

    writeln!(
        out,
        "| parity | mean train loss zhijian | mean train loss PyTorch | tokens computed zhijian | tokens computed PyTorch | \
         trainable params zhijian | trainable params PyTorch |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    let mut notes = Vec::new();
    for (method, name) in methods {
        for precision in ["fp32", "bf16"] {
            let (Some(z), Some(p)) = (job("zhijian", method, precision), job("pytorch", method, precision)) else { continue };
            writeln!(
                out,
                "| {name}, {precision} | {:.6} | {:.6} | {} | {} | {} | {} |",
                f(z, "final_loss")?,
                f(p, "final_loss")?,
                z["tokens"],
                p["tokens"],
                z["trainable_params"],
                p["trainable_params"]
            )?;
            if z["tokens"] != p["tokens"] || z["model_flops"] != p["model_flops"] {
                notes.push(format!("{name} {precision}: the two sides computed different batches (tokens or model FLOPs differ)"));
            }
            if precision == "fp32" && z["dropout_masks"] != "torch" {
                notes.push(format!("{name} fp32: zhijian did not draw LibTorch's dropout masks, so its loss can differ from PyTorch's"));
            }
            if z["trainable_params"] != p["trainable_params"] {
                notes.push(format!("{name}: the trainable parameter counts differ"));
            }
            if z["threads"] != p["threads"] {
                notes.push(format!("{name} {precision}: the thread counts differ ({} vs {})", z["threads"], p["threads"]));
            }
        }
    }
    let check = &r["flops-check"];
    let ratio = |method: &str| -> String {
        match (check[method]["counted"].as_f64(), check[method]["analytic"].as_f64()) {
            (Some(c), Some(a)) if a > 0.0 => format!("{:.4}", c / a),
            _ => "?".into(),
        }
    };
    writeln!(
        out,
        "\nModel FLOPs per batch of `rows` sequences padded to `seq` tokens (T = rows·seq): \
         2·T·(2·P_frozen + 3·P_trained) + 12·L·h·rows·seq² + 6·h·C·rows (see examples/reference_job.rs). \
         On one batch, torch's FlopCounterMode counts {} × the formula for full fine-tuning and {} × for LoRA \
         (autograd skips the input gradients of LoRA's first frozen projections).",
        ratio("full_finetune"),
        ratio("lora")
    )?;
    for note in notes {
        writeln!(out, "\n**warning:** {note}")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(side: &str, samples_per_s: f64, tokens: i64) -> Value {
        json!({
            "side": side, "samples": 3200, "samples_per_s": samples_per_s, "peak_rss_bytes": 1.5 * 1024.0 * 1024.0 * 1024.0,
            "test_top1": 0.78, "test_n": 1275, "model_flops_per_s": 7.5e10, "model_flops": 1.0e13, "tokens": tokens,
            "final_loss": 0.5, "trainable_params": 74498, "threads": 2,
            "versions": { "torch": "2.11.0", "transformers": "5.23.0", "peft": "0.21.2" },
        })
    }

    fn report(with_bf16: bool) -> Value {
        let mut results = serde_json::Map::new();
        for method in ["full_finetune", "lora"] {
            let mut zhijian = result("zhijian", 20.0, 1000);
            // fp32 jobs draw LibTorch's dropout masks (the parity table's premise).
            zhijian["dropout_masks"] = json!("torch");
            results.insert(format!("zhijian-{method}-fp32"), zhijian);
            results.insert(format!("pytorch-{method}-fp32"), result("pytorch", 25.0, 1000));
            if with_bf16 {
                results.insert(format!("zhijian-{method}-bf16"), result("zhijian", 60.0, 1000));
                results.insert(format!("pytorch-{method}-bf16"), result("pytorch", 40.0, 1001));
            }
        }
        results.insert("ceiling-zhijian".into(), json!({ "fp32": { "best": 1.5e11 }, "bf16": { "best": 6.0e11 } }));
        results.insert("ceiling-pytorch".into(), json!({ "fp32": { "best": 1.0e11 }, "bf16": { "best": 7.5e11 } }));
        results.insert("flops-check".into(), json!({ "full_finetune": { "analytic": 100, "counted": 100 }, "lora": { "analytic": 100, "counted": 98 } }));
        let skipped = (!with_bf16).then_some("bf16 matmuls are slow here");
        json!({
            "meta": { "steps": 100, "commit": "abc1234", "date_utc": "2025-01-01", "cpu": "a CPU", "run_seconds": 600.0,
                      "command": "cargo xtask reference --steps 100", "bf16_skipped": skipped },
            "results": results,
        })
    }

    #[test]
    fn table_rows_ratios_and_fractions_of_the_ceiling() {
        let table = render(&report(true)).unwrap();
        // zhijian ÷ PyTorch = 20 / 25; 7.5e10 FLOP/s of the higher fp32 ceiling 1.5e11 = 50 %, of the bf16 one 7.5e11 = 10 %.
        assert!(table.contains("| full fine-tuning, fp32 | 20.0 | 25.0 | 0.80 | 1.50 GiB | 1.50 GiB | 78.00 | 78.00 | 0.075 | 0.075 | 50% | 50% |"), "{table}");
        // bf16: 60 / 40; 7.5e10 of the higher bf16 ceiling 7.5e11 = 10 %.
        assert!(
            table.contains(
                "| LoRA r8, bf16 (zhijian's layers / PyTorch autocast) | 60.0 | 40.0 | 1.50 | 1.50 GiB | 1.50 GiB | 78.00 | 78.00 | 0.075 | 0.075 | 10% | 10% |"
            ),
            "{table}"
        );
        assert!(table.contains("counts 1.0000 × the formula for full fine-tuning and 0.9800 × for LoRA"), "{table}");
        // The bf16 jobs here saw other batches than zhijian's: the table says so.
        assert!(table.contains("**warning:** LoRA r8 bf16: the two sides computed different batches"), "{table}");
        assert!(!table.contains("fp32: the two sides computed different batches"), "{table}");
    }

    #[test]
    fn skipped_bf16_jobs_say_why() {
        let table = render(&report(false)).unwrap();
        assert!(table.contains("| full fine-tuning, bf16 (zhijian's layers / PyTorch autocast) | skipped ‡ | skipped ‡ |"), "{table}");
        assert!(table.contains("‡ bf16 matmuls are slow here."), "{table}");
        assert!(!table.contains("**warning:**"), "{table}");
    }

    /// An fp32 zhijian job on its own dropout masks cannot show step-by-step parity: the table says so.
    #[test]
    fn fp32_jobs_without_torch_masks_are_flagged() {
        let mut r = report(false);
        r["results"]["zhijian-lora-fp32"]["dropout_masks"] = json!("fast");
        let table = render(&r).unwrap();
        assert!(table.contains("**warning:** LoRA r8 fp32: zhijian did not draw LibTorch's dropout masks"), "{table}");
        assert!(!table.contains("full fine-tuning fp32: zhijian did not draw"), "{table}");
    }

    /// The time to target is the first epoch at or above PyTorch's final top-1 with dynamic padding; a job that never gets there says so.
    #[test]
    fn time_to_accuracy_table() {
        let curve = |points: &[(f64, f64)]| -> Value {
            let c: Vec<Value> = points.iter().enumerate().map(|(i, (s, a))| json!({ "epoch": i + 1, "seconds": s, "test_top1": a })).collect();
            json!({ "curve": c, "epochs": points.len(), "test_top1": points.last().unwrap().1 })
        };
        let mut results = serde_json::Map::new();
        results.insert("tta-pytorch-linear_probe".into(), curve(&[(100.0, 0.70), (200.0, 0.78)]));
        results.insert("tta-zhijian-linear_probe".into(), curve(&[(40.0, 0.78), (80.0, 0.79)]));
        results.insert("tta-pytorch-lora".into(), curve(&[(100.0, 0.80), (200.0, 0.84), (300.0, 0.85)]));
        let mut lora = curve(&[(90.0, 0.80), (180.0, 0.83), (270.0, 0.849)]);
        lora["peak_rss_bytes"] = json!(1.5 * f64::from(1u32 << 30));
        results.insert("tta-zhijian-lora".into(), lora);
        results.insert("tta-pytorch-lora-grouped".into(), curve(&[(70.0, 0.80), (140.0, 0.84), (210.0, 0.851)]));
        results.insert("tta-zhijian-lora-grouped".into(), curve(&[(60.0, 0.81), (120.0, 0.85), (180.0, 0.86)]));
        results.insert("tta-pytorch-full_finetune".into(), curve(&[(100.0, 0.85), (200.0, 0.85)]));
        results.insert("tta-zhijian-full_finetune".into(), curve(&[(50.0, 0.86), (100.0, 0.86)]));
        let report = json!({ "meta": { "precision": "bf16", "cpu": "a CPU", "commit": "abc", "date_utc": "2026-01-01", "command": "c", "run_seconds": 60.0 }, "results": results });
        let table = render_time_to_accuracy(&report).unwrap();
        assert!(table.contains("| linear_probe | zhijian | dynamic padding | 2 | 79.00 | 78.00 | 40 s (epoch 1) | 5.00× |"), "{table}");
        assert!(table.contains("| lora | zhijian | dynamic padding | 3 | 84.90 | 85.00 | not reached | — |"), "{table}");
        assert!(table.contains("| lora | zhijian | grouped by length | 3 | 86.00 | 85.00 | 120 s (epoch 2) | 2.50× | 1.17× |"), "{table}");
        // The whole run is compared with PyTorch's run batched the same way, whatever the accuracy.
        assert!(table.contains("| lora | zhijian | dynamic padding | 3 | 84.90 | 85.00 | not reached | — | 1.11× |"), "{table}");
        assert!(table.contains("| 80.00 (90 s), 83.00 (180 s), 84.90 (270 s) | 1.50 GiB |"), "{table}");
        assert!(table.contains("| 80.00 (70 s), 84.00 (140 s), 85.10 (210 s) | — |"), "{table}");
        assert!(table.contains("| lora | PyTorch | grouped by length | 3 | 85.10 | 85.00 | 210 s (epoch 3) | 1.43× |"), "{table}");
        // PyTorch reached its final accuracy already after epoch 1; a missing job has no row.
        assert!(table.contains("| full_finetune | PyTorch | dynamic padding | 2 | 85.00 | 85.00 | 100 s (epoch 1) | 1.00× |"), "{table}");
        assert!(table.contains("| full_finetune | zhijian | dynamic padding | 2 | 86.00 | 85.00 | 50 s (epoch 1) | 2.00× |"), "{table}");
        assert!(!table.contains("| full_finetune | zhijian | grouped by length"), "{table}");
    }

    #[test]
    fn time_to_accuracy_methods() {
        assert_eq!(tta_methods(&[]).unwrap(), ["linear_probe", "lora", "full_finetune"]);
        assert_eq!(tta_methods(&["--methods".into(), "full_finetune,lora".into()]).unwrap(), ["full_finetune", "lora"]);
        let err = tta_methods(&["--methods".into(), "lora,bitfit".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown method `bitfit`") && err.contains("known: linear_probe"), "{err}");
        assert!(tta_methods(&["--steps".into(), "3".into()]).is_err());
    }

    #[test]
    fn steps_flag() {
        assert_eq!(parse_steps(&[]).unwrap(), DEFAULT_STEPS);
        assert_eq!(parse_steps(&["--steps".into(), "7".into()]).unwrap(), 7);
        assert!(parse_steps(&["--steps".into(), "0".into()]).is_err());
        assert!(parse_steps(&["--step".into(), "7".into()]).is_err());
    }
}
