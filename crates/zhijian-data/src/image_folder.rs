//! Image folders (torchvision's `ImageFolder` layout): `root/<class>/…/*.jpg`,
//! classes sorted by folder name, files sorted by path.
//!
//! Listing reads only each file's header (its dimensions), in parallel, so a
//! corrupt or non-image file is reported up front with its path while the
//! pixels are decoded later, batch by batch, by the loader. Hidden entries
//! (names starting with `.`, e.g. `.ipynb_checkpoints`) are skipped.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use zhijian_core::{Error, Result};

use crate::transforms::Image;

/// File extensions taken as images (any case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// One labelled image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// The file.
    pub path: PathBuf,
    /// Label index.
    pub label: i64,
    /// Rows, from the header.
    pub height: u32,
    /// Columns, from the header.
    pub width: u32,
}

/// Labelled image files whose headers were checked, not yet decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageFiles {
    /// The files, in data-set order.
    pub files: Vec<ImageFile>,
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
}

impl ImageFiles {
    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The label of each file.
    pub fn labels(&self) -> Vec<i64> {
        self.files.iter().map(|f| f.label).collect()
    }

    /// Every image decoded, in parallel (for small sets; large ones go
    /// through [`crate::loader::ImageLoader`] batch by batch).
    pub fn decode_all(&self) -> Result<Vec<Image>> {
        self.files.par_iter().map(|f| decode_image(&f.path)).collect()
    }
}

/// Whether the path's extension is one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::CorruptFile { path: path.into(), reason: format!("not a readable JPEG or PNG image: {e}") }
}

fn reader(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    // The format comes from the file's magic bytes, so a PNG named `.jpg` still reads.
    image::ImageReader::open(path).map_err(Error::io(path))?.with_guessed_format().map_err(Error::io(path))
}

/// Reads only the header of an image file: `(height, width)`.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let (w, h) = reader(path)?.into_dimensions().map_err(|e| corrupt(path, e))?;
    if w == 0 || h == 0 {
        return Err(corrupt(path, format!("{w}×{h} pixels")));
    }
    Ok((h, w))
}

/// Decodes an image file to 8-bit grey (if it has no colour) or RGB, as
/// PIL's `convert("L")` / `convert("RGB")` (alpha dropped, 16-bit scaled to 8).
///
/// # Shapes
/// → `h×w×1` or `h×w×3`.
pub fn decode_image(path: &Path) -> Result<Image> {
    let img = reader(path)?.decode().map_err(|e| corrupt(path, e))?;
    let (h, w) = (img.height() as usize, img.width() as usize);
    if img.color().has_color() { Image::new(3, h, w, img.to_rgb8().into_raw()) } else { Image::new(1, h, w, img.to_luma8().into_raw()) }
}

/// Checks the header of every `(path, label)` in parallel; the first failure
/// in list order is the error, so the message does not depend on thread timing.
pub(crate) fn with_sizes(labelled: Vec<(PathBuf, i64)>) -> Result<Vec<ImageFile>> {
    labelled
        .into_par_iter()
        .map(|(path, label)| image_size(&path).map(|(height, width)| ImageFile { path, label, height, width }))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

fn visible_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let entry = entry.map_err(Error::io(dir))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry);
        }
    }
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// Every file under `dir`, recursively (following links), sorted by path.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in visible_entries(dir)? {
        let path = entry.path();
        // `metadata` follows symbolic links (torchvision walks with followlinks=True).
        let meta = std::fs::metadata(&path).map_err(Error::io(&path))?;
        if meta.is_dir() {
            files_under(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Lists `root/<class>/…/*.{jpg,jpeg,png}`: classes are the sub-folders of
/// `root` sorted by name (label = position), files are sorted by path
/// within each class, and every file's header is checked.
///
/// Errors: the folder is missing or not a folder, it has no class folders, a
/// class folder has no images, or a file is not a readable image
/// ([`Error::CorruptFile`] with its path).
pub fn image_folder(root: &Path) -> Result<ImageFiles> {
    let layout = format!("expected {}/<class>/<image>.jpg|jpeg|png", root.display());
    match std::fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Data(format!("image folder {} does not exist ({layout})", root.display())));
        }
        Err(e) => return Err(Error::Io { path: root.into(), source: e }),
        Ok(m) if !m.is_dir() => return Err(Error::Data(format!("{} is not a folder ({layout})", root.display()))),
        Ok(_) => {}
    }
    let mut classes = Vec::new();
    let mut labelled = Vec::new();
    for entry in visible_entries(root)? {
        let dir = entry.path();
        if !std::fs::metadata(&dir).map_err(Error::io(&dir))?.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        files_under(&dir, &mut files)?;
        let (images, others): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| has_image_extension(p));
        if images.is_empty() {
            let skipped = match others.first() {
                Some(p) => format!(" ({} other files skipped, e.g. {})", others.len(), p.display()),
                None => String::new(),
            };
            return Err(Error::Data(format!("class folder {} has no .jpg, .jpeg or .png images{skipped}", dir.display())));
        }
        let label = classes.len() as i64;
        classes.push(entry.file_name().to_string_lossy().into_owned());
        labelled.extend(images.into_iter().map(|p| (p, label)));
    }
    if classes.is_empty() {
        return Err(Error::Data(format!("image folder {} has no class folders ({layout})", root.display())));
    }
    Ok(ImageFiles { files: with_sizes(labelled)?, classes })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transforms::tests::test_image;

    /// Writes `img` as PNG (lossless) or JPEG.
    pub(crate) fn write_image(path: &Path, img: &Image) {
        let color = if img.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
        image::save_buffer(path, &img.pixels, img.width as u32, img.height as u32, color).unwrap();
    }

    #[test]
    fn lists_sorted_classes_and_files_with_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (class, files) in [("zebra", &["b.png", "a.JPG"][..]), ("ant", &["x/deep.jpeg", "c.png"][..])] {
            for (i, f) in files.iter().enumerate() {
                let path = root.join(class).join(f);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                write_image(&path, &test_image(if i == 0 { 3 } else { 1 }, 5 + i, 7, i as u64));
            }
        }
        std::fs::write(root.join("ant/notes.txt"), "not an image").unwrap();
        std::fs::create_dir_all(root.join(".ipynb_checkpoints")).unwrap();
        std::fs::write(root.join("README.md"), "top-level files are not classes").unwrap();
        let listed = image_folder(root).unwrap();
        assert_eq!(listed.classes, ["ant", "zebra"]);
        let names: Vec<String> = listed.files.iter().map(|f| f.path.strip_prefix(root).unwrap().display().to_string()).collect();
        assert_eq!(names, ["ant/c.png", "ant/x/deep.jpeg", "zebra/a.JPG", "zebra/b.png"]);
        assert_eq!(listed.labels(), [0, 0, 1, 1]);
        assert_eq!((listed.files[0].height, listed.files[0].width), (6, 7));
        let decoded = listed.decode_all().unwrap();
        assert_eq!(decoded[0], test_image(1, 6, 7, 1), "PNG round-trips exactly");
        assert_eq!((decoded[1].channels, decoded[1].height), (3, 5));
    }

    #[test]
    fn errors_name_the_folder_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let err = image_folder(&root).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("data/<class>"), "{err}");
        std::fs::create_dir_all(&root).unwrap();
        assert!(image_folder(&root).unwrap_err().to_string().contains("no class folders"));
        std::fs::create_dir_all(root.join("cat")).unwrap();
        std::fs::write(root.join("cat/cat.gif"), "GIF89a").unwrap();
        let err = image_folder(&root).unwrap_err().to_string();
        assert!(err.contains("cat has no .jpg") && err.contains("cat.gif"), "{err}");
        std::fs::write(root.join("cat/broken.jpg"), "this is text, not a JPEG").unwrap();
        let err = image_folder(&root).unwrap_err();
        assert!(matches!(&err, Error::CorruptFile { path, .. } if path.ends_with("cat/broken.jpg")), "{err}");
        // A PNG named .jpg is read by its content.
        write_image(&root.join("cat/png.png"), &test_image(3, 4, 4, 0));
        std::fs::rename(root.join("cat/png.png"), root.join("cat/broken.jpg")).unwrap();
        assert_eq!(image_folder(&root).unwrap().len(), 1);
        // A header that parses but pixels that do not: found when decoding, with the path.
        let mut bytes = std::fs::read(root.join("cat/broken.jpg")).unwrap();
        bytes.truncate(bytes.len() - 20);
        std::fs::write(root.join("cat/broken.jpg"), bytes).unwrap();
        let listed = image_folder(&root).unwrap();
        let err = listed.decode_all().unwrap_err().to_string();
        assert!(err.contains("broken.jpg"), "{err}");
    }
}
