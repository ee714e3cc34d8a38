//! The one error type of this crate.

use std::path::PathBuf;

/// What went wrong while reading manifests, locating or fetching an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A manifest does not parse or breaks a rule (bad sha256, no sources, …).
    #[error("invalid asset manifest {origin}: {message}")]
    BadManifest {
        /// Where the manifest came from (its file name).
        origin: String,
        /// The parser's or validator's message.
        message: String,
    },
    /// No manifest has this name.
    #[error("unknown asset `{name}`; known assets: {}", known.join(", "))]
    UnknownAsset {
        /// The name asked for.
        name: String,
        /// Every known asset name.
        known: Vec<String>,
    },
    /// The asset exists but lists no such file.
    #[error("asset `{asset}` has no file `{file}`; its files: {}", known.join(", "))]
    UnknownFile {
        /// The asset's name.
        asset: String,
        /// The file asked for.
        file: String,
        /// The files the asset lists.
        known: Vec<String>,
    },
    /// The file is not in the cache yet.
    #[error("asset file {asset}/{file} is not fetched yet: {hint}")]
    NotFetched {
        /// The asset's name.
        asset: String,
        /// The file's name.
        file: String,
        /// How to fetch it.
        hint: String,
    },
    /// The cached file no longer matches what was verified, so it may be corrupt.
    #[error("asset file {asset}/{file} at {} has changed or is corrupt ({reason}); re-fetch it: {hint}", path.display())]
    Changed {
        /// The asset's name.
        asset: String,
        /// The file's name.
        file: String,
        /// Where the file is.
        path: PathBuf,
        /// What differs.
        reason: String,
        /// How to fetch it again.
        hint: String,
    },
    /// A file's bytes are not the ones the manifest names.
    #[error(
        "{}: sha256 mismatch: expected {expected_sha256} ({expected_size} bytes), got {got_sha256} ({got_size} bytes)",
        path.display()
    )]
    Mismatch {
        /// The file checked.
        path: PathBuf,
        /// The sha256 the manifest names.
        expected_sha256: String,
        /// The sha256 of the file's bytes.
        got_sha256: String,
        /// The size the manifest names.
        expected_size: u64,
        /// The file's size.
        got_size: u64,
    },
    /// Every source of a file failed.
    #[error(
        "could not fetch {asset}/{file}; every source failed:\n{}",
        tried.iter().map(|t| format!("  - {t}")).collect::<Vec<_>>().join("\n")
    )]
    FetchFailed {
        /// The asset's name.
        asset: String,
        /// The file's name.
        file: String,
        /// Each source tried, in order, with why it failed.
        tried: Vec<String>,
    },
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl AssetError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AssetError {
        let context = context.into();
        move |source| AssetError::Io { context, source }
    }
}

/// The one sentence every "go and fetch it" error carries.
pub(crate) fn fetch_hint(asset: &str) -> String {
    format!("run `cargo xtask fetch {asset}` (or `zhijian fetch {asset}`)")
}
