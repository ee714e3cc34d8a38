//! Tiny random-init backbones of every family for the methods' tests (no
//! download): a 2-layer BERT and MPNet, a 2-block ViT, an EfficientNet-Lite, a small
//! CNN and an MLP, with inputs that fit them. Shared by every method crate's
//! unit tests.

use tch::{Device, Kind, Tensor};
use zhijian_core::{Input, Model};

use crate::{Bert, BertConfig, EfficientNetLite, EfficientNetLiteConfig, Mlp, MlpConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig};

/// A 2-layer BERT (hidden 16, 2 heads, vocabulary 50), 3 classes, no dropout.
pub fn bert(seed: i64) -> Model {
    tch::manual_seed(seed);
    let config = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 16,
        ..BertConfig::minilm_l6()
    };
    Model::new(Device::Cpu, 3, |p| Box::new(Bert::new(p, &config).unwrap()))
}

/// A 2-layer MPNet (hidden 16, 2 heads, vocabulary 50, relative position
/// bias), 3 classes, no dropout: the BERT toy's sizes.
pub fn mpnet(seed: i64) -> Model {
    tch::manual_seed(seed);
    let config = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 18,
        ..BertConfig::mpnet_base()
    };
    Model::new(Device::Cpu, 3, |p| Box::new(Bert::new(p, &config).unwrap()))
}

/// A 2-block ViT on 16 px images (patch 4, width 16, 2 heads), 3 classes.
pub fn vit(seed: i64) -> Model {
    tch::manual_seed(seed);
    let config = VitConfig { img_size: 16, patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, dropout: 0.0, ..VitConfig::tiny_patch4_32() };
    Model::new(Device::Cpu, 3, |p| Box::new(Vit::new(p, &config).unwrap()))
}

/// An EfficientNet-Lite at width 0.25, depth 0.5, on 16 px images, 3 classes.
pub fn efficientnet(seed: i64) -> Model {
    tch::manual_seed(seed);
    let config = EfficientNetLiteConfig { width: 0.25, depth: 0.5, image_size: 16, in_chans: 3, stages: None };
    Model::new(Device::Cpu, 3, |p| Box::new(EfficientNetLite::new(p, &config).unwrap()))
}

/// A 2-stage CNN (4 and 8 channels) on 16 px images, 3 classes.
pub fn cnn(seed: i64) -> Model {
    tch::manual_seed(seed);
    let config = SmallCnnConfig { image_size: 16, in_chans: 3, channels: vec![4, 8] };
    Model::new(Device::Cpu, 3, |p| Box::new(SmallCnn::new(p, &config).unwrap()))
}

/// An MLP (hidden 8 then 6) on 1×4×4 images, `classes` classes: a model
/// small enough to check updates by hand.
pub fn mlp(seed: i64, classes: i64) -> Model {
    tch::manual_seed(seed);
    let config = MlpConfig { image_size: 4, in_chans: 1, hidden: vec![8, 6] };
    Model::new(Device::Cpu, classes, |p| Box::new(Mlp::new(p, &config).unwrap()))
}

/// 6 token sequences of length 8 (ids 1‥49); the first 2 end with 3 padding tokens.
/// Drawn from a local generator, not LibTorch's global one: tests on parallel
/// threads draw from that between any reseed and the draw, so two calls would
/// not be guaranteed to agree.
pub fn tokens() -> Input {
    let ids: Vec<i64> = uniforms(7, 6 * 8).into_iter().map(|u| 1 + (u * 49.0) as i64).collect();
    let ids = Tensor::from_slice(&ids).view([6, 8]);
    let mask = Tensor::ones([6, 8], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 5, 3).narrow(0, 0, 2).fill_(0);
    Input::Tokens { ids, mask }
}

/// 6 standard-normal 3×16×16 images (Box–Muller on the local generator).
pub fn images() -> Input {
    let u = uniforms(7, 6 * 3 * 16 * 16);
    let normal: Vec<f32> = u
        .chunks(2)
        .flat_map(|p| {
            let (r, a) = ((-2.0 * (1.0 - p[0]).ln()).sqrt(), std::f64::consts::TAU * p[1]);
            [(r * a.cos()) as f32, (r * a.sin()) as f32]
        })
        .collect();
    Input::Images(Tensor::from_slice(&normal).view([6, 3, 16, 16]))
}

/// `n` uniforms in [0, 1) from a 64-bit linear congruential generator (Knuth's MMIX constants).
fn uniforms(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// 6 random labels in 0‥3.
pub fn labels() -> Tensor {
    Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2])
}

/// Writes `weights` (checkpoint names, e.g. a copy of another toy's frozen
/// backbone) into `model`. Reseeding alone need not rebuild the same toy:
/// other tests draw from LibTorch's global generator on parallel threads.
pub fn with_weights(model: Model, weights: &[(String, Tensor)]) -> Model {
    let vars = model.vs.variables();
    tch::no_grad(|| {
        for (name, t) in weights {
            vars[name].shallow_clone().copy_(t);
        }
    });
    model
}
