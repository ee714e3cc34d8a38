//! Adapters in Hugging Face PEFT's layout, both ways: a finished run's LoRA or
//! IA³ as a folder `peft.PeftModel.from_pretrained(base, DIR)` loads on the same
//! base model, and a PEFT LoRA / IA³ folder as a zhijian method config plus an
//! artifact [`zhijian_core::train::restore`] loads.
//!
//! The folder holds PEFT's two files and one of zhijian's:
//!
//! - `adapter_config.json`: `peft_type` `LORA` or `IA3`, `task_type`
//!   `FEATURE_EXTRACTION` (the base is a bare `BertModel`: the head is zhijian's,
//!   not a transformers task head), every adapted module by its exact path in
//!   `target_modules`, and per-module ranks and alphas as exact paths in
//!   `rank_pattern` / `alpha_pattern`.
//! - `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight`
//!   (`[r, in]`), `.lora_B.weight` (`[out, r]`), `.lora_magnitude_vector`
//!   (`[out]`, DoRA), or `.ia3_l` (`[out, 1]`, or `[1, in]` for a feed-forward
//!   module, whose input is scaled).
//! - `zhijian_head.safetensors`: the run's classification head, `weight`
//!   (`[classes, hidden]`) and `bias` (`[classes]`), applied to the pooled
//!   features (the pooling is named in `zhijian_head.json`). PEFT does not read
//!   these; they make the run's logits reproducible (see `scripts/peft_parity.py`).
//!
//! The mappings are exact, not approximate: zhijian keeps LoRA's `B` unscaled
//! and applies `s = α/r` (`α/√r` with rsLoRA) in the forward pass, as PEFT
//! does, and DoRA's norm is PEFT's (per output row of `W + s·BA`, detached).
//! What has no exact counterpart is refused with an error naming what is
//! supported: prefix tuning and VPT (PEFT's prompts enter the embeddings and
//! the pooled states differently), LoRA on convolutions, IA³ on a fused `qkv`,
//! strategies of several methods, and artifacts holding backbone weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tch::{Device, Tensor};
use zhijian_architect::{Ia3, Ia3Config, Lora, LoraConfig};
use zhijian_backbones::{Bert, BertConfig, Pooling, load_pretrained};
use zhijian_core::targets::select_sites;
use zhijian_core::weights::{read_safetensors, write_atomic};
use zhijian_core::{Error, Method, Model, Result, Role, Site, parse_config, save_atomic};

use crate::record::{Record, read_records};

/// PEFT's adapter configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// zhijian's head (`weight`, `bias`), beside PEFT's files.
pub const HEAD_FILE: &str = "zhijian_head.safetensors";
/// How the head's input is pooled, and where the run came from.
pub const HEAD_INFO_FILE: &str = "zhijian_head.json";
/// The prefix PEFT gives every key of a `PeftModel`'s adapter.
const PREFIX: &str = "base_model.model.";
/// What export and import support, for error messages.
const SUPPORTED: &str = "lora (with use_dora, rslora, rank_pattern, alpha_pattern) or ia3, as the strategy's only method, on linear layers";

/// An adapter in PEFT's layout, in memory.
pub struct PeftAdapter {
    /// The contents of `adapter_config.json`.
    pub config: Value,
    /// The tensors of `adapter_model.safetensors`, under PEFT's key names.
    pub tensors: Vec<(String, Tensor)>,
    /// zhijian's head (`weight`, `bias`); empty when the folder has none.
    pub head: Vec<(String, Tensor)>,
    /// The contents of `zhijian_head.json` (`pooling`, provenance); null when absent.
    pub head_info: Value,
}

/// A PEFT adapter turned into zhijian's terms.
pub struct Imported {
    /// The method entry (`{ method = "lora", rank = …, targets = [exact paths], … }`).
    pub method: toml::Table,
    /// The tensors under artifact names (`lora/<site>.lora_A`, …, `head.weight`),
    /// ready for [`zhijian_core::save_atomic`] and [`zhijian_core::train::restore`].
    pub tensors: Vec<(String, Tensor)>,
}

fn unsupported(method: &str, what: impl Into<String>) -> Error {
    Error::Unsupported { method: method.into(), operation: format!("{}; PEFT export and import support {SUPPORTED}", what.into()) }
}

/// The Hugging Face name of an asset's model (`sentence-transformers/all-MiniLM-L6-v2`),
/// read off its manifest's `huggingface.co/<org>/<name>/resolve/` source; the asset's
/// own name when it has none.
pub fn base_model_name(asset: &str) -> String {
    let urls = zhijian_assets::manifest(asset).map(|m| m.files.into_iter().flat_map(|f| f.sources).collect::<Vec<_>>()).unwrap_or_default();
    urls.iter()
        .find_map(|s| match s {
            zhijian_assets::Source::Url { url } => {
                url.strip_prefix("https://huggingface.co/").and_then(|rest| rest.split_once("/resolve/")).map(|(repo, _)| repo.to_string())
            }
            _ => None,
        })
        .unwrap_or_else(|| asset.to_string())
}

/// The asset a `base_model_name_or_path` names: its Hugging Face name (the
/// inverse of [`base_model_name`]), the asset's own name, or its folder in
/// the asset cache (what PEFT writes for a base loaded from there).
pub fn asset_for_base_model(name: &str) -> Option<String> {
    let assets = zhijian_assets::manifests().ok()?;
    let folder = Path::new(name).strip_prefix(zhijian_assets::cache_dir()).ok().and_then(|p| p.to_str()).map(|p| p.trim_end_matches('/').to_string());
    assets.into_iter().map(|m| m.name).find(|a| a == name || base_model_name(a) == name || folder.as_deref() == Some(a.as_str()))
}

/// A BERT-family model from an asset (`config.json`, `model.safetensors`) with
/// a fresh `num_classes` head: the base model an adapter applies to.
pub fn bert_model(asset: &str, pooling: Pooling, num_classes: i64, device: Device) -> Result<Model> {
    let locate = |file: &str| zhijian_assets::locate(asset, file).map_err(|e| Error::Data(e.to_string()));
    let config = BertConfig { pooling, ..BertConfig::from_json(&locate("config.json")?)? };
    config.validate()?;
    let model = Model::new(device, num_classes, |p| Box::new(Bert::new(p, &config).expect("validated")));
    load_pretrained(&model, &locate("model.safetensors")?)?;
    Ok(model)
}

/// The last finished record of `strategy` with `seed` in a records file (of
/// `experiment`, when given; an error if several experiments have such a
/// run), and its artifact: `artifacts/<experiment>/<strategy>-seed<k>.safetensors`
/// beside the records file, where `compare` saves it.
pub fn find_run(records: &Path, experiment: Option<&str>, strategy: &str, seed: u64) -> Result<(Record, PathBuf)> {
    let all = read_records(records)?;
    if all.is_empty() {
        return Err(Error::Config(format!("{}: no records (is it a records file written by `compare`?)", records.display())));
    }
    let runs: Vec<&Record> =
        all.iter().filter(|r| r.strategy == strategy && r.seed == seed && r.failed.is_none() && experiment.is_none_or(|e| r.experiment == e)).collect();
    let Some(run) = runs.last() else {
        let known: std::collections::BTreeSet<String> = all.iter().filter(|r| r.failed.is_none()).map(|r| format!("{} seed {}", r.strategy, r.seed)).collect();
        return Err(Error::Config(format!(
            "{}: no finished run of strategy `{strategy}` with seed {seed}{}; finished runs: {}",
            records.display(),
            experiment.map(|e| format!(" in experiment `{e}`")).unwrap_or_default(),
            known.into_iter().collect::<Vec<_>>().join(", ")
        )));
    };
    if let Some(other) = runs.iter().find(|r| r.experiment != run.experiment) {
        return Err(Error::Config(format!(
            "{}: experiments `{}` and `{}` both have `{strategy}` seed {seed}; choose one with --experiment",
            records.display(),
            other.experiment,
            run.experiment
        )));
    }
    let artifact = records.parent().unwrap_or(Path::new(".")).join("artifacts").join(&run.experiment).join(format!("{strategy}-seed{seed}.safetensors"));
    Ok(((*run).clone(), artifact))
}

/// What [`export_run`] wrote.
pub struct ExportReport {
    /// `LORA` or `IA3`.
    pub peft_type: String,
    /// Modules adapted.
    pub modules: usize,
    /// The artifact read.
    pub artifact: PathBuf,
    /// The base model named in `adapter_config.json`.
    pub base_model: String,
}

/// Exports the run of `strategy` with `seed` recorded in `records` (see
/// [`find_run`]; `artifact` overrides where its tensors are read) into `dir`.
/// The run's backbone must be a BERT-family asset: PEFT's module names are
/// Hugging Face's, and zhijian's BERT uses them.
pub fn export_run(records: &Path, experiment: Option<&str>, strategy: &str, seed: u64, artifact: Option<&Path>, dir: &Path) -> Result<ExportReport> {
    let (record, found) = find_run(records, experiment, strategy, seed)?;
    let artifact = artifact.map_or(found, Path::to_path_buf);
    let backbone = record.config.get("backbone").cloned().unwrap_or(Value::Null);
    if backbone.is_null() {
        return Err(Error::Config(format!(
            "{}: the record of `{strategy}` seed {seed} has no `config` (written by an older zhijian); rerun it",
            records.display()
        )));
    }
    let (weights, pooling) = match serde_json::from_value(backbone.clone()) {
        Ok(crate::BackboneConfig::Bert { layers: Some(kept), .. }) => {
            return Err(Error::Config(format!(
                "PEFT export loads the whole encoder; `{strategy}` ran on its first {kept} layers (`backbone.layers`), which PEFT cannot express"
            )));
        }
        Ok(crate::BackboneConfig::Bert { weights, pooling, layers: None }) => (weights, pooling),
        Ok(_) => {
            let kind = backbone.get("kind").and_then(Value::as_str).unwrap_or("?");
            return Err(Error::Config(format!(
                "PEFT export needs a bert backbone (Hugging Face module names); `{strategy}` ran on {kind}. It supports {SUPPORTED}"
            )));
        }
        Err(e) => return Err(Error::Config(format!("{}: the record's backbone config: {e}", records.display()))),
    };
    let methods: Vec<toml::Table> =
        serde_json::from_value(record.methods.clone()).map_err(|e| Error::Config(format!("{}: the record's methods: {e}", records.display())))?;
    let tensors = read_safetensors(&artifact)?;
    let classes = tensors
        .iter()
        .find(|(n, _)| n == "head.weight")
        .map(|(_, t)| t.size()[0])
        .ok_or_else(|| Error::MissingWeights { path: artifact.clone(), names: vec!["head.weight".into()] })?;
    let model = bert_model(&weights, pooling, classes, Device::Cpu)?;
    let base_model = base_model_name(&weights);
    let mut adapter = export(&methods, &tensors, &model, &base_model)?;
    adapter.head_info = json!({
        "pooling": pooling,
        "backbone": backbone,
        "experiment": record.experiment,
        "strategy": record.strategy,
        "seed": record.seed,
        "key": record.key,
    });
    write(&adapter, dir)?;
    let peft_type = adapter.config["peft_type"].as_str().unwrap_or_default().to_string();
    let modules = adapter.config["target_modules"].as_array().map_or(0, Vec::len);
    Ok(ExportReport { peft_type, modules, artifact, base_model })
}

/// What [`import_dir`] wrote.
pub struct ImportReport {
    /// The backbone asset the adapter was checked against.
    pub asset: String,
    /// The pooling the head expects (from `zhijian_head.json`; mean without one).
    pub pooling: Pooling,
    /// The method entry to use.
    pub method: toml::Table,
    /// Tensors written.
    pub tensors: usize,
    /// Whether the folder had zhijian's head (a PEFT adapter alone has none).
    pub head: bool,
}

impl ImportReport {
    /// A `[[strategy]]` table using the imported method, as TOML.
    pub fn strategy_toml(&self, name: &str) -> String {
        let mut strategy = toml::Table::new();
        strategy.insert("name".into(), toml::Value::String(name.into()));
        strategy.insert("methods".into(), toml::Value::Array(vec![toml::Value::Table(self.method.clone())]));
        let mut doc = toml::Table::new();
        doc.insert("strategy".into(), toml::Value::Array(vec![toml::Value::Table(strategy)]));
        toml::to_string(&doc).unwrap_or_default()
    }
}

/// Imports the PEFT adapter in `dir` for the BERT-family asset `backbone`
/// (default: the asset whose Hugging Face name is the adapter's
/// `base_model_name_or_path`) and writes its tensors, under zhijian's names,
/// to the artifact `out` (atomically).
pub fn import_dir(dir: &Path, backbone: Option<&str>, out: &Path) -> Result<ImportReport> {
    let adapter = read(dir)?;
    let base = adapter.config.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default();
    let asset = match backbone {
        Some(a) => a.to_string(),
        None => asset_for_base_model(base).ok_or_else(|| {
            Error::Config(format!("{}: base model `{base}` is no zhijian asset; name the backbone asset with --backbone", dir.join(CONFIG_FILE).display()))
        })?,
    };
    let pooling = match adapter.head_info.get("pooling") {
        Some(p) => serde_json::from_value(p.clone()).map_err(|e| Error::CorruptFile { path: dir.join(HEAD_INFO_FILE), reason: format!("pooling: {e}") })?,
        None => Pooling::Mean,
    };
    let classes = adapter.head.iter().find(|(n, _)| n == "weight").map_or(2, |(_, t)| t.size()[0]);
    let model = bert_model(&asset, pooling, classes, Device::Cpu)?;
    let imported = import(&adapter, &model)?;
    save_atomic(&imported.tensors, out)?;
    Ok(ImportReport { asset, pooling, method: imported.method, tensors: imported.tensors.len(), head: !adapter.head.is_empty() })
}

/// A run's adapter in PEFT's layout. `methods` are the strategy's method
/// entries, `artifact` the run's saved tensors ([`zhijian_core::train::artifact`]),
/// `model` the base model (built as for the run), `base_model` the name written
/// to `base_model_name_or_path`.
pub fn export(methods: &[toml::Table], artifact: &[(String, Tensor)], model: &Model, base_model: &str) -> Result<PeftAdapter> {
    let names: Vec<&str> = methods.iter().map(|m| m.get("method").and_then(toml::Value::as_str).unwrap_or("?")).collect();
    let [entry] = methods else {
        return Err(unsupported(&names.join(" + "), format!("PEFT export of a strategy of {} methods", methods.len())));
    };
    let name = names[0];
    let mut rest = entry.clone();
    rest.remove("method");
    let head_names = [format!("{}.weight", model.head.site().path), format!("{}.bias", model.head.site().path)];
    let own = format!("{name}/");
    let mut own_tensors = BTreeMap::new();
    let (mut head, mut other) = (Vec::new(), Vec::new());
    for (key, t) in artifact {
        if let Some(k) = key.strip_prefix(&own) {
            own_tensors.insert(k.to_string(), t.shallow_clone());
        } else if let Some(i) = head_names.iter().position(|h| h == key) {
            head.push((["weight", "bias"][i].to_string(), t.shallow_clone()));
        } else {
            other.push(key.clone());
        }
    }
    if !other.is_empty() {
        return Err(unsupported(name, format!("PEFT export of an artifact that holds tensors besides the adapter and the head: {}", other.join(", "))));
    }
    let (config, tensors) = match name {
        "lora" => export_lora(parse_config("lora", &rest)?, own_tensors, model, base_model)?,
        "ia3" => export_ia3(parse_config("ia3", &rest)?, own_tensors, model, base_model)?,
        _ => return Err(unsupported(name, "PEFT export")),
    };
    Ok(PeftAdapter { config, tensors, head, head_info: Value::Null })
}

/// Takes `<site>.<param>` out of a method's tensors, or names it missing.
fn take(tensors: &mut BTreeMap<String, Tensor>, site: &str, param: &str) -> Result<Tensor> {
    let name = format!("{site}.{param}");
    tensors.remove(&name).ok_or_else(|| Error::MissingWeights { path: "<artifact>".into(), names: vec![name] })
}

/// An error if tensors are left that the method did not claim.
fn no_leftovers(method: &str, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = tensors.keys().map(|k| format!("{method}/{k}")).collect();
    Err(Error::Config(format!("the artifact holds {method} tensors its config does not create (another config?): {}", names.join(", "))))
}

/// The first key of a zhijian `*_pattern` map (in key order) matching each site, as LoRA resolves it.
fn zhijian_pattern<T: Copy>(map: &BTreeMap<String, T>, sites: &[Site]) -> Result<BTreeMap<String, T>> {
    let mut values = BTreeMap::new();
    for (key, &value) in map {
        for site in select_sites(std::slice::from_ref(key), sites)? {
            values.entry(site.path).or_insert(value);
        }
    }
    Ok(values)
}

/// Whether PEFT's `rank_pattern` / `alpha_pattern` key `key` matches module
/// `path`: Python's `re.match(rf"(.*\.)?({key})$", path)`.
fn peft_pattern_matches(key: &str, path: &str) -> Result<bool> {
    let one = [Site::new(path.to_string(), 0, 0, Role::Other)];
    match select_sites(&[format!("re:(?:.*\\.)?(?:{key})")], &one) {
        Ok(_) => Ok(true),
        Err(Error::NoMatchingSites { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A pattern key for `path` that, by PEFT's rule, matches `path` and no other
/// of `paths`: the path itself, or with its dots escaped where needed.
fn exact_key(path: &str, paths: &[&str]) -> Result<String> {
    for key in [path.to_string(), path.replace('.', "\\.")] {
        let mut hits = Vec::new();
        for p in paths {
            if peft_pattern_matches(&key, p)? {
                hits.push(*p);
            }
        }
        if hits == [path] {
            return Ok(key);
        }
    }
    Err(Error::Config(format!("no PEFT pattern key singles out `{path}` among {}", paths.join(", "))))
}

/// A number as JSON: an integer when it is one (PEFT writes `lora_alpha` so).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 { json!(x as i64) } else { json!(x) }
}

fn export_lora(c: LoraConfig, mut own: BTreeMap<String, Tensor>, model: &Model, base_model: &str) -> Result<(Value, Vec<(String, Tensor)>)> {
    // The sites, ranks and scales of the run, as LoRA itself resolves the config.
    let mut lora = Lora::new(c.clone());
    lora.prepare(model)?;
    let by_path: BTreeMap<String, Site> = model.sites().into_iter().map(|s| (s.path.clone(), s)).collect();
    let paths: Vec<String> = lora.sites().map(str::to_string).collect();
    let sites: Vec<Site> = paths.iter().map(|p| by_path[p].clone()).collect();
    if let Some(conv) = sites.iter().find(|s| s.conv.is_some()) {
        return Err(unsupported("lora", format!("PEFT export of LoRA on a convolution ({}): PEFT's conv LoRA factors the kernel differently", conv.path)));
    }
    let alphas = zhijian_pattern(&c.alpha_pattern, &sites)?;
    let path_refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (mut rank_pattern, mut alpha_pattern) = (serde_json::Map::new(), serde_json::Map::new());
    let mut tensors = Vec::new();
    for site in &sites {
        let path = &site.path;
        let rank = lora.rank(path).expect("prepared site");
        let alpha = alphas.get(path).copied().unwrap_or(c.alpha);
        // PEFT's scaling, from the values written below, must be the run's.
        let scale = if c.rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        if Some(scale) != lora.scale(path) {
            return Err(Error::Config(format!("{path}: LoRA's scale {:?} is not α/r = {scale} (exporter out of date with lora.rs)", lora.scale(path))));
        }
        if rank != c.rank {
            rank_pattern.insert(exact_key(path, &path_refs)?, json!(rank));
        }
        if alpha != c.alpha {
            alpha_pattern.insert(exact_key(path, &path_refs)?, number(alpha));
        }
        let (a, b) = (take(&mut own, path, "lora_A")?, take(&mut own, path, "lora_B")?);
        let want = [vec![rank, site.in_features], vec![site.out_features, rank]];
        for ((name, t), want) in [("lora_A", &a), ("lora_B", &b)].into_iter().zip(want) {
            if t.size() != want {
                return Err(Error::ShapeMismatch { name: format!("lora/{path}.{name}"), expected: want, got: t.size() });
            }
        }
        // zhijian's B is unscaled, as PEFT's: the scale is applied in the forward pass on both sides.
        tensors.push((format!("{PREFIX}{path}.lora_A.weight"), a));
        tensors.push((format!("{PREFIX}{path}.lora_B.weight"), b));
        if c.use_dora {
            tensors.push((format!("{PREFIX}{path}.lora_magnitude_vector"), take(&mut own, path, "lora_magnitude")?));
        }
    }
    no_leftovers("lora", &own)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": number(c.alpha),
        "lora_dropout": c.dropout,
        "target_modules": paths,
        "use_dora": c.use_dora,
        "use_rslora": c.rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": false,
        "bias": "none",
        "lora_bias": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "init_lora_weights": true,
        "inference_mode": true,
        "revision": null,
    });
    Ok((config, tensors))
}

fn export_ia3(c: Ia3Config, mut own: BTreeMap<String, Tensor>, model: &Model, base_model: &str) -> Result<(Value, Vec<(String, Tensor)>)> {
    let mut ia3 = Ia3::new(c);
    ia3.prepare(model)?;
    let by_path: BTreeMap<String, Site> = model.sites().into_iter().map(|s| (s.path.clone(), s)).collect();
    let sites: Vec<Site> = ia3.sites().map(|p| by_path[p].clone()).collect();
    let (mut targets, mut feedforward, mut tensors) = (Vec::new(), Vec::new(), Vec::new());
    for site in &sites {
        let l = take(&mut own, &site.path, "ia3_l")?;
        // PEFT scales a feed-forward module's input ([1, in]) and any other module's whole output ([out, 1]).
        let shape = match site.role {
            Role::MlpDown => {
                feedforward.push(site.path.clone());
                [1, site.in_features]
            }
            Role::Qkv => return Err(unsupported("ia3", format!("PEFT export of IA³ on the fused qkv {}: PEFT would scale the query third too", site.path))),
            _ => [site.out_features, 1],
        };
        if l.numel() as i64 != shape[0] * shape[1] {
            return Err(Error::ShapeMismatch { name: format!("ia3/{}.ia3_l", site.path), expected: vec![shape[0] * shape[1]], got: l.size() });
        }
        targets.push(site.path.clone());
        tensors.push((format!("{PREFIX}{}.ia3_l", site.path), l.reshape(shape)));
    }
    no_leftovers("ia3", &own)?;
    let config = json!({
        "peft_type": "IA3",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "init_ia3_weights": true,
        "inference_mode": true,
        "revision": null,
    });
    Ok((config, tensors))
}

/// Writes `adapter` into `dir` (created if needed), each file atomically.
pub fn write(adapter: &PeftAdapter, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let write_json = |name: &str, value: &Value| -> Result<()> {
        let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config(format!("{name}: {e}")))?;
        write_atomic(&dir.join(name), (text + "\n").as_bytes())
    };
    save_atomic(&adapter.tensors, &dir.join(WEIGHTS_FILE))?;
    if !adapter.head.is_empty() {
        save_atomic(&adapter.head, &dir.join(HEAD_FILE))?;
        if !adapter.head_info.is_null() {
            write_json(HEAD_INFO_FILE, &adapter.head_info)?;
        }
    }
    // The config last: a folder with a config is a complete adapter.
    write_json(CONFIG_FILE, &adapter.config)
}

/// Reads a PEFT adapter folder (and zhijian's head, where present).
pub fn read(dir: &Path) -> Result<PeftAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(Error::io(&config_path))?;
    let config: Value = serde_json::from_str(&text).map_err(|e| Error::CorruptFile { path: config_path.clone(), reason: e.to_string() })?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::CorruptFile {
            path: dir.join("adapter_model.bin"),
            reason: format!("a pickled adapter; convert it to {WEIGHTS_FILE} (`zhijian convert` reads .bin/.pth)"),
        });
    }
    let tensors = read_safetensors(&weights)?;
    let head_path = dir.join(HEAD_FILE);
    let head = if head_path.exists() { read_safetensors(&head_path)? } else { Vec::new() };
    let info_path = dir.join(HEAD_INFO_FILE);
    let head_info = match std::fs::read_to_string(&info_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::CorruptFile { path: info_path, reason: e.to_string() })?,
        Err(_) => Value::Null,
    };
    Ok(PeftAdapter { config, tensors, head, head_info })
}

/// A field of `adapter_config.json`, or an error naming it.
fn field<'a>(config: &'a Value, name: &str) -> Result<&'a Value> {
    config.get(name).ok_or_else(|| Error::Config(format!("{CONFIG_FILE}: no `{name}`")))
}

/// The value of the PEFT pattern map `field` for module `path` (PEFT takes the
/// first matching key in file order; keys are read sorted here, so two
/// matching keys with different values are refused).
fn peft_pattern(config: &Value, name: &str, path: &str) -> Result<Option<f64>> {
    let Some(map) = config.get(name).and_then(Value::as_object) else { return Ok(None) };
    let mut found: Option<(&str, f64)> = None;
    for (key, value) in map {
        if peft_pattern_matches(key, path)? {
            let v = value.as_f64().ok_or_else(|| Error::Config(format!("{CONFIG_FILE}: {name}[{key}] is not a number: {value}")))?;
            match found {
                Some((k, old)) if old != v => {
                    return Err(Error::Config(format!("{CONFIG_FILE}: {name} keys `{k}` and `{key}` both match {path} with different values")));
                }
                _ => found = Some((key, v)),
            }
        }
    }
    Ok(found.map(|(_, v)| v))
}

/// Refuses PEFT options zhijian has no counterpart for (a field present with a non-default value).
fn refuse_options(config: &Value, method: &str, defaults: &[(&str, Value)]) -> Result<()> {
    for (name, default) in defaults {
        match config.get(*name) {
            None | Some(Value::Null) => {}
            Some(v) if v == default => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(v) => return Err(unsupported(method, format!("importing a PEFT adapter with `{name}` = {v}"))),
        }
    }
    Ok(())
}

/// Tensors of a PEFT adapter by (site, suffix), with the module name PEFT gave them.
type SiteTensors<'a> = BTreeMap<(String, String), (&'a str, Tensor)>;

/// The module each tensor of a PEFT adapter belongs to, matched to a site of
/// `model` (`base_model.model.<site>.<suffix>`; a task model's `bert.` prefix
/// is dropped), with the suffix. Keys matching no site, or with a suffix not
/// in `suffixes`, are an error that lists them.
fn site_tensors<'a>(adapter: &'a PeftAdapter, model: &Model, suffixes: &[&str]) -> Result<SiteTensors<'a>> {
    let sites: BTreeMap<String, Site> = model.sites().into_iter().filter(|s| s.role != Role::Norm).map(|s| (s.path.clone(), s)).collect();
    let mut found = BTreeMap::new();
    let mut unmatched = Vec::new();
    for (key, t) in &adapter.tensors {
        let hit = key.strip_prefix(PREFIX).and_then(|rest| {
            suffixes.iter().find_map(|suffix| {
                let module = rest.strip_suffix(&format!(".{suffix}"))?;
                let site = if sites.contains_key(module) { module } else { module.split_once('.').map(|(_, r)| r).filter(|r| sites.contains_key(*r))? };
                Some(((site.to_string(), suffix.to_string()), (module, t.shallow_clone())))
            })
        });
        match hit {
            Some((k, v)) => {
                found.insert(k, v);
            }
            None => unmatched.push(key.clone()),
        }
    }
    if !unmatched.is_empty() {
        return Err(Error::Config(format!(
            "{WEIGHTS_FILE}: {} tensors match no {} site of the {} backbone: {}; its sites are: {}",
            unmatched.len(),
            suffixes.join(" / "),
            model.backbone.arch(),
            unmatched.join(", "),
            sites.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(found)
}

/// A PEFT adapter (LoRA or IA³) as a zhijian method entry and artifact tensors for `model`.
pub fn import(adapter: &PeftAdapter, model: &Model) -> Result<Imported> {
    let peft_type = field(&adapter.config, "peft_type")?.as_str().unwrap_or_default().to_string();
    let (method, mut tensors) = match peft_type.as_str() {
        "LORA" => import_lora(adapter, model)?,
        "IA3" => import_ia3(adapter, model)?,
        other => return Err(unsupported(&other.to_lowercase(), format!("importing PEFT type {other}"))),
    };
    if !adapter.head.is_empty() {
        let vars = model.vs.variables();
        let head = model.head.site().path.clone();
        for (name, t) in &adapter.head {
            let target = format!("{head}.{name}");
            let want = vars.get(&target).ok_or_else(|| Error::Config(format!("{HEAD_FILE}: `{name}` is not a head parameter (weight, bias)")))?;
            if want.size() != t.size() {
                return Err(Error::ShapeMismatch { name: format!("{HEAD_FILE}: {name}"), expected: want.size(), got: t.size() });
            }
            tensors.push((target, t.shallow_clone()));
        }
    }
    Ok(Imported { method, tensors })
}

fn import_lora(adapter: &PeftAdapter, model: &Model) -> Result<(toml::Table, Vec<(String, Tensor)>)> {
    let c = &adapter.config;
    refuse_options(
        c,
        "lora",
        &[
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("lora_bias", json!(false)),
            ("modules_to_save", Value::Null),
            ("layers_to_transform", Value::Null),
            ("layer_replication", Value::Null),
            ("target_parameters", Value::Null),
            ("trainable_token_indices", Value::Null),
            ("use_qalora", json!(false)),
        ],
    )?;
    let rank = field(c, "r")?.as_i64().ok_or_else(|| Error::Config(format!("{CONFIG_FILE}: `r` is not an integer")))?;
    let alpha = field(c, "lora_alpha")?.as_f64().ok_or_else(|| Error::Config(format!("{CONFIG_FILE}: `lora_alpha` is not a number")))?;
    let flag = |name: &str| c.get(name).and_then(Value::as_bool).unwrap_or(false);
    let (use_dora, rslora) = (flag("use_dora"), flag("use_rslora"));
    let found = site_tensors(adapter, model, &["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"])?;
    let sites: Vec<Site> = model.sites().into_iter().filter(|s| found.keys().any(|(p, _)| p == &s.path)).collect();
    let (mut rank_pattern, mut alpha_pattern) = (BTreeMap::new(), BTreeMap::new());
    let mut tensors = Vec::new();
    for site in &sites {
        let get = |suffix: &str| found.get(&(site.path.clone(), suffix.to_string()));
        let (Some((module, a)), Some((_, b))) = (get("lora_A.weight"), get("lora_B.weight")) else {
            let names = ["lora_A.weight", "lora_B.weight"].iter().filter(|s| get(s).is_none()).map(|s| format!("{PREFIX}{}.{s}", site.path)).collect();
            return Err(Error::MissingWeights { path: WEIGHTS_FILE.into(), names });
        };
        if site.conv.is_some() {
            return Err(unsupported("lora", format!("importing LoRA on the convolution {}", site.path)));
        }
        let r = a.size()[0];
        if a.size() != [r, site.in_features] || b.size() != [site.out_features, r] {
            let (expected, got) = (vec![r, site.in_features, site.out_features, r], [a.size(), b.size()].concat());
            return Err(Error::ShapeMismatch { name: format!("{PREFIX}{module}.lora_A/B (A [r, in], B [out, r])"), expected, got });
        }
        // PEFT resolves r and α by the module's own name (with any task-model prefix).
        let peft_rank = peft_pattern(c, "rank_pattern", module)?.map_or(rank, |r| r as i64);
        if peft_rank != r {
            return Err(Error::ShapeMismatch {
                name: format!("{PREFIX}{module}.lora_A.weight (rank {peft_rank} by {CONFIG_FILE})"),
                expected: vec![peft_rank, site.in_features],
                got: a.size(),
            });
        }
        let site_alpha = peft_pattern(c, "alpha_pattern", module)?.unwrap_or(alpha);
        if r != rank {
            rank_pattern.insert(site.path.clone(), r);
        }
        if site_alpha != alpha {
            alpha_pattern.insert(site.path.clone(), site_alpha);
        }
        tensors.push((format!("lora/{}.lora_A", site.path), a.shallow_clone()));
        tensors.push((format!("lora/{}.lora_B", site.path), b.shallow_clone()));
        match (use_dora, get("lora_magnitude_vector")) {
            (true, Some((_, m))) => tensors.push((format!("lora/{}.lora_magnitude", site.path), m.reshape([-1]))),
            (true, None) => return Err(Error::MissingWeights { path: WEIGHTS_FILE.into(), names: vec![format!("{PREFIX}{module}.lora_magnitude_vector")] }),
            (false, Some(_)) => return Err(Error::Config(format!("{WEIGHTS_FILE}: DoRA magnitudes for {module} but use_dora is false"))),
            (false, None) => {}
        }
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout: c.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        targets: sites.iter().map(|s| s.path.clone()).collect(),
        use_dora,
        rslora,
        rank_pattern,
        alpha_pattern,
    };
    // LoRA itself must arrive at the same sites and shapes from this config.
    let mut lora = Lora::new(config.clone());
    lora.prepare(model)?;
    let vars = lora.var_store().expect("prepared").variables();
    for (name, t) in &tensors {
        let own = &vars[name.strip_prefix("lora/").expect("lora tensor")];
        if own.size() != t.size() {
            return Err(Error::ShapeMismatch { name: name.clone(), expected: own.size(), got: t.size() });
        }
    }
    Ok((method_entry("lora", &config), tensors))
}

fn import_ia3(adapter: &PeftAdapter, model: &Model) -> Result<(toml::Table, Vec<(String, Tensor)>)> {
    let c = &adapter.config;
    refuse_options(c, "ia3", &[("fan_in_fan_out", json!(false)), ("modules_to_save", Value::Null), ("layers_to_transform", Value::Null)])?;
    let found = site_tensors(adapter, model, &["ia3_l"])?;
    let sites: Vec<Site> = model.sites().into_iter().filter(|s| found.contains_key(&(s.path.clone(), "ia3_l".to_string()))).collect();
    let mut tensors = Vec::new();
    for site in &sites {
        let (module, l) = &found[&(site.path.clone(), "ia3_l".to_string())];
        // zhijian scales a down projection's input and any other site's output; PEFT says which by the shape.
        let (input, want) = match l.size().as_slice() {
            [1, n] if *n == site.in_features => (true, site.in_features),
            [n, 1] if *n == site.out_features => (false, site.out_features),
            _ => return Err(Error::ShapeMismatch { name: format!("{PREFIX}{module}.ia3_l"), expected: vec![site.out_features, 1], got: l.size() }),
        };
        if input != (site.role == Role::MlpDown) || site.role == Role::Qkv {
            let what = if input { "input (a feed-forward module)" } else { "output" };
            return Err(unsupported(
                "ia3",
                format!(
                    "importing IA³ that scales the {what} of {}, a {:?} site (zhijian scales the input of FFN down projections only)",
                    site.path, site.role
                ),
            ));
        }
        tensors.push((format!("ia3/{}.ia3_l", site.path), l.reshape([want])));
    }
    let config = Ia3Config { targets: sites.iter().map(|s| s.path.clone()).collect() };
    let mut ia3 = Ia3::new(config.clone());
    ia3.prepare(model)?;
    Ok((method_entry("ia3", &config), tensors))
}

/// `{ method = "<name>", <config fields> }`.
fn method_entry<T: serde::Serialize>(name: &str, config: &T) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert("method".into(), toml::Value::String(name.into()));
    table.extend(zhijian_core::config_table(config));
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// A two-layer BERT at random init, hidden 16, FFN 32.
    fn tiny() -> Model {
        let config = BertConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 16,
            ..BertConfig::minilm_l6()
        };
        Model::new(Device::Cpu, 3, |p| Box::new(Bert::new(p, &config).unwrap()))
    }

    fn entry(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    /// The artifact a run of `method` leaves, with every tensor randomised.
    fn artifact(model: &Model, method: &toml::Table) -> Vec<(String, Tensor)> {
        let mut methods = vec![crate::registry().build(method).unwrap()];
        zhijian_core::train::prepare(model, &mut methods, 0).unwrap();
        let tensors = zhijian_core::train::artifact(model, &methods);
        tch::no_grad(|| tensors.iter().for_each(|(_, t)| t.shallow_clone().copy_(&t.randn_like())));
        tensors.into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
    }

    fn names(ts: &[(String, Tensor)]) -> Vec<&str> {
        ts.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn lora_keys_shapes_and_patterns_map_to_peft() {
        let model = tiny();
        let method = entry(
            "method = \"lora\"\nrank = 4\nalpha = 8\nuse_dora = true\nrank_pattern = { \"layer.1.attention.self.value\" = 2 }\nalpha_pattern = { value = 3 }",
        );
        let tensors = artifact(&model, &method);
        let peft = export(&[method], &tensors, &model, "base").unwrap();
        let c = &peft.config;
        assert_eq!((c["peft_type"].as_str(), c["r"].as_i64(), c["lora_alpha"].as_i64(), c["use_dora"].as_bool()), (Some("LORA"), Some(4), Some(8), Some(true)));
        assert_eq!(c["target_modules"].as_array().unwrap().len(), 4);
        assert_eq!(c["rank_pattern"], json!({ "encoder.layer.1.attention.self.value": 2 }));
        assert_eq!(c["alpha_pattern"], json!({ "encoder.layer.0.attention.self.value": 3, "encoder.layer.1.attention.self.value": 3 }));
        let keys = names(&peft.tensors);
        assert_eq!(keys.len(), 4 * 3);
        assert!(keys.contains(&"base_model.model.encoder.layer.1.attention.self.value.lora_magnitude_vector"), "{keys:?}");
        let a = &peft.tensors.iter().find(|(n, _)| n == "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight").unwrap().1;
        assert_eq!(a.size(), [2, 16]);
        // B goes out as zhijian holds it: unscaled, PEFT applies α/r itself.
        let b = &peft.tensors.iter().find(|(n, _)| n == "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight").unwrap().1;
        let ours = &tensors.iter().find(|(n, _)| n == "lora/encoder.layer.0.attention.self.query.lora_B").unwrap().1;
        assert!(b.equal(ours));
        assert_eq!(names(&peft.head), ["bias", "weight"]);
    }

    /// export → import gives back the same method config (up to exact targets) and the same tensors under the same names.
    #[test]
    fn lora_and_ia3_round_trip() {
        let model = tiny();
        for text in [
            "method = \"lora\"\nrank = 4\nalpha = 8\nrslora = true\ntargets = [\"query\", \"intermediate.dense\"]\nrank_pattern = { \"re:.*layer\\\\.0.*\" = 3 }",
            "method = \"ia3\"",
        ] {
            let method = entry(text);
            let tensors = artifact(&model, &method);
            let peft = export(std::slice::from_ref(&method), &tensors, &model, "base").unwrap();
            let back = import(&peft, &model).unwrap();
            let mut want: Vec<_> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
            let mut got = back.tensors;
            want.sort_by(|a, b| a.0.cmp(&b.0));
            got.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(names(&got), names(&want), "{text}");
            for ((n, g), (_, w)) in got.iter().zip(&want) {
                assert!(g.equal(w), "{n}");
            }
            // The imported entry builds, and resolves to the run's sites.
            let mut rebuilt = vec![crate::registry().build(&back.method).unwrap()];
            zhijian_core::train::prepare(&model, &mut rebuilt, 0).unwrap();
            let shapes = |ts: &[(String, Tensor)]| ts.iter().map(|(n, t)| (n.clone(), t.size())).collect::<BTreeMap<_, _>>();
            assert_eq!(shapes(&zhijian_core::train::artifact(&model, &rebuilt)), shapes(&want), "{text}");
        }
    }

    #[test]
    fn ia3_vectors_take_peft_shapes() {
        let model = tiny();
        let method = entry("method = \"ia3\"");
        let peft = export(std::slice::from_ref(&method), &artifact(&model, &method), &model, "base").unwrap();
        assert_eq!(peft.config["feedforward_modules"], json!(["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]));
        let shape = |k: &str| peft.tensors.iter().find(|(n, _)| n == &format!("{PREFIX}{k}.ia3_l")).unwrap().1.size();
        assert_eq!(shape("encoder.layer.0.output.dense"), [1, 32]);
        assert_eq!(shape("encoder.layer.1.attention.self.key"), [16, 1]);
    }

    #[test]
    fn what_has_no_exact_mapping_is_refused() {
        let model = tiny();
        for (text, says) in [("method = \"prefix_tuning\"", "prefix_tuning"), ("method = \"bitfit\"", "bitfit")] {
            let method = entry(text);
            let err = export(std::slice::from_ref(&method), &artifact(&model, &method), &model, "base").err().unwrap().to_string();
            assert!(err.contains(says) && err.contains("support"), "{err}");
        }
        let lora = entry("method = \"lora\"");
        let err = export(&[lora.clone(), lora.clone()], &[], &model, "base").err().unwrap().to_string();
        assert!(err.contains("2 methods"), "{err}");
        // A tensor besides the adapter and the head (here a backbone weight) is named.
        let mut tensors = artifact(&model, &lora);
        tensors.push(("encoder.layer.0.output.dense.bias".into(), Tensor::zeros([16], (Kind::Float, Device::Cpu))));
        let err = export(&[lora], &tensors, &model, "base").err().unwrap().to_string();
        assert!(err.contains("encoder.layer.0.output.dense.bias"), "{err}");
    }

    /// LoRA on a convolution and IA³ on a fused qkv have no exact PEFT counterpart.
    #[test]
    fn convolutions_and_fused_qkv_are_refused() {
        use zhijian_backbones::{SmallCnn, SmallCnnConfig, Vit, VitConfig};
        let cnn = SmallCnnConfig { image_size: 8, in_chans: 3, channels: vec![4, 8] };
        let model = Model::new(Device::Cpu, 2, |p| Box::new(SmallCnn::new(p, &cnn).unwrap()));
        let lora = entry("method = \"lora\"");
        let err = export(std::slice::from_ref(&lora), &artifact(&model, &lora), &model, "base").err().unwrap().to_string();
        assert!(err.contains("convolution") && err.contains("support lora"), "{err}");
        let vit = VitConfig::by_name("tiny_patch4_32").unwrap();
        let model = Model::new(Device::Cpu, 2, |p| Box::new(Vit::new(p, &vit).unwrap()));
        let ia3 = entry("method = \"ia3\"");
        let err = export(std::slice::from_ref(&ia3), &artifact(&model, &ia3), &model, "base").err().unwrap().to_string();
        assert!(err.contains("fused qkv"), "{err}");
    }

    #[test]
    fn import_names_unmatched_keys_and_unsupported_types() {
        let model = tiny();
        let lora = entry("method = \"lora\"");
        let mut peft = export(std::slice::from_ref(&lora), &artifact(&model, &lora), &model, "base").unwrap();
        peft.tensors.push(("base_model.model.encoder.layer.7.attention.self.query.lora_A.weight".into(), Tensor::zeros([8, 16], (Kind::Float, Device::Cpu))));
        peft.tensors.push(("base_model.model.classifier.weight".into(), Tensor::zeros([2, 16], (Kind::Float, Device::Cpu))));
        let err = import(&peft, &model).err().unwrap().to_string();
        assert!(err.contains("2 tensors match no") && err.contains("layer.7.attention.self.query.lora_A") && err.contains("classifier.weight"), "{err}");
        peft.config["peft_type"] = json!("PREFIX_TUNING");
        let err = import(&peft, &model).err().unwrap().to_string();
        assert!(err.contains("PREFIX_TUNING") && err.contains("support"), "{err}");
        peft.config["peft_type"] = json!("LORA");
        peft.config["fan_in_fan_out"] = json!(true);
        assert!(import(&peft, &model).err().unwrap().to_string().contains("fan_in_fan_out"));
    }

    /// PEFT's pattern rule: a key matches a module name ending in `.key` (or equal), by regex.
    #[test]
    fn peft_pattern_rule() {
        assert!(peft_pattern_matches("value", "encoder.layer.0.attention.self.value").unwrap());
        assert!(peft_pattern_matches("layer\\.0\\..*value", "encoder.layer.0.attention.self.value").unwrap());
        assert!(!peft_pattern_matches("alue", "encoder.layer.0.attention.self.value").unwrap());
        assert!(!peft_pattern_matches("encoder.layer.1.output.dense", "encoder.layer.11.output.dense").unwrap());
        assert_eq!(exact_key("a.b", &["a.b", "c.b"]).unwrap(), "a.b");
        // `.` is any character to Python's `re`: escaped where it would also match another module.
        assert_eq!(exact_key("a.b", &["a.b", "axb"]).unwrap(), "a\\.b");
        assert_eq!(exact_key("axb", &["a.b", "axb"]).unwrap(), "axb");
    }

    #[test]
    fn minilm_is_sentence_transformers_on_the_hub() {
        assert_eq!(base_model_name("all-minilm-l6-v2"), "sentence-transformers/all-MiniLM-L6-v2");
        assert_eq!(asset_for_base_model("sentence-transformers/all-MiniLM-L6-v2").as_deref(), Some("all-minilm-l6-v2"));
        assert_eq!(base_model_name("no-such-asset"), "no-such-asset");
        let folder = zhijian_assets::cache_dir().join("all-minilm-l6-v2");
        assert_eq!(asset_for_base_model(folder.to_str().unwrap()).as_deref(), Some("all-minilm-l6-v2"));
        assert_eq!(asset_for_base_model("/elsewhere/all-minilm-l6-v2"), None);
    }
}
