//! Times training steps of one method on MiniLM-L6 with random tokens, the
//! same job as `benches/reference/train_step.py` runs in PyTorch:
//! `cargo run --example train_step -- [method] [seq_len] [steps]`.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use zhijian::backbones::{load_pretrained, Bert, BertConfig};
use zhijian::core::train::{self, Split, TrainConfig, TrainOptions};
use zhijian::core::{Input, Model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let method = args.get(1).map_or("full_finetune", String::as_str);
    let seq: i64 = args.get(2).map_or(Ok(50), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let weights = zhijian::assets::locate("all-minilm-l6-v2", "model.safetensors")?;
    let model = Model::new(Device::Cpu, 2, |p| Box::new(Bert::new(p, &BertConfig::minilm_l6()).expect("preset")));
    load_pretrained(&model, &weights)?;
    let mut methods = vec![zhijian::bench::registry().build_default(method)?];
    train::prepare(&model, &mut methods, 0)?;
    tch::manual_seed(0);
    let batch = 32;
    let data = Split {
        name: "random".into(),
        input: Input::Tokens {
            ids: Tensor::randint_low(1000, 30000, [batch, seq], (Kind::Int64, Device::Cpu)),
            mask: Tensor::ones([batch, seq], (Kind::Int64, Device::Cpu)),
        },
        labels: Tensor::randint(2, [batch], (Kind::Int64, Device::Cpu)),
    };
    println!("threads {}", tch::get_num_threads());
    for step in 0..steps {
        let cfg = TrainConfig { max_steps: 1, batch_size: batch, lr: 5e-5, warmup_ratio: 0.0, ..Default::default() };
        let t = Instant::now();
        train::train(&model, &methods, &data, None, &cfg, &TrainOptions::default())?;
        println!("step {step}: {:.3}s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
