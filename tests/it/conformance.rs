//! The conformance table: the same checks over every registered method, on
//! tiny random-init backbones of each family (no download). Methods that promise an unchanged output
//! at initialisation keep it; after a training step only trainable parameters
//! moved; merged ≈ unmerged; saved artifacts and configs round-trip.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use zhijian::backbones::{Bert, BertConfig, EfficientNetLite, EfficientNetLiteConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig};
use zhijian::core::train::{self, method_variables, predict, restore, trainable, Split, TrainConfig, TrainOptions};
use zhijian::core::{Input, Method, Model, Registry};

fn registry() -> Registry {
    zhijian::bench::registry()
}

/// The toy backbones every method is checked on: text, a vision transformer
/// and two CNNs (one with depthwise convolutions, TF padding and BatchNorm).
#[derive(Clone, Copy, Debug)]
enum Toy {
    Bert,
    Vit,
    EfficientNet,
    Cnn,
}

const TOYS: [Toy; 4] = [Toy::Bert, Toy::Vit, Toy::EfficientNet, Toy::Cnn];

fn tiny_model(seed: i64) -> Model {
    tiny_model_with_dropout(seed, 0.1)
}

fn toy_model(toy: Toy, seed: i64) -> Model {
    match toy {
        Toy::Bert => tiny_model(seed),
        Toy::Vit => {
            tch::manual_seed(seed);
            let config = VitConfig { img_size: 16, patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, dropout: 0.1, ..VitConfig::tiny_patch4_32() };
            Model::new(Device::Cpu, 3, |p| Box::new(Vit::new(p, &config).unwrap()))
        }
        Toy::EfficientNet => {
            tch::manual_seed(seed);
            let config = EfficientNetLiteConfig { width: 0.25, depth: 0.5, image_size: 16, in_chans: 3 };
            Model::new(Device::Cpu, 3, |p| Box::new(EfficientNetLite::new(p, &config).unwrap()))
        }
        Toy::Cnn => {
            tch::manual_seed(seed);
            let config = SmallCnnConfig { image_size: 16, in_chans: 3, channels: vec![4, 8] };
            Model::new(Device::Cpu, 3, |p| Box::new(SmallCnn::new(p, &config).unwrap()))
        }
    }
}

fn toy_batch(toy: Toy) -> Split {
    match toy {
        Toy::Bert => batch(),
        Toy::Vit | Toy::EfficientNet | Toy::Cnn => {
            tch::manual_seed(7);
            let images = Tensor::randn([12, 3, 16, 16], (Kind::Float, Device::Cpu));
            Split { name: "toy".into(), input: Input::Images(images), labels: Tensor::randint(3, [12], (Kind::Int64, Device::Cpu)) }
        }
    }
}

fn tiny_model_with_dropout(seed: i64, dropout: f64) -> Model {
    tch::manual_seed(seed);
    let config = BertConfig {
        hidden_dropout_prob: dropout,
        attention_probs_dropout_prob: dropout,
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

fn batch() -> Split {
    tch::manual_seed(7);
    let ids = Tensor::randint_low(1, 50, [12, 10], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([12, 10], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 6, 4).narrow(0, 0, 4).fill_(0);
    Split { name: "toy".into(), input: Input::Tokens { ids, mask }, labels: Tensor::randint(3, [12], (Kind::Int64, Device::Cpu)) }
}

/// Every parameter of the model and the methods, by name, copied.
fn snapshot(model: &Model, methods: &[Box<dyn Method>]) -> HashMap<String, Tensor> {
    let mut all: HashMap<String, Tensor> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    all.extend(method_variables(methods).into_iter().map(|(n, t)| (n, t.copy())));
    all
}

fn logits(model: &Model, methods: &[Box<dyn Method>], data: &Split) -> Tensor {
    predict(model, methods, &data.input, 64).unwrap()
}

fn prepared(name: &str, seed: i64) -> (Model, Vec<Box<dyn Method>>) {
    prepared_on(Toy::Bert, name, seed)
}

fn prepared_on(toy: Toy, name: &str, seed: i64) -> (Model, Vec<Box<dyn Method>>) {
    let model = toy_model(toy, seed);
    let mut methods = vec![registry().build_default(name).unwrap()];
    train::prepare(&model, &mut methods, 0).unwrap();
    (model, methods)
}

/// Makes zero-initialised method parameters non-zero, so merge checks see a
/// real update. In name order ([`method_variables`] sorts): a `HashMap`'s
/// order would change the draws.
fn perturb(methods: &[Box<dyn Method>]) {
    tch::no_grad(|| {
        for (_, mut t) in method_variables(methods) {
            let _ = t.g_add_(&(t.randn_like() * 0.1));
        }
    });
}

#[test]
fn every_method_passes_the_conformance_checks() {
    let _rng = crate::rng_lock();
    let names = registry().names();
    assert!(names.len() >= 3, "{names:?}");
    for (toy, name) in TOYS.into_iter().flat_map(|t| names.iter().map(move |n| (t, n))) {
        let data = toy_batch(toy);
        let at = format!("{name} on {toy:?}");
        // 1. Unchanged output at initialisation where promised.
        let plain = logits(&toy_model(toy, 1), &[], &data);
        let (model, mut methods) = prepared_on(toy, name, 1);
        if methods[0].identity_at_init() {
            let d = (logits(&model, &methods, &data) - &plain).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{at}: output changed at init by {d}");
        }

        // 2. After a step only what the artifact holds moved (trainable parameters,
        //    and the BatchNorm statistics of layers that train), and something did.
        let before = snapshot(&model, &methods);
        let trains: Vec<String> = train::artifact(&model, &methods).into_iter().map(|(n, _)| n).collect();
        let cfg = TrainConfig { max_steps: 1, batch_size: 12, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        train::train(&model, &mut methods, &data, None, &cfg, &TrainOptions::default()).unwrap();
        let after = snapshot(&model, &methods);
        let mut moved = 0;
        for (n, t) in &before {
            let changed = !t.equal(&after[n]);
            assert!(!changed || trains.contains(n), "{at}: frozen parameter {n} changed");
            moved += changed as usize;
        }
        assert!(moved > 0, "{at}: nothing changed after a training step");

        // 3. Merged ≈ unmerged, and unmerge restores the weights.
        if methods[0].can_merge() {
            let (model, mut methods) = prepared_on(toy, name, 1);
            perturb(&methods);
            let weights = snapshot(&model, &[]);
            let unmerged = logits(&model, &methods, &data);
            methods[0].merge(&model).unwrap();
            let merged = logits(&model, &methods, &data);
            let d = (&merged - &unmerged).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{at}: merged differs from unmerged by {d}");
            methods[0].unmerge(&model).unwrap();
            for (n, t) in snapshot(&model, &[]) {
                assert!(t.allclose(&weights[&n], 1e-5, 1e-6, false), "{at}: unmerge did not restore {n}");
            }
        }

        // 4. Saving the artifact and restoring it into a fresh model (different
        //    random init) gives the same outputs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifact.safetensors");
        perturb(&methods);
        zhijian::core::save_atomic(&train::artifact(&model, &methods), &path).unwrap();
        let frozen_part = logits(&model, &methods, &data);
        let (fresh, fresh_methods) = prepared_on(toy, name, 1);
        restore(&fresh, &fresh_methods, &path).unwrap();
        let d = (logits(&fresh, &fresh_methods, &data) - frozen_part).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{at}: save → restore changed outputs by {d}");

        // 5. Config round-trip.
        let mut spec = methods[0].config();
        spec.insert("method".into(), toml::Value::String(name.to_string()));
        assert_eq!(registry().build(&spec).unwrap().config(), methods[0].config(), "{at}: config round-trip");
    }
}

#[test]
fn bad_method_entries_name_the_problem() {
    let _rng = crate::rng_lock();
    let r = registry();
    let spec = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
    let err = r.build(&spec("method = \"lorra\"")).err().unwrap().to_string();
    assert!(err.contains("unknown method `lorra`") && err.contains("lora") && err.contains("linear_probe"), "{err}");
    let err = r.build(&spec("method = \"lora\"\nrnak = 4")).err().unwrap().to_string();
    assert!(err.contains("rnak"), "{err}");
}

#[test]
fn linear_probe_caches_features_and_lora_does_not() {
    let _rng = crate::rng_lock();
    let (model, methods) = prepared("linear_probe", 0);
    assert!(train::features_cacheable(&model, &methods));
    let (model, methods) = prepared("lora", 0);
    assert!(!train::features_cacheable(&model, &methods));
    let (model, methods) = prepared("full_finetune", 0);
    assert!(!train::features_cacheable(&model, &methods));
    // Without dropout (cached features are computed in evaluation mode), training
    // the head on cached features takes the same steps as through the backbone.
    let data = batch();
    let cfg = TrainConfig { max_steps: 2, batch_size: 6, lr: 1e-2, ..Default::default() };
    let probe = |seed| {
        let model = tiny_model_with_dropout(seed, 0.0);
        let mut methods = vec![registry().build_default("linear_probe").unwrap()];
        train::prepare(&model, &mut methods, 0).unwrap();
        (model, methods)
    };
    let (direct, mut m1) = probe(3);
    train::train(&direct, &mut m1, &data, None, &cfg, &TrainOptions::default()).unwrap();
    let (cached, mut m2) = probe(3);
    let features = train::cache_features(&cached, &data, 64, "test").unwrap();
    train::train(&cached, &mut m2, &features, None, &cfg, &TrainOptions::default()).unwrap();
    let (a, b) = (&direct.vs.variables()["head.weight"], &cached.vs.variables()["head.weight"]);
    assert!(a.allclose(b, 1e-5, 1e-6, false));
}

#[test]
fn training_repeats_exactly_with_the_same_seed() {
    let _rng = crate::rng_lock();
    let data = batch();
    let run = |seed: u64| {
        let (model, mut methods) = prepared("lora", 5);
        perturb(&methods);
        let cfg = TrainConfig { max_steps: 3, batch_size: 4, lr: 1e-2, seed, ..Default::default() };
        train::train(&model, &mut methods, &data, None, &cfg, &TrainOptions::default()).unwrap();
        snapshot(&model, &methods)
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert!(a.iter().all(|(n, t)| t.equal(&b[n])), "same seed, different parameters");
    assert!(a.iter().any(|(n, t)| !t.equal(&c[n])), "different seeds, identical parameters");
}

#[test]
fn predict_keeps_example_order_whatever_the_batching() {
    let _rng = crate::rng_lock();
    let model = tiny_model(4);
    let data = batch();
    let all = logits(&model, &[], &data);
    let Input::Tokens { ids, mask } = &data.input else { unreachable!() };
    for i in [0i64, 5, 11] {
        let one = Input::Tokens { ids: ids.narrow(0, i, 1), mask: mask.narrow(0, i, 1) };
        let row = predict(&model, &[], &one, 1).unwrap();
        assert!(row.allclose(&all.narrow(0, i, 1), 1e-5, 1e-6, false), "row {i} moved");
    }
    assert!(predict(&model, &[], &data.input, 5).unwrap().allclose(&all, 1e-5, 1e-6, false));
}

#[test]
fn checkpoint_after_each_epoch_restores_the_trained_state() {
    let _rng = crate::rng_lock();
    let data = batch();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt/lora.safetensors");
    let (model, mut methods) = prepared("lora", 2);
    let cfg = TrainConfig { epochs: 2, batch_size: 6, lr: 1e-2, ..Default::default() };
    let opts = TrainOptions { label: "ckpt".into(), checkpoint: Some(path.clone()) };
    let report = train::train(&model, &mut methods, &data, Some(&data), &cfg, &opts).unwrap();
    assert_eq!((report.steps, report.val_top1.len()), (4, 2));
    // Only the checkpoint is in its folder: the temporary file was renamed over it.
    assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    // Same frozen backbone (seed 2), fresh LoRA and head: the checkpoint brings the training back.
    let (fresh, fresh_methods) = prepared("lora", 2);
    assert!(logits(&fresh, &fresh_methods, &data).ne_tensor(&logits(&model, &methods, &data)).any().int64_value(&[]) == 1);
    let restored = restore(&fresh, &fresh_methods, &path).unwrap();
    assert_eq!(restored, trainable(&model, &methods).len());
    let d = (logits(&fresh, &fresh_methods, &data) - logits(&model, &methods, &data)).abs().max().double_value(&[]);
    assert!(d < 1e-6, "restored checkpoint differs by {d}");
}
