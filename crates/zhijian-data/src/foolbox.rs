//! foolbox's labelled sample images (`foolbox/data/` of the foolbox package):
//! files `<set>_<NN>_<label>.{jpg,png}`, e.g. `imagenet_00_243.jpg` is sample
//! 0 of the ImageNet set, class 243. The asset `foolbox-samples`
//! (`zhijian fetch foolbox-samples`) holds the 20 ImageNet samples.

use std::path::{Path, PathBuf};

use zhijian_core::{Error, Result};

use crate::image_folder::{ImageFiles, has_image_extension, with_sizes};

/// The sample sets foolbox ships and their number of classes.
pub const FOOLBOX_SETS: [(&str, usize); 5] = [("imagenet", 1000), ("cifar10", 10), ("cifar100", 100), ("mnist", 10), ("fashionMNIST", 10)];

/// The asset's name.
pub const ASSET: &str = "foolbox-samples";

/// `(NN, label)` of a file named `<set>_<NN>_<label>.<ext>`; `None` for other sets' files.
fn parse_name(set: &str, path: &Path) -> Option<Result<(u32, i64)>> {
    let stem = path.file_stem()?.to_str()?;
    let rest = stem.strip_prefix(set)?.strip_prefix('_')?;
    let bad = || Error::CorruptFile { path: path.into(), reason: format!("name is not `{set}_<NN>_<label>.jpg|png`") };
    Some(match rest.split_once('_') {
        Some((nn, label)) => nn.parse().ok().zip(label.parse().ok()).ok_or_else(bad),
        None => Err(bad()),
    })
}

/// The samples of `set` (`imagenet`, `cifar10`, `cifar100`, `mnist`,
/// `fashionMNIST`) in `dir`, in sample order, headers checked. Classes are
/// the label numbers as text (`"0"` … `"999"` for ImageNet): foolbox ships no names.
///
/// Errors: unknown set (listing the known ones), no files of the set, a
/// malformed name or duplicate sample number, a label past the set's
/// classes, an unreadable image (with its path).
pub fn foolbox_samples(dir: &Path, set: &str) -> Result<ImageFiles> {
    let Some(&(_, num_classes)) = FOOLBOX_SETS.iter().find(|(name, _)| *name == set) else {
        let known: Vec<&str> = FOOLBOX_SETS.iter().map(|(n, _)| *n).collect();
        return Err(Error::Config(format!("unknown foolbox sample set `{set}`; known sets: {}", known.join(", "))));
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        if !has_image_extension(&path) {
            continue;
        }
        if let Some(parsed) = parse_name(set, &path) {
            let (nn, label) = parsed?;
            if label < 0 || label as usize >= num_classes {
                return Err(Error::CorruptFile { path, reason: format!("label {label} is not a `{set}` class (0..{num_classes})") });
            }
            found.push((nn, path, label));
        }
    }
    if found.is_empty() {
        return Err(Error::Data(format!(
            "no foolbox `{set}` samples (`{set}_<NN>_<label>.jpg|png`) in {}; `zhijian fetch {ASSET}` fetches the imagenet set",
            dir.display()
        )));
    }
    found.sort();
    if let Some(w) = found.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Data(format!("foolbox sample {} appears twice: {} and {}", w[0].0, w[0].1.display(), w[1].1.display())));
    }
    let files = with_sizes(found.into_iter().map(|(_, path, label)| (path, label)).collect())?;
    Ok(ImageFiles { files, classes: (0..num_classes).map(|c| c.to_string()).collect() })
}

/// The cached asset's folder, every file of its manifest checked present and
/// unchanged; a missing file's error says how to fetch it.
pub fn foolbox_dir() -> Result<PathBuf> {
    let manifest = zhijian_assets::manifest(ASSET).map_err(|e| Error::Data(e.to_string()))?;
    let mut dir = None;
    for entry in &manifest.files {
        let path = zhijian_assets::locate(ASSET, &entry.path).map_err(|e| Error::Data(e.to_string()))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| Error::Data(format!("asset `{ASSET}` lists no files")))
}

/// The 20 ImageNet samples from the asset cache ([`foolbox_dir`]).
pub fn foolbox_imagenet() -> Result<ImageFiles> {
    foolbox_samples(&foolbox_dir()?, "imagenet")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_folder::tests::write_image;
    use crate::transforms::tests::test_image;

    #[test]
    fn parses_names_and_checks_labels() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["cifar10_01_7.png", "cifar10_00_3.png", "cifar100_00_42.png", "mnist_00_7.png"] {
            write_image(&d.join(name), &test_image(if name.starts_with("mnist") { 1 } else { 3 }, 8, 8, 0));
        }
        std::fs::write(d.join("cifar10_notes.txt"), "ignored: not an image").unwrap();
        let s = foolbox_samples(d, "cifar10").unwrap();
        assert_eq!(s.labels(), [3, 7]);
        assert!(s.files[0].path.ends_with("cifar10_00_3.png"));
        assert_eq!(s.classes.len(), 10);
        // `cifar10_` is not a prefix of cifar100's files' set: their names parse as cifar100 only.
        assert_eq!(foolbox_samples(d, "cifar100").unwrap().labels(), [42]);
        let err = foolbox_samples(d, "svhn").unwrap_err().to_string();
        assert!(err.contains("unknown foolbox sample set `svhn`") && err.contains("imagenet, cifar10"), "{err}");
        let err = foolbox_samples(d, "imagenet").unwrap_err().to_string();
        assert!(err.contains("zhijian fetch foolbox-samples"), "{err}");
        write_image(&d.join("mnist_01_12.png"), &test_image(1, 8, 8, 0));
        assert!(foolbox_samples(d, "mnist").unwrap_err().to_string().contains("label 12"));
        std::fs::remove_file(d.join("mnist_01_12.png")).unwrap();
        write_image(&d.join("mnist_x_1.png"), &test_image(1, 8, 8, 0));
        assert!(matches!(foolbox_samples(d, "mnist"), Err(Error::CorruptFile { path, .. }) if path.ends_with("mnist_x_1.png")));
    }
}
