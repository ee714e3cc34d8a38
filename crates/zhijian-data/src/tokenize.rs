//! Tokenisation with a Hugging Face `tokenizer.json`, padded into tensors and
//! cached on disk.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};
use zhijian_core::{Error, Result};

/// Token ids and attention masks of a batch of texts.
#[derive(Debug)]
pub struct TokenizedText {
    /// Token ids `[n, len]`, int64, right-padded with the tokenizer's pad id.
    pub ids: Tensor,
    /// `[n, len]`, int64: 1 for real tokens, 0 for padding.
    pub mask: Tensor,
}

impl TokenizedText {
    /// Number of texts.
    pub fn len(&self) -> i64 {
        self.ids.size()[0]
    }

    /// Whether there are no texts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real (non-padding) tokens of each text.
    ///
    /// # Shapes
    /// `[n]`, int64.
    pub fn lengths(&self) -> Tensor {
        self.mask.sum_dim_intlist(1, false, Kind::Int64)
    }
}

/// A `tokenizer.json` tokenizer that truncates to `max_len` tokens.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
    pad_id: i64,
    /// sha256 of the tokenizer.json bytes: part of every cache key.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer_json`. Encodings are truncated to `max_len` tokens,
    /// special tokens included; the file's own truncation and padding settings
    /// are replaced (padding happens when building tensors).
    pub fn from_file(tokenizer_json: &Path, max_len: usize) -> Result<TextTokenizer> {
        let bytes = fs::read(tokenizer_json).map_err(Error::io(tokenizer_json))?;
        let corrupt = |reason: String| Error::CorruptFile { path: tokenizer_json.to_path_buf(), reason };
        let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))?;
        // The file's padding section (if any) is the authority on the pad id;
        // otherwise look for the usual pad tokens, and fall back to BERT's 0.
        let pad_id = match tokenizer.get_padding() {
            Some(p) => p.pad_id,
            None => ["[PAD]", "<pad>"].iter().find_map(|t| tokenizer.token_to_id(t)).unwrap_or(0),
        };
        tokenizer.with_padding(None);
        // Fewer slots than the special tokens need makes the tokenizer refuse,
        // or worse, underflow; say so in our own words.
        let specials = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if max_len <= specials {
            return Err(Error::Config(format!("max_len {max_len} leaves no room for text next to {specials} special tokens")));
        }
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..TruncationParams::default() }))
            .map_err(|e| Error::Config(format!("truncation to {max_len}: {e}")))?;
        Ok(TextTokenizer { tokenizer, max_len, pad_id: pad_id as i64, fingerprint: Sha256::digest(&bytes).into() })
    }

    /// The most tokens an encoding keeps, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Token ids of one text (with special tokens, truncated), for inspection.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Data(format!("tokenising: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenises `texts` (in parallel) and pads them to the longest encoding.
    ///
    /// # Shapes
    /// `texts` (n of them) → `ids`, `mask`: `[n, len]` int64, where `len` is the
    /// longest encoding (at most `max_len`; 0 when `texts` is empty).
    pub fn encode(&self, texts: &[String]) -> Result<TokenizedText> {
        self.encode_inputs(texts, None)
    }

    /// Tokenises sentence pairs `(first[i], second[i])` with the tokenizer's
    /// pair template (`[CLS] a [SEP] b [SEP]` for BERT), truncating the longer
    /// of the two first. Token type ids are not kept: zhijian's encoders embed
    /// every token as type 0.
    ///
    /// # Shapes
    /// As [`Self::encode`].
    pub fn encode_pairs(&self, first: &[String], second: &[String]) -> Result<TokenizedText> {
        if first.len() != second.len() {
            return Err(Error::Data(format!("{} first texts but {} second texts", first.len(), second.len())));
        }
        self.encode_inputs(first, Some(second))
    }

    fn encode_inputs(&self, texts: &[String], pairs: Option<&[String]>) -> Result<TokenizedText> {
        let inputs: Vec<tokenizers::EncodeInput> = match pairs {
            None => texts.iter().map(|t| t.as_str().into()).collect(),
            Some(second) => texts.iter().zip(second).map(|(a, b)| (a.as_str(), b.as_str()).into()).collect(),
        };
        let encodings = self.tokenizer.encode_batch(inputs, true).map_err(|e| Error::Data(format!("tokenising: {e}")))?;
        let n = encodings.len();
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; n * len];
        let mut mask = vec![0i64; n * len];
        for (row, enc) in encodings.iter().enumerate() {
            for (col, &id) in enc.get_ids().iter().enumerate() {
                ids[row * len + col] = id as i64;
                mask[row * len + col] = 1;
            }
        }
        let shape = [n as i64, len as i64];
        Ok(TokenizedText { ids: Tensor::from_slice(&ids).view(shape), mask: Tensor::from_slice(&mask).view(shape) })
    }

    /// The cache file [`Self::encode_cached`] uses for `texts` in `cache_dir`.
    pub fn cache_path(&self, texts: &[String], cache_dir: &Path) -> PathBuf {
        self.cache_path_of(texts, None, cache_dir)
    }

    fn cache_path_of(&self, texts: &[String], pairs: Option<&[String]>, cache_dir: &Path) -> PathBuf {
        let mut h = Sha256::new();
        // Length-prefix everything so no two different inputs hash the same bytes.
        h.update(b"zhijian-data/tokens/v1\0");
        h.update(self.fingerprint);
        h.update((self.max_len as u64).to_le_bytes());
        h.update((texts.len() as u64).to_le_bytes());
        // Single texts hash as they always did, so existing caches stay valid.
        let second = pairs.into_iter().flatten().map(|t| t.as_bytes());
        let marker = pairs.map(|_| b"pairs\0".as_slice());
        for t in texts.iter().map(|t| t.as_bytes()).chain(marker).chain(second) {
            h.update((t.len() as u64).to_le_bytes());
            h.update(t);
        }
        cache_dir.join(format!("tokens-{}.safetensors", hex::encode(h.finalize())))
    }

    /// [`Self::encode`], remembered in `cache_dir` under a key covering the
    /// tokenizer file, `max_len` and every text. A cache file that cannot be
    /// read or does not match is ignored and rewritten.
    ///
    /// # Shapes
    /// As [`Self::encode`].
    pub fn encode_cached(&self, texts: &[String], cache_dir: &Path) -> Result<TokenizedText> {
        self.encode_through(texts, None, Some(cache_dir))
    }

    /// The texts of `data` (pairs where it has them), through the cache in
    /// `cache_dir` when one is given.
    ///
    /// # Shapes
    /// As [`Self::encode`], with `n = data.len()`.
    pub fn encode_dataset(&self, data: &crate::TextDataset, cache_dir: Option<&Path>) -> Result<TokenizedText> {
        self.encode_through(&data.texts, data.pairs.as_deref(), cache_dir)
    }

    fn encode_through(&self, texts: &[String], pairs: Option<&[String]>, cache_dir: Option<&Path>) -> Result<TokenizedText> {
        let encode = || match pairs {
            Some(second) => self.encode_pairs(texts, second),
            None => self.encode(texts),
        };
        let Some(cache_dir) = cache_dir else { return encode() };
        let path = self.cache_path_of(texts, pairs, cache_dir);
        if path.exists() {
            match read_cache(&path, texts.len()) {
                Some(t) => return Ok(t),
                None => eprintln!("zhijian-data: ignoring unreadable token cache {}", path.display()),
            }
        }
        let tokens = encode()?;
        // Atomic (temporary file, then rename): readers never see a half-written file.
        zhijian_core::save_atomic(&[("ids".into(), tokens.ids.shallow_clone()), ("mask".into(), tokens.mask.shallow_clone())], &path)?;
        Ok(tokens)
    }
}

/// The cached tensors, if the file parses and has the expected shape and types.
fn read_cache(path: &Path, n: usize) -> Option<TokenizedText> {
    let mut tensors = Tensor::read_safetensors(path).ok()?;
    let mut take = |name: &str| {
        let i = tensors.iter().position(|(k, _)| k == name)?;
        Some(tensors.swap_remove(i).1)
    };
    let (ids, mask) = (take("ids")?, take("mask")?);
    let ok = ids.kind() == Kind::Int64 && mask.kind() == Kind::Int64 && ids.dim() == 2 && ids.size() == mask.size() && ids.size()[0] == n as i64;
    ok.then_some(TokenizedText { ids, mask })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer with BERT-style `[CLS] … [SEP]` framing and a
    /// non-zero pad id, so padding with the wrong id shows.
    pub(crate) fn tiny_tokenizer(dir: &Path) -> PathBuf {
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "film": 6, "very": 7, "!": 8},
                "unk_token": "[UNK]"
            }
        });
        let path = dir.join("tokenizer.json");
        fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        path
    }

    fn texts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(t).unwrap()
    }

    #[test]
    fn encodes_pads_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 16).unwrap();
        assert_eq!(tok.pad_id(), 1);
        let t = tok.encode(&texts(&["Good film!", "bad", "very odd film"])).unwrap();
        assert_eq!(t.ids.kind(), Kind::Int64);
        assert_eq!(t.mask.kind(), Kind::Int64);
        assert_eq!(rows(&t.ids), [vec![2, 4, 6, 8, 3], vec![2, 5, 3, 1, 1], vec![2, 7, 0, 6, 3]]);
        assert_eq!(rows(&t.mask), [vec![1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0], vec![1, 1, 1, 1, 1]]);
        assert_eq!(Vec::<i64>::try_from(t.lengths()).unwrap(), [5, 3, 5]);
    }

    #[test]
    fn pairs_use_the_pair_template_and_their_own_cache_key() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 16).unwrap();
        let (a, b) = (texts(&["good film", "bad"]), texts(&["very bad", "film !"]));
        let t = tok.encode_pairs(&a, &b).unwrap();
        assert_eq!(rows(&t.ids), [vec![2, 4, 6, 3, 7, 5, 3], vec![2, 5, 3, 6, 8, 3, 1]]);
        assert!(tok.encode_pairs(&a, &b[..1]).is_err());
        let pairs = crate::TextDataset { texts: a.clone(), pairs: Some(b), labels: vec![0, 1], classes: vec!["x".into(), "y".into()] };
        let single = crate::TextDataset { pairs: None, ..pairs.clone() };
        let cache = dir.path().join("cache");
        assert_eq!(rows(&tok.encode_dataset(&pairs, Some(&cache)).unwrap().ids), rows(&t.ids));
        assert_eq!(rows(&tok.encode_dataset(&single, Some(&cache)).unwrap().ids), rows(&tok.encode(&a).unwrap().ids));
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 2, "pairs and single texts are cached apart");
        assert_eq!(rows(&tok.encode_dataset(&pairs, Some(&cache)).unwrap().ids), rows(&t.ids));
    }

    #[test]
    fn truncates_to_max_len_including_specials() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 4).unwrap();
        let t = tok.encode(&texts(&["very very good film !", "bad"])).unwrap();
        assert_eq!(rows(&t.ids), [vec![2, 7, 7, 3], vec![2, 5, 3, 1]]);
        assert!(TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 2).is_err());
    }

    #[test]
    fn empty_batch_has_zero_rows() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 8).unwrap();
        let t = tok.encode(&[]).unwrap();
        assert_eq!(t.ids.size(), [0, 0]);
    }

    #[test]
    fn cache_round_trips_keys_on_inputs_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let tok = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 8).unwrap();
        let a = texts(&["good film", "bad film !"]);
        let fresh = tok.encode_cached(&a, &cache).unwrap();
        let path = tok.cache_path(&a, &cache);
        assert!(path.exists());
        // Served from the file: prove it by planting different content under the key.
        let planted = Tensor::from_slice(&[9i64, 9, 9, 9]).view([2, 2]);
        Tensor::write_safetensors(&[("ids", &planted), ("mask", &planted)], &path).unwrap();
        assert_eq!(rows(&tok.encode_cached(&a, &cache).unwrap().ids), [vec![9, 9], vec![9, 9]]);
        // Garbage in the file: ignored, recomputed, rewritten.
        fs::write(&path, b"not safetensors").unwrap();
        let again = tok.encode_cached(&a, &cache).unwrap();
        assert_eq!(rows(&again.ids), rows(&fresh.ids));
        assert_eq!(rows(&read_cache(&path, 2).unwrap().ids), rows(&fresh.ids));
        // Keys differ with texts, order and max_len.
        let b = texts(&["bad film !", "good film"]);
        assert_ne!(tok.cache_path(&b, &cache), path);
        let tok4 = TextTokenizer::from_file(&tiny_tokenizer(dir.path()), 4).unwrap();
        assert_ne!(tok4.cache_path(&a, &cache), path);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn missing_tokenizer_names_the_path() {
        let err = TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), 8).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    }

    /// A truncated or foreign tokenizer.json is a corrupt file, named.
    #[test]
    fn damaged_tokenizer_names_the_path_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let whole = fs::read(tiny_tokenizer(dir.path())).unwrap();
        for (name, bytes) in [("cut.json", &whole[..whole.len() / 2]), ("foreign.json", &b"{\"model\": {\"type\": \"Nope\"}}"[..]), ("empty.json", &b""[..])] {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            let err = TextTokenizer::from_file(&path, 8).unwrap_err();
            assert!(matches!(&err, Error::CorruptFile { path: p, .. } if p.ends_with(name)), "{err}");
            assert!(err.to_string().starts_with(&format!("cannot read {}: ", path.display())), "{err}");
        }
    }

    #[test]
    fn real_minilm_tokenizer_if_present() {
        let Some(home) = std::env::var_os("HOME") else { return };
        let path = Path::new(&home).join(".cache/zhijian/assets/all-minilm-l6-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let tok = TextTokenizer::from_file(&path, 128).unwrap();
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.ids("Hello world!").unwrap(), [101, 7592, 2088, 999, 102]);
        let t = tok.encode(&texts(&["Hello world!", "Hi"])).unwrap();
        assert_eq!(rows(&t.ids), [vec![101, 7592, 2088, 999, 102], vec![101, 7632, 102, 0, 0]]);
        let long = "word ".repeat(500);
        assert_eq!(tok.ids(&long).unwrap().len(), 128);
    }

    /// MPNet's own tokenizer (all-mpnet-base-v2): `<s>`/`</s>` around the text,
    /// padding with `<pad>` = 1 (the file pads to 128; zhijian pads to the longest).
    #[test]
    fn real_mpnet_tokenizer_if_present() {
        let Some(home) = std::env::var_os("HOME") else { return };
        let path = Path::new(&home).join(".cache/zhijian/assets/all-mpnet-base-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let tok = TextTokenizer::from_file(&path, 384).unwrap();
        assert_eq!(tok.pad_id(), 1);
        let t = tok.encode(&texts(&["Hello world!", "Hi"])).unwrap();
        assert_eq!(rows(&t.ids), [vec![0, 7596, 2092, 1003, 2], vec![0, 7636, 2, 1, 1]]);
        assert_eq!(rows(&t.mask), [vec![1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0]]);
    }
}
