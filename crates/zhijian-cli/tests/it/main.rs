//! The `zhijian` binary as a user runs it: exit codes and messages.

use std::process::{Command, Output};

mod damaged;
mod peft;
mod presets;
mod runs;

fn zhijian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zhijian")).args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn methods_lists_every_registered_method_with_its_stage() {
    let out = zhijian(&["methods"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["full_finetune", "linear_probe", "lora"] {
        assert!(text.lines().any(|l| l.starts_with(name) && l.contains("architect")), "{text}");
    }
}

#[test]
fn errors_exit_non_zero_and_say_what_is_wrong() {
    let out = zhijian(&["compare", "no/such/experiment.toml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no/such/experiment.toml"), "{}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exp.toml");
    std::fs::write(&config, "name = \"x\"\n[backbone]\nkind = \"resnt\"\n").unwrap();
    let out = zhijian(&["compare", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown variant `resnt`") && stderr(&out).contains("efficientnet_lite"), "{}", stderr(&out));

    let out = zhijian(&["fetch", "no-such-asset"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("all-minilm-l6-v2"), "known assets listed: {}", stderr(&out));

    let out = zhijian(&["compare", config.to_str().unwrap(), "--device", "tpu"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown device `tpu`"), "{}", stderr(&out));
}

#[test]
fn report_renders_a_records_file() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("r.jsonl");
    let record = r#"{"experiment":"e","strategy":"lora","seed":0,"key":"k","methods":[],"train":{},"backbone":"b","data":"d","device":"cpu","git_rev":"x","finished_at":0,"trainable_params":10,"total_params":100,"feature_seconds":0.0,"train_seconds":2.0,"train_samples_per_s":50.0,"steps":3,"final_loss":0.5,"val_top1":[0.5],"test_top1":0.75,"test_n":4,"peak_rss_bytes":null,"artifact_bytes":10}"#;
    std::fs::write(&records, format!("{record}\n")).unwrap();
    let out = zhijian(&["report", records.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("| lora | 1 | 10 / 100 (10.00%) | 75.00 |"));
    let out = zhijian(&["report", records.to_str().unwrap(), "--experiment", "other"]);
    assert!(!out.status.success() && stderr(&out).contains("no records"), "{}", stderr(&out));
}

/// A record line of `strategy` seed 0 with its key, test top-1 and finishing time.
fn record_line(strategy: &str, key: &str, top1: f64, finished_at: u64) -> String {
    format!(
        r#"{{"experiment":"e","strategy":"{strategy}","seed":0,"key":"{key}","methods":[],"train":{{}},"backbone":"b","data":"d","device":"cpu","git_rev":"x","finished_at":{finished_at},"trainable_params":10,"total_params":100,"feature_seconds":0.0,"train_seconds":2.0,"train_samples_per_s":50.0,"steps":3,"final_loss":0.5,"val_top1":[0.5],"test_top1":{top1},"test_n":4,"peak_rss_bytes":null,"artifact_bytes":10}}"#
    )
}

/// Shard files merge: a run recorded twice alike is one run, a run recorded
/// with different results fails the report (naming both lines) unless
/// `--keep-first`; `--out` writes the merged file, never over one not read.
#[test]
fn report_merges_files_dropping_duplicates_and_naming_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&a, format!("{}\n{}\n", record_line("lora", "k1", 0.75, 1), record_line("full", "k2", 0.625, 1))).unwrap();
    std::fs::write(&b, format!("{}\n\n{}\n", record_line("lora", "k1", 0.75, 2), record_line("full", "k2", 0.5, 2))).unwrap();
    let (a_arg, b_arg) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = zhijian(&["report", a_arg, b_arg]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a conflict fails the report: {err}");
    assert!(err.contains("1 duplicate record(s) dropped"), "{err}");
    assert!(err.contains(&format!("conflict: run k2 (e / full seed 0): {a_arg}:2 and {b_arg}:3 differ in test_top1: 0.625 vs 0.5")), "{err}");
    assert!(err.contains("--keep-first"), "{err}");
    assert!(out.stdout.is_empty(), "no table when the report fails");

    let merged = dir.path().join("merged.jsonl");
    let out = zhijian(&["report", a_arg, b_arg, "--keep-first", "--out", merged.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| lora | 1 |") && table.contains("| 62.50 |") && !table.contains("| 50.00 |"), "the first record is kept: {table}");
    let lines = std::fs::read_to_string(&merged).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(stderr(&out).contains(&format!("2 record(s) from 2 file(s) written to {}", merged.display())), "{}", stderr(&out));
    assert!(dir.path().join("plots/merged-accuracy-vs-params.svg").exists(), "plots beside --out, named after it");

    // The merged file itself may be read and rewritten; another existing file may not be overwritten.
    let out = zhijian(&["report", merged.to_str().unwrap(), a_arg, "--out", merged.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("2 duplicate record(s) dropped"), "{}", stderr(&out));
    let out = zhijian(&["report", a_arg, "--out", b_arg]);
    assert!(!out.status.success() && stderr(&out).contains("is not one of the records files read"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&b).unwrap().lines().count(), 3, "b.jsonl untouched");

    let missing = dir.path().join("shard-9.jsonl");
    let out = zhijian(&["report", a_arg, missing.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("shard-9.jsonl"), "{}", stderr(&out));
    let out = zhijian(&["report"]);
    assert!(!out.status.success() && stderr(&out).contains("RECORDS"), "{}", stderr(&out));
}

/// `--slurm N` runs nothing: it writes the job array's script (task k runs
/// shard k/N into its own file) and says how to submit it and merge the shards.
#[test]
fn compare_with_slurm_writes_a_job_array_script() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("my exp.toml");
    let text = "name = \"tiny\"\ndevice = \"cpu\"\n[backbone]\nkind = \"small_cnn\"\nchannels = [8, 16]\n\
                [data]\nkind = \"image_folder\"\npath = \"imgs\"\nholdout = [0.25, 0.25]\n[train]\nmax_steps = 2\n\
                [[strategy]]\nname = \"full\"\nmethods = [{ method = \"full_finetune\" }]\n\
                [[strategy]]\nname = \"probe\"\nmethods = [{ method = \"linear_probe\" }]\n";
    std::fs::write(&config, text).unwrap();
    let records = dir.path().join("res/runs.jsonl");
    let (config_arg, records_arg) = (config.to_str().unwrap(), records.to_str().unwrap());
    let out = zhijian(&["compare", config_arg, "--records", records_arg, "--seeds", "0,1", "--slurm", "3", "--slurm-time", "0:10:00", "--no-feature-cache"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let script = dir.path().join("res/tiny.sbatch");
    assert!(stdout.contains("a job array of 3 task(s) over 4 run(s)") && stdout.contains(&format!("sbatch {}", script.display())), "{stdout}");
    assert!(stdout.contains(&format!("report {} ", dir.path().join("res/runs.shard-0-of-3.jsonl").display())), "{stdout}");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --array=0-2") && body.contains("#SBATCH --time=0:10:00"), "{body}");
    let exec = body.lines().find(|l| l.starts_with("exec ")).unwrap();
    assert!(exec.contains(&format!(" compare '{config_arg}' --seeds 0,1 --no-feature-cache --shard \"${{SLURM_ARRAY_TASK_ID}}/3\"")), "{exec}");
    assert!(exec.ends_with(&format!("--records {}.shard-\"${{SLURM_ARRAY_TASK_ID}}\"-of-3.jsonl", dir.path().join("res/runs").display())), "{exec}");
    assert!(dir.path().join("res/slurm-logs").is_dir(), "Slurm does not create the log folder");
    assert!(!records.exists(), "nothing ran");

    let out = zhijian(&["compare", config_arg, "--slurm", "2", "--shard", "0/2"]);
    assert!(!out.status.success() && stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
    let out = zhijian(&["compare", config_arg, "--records", records_arg, "--slurm", "5", "--seeds", "0,1"]);
    assert!(!out.status.success() && stderr(&out).contains("5 Slurm tasks for a grid of 4 run(s)"), "{}", stderr(&out));
    let out = zhijian(&["compare", config_arg, "--slurm-time", "1:00:00"]);
    assert!(!out.status.success() && stderr(&out).contains("--slurm"), "{}", stderr(&out));
}

/// A fixture of zhijian-core's `.pth` reader (written by scripts/gen_pth_fixture.py).
fn pth_fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../zhijian-core/tests/fixtures").join(name);
    path.to_str().unwrap().to_owned()
}

#[test]
fn convert_writes_safetensors_and_lists_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    for (input, layout) in [("tiny_legacy.pth", "legacy pickle"), ("tiny_zip.pth", "zip")] {
        let output = dir.path().join(input.replace(".pth", ".safetensors"));
        let out = zhijian(&["convert", &pth_fixture(input), output.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("18 tensors, 73 parameters ({layout} layout)")), "{text}");
        assert!(text.contains("skipped 3 entries") && text.contains("  step (int)") && text.contains("  aux.1 (str)"), "{text}");
        // The safetensors header names every tensor.
        let written = std::fs::read(&output).unwrap();
        let header_len = u64::from_le_bytes(written[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8_lossy(&written[8..8 + header_len]);
        assert!(header.contains("\"block.inner.bias\"") && header.contains("\"transposed\""), "{header}");
    }
}

#[test]
fn convert_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.safetensors");
    let bad = dir.path().join("notes.pth");
    std::fs::write(&bad, "not a checkpoint").unwrap();
    let out = zhijian(&["convert", bad.to_str().unwrap(), output.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("notes.pth") && stderr(&out).contains("not a PyTorch checkpoint"), "{}", stderr(&out));
    assert!(!output.exists());

    let out = zhijian(&["convert", "no/such/model.pth", output.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("no/such/model.pth"), "{}", stderr(&out));
}
