//! A user's own labelled text: `kind = "text"` in an experiment file.
//!
//! One CSV, TSV or JSON Lines file (plain, `.gz` or `.bz2`) with a text column
//! (or two, for sentence-pair tasks) and a label column, split by a column of
//! its own (`train` / `validation` / `test`) or by stratified fractions; other
//! files with the same columns become shifted test splits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, Result};

use crate::split::{SplitIndices, stratified_split};
use crate::text::{TextDataset, read_columns};

/// The text of an example: one column, or two for a sentence pair (encoded
/// `[CLS] a [SEP] b [SEP]` by BERT-family tokenizers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TextColumns {
    /// `text_column = "review"`.
    One(String),
    /// `text_column = ["premise", "hypothesis"]`.
    Pair([String; 2]),
}

impl TextColumns {
    fn names(&self) -> Vec<&str> {
        match self {
            TextColumns::One(c) => vec![c.as_str()],
            TextColumns::Pair([a, b]) => vec![a.as_str(), b.as_str()],
        }
    }
}

/// A shifted test split: another file with the same columns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextShift {
    /// The file, as [`TextFiles::path`].
    pub path: PathBuf,
    /// Its column in the table.
    pub name: String,
}

/// `kind = "text"`: what to read and how to split it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextFiles {
    /// The file (`.csv`, `.tsv`, `.jsonl`, `.ndjson`, optionally `.gz` / `.bz2`),
    /// relative to the experiment file, or `asset:NAME/FILE` for a file of an
    /// asset (`zhijian fetch NAME` fetches it).
    pub path: PathBuf,
    /// The text column, or two columns for a sentence-pair task.
    pub text_column: TextColumns,
    /// The label column: strings or integers; the names are kept for reports.
    pub label_column: String,
    /// A column saying each row's split: `train`, `validation` (or `val`,
    /// `dev`) or `test`. Without validation rows, a stratified tenth of the
    /// training rows is held out. Excludes `fractions`.
    #[serde(default)]
    pub split_column: Option<String>,
    /// Train / validation / test fractions of a stratified split, when there
    /// is no `split_column`. Default 0.8 / 0.1 / 0.1.
    #[serde(default)]
    pub fractions: Option<[f64; 3]>,
    /// Seed of the split and of the subsets (fixed across runs). Default 0.
    #[serde(default)]
    pub split_seed: u64,
    /// The classes to keep, in label order; rows with other labels are
    /// dropped. Default: every training label, in numeric order when all are
    /// integers, else sorted.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Train on a stratified subset of this many examples (`--full` lifts it).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Validate and test on stratified subsets of at most this many examples
    /// per split, shifted splits included (`--full` lifts it).
    #[serde(default)]
    pub eval_limit: Option<usize>,
    /// Longest token sequence kept (special tokens included). Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Shifted test splits, each a column of the table.
    #[serde(default)]
    pub ood: Vec<TextShift>,
}

fn default_max_len() -> usize {
    128
}

/// The fraction of training rows held out for validation when the split
/// column has no validation rows.
const HELD_OUT_VALIDATION: f64 = 0.1;

/// What [`TextFiles::load`] read: every example of the main file, its split,
/// and the shifted test sets, all labelled with the same classes.
#[derive(Clone, Debug)]
pub struct TextCorpus {
    /// The main file's examples.
    pub data: TextDataset,
    /// Rows of `data` in each split.
    pub parts: SplitIndices,
    /// The shifted test sets, by name.
    pub ood: Vec<(String, TextDataset)>,
}

/// One row as read: its line, text(s), label and split.
struct Example {
    line: usize,
    text: String,
    pair: Option<String>,
    label: String,
    part: Option<Part>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Train,
    Val,
    Test,
}

impl Part {
    fn parse(value: &str) -> Option<Part> {
        match value.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Part::Train),
            "validation" | "valid" | "val" | "dev" => Some(Part::Val),
            "test" | "testing" => Some(Part::Test),
            _ => None,
        }
    }
}

impl TextFiles {
    /// Checks the fields that do not need the file.
    pub fn validate(&self) -> Result<()> {
        if self.split_column.is_some() && self.fractions.is_some() {
            return Err(Error::Config("data: give `split_column` or `fractions`, not both".into()));
        }
        if let TextColumns::Pair([a, b]) = &self.text_column
            && a == b
        {
            return Err(Error::Config(format!("data: `text_column` names `{a}` twice")));
        }
        if let Some(fractions) = self.fractions {
            crate::split::check_fractions("data.fractions", fractions)?;
        }
        if self.max_len < 3 {
            return Err(Error::Config(format!("data.max_len must leave room for text next to special tokens, got {}", self.max_len)));
        }
        for (what, limit) in [("train_limit", self.train_limit), ("eval_limit", self.eval_limit)] {
            if limit == Some(0) {
                return Err(Error::Config(format!("data.{what} must be at least 1")));
            }
        }
        let mut names = BTreeSet::new();
        for shift in &self.ood {
            if !names.insert(&shift.name) || ["train", "val", "test"].contains(&shift.name.as_str()) {
                return Err(Error::Config(format!("data: shifted split name `{}` is used twice or is a split's own name", shift.name)));
            }
        }
        Ok(())
    }

    /// Reads the file(s), located by `locate` (the caller's rule for a
    /// configured path: relative to the experiment file, or an asset), fixes
    /// the classes on the training rows and splits. A label outside training
    /// (in validation, test or a shifted file) is an error naming it, its file
    /// and line.
    pub fn load(&self, locate: &dyn Fn(&Path) -> Result<PathBuf>) -> Result<TextCorpus> {
        self.validate()?;
        let path = locate(&self.path)?;
        let examples = self.read(&path, self.split_column.as_deref())?;
        let classes = match &self.classes {
            Some(c) => {
                if c.is_empty() || c.iter().collect::<BTreeSet<_>>().len() != c.len() {
                    return Err(Error::Config(format!("data: `classes` must be non-empty and distinct, got {c:?}")));
                }
                c.clone()
            }
            None => label_order(examples.iter().filter(|e| e.part.is_none_or(|p| p == Part::Train)).map(|e| e.label.as_str())),
        };
        let (data, kept) = dataset(&examples, &classes, &path, self.classes.is_some())?;
        let parts = match &self.split_column {
            Some(column) => {
                let mut parts = SplitIndices::default();
                for (row, e) in kept.iter().enumerate() {
                    match e.part.expect("read with a split column") {
                        Part::Train => parts.train.push(row),
                        Part::Val => parts.val.push(row),
                        Part::Test => parts.test.push(row),
                    }
                }
                if parts.train.is_empty() || parts.test.is_empty() {
                    return Err(Error::Data(format!(
                        "{}: split column `{column}` needs `train` and `test` rows; found {} and {}",
                        path.display(),
                        parts.train.len(),
                        parts.test.len()
                    )));
                }
                if parts.val.is_empty() {
                    hold_out_validation(&mut parts, &data.labels, self.split_seed)?;
                }
                parts
            }
            None => stratified_split(&data.labels, self.fractions.unwrap_or([0.8, 0.1, 0.1]), self.split_seed)?,
        };
        for (class, label) in classes.iter().zip(0..) {
            if !parts.train.iter().any(|&r| data.labels[r] == label) {
                return Err(Error::Data(format!("{}: class `{class}` has no training example", path.display())));
            }
        }
        let ood = self
            .ood
            .iter()
            .map(|shift| {
                let path = locate(&shift.path)?;
                let examples = self.read(&path, None)?;
                Ok((shift.name.clone(), dataset(&examples, &classes, &path, self.classes.is_some())?.0))
            })
            .collect::<Result<_>>()?;
        Ok(TextCorpus { data, parts, ood })
    }

    /// The rows of `path`, with their split when `split_column` is given.
    fn read(&self, path: &Path, split_column: Option<&str>) -> Result<Vec<Example>> {
        let mut wanted = self.text_column.names();
        wanted.push(&self.label_column);
        wanted.extend(split_column);
        let pair = matches!(self.text_column, TextColumns::Pair(_));
        read_columns(path, &wanted)?
            .into_iter()
            .map(|(line, mut cells)| {
                let part = match split_column {
                    Some(column) => {
                        let value = cells.pop().expect("asked for");
                        Some(Part::parse(&value).ok_or_else(|| {
                            Error::Data(format!("{} line {line}: split `{value}` in `{column}` is not train, validation (val, dev) or test", path.display()))
                        })?)
                    }
                    None => None,
                };
                let label = cells.pop().expect("asked for").trim().to_string();
                if label.is_empty() {
                    return Err(Error::Data(format!("{} line {line}: empty label in `{}`", path.display(), self.label_column)));
                }
                let pair = if pair { cells.pop() } else { None };
                Ok(Example { line, text: cells.pop().expect("asked for"), pair, label, part })
            })
            .collect()
    }
}

/// Class names in label order: numeric when every label is an integer
/// (`2` before `10`), else sorted as strings.
fn label_order<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let distinct: BTreeSet<&str> = labels.collect();
    let mut classes: Vec<String> = distinct.into_iter().map(String::from).collect();
    if classes.iter().all(|c| c.parse::<i64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<i64>().expect("checked"));
    }
    classes
}

/// The examples as a data set over `classes`, and the examples kept. With
/// `filter`, other labels are dropped (the user listed the classes to keep);
/// without, one is an error: the classes came from the training rows.
fn dataset<'a>(examples: &'a [Example], classes: &[String], path: &Path, filter: bool) -> Result<(TextDataset, Vec<&'a Example>)> {
    let pairs = examples.first().is_some_and(|e| e.pair.is_some());
    let mut data = TextDataset { classes: classes.to_vec(), pairs: pairs.then(Vec::new), ..TextDataset::default() };
    let mut kept = Vec::new();
    for e in examples {
        let Some(label) = classes.iter().position(|c| *c == e.label) else {
            if filter {
                continue;
            }
            return Err(Error::Data(format!(
                "{} line {}: label `{}` was never seen in training; training labels are: {}",
                path.display(),
                e.line,
                e.label,
                classes.join(", ")
            )));
        };
        data.texts.push(e.text.clone());
        if let (Some(pairs), Some(p)) = (data.pairs.as_mut(), &e.pair) {
            pairs.push(p.clone());
        }
        data.labels.push(label as i64);
        kept.push(e);
    }
    if data.is_empty() {
        return Err(Error::Data(format!("{}: no examples of the classes {:?}", path.display(), data.classes)));
    }
    Ok((data, kept))
}

/// Moves a stratified tenth of the training rows to validation.
fn hold_out_validation(parts: &mut SplitIndices, labels: &[i64], seed: u64) -> Result<()> {
    let train_labels: Vec<i64> = parts.train.iter().map(|&r| labels[r]).collect();
    let cut = stratified_split(&train_labels, [1.0 - HELD_OUT_VALIDATION, HELD_OUT_VALIDATION, 0.0], seed)?;
    let rows = |picked: Vec<usize>| picked.into_iter().map(|i| parts.train[i]).collect::<Vec<_>>();
    let (train, val) = (rows(cut.train), rows(cut.val));
    parts.train = train;
    parts.val = val;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn task(text: &str) -> TextFiles {
        toml::from_str(text).unwrap()
    }

    fn write(dir: &Path, name: &str, content: &str) {
        fs::write(dir.join(name), content).unwrap();
    }

    const SPLIT_CSV: &str = "sentence,label,split\n\
        good,1,train\nbad,0,train\nfine,1,train\nawful,0,train\ngreat,1,train\npoor,0,train\n\
        nice,1,train\nugly,0,train\nok,1,train\nmeh,0,train\nwow,1,test\nbah,0,test\nyes,1,validation\nno,0,validation\n";

    #[test]
    fn split_column_decides_the_parts() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.csv", SPLIT_CSV);
        let t = task("path = \"a.csv\"\ntext_column = \"sentence\"\nlabel_column = \"label\"\nsplit_column = \"split\"\n");
        let c = t.load(&|p| Ok(dir.path().join(p))).unwrap();
        assert_eq!(c.data.classes, ["0", "1"]);
        assert_eq!((c.parts.train.len(), c.parts.val.len(), c.parts.test.len()), (10, 2, 2));
        assert_eq!(c.parts.test.iter().map(|&r| c.data.texts[r].as_str()).collect::<Vec<_>>(), ["wow", "bah"]);
        assert_eq!(c.data.labels[c.parts.test[0]], 1);
        // No validation rows: a stratified tenth of train is held out (one per class here).
        write(dir.path(), "b.csv", &SPLIT_CSV.replace("validation", "train"));
        let c = task("path = \"b.csv\"\ntext_column = \"sentence\"\nlabel_column = \"label\"\nsplit_column = \"split\"\n")
            .load(&|p| Ok(dir.path().join(p)))
            .unwrap();
        assert_eq!((c.parts.train.len(), c.parts.val.len(), c.parts.test.len()), (10, 2, 2));
        assert!(c.parts.val.iter().all(|r| !c.parts.train.contains(r)));
    }

    #[test]
    fn integer_labels_sort_numerically_and_pairs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let rows: String = (0..30).map(|i| format!("{{\"a\": \"p{i}\", \"b\": \"h{i}\", \"y\": {}}}\n", [2, 10, 1][i % 3])).collect();
        write(dir.path(), "nli.jsonl", &rows);
        let t = task("path = \"nli.jsonl\"\ntext_column = [\"a\", \"b\"]\nlabel_column = \"y\"\nfractions = [0.6, 0.2, 0.2]\n");
        let c = t.load(&|p| Ok(dir.path().join(p))).unwrap();
        assert_eq!(c.data.classes, ["1", "2", "10"]);
        assert_eq!(c.data.labels[..3], [1, 2, 0]);
        let pairs = c.data.pairs.as_ref().unwrap();
        assert_eq!((c.data.texts[4].as_str(), pairs[4].as_str()), ("p4", "h4"));
        assert_eq!((c.parts.train.len(), c.parts.val.len(), c.parts.test.len()), (18, 6, 6));
    }

    #[test]
    fn clear_errors_name_the_file_the_line_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let load = |name: &str, content: &str, extra: &str| {
            write(dir.path(), name, content);
            task(&format!("path = \"{name}\"\ntext_column = \"sentence\"\nlabel_column = \"label\"\n{extra}"))
                .load(&|p| Ok(dir.path().join(p)))
                .unwrap_err()
                .to_string()
        };
        let cases = [
            load("cols.csv", "text,label\na,1\n", ""),
            load("empty.csv", "", ""),
            load("header.csv", "sentence,label\n", ""),
            load("ragged.csv", "sentence,label\na,1\nb,0,extra\n", ""),
            load("unseen.csv", &SPLIT_CSV.replace("wow,1,test", "wow,7,test"), "split_column = \"split\"\n"),
            load("badsplit.csv", &SPLIT_CSV.replace("wow,1,test", "wow,1,holdout"), "split_column = \"split\"\n"),
            load("x.parquet", "", ""),
            load("bad.jsonl", "{\"sentence\": \"a\", \"label\": 1}\n{oops}\n", ""),
            load("both.csv", SPLIT_CSV, "split_column = \"split\"\nfractions = [0.8, 0.1, 0.1]\n"),
            load("nolabel.csv", "sentence,label\na,1\nb,\n", ""),
        ];
        let expect: [&[&str]; 10] = [
            &["cols.csv", "no column `sentence`", "text, label"],
            &["empty.csv", "empty file"],
            &["header.csv", "no data rows"],
            &["ragged.csv", "line 3"],
            &["unseen.csv", "line 12", "label `7`", "never seen in training"],
            &["badsplit.csv", "line 12", "holdout"],
            &["x.parquet", ".csv, .tsv"],
            &["bad.jsonl", "line 2", "not JSON"],
            &["split_column", "fractions"],
            &["nolabel.csv", "line 3", "empty label"],
        ];
        for (err, words) in cases.iter().zip(expect) {
            for w in words {
                assert!(err.contains(w), "`{w}` not in: {err}");
            }
        }
    }

    #[test]
    fn shifted_files_share_the_classes_and_listed_classes_filter() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.tsv", &SPLIT_CSV.replace(',', "\t"));
        write(dir.path(), "shift.tsv", "sentence\tlabel\nhmm\t1\nugh\t0\nwhat\t5\n");
        let base = "path = \"a.tsv\"\ntext_column = \"sentence\"\nlabel_column = \"label\"\nsplit_column = \"split\"\nood = [{ path = \"shift.tsv\", name = \"other\" }]\n";
        let err = task(base).load(&|p| Ok(dir.path().join(p))).unwrap_err().to_string();
        assert!(err.contains("shift.tsv line 4") && err.contains("`5`"), "{err}");
        let c = task(&format!("{base}classes = [\"1\", \"0\"]\n")).load(&|p| Ok(dir.path().join(p))).unwrap();
        assert_eq!(c.data.classes, ["1", "0"]);
        let (name, shifted) = &c.ood[0];
        assert_eq!((name.as_str(), shifted.texts.clone(), shifted.labels.clone()), ("other", vec!["hmm".to_string(), "ugh".into()], vec![0, 1]));
        let err = task(&format!("{base}classes = [\"1\", \"0\", \"3\"]\n")).load(&|p| Ok(dir.path().join(p))).unwrap_err().to_string();
        assert!(err.contains("class `3` has no training example"), "{err}");
    }

    #[test]
    fn typos_in_the_config_are_named() {
        let err = toml::from_str::<TextFiles>("path = \"a.csv\"\ntext_column = \"t\"\nlabel_colum = \"y\"\n").unwrap_err().to_string();
        assert!(err.contains("label_colum"), "{err}");
        let err = toml::from_str::<TextFiles>("path = \"a.csv\"\ntext_column = \"t\"\nlabel_column = \"y\"\nood = [{ path = \"b.csv\", nmae = \"b\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nmae"), "{err}");
    }
}
