//! Labelled text read from CSV or JSON Lines files, optionally compressed.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zhijian_core::{Error, Result};

/// Texts with integer labels; label `i` names `classes[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextDataset {
    /// One text per example.
    pub texts: Vec<String>,
    /// One label per example, an index into `classes`.
    pub labels: Vec<i64>,
    /// Class names; a label is a position in this list.
    pub classes: Vec<String>,
}

impl TextDataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Examples per class, in the order of `classes`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Builds a data set from `(text, label name)` rows.
    ///
    /// With `classes`, rows whose label is not listed are dropped and label `i`
    /// is `classes[i]`; without, the classes are the sorted distinct labels.
    /// `origin` names the source in the error raised when nothing is left.
    pub fn from_rows(rows: Vec<(String, String)>, classes: Option<Vec<String>>, origin: &str) -> Result<TextDataset> {
        let classes = match classes {
            Some(c) => {
                let distinct: BTreeSet<&String> = c.iter().collect();
                if distinct.len() != c.len() || c.is_empty() {
                    return Err(Error::Config(format!("{origin}: `classes` must be non-empty and distinct, got {c:?}")));
                }
                c
            }
            None => rows.iter().map(|(_, l)| l.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        };
        let mut data = TextDataset { classes, ..TextDataset::default() };
        for (text, label) in rows {
            if let Some(i) = data.classes.iter().position(|c| *c == label) {
                data.texts.push(text);
                data.labels.push(i as i64);
            }
        }
        if data.is_empty() {
            return Err(Error::Data(format!("{origin}: no examples (classes {:?})", data.classes)));
        }
        Ok(data)
    }
}

/// Where a text data set comes from. A closed set: one variant per file format.
///
/// `.bz2` / `.gz` files are decompressed on the fly, chosen by extension.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TextSource {
    /// A CSV file with a header row.
    Csv {
        /// The file (`.csv`, `.csv.bz2`, `.csv.gz`).
        path: PathBuf,
        /// Header of the text column.
        text_column: String,
        /// Header of the label column.
        label_column: String,
        /// Classes to keep, in label order; absent means every distinct label, sorted.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
    /// One JSON object per line.
    Jsonl {
        /// The file (`.jsonl`, `.jsonl.bz2`, `.jsonl.gz`).
        path: PathBuf,
        /// Key of the text field (a string).
        text_column: String,
        /// Key of the label field (a string, number or boolean).
        label_column: String,
        /// Classes to keep, in label order; absent means every distinct label, sorted.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
}

impl TextSource {
    /// Reads the file into a data set.
    pub fn load(&self) -> Result<TextDataset> {
        let (path, text_col, label_col, classes, rows) = match self {
            TextSource::Csv { path, text_column, label_column, classes } => {
                (path, text_column, label_column, classes, read_csv(path, text_column, label_column)?)
            }
            TextSource::Jsonl { path, text_column, label_column, classes } => {
                (path, text_column, label_column, classes, read_jsonl(path, text_column, label_column)?)
            }
        };
        let origin = format!("{} (text `{text_col}`, label `{label_col}`)", path.display());
        TextDataset::from_rows(rows, classes.clone(), &origin)
    }
}

/// Opens `path`, decompressing `.bz2` and `.gz` by extension.
pub fn open_maybe_compressed(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(Error::io(path))?;
    let file = BufReader::new(file);
    // Multi-stream decoders: both formats allow concatenated streams (pbzip2,
    // `cat a.gz b.gz`), and the single-stream ones silently stop after the first.
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("bz2") => Box::new(bzip2::read::MultiBzDecoder::new(file)),
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(file)),
        _ => Box::new(file),
    })
}

/// Reads `(text, label)` pairs from a CSV file with a header row.
pub fn read_csv(path: &Path, text_column: &str, label_column: &str) -> Result<Vec<(String, String)>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(open_maybe_compressed(path)?);
    let bad = |e: csv::Error| Error::Data(format!("{}: {e}", path.display()));
    let headers = reader.headers().map_err(bad)?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::Data(format!("{}: no column `{name}`; columns are: {}", path.display(), headers.iter().collect::<Vec<_>>().join(", "))))
    };
    let (ti, li) = (column(text_column)?, column(label_column)?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(bad)?;
        // The csv reader already rejects ragged rows, so both fields exist.
        rows.push((record[ti].to_string(), record[li].to_string()));
    }
    Ok(rows)
}

/// Reads `(text, label)` pairs from a JSON Lines file; blank lines are skipped.
pub fn read_jsonl(path: &Path, text_column: &str, label_column: &str) -> Result<Vec<(String, String)>> {
    let reader = BufReader::new(open_maybe_compressed(path)?);
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(Error::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {line_no}", path.display());
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Data(format!("{}: not JSON: {e}", at())))?;
        let object = value.as_object().ok_or_else(|| Error::Data(format!("{}: not a JSON object", at())))?;
        let field = |name: &str| {
            object
                .get(name)
                .ok_or_else(|| Error::Data(format!("{}: no field `{name}`; fields are: {}", at(), object.keys().cloned().collect::<Vec<_>>().join(", "))))
        };
        let text = match field(text_column)? {
            serde_json::Value::String(s) => s.clone(),
            other => return Err(Error::Data(format!("{}: `{text_column}` is not a string: {other}", at()))),
        };
        // Labels are compared as strings, so `1` and `"1"` name the same class.
        let label = match field(label_column)? {
            serde_json::Value::String(s) => s.clone(),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => v.to_string(),
            other => return Err(Error::Data(format!("{}: `{label_column}` is not a string or number: {other}", at()))),
        };
        rows.push((text, label));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        let mut w: Box<dyn Write> = if name.ends_with(".bz2") {
            Box::new(bzip2::write::BzEncoder::new(file, bzip2::Compression::default()))
        } else if name.ends_with(".gz") {
            Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::default()))
        } else {
            Box::new(file)
        };
        w.write_all(content.as_bytes()).unwrap();
        drop(w);
        path
    }

    const CSV: &str = "id,label,text\n1,pos,\"good, really\"\n2,neg,bad\n3,meh,so-so\n4,pos,great\n";
    const JSONL: &str = "{\"t\": \"good\", \"y\": \"pos\"}\n\n{\"t\": \"bad\", \"y\": \"neg\", \"extra\": 1}\n{\"t\": \"so-so\", \"y\": 2}\n";

    fn csv_source(path: PathBuf, classes: Option<Vec<String>>) -> TextSource {
        TextSource::Csv { path, text_column: "text".into(), label_column: "label".into(), classes }
    }

    #[test]
    fn csv_plain_bz2_gz_agree_and_classes_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let mut loaded = Vec::new();
        for name in ["a.csv", "a.csv.bz2", "a.csv.gz"] {
            loaded.push(csv_source(write(dir.path(), name, CSV), None).load().unwrap());
        }
        assert_eq!(loaded[0], loaded[1]);
        assert_eq!(loaded[0], loaded[2]);
        let d = &loaded[0];
        assert_eq!(d.classes, ["meh", "neg", "pos"]);
        assert_eq!(d.texts, ["good, really", "bad", "so-so", "great"]);
        assert_eq!(d.labels, [2, 1, 0, 2]);
        assert_eq!(d.class_counts(), [1, 1, 2]);
    }

    #[test]
    fn given_classes_filter_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.csv", CSV);
        let d = csv_source(path, Some(vec!["pos".into(), "neg".into()])).load().unwrap();
        assert_eq!(d.classes, ["pos", "neg"]);
        assert_eq!(d.texts, ["good, really", "bad", "great"]);
        assert_eq!(d.labels, [0, 1, 0]);
    }

    #[test]
    fn empty_result_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.csv", CSV);
        let err = csv_source(path, Some(vec!["nope".into()])).load().unwrap_err().to_string();
        assert!(err.contains("no examples"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = csv_source("/nonexistent/zz.csv".into(), None).load().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/zz.csv"), "{err}");
    }

    #[test]
    fn missing_column_lists_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.csv", CSV);
        let src = TextSource::Csv { path, text_column: "review".into(), label_column: "label".into(), classes: None };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("`review`") && err.contains("id, label, text"), "{err}");
    }

    #[test]
    fn jsonl_reads_strings_and_numbers_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.jsonl", "a.jsonl.gz", "a.jsonl.bz2"] {
            let path = write(dir.path(), name, JSONL);
            let src = TextSource::Jsonl { path, text_column: "t".into(), label_column: "y".into(), classes: None };
            let d = src.load().unwrap();
            assert_eq!(d.classes, ["2", "neg", "pos"]);
            assert_eq!(d.texts, ["good", "bad", "so-so"]);
            assert_eq!(d.labels, [2, 1, 0]);
        }
    }

    #[test]
    fn jsonl_bad_line_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.jsonl", "{\"t\": \"a\", \"y\": \"b\"}\n{\"t\": oops}\n");
        let src = TextSource::Jsonl { path, text_column: "t".into(), label_column: "y".into(), classes: None };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let path = write(dir.path(), "b.jsonl", "{\"t\": \"a\", \"y\": \"b\"}\n\n{\"text\": \"a\", \"y\": \"b\"}\n");
        let src = TextSource::Jsonl { path, text_column: "t".into(), label_column: "y".into(), classes: None };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("`t`") && err.contains("text, y"), "{err}");
    }

    #[test]
    fn config_parses_and_rejects_unknown_fields() {
        let src: TextSource = serde_json::from_str(r#"{"kind": "jsonl", "path": "x.jsonl", "text_column": "t", "label_column": "y"}"#).unwrap();
        assert_eq!(src, TextSource::Jsonl { path: "x.jsonl".into(), text_column: "t".into(), label_column: "y".into(), classes: None });
        let err = serde_json::from_str::<TextSource>(r#"{"kind": "csv", "path": "x.csv", "text_column": "t", "label_colum": "y"}"#).unwrap_err().to_string();
        assert!(err.contains("label_colum"), "{err}");
        assert!(serde_json::from_str::<TextSource>(r#"{"kind": "parquet", "path": "x"}"#).is_err());
    }
}
