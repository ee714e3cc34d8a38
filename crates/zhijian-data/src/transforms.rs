//! Per-image operations in pure Rust: PIL-exact resizing, crops, flips and
//! normalisation, and the [`ImageTransform`] a backbone's pre-training used
//! (torchvision / timm semantics), evaluation and training variants.
//!
//! Resizing reimplements Pillow's `ImagingResample` (`libImaging/Resample.c`):
//! separable convolution, horizontal pass first, the filter widened by the
//! scale factor when downscaling (that is the antialiasing), 22-bit fixed-point
//! weights and an 8-bit intermediate image. torchvision's `Resize` on PIL
//! images calls exactly that, so our outputs equal torchvision's PIL path
//! bit for bit; `scripts/gen_resize_golden.py` writes the goldens the tests
//! compare with and prints how far torchvision's tensor path is from them.
//!
//! Random augmentations draw from [`example_rng`]`(seed, index)` alone, so an
//! example's augmentation does not depend on which thread made it or on the
//! other examples of its batch.

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, ImagePreset, Result};

use crate::split::SplitMix64;

/// An 8-bit image, pixels interleaved row by row: the value of channel `c`
/// at row `y`, column `x` is `pixels[(y * width + x) * channels + c]` (the
/// layout decoders produce, so decoding needs no reshuffle). `channels` is 1
/// (grey) or 3 (RGB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height · width · channels` bytes, interleaved (see the type's doc).
    pub pixels: Vec<u8>,
}

impl Image {
    /// An image from interleaved pixels; errors if the length does not match
    /// or `channels` is neither 1 nor 3.
    pub fn new(channels: usize, height: usize, width: usize, pixels: Vec<u8>) -> Result<Image> {
        if channels != 1 && channels != 3 {
            return Err(Error::Data(format!("images have 1 or 3 channels, not {channels}")));
        }
        if pixels.len() != channels * height * width {
            return Err(Error::Data(format!("{}×{}×{channels} image needs {} bytes, got {}", height, width, channels * height * width, pixels.len())));
        }
        Ok(Image { channels, height, width, pixels })
    }

    /// An image from planar (`[channels, height, width]`, as in a tensor) bytes.
    pub fn from_chw(channels: usize, height: usize, width: usize, planes: &[u8]) -> Result<Image> {
        let plane = height * width;
        if planes.len() != channels * plane {
            return Err(Error::Data(format!("{channels}×{height}×{width} planes need {} bytes, got {}", channels * plane, planes.len())));
        }
        let pixels = (0..plane).flat_map(|p| (0..channels).map(move |c| planes[c * plane + p])).collect();
        Image::new(channels, height, width, pixels)
    }

    /// The pixels as planes `[channels, height, width]`.
    pub fn to_chw(&self) -> Vec<u8> {
        let plane = self.height * self.width;
        (0..self.channels).flat_map(|c| (0..plane).map(move |p| self.pixels[p * self.channels + c])).collect()
    }

    /// The value of channel `c` at row `y`, column `x`.
    pub fn get(&self, y: usize, x: usize, c: usize) -> u8 {
        self.pixels[(y * self.width + x) * self.channels + c]
    }
}

/// A rectangle of an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl Crop {
    /// The whole of a `height`×`width` image.
    pub fn full(height: usize, width: usize) -> Crop {
        Crop { top: 0, left: 0, height, width }
    }
}

/// Pillow's resampling filters that we need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter (`Image.BILINEAR`), support 1: what torchvision uses by default.
    Bilinear,
    /// Box filter (`Image.BOX`), support ½: area averaging when downscaling,
    /// nearest neighbour when upscaling (ImageNet-C's pixelate).
    Box,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Box => 0.5,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            // Half-open so that a sample on a boundary counts once (as in Pillow).
            Filter::Box => f64::from(x > -0.5 && x <= 0.5),
        }
    }
}

/// Pillow's fixed-point precision for 8-bit images: `32 − 8 − 2` bits, so that
/// 255 × the weights' sum fits an `i32` with room for negative lobes.
const PRECISION_BITS: u32 = 22;

/// Resampling weights of one axis, for the outputs in a window of it.
struct Coeffs {
    /// First input sample of each output.
    start: Vec<usize>,
    /// Number of input samples of each output.
    len: Vec<usize>,
    /// `ksize` fixed-point weights per output (zero past `len`).
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing
/// `in_size` samples to `out_size`, for the outputs `window` only.
fn coeffs(in_size: usize, out_size: usize, filter: Filter, window: std::ops::Range<usize>) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter by the scale: every input sample then
    // contributes (antialiasing). Upscaling keeps the filter's own support.
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let n = window.len();
    let (mut start, mut len, mut weights) = (Vec::with_capacity(n), Vec::with_capacity(n), vec![0i32; n * ksize]);
    let mut k = vec![0f64; ksize];
    for (o, xx) in window.enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; the clamps make that a floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax - xmin;
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            *kx = filter.weight((x as f64 + xmin as f64 - center + 0.5) / filterscale);
            total += *kx;
        }
        for x in 0..count {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            // Round half away from zero, as `(int)(±0.5 + w·2²²)` does.
            weights[o * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        start.push(xmin);
        len.push(count);
    }
    Coeffs { start, len, weights, ksize }
}

/// Pillow's `clip8`: drop the fixed-point fraction (the sum started at ½, so this rounds) and saturate.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes the region `crop` of `src` to `out_h`×`out_w` pixels with
/// `filter` and returns only the output `rows`×`cols` (a crop of the resized
/// image, computed without making the rest of it).
///
/// Equals Pillow's `img.crop(box).resize((out_w, out_h), filter).crop(window)`
/// bit for bit.
///
/// # Shapes
/// `src` `h×w×c` → `rows.len() × cols.len() × c`.
pub fn resample(src: &Image, crop: Crop, (out_h, out_w): (usize, usize), rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, filter: Filter) -> Image {
    assert!(crop.top + crop.height <= src.height && crop.left + crop.width <= src.width, "crop {crop:?} outside the image");
    assert!(crop.height > 0 && crop.width > 0, "empty crop {crop:?}");
    assert!(rows.end <= out_h && cols.end <= out_w, "window outside the {out_h}×{out_w} output");
    let c = src.channels;
    let (n_rows, n_cols) = (rows.len(), cols.len());
    if n_rows == 0 || n_cols == 0 {
        return Image { channels: c, height: n_rows, width: n_cols, pixels: Vec::new() };
    }
    let vert = coeffs(crop.height, out_h, filter, rows.clone());
    // Source rows the vertical pass reads (relative to the crop): the horizontal pass makes only those.
    let (y0, y1) = (vert.start[0], vert.start[n_rows - 1] + vert.len[n_rows - 1]);
    let row_stride = src.width * c;

    // Horizontal pass, first as in Pillow: rows y0..y1 of the crop → temp `(y1−y0) × n_cols × c`.
    let mut temp = vec![0u8; (y1 - y0) * n_cols * c];
    if crop.width == out_w {
        // Same width: Pillow's weights are then exactly the identity; copy instead.
        for (t, y) in temp.chunks_exact_mut(n_cols * c).zip(y0..y1) {
            let from = (crop.top + y) * row_stride + (crop.left + cols.start) * c;
            t.copy_from_slice(&src.pixels[from..from + n_cols * c]);
        }
    } else {
        let horiz = coeffs(crop.width, out_w, filter, cols.clone());
        for (t, y) in temp.chunks_exact_mut(n_cols * c).zip(y0..y1) {
            let row = &src.pixels[(crop.top + y) * row_stride + crop.left * c..][..crop.width * c];
            for (o, out) in t.chunks_exact_mut(c).enumerate() {
                let w = &horiz.weights[o * horiz.ksize..][..horiz.len[o]];
                let taps = &row[horiz.start[o] * c..][..horiz.len[o] * c];
                for (ch, out) in out.iter_mut().enumerate() {
                    let mut sum = 1i32 << (PRECISION_BITS - 1);
                    for (px, &wk) in taps.chunks_exact(c).zip(w) {
                        sum += i32::from(px[ch]) * wk;
                    }
                    *out = clip8(sum);
                }
            }
        }
    }

    // Vertical pass: temp → output, a whole row at a time (vectorises).
    let width = n_cols * c;
    if crop.height == out_h {
        let from = (rows.start - y0) * width;
        return Image { channels: c, height: n_rows, width: n_cols, pixels: temp[from..from + n_rows * width].to_vec() };
    }
    let mut pixels = vec![0u8; n_rows * width];
    let mut sums = vec![0i32; width];
    for (o, out) in pixels.chunks_exact_mut(width).enumerate() {
        sums.fill(1 << (PRECISION_BITS - 1));
        let w = &vert.weights[o * vert.ksize..][..vert.len[o]];
        for (k, &wk) in w.iter().enumerate() {
            let line = &temp[(vert.start[o] + k - y0) * width..][..width];
            for (s, &px) in sums.iter_mut().zip(line) {
                *s += i32::from(px) * wk;
            }
        }
        for (px, &s) in out.iter_mut().zip(&sums) {
            *px = clip8(s);
        }
    }
    Image { channels: c, height: n_rows, width: n_cols, pixels }
}

/// Bilinear resize with antialiasing to `height`×`width` (PIL
/// `Image.resize(…, BILINEAR)`, torchvision `Resize(antialias=True)`).
///
/// # Shapes
/// `h×w×c` → `height×width×c`.
pub fn resize(img: &Image, height: usize, width: usize) -> Image {
    resample(img, Crop::full(img.height, img.width), (height, width), 0..height, 0..width, Filter::Bilinear)
}

/// The size torchvision's `Resize(short)` gives a `height`×`width` image:
/// the shorter side becomes `short`, the longer keeps the aspect ratio,
/// rounded down.
pub fn shorter_side_size(height: usize, width: usize, short: usize) -> (usize, usize) {
    // Integer floor equals torchvision's `int(short * long / short_in)`: a
    // non-integer ratio of these sizes is never within a float ulp of an integer.
    if width <= height { (short * height / width, short) } else { (short, short * width / height) }
}

/// Resizes so that the shorter side is `short` pixels (torchvision `Resize(int)`).
///
/// # Shapes
/// `h×w×c` → `h'×w'×c` with `min(h', w') = short`.
pub fn resize_shorter(img: &Image, short: usize) -> Image {
    let (h, w) = shorter_side_size(img.height, img.width, short);
    resize(img, h, w)
}

/// Offset of a centred window of `crop` samples in `size` samples, as
/// torchvision's `center_crop`: `round((size − crop) / 2)` with Python's
/// round-half-to-even, or `−⌊(crop − size) / 2⌋` (padding) when the window is larger.
fn center_offset(size: usize, crop: usize) -> isize {
    if crop <= size { ((size - crop) as f64 / 2.0).round_ties_even() as isize } else { -(((crop - size) / 2) as isize) }
}

/// The centred `height`×`width` window of an image of `img_h`×`img_w`
/// (torchvision's offsets); `None` if it does not fit.
pub fn center_crop_box(img_h: usize, img_w: usize, height: usize, width: usize) -> Option<Crop> {
    (height <= img_h && width <= img_w).then(|| Crop { top: center_offset(img_h, height) as usize, left: center_offset(img_w, width) as usize, height, width })
}

/// The centred `height`×`width` window (torchvision `CenterCrop`); where the
/// window is larger than the image, the outside is black, as torchvision pads.
///
/// # Shapes
/// `h×w×c` → `height×width×c`.
pub fn center_crop(img: &Image, height: usize, width: usize) -> Image {
    let (top, left) = (center_offset(img.height, height), center_offset(img.width, width));
    let c = img.channels;
    let mut pixels = vec![0u8; height * width * c];
    for y in 0..height {
        let sy = y as isize + top;
        if sy < 0 || sy >= img.height as isize {
            continue;
        }
        // Columns x with 0 ≤ x + left < img.width.
        let x0 = (-left).max(0) as usize;
        let x1 = ((img.width as isize - left).min(width as isize)).max(x0 as isize) as usize;
        let from = (sy as usize * img.width) * c + (x0 as isize + left) as usize * c;
        pixels[(y * width + x0) * c..(y * width + x1) * c].copy_from_slice(&img.pixels[from..from + (x1 - x0) * c]);
    }
    Image { channels: c, height, width, pixels }
}

/// The image mirrored left–right.
///
/// # Shapes
/// `h×w×c` → `h×w×c`.
pub fn hflip(img: &Image) -> Image {
    let c = img.channels;
    let mut pixels = Vec::with_capacity(img.pixels.len());
    for row in img.pixels.chunks_exact(img.width * c) {
        for px in row.chunks_exact(c).rev() {
            pixels.extend_from_slice(px);
        }
    }
    Image { pixels, ..*img }
}

/// A grey image as RGB (the value copied to the three channels, as PIL's
/// `convert("RGB")`); an RGB image unchanged.
///
/// # Shapes
/// `h×w×1` or `h×w×3` → `h×w×3`.
pub fn to_rgb(img: &Image) -> Image {
    match img.channels {
        1 => Image { channels: 3, pixels: img.pixels.iter().flat_map(|&v| [v; 3]).collect(), ..*img },
        _ => img.clone(),
    }
}

/// Writes `(pixel / 255 − mean) / std` per channel into `out`, planar
/// (`[3, h, w]`, torchvision's `ToTensor` + `Normalize`). A grey image is
/// taken as RGB (its value in every channel, each channel with its own
/// mean and std), which is cheaper than converting it first.
///
/// # Shapes
/// `h×w×c` (c ∈ {1, 3}) → `out`: `3·h·w` floats.
pub fn normalize_into(img: &Image, mean: [f64; 3], std: [f64; 3], out: &mut [f32]) {
    let plane = img.height * img.width;
    assert_eq!(out.len(), 3 * plane, "output buffer for a {}×{} image", img.height, img.width);
    for (ch, dst) in out.chunks_exact_mut(plane).enumerate() {
        // 256 possible inputs: a table computed in f64 costs less than the arithmetic per pixel.
        let table: Vec<f32> = (0..256).map(|v| ((v as f64 / 255.0 - mean[ch]) / std[ch]) as f32).collect();
        let src_ch = if img.channels == 1 { 0 } else { ch };
        for (d, px) in dst.iter_mut().zip(img.pixels.chunks_exact(img.channels)) {
            *d = table[px[src_ch] as usize];
        }
    }
}

/// The SplitMix64 output function (a strong 64-bit mixer).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of example `index` under `seed`: unrelated streams for
/// neighbouring seeds and indices (both go through the SplitMix64 mixer), and
/// the same stream whichever thread asks.
pub fn example_rng(seed: u64, index: u64) -> SplitMix64 {
    SplitMix64::new(mix64(seed ^ mix64(index.wrapping_add(0x9E37_79B9_7F4A_7C15))))
}

/// A uniform draw in `[lo, hi)` (53 random bits).
pub(crate) fn uniform(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area
/// fraction from `scale` and a log-uniform aspect ratio (width / height) from
/// `ratio`, sides rounded half to even as Python does; a crop that fits is
/// placed uniformly. After 10 misses, the centred crop of the whole image
/// clamped to the ratio range.
pub fn random_resized_crop_box(height: usize, width: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut SplitMix64) -> Crop {
    let area = (height * width) as f64;
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_ratio[0], log_ratio[1]).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below((height - h + 1) as u64) as usize;
            let left = rng.below((width - w + 1) as u64) as usize;
            return Crop { top, left, height: h, width: w };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio[0] {
        (((width as f64) / ratio[0]).round_ties_even() as usize, width)
    } else if in_ratio > ratio[1] {
        (height, (height as f64 * ratio[1]).round_ties_even() as usize)
    } else {
        (height, width)
    };
    Crop { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Training augmentation: a random resized crop, then an optional flip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Range of the crop's area as a fraction of the image's; default
    /// `[0.08, 1]` (torchvision, timm).
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height), drawn
    /// log-uniformly; default `[3/4, 4/3]`.
    pub ratio: [f64; 2],
    /// Mirror left–right with probability ½; default `true` (the ImageNet
    /// recipe; turn it off for digits and text, whose meaning flips).
    pub hflip: bool,
}

impl Default for Augment {
    fn default() -> Self {
        Augment { scale: [0.08, 1.0], ratio: [3.0 / 4.0, 4.0 / 3.0], hflip: true }
    }
}

impl Augment {
    /// Rejects crops that cannot be drawn, naming the field.
    pub fn validate(&self) -> Result<()> {
        let [lo, hi] = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(Error::Config(format!("augment.scale {:?} must satisfy 0 < lo ≤ hi ≤ 1", self.scale)));
        }
        let [lo, hi] = self.ratio;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(Error::Config(format!("augment.ratio {:?} must satisfy 0 < lo ≤ hi", self.ratio)));
        }
        Ok(())
    }
}

/// How raw images become model input, evaluation and training (the usual
/// torchvision / timm pipelines):
///
/// - evaluation: resize the shorter side to `⌊size / crop_pct⌋`, centre-crop
///   `size`×`size` (only that window of the resized image is computed);
/// - training: a random resized crop to `size`×`size` ([`Augment`]), then
///   an optional flip;
///
/// then grey → RGB and `(x / 255 − mean) / std`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageTransform {
    /// Side of the square output, pixels (required).
    pub size: i64,
    /// Per-channel mean in [0, 1] pixel units; default ImageNet's.
    #[serde(default = "imagenet_mean")]
    pub mean: [f64; 3],
    /// Per-channel standard deviation in [0, 1] pixel units; default ImageNet's.
    #[serde(default = "imagenet_std")]
    pub std: [f64; 3],
    /// Fraction of the resized evaluation image kept by the centre crop, in
    /// (0, 1]; default 0.875 (timm's default, 224 of 256).
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    /// Training augmentation; default [`Augment::default`].
    #[serde(default)]
    pub train: Augment,
}

fn imagenet_mean() -> [f64; 3] {
    ImagePreset::IMAGENET_MEAN
}

fn imagenet_std() -> [f64; 3] {
    ImagePreset::IMAGENET_STD
}

fn default_crop_pct() -> f64 {
    0.875
}

impl From<&ImagePreset> for ImageTransform {
    fn from(p: &ImagePreset) -> Self {
        ImageTransform::from_preset(p)
    }
}

impl ImageTransform {
    /// The backbone's preprocessing with the default training augmentation.
    pub fn from_preset(p: &ImagePreset) -> Self {
        ImageTransform { size: p.size, mean: p.mean, std: p.std, crop_pct: p.crop_pct, train: Augment::default() }
    }

    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("image transform: {what}")));
        if self.size <= 0 {
            return bad(format!("size {} must be positive", self.size));
        }
        if self.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) || self.mean.iter().any(|m| !m.is_finite()) {
            return bad(format!("mean {:?} must be finite and std {:?} positive", self.mean, self.std));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return bad(format!("crop_pct {} must be in (0, 1]", self.crop_pct));
        }
        self.train.validate()
    }

    fn side(&self) -> usize {
        self.size as usize
    }

    /// The evaluation image: shorter side to `⌊size / crop_pct⌋`, then the
    /// centred `size`×`size` window (computed alone, never the whole resize).
    ///
    /// # Shapes
    /// `h×w×c` → `size×size×c`.
    pub fn eval_image(&self, img: &Image) -> Image {
        let size = self.side();
        // timm: `scale_size = math.floor(img_size / crop_pct)`.
        let short = ((size as f64 / self.crop_pct).floor() as usize).max(size);
        let (h, w) = shorter_side_size(img.height, img.width, short);
        let window = center_crop_box(h, w, size, size).expect("the resized image is at least `size` on both sides");
        resample(img, Crop::full(img.height, img.width), (h, w), window.top..window.top + size, window.left..window.left + size, Filter::Bilinear)
    }

    /// The training image: a random resized crop to `size`×`size`, then a flip
    /// with probability ½ if enabled; draws from `rng` only.
    ///
    /// # Shapes
    /// `h×w×c` → `size×size×c`.
    pub fn train_image(&self, img: &Image, rng: &mut SplitMix64) -> Image {
        let size = self.side();
        let crop = random_resized_crop_box(img.height, img.width, self.train.scale, self.train.ratio, rng);
        let out = resample(img, crop, (size, size), 0..size, 0..size, Filter::Bilinear);
        // Drawn after the crop, so turning flips on or off leaves the crops as they were.
        if self.train.hflip && rng.next_u64() >> 63 == 1 { hflip(&out) } else { out }
    }

    /// Example `index`'s image at model size, before normalisation: the
    /// evaluation image, or with `augment = Some(seed)` the training image
    /// drawn from [`example_rng`]`(seed, index)`.
    ///
    /// # Shapes
    /// `h×w×c` → `size×size×c`.
    pub fn image(&self, img: &Image, index: u64, augment: Option<u64>) -> Image {
        match augment {
            None => self.eval_image(img),
            Some(seed) => self.train_image(img, &mut example_rng(seed, index)),
        }
    }

    /// Model input of example `index` ([`ImageTransform::image`]), normalised into `out`.
    ///
    /// # Shapes
    /// `h×w×c` → `out`: `3·size·size` floats, planar `[3, size, size]`.
    pub fn input_into(&self, img: &Image, index: u64, augment: Option<u64>, out: &mut [f32]) {
        normalize_into(&self.image(img, index, augment), self.mean, self.std, out);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic test image with structure at every scale (gradients, a
    /// checkerboard and pseudo-random texture), so resampling errors show.
    pub(crate) fn test_image(channels: usize, height: usize, width: usize, salt: u64) -> Image {
        let mut rng = SplitMix64::new(salt);
        let mut pixels = Vec::with_capacity(channels * height * width);
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    let base = match c {
                        0 => 255 * x / width.max(1),
                        1 => 255 * y / height.max(1),
                        _ => {
                            if (x / 3 + y / 3) % 2 == 0 {
                                40
                            } else {
                                215
                            }
                        }
                    };
                    let noise = (rng.next_u64() % 61) as i64 - 30;
                    pixels.push((base as i64 + noise).clamp(0, 255) as u8);
                }
            }
        }
        Image::new(channels, height, width, pixels).unwrap()
    }

    fn png(path: &std::path::Path) -> Image {
        let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match img.color().has_color() {
            true => {
                let rgb = img.to_rgb8();
                Image::new(3, rgb.height() as usize, rgb.width() as usize, rgb.into_raw()).unwrap()
            }
            false => {
                let grey = img.to_luma8();
                Image::new(1, grey.height() as usize, grey.width() as usize, grey.into_raw()).unwrap()
            }
        }
    }

    /// Goldens of `scripts/gen_resize_golden.py`: torchvision `Resize(antialias=True)`
    /// on PIL images (downscales by non-integer factors, an upscale, a shorter-side
    /// resize, a resized crop and the evaluation transform) must match exactly.
    #[test]
    fn resize_matches_torchvision_goldens() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize");
        let mut checked = 0;
        for src_name in ["photo_a.png", "photo_b.png", "grey.png"] {
            let src = png(&dir.join(src_name));
            let stem = src_name.trim_end_matches(".png");
            for (case, made) in [
                ("down", resize(&src, 23, 17)),
                ("up", resize(&src, 101, 77)),
                ("short", resize_shorter(&src, 29)),
                ("crop", resample(&src, Crop { top: 5, left: 9, height: 31, width: 40 }, (16, 16), 0..16, 0..16, Filter::Bilinear)),
                ("box", resize(&resample(&src, Crop::full(src.height, src.width), (13, 11), 0..13, 0..11, Filter::Box), 40, 40)),
                ("eval", ImageTransform { size: 32, crop_pct: 0.9, ..ImageTransform::from_preset(&preset(32)) }.eval_image(&src)),
            ] {
                let want = png(&dir.join(format!("{stem}_{case}.png")));
                assert_eq!((made.height, made.width, made.channels), (want.height, want.width, want.channels), "{stem} {case}");
                let worst = made.pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert_eq!(worst, 0, "{stem} {case}: max difference {worst} from torchvision");
                checked += 1;
            }
        }
        assert_eq!(checked, 18);
    }

    fn preset(size: i64) -> ImagePreset {
        ImagePreset { size, mean: ImagePreset::IMAGENET_MEAN, std: ImagePreset::IMAGENET_STD, crop_pct: 0.875 }
    }

    #[test]
    fn resize_keeps_constants_and_windows_equal_full_resizes() {
        // A constant image stays constant at every scale (weights sum to 2²² up to rounding).
        let flat = Image::new(3, 37, 53, vec![201; 37 * 53 * 3]).unwrap();
        for (h, w) in [(1, 1), (5, 200), (224, 224), (37, 53)] {
            assert!(resize(&flat, h, w).pixels.iter().all(|&v| v == 201), "{h}×{w}");
        }
        // Same size is the identity.
        let img = test_image(3, 20, 30, 1);
        assert_eq!(resize(&img, 20, 30), img);
        // A window of a resize equals the crop of the full resize.
        let full = resize(&img, 45, 61);
        let part = resample(&img, Crop::full(20, 30), (45, 61), 7..30, 11..50, Filter::Bilinear);
        assert_eq!(part, full.crop_for_test(7, 11, 23, 39));
        // The box filter halving 2×2 blocks averages each block exactly.
        let blocks = Image::new(1, 4, 4, vec![0, 0, 200, 200, 0, 0, 200, 200, 100, 100, 50, 50, 100, 100, 50, 50]).unwrap();
        let halved = resample(&blocks, Crop::full(4, 4), (2, 2), 0..2, 0..2, Filter::Box);
        assert_eq!(halved.pixels, [0, 200, 100, 50]);
        // Sampling 1-px stripes at every 4th column would alias to a constant 0 or 255; the
        // widened filter (antialiasing) averages them to grey away from the borders.
        let stripes = Image::new(1, 8, 64, (0..8 * 64).map(|i| if i % 2 == 0 { 0 } else { 255 }).collect()).unwrap();
        let small = resize(&stripes, 8, 16);
        assert!((0..8).all(|y| (1..15).all(|x| (127..=128).contains(&small.get(y, x, 0)))), "{:?}", small.pixels);
    }

    impl Image {
        fn crop_for_test(&self, top: usize, left: usize, height: usize, width: usize) -> Image {
            let c = self.channels;
            let pixels = (top..top + height).flat_map(|y| self.pixels[(y * self.width + left) * c..(y * self.width + left + width) * c].to_vec()).collect();
            Image { channels: c, height, width, pixels }
        }
    }

    #[test]
    fn crops_flips_and_channels() {
        let img = test_image(3, 7, 10, 2);
        // torchvision: top = round((7 − 4) / 2) = round(1.5) = 2 (half to even), left = round(3) = 3.
        assert_eq!(center_crop(&img, 4, 4), img.crop_for_test(2, 3, 4, 4));
        assert_eq!(center_crop_box(7, 10, 4, 4), Some(Crop { top: 2, left: 3, height: 4, width: 4 }));
        // round(0.5) = 0 in Python.
        assert_eq!(center_crop_box(5, 5, 4, 4).unwrap().top, 0);
        assert_eq!(center_crop_box(3, 3, 4, 4), None);
        // A larger window pads with black around the image: (6 − 2) / 2 = 2 on the left.
        let small = Image::new(1, 1, 2, vec![9, 8]).unwrap();
        assert_eq!(center_crop(&small, 3, 6).pixels, [0, 0, 0, 0, 0, 0, 0, 0, 9, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        let flipped = hflip(&img);
        assert_eq!(flipped.get(3, 0, 1), img.get(3, 9, 1));
        assert_eq!(hflip(&flipped), img);
        let grey = test_image(1, 4, 5, 3);
        let rgb = to_rgb(&grey);
        assert_eq!((rgb.channels, rgb.get(2, 3, 2)), (3, grey.get(2, 3, 0)));
        assert_eq!(Image::from_chw(3, 7, 10, &img.to_chw()).unwrap(), img);
        assert!(Image::new(2, 1, 1, vec![0, 0]).is_err());
        assert!(Image::new(3, 2, 2, vec![0; 11]).is_err());
    }

    #[test]
    fn normalisation_is_planar_and_grey_matches_rgb() {
        let grey = test_image(1, 3, 4, 4);
        let (mean, std) = (ImagePreset::IMAGENET_MEAN, ImagePreset::IMAGENET_STD);
        let (mut a, mut b) = (vec![0f32; 36], vec![0f32; 36]);
        normalize_into(&grey, mean, std, &mut a);
        normalize_into(&to_rgb(&grey), mean, std, &mut b);
        assert_eq!(a, b);
        let v = grey.get(1, 2, 0) as f64;
        // Channel 2's plane starts at 2·12; pixel (1, 2) is at 1·4 + 2.
        assert!((b[24 + 6] as f64 - (v / 255.0 - mean[2]) / std[2]).abs() < 1e-6);
    }

    #[test]
    fn random_resized_crop_follows_its_ranges() {
        let mut rng = SplitMix64::new(5);
        let (scale, ratio) = ([0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]);
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let c = random_resized_crop_box(120, 160, scale, ratio, &mut rng);
            assert!(c.top + c.height <= 120 && c.left + c.width <= 160 && c.height > 0 && c.width > 0, "{c:?}");
            let area = (c.height * c.width) as f64 / (120.0 * 160.0);
            // Rounding each side to a whole pixel moves the area and ratio a little past the ranges.
            assert!((0.07..=1.0).contains(&area), "{c:?}");
            let r = c.width as f64 / c.height as f64;
            assert!(area > 0.9 || (0.72..=1.38).contains(&r), "{c:?} ratio {r}");
            areas.push(area);
        }
        let mean_area = areas.iter().sum::<f64>() / areas.len() as f64;
        // Big crops of the wrong shape miss and are redrawn, which pulls the mean area below
        // uniform's 0.54: torchvision's get_params averages 0.437 here (20 000 draws).
        assert!((0.41..0.47).contains(&mean_area), "mean area {mean_area}");
        // An impossible ratio range: after 10 misses the centred crop clamped to the range.
        let c = random_resized_crop_box(100, 10, [0.9, 1.0], [2.0, 3.0], &mut rng);
        // torchvision gives (top, left, height, width) = (47, 0, 5, 10) for this case too.
        assert_eq!(c, Crop { top: 47, left: 0, height: 5, width: 10 });
        let c = random_resized_crop_box(50, 50, [1.0, 1.0], [1.0, 1.0], &mut rng);
        assert_eq!(c, Crop::full(50, 50));
    }

    #[test]
    fn transforms_are_deterministic_per_seed_and_index() {
        let t = ImageTransform::from_preset(&preset(24));
        let img = test_image(3, 40, 50, 6);
        let out = |index: u64, augment: Option<u64>| {
            let mut o = vec![0f32; 3 * 24 * 24];
            t.input_into(&img, index, augment, &mut o);
            o
        };
        assert_eq!(out(0, Some(1)), out(0, Some(1)));
        assert_ne!(out(0, Some(1)), out(0, Some(2)));
        assert_ne!(out(0, Some(1)), out(1, Some(1)));
        assert_eq!(out(0, None), out(7, None));
        // Evaluation = shorter side to ⌊24 / 0.875⌋ = 27, centre crop 24.
        let eval = t.eval_image(&img);
        assert_eq!(eval, center_crop(&resize_shorter(&img, 27), 24, 24));
        // Flips happen about half the time when on, never when off.
        let mut flips = 0;
        let no_flip = ImageTransform { train: Augment { hflip: false, scale: [1.0, 1.0], ratio: [1.25, 1.25] }, ..t.clone() };
        let flip = ImageTransform { train: Augment { hflip: true, ..no_flip.train.clone() }, ..t.clone() };
        for i in 0..200 {
            let plain = no_flip.train_image(&img, &mut example_rng(3, i));
            assert_eq!(plain, resize(&img, 24, 24), "the only 1.25-ratio crop of all the area is the whole image");
            flips += usize::from(flip.train_image(&img, &mut example_rng(3, i)) != plain);
        }
        assert!((70..130).contains(&flips), "{flips} flips in 200");
    }

    #[test]
    fn transform_config_parses_with_defaults_and_rejects_typos() {
        let t: ImageTransform = toml::from_str("size = 32\n[train]\nhflip = false").unwrap();
        assert_eq!(t, ImageTransform { train: Augment { hflip: false, ..Augment::default() }, ..ImageTransform::from_preset(&preset(32)) });
        t.validate().unwrap();
        let err = toml::from_str::<ImageTransform>("size = 32\ncrop_pc = 0.9").unwrap_err().to_string();
        assert!(err.contains("crop_pc"), "{err}");
        let err = toml::from_str::<ImageTransform>("size = 32\n[train]\nflip = true").unwrap_err().to_string();
        assert!(err.contains("flip"), "{err}");
        for bad in [
            ImageTransform { size: 0, ..t.clone() },
            ImageTransform { crop_pct: 1.2, ..t.clone() },
            ImageTransform { std: [0.2, 0.0, 0.2], ..t.clone() },
            ImageTransform { train: Augment { scale: [0.5, 0.2], ..Augment::default() }, ..t.clone() },
            ImageTransform { train: Augment { ratio: [0.0, 1.0], ..Augment::default() }, ..t.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
    }
}
