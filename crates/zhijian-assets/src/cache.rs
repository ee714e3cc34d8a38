//! The cache folder, verification stamps and `locate`.

use std::{
    env, fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use sha2::{Digest, Sha256};

use crate::{
    AssetError, Manifest,
    error::fetch_hint,
    manifest::{FileEntry, manifest},
};

/// Where fetched assets live: `$ZHIJIAN_CACHE` if set, else `$HOME/.cache/zhijian/assets`.
///
/// Each asset gets a folder `<cache>/<asset>/` holding its files and, next to
/// each, a `<file>.verified` stamp.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("ZHIJIAN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/zhijian/assets"),
        None => env::temp_dir().join("zhijian-assets"),
    }
}

/// The path of a fetched and verified file of an asset.
///
/// Fast: compares the file's size and mtime with the stamp written when it was
/// verified instead of hashing it again. Errors:
/// [`AssetError::NotFetched`] (with the command that fetches it) when absent,
/// [`AssetError::Changed`] when it differs from what was verified.
pub fn locate(asset: &str, file: &str) -> Result<PathBuf, AssetError> {
    locate_in(&cache_dir(), &manifest(asset)?, file)
}

pub(crate) fn locate_in(root: &Path, m: &Manifest, file: &str) -> Result<PathBuf, AssetError> {
    let entry = m.file(file)?;
    let path = root.join(&m.name).join(&entry.path);
    let changed = |reason: String| AssetError::Changed { asset: m.name.clone(), file: file.to_owned(), path: path.clone(), reason, hint: fetch_hint(&m.name) };
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AssetError::NotFetched { asset: m.name.clone(), file: file.to_owned(), hint: fetch_hint(&m.name) });
        }
        Err(e) => return Err(AssetError::io(format!("reading {}", path.display()))(e)),
    };
    let stamp = match fs::read_to_string(stamp_path(&path)) {
        Ok(text) => Stamp::parse(&text).ok_or_else(|| changed("its verification stamp is unreadable".into()))?,
        Err(_) => return Err(changed("it was never verified: no stamp (an interrupted or hand-made copy?)".into())),
    };
    if stamp.sha256 != entry.sha256 {
        return Err(changed(format!("verified as sha256 {}, but the manifest now expects {}", stamp.sha256, entry.sha256)));
    }
    let now = Stamp::of(&meta, &entry.sha256);
    if now != stamp {
        return Err(changed(format!("size/mtime are {}/{} but were {}/{} when verified", now.size, now.mtime_ns, stamp.size, stamp.mtime_ns)));
    }
    Ok(path)
}

/// Hashes `path` and checks it has the expected sha256 and size.
///
/// Errors with [`AssetError::Mismatch`] naming both hashes.
pub fn verify_file(path: &Path, expected_sha256: &str, expected_size: u64) -> Result<(), AssetError> {
    let (got_sha256, got_size) = hash_file(path)?;
    if got_sha256 != expected_sha256 || got_size != expected_size {
        return Err(AssetError::Mismatch { path: path.to_owned(), expected_sha256: expected_sha256.to_owned(), got_sha256, expected_size, got_size });
    }
    Ok(())
}

/// sha256 (lower-case hex) and size of a file.
pub(crate) fn hash_file(path: &Path) -> Result<(String, u64), AssetError> {
    let ctx = || format!("hashing {}", path.display());
    let mut f = fs::File::open(path).map_err(AssetError::io(ctx()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(AssetError::io(ctx()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

pub(crate) fn stamp_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    file.with_file_name(name)
}

/// Records that `path` was verified against `entry`, so `locate` need not hash it again.
pub(crate) fn write_stamp(path: &Path, entry: &FileEntry) -> Result<(), AssetError> {
    let meta = fs::metadata(path).map_err(AssetError::io(format!("reading {}", path.display())))?;
    let stamp = Stamp::of(&meta, &entry.sha256);
    let dir = path.parent().unwrap_or(Path::new("."));
    let target = stamp_path(path);
    let ctx = || format!("writing {}", target.display());
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(AssetError::io(ctx()))?;
    tmp.write_all(stamp.render().as_bytes()).map_err(AssetError::io(ctx()))?;
    make_readable(tmp.path());
    tmp.persist(&target).map_err(|e| AssetError::io(ctx())(e.error))?;
    Ok(())
}

/// Temporary files are created 0600; cached assets and stamps are ordinary readable files.
pub(crate) fn make_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Best effort: a cache that stays private still works.
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o644));
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    sha256: String,
    size: u64,
    mtime_ns: u128,
}

impl Stamp {
    fn of(meta: &fs::Metadata, sha256: &str) -> Stamp {
        let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        Stamp { sha256: sha256.to_owned(), size: meta.len(), mtime_ns }
    }

    fn render(&self) -> String {
        format!("sha256 {}\nsize {}\nmtime_ns {}\n", self.sha256, self.size, self.mtime_ns)
    }

    fn parse(text: &str) -> Option<Stamp> {
        let (mut sha256, mut size, mut mtime_ns) = (None, None, None);
        for line in text.lines() {
            match line.split_once(' ')? {
                ("sha256", v) => sha256 = Some(v.to_owned()),
                ("size", v) => size = v.parse().ok(),
                ("mtime_ns", v) => mtime_ns = v.parse().ok(),
                _ => return None,
            }
        }
        Some(Stamp { sha256: sha256?, size: size?, mtime_ns: mtime_ns? })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Source, parse_manifest};

    /// A one-file manifest whose file holds `content`, with the given sources.
    pub(crate) fn tiny_manifest(content: &[u8], sources: Vec<Source>) -> Manifest {
        let mut m = parse_manifest(
            r#"
name = "tiny"
description = "test"
license = "MIT"
[[files]]
path = "a.txt"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
size = 0
[[files.sources]]
kind = "url"
url = "file:///nonexistent"
"#,
            "test",
        )
        .unwrap();
        m.files[0].sha256 = hex::encode(Sha256::digest(content));
        m.files[0].size = content.len() as u64;
        m.files[0].sources = sources;
        m
    }

    #[test]
    fn verify_catches_a_corrupted_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        fs::write(&path, b"hello").unwrap();
        let good = hex::encode(Sha256::digest(b"hello"));
        verify_file(&path, &good, 5).unwrap();

        fs::write(&path, b"hellO").unwrap();
        match verify_file(&path, &good, 5).unwrap_err() {
            AssetError::Mismatch { expected_sha256, got_sha256, got_size, .. } => {
                assert_eq!(expected_sha256, good);
                assert_eq!(got_sha256, hex::encode(Sha256::digest(b"hellO")));
                assert_eq!(got_size, 5);
            }
            e => panic!("expected a mismatch, got {e}"),
        }
    }

    #[test]
    fn locate_missing_file_gives_the_fetch_hint() {
        let root = tempfile::tempdir().unwrap();
        let m = manifest("rotten-tomatoes").unwrap();
        let err = locate_in(root.path(), &m, "rotten_tomatoes_corpus_full.csv.bz2").unwrap_err();
        assert!(matches!(err, AssetError::NotFetched { .. }), "{err}");
        assert!(err.to_string().contains("run `cargo xtask fetch rotten-tomatoes` (or `zhijian fetch rotten-tomatoes`)"), "{err}");
    }

    #[test]
    fn locate_unknown_file_lists_the_files() {
        let root = tempfile::tempdir().unwrap();
        let m = manifest("rotten-tomatoes").unwrap();
        let err = locate_in(root.path(), &m, "nope.csv").unwrap_err().to_string();
        assert!(err.contains("nope.csv") && err.contains("rotten_tomatoes_corpus_full.csv.bz2"), "{err}");
    }

    #[test]
    fn stamp_is_invalidated_when_the_file_changes() {
        let root = tempfile::tempdir().unwrap();
        let m = tiny_manifest(b"hello", vec![]);
        let dir = root.path().join("tiny");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.txt");

        fs::write(&path, b"hello").unwrap();
        // Present but never verified: not trusted.
        assert!(matches!(locate_in(root.path(), &m, "a.txt"), Err(AssetError::Changed { .. })));

        write_stamp(&path, &m.files[0]).unwrap();
        assert_eq!(locate_in(root.path(), &m, "a.txt").unwrap(), path);

        fs::write(&path, b"hello, corrupted").unwrap();
        let err = locate_in(root.path(), &m, "a.txt").unwrap_err();
        assert!(matches!(err, AssetError::Changed { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("changed or is corrupt") && msg.contains("cargo xtask fetch tiny"), "{msg}");
    }

    #[test]
    fn stamp_for_another_sha_is_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let old = tiny_manifest(b"old", vec![]);
        let new = tiny_manifest(b"new", vec![]);
        let dir = root.path().join("tiny");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.txt");
        fs::write(&path, b"old").unwrap();
        write_stamp(&path, &old.files[0]).unwrap();
        assert!(locate_in(root.path(), &old, "a.txt").is_ok());
        let err = locate_in(root.path(), &new, "a.txt").unwrap_err().to_string();
        assert!(err.contains("manifest now expects"), "{err}");
    }

    #[test]
    fn stamp_round_trips() {
        let s = Stamp { sha256: "ab".repeat(32), size: 42, mtime_ns: 1_700_000_000_123_456_789 };
        assert_eq!(Stamp::parse(&s.render()), Some(s));
        assert_eq!(Stamp::parse("garbage"), None);
    }
}
