//! Embeds `datasets/*.toml` (at the repository root) so binaries find their
//! manifests wherever they run from.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let datasets = manifest_dir.join("../../datasets");
    // The folder's mtime changes when a manifest is added or removed; edits to an
    // existing one are tracked through `include_str!` and the per-file lines below.
    println!("cargo:rerun-if-changed={}", datasets.display());

    let mut entries: Vec<PathBuf> = match fs::read_dir(&datasets) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();

    let mut code = String::from("/// `(file name, contents)` of every embedded manifest, sorted by file name.\n");
    code.push_str("pub(crate) static EMBEDDED: &[(&str, &str)] = &[\n");
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let abs = fs::canonicalize(path).expect("canonicalize manifest path");
        let file_name = path.file_name().unwrap().to_string_lossy();
        code.push_str(&format!("    ({file_name:?}, include_str!({:?})),\n", abs.display().to_string()));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("manifests.rs");
    fs::write(out, code).expect("write manifests.rs");
}
