//! Data adapters for real data sets: text and tokenisation, image sets and
//! image folders, PIL-exact image transforms, corruptions (ImageNet-C), a
//! parallel image loader for lazy inputs, and splits.
//!
//! Asset lookup (download, checksum) happens in the caller; everything here
//! takes file paths, except the `foolbox-samples` shortcut
//! [`foolbox::foolbox_imagenet`], which finds the cached asset itself.

use std::path::PathBuf;

use tch::Tensor;
use zhijian_core::{Input, Result, Split};

pub mod corruptions;
pub mod foolbox;
pub mod image;
pub mod image_folder;
pub mod loader;
pub mod rotten_tomatoes;
pub mod split;
pub mod text;
pub mod text_files;
pub mod tokenize;
pub mod transforms;

pub use corruptions::{Corruption, Family, corrupt};
pub use foolbox::{foolbox_imagenet, foolbox_samples};
pub use image_folder::{ImageFile, ImageFiles, image_folder};
pub use loader::ImageLoader;
pub use rotten_tomatoes::rotten_tomatoes;
pub use split::{SplitIndices, check_fractions, of_classes, per_class, stratified_split, subsample_stratified};
pub use text::{TextDataset, read_columns};
pub use text_files::{TextColumns, TextCorpus, TextFiles, TextShift};
pub use tokenize::{TextTokenizer, TokenizedText};
pub use transforms::{Augment, Image, ImageTransform};

/// The rows `indices` of `tokens` and `labels` as a named split.
///
/// Columns past the split's longest text are cut, so a split of short texts
/// does not carry the whole data set's padding.
///
/// # Shapes
/// `tokens`: `[n, len]`; `labels`: `n` → `Input::Tokens` `[k, len' ≤ len]` int64
/// and labels `[k]` int64, `k = indices.len()`.
pub fn token_split(name: &str, tokens: &TokenizedText, labels: &[i64], indices: &[usize]) -> Split {
    let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let mask = tokens.mask.index_select(0, &idx);
    let longest = if indices.is_empty() { 0 } else { mask.sum_dim_intlist(1, false, tch::Kind::Int64).max().int64_value(&[]) };
    let ids = tokens.ids.index_select(0, &idx).narrow(1, 0, longest);
    let labels = Tensor::from_slice(&indices.iter().map(|&i| labels[i]).collect::<Vec<_>>());
    Split { name: name.to_string(), input: Input::Tokens { ids, mask: mask.narrow(1, 0, longest) }, labels }
}

/// How to turn a text data set into train / validation / test splits.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTask {
    /// Train, validation and test fractions (non-negative, summing to 1),
    /// where the data does not come split.
    pub fractions: [f64; 3],
    /// Seed of the split and of the subsamples.
    pub seed: u64,
    /// Keep at most this many training examples, class proportions kept
    /// ([`subsample_stratified`]).
    pub train_limit: Option<usize>,
    /// Keep at most this many examples of validation, test and each shifted
    /// split, class proportions kept.
    pub eval_limit: Option<usize>,
    /// Where tokenisations are cached; `None` tokenises every time.
    pub cache_dir: Option<PathBuf>,
}

impl Default for TextTask {
    fn default() -> Self {
        TextTask { fractions: [0.8, 0.1, 0.1], seed: 0, train_limit: None, eval_limit: None, cache_dir: None }
    }
}

/// The splits of a text task, ready for the training engine.
#[derive(Debug)]
pub struct TextSplits {
    /// Training examples (possibly subsampled).
    pub train: Split,
    /// Validation examples.
    pub val: Split,
    /// Test examples.
    pub test: Split,
    /// Shifted test splits, named as configured.
    pub ood: Vec<Split>,
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
}

/// A different seed stream from the split's, so a subsample is not correlated
/// with which rows the split's shuffle put first.
pub const SUBSET_STREAM: u64 = 0x5EED_5AB5_A3D1_E000;

impl TextTask {
    /// Splits `data` by `fractions` (stratified), tokenises every text once
    /// (through the cache when set) and cuts the splits.
    ///
    /// The split depends only on the labels and the seed, not on the tokenizer,
    /// so different backbones see the same examples in each part.
    ///
    /// # Shapes
    /// Each split's input is `Input::Tokens` `[k, len ≤ max_len]` int64 with labels `[k]` int64.
    pub fn build(&self, data: &TextDataset, tokenizer: &TextTokenizer) -> Result<TextSplits> {
        let parts = stratified_split(&data.labels, self.fractions, self.seed)?;
        self.build_parts(data, parts, &[], tokenizer)
    }

    /// [`Self::build`] for a corpus that comes split, with its shifted test sets.
    pub fn build_corpus(&self, corpus: &TextCorpus, tokenizer: &TextTokenizer) -> Result<TextSplits> {
        self.build_parts(&corpus.data, corpus.parts.clone(), &corpus.ood, tokenizer)
    }

    fn build_parts(&self, data: &TextDataset, parts: SplitIndices, shifted: &[(String, TextDataset)], tokenizer: &TextTokenizer) -> Result<TextSplits> {
        let limited = |rows: Vec<usize>, labels: &[i64], limit: Option<usize>| match limit {
            Some(n) => subsample_stratified(&rows, labels, n, self.seed ^ SUBSET_STREAM),
            None => rows,
        };
        let tokens = tokenizer.encode_dataset(data, self.cache_dir.as_deref())?;
        let ood = shifted
            .iter()
            .map(|(name, set)| {
                let rows = limited((0..set.len()).collect(), &set.labels, self.eval_limit);
                Ok(token_split(name, &tokenizer.encode_dataset(set, self.cache_dir.as_deref())?, &set.labels, &rows))
            })
            .collect::<Result<_>>()?;
        Ok(TextSplits {
            train: token_split("train", &tokens, &data.labels, &limited(parts.train, &data.labels, self.train_limit)),
            val: token_split("val", &tokens, &data.labels, &limited(parts.val, &data.labels, self.eval_limit)),
            test: token_split("test", &tokens, &data.labels, &limited(parts.test, &data.labels, self.eval_limit)),
            ood,
            classes: data.classes.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> TextDataset {
        let words = ["good", "bad", "film", "very"];
        let mut d = TextDataset { classes: vec!["neg".into(), "pos".into()], ..TextDataset::default() };
        for i in 0..50usize {
            // Lengths vary so trimming is visible; label pattern 3:2.
            let text = (0..1 + i % 7).map(|j| words[(i + j) % 4]).collect::<Vec<_>>().join(" ");
            d.texts.push(text);
            d.labels.push(if i % 5 < 3 { 1 } else { 0 });
        }
        d
    }

    #[test]
    fn token_split_selects_rows_and_trims_padding() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tokenize::tests::tiny_tokenizer(dir.path()), 32).unwrap();
        let texts: Vec<String> = ["good", "very very very good film", "bad film"].map(String::from).to_vec();
        let tokens = tok.encode(&texts).unwrap();
        assert_eq!(tokens.ids.size(), [3, 7]);
        let s = token_split("x", &tokens, &[1, 0, 1], &[2, 0]);
        assert_eq!(s.name, "x");
        assert_eq!(Vec::<i64>::try_from(&s.labels).unwrap(), [1, 1]);
        let Input::Tokens { ids, mask } = &s.input else { panic!("not tokens") };
        assert_eq!(Vec::<Vec<i64>>::try_from(ids).unwrap(), [vec![2, 5, 6, 3], vec![2, 4, 3, 1]]);
        assert_eq!(Vec::<Vec<i64>>::try_from(mask).unwrap(), [vec![1, 1, 1, 1], vec![1, 1, 1, 0]]);
        assert_eq!(token_split("e", &tokens, &[1, 0, 1], &[]).len(), 0);
    }

    #[test]
    fn text_task_builds_disjoint_stratified_splits() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tokenize::tests::tiny_tokenizer(dir.path()), 32).unwrap();
        let data = dataset();
        let task = TextTask { fractions: [0.6, 0.2, 0.2], seed: 3, cache_dir: Some(dir.path().join("c")), ..TextTask::default() };
        let s = task.build(&data, &tok).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (30, 10, 10));
        assert_eq!(s.classes, ["neg", "pos"]);
        let pos = |sp: &Split| Vec::<i64>::try_from(&sp.labels).unwrap().iter().sum::<i64>();
        assert_eq!((pos(&s.train), pos(&s.val), pos(&s.test)), (18, 6, 6));
        // Built again from the cache: identical.
        let again = task.build(&data, &tok).unwrap();
        assert!(again.test.labels.equal(&s.test.labels));
        let (Input::Tokens { ids: a, .. }, Input::Tokens { ids: b, .. }) = (&s.test.input, &again.test.input) else { panic!("not tokens") };
        assert!(a.equal(b));
        // A training limit shrinks only train, keeping the 3:2 ratio.
        let small = TextTask { train_limit: Some(10), ..task }.build(&data, &tok).unwrap();
        assert_eq!((small.train.len(), small.val.len()), (10, 10));
        assert_eq!(pos(&small.train), 6);
        assert!(small.test.labels.equal(&s.test.labels));
    }
}
