//! The `zhijian` binary as a user runs it: exit codes and messages.

use std::process::{Command, Output};

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
