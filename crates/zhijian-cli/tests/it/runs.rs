//! `zhijian compare` on a small image folder it can train on in seconds: a
//! comparison killed with SIGKILL mid-run resumes without losing a finished
//! record, and a diverging strategy is recorded as failed while the next one runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zhijian_bench::read_records;

use crate::stderr;

/// `root/imgs/{bright_top,bright_bottom}/*.png`: 28×28 images, a class each
/// for a bright upper or lower half, with pseudo-random noise.
pub(crate) fn image_folder(root: &Path) -> PathBuf {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut noise = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 58) as u8
    };
    let folder = root.join("imgs");
    for (class, top) in [("bright_top", true), ("bright_bottom", false)] {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        for i in 0..24 {
            let img = image::RgbImage::from_fn(28, 28, |_, y| {
                let lit = (y < 14) == top;
                let v = if lit { 190 } else { 40 } + noise();
                image::Rgb([v, v, v])
            });
            img.save(folder.join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
    folder
}

/// An experiment of the small CNN on the folder, with `strategies` appended.
fn experiment(dir: &Path, steps: usize, strategies: &str) -> PathBuf {
    image_folder(dir);
    let text = format!(
        "name = \"runs\"\ndevice = \"cpu\"\n\
         [backbone]\nkind = \"small_cnn\"\nchannels = [8, 16]\n\
         [data]\nkind = \"image_folder\"\npath = \"imgs\"\nholdout = [0.25, 0.25]\naugment = {{ scale = [1.0, 1.0], ratio = [1.0, 1.0], hflip = false }}\n\
         [train]\nepochs = {steps}\nmax_steps = {steps}\nbatch_size = 8\neval_batch_size = 32\nlr = 1e-3\nwarmup_ratio = 0.0\n\
         {strategies}"
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn compare(config: &Path, records: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zhijian"));
    cmd.args(["compare", config.to_str().unwrap(), "--records", records.to_str().unwrap(), "--no-feature-cache"]);
    cmd
}

/// Kills the comparison as soon as its first record is written (the second
/// run is then under way), checking the records file parses at every look;
/// a rerun redoes only what was not recorded.
#[test]
fn sigkill_mid_comparison_loses_no_finished_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = experiment(dir.path(), 60, "[[strategy]]\nname = \"full\"\nmethods = [{ method = \"full_finetune\" }]\n");
    let seeds = ["--seeds", "0,1,2,3"];
    let records = dir.path().join("records.jsonl");
    let mut child = compare(&config, &records).args(seeds).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    let mut looks = 0;
    let finished_before_kill = loop {
        // Valid whenever it exists: the whole file is replaced by rename, never torn.
        let now = read_records(&records).expect("the records file parses at every moment");
        looks += 1;
        if !now.is_empty() {
            child.kill().unwrap();
            break now;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the comparison ended ({status}) before its first record");
        }
        assert!(started.elapsed() < Duration::from_secs(300), "no record after 300 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.wait().unwrap();
    let after_kill = read_records(&records).unwrap();
    assert!(looks > 1 && !after_kill.is_empty() && after_kill.len() < 4, "killed with {} of 4 runs recorded", after_kill.len());
    assert_eq!(after_kill[..finished_before_kill.len()], finished_before_kill[..]);
    let kept = std::fs::read_to_string(&records).unwrap();

    let out = compare(&config, &records).args(seeds).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let all = read_records(&records).unwrap();
    assert_eq!(all.len(), 4, "every seed recorded once");
    assert!(std::fs::read_to_string(&records).unwrap().starts_with(&kept), "finished records kept byte for byte");
    let mut seeds: Vec<u64> = all.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    assert_eq!(seeds, [0, 1, 2, 3]);
    assert_eq!(stderr(&out).matches("already recorded").count(), after_kill.len(), "{}", stderr(&out));
    assert!(all.iter().all(|r| r.finished() && r.steps == 60), "{all:?}");
}

/// A strategy whose loss turns NaN is recorded as failed, with its reason;
/// the next strategy still runs; the table says failed, never a number.
#[test]
fn a_diverging_strategy_is_recorded_as_failed_and_the_comparison_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let strategies = "[[strategy]]\nname = \"hot\"\nmethods = [{ method = \"full_finetune\" }]\ntrain = { lr = 1e300 }\n\
                      [[strategy]]\nname = \"calm\"\nmethods = [{ method = \"full_finetune\" }]\n";
    let config = experiment(dir.path(), 4, strategies);
    let records = dir.path().join("records.jsonl");
    let out = compare(&config, &records).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("hot seed 0: FAILED, training diverged"), "{}", stderr(&out));
    let all = read_records(&records).unwrap();
    assert_eq!(all.iter().map(|r| (r.strategy.as_str(), r.finished())).collect::<Vec<_>>(), [("hot", false), ("calm", true)]);
    assert!(all[0].failed.as_ref().unwrap().contains("lower train.lr") && all[0].test_top1.is_nan());
    assert!(all[0].host.as_ref().is_some_and(|h| h.cpus >= 1), "a failed run says where it ran too");
    assert!(std::fs::read_to_string(&records).unwrap().lines().next().unwrap().contains("\"test_top1\":null"));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let hot = table.lines().find(|l| l.starts_with("| hot ")).unwrap();
    // The accuracy cell says why; no cell is a NaN figure (the reason may say `loss NaN`).
    assert!(hot.contains("| failed: training diverged") && !hot.split('|').any(|cell| cell.trim() == "NaN"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("| calm | 1 |")), "{table}");

    // A rerun does not retry it, and says how to.
    let again = compare(&config, &records).output().unwrap();
    assert!(again.status.success() && stderr(&again).contains("recorded as failed") && stderr(&again).contains("to retry"), "{}", stderr(&again));
    let report = crate::zhijian(&["report", records.to_str().unwrap()]);
    assert!(report.status.success() && String::from_utf8_lossy(&report.stdout).contains("- hot seed 0: training diverged"), "{}", stderr(&report));
}
