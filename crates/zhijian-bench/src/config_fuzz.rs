//! Config fuzzing: thousands of experiment files, made by mutating the
//! project's real configs (a field dropped, misspelt, given the wrong type or
//! an out-of-range value) and by drawing random documents over the schema's
//! keys. Loading one never panics, and every error names the field at fault.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use toml::{Table, Value};
use zhijian_core::SplitMix64;

use crate::experiment::Experiment;

/// The project's experiment files, and a `kind = "text"` one.
fn real_configs() -> Vec<(String, Table)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut configs: Vec<(String, Table)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap().parse().unwrap()))
        .collect();
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(configs.len() >= 5, "the real configs: {:?}", configs.iter().map(|c| &c.0).collect::<Vec<_>>());
    let text = r#"
        name = "own-text"
        [backbone]
        kind = "bert"
        weights = "all-minilm-l6-v2"
        [data]
        kind = "text"
        path = "reviews.csv.gz"
        text_column = ["premise", "hypothesis"]
        label_column = "label"
        split_column = "split"
        train_limit = 100
        ood = [{ path = "other.tsv", name = "other" }]
        [train]
        epochs = 1
        lr = 1e-4
        [[strategy]]
        name = "lora"
        methods = [{ method = "lora", rank = 4, targets = ["query", "value"] }]
        train = { lr = 1e-3 }
    "#;
    configs.push(("own-text".into(), text.parse().unwrap()));
    configs
}

/// Seeded draws, so a failure repeats.
struct Draw(SplitMix64);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        self.0.index(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A step into a document: a table key or an array index.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// Paths to every key of the document (through arrays of tables, such as
/// `strategy` and each strategy's `methods`).
fn key_paths(value: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match value {
        Value::Table(t) => {
            for (k, v) in t {
                here.push(Step::Key(k.clone()));
                out.push(here.clone());
                key_paths(v, here, out);
                here.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                here.push(Step::Index(i));
                key_paths(v, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

/// The table holding the last key of `path`, and that key.
fn parent<'a>(doc: &'a mut Value, path: &[Step]) -> (&'a mut Table, String) {
    let mut at = doc;
    for step in &path[..path.len() - 1] {
        at = match (step, at) {
            (Step::Key(k), Value::Table(t)) => t.get_mut(k).unwrap(),
            (Step::Index(i), Value::Array(a)) => &mut a[*i],
            _ => unreachable!("paths follow the document"),
        };
    }
    let Some(Step::Key(key)) = path.last() else { unreachable!("paths end at keys") };
    let Value::Table(table) = at else { unreachable!("keys live in tables") };
    (table, key.clone())
}

/// A value of another type than `v`.
fn other_type(v: &Value, draw: &mut Draw) -> Value {
    let candidates = [
        Value::String("seven".into()),
        Value::Integer(7),
        Value::Float(-2.5),
        Value::Boolean(true),
        Value::Array(vec![Value::Integer(1), Value::String("x".into())]),
        Value::Table(Table::from_iter([("x".to_string(), Value::Integer(1))])),
    ];
    loop {
        let c = draw.pick(&candidates);
        if c.type_str() != v.type_str() {
            return c.clone();
        }
    }
}

/// A misspelling of `key`: a letter dropped, doubled or two swapped.
fn misspell(key: &str, draw: &mut Draw) -> String {
    let chars: Vec<char> = key.chars().collect();
    let i = draw.below(chars.len());
    let mut out = chars.clone();
    match draw.below(3) {
        0 if chars.len() > 2 => {
            out.remove(i);
        }
        1 if i + 1 < chars.len() && chars[i] != chars[i + 1] => out.swap(i, i + 1),
        _ => out.insert(i, 'q'),
    }
    out.into_iter().collect()
}

/// Out-of-range values the loader must refuse, by the key they go under.
const OUT_OF_RANGE: &[(&str, &str)] = &[
    ("lr", "-1.0"),
    ("lr", "0.0"),
    ("lr", "nan"),
    ("batch_size", "0"),
    ("eval_batch_size", "-4"),
    ("warmup_ratio", "1.5"),
    ("label_smoothing", "-0.1"),
    ("weight_decay", "-0.01"),
    ("grad_clip", "inf"),
    ("fractions", "[0.5, 0.5, 0.5]"),
    ("fractions", "[1.2, -0.1, -0.1]"),
    ("holdout", "[0.6, 0.6]"),
    ("max_len", "1"),
    ("train_limit", "0"),
    ("train_limit", "-5"),
    ("eval_limit", "0"),
    ("image_size", "0"),
    ("seeds", "[]"),
    ("seeds", "[-1]"),
    ("epochs", "-1"),
    ("rank", "-3"),
];

/// What loading `doc` did: `None` if it loaded, else the message (a panic fails the test).
fn load(doc: &Value, what: &str) -> Option<String> {
    let text = toml::to_string(doc).unwrap();
    let registry = crate::registry();
    let loaded = catch_unwind(AssertUnwindSafe(|| Experiment::from_toml(&text, Path::new("fuzz/exp.toml"), &registry)));
    match loaded {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => panic!("{what}: loading panicked on\n{text}"),
    }
}

fn names(message: &str, field: &str) -> bool {
    message.contains(field)
}

#[test]
fn a_thousand_broken_configs_never_panic_and_name_the_field() {
    let mut draw = Draw(SplitMix64::new(0x00C0_FFEE));
    let (mut cases, mut errors) = (0usize, 0usize);
    let mut faults = Vec::new();
    let mut check = |doc: &Value, what: String, field: &str, must_fail: bool| {
        cases += 1;
        match load(doc, &what) {
            Some(message) => {
                errors += 1;
                if !names(&message, field) {
                    faults.push(format!("{what}: the error does not name `{field}`:\n{message}"));
                }
            }
            None if must_fail => faults.push(format!("{what}: loaded, but it must not:\n{}", toml::to_string(doc).unwrap())),
            None => {}
        }
    };
    for (file, config) in real_configs() {
        let original = Value::Table(config);
        assert_eq!(load(&original, &file), None, "{file} itself loads");
        let mut paths = Vec::new();
        key_paths(&original, &mut Vec::new(), &mut paths);
        for path in &paths {
            // Dropped: fine where the field has a default, else the error names it.
            let mut doc = original.clone();
            let (table, key) = parent(&mut doc, path);
            table.remove(&key);
            check(&doc, format!("{file}: {path:?} dropped"), &key, false);
            // Misspelt: every table refuses unknown fields, by name.
            let mut doc = original.clone();
            let (table, key) = parent(&mut doc, path);
            let typo = misspell(&key, &mut draw);
            let value = table.remove(&key).unwrap();
            table.insert(typo.clone(), value);
            check(&doc, format!("{file}: {path:?} misspelt `{typo}`"), &typo, true);
            // The wrong type.
            let mut doc = original.clone();
            let (table, key) = parent(&mut doc, path);
            let wrong = other_type(&table[&key], &mut draw);
            table.insert(key.clone(), wrong.clone());
            check(&doc, format!("{file}: {path:?} = {wrong}"), &key, false);
            // Out of range, where the key has a range.
            for (_, bad) in OUT_OF_RANGE.iter().filter(|(k, _)| *k == key) {
                let mut doc = original.clone();
                let (table, key) = parent(&mut doc, path);
                let bad_value: Value = format!("v = {bad}").parse::<Table>().unwrap().remove("v").unwrap();
                table.insert(key.clone(), bad_value);
                check(&doc, format!("{file}: {path:?} = {bad}"), &key, true);
            }
        }
    }
    assert!(faults.is_empty(), "{} of {cases} mutated configs went wrong; the first ones:\n\n{}", faults.len(), faults[..faults.len().min(12)].join("\n\n"));
    // Random documents over the schema's own keys and some others.
    let keys = [
        "name",
        "seeds",
        "device",
        "backbone",
        "data",
        "train",
        "strategy",
        "kind",
        "weights",
        "preset",
        "pooling",
        "max_len",
        "fractions",
        "path",
        "text_column",
        "label_column",
        "lr",
        "epochs",
        "batch_size",
        "methods",
        "method",
        "rank",
        "targets",
        "records",
        "source",
        "colour",
    ];
    let values = ["\"bert\"", "\"lora\"", "3", "-1", "0.5", "true", "[1, 2]", "[\"a\"]", "{ kind = \"mnist\" }", "[{ method = \"lora\" }]", "\"\""];
    for i in 0..600 {
        let mut doc = Table::new();
        for _ in 0..1 + draw.below(6) {
            let value: Value = format!("v = {}", draw.pick(&values)).parse::<Table>().unwrap().remove("v").unwrap();
            doc.insert(draw.pick(&keys).to_string(), value);
        }
        cases += 1;
        let doc_keys: Vec<String> = doc.keys().cloned().collect();
        let doc = Value::Table(doc);
        // Random documents fail; the message names a field: one of theirs, or one they lack.
        let message = load(&doc, &format!("random document {i}")).unwrap_or_else(|| panic!("random document {i} loaded: {doc}"));
        errors += 1;
        let named = message.contains("missing field `") || doc_keys.iter().any(|k| message.contains(&format!("{k} =")) || message.contains(&format!("`{k}`")));
        assert!(named, "random document {i}: no field named in\n{message}\nfor\n{doc}");
    }
    assert!(cases >= 1000, "only {cases} configs");
    eprintln!("config fuzzing: {cases} configs, {errors} refused, none panicked");
}
