//! Data adapters for real data sets: labelled text from CSV / JSONL, the Rotten
//! Tomatoes sentiment task, deterministic stratified splits and cached
//! tokenisation, producing [`zhijian_core::Split`]s. Functions take file paths;
//! finding the files (the asset cache) is the caller's business.

pub mod rotten_tomatoes;
pub mod split;
pub mod text;
pub mod tokenize;

use std::path::Path;

use tch::{Kind, Tensor};
use zhijian_core::{Input, Result, Split};

pub use rotten_tomatoes::rotten_tomatoes;
pub use split::{stratified_split, subsample_stratified, SplitIndices};
pub use text::{TextDataset, TextSource};
pub use tokenize::{TextTokenizer, TokenizedText};

/// The rows `indices` of tokenised text as a split.
pub fn token_split(name: &str, tokens: &TokenizedText, labels: &[i64], indices: &[usize]) -> Split {
    let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let labels = Tensor::from_slice(labels).to_kind(Kind::Int64).index_select(0, &idx);
    Split {
        name: name.into(),
        input: Input::Tokens { ids: tokens.ids.index_select(0, &idx), mask: tokens.mask.index_select(0, &idx) },
        labels,
    }
}

/// How a text data set becomes train / validation / test splits.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTask {
    /// Train / validation / test fractions.
    pub fractions: [f64; 3],
    /// Seed of the split.
    pub seed: u64,
    /// Keep a stratified subset of this many training examples.
    pub train_limit: Option<usize>,
}

/// Train, validation and test splits of a text task.
pub struct TextSplits {
    /// Training split.
    pub train: Split,
    /// Validation split.
    pub val: Split,
    /// Test split.
    pub test: Split,
    /// Class names.
    pub classes: Vec<String>,
}

impl TextTask {
    /// Splits and tokenises `data` (tokens cached in `cache_dir` if given).
    pub fn splits(&self, data: &TextDataset, tokenizer: &TextTokenizer, cache_dir: Option<&Path>) -> Result<TextSplits> {
        let mut s = stratified_split(&data.labels, self.fractions, self.seed)?;
        if let Some(n) = self.train_limit {
            s.train = subsample_stratified(&s.train, &data.labels, n, self.seed);
        }
        let tokens = match cache_dir {
            Some(dir) => tokenizer.encode_cached(&data.texts, dir)?,
            None => tokenizer.encode(&data.texts)?,
        };
        Ok(TextSplits {
            train: token_split("train", &tokens, &data.labels, &s.train),
            val: token_split("val", &tokens, &data.labels, &s.val),
            test: token_split("test", &tokens, &data.labels, &s.test),
            classes: data.classes.clone(),
        })
    }
}
