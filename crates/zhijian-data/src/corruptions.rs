//! Distribution shifts made deterministically from a seed: six of Hendrycks &
//! Dietterich's common corruptions ("Benchmarking Neural Network Robustness to
//! Common Corruptions and Perturbations", ICLR 2019, the ImageNet-C / CIFAR-10-C
//! recipe) at severities 1–5.
//!
//! The constants are those of `ImageNet-C/imagenet_c/imagenet_c/corruptions.py`
//! in github.com/hendrycks/robustness (identical in the `imagecorruptions`
//! package), which work on images scaled to [0, 1]; so do we, then round back
//! to bytes. Two differences from that code, both deliberate:
//!
//! - Sizes. ImageNet-C corrupts 224×224 images; ours are 8–224 px. Pixel-wise
//!   corruptions (noise, contrast, brightness) do not depend on size. Blur's
//!   sigma is scaled by `min(height, width) / 224` and pixelation keeps its
//!   *fraction* of each side (224·c px → side·c px), so a corruption looks the
//!   same relative to the image as on a 224-px image viewed at that size. At
//!   that scale, severities 1–2 of blur barely change images under ~32 px.
//! - Rounding. Results are rounded to the nearest byte, not truncated as
//!   `np.uint8` does, so a mean-keeping corruption (contrast) keeps the mean.
//!
//! Randomness comes from [`example_rng`]`(seed, index)` per image, the same
//! draws at every severity: the noisy pixels of severity 2 include those of
//! severity 1 and the Gaussian noise is the same noise scaled, so severities
//! nest instead of being independent samples.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use tch::Tensor;
use zhijian_core::{Error, Result};

use crate::image::ImageDataset;
use crate::split::SplitMix64;
use crate::transforms::{Crop, Filter, Image, example_rng, resample, uniform};

/// A corruption family of ImageNet-C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Additive Gaussian noise, per channel value.
    GaussianNoise,
    /// Salt-and-pepper noise: a fraction of channel values set to 0 or 1.
    ImpulseNoise,
    /// Gaussian blur.
    GaussianBlur,
    /// Contrast reduction towards each channel's mean.
    Contrast,
    /// Brightness increase (HSV value).
    Brightness,
    /// Downscale with a box filter, then upscale back with it (blocky).
    Pixelate,
}

impl Family {
    /// Every family, in ImageNet-C's order.
    pub const ALL: [Family; 6] = [Family::GaussianNoise, Family::ImpulseNoise, Family::GaussianBlur, Family::Contrast, Family::Brightness, Family::Pixelate];

    /// The family's name, as ImageNet-C spells it (`gaussian_noise`, …).
    pub fn name(self) -> &'static str {
        match self {
            Family::GaussianNoise => "gaussian_noise",
            Family::ImpulseNoise => "impulse_noise",
            Family::GaussianBlur => "gaussian_blur",
            Family::Contrast => "contrast",
            Family::Brightness => "brightness",
            Family::Pixelate => "pixelate",
        }
    }

    /// The parameter at severities 1–5, from `corruptions.py` (module doc):
    /// noise standard deviation, fraction of values flipped, blur sigma in
    /// pixels of a 224-px image, contrast factor, brightness added to HSV
    /// value, fraction of each side kept by pixelation.
    pub fn constants(self) -> [f64; 5] {
        match self {
            Family::GaussianNoise => [0.08, 0.12, 0.18, 0.26, 0.38],
            Family::ImpulseNoise => [0.03, 0.06, 0.09, 0.17, 0.27],
            Family::GaussianBlur => [1.0, 2.0, 3.0, 4.0, 6.0],
            Family::Contrast => [0.4, 0.3, 0.2, 0.1, 0.05],
            Family::Brightness => [0.1, 0.2, 0.3, 0.4, 0.5],
            Family::Pixelate => [0.6, 0.5, 0.4, 0.3, 0.25],
        }
    }
}

impl FromStr for Family {
    type Err = Error;

    fn from_str(s: &str) -> Result<Family> {
        Family::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
            Error::Config(format!("unknown corruption family `{s}`; known families: {}", known.join(", ")))
        })
    }
}

/// A corruption family at a severity, written `family:severity`
/// (`"gaussian_noise:3"`) in configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Corruption {
    /// Which corruption.
    pub family: Family,
    /// Strength, 1 (mild) to 5 (severe).
    pub severity: u8,
}

impl Corruption {
    /// A corruption; errors unless `severity` is 1–5.
    pub fn new(family: Family, severity: u8) -> Result<Corruption> {
        if !(1..=5).contains(&severity) {
            return Err(Error::Config(format!("corruption severity {severity} of `{}` must be 1 to 5", family.name())));
        }
        Ok(Corruption { family, severity })
    }

    /// The family's parameter at this severity ([`Family::constants`]).
    pub fn parameter(&self) -> f64 {
        self.family.constants()[usize::from(self.severity) - 1]
    }

    /// The corrupted image, drawing any randomness from `rng`.
    ///
    /// # Shapes
    /// `h×w×c` → `h×w×c`.
    pub fn apply(&self, img: &Image, rng: &mut SplitMix64) -> Image {
        let p = self.parameter();
        match self.family {
            Family::GaussianNoise => map_values(img, |v| v + p * normal(rng)),
            Family::ImpulseNoise => {
                // skimage `random_noise(mode="s&p", amount=p)`: each value is hit with
                // probability p, then salt or pepper with probability ½.
                map_values(img, |v| {
                    let hit = uniform(rng, 0.0, 1.0) < p;
                    let salt = rng.next_u64() >> 63 == 1;
                    if hit { f64::from(salt) } else { v }
                })
            }
            Family::GaussianBlur => gaussian_blur(img, p * img.height.min(img.width) as f64 / 224.0),
            Family::Contrast => {
                let means = channel_means(img);
                let c = img.channels;
                let mut i = 0;
                map_values(img, |v| {
                    let m = means[i % c];
                    i += 1;
                    (v - m) * p + m
                })
            }
            Family::Brightness => brighten(img, p),
            Family::Pixelate => {
                // ImageNet-C: 224 → int(224·c) → 224 with Pillow's BOX filter; here each side keeps its fraction.
                let (h, w) = (((img.height as f64 * p) as usize).max(1), ((img.width as f64 * p) as usize).max(1));
                let small = resample(img, Crop::full(img.height, img.width), (h, w), 0..h, 0..w, Filter::Box);
                resample(&small, Crop::full(h, w), (img.height, img.width), 0..img.height, 0..img.width, Filter::Box)
            }
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.family.name(), self.severity)
    }
}

impl FromStr for Corruption {
    type Err = Error;

    /// Parses `family:severity`, e.g. `"gaussian_noise:3"`.
    fn from_str(s: &str) -> Result<Corruption> {
        let (family, severity) =
            s.split_once(':').ok_or_else(|| Error::Config(format!("corruption `{s}` is not `family:severity` (e.g. `gaussian_noise:3`)")))?;
        let severity = severity.trim().parse::<u8>().map_err(|_| Error::Config(format!("corruption `{s}`: severity `{severity}` is not 1 to 5")))?;
        Corruption::new(family.trim().parse()?, severity)
    }
}

impl TryFrom<String> for Corruption {
    type Error = Error;

    fn try_from(s: String) -> Result<Corruption> {
        s.parse()
    }
}

impl From<Corruption> for String {
    fn from(c: Corruption) -> String {
        c.to_string()
    }
}

/// `f` applied to every channel value in [0, 1], clipped and rounded back to a byte.
fn map_values(img: &Image, mut f: impl FnMut(f64) -> f64) -> Image {
    let pixels = img.pixels.iter().map(|&v| to_byte(f(f64::from(v) / 255.0))).collect();
    Image { pixels, ..*img }
}

fn to_byte(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// A standard normal draw (Box–Muller; one of the pair, so each value costs two uniforms).
fn normal(rng: &mut SplitMix64) -> f64 {
    // 1 − u lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - uniform(rng, 0.0, 1.0);
    let u2 = uniform(rng, 0.0, 1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Mean of each channel, in [0, 1].
fn channel_means(img: &Image) -> Vec<f64> {
    let c = img.channels;
    let mut sums = vec![0f64; c];
    for px in img.pixels.chunks_exact(c) {
        for (s, &v) in sums.iter_mut().zip(px) {
            *s += f64::from(v);
        }
    }
    let n = (img.height * img.width).max(1) as f64;
    sums.iter().map(|s| s / n / 255.0).collect()
}

/// skimage's `rgb2hsv`, value + `amount` clipped to 1, `hsv2rgb`, in closed
/// form: hue and saturation fixed, every channel scales by `V' / V` (the
/// conversions are linear in V); a black pixel (V = 0, saturation 0) becomes
/// grey `V'`. A grey image's value is the pixel itself: `min(x + amount, 1)`.
fn brighten(img: &Image, amount: f64) -> Image {
    let c = img.channels;
    let mut pixels = Vec::with_capacity(img.pixels.len());
    for px in img.pixels.chunks_exact(c) {
        let v = f64::from(*px.iter().max().expect("a channel")) / 255.0;
        let v2 = (v + amount).min(1.0);
        for &x in px {
            let x = f64::from(x) / 255.0;
            pixels.push(to_byte(if v > 0.0 { x * v2 / v } else { v2 }));
        }
    }
    Image { pixels, ..*img }
}

/// skimage's `gaussian(sigma)` per channel: scipy's separable kernel of
/// radius `⌊4σ + ½⌋` (`truncate = 4`), borders extended with the edge value
/// (`mode = "nearest"`).
fn gaussian_blur(img: &Image, sigma: f64) -> Image {
    let radius = (4.0 * sigma + 0.5) as usize;
    if radius == 0 {
        return img.clone();
    }
    let kernel: Vec<f64> = (0..=2 * radius).map(|i| (-0.5 * ((i as f64 - radius as f64) / sigma).powi(2)).exp()).collect();
    let total: f64 = kernel.iter().sum();
    let kernel: Vec<f64> = kernel.iter().map(|k| k / total).collect();
    let (h, w, c) = (img.height, img.width, img.channels);
    let clampi = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    // Rows then columns, in f64 (no rounding between the passes, as in scipy).
    let mut rows = vec![0f64; h * w * c];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                rows[(y * w + x) * c + ch] =
                    kernel.iter().enumerate().map(|(k, wk)| wk * f64::from(img.get(y, clampi(x as isize + k as isize - radius as isize, w), ch))).sum();
            }
        }
    }
    let mut pixels = Vec::with_capacity(h * w * c);
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let v: f64 = kernel.iter().enumerate().map(|(k, wk)| wk * rows[(clampi(y as isize + k as isize - radius as isize, h) * w + x) * c + ch]).sum();
                pixels.push(to_byte(v / 255.0));
            }
        }
    }
    Image { pixels, ..*img }
}

/// Image `index` of a data set under `seed`, corrupted.
///
/// # Shapes
/// `h×w×c` → `h×w×c`.
pub fn corrupt_image(img: &Image, corruption: Corruption, seed: u64, index: u64) -> Image {
    corruption.apply(img, &mut example_rng(seed, index))
}

/// A corrupted copy of a data set: image `i` is corrupted with randomness
/// from `(seed, i)` alone, in parallel. Labels and classes are kept.
///
/// # Shapes
/// `data.images` `[n, c, h, w]` uint8 → `[n, c, h, w]` uint8.
pub fn corrupt(data: &ImageDataset, corruption: Corruption, seed: u64) -> Result<ImageDataset> {
    let size = data.images.size();
    let [n, c, h, w] = size[..] else {
        return Err(Error::Data(format!("images must be [n, channels, height, width], got {size:?}")));
    };
    let (c, h, w) = (c as usize, h as usize, w as usize);
    let planes = Vec::<u8>::try_from(data.images.to_kind(tch::Kind::Uint8).contiguous().view([-1]))?;
    let mut out = vec![0u8; planes.len()];
    out.par_chunks_mut(c * h * w).zip(planes.par_chunks(c * h * w)).enumerate().try_for_each(|(i, (dst, src))| -> Result<()> {
        let img = Image::from_chw(c, h, w, src)?;
        dst.copy_from_slice(&corrupt_image(&img, corruption, seed, i as u64).to_chw());
        Ok(())
    })?;
    let images = Tensor::from_slice(&out).reshape([n, c as i64, h as i64, w as i64]);
    Ok(ImageDataset { images, labels: data.labels.clone(), classes: data.classes.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::tests::test_image;

    fn distance(a: &Image, b: &Image) -> f64 {
        a.pixels.iter().zip(&b.pixels).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.pixels.len() as f64
    }

    fn mean(img: &Image) -> f64 {
        img.pixels.iter().map(|&v| f64::from(v)).sum::<f64>() / img.pixels.len() as f64
    }

    #[test]
    fn severity_moves_images_further_from_clean() {
        // 224 px (blur at its ImageNet-C sigmas); mid-grey texture, so clipping hides no noise or brightness.
        let texture = test_image(3, 224, 224, 1);
        let img = Image { pixels: texture.pixels.iter().map(|&v| v / 2 + 40).collect(), ..texture };
        for family in Family::ALL {
            let d: Vec<f64> = (1..=5).map(|s| distance(&img, &corrupt_image(&img, Corruption::new(family, s).unwrap(), 7, 0))).collect();
            assert!(d[0] > 0.0 && d.windows(2).all(|p| p[1] > p[0]), "{}: {d:?}", family.name());
        }
    }

    #[test]
    fn contrast_keeps_the_mean_and_brightness_adds_its_constant() {
        let img = test_image(3, 30, 40, 2);
        for s in 1..=5 {
            let low = corrupt_image(&img, Corruption::new(Family::Contrast, s).unwrap(), 0, 0);
            for ch in 0..3 {
                let m = |i: &Image| i.pixels.iter().skip(ch).step_by(3).map(|&v| f64::from(v)).sum::<f64>() / 1200.0;
                // Rounding each value moves the mean by at most ½.
                assert!((m(&low) - m(&img)).abs() <= 0.5, "severity {s} channel {ch}: {} vs {}", m(&low), m(&img));
            }
        }
        // Grey: the value is the pixel, so severity s adds 255·c (clipped at 255), up to rounding.
        let grey = Image::new(1, 2, 3, vec![0, 10, 100, 200, 230, 255]).unwrap();
        for s in 1..=5 {
            let c = Corruption::new(Family::Brightness, s).unwrap();
            let got = corrupt_image(&grey, c, 0, 0);
            for (&v, &g) in grey.pixels.iter().zip(&got.pixels) {
                let want = (f64::from(v) + 255.0 * c.parameter()).min(255.0);
                assert!((f64::from(g) - want).abs() <= 0.5 + 1e-9, "severity {s}: {v} → {g}, want {want}");
            }
        }
        // RGB: hue and saturation kept, so channel ratios stay; the largest channel gains 255·c.
        // (100, 60, 20) has V = 100/255; +0.2 → 151/255, so every channel × 1.51. Black becomes grey 0.2.
        let rgb = Image::new(3, 1, 2, vec![100, 60, 20, 0, 0, 0]).unwrap();
        let b = corrupt_image(&rgb, Corruption::new(Family::Brightness, 2).unwrap(), 0, 0);
        assert_eq!(b.pixels, [151, 91, 30, 51, 51, 51]);
        assert!((mean(&b) - mean(&rgb)) > 0.0);
    }

    #[test]
    fn noise_statistics_follow_the_constants() {
        let grey = Image::new(1, 100, 100, vec![128; 10_000]).unwrap();
        let noisy = corrupt_image(&grey, Corruption::new(Family::GaussianNoise, 3).unwrap(), 1, 0);
        let std = (noisy.pixels.iter().map(|&v| (f64::from(v) - 128.0).powi(2)).sum::<f64>() / 1e4).sqrt() / 255.0;
        assert!((std - 0.18).abs() < 0.01, "noise std {std}");
        let salty = corrupt_image(&grey, Corruption::new(Family::ImpulseNoise, 4).unwrap(), 1, 0);
        let (salt, pepper) = (salty.pixels.iter().filter(|&&v| v == 255).count(), salty.pixels.iter().filter(|&&v| v == 0).count());
        assert_eq!(salt + pepper + salty.pixels.iter().filter(|&&v| v == 128).count(), 10_000);
        assert!((1500..1900).contains(&(salt + pepper)) && salt.abs_diff(pepper) < 200, "{salt} salt, {pepper} pepper");
        // Severities nest: every value flipped at severity 1 is flipped the same way at 5.
        let s1 = corrupt_image(&grey, Corruption::new(Family::ImpulseNoise, 1).unwrap(), 1, 0);
        let s5 = corrupt_image(&grey, Corruption::new(Family::ImpulseNoise, 5).unwrap(), 1, 0);
        assert!(s1.pixels.iter().zip(&s5.pixels).all(|(a, b)| *a == 128 || a == b));
    }

    #[test]
    fn blur_and_pixelate_scale_with_image_size() {
        // At 224 px severity 1 blurs with sigma 1: a lone bright pixel spreads to its neighbours.
        let mut dot = Image::new(1, 224, 224, vec![0; 224 * 224]).unwrap();
        dot.pixels[112 * 224 + 112] = 255;
        let b = corrupt_image(&dot, Corruption::new(Family::GaussianBlur, 1).unwrap(), 0, 0);
        // 1-D weights of sigma 1 at 0 and 1 (radius 4): 0.3989 and 0.2420 → 2-D 0.159 and 0.0965.
        // 255 × (0.159, 0.0965, 0.3989 · 0.0540) → 41, 25, 5.
        assert_eq!((b.get(112, 112, 0), b.get(112, 113, 0), b.get(114, 112, 0)), (41, 25, 5));
        // On a 28-px image severity 5 has sigma 6·28/224 = 0.75: a much tighter spread.
        let mut small = Image::new(1, 28, 28, vec![0; 784]).unwrap();
        small.pixels[14 * 28 + 14] = 255;
        let s = corrupt_image(&small, Corruption::new(Family::GaussianBlur, 5).unwrap(), 0, 0);
        assert!(s.get(14, 14, 0) > 60 && s.get(14, 16, 0) < 10, "{} {}", s.get(14, 14, 0), s.get(14, 16, 0));
        // Pixelate at severity 5 keeps a quarter of each side: 8×8 → 2×2 blocks of 4×4.
        let img = test_image(1, 8, 8, 3);
        let p = corrupt_image(&img, Corruption::new(Family::Pixelate, 5).unwrap(), 0, 0);
        for (y, x) in [(0, 0), (0, 4), (4, 0), (4, 4)] {
            let block: Vec<u8> = (y..y + 4).flat_map(|yy| (x..x + 4).map(move |xx| (yy, xx))).map(|(yy, xx)| p.get(yy, xx, 0)).collect();
            let want = ((y..y + 4).flat_map(|yy| (x..x + 4).map(move |xx| (yy, xx))).map(|(yy, xx)| u32::from(img.get(yy, xx, 0))).sum::<u32>() as f64 / 16.0)
                .round() as u8;
            assert!(block.iter().all(|&v| v.abs_diff(want) <= 1), "block ({y}, {x}): {block:?} vs mean {want}");
        }
    }

    #[test]
    fn datasets_corrupt_deterministically_and_in_parallel() {
        let pixels: Vec<u8> = (0..6 * 3 * 16 * 16).map(|i| ((i * 37) % 251) as u8).collect();
        let data = ImageDataset { images: Tensor::from_slice(&pixels).reshape([6, 3, 16, 16]), labels: (0..6).collect(), classes: vec!["a".into(); 6] };
        let c: Corruption = "gaussian_noise:2".parse().unwrap();
        let a = corrupt(&data, c, 5).unwrap();
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        // Tensors are Send, not Sync: the pool gets its own handle.
        let moved = ImageDataset { images: data.images.shallow_clone(), labels: data.labels.clone(), classes: data.classes.clone() };
        let b = one_thread.install(move || corrupt(&moved, c, 5).unwrap());
        assert!(a.images.equal(&b.images));
        assert_eq!(a.labels, data.labels);
        assert!(!a.images.equal(&corrupt(&data, c, 6).unwrap().images));
        assert!(!a.images.equal(&data.images));
        // Image i is what corrupt_image makes of it with index i.
        let third = Image::from_chw(3, 16, 16, &pixels[2 * 768..3 * 768]).unwrap();
        let want = corrupt_image(&third, c, 5, 2).to_chw();
        assert_eq!(Vec::<u8>::try_from(a.images.get(2).view([-1])).unwrap(), want);
    }

    #[test]
    fn corruptions_parse_and_name_the_known_families() {
        assert_eq!("pixelate:5".parse::<Corruption>().unwrap(), Corruption { family: Family::Pixelate, severity: 5 });
        for f in Family::ALL {
            let c = Corruption::new(f, 3).unwrap();
            assert_eq!(c.to_string().parse::<Corruption>().unwrap(), c);
        }
        let err = "fog:2".parse::<Corruption>().unwrap_err().to_string();
        assert!(err.contains("unknown corruption family `fog`") && err.contains("gaussian_noise, impulse_noise"), "{err}");
        assert!("contrast:0".parse::<Corruption>().unwrap_err().to_string().contains("1 to 5"));
        assert!("contrast:x".parse::<Corruption>().unwrap_err().to_string().contains("1 to 5"));
        assert!("contrast".parse::<Corruption>().unwrap_err().to_string().contains("family:severity"));
        #[derive(serde::Deserialize)]
        struct Cfg {
            shift: Corruption,
        }
        assert_eq!(toml::from_str::<Cfg>("shift = \"brightness:1\"").unwrap().shift, Corruption { family: Family::Brightness, severity: 1 });
        assert!(toml::from_str::<Cfg>("shift = \"brightness:9\"").is_err());
    }
}
