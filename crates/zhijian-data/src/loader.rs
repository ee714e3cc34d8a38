//! [`ImageLoader`]: makes model-ready image batches on demand, in parallel.
//!
//! Each image of a batch is decoded (for files), transformed and normalised
//! on rayon's pool independently of the others, its augmentation drawn from
//! `(seed, example index)` alone, so a batch is bit-identical whatever the
//! number of threads (`RAYON_NUM_THREADS`) and whichever batch an example
//! lands in.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tch::Tensor;
use zhijian_core::{Error, ImageSource, Input, Result, Split};

use crate::corruptions::{Corruption, corrupt_image};
use crate::image::ImageDataset;
use crate::image_folder::{ImageFiles, decode_image};
use crate::transforms::{Image, ImageTransform};

/// Where the pixels live.
#[derive(Debug)]
enum Pixels {
    /// Decoded images `[n, channels, height, width]`, planar bytes.
    Memory { planes: Vec<u8>, channels: usize, height: usize, width: usize },
    /// Image files, decoded per batch.
    Files(Vec<PathBuf>),
}

impl Pixels {
    /// A digest of the pixels: their bytes in memory; for files, each path
    /// with its size and modification time (as asset stamps do), not the
    /// contents, which would mean reading the whole data set.
    fn digest(&self) -> Result<String> {
        let mut h = Sha256::new();
        match self {
            Pixels::Memory { planes, channels, height, width } => {
                h.update(format!("memory {channels}x{height}x{width}\n"));
                h.update(planes);
            }
            Pixels::Files(paths) => {
                for path in paths {
                    let meta = std::fs::metadata(path).map_err(Error::io(path))?;
                    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                    h.update(format!("{} {} {:?}\n", path.display(), meta.len(), modified));
                }
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    fn image(&self, i: usize) -> Result<Image> {
        match self {
            Pixels::Memory { planes, channels, height, width } => {
                let n = channels * height * width;
                Image::from_chw(*channels, *height, *width, &planes[i * n..(i + 1) * n])
            }
            Pixels::Files(paths) => decode_image(&paths[i]),
        }
    }
}

/// Examples made into `[k, 3, size, size]` float batches on demand
/// ([`ImageSource`]): an in-memory [`ImageDataset`] or image files, an
/// [`ImageTransform`], and optionally a [`Corruption`] of the model-size image.
///
/// Cloning and [`ImageLoader::subset`] share the pixels.
#[derive(Clone, Debug)]
pub struct ImageLoader {
    pixels: Arc<Pixels>,
    /// Example `i` of this loader is example `rows[i]` of the pixels; its
    /// augmentation is seeded by `rows[i]`, so a subset keeps each example's draws.
    rows: Arc<[usize]>,
    labels: Arc<[i64]>,
    classes: Arc<[String]>,
    transform: ImageTransform,
    corruption: Option<(Corruption, u64)>,
    /// [`Pixels::digest`], computed on the first [`ImageSource::fingerprint`]
    /// and shared by clones and subsets.
    pixels_digest: Arc<OnceLock<String>>,
}

impl ImageLoader {
    fn new(pixels: Pixels, labels: Vec<i64>, classes: Vec<String>, transform: ImageTransform) -> Result<Self> {
        transform.validate()?;
        let rows: Arc<[usize]> = (0..labels.len()).collect();
        Ok(ImageLoader {
            pixels: Arc::new(pixels),
            rows,
            labels: labels.into(),
            classes: classes.into(),
            transform,
            corruption: None,
            pixels_digest: Arc::default(),
        })
    }

    /// A loader over an in-memory data set (the pixels are copied once).
    ///
    /// # Shapes
    /// `data.images`: `[n, c, h, w]` uint8, `c` ∈ {1, 3}.
    pub fn from_dataset(data: &ImageDataset, transform: ImageTransform) -> Result<Self> {
        let size = data.images.size();
        let [n, c, h, w] = size[..] else {
            return Err(Error::Data(format!("images must be [n, channels, height, width], got {size:?}")));
        };
        if (c != 1 && c != 3) || n as usize != data.labels.len() {
            return Err(Error::Data(format!("images {size:?} need 1 or 3 channels and one label each ({} labels)", data.labels.len())));
        }
        let planes = Vec::<u8>::try_from(data.images.to_kind(tch::Kind::Uint8).contiguous().view([-1]))?;
        let pixels = Pixels::Memory { planes, channels: c as usize, height: h as usize, width: w as usize };
        ImageLoader::new(pixels, data.labels.clone(), data.classes.clone(), transform)
    }

    /// A loader over image files (an image folder, foolbox's samples),
    /// decoded batch by batch.
    pub fn from_files(files: &ImageFiles, transform: ImageTransform) -> Result<Self> {
        let paths = files.files.iter().map(|f| f.path.clone()).collect();
        ImageLoader::new(Pixels::Files(paths), files.labels(), files.classes.clone(), transform)
    }

    /// Corrupts every model-size image (after the transform, before
    /// normalisation, as ImageNet-C corrupts 224-px centre crops) with
    /// randomness from `(seed, example index)`.
    pub fn with_corruption(self, corruption: Corruption, seed: u64) -> Self {
        ImageLoader { corruption: Some((corruption, seed)), ..self }
    }

    /// The examples `rows` of this loader (pixels shared, augmentation of
    /// each example unchanged).
    pub fn subset(&self, rows: &[usize]) -> Result<Self> {
        if let Some(bad) = rows.iter().find(|&&r| r >= self.rows.len()) {
            return Err(Error::Data(format!("example {bad} out of range: the loader has {}", self.rows.len())));
        }
        Ok(ImageLoader { rows: rows.iter().map(|&r| self.rows[r]).collect(), ..self.clone() })
    }

    /// The label of each example.
    pub fn labels(&self) -> Vec<i64> {
        self.rows.iter().map(|&r| self.labels[r]).collect()
    }

    /// Class names; label `i` is `classes()[i]`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The transform.
    pub fn transform(&self) -> &ImageTransform {
        &self.transform
    }

    /// The examples `rows` as a named split whose input is made lazily
    /// ([`Input::Lazy`]).
    ///
    /// # Shapes
    /// Labels `[rows.len()]` int64.
    pub fn split(&self, name: &str, rows: &[usize]) -> Result<Split> {
        let part = self.subset(rows)?;
        let labels = Tensor::from_slice(&part.labels());
        Ok(Split { name: name.to_string(), input: Input::Lazy(Arc::new(part)), labels })
    }

    /// Example `i`'s image at model size, before normalisation: evaluation
    /// transform, or training augmentation from `augment`'s seed; corrupted if set.
    ///
    /// # Shapes
    /// → `size×size×c`, `c` the stored channels.
    pub fn image(&self, i: usize, augment: Option<u64>) -> Result<Image> {
        let row = *self.rows.get(i).ok_or_else(|| Error::Data(format!("example {i} out of range: the loader has {}", self.rows.len())))?;
        let made = self.transform.image(&self.pixels.image(row)?, row as u64, augment);
        Ok(match self.corruption {
            Some((c, seed)) => corrupt_image(&made, c, seed, row as u64),
            None => made,
        })
    }
}

impl ImageSource for ImageLoader {
    fn len(&self) -> i64 {
        self.rows.len() as i64
    }

    fn fingerprint(&self) -> Result<String> {
        let pixels = match self.pixels_digest.get() {
            Some(d) => d.clone(),
            None => {
                let d = self.pixels.digest()?;
                // Another thread may have set it meanwhile: the same value.
                let _ = self.pixels_digest.set(d.clone());
                d
            }
        };
        let mut h = Sha256::new();
        h.update(pixels);
        for r in self.rows.iter() {
            h.update((*r as u64).to_le_bytes());
        }
        h.update(serde_json::to_string(&self.transform).map_err(|e| Error::Data(e.to_string()))?);
        h.update(format!("{:?}", self.corruption));
        Ok(hex::encode(h.finalize()))
    }

    /// # Shapes
    /// `idx`: `k` indices → `[k, 3, size, size]` float, normalised.
    fn batch(&self, idx: &[i64], augment: Option<u64>) -> Result<Tensor> {
        let n = self.rows.len();
        if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as usize >= n) {
            return Err(Error::Data(format!("example {bad} out of range: the loader has {n}")));
        }
        let size = self.transform.size;
        let per = 3 * (size * size) as usize;
        let mut out = vec![0f32; idx.len() * per];
        let results: Vec<Result<()>> = out
            .par_chunks_mut(per)
            .zip(idx.par_iter())
            .map(|(dst, &i)| {
                let img = self.image(i as usize, augment)?;
                crate::transforms::normalize_into(&img, self.transform.mean, self.transform.std, dst);
                Ok(())
            })
            .collect();
        // The first failure in batch order, whatever thread met it first.
        results.into_iter().collect::<Result<()>>()?;
        Ok(Tensor::from_slice(&out).reshape([idx.len() as i64, 3, size, size]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_folder::tests::write_image;
    use crate::transforms::tests::test_image;
    use zhijian_core::ImagePreset;

    fn dataset(n: usize) -> ImageDataset {
        let planes: Vec<u8> = (0..n).flat_map(|i| test_image(1, 20, 24, i as u64).to_chw()).collect();
        ImageDataset {
            images: Tensor::from_slice(&planes).reshape([n as i64, 1, 20, 24]),
            labels: (0..n as i64).map(|i| i % 3).collect(),
            classes: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    fn transform(size: i64) -> ImageTransform {
        ImageTransform::from_preset(&ImagePreset { size, mean: [0.5; 3], std: [0.25; 3], crop_pct: 0.875 })
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    /// Equal sources share a fingerprint; each thing that changes the images changes it.
    #[test]
    fn fingerprints_follow_what_makes_the_images() {
        let loader = ImageLoader::from_dataset(&dataset(6), transform(16)).unwrap();
        let f = |l: &ImageLoader| l.fingerprint().unwrap();
        let base = f(&loader.subset(&[0, 2, 4]).unwrap());
        assert_eq!(base, f(&ImageLoader::from_dataset(&dataset(6), transform(16)).unwrap().subset(&[0, 2, 4]).unwrap()));
        let mut other_pixels = dataset(6);
        other_pixels.images = other_pixels.images.bitwise_xor(1);
        let changed = [
            f(&loader.subset(&[0, 2, 5]).unwrap()),
            f(&ImageLoader::from_dataset(&dataset(6), transform(20)).unwrap().subset(&[0, 2, 4]).unwrap()),
            f(&loader.clone().with_corruption("contrast:2".parse().unwrap(), 0).subset(&[0, 2, 4]).unwrap()),
            f(&ImageLoader::from_dataset(&other_pixels, transform(16)).unwrap().subset(&[0, 2, 4]).unwrap()),
        ];
        for (i, c) in changed.iter().enumerate() {
            assert_ne!(c, &base, "change {i}");
        }
    }

    #[test]
    fn batches_repeat_exactly_whatever_the_thread_count() {
        let loader = ImageLoader::from_dataset(&dataset(12), transform(16)).unwrap();
        let idx = [3, 0, 11, 3, 7, 5, 9];
        let one = in_pool(1, || loader.batch(&idx, Some(42)).unwrap());
        assert_eq!(one.size(), [7, 3, 16, 16]);
        for threads in [2, 4] {
            assert!(in_pool(threads, || loader.batch(&idx, Some(42)).unwrap()).equal(&one), "{threads} threads");
        }
        // An example's augmentation depends on its index and the seed, not on its batch.
        assert!(one.get(0).equal(&one.get(3)));
        assert!(loader.batch(&[7], Some(42)).unwrap().get(0).equal(&one.get(4)));
        // Another seed, other crops; no seed, the evaluation transform.
        assert!(!loader.batch(&idx, Some(43)).unwrap().equal(&one));
        let eval = loader.batch(&idx, None).unwrap();
        assert!(eval.equal(&loader.batch(&idx, None).unwrap()));
        let want = transform(16).eval_image(&test_image(1, 20, 24, 3));
        let mut plane = vec![0f32; 3 * 256];
        crate::transforms::normalize_into(&want, [0.5; 3], [0.25; 3], &mut plane);
        assert_eq!(Vec::<f32>::try_from(eval.get(0).view([-1])).unwrap(), plane);
        // Grey became three equal channels; values within (0 − 0.5)/0.25 … (1 − 0.5)/0.25.
        assert!(eval.select(1, 0).equal(&eval.select(1, 2)));
        assert!(one.min().double_value(&[]) >= -2.0 && one.max().double_value(&[]) <= 2.0);
    }

    #[test]
    fn subsets_keep_labels_and_augmentations() {
        let loader = ImageLoader::from_dataset(&dataset(10), transform(12)).unwrap();
        let part = loader.subset(&[8, 2, 5]).unwrap();
        assert_eq!((part.len(), part.labels()), (3, vec![2, 2, 2]));
        assert!(part.batch(&[0], Some(1)).unwrap().equal(&loader.batch(&[8], Some(1)).unwrap()));
        let nested = part.subset(&[2]).unwrap();
        assert_eq!(nested.image(0, Some(9)).unwrap(), loader.image(5, Some(9)).unwrap());
        let split = loader.split("test", &[1, 4]).unwrap();
        assert_eq!((split.name.as_str(), split.len()), ("test", 2));
        assert_eq!(Vec::<i64>::try_from(&split.labels).unwrap(), [1, 1]);
        assert!(loader.subset(&[10]).unwrap_err().to_string().contains("out of range"));
        assert!(loader.batch(&[0, 10], None).unwrap_err().to_string().contains("example 10"));
        assert_eq!(loader.batch(&[], Some(1)).unwrap().size(), [0, 3, 12, 12]);
        assert!(ImageLoader::from_dataset(&dataset(2), ImageTransform { crop_pct: 0.0, ..transform(12) }).is_err());
    }

    #[test]
    fn files_decode_per_batch_and_report_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (i, class) in ["x", "y"].iter().enumerate() {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            write_image(&dir.path().join(class).join("0.png"), &test_image(3, 30, 20 + i, i as u64));
        }
        let files = crate::image_folder::image_folder(dir.path()).unwrap();
        let loader = ImageLoader::from_files(&files, transform(8)).unwrap();
        let batch = loader.batch(&[1, 0], Some(3)).unwrap();
        assert_eq!(batch.size(), [2, 3, 8, 8]);
        let direct = transform(8).image(&test_image(3, 30, 21, 1), 1, Some(3));
        assert_eq!(loader.image(0, Some(3)).unwrap().pixels.len(), 8 * 8 * 3);
        assert_eq!(loader.image(1, Some(3)).unwrap(), direct);
        // A file that went bad after listing is reported with its path when its batch is made.
        std::fs::write(dir.path().join("y/0.png"), "gone").unwrap();
        let err = loader.batch(&[0, 1], None).unwrap_err().to_string();
        assert!(err.contains("y/0.png"), "{err}");
        // Corruption applies to the model-size image, deterministically.
        let noisy = loader.clone().with_corruption("gaussian_noise:5".parse().unwrap(), 7);
        let (a, b) = (noisy.image(0, None).unwrap(), noisy.image(0, None).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, loader.image(0, None).unwrap());
    }

    /// The real foolbox ImageNet samples (`cargo xtask test` fetches them):
    /// names parse to the documented labels, every photo decodes, and a
    /// 224-px ImageNet loader makes repeatable, plausible batches.
    #[test]
    fn foolbox_imagenet_samples_make_batches() {
        let files = crate::foolbox::foolbox_imagenet().unwrap();
        assert_eq!(files.len(), 20);
        let labels = files.labels();
        assert_eq!((labels[0], labels[1], labels[15], labels[19]), (243, 559, 99, 305));
        assert_eq!(files.classes.len(), 1000);
        // All 512×512 except sample 10 (1024 wide, 683 high).
        for f in &files.files {
            let want = if f.path.ends_with("imagenet_10_541.jpg") { (683, 1024) } else { (512, 512) };
            assert_eq!((f.height, f.width), want, "{}", f.path.display());
        }
        let images = files.decode_all().unwrap();
        assert!(images.iter().zip(&files.files).all(|(i, f)| (i.channels, i.height, i.width) == (3, f.height as usize, f.width as usize)));

        let preset = ImagePreset { size: 224, mean: ImagePreset::IMAGENET_MEAN, std: ImagePreset::IMAGENET_STD, crop_pct: 0.875 };
        let loader = ImageLoader::from_files(&files, ImageTransform::from_preset(&preset)).unwrap();
        let idx: Vec<i64> = (0..20).collect();
        let eval = loader.batch(&idx, None).unwrap();
        assert_eq!(eval.size(), [20, 3, 224, 224]);
        // Normalised bytes lie in [(0 − mean) / std, (1 − mean) / std] per channel; photos reach near both ends.
        for (c, (m, s)) in preset.mean.iter().zip(preset.std).enumerate() {
            let plane = eval.select(1, c as i64);
            let (lo, hi) = (plane.min().double_value(&[]), plane.max().double_value(&[]));
            assert!(lo >= -m / s - 1e-5 && hi <= (1.0 - m) / s + 1e-5, "channel {c}: {lo}..{hi}");
            assert!(lo < -m / s + 0.5 && hi > (1.0 - m) / s - 0.5, "channel {c}: {lo}..{hi} spans too little");
            // Back in pixel units, the photos' mean brightness is ordinary (not black, not saturated).
            let mean = plane.mean(tch::Kind::Float).double_value(&[]) * s + m;
            assert!((0.25..0.65).contains(&mean), "channel {c} mean {mean}");
        }
        let train = in_pool(1, || loader.batch(&idx[..6], Some(5)).unwrap());
        assert!(in_pool(2, || loader.batch(&idx[..6], Some(5)).unwrap()).equal(&train));
        assert!(!loader.batch(&idx[..6], Some(6)).unwrap().equal(&train));
        assert!(!train.equal(&eval.narrow(0, 0, 6)));
    }
}
