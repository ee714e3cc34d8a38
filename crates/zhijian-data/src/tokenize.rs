//! Tokenisation with a Hugging Face `tokenizer.json`, cached on disk.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};
use tokenizers::{Tokenizer, TruncationParams};
use zhijian_core::{Error, Result};

/// Token ids and attention mask of a list of texts.
#[derive(Debug)]
pub struct TokenizedText {
    /// Ids `[n, len]` int64, padded with the pad id.
    pub ids: Tensor,
    /// 1 for real tokens, 0 for padding, `[n, len]` int64.
    pub mask: Tensor,
}

/// A tokenizer that truncates to `max_len` tokens (special tokens included).
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    fingerprint: Vec<u8>,
    max_len: usize,
    pad_id: i64,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, max_len: usize) -> Result<TextTokenizer> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::CorruptFile { path: path.into(), reason: e.to_string() })?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| Error::Config(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(None);
        let pad_id = tokenizer.token_to_id("[PAD]").or_else(|| tokenizer.token_to_id("<pad>")).unwrap_or(0) as i64;
        Ok(TextTokenizer { tokenizer, fingerprint: Sha256::digest(&bytes).to_vec(), max_len, pad_id })
    }

    /// Tokenises `texts` (in parallel).
    ///
    /// # Shapes
    /// → ids and mask `[texts.len(), L]`, L the longest encoding (≤ max_len).
    pub fn encode(&self, texts: &[String]) -> Result<TokenizedText> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings =
            self.tokenizer.encode_batch(inputs, true).map_err(|e| Error::Data(format!("tokenisation failed: {e}")))?;
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; texts.len() * len];
        let mut mask = vec![0i64; texts.len() * len];
        for (row, e) in encodings.iter().enumerate() {
            for (col, &id) in e.get_ids().iter().enumerate() {
                ids[row * len + col] = id as i64;
                mask[row * len + col] = 1;
            }
        }
        let shape = [texts.len() as i64, len as i64];
        Ok(TokenizedText { ids: Tensor::from_slice(&ids).reshape(shape), mask: Tensor::from_slice(&mask).reshape(shape) })
    }

    /// [`Self::encode`], memoised in `cache_dir` under a hash of the tokenizer,
    /// `max_len` and every text. An unreadable cache file is recomputed.
    pub fn encode_cached(&self, texts: &[String], cache_dir: &Path) -> Result<TokenizedText> {
        let path = self.cache_path(texts, cache_dir);
        if let Ok(tensors) = Tensor::read_safetensors(&path) {
            let mut map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
            if let (Some(ids), Some(mask)) = (map.remove("ids"), map.remove("mask")) {
                if ids.size().first() == Some(&(texts.len() as i64)) && ids.kind() == Kind::Int64 {
                    return Ok(TokenizedText { ids, mask });
                }
            }
        }
        let tokens = self.encode(texts)?;
        zhijian_core::save_atomic(&[("ids".into(), tokens.ids.shallow_clone()), ("mask".into(), tokens.mask.shallow_clone())], &path)?;
        Ok(tokens)
    }

    fn cache_path(&self, texts: &[String], cache_dir: &Path) -> PathBuf {
        let mut h = Sha256::new();
        h.update(&self.fingerprint);
        h.update(self.max_len.to_le_bytes());
        for t in texts {
            h.update((t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
        cache_dir.join(format!("{}.safetensors", hex::encode(&h.finalize()[..12])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORD_LEVEL: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"[PAD]":0,"[UNK]":1,"a":2,"good":3,"movie":4},"unk_token":"[UNK]"}}"#;

    #[test]
    fn pads_truncates_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, WORD_LEVEL).unwrap();
        let tok = TextTokenizer::from_file(&path, 3).unwrap();
        let texts = vec!["a good movie indeed".to_string(), "good".into()];
        let t = tok.encode(&texts).unwrap();
        assert_eq!(Vec::<i64>::try_from(t.ids.flatten(0, -1)).unwrap(), [2, 3, 4, 3, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(t.mask.flatten(0, -1)).unwrap(), [1, 1, 1, 1, 0, 0]);

        let cache = dir.path().join("cache");
        let first = tok.encode_cached(&texts, &cache).unwrap();
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        let again = tok.encode_cached(&texts, &cache).unwrap();
        assert!(first.ids.equal(&again.ids) && first.mask.equal(&again.mask));
        // A corrupt cache entry is recomputed, not trusted.
        let entry = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
        std::fs::write(&entry, b"garbage").unwrap();
        assert!(tok.encode_cached(&texts, &cache).unwrap().ids.equal(&t.ids));
    }

    #[test]
    fn corrupt_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = TextTokenizer::from_file(&path, 8).err().unwrap().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
