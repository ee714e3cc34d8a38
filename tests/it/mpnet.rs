//! Every Architect method on a tiny MPNet does what it does on the tiny BERT
//! of the conformance table: MPNet is the same blocks under other key names
//! plus a relative position bias, which prompts (VPT, VQT) and prefixes must
//! not disturb. Checked here apart from the conformance table, which runs on
//! the toy BERT only.

use tch::{Device, Kind, Tensor};
use zhijian::backbones::toys;
use zhijian::core::train::{self, Split, TrainConfig, TrainOptions, method_variables, predict};
use zhijian::core::{Compute, Input, Method, Model, Registry};

fn architect() -> Registry {
    let mut r = Registry::new();
    zhijian::architect::register(&mut r);
    r
}

/// 12 sequences of 10 tokens; the first 4 end with 4 padding tokens.
fn batch() -> Split {
    tch::manual_seed(7);
    let ids = Tensor::randint_low(2, 50, [12, 10], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([12, 10], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 6, 4).narrow(0, 0, 4).fill_(0);
    // MPNet pads with id 1.
    let ids = ids.where_self(&mask.gt(0), &ids.ones_like());
    Split { name: "toy".into(), input: Input::Tokens { ids, mask }, labels: Tensor::randint(3, [12], (Kind::Int64, Device::Cpu)) }
}

fn logits(model: &Model, methods: &[Box<dyn Method>], input: &Input, batch_size: i64) -> Tensor {
    predict(model, methods, input, batch_size, Compute::Fp32).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn prepared(toy: fn(i64) -> Model, spec: &toml::Table) -> zhijian::core::Result<(Model, Vec<Box<dyn Method>>)> {
    let model = toy(1);
    let mut methods = vec![architect().build(spec).unwrap()];
    train::prepare(&model, &mut methods, 0)?;
    Ok((model, methods))
}

/// Makes every trainable method parameter non-zero (zero-initialised ones
/// would hide a merge or a mask bug).
fn perturb(methods: &[Box<dyn Method>]) {
    tch::no_grad(|| {
        for (_, mut t) in method_variables(methods).into_iter().filter(|(_, t)| t.requires_grad()) {
            let noise = t.randn_like() * 0.1;
            t += noise;
        }
    });
}

#[test]
fn every_architect_method_works_on_mpnet_as_on_bert() {
    let _rng = crate::rng_lock();
    let data = batch();
    let extra = [
        "method = \"vpt\"\nmode = \"deep\"",
        "method = \"prefix_tuning\"\nreparameterize = false",
        "method = \"vqt\"\ntokens = 1\nmean_over_tokens = true",
        "method = \"lora\"\nuse_dora = true",
        "method = \"fact\"\nkind = \"tk\"",
        "method = \"adapter\"\nat = [\"mlp\"]",
    ];
    let specs: Vec<toml::Table> =
        architect().names().iter().map(|n| format!("method = \"{n}\"")).chain(extra.map(String::from)).map(|text| toml::from_str(&text).unwrap()).collect();
    let plain = logits(&toys::mpnet(1), &[], &data.input, 64);
    let mut checked = 0;
    for spec in &specs {
        let at = format!("{spec}").replace('\n', ", ");
        // 0. A method applies to MPNet exactly when it applies to BERT.
        let on_bert = prepared(toys::bert, spec).map(|_| ());
        let (model, mut methods) = match (prepared(toys::mpnet, spec), on_bert) {
            (Ok(p), Ok(())) => p,
            (Err(_), Err(_)) => continue,
            (mpnet, bert) => panic!("{at}: on MPNet {:?}, on BERT {:?}", mpnet.err(), bert.err()),
        };
        checked += 1;

        // 1. Unchanged output at initialisation where promised.
        if methods[0].identity_at_init() {
            let d = max_diff(&logits(&model, &methods, &data.input, 64), &plain);
            assert!(d < 1e-6, "{at}: output changed at init by {d}");
        }

        // 2. Padding: an example's logits are the same alone and in a padded
        //    batch, perturbed parameters included (prompts, prefixes and observers
        //    sit outside the relative position bias, the key mask inside it).
        perturb(&methods);
        let all = logits(&model, &methods, &data.input, 64);
        let Input::Tokens { ids, mask } = &data.input else { unreachable!() };
        let alone = Input::Tokens { ids: ids.narrow(0, 0, 1).narrow(1, 0, 6), mask: mask.narrow(0, 0, 1).narrow(1, 0, 6) };
        let d = max_diff(&logits(&model, &methods, &alone, 1), &all.narrow(0, 0, 1));
        assert!(d < 1e-4, "{at}: padding changed an example's logits by {d}");

        // 3. Merged ≈ unmerged.
        if methods[0].can_merge() {
            methods[0].merge(&model).unwrap();
            let d = max_diff(&logits(&model, &methods, &data.input, 64), &all);
            assert!(d < 1e-4, "{at}: merged differs from unmerged by {d}");
            methods[0].unmerge(&model).unwrap();
        }

        // 4. bf16 logits within bf16 rounding.
        let bf16 = predict(&model, &methods, &data.input, 64, Compute::Bf16).unwrap();
        let scale = all.abs().max().double_value(&[]).max(1.0);
        assert!(max_diff(&bf16, &all) < 0.05 * scale, "{at}: bf16 logits differ by {}", max_diff(&bf16, &all));

        // 5. A training step: finite loss, and only what the artifact holds moved.
        let (model, mut methods) = prepared(toys::mpnet, spec).unwrap();
        let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let trains: Vec<String> = train::artifact(&model, &methods).into_iter().map(|(n, _)| n).collect();
        let cfg = TrainConfig { max_steps: 1, batch_size: 12, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        let report = train::train(&model, &mut methods, &data, Some(&data), &cfg, &TrainOptions::default()).unwrap();
        assert!(report.final_loss.is_finite(), "{at}: loss {}", report.final_loss);
        let after = model.vs.variables();
        for (n, t) in &before {
            assert!(trains.contains(n) || t.equal(&after[n]), "{at}: frozen parameter {n} changed");
        }
        // Full fine-tuning trains the relative position bias too: its gradient flows through attention.
        if spec["method"].as_str() == Some("full_finetune") {
            let (n, t) = before.iter().find(|(n, _)| n == "encoder.relative_attention_bias.weight").unwrap();
            assert!(!t.equal(&after[n]), "{at}: the relative position bias did not train");
        }
    }
    assert!(checked >= 15, "only {checked} Architect methods apply to MPNet");
}
