//! Labelled text from CSV or JSONL files, with column mapping.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, Result};

/// Texts with integer labels; `classes[label]` names each label.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextDataset {
    /// The texts.
    pub texts: Vec<String>,
    /// Label index of each text.
    pub labels: Vec<i64>,
    /// Class names.
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

    /// Drops exact repeats of a text (after the first), so no text can land in
    /// both the training and the test split. Returns how many were dropped.
    pub fn dedup(&mut self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let before = self.texts.len();
        let keep: Vec<bool> = self.texts.iter().map(|t| seen.insert(t.clone())).collect();
        let mut k = keep.iter();
        self.texts.retain(|_| *k.next().expect("same length"));
        let mut k = keep.iter();
        self.labels.retain(|_| *k.next().expect("same length"));
        before - self.texts.len()
    }
}

/// Where labelled text comes from. A closed set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TextSource {
    /// A CSV file with a header row (`.csv`, `.csv.gz`, `.csv.bz2`).
    Csv {
        /// The file.
        path: PathBuf,
        /// Column holding the text.
        text_column: String,
        /// Column holding the label.
        label_column: String,
        /// Keep only these labels, in this order; default: every label, sorted.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
    /// One JSON object per line (`.jsonl`, `.jsonl.gz`, `.jsonl.bz2`).
    Jsonl {
        /// The file.
        path: PathBuf,
        /// Field holding the text.
        text_column: String,
        /// Field holding the label (string or number).
        label_column: String,
        /// Keep only these labels, in this order; default: every label, sorted.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
}

/// Opens a file, decompressing `.gz` / `.bz2` by extension.
pub fn open_maybe_compressed(path: &Path) -> Result<Box<dyn Read>> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => Box::new(flate2::read::GzDecoder::new(file)),
        Some("bz2") => Box::new(bzip2::read::BzDecoder::new(file)),
        _ => Box::new(file),
    })
}

impl TextSource {
    /// Reads the texts and labels.
    pub fn load(&self) -> Result<TextDataset> {
        let (path, rows, classes) = match self {
            TextSource::Csv { path, text_column, label_column, classes } => {
                (path, read_csv(path, text_column, label_column)?, classes)
            }
            TextSource::Jsonl { path, text_column, label_column, classes } => {
                (path, read_jsonl(path, text_column, label_column)?, classes)
            }
        };
        let classes: Vec<String> = match classes {
            Some(c) => c.clone(),
            None => rows.iter().map(|(_, l)| l.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        };
        let mut data = TextDataset { classes, ..Default::default() };
        for (text, label) in rows {
            if let Some(i) = data.classes.iter().position(|c| *c == label) {
                data.texts.push(text);
                data.labels.push(i as i64);
            }
        }
        if data.is_empty() {
            return Err(Error::Data(format!("{}: no rows with a label in {:?}", path.display(), data.classes)));
        }
        Ok(data)
    }
}

fn read_csv(path: &Path, text: &str, label: &str) -> Result<Vec<(String, String)>> {
    let mut reader = csv::Reader::from_reader(open_maybe_compressed(path)?);
    let bad = |e: csv::Error| Error::CorruptFile { path: path.into(), reason: e.to_string() };
    let header = reader.headers().map_err(bad)?.clone();
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            Error::Data(format!("{}: no column `{name}`; columns are: {}", path.display(), header.iter().collect::<Vec<_>>().join(", ")))
        })
    };
    let (t, l) = (column(text)?, column(label)?);
    reader
        .records()
        .map(|r| {
            let r = r.map_err(bad)?;
            Ok((r.get(t).unwrap_or("").trim().to_string(), r.get(l).unwrap_or("").trim().to_string()))
        })
        .collect()
}

fn read_jsonl(path: &Path, text: &str, label: &str) -> Result<Vec<(String, String)>> {
    let reader = BufReader::new(open_maybe_compressed(path)?);
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(Error::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |why: String| Error::Data(format!("{} line {}: {why}", path.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        let field = |name: &str| match v.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.trim().to_string()),
            Some(other) if !other.is_null() => Ok(other.to_string()),
            _ => Err(at(format!("no field `{name}`"))),
        };
        rows.push((field(text)?, field(label)?));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn csv_and_jsonl_with_column_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("a.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&csv).unwrap(), Default::default());
        gz.write_all(b"label,body\npos, good \nneg,bad\nmeh,so-so\npos,great\n").unwrap();
        gz.finish().unwrap();
        let src = TextSource::Csv {
            path: csv.clone(),
            text_column: "body".into(),
            label_column: "label".into(),
            classes: Some(vec!["neg".into(), "pos".into()]),
        };
        let d = src.load().unwrap();
        assert_eq!(d.texts, ["good", "bad", "great"]);
        assert_eq!(d.labels, [1, 0, 1]);

        let jsonl = dir.path().join("b.jsonl");
        std::fs::write(&jsonl, "{\"t\": \"x\", \"y\": 1}\n\n{\"t\": \"z\", \"y\": 0}\n").unwrap();
        let src = TextSource::Jsonl { path: jsonl.clone(), text_column: "t".into(), label_column: "y".into(), classes: None };
        let d = src.load().unwrap();
        assert_eq!((d.texts, d.labels, d.classes), (vec!["x".to_string(), "z".into()], vec![1, 0], vec!["0".to_string(), "1".into()]));

        std::fs::write(&jsonl, "{\"t\": \"x\", \"y\": 1}\nnot json\n").unwrap();
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let src = TextSource::Csv { path: csv, text_column: "text".into(), label_column: "label".into(), classes: None };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("no column `text`") && err.contains("body"), "{err}");
    }

    #[test]
    fn dedup_keeps_first_occurrences() {
        let mut d = TextDataset {
            texts: vec!["a".into(), "b".into(), "a".into()],
            labels: vec![0, 1, 0],
            classes: vec!["x".into(), "y".into()],
        };
        assert_eq!(d.dedup(), 1);
        assert_eq!((d.texts.as_slice(), d.labels.as_slice()), (&["a".to_string(), "b".into()][..], &[0i64, 1][..]));
    }
}
