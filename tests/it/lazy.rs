//! Lazy image inputs (`Input::Lazy`): batches made on demand on a prefetch
//! thread give the same predictions as the same images held in memory,
//! training draws fresh augmentations each epoch and repeats exactly for a
//! seed, and a batch that cannot be made stops training with its error.

use std::sync::{Arc, Mutex};

use tch::{Device, Tensor};
use zhijian::backbones::{SmallCnn, SmallCnnConfig};
use zhijian::core::train::{self, Split, TrainConfig, TrainOptions, predict};
use zhijian::core::{Compute, Error, ImageSource, Input, Method, Model, Result};

/// 10 images of 3×8×8; augmentation adds a constant drawn from (seed, index).
#[derive(Debug)]
struct ToySource {
    pixels: Vec<f32>,
    seeds: Mutex<Vec<Option<u64>>>,
    broken: Option<i64>,
}

const N: i64 = 10;
const PIXELS: usize = 3 * 8 * 8;

impl ToySource {
    fn new(broken: Option<i64>) -> ToySource {
        let pixels = (0..N as usize * PIXELS).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        ToySource { pixels, seeds: Mutex::new(Vec::new()), broken }
    }

    fn all(&self) -> Tensor {
        Tensor::from_slice(&self.pixels).reshape([N, 3, 8, 8])
    }
}

impl ImageSource for ToySource {
    fn len(&self) -> i64 {
        N
    }

    fn fingerprint(&self) -> Result<String> {
        Ok(format!("toy {N} broken {:?}", self.broken))
    }

    fn batch(&self, idx: &[i64], augment: Option<u64>) -> Result<Tensor> {
        self.seeds.lock().unwrap().push(augment);
        if let Some(bad) = self.broken.filter(|b| idx.contains(b)) {
            return Err(Error::Data(format!("image {bad} cannot be decoded")));
        }
        let rows: Vec<Tensor> = idx
            .iter()
            .map(|&i| {
                let shift = augment.map_or(0.0, |s| ((s.wrapping_mul(31).wrapping_add(i as u64)) % 7) as f64 / 10.0);
                self.all().get(i) + shift
            })
            .collect();
        Ok(Tensor::stack(&rows, 0))
    }
}

fn model() -> Model {
    tch::manual_seed(3);
    let config = SmallCnnConfig { image_size: 8, in_chans: 3, channels: vec![4, 6] };
    Model::new(Device::Cpu, 2, |p| Box::new(SmallCnn::new(p, &config).unwrap()))
}

fn split(source: Arc<ToySource>) -> Split {
    Split { name: "toy".into(), input: Input::Lazy(source), labels: Tensor::from_slice(&[0i64, 1, 0, 1, 1, 0, 0, 1, 1, 0]) }
}

fn full_finetune() -> Vec<Box<dyn Method>> {
    vec![zhijian::bench::registry().build_default("full_finetune").unwrap()]
}

#[test]
fn lazy_batches_predict_like_images_in_memory() {
    let _rng = crate::rng_lock();
    let source = Arc::new(ToySource::new(None));
    let model = model();
    let lazy = predict(&model, &[], &Input::Lazy(source.clone()), 3, Compute::Fp32).unwrap();
    let eager = predict(&model, &[], &Input::Images(source.all()), 3, Compute::Fp32).unwrap();
    assert!(lazy.allclose(&eager, 1e-6, 1e-6, false));
    // Evaluation never augments.
    assert!(source.seeds.lock().unwrap().iter().all(Option::is_none));
}

#[test]
fn lazy_training_augments_per_epoch_and_repeats_for_a_seed() {
    let _rng = crate::rng_lock();
    let run = |seed: u64| {
        let source = Arc::new(ToySource::new(None));
        let model = model();
        let mut methods = full_finetune();
        train::prepare(&model, &mut methods, 0).unwrap();
        let cfg = TrainConfig { epochs: 2, batch_size: 4, lr: 1e-2, seed, ..Default::default() };
        train::train(&model, &mut methods, &split(source.clone()), None, &cfg, &TrainOptions::default()).unwrap();
        let seeds = source.seeds.lock().unwrap().clone();
        (model.vs.variables()["head.weight"].copy(), seeds)
    };
    let ((a, seeds), (b, _), (c, _)) = (run(1), run(1), run(2));
    assert!(a.equal(&b), "same seed, different weights");
    assert!(!a.equal(&c), "different seeds, same weights");
    // 3 batches per epoch, each epoch with its own augmentation seed.
    assert_eq!(seeds.len(), 6);
    assert!(seeds.iter().all(Option::is_some));
    assert!(seeds[..3].iter().all(|s| *s == seeds[0]) && seeds[3..].iter().all(|s| *s == seeds[3]) && seeds[0] != seeds[3]);
}

#[test]
fn a_batch_that_cannot_be_made_stops_training_with_its_error() {
    let _rng = crate::rng_lock();
    let model = model();
    let mut methods = full_finetune();
    train::prepare(&model, &mut methods, 0).unwrap();
    let cfg = TrainConfig { epochs: 1, batch_size: 4, ..Default::default() };
    let err = train::train(&model, &mut methods, &split(Arc::new(ToySource::new(Some(7)))), None, &cfg, &TrainOptions::default()).unwrap_err();
    assert!(err.to_string().contains("image 7 cannot be decoded"), "{err}");
    let err = predict(&model, &[], &Input::Lazy(Arc::new(ToySource::new(Some(2)))), 4, Compute::Fp32).unwrap_err();
    assert!(matches!(err, Error::Data(_)), "{err}");
}
