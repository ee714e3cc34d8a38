//! `cargo xtask`: set-up, fetch, demo, test, fixtures, reference (and time to accuracy).
//!
//! No LibTorch dependency: `setup` is what installs LibTorch (PyTorch's wheel in
//! a shared venv) and points `.libtorch` at it, so this must build without it.

use std::{
    env,
    ffi::OsString,
    fs, io,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{Context, Result, bail};

mod reference;

/// Assets the workspace tests read; `cargo xtask test` fetches these first.
const TEST_ASSETS: &[&str] = &["all-minilm-l6-v2", "rotten-tomatoes", "optdigits", "mnist-digits", "efficientnet-lite0", "foolbox-samples"];

/// Assets `configs/demo.toml` reads.
const DEMO_ASSETS: &[&str] = &["all-minilm-l6-v2", "rotten-tomatoes"];

/// Installed together in one pip command: pinning torch next to the packages
/// that depend on it stops pip from upgrading it past the one version tch
/// accepts (DESIGN.md §6).
const PINNED: &[&str] = &["torch==2.11.0", "torchvision==0.26.0", "transformers==5.23.0", "peft==0.21.2", "timm==1.0.31", "safetensors", "numpy"];

/// Written into the venv after a successful install; holds `PINNED`, one per line.
const MARKER: &str = "zhijian-pinned.txt";

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup                 create the shared venv, install the pinned PyTorch set, link .libtorch
  fetch [NAMES..|--all] fetch and verify assets (datasets/*.toml)
  test                  setup, fetch the test assets, cargo test --workspace
  demo [--full] [ARGS]  setup, fetch the demo assets, run `zhijian compare configs/demo.toml`
  fixtures              regenerate golden files: run every scripts/gen_*.py with the venv's python
  reference [--steps N] setup, fetch, build; run the same MiniLM training jobs (full fine-tuning, LoRA)
                        in zhijian and in PyTorch + transformers + peft, in fp32 and in bf16 (zhijian's
                        layers, PyTorch's autocast; skipped where bf16 matmuls are slow), one process
                        each, measure the matmul FLOP/s ceiling, print the table and write it with the
                        raw JSON under results/reference/ (default N = 100 steps of 32: 10 min on a
                        2-core CPU without fast bf16; the bf16 jobs add to that)
  reference --time-to-accuracy [--methods linear_probe,lora,full_finetune]
                        the same, on every training review: linear probe, LoRA (3 epochs) and full
                        fine-tuning (2 epochs) on both sides, with dynamic padding and grouped by
                        length, test top-1 after each epoch; the time each took to reach PyTorch's
                        final accuracy, each whole run's time against PyTorch's batched the same way,
                        peak RSS (results/reference/time-to-accuracy.md; 50-55 min on 2 cores with
                        fast bf16 for all three, about 90 in fp32; full fine-tuning alone 15-45)

environment: ZHIJIAN_HOME (default ~/.cache/zhijian; the venv is $ZHIJIAN_HOME/venv),
             ZHIJIAN_CACHE (assets; default ~/.cache/zhijian/assets)";

fn main() {
    if let Err(e) = run() {
        // The chain, not anyhow's Debug form: that adds a backtrace whenever RUST_BACKTRACE is set.
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    match cmd.as_deref() {
        Some("setup") => setup().map(|_| ()),
        Some("fetch") => fetch_cmd(&rest),
        Some("test") => test(),
        Some("demo") => demo(&rest),
        Some("fixtures") => fixtures(),
        Some("reference") => reference::reference(&rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
        None => bail!("no command given\n\n{USAGE}"),
    }
}

fn repo_root() -> PathBuf {
    // xtask/ sits directly under the repository root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent folder").to_owned()
}

fn zhijian_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("ZHIJIAN_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").filter(|h| !h.is_empty()).context("neither ZHIJIAN_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/zhijian"))
}

fn step(msg: &str) {
    println!("xtask: {msg}");
}

/// Makes the venv, the pinned install and the `.libtorch` link exist; returns the venv's python.
fn setup() -> Result<PathBuf> {
    let t0 = Instant::now();
    let venv = zhijian_home()?.join("venv");
    let python = venv.join("bin/python");

    if python.exists() {
        step(&format!("venv {} exists", venv.display()));
    } else {
        step(&format!("creating venv {}", venv.display()));
        fs::create_dir_all(venv.parent().unwrap_or(&venv)).with_context(|| format!("creating {}", venv.display()))?;
        let status = spawn(Command::new("python3").arg("-m").arg("venv").arg(&venv), "python3", "creating the venv")?;
        if !status.success() {
            bail!("`python3 -m venv {}` failed ({status}); on Debian/Ubuntu install `python3-venv`", venv.display());
        }
    }

    let marker = venv.join(MARKER);
    let wanted = PINNED.join("\n") + "\n";
    let site = site_packages(&venv)?;
    let missing = site.as_deref().map_or_else(|| PINNED.to_vec(), missing_dists);
    let marker_ok = fs::read_to_string(&marker).is_ok_and(|m| m == wanted);
    if missing.is_empty() {
        if marker_ok {
            step("pinned packages installed (marker matches)");
        } else {
            // A venv made by hand with the right versions needs no second install.
            step("pinned packages found installed; recording the marker");
            fs::write(&marker, &wanted).with_context(|| format!("writing {}", marker.display()))?;
        }
    } else {
        step(&format!("installing {} (missing: {})", PINNED.join(" "), missing.join(" ")));
        let status = spawn(
            Command::new(&python).args(["-m", "pip", "install", "--disable-pip-version-check"]).args(PINNED),
            &python.display().to_string(),
            "installing the pinned packages",
        )?;
        if !status.success() {
            bail!("pip install failed ({status}); is PyPI reachable?");
        }
        fs::write(&marker, &wanted).with_context(|| format!("writing {}", marker.display()))?;
    }

    let link = repo_root().join(".libtorch");
    let expected = match site_packages(&venv)? {
        Some(site) => site.join("torch"),
        None => bail!("no lib/python*/site-packages in {} after installing", venv.display()),
    };
    let current = fs::read_link(&link).ok();
    if current.as_deref() == Some(expected.as_path()) && expected.join("lib").is_dir() {
        step(&format!(".libtorch -> {} (unchanged)", expected.display()));
    } else {
        // Ask torch itself where it lives rather than trusting the folder layout.
        let out = Command::new(&python)
            .args(["-c", "import torch, os; print(os.path.dirname(torch.__file__))"])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!("`import torch` failed in the venv: {}", String::from_utf8_lossy(&out.stderr));
        }
        let torch_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        match fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => fs::remove_file(&link)?,
            Ok(_) => bail!("{} exists and is not a symlink; move it away", link.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("inspecting {}", link.display())),
        }
        symlink(&torch_dir, &link)?;
        step(&format!(".libtorch -> {}", torch_dir.display()));
    }
    step(&format!("setup done in {:.1} s", t0.elapsed().as_secs_f64()));
    Ok(python)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> Result<()> {
    bail!("setup links .libtorch with a symlink and supports only Unix")
}

/// The venv's `lib/pythonX.Y/site-packages`, found without starting Python.
fn site_packages(venv: &Path) -> Result<Option<PathBuf>> {
    let lib = venv.join("lib");
    let Ok(entries) = fs::read_dir(&lib) else { return Ok(None) };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python")))
        .map(|p| p.join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => bail!("{} holds several pythonX.Y folders; remove the venv and rerun setup", lib.display()),
    }
}

/// The requirements of `PINNED` with no matching `*.dist-info` in `site`.
fn missing_dists(site: &Path) -> Vec<&'static str> {
    let names: Vec<String> =
        fs::read_dir(site).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_lowercase())).collect()).unwrap_or_default();
    PINNED
        .iter()
        .copied()
        .filter(|req| {
            // dist-info folders use the normalised name: lower case, `-` as `_`.
            let (name, version) = req.split_once("==").unwrap_or((req, ""));
            let prefix = format!("{}-", name.to_lowercase().replace('-', "_"));
            !names.iter().any(|n| n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".dist-info")).is_some_and(|v| version.is_empty() || v == version))
        })
        .collect()
}

fn fetch_cmd(args: &[String]) -> Result<()> {
    let known: Vec<String> = zhijian_assets::manifests()?.into_iter().map(|m| m.name).collect();
    let names: Vec<String> = if args.iter().any(|a| a == "--all") {
        known.clone()
    } else {
        if let Some(flag) = args.iter().find(|a| a.starts_with('-')) {
            bail!("unknown option `{flag}` for fetch (only --all)");
        }
        args.to_vec()
    };
    if names.is_empty() {
        bail!("name the assets to fetch, or pass --all; known: {}", known.join(", "));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    fetch_assets(&names)
}

fn fetch_assets(names: &[&str]) -> Result<()> {
    for name in names {
        let t0 = Instant::now();
        let m = zhijian_assets::manifest(name)?;
        step(&format!("fetching {name} ({} files) into {}", m.files.len(), zhijian_assets::cache_dir().join(name).display()));
        zhijian_assets::fetch(name, |line| println!("  {line}"))?;
        step(&format!("{name}: verified in {:.1} s", t0.elapsed().as_secs_f64()));
    }
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    fetch_assets(TEST_ASSETS)?;
    step("cargo test --workspace");
    let status = spawn(cargo().current_dir(repo_root()).args(["test", "--workspace"]), "cargo", "running the tests")?;
    exit_like(status)
}

fn demo(args: &[String]) -> Result<()> {
    setup()?;
    fetch_assets(DEMO_ASSETS)?;
    let mut cmd = cargo();
    cmd.current_dir(repo_root())
        // The dev profile optimises dependencies (LibTorch does the compute), so
        // the demo reuses the test build instead of compiling everything again.
        .args(["run", "-p", "zhijian-cli", "--", "compare", "configs/demo.toml"])
        .args(args);
    step(&format!("cargo run -p zhijian-cli -- compare configs/demo.toml {}", args.join(" ")));
    let status = spawn(&mut cmd, "cargo", "running the demo")?;
    exit_like(status)
}

fn fixtures() -> Result<()> {
    let python = setup()?;
    let scripts_dir = repo_root().join("scripts");
    let mut scripts: Vec<PathBuf> = match fs::read_dir(&scripts_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with("gen_") && n.ends_with(".py")
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context(format!("listing {}", scripts_dir.display())),
    };
    scripts.sort();
    if scripts.is_empty() {
        step("no scripts/gen_*.py: nothing to regenerate");
        return Ok(());
    }
    for script in &scripts {
        step(&format!("python {}", script.strip_prefix(repo_root()).unwrap_or(script).display()));
        let status = spawn(Command::new(&python).arg(script).current_dir(repo_root()), "python", "generating fixtures")?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
    }
    step(&format!("{} fixture script(s) ran", scripts.len()));
    Ok(())
}

/// The cargo that runs us, so `cargo +toolchain xtask` stays on that toolchain.
fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// Runs with inherited stdio; a missing program gets a clear message.
fn spawn(cmd: &mut Command, program: &str, why: &str) -> Result<ExitStatus> {
    cmd.status().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!("`{program}` not found on PATH (needed for {why})")
        } else {
            anyhow::Error::new(e).context(format!("starting `{program}` ({why})"))
        }
    })
}

fn exit_like(status: ExitStatus) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    // The child already reported; pass its code on so CI sees the same failure.
    std::process::exit(status.code().unwrap_or(1));
}
