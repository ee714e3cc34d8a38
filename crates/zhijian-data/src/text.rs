//! Labelled text read from CSV, TSV or JSON Lines files, optionally compressed.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use zhijian_core::{Error, Result};

/// Texts with integer labels; label `i` names `classes[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextDataset {
    /// One text per example (the first of a sentence pair).
    pub texts: Vec<String>,
    /// The second text of each example, for sentence-pair tasks.
    pub pairs: Option<Vec<String>>,
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

/// The file formats [`read_columns`] reads, by extension (under `.gz` / `.bz2`).
const FORMATS: &str = ".csv, .tsv, .jsonl or .ndjson, each optionally .gz or .bz2";

/// One data row: its line in the file (from 1, header included) and the
/// wanted columns' cells, in the order asked for.
pub type Row = (usize, Vec<String>);

/// Reads the columns `wanted` of every row of a CSV (header row), TSV (header
/// row) or JSON Lines file, chosen by extension and decompressed on the fly.
/// Errors name the file and, for a bad row, its line; a missing column lists
/// the columns there are. JSON strings are taken as they are; numbers and
/// booleans as written (`1`, `true`), so `1` and `"1"` are the same label.
pub fn read_columns(path: &Path, wanted: &[&str]) -> Result<Vec<Row>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let plain = name.strip_suffix(".gz").or_else(|| name.strip_suffix(".bz2")).unwrap_or(name);
    let format = plain.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let rows = match format.as_str() {
        "csv" => read_delimited(path, b',', wanted)?,
        "tsv" => read_delimited(path, b'\t', wanted)?,
        "jsonl" | "ndjson" => read_json_lines(path, wanted)?,
        _ => return Err(Error::Data(format!("{}: unknown text format; use {FORMATS}", path.display()))),
    };
    if rows.is_empty() {
        return Err(Error::Data(format!("{}: no data rows (the file is empty or holds only a header)", path.display())));
    }
    Ok(rows)
}

fn read_delimited(path: &Path, delimiter: u8, wanted: &[&str]) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).delimiter(delimiter).from_reader(open_maybe_compressed(path)?);
    let bad = |e: csv::Error| match e.position() {
        Some(at) => Error::Data(format!("{} line {}: {e}", path.display(), at.line())),
        None => Error::Data(format!("{}: {e}", path.display())),
    };
    let headers = reader.headers().map_err(bad)?.clone();
    if headers.iter().all(str::is_empty) {
        return Err(Error::Data(format!("{}: empty file (no header row)", path.display())));
    }
    let columns = wanted
        .iter()
        .map(|name| {
            headers
                .iter()
                .position(|h| h == *name)
                .ok_or_else(|| Error::Data(format!("{}: no column `{name}`; columns are: {}", path.display(), headers.iter().collect::<Vec<_>>().join(", "))))
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(bad)?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        // The csv reader already rejects ragged rows, so every column exists.
        rows.push((line, columns.iter().map(|&c| record[c].to_string()).collect()));
    }
    Ok(rows)
}

fn read_json_lines(path: &Path, wanted: &[&str]) -> Result<Vec<Row>> {
    let reader = BufReader::new(open_maybe_compressed(path)?);
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let at = || format!("{} line {line_no}", path.display());
        let line = line.map_err(|e| Error::Data(format!("{}: {e}", at())))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Data(format!("{}: not JSON: {e}", at())))?;
        let object = value.as_object().ok_or_else(|| Error::Data(format!("{}: not a JSON object", at())))?;
        let cell = |name: &&str| match object.get(*name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Ok(v.to_string()),
            Some(other) => Err(Error::Data(format!("{}: `{name}` is not a string or number: {other}", at()))),
            None => Err(Error::Data(format!("{}: no field `{name}`; fields are: {}", at(), object.keys().cloned().collect::<Vec<_>>().join(", ")))),
        };
        rows.push((line_no, wanted.iter().map(cell).collect::<Result<_>>()?));
    }
    Ok(rows)
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
    Ok(read_columns(path, &[text_column, label_column])?.into_iter().map(|(_, mut cells)| (cells.remove(0), cells.remove(0))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
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

    fn csv_dataset(path: &Path, classes: Option<Vec<String>>) -> Result<TextDataset> {
        TextDataset::from_rows(read_csv(path, "text", "label")?, classes, "test")
    }

    #[test]
    fn csv_plain_bz2_gz_agree_and_classes_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let mut loaded = Vec::new();
        for name in ["a.csv", "a.csv.bz2", "a.csv.gz"] {
            loaded.push(csv_dataset(&write(dir.path(), name, CSV), None).unwrap());
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
        let d = csv_dataset(&path, Some(vec!["pos".into(), "neg".into()])).unwrap();
        assert_eq!(d.classes, ["pos", "neg"]);
        assert_eq!(d.texts, ["good, really", "bad", "great"]);
        assert_eq!(d.labels, [0, 1, 0]);
        let err = csv_dataset(&path, Some(vec!["nope".into()])).unwrap_err().to_string();
        assert!(err.contains("no examples"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_columns(Path::new("/nonexistent/zz.csv"), &["t"]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/zz.csv"), "{err}");
    }

    #[test]
    fn columns_come_in_the_order_asked_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.tsv", "a\tb\tc\n1\t2\t3\n\"x y\"\t5\t6\n");
        assert_eq!(read_columns(&path, &["c", "a"]).unwrap(), [(2, vec!["3".to_string(), "1".into()]), (3, vec!["6".to_string(), "x y".into()])]);
        let err = read_columns(&path, &["a", "review"]).unwrap_err().to_string();
        assert!(err.contains("`review`") && err.contains("a, b, c"), "{err}");
    }

    #[test]
    fn jsonl_reads_strings_and_numbers_and_compressed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.jsonl", "a.jsonl.gz", "a.ndjson.bz2"] {
            let rows = read_columns(&write(dir.path(), name, JSONL), &["t", "y"]).unwrap();
            let cells: Vec<Vec<String>> = rows.iter().map(|(_, c)| c.clone()).collect();
            assert_eq!(cells, [["good", "pos"], ["bad", "neg"], ["so-so", "2"]].map(|r| r.map(String::from).to_vec()));
            assert_eq!(rows.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 3, 4], "blank lines count, and are skipped");
        }
    }

    #[test]
    fn jsonl_bad_line_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.jsonl", "{\"t\": \"a\", \"y\": \"b\"}\n{\"t\": oops}\n");
        let err = read_columns(&path, &["t", "y"]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let path = write(dir.path(), "b.jsonl", "{\"t\": \"a\", \"y\": \"b\"}\n\n{\"text\": \"a\", \"y\": \"b\"}\n");
        let err = read_columns(&path, &["t", "y"]).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("`t`") && err.contains("text, y"), "{err}");
        let path = write(dir.path(), "c.jsonl", "{\"t\": [1], \"y\": \"b\"}\n");
        let err = read_columns(&path, &["t", "y"]).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("not a string"), "{err}");
    }
}
