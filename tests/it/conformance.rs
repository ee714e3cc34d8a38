//! The conformance table: the same checks over every registered method, on
//! tiny random-init backbones of each family (no download). Methods that promise an unchanged output
//! at initialisation keep it; after a training step only trainable parameters
//! moved; merged ≈ unmerged; saved artifacts and configs round-trip.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use zhijian::backbones::{Bert, BertConfig, EfficientNetLite, EfficientNetLiteConfig, SmallCnn, SmallCnnConfig, Vit, VitConfig};
use zhijian::core::train::{self, Split, TrainConfig, TrainOptions, method_variables, predict, restore, trainable};
use zhijian::core::{Compute, Input, Method, Model, Precision, Registry, Teacher};

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
    toy_model_with_classes(toy, seed, 3)
}

fn toy_model_with_classes(toy: Toy, seed: i64, classes: i64) -> Model {
    match toy {
        Toy::Bert => tiny_model_with(seed, 0.1, classes),
        Toy::Vit => {
            tch::manual_seed(seed);
            let config = VitConfig { img_size: 16, patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, dropout: 0.1, ..VitConfig::tiny_patch4_32() };
            Model::new(Device::Cpu, classes, |p| Box::new(Vit::new(p, &config).unwrap()))
        }
        Toy::EfficientNet => {
            tch::manual_seed(seed);
            let config = EfficientNetLiteConfig { width: 0.25, depth: 0.5, image_size: 16, in_chans: 3, stages: None };
            Model::new(Device::Cpu, classes, |p| Box::new(EfficientNetLite::new(p, &config).unwrap()))
        }
        Toy::Cnn => {
            tch::manual_seed(seed);
            let config = SmallCnnConfig { image_size: 16, in_chans: 3, channels: vec![4, 8] };
            Model::new(Device::Cpu, classes, |p| Box::new(SmallCnn::new(p, &config).unwrap()))
        }
    }
}

/// The frozen teacher a strategy's methods ask for, if they ask: the toy's
/// pre-trained self (seed 1, as the checked models), with the classes the
/// method expects of it (LwF's `source_classes`; else the task's 3).
fn toy_teacher(toy: Toy, methods: &[Box<dyn Method>]) -> Option<Teacher> {
    train::teacher_taps(methods)?;
    let classes = methods.iter().find_map(|m| m.config().get("source_classes").and_then(toml::Value::as_integer)).unwrap_or(3);
    Some(Teacher::new(toy_model_with_classes(toy, 1, classes), Vec::new(), "toy"))
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
    tiny_model_with(seed, dropout, 3)
}

fn tiny_model_with(seed: i64, dropout: f64, classes: i64) -> Model {
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
    Model::new(Device::Cpu, classes, |p| Box::new(Bert::new(p, &config).unwrap()))
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
    predict(model, methods, &data.input, 64, Compute::Fp32).unwrap()
}

fn prepared(name: &str, seed: i64) -> (Model, Vec<Box<dyn Method>>) {
    prepared_on(Toy::Bert, name, seed)
}

fn prepared_on(toy: Toy, name: &str, seed: i64) -> (Model, Vec<Box<dyn Method>>) {
    let spec: toml::Table = toml::from_str(&format!("method = \"{name}\"")).unwrap();
    try_prepared(toy, &spec, seed).unwrap()
}

/// The method `spec` describes, prepared on a fresh toy model; `Err` when the
/// method does not apply to that backbone.
fn try_prepared(toy: Toy, spec: &toml::Table, seed: i64) -> zhijian::core::Result<(Model, Vec<Box<dyn Method>>)> {
    let model = toy_model(toy, seed);
    let mut methods = vec![registry().build(spec).unwrap_or_else(|e| panic!("{spec}: {e}"))];
    give_class_texts(&model, &mut methods);
    train::prepare(&model, &mut methods, 0)?;
    Ok((model, methods))
}

/// A stand-in text tower's class embeddings (`[classes, 5]`, the same for
/// every call) for the methods that read class texts.
fn give_class_texts(model: &Model, methods: &mut [Box<dyn Method>]) {
    let classes = model.num_classes();
    let texts = (Tensor::arange(classes * 5, (Kind::Float, Device::Cpu)).view([classes, 5]) * 0.7).sin();
    for m in methods.iter_mut().filter(|m| m.reads_class_text()) {
        m.set_class_text(&texts).unwrap();
    }
}

/// Makes zero-initialised method parameters non-zero, so merge checks see a
/// real update. In name order ([`method_variables`] sorts): a `HashMap`'s
/// order would change the draws. Persistent state (no gradient) is left alone.
fn perturb(methods: &[Box<dyn Method>]) {
    tch::no_grad(|| {
        for (_, mut t) in method_variables(methods).into_iter().filter(|(_, t)| t.requires_grad()) {
            let _ = t.g_add_(&(t.randn_like() * 0.1));
        }
    });
}

/// Configurations beyond each method's default that the table checks too
/// (entries of methods not registered are skipped).
const MORE_CONFIGS: &[&str] = &[
    "method = \"lora\"\nrank = 2\nalpha = 4.0\ntargets = [\"re:.*(query|qkv|fc1|_project_conv|conv)$\"]",
    "method = \"lora\"\nuse_dora = true",
    "method = \"lora\"\nrslora = true\nrank = 4",
    // Every toy has a block 1 (`encoder.layer.1`, `blocks.1`, `_blocks.1`, `features.1`).
    "method = \"lora\"\nrank_pattern = { \"re:.*1.*\" = 2 }",
    "method = \"full_finetune\"\nfreeze_stem = true",
    "method = \"bitfit\"\nquery_and_mlp_only = true",
    "method = \"ln_tuning\"\nscale = false",
    "method = \"partial_k\"\nk = 1\nneck = false",
    "method = \"vqt\"\ntokens = 1\nmean_over_tokens = true",
    "method = \"vpt\"\nmode = \"deep\"",
    "method = \"prefix_tuning\"\nreparameterize = false",
    "method = \"fact\"\nkind = \"tk\"",
    "method = \"adapter\"\nat = [\"mlp\"]",
    "method = \"sparse_adapter\"\ncriterion = \"magnitude\"",
    "method = \"sparse_ft\"\nselection = \"random\"",
    "method = \"ssf\"\ninit_std = 0.1",
    "method = \"ncm\"\nmetric = \"cosine\"",
    // The head trains in the step, then the means replace its logits.
    "method = \"ncm\"\ntrain_head = true",
    "method = \"simpleshot\"\ncenter = false",
    KNN_INVERSE_DISTANCE,
    // Global pooling, a head that trains in the step before Head2Toe's replaces it.
    "method = \"head2toe\"\ntarget_size = 0\nkeep_fraction = 0.5\ntrain_head = true",
    "method = \"spectral_norm\"\nhead = true",
    "method = \"spectral_norm\"\nmode = \"penalty\"\nhead = true",
    "method = \"delta\"\nattention = false",
    "method = \"lwf\"\nwarmup = false\nunfreeze = false",
    "method = \"lp_ft\"\nunfreeze = false",
    "method = \"tpgm\"\nnorm = \"l2\"\npost_hoc = true\niters = 3",
    "method = \"ftp\"\nk = 0.5",
    "method = \"fitnet\"\nstudent = \"last\"\nteacher = \"last\"",
    "method = \"kd_logits\"\ntemperature = 2.0\nweight = 1.0",
];

/// kNN with inverse-distance votes: in the table's runs every query is also
/// a training example, at distance ~0 of itself in fp32 (weight 1e12, a vote
/// share of 1) but 2⁻⁸·‖x‖ away in bf16, where its neighbours get a say again.
const KNN_INVERSE_DISTANCE: &str = "method = \"knn\"\nk = 3\nmetric = \"euclidean\"\nweighting = \"distance\"";

/// Configurations whose logits are not a smooth function of the features, so
/// bf16 cannot keep them within its rounding of fp32's (see each entry): their
/// bf16 logits are checked for what the method promises of any logits instead.
const BF16_NOT_SMOOTH: &[&str] = &[KNN_INVERSE_DISTANCE];

/// Every registered method with its default configuration, then the extra ones.
fn specs() -> Vec<toml::Table> {
    let r = registry();
    let names = r.names();
    let mut specs: Vec<toml::Table> = names.iter().map(|n| toml::from_str(&format!("method = \"{n}\"")).unwrap()).collect();
    for text in MORE_CONFIGS {
        let spec: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        if names.iter().any(|n| Some(n.as_str()) == spec["method"].as_str()) {
            specs.push(spec);
        }
    }
    specs
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// bf16 inference of a prepared model gives fp32 logits within a few bf16
/// rounding steps (2⁻⁸ relative) of the fp32 ones.
fn check_bf16(at: &str, spec: &toml::Table, model: &Model, methods: &[Box<dyn Method>], data: &Split) {
    let fp32 = logits(model, methods, data);
    let bf16 = predict(model, methods, &data.input, 64, Compute::Bf16).unwrap();
    assert_eq!(bf16.kind(), Kind::Float, "{at}: logits are fp32 whatever the compute");
    if BF16_NOT_SMOOTH.iter().any(|text| toml::from_str::<toml::Table>(text).unwrap() == *spec) {
        // Vote shares: non-negative, one per class, summing to 1 per example.
        assert_eq!(bf16.size(), fp32.size(), "{at}");
        assert!(max_diff(&bf16, &fp32) > 0.0, "{at}: bf16 logits equal the fp32 ones: the layers did not compute in bf16");
        let rows = bf16.sum_dim_intlist(1, false, Kind::Float);
        assert!(bf16.ge(0.0).all().int64_value(&[]) == 1 && rows.allclose(&rows.ones_like(), 1e-5, 1e-5, false), "{at}: bf16 votes {bf16}");
        return;
    }
    let scale = fp32.abs().max().double_value(&[]).max(1.0);
    let d = max_diff(&bf16, &fp32);
    assert!(d > 0.0, "{at}: bf16 logits equal the fp32 ones: the layers did not compute in bf16");
    assert!(d < 0.05 * scale, "{at}: bf16 logits differ from fp32 by {d} (scale {scale})");
}

#[test]
fn every_method_passes_the_conformance_checks() {
    let _rng = crate::rng_lock();
    let specs = specs();
    assert!(specs.len() >= 3, "{specs:?}");
    let mut applies: HashMap<String, usize> = HashMap::new();
    for (spec, toy) in specs.iter().flat_map(|s| TOYS.into_iter().map(move |t| (s, t))) {
        let name = spec["method"].as_str().unwrap().to_string();
        let data = toy_batch(toy);
        let at = format!("{spec} on {toy:?}").replace('\n', ", ");
        // 0. A method that does not apply to a backbone says so, naming both.
        let (model, methods) = match try_prepared(toy, spec, 1) {
            Ok(prepared) => prepared,
            Err(e) => {
                let arch = toy_model(toy, 1).backbone.arch().to_string();
                let msg = e.to_string();
                assert!(msg.contains(&name) && msg.contains(&arch), "{at}: the refusal must name the method and the backbone: {msg}");
                continue;
            }
        };
        *applies.entry(name.clone()).or_default() += 1;

        // 1. Unchanged output at initialisation where promised.
        let plain = logits(&toy_model(toy, 1), &[], &data);
        if methods[0].identity_at_init() {
            let d = max_diff(&logits(&model, &methods, &data), &plain);
            assert!(d < 1e-6, "{at}: output changed at init by {d}");
        }

        // 2. A method whose own parameters change the output says it alters the
        //    forward pass (otherwise it would silently train on cached features).
        {
            let (model, methods) = try_prepared(toy, spec, 1).unwrap();
            let before = logits(&model, &methods, &data);
            perturb(&methods);
            let d = max_diff(&logits(&model, &methods, &data), &before);
            // Unless they act only on the pooled features, as a head does (contrastive heads):
            // then the output through the cached features must be the output.
            if d > 1e-6 && !methods[0].alters_forward() {
                let pooled = train::features(&model, &methods, &data.input, 64).unwrap();
                let cached = predict(&model, &methods, &Input::Features(pooled), 64, Compute::Fp32).unwrap();
                let off = max_diff(&cached, &logits(&model, &methods, &data));
                assert!(
                    off < 1e-5,
                    "{at}: perturbing its parameters moved the output by {d}, but alters_forward() is false and cached features give other logits (by {off})"
                );
            }
        }

        // 3. After a step only what the artifact holds moved (trainable parameters,
        //    persistent state, and the BatchNorm statistics of layers that train), and something did.
        let (model, mut methods) = (model, methods);
        let before = snapshot(&model, &methods);
        let trains: Vec<String> = train::artifact(&model, &methods).into_iter().map(|(n, _)| n).collect();
        let cfg = TrainConfig { max_steps: 1, batch_size: 12, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        // Methods that choose on validation (WiSE-FT, TPGM) see the batch again as their validation split.
        let teacher = toy_teacher(toy, &methods);
        let opts = TrainOptions { teacher: teacher.as_ref(), ..Default::default() };
        train::train(&model, &mut methods, &data, Some(&data), &cfg, &opts).unwrap();
        let after = snapshot(&model, &methods);
        let mut moved = 0;
        for (n, t) in &before {
            // A method may drop variables at the end of training (diff pruning keeps
            // only the entries its final cut kept); the model's never vanish.
            let Some(a) = after.get(n) else {
                assert!(n.contains('/'), "{at}: model variable {n} vanished");
                continue;
            };
            let changed = !t.equal(a);
            assert!(!changed || trains.contains(n), "{at}: frozen parameter {n} changed");
            moved += changed as usize;
        }
        assert!(moved > 0, "{at}: nothing changed after a training step");

        // 4. Merged ≈ unmerged, and unmerge restores the weights.
        if methods[0].can_merge() {
            let (model, mut methods) = try_prepared(toy, spec, 1).unwrap();
            perturb(&methods);
            let weights = snapshot(&model, &[]);
            let unmerged = logits(&model, &methods, &data);
            methods[0].merge(&model).unwrap();
            let merged = logits(&model, &methods, &data);
            let d = max_diff(&merged, &unmerged);
            assert!(d < 1e-4, "{at}: merged differs from unmerged by {d}");
            methods[0].unmerge(&model).unwrap();
            for (n, t) in snapshot(&model, &[]) {
                assert!(t.allclose(&weights[&n], 1e-5, 1e-6, false), "{at}: unmerge did not restore {n}");
            }
        }

        // 5. Saving the artifact (trained parameters and persistent state) and
        //    restoring it into a fresh model (different random init) gives the same outputs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifact.safetensors");
        perturb(&methods);
        zhijian::core::save_atomic(&train::artifact(&model, &methods), &path).unwrap();
        let trained = logits(&model, &methods, &data);
        let (fresh, fresh_methods) = try_prepared(toy, spec, 1).unwrap();
        restore(&fresh, &fresh_methods, &path).unwrap();
        let d = max_diff(&logits(&fresh, &fresh_methods, &data), &trained);
        assert!(d < 1e-6, "{at}: save → restore changed outputs by {d}");

        // 6. Padding: on BERT, an example's logits are the same in a padded batch
        //    and alone (catches prompt, prefix and observer mask bugs).
        if let (Toy::Bert, Input::Tokens { ids, mask }) = (toy, &data.input) {
            let all = logits(&model, &methods, &data);
            // The first 4 examples have 6 real tokens and 4 of padding.
            let alone = Input::Tokens { ids: ids.narrow(0, 0, 1).narrow(1, 0, 6), mask: mask.narrow(0, 0, 1).narrow(1, 0, 6) };
            let d = max_diff(&predict(&model, &methods, &alone, 1, Compute::Fp32).unwrap(), &all.narrow(0, 0, 1));
            assert!(d < 1e-4, "{at}: padding changed an example's logits by {d}");
        }

        // 7. Config round-trip.
        let mut round = methods[0].config();
        round.insert("method".into(), toml::Value::String(name.clone()));
        assert_eq!(registry().build(&round).unwrap().config(), methods[0].config(), "{at}: config round-trip");

        // 8. bf16 compute: fp32 logits within bf16's rounding of the fp32 ones,
        //    and a bf16 training step keeps fp32 parameters, finite, that moved.
        check_bf16(&at, spec, &model, &methods, &data);
        let (model, mut methods) = try_prepared(toy, spec, 1).unwrap();
        let before = snapshot(&model, &methods);
        let cfg = TrainConfig { max_steps: 1, batch_size: 12, lr: 1e-2, warmup_ratio: 0.0, precision: Precision::Bf16, ..Default::default() };
        let report = train::train(&model, &mut methods, &data, Some(&data), &cfg, &opts).unwrap();
        assert_eq!(report.compute, Compute::Bf16);
        assert!(report.final_loss.is_finite(), "{at}: bf16 loss {}", report.final_loss);
        let after = snapshot(&model, &methods);
        let moved = before.iter().filter(|(n, t)| after.get(*n).is_some_and(|a| !a.equal(t))).count();
        assert!(moved > 0, "{at}: nothing changed after a bf16 training step");
        for (n, t) in &after {
            assert!(t.kind() != Kind::BFloat16, "{at}: {n} became bf16: master weights stay in their kind");
        }
    }
    for name in registry().names() {
        assert!(applies.get(&name).copied().unwrap_or(0) > 0, "{name} applies to none of the toy backbones");
    }
}

/// Every Tuner-stage method regularises full fine-tuning on every toy
/// family: two steps of `[full_finetune, method]` train, with a finite loss,
/// and move the backbone (unless WiSE-FT chose the pre-trained end).
#[test]
fn every_tuner_method_combines_with_full_fine_tuning() {
    let _rng = crate::rng_lock();
    let r = registry();
    let tuners: Vec<&str> = r.entries().filter(|e| e.stage == zhijian::core::Stage::Tuner).map(|e| e.name).collect();
    assert!(tuners.len() >= 10, "{tuners:?}");
    for (name, toy) in tuners.iter().flat_map(|n| TOYS.into_iter().map(move |t| (*n, t))) {
        let model = toy_model(toy, 1);
        let spec = |n: &str| toml::from_str::<toml::Table>(&format!("method = \"{n}\"")).unwrap();
        let mut methods = vec![r.build(&spec("full_finetune")).unwrap(), r.build(&spec(name)).unwrap()];
        if train::prepare(&model, &mut methods, 0).is_err() {
            continue; // A method that does not apply to this backbone (the conformance table checks the refusal).
        }
        let data = toy_batch(toy);
        let teacher = toy_teacher(toy, &methods);
        let before = snapshot(&model, &[]);
        let cfg = TrainConfig { max_steps: 2, batch_size: 6, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        let opts = TrainOptions { teacher: teacher.as_ref(), ..Default::default() };
        let report = train::train(&model, &mut methods, &data, Some(&data), &cfg, &opts).unwrap_or_else(|e| panic!("{name} on {toy:?}: {e}"));
        assert!(report.final_loss.is_finite(), "{name} on {toy:?}: loss {}", report.final_loss);
        let moved = snapshot(&model, &[]).iter().filter(|(n, t)| !n.starts_with("head") && !t.equal(&before[*n])).count();
        // WiSE-FT may choose α = 0 on validation: the pre-trained backbone, unmoved by design.
        let chose_start = report.summaries.get(name).and_then(|s| s.get("alpha")).and_then(toml::Value::as_float) == Some(0.0);
        assert!(moved > 0 || chose_start, "{name} on {toy:?}: the backbone did not move");
    }
}

/// Every parameter of a Linear, convolution or norm layer of every backbone is
/// reachable as a hook site, so no backbone can hide a layer from the methods.
#[test]
fn every_layer_parameter_is_reachable_as_a_site() {
    let _rng = crate::rng_lock();
    for toy in TOYS {
        let model = toy_model(toy, 0);
        let sites: Vec<String> = model.sites().into_iter().map(|s| s.path).collect();
        for name in model.vs.variables().keys() {
            // Embedding tables, class tokens and position embeddings are not layers.
            if name.contains("embeddings.") && !name.contains("LayerNorm") || name == "cls_token" || name == "pos_embed" {
                continue;
            }
            let layer = &name[..name.rfind('.').unwrap_or(0)];
            assert!(sites.iter().any(|s| s == layer), "{toy:?}: {name} belongs to no site; sites: {sites:?}");
        }
        // Block indices come with the sites of blocks.
        assert!(model.sites().iter().any(|s| s.block == Some(0)), "{toy:?}: no site knows its block");
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
    let features = train::cache_features(&cached, &data, 64, Compute::Fp32, "test").unwrap();
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
        let row = predict(&model, &[], &one, 1, Compute::Fp32).unwrap();
        assert!(row.allclose(&all.narrow(0, i, 1), 1e-5, 1e-6, false), "row {i} moved");
    }
    assert!(predict(&model, &[], &data.input, 5, Compute::Fp32).unwrap().allclose(&all, 1e-5, 1e-6, false));
}

#[test]
fn checkpoint_after_each_epoch_restores_the_trained_state() {
    let _rng = crate::rng_lock();
    let data = batch();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt/lora.safetensors");
    let (model, mut methods) = prepared("lora", 2);
    let cfg = TrainConfig { epochs: 2, batch_size: 6, lr: 1e-2, ..Default::default() };
    let opts = TrainOptions { label: "ckpt".into(), checkpoint: Some(path.clone()), ..Default::default() };
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

/// Frozen blocks below the first trainable one run once: partial-k and LoRA on
/// the top block resume from block 1, and training from the cached states takes
/// the same steps as training through every block (no dropout, so the frozen
/// block computes the same in both).
#[test]
fn training_from_a_cached_prefix_matches_recomputing_it() {
    let _rng = crate::rng_lock();
    let data = batch();
    let spec = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
    let prepare = |text: &str| {
        let model = tiny_model_with_dropout(3, 0.0);
        let mut methods = vec![registry().build(&spec(text)).unwrap()];
        train::prepare(&model, &mut methods, 0).unwrap();
        (model, methods)
    };
    for (text, want) in [
        ("method = \"partial_k\"\nk = 1", Some(1)),
        ("method = \"lora\"\ntargets = [\"re:encoder\\\\.layer\\\\.1\\\\..*(query|value)\"]", Some(1)),
        ("method = \"adapter\"\nblocks = \"1..\"", Some(1)),
        ("method = \"ia3\"\ntargets = [\"encoder.layer.1.output.dense\"]", Some(1)),
        ("method = \"lora\"", None),
        ("method = \"vpt\"", None),
        ("method = \"full_finetune\"", None),
        ("method = \"linear_probe\"", None),
    ] {
        let (model, methods) = prepare(text);
        assert_eq!(train::frozen_prefix(&model, &methods), want, "{text}");
        let Some(block) = want else { continue };
        let cfg = TrainConfig { max_steps: 2, batch_size: 6, lr: 1e-2, ..Default::default() };
        let (direct, mut m1) = prepare(text);
        train::train(&direct, &mut m1, &data, None, &cfg, &TrainOptions::default()).unwrap();
        let (cached, mut m2) = prepare(text);
        let hidden = train::cache_prefix(&cached, &m2, &data, block, 5, "test").unwrap().expect("bert resumes from a block");
        assert!(matches!(hidden.input, Input::Hidden { block: 1, .. }));
        train::train(&cached, &mut m2, &hidden, None, &cfg, &TrainOptions::default()).unwrap();
        let (a, b) = (snapshot(&direct, &m1), snapshot(&cached, &m2));
        for (n, t) in &a {
            assert!(t.allclose(&b[n], 1e-5, 1e-6, false), "{text}: {n} differs between cached and recomputed prefix");
        }
        // Evaluation on cached states gives the logits of the full model.
        let d = max_diff(&logits(&cached, &m2, &hidden), &logits(&cached, &m2, &data));
        assert!(d < 1e-5, "{text}: logits from the cached prefix differ by {d}");
    }
}

/// Frozen weights get no gradient: after a training pass's backward, no frozen
/// model variable has one (autograd computed only input gradients through
/// them), and nothing before the first trainable site builds a graph — the
/// states leaving a frozen block need no gradient.
#[test]
fn frozen_layers_compute_no_weight_gradients() {
    let _rng = crate::rng_lock();
    let data = batch();
    let spec = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
    // (method, the last block whose output needs no gradient, if any)
    for (text, frozen_through) in [
        ("method = \"linear_probe\"", Some(1)),
        ("method = \"lora\"\ntargets = [\"re:encoder\\\\.layer\\\\.1\\\\..*(query|value)\"]", Some(0)),
        ("method = \"adapter\"\nblocks = \"1..\"", Some(0)),
        ("method = \"lora\"", None),
        ("method = \"adapter\"", None),
    ] {
        for compute in [Compute::Fp32, Compute::Bf16] {
            let model = tiny_model_with_dropout(3, 0.0);
            let mut methods = vec![registry().build(&spec(text)).unwrap()];
            train::prepare(&model, &mut methods, 0).unwrap();
            let cx = zhijian::core::Ctx::new(true, &methods, vec![zhijian::core::Tap::Block(0), zhijian::core::Tap::Block(1)]).with_compute(compute);
            let logits = model.forward(&cx, &data.input);
            let taps = cx.take_taps();
            logits.cross_entropy_for_logits(&data.labels).backward();
            for (name, t) in model.vs.variables() {
                assert_eq!(t.grad().defined(), t.requires_grad(), "{text} {compute:?}: {name} (trains: {})", t.requires_grad());
            }
            for block in 0..2 {
                let needs = taps[&zhijian::core::Tap::Block(block)].requires_grad();
                assert_eq!(needs, frozen_through.is_none_or(|last| block > last), "{text} {compute:?}: block {block}'s output needs a gradient: {needs}");
            }
        }
    }
}
