//! Loads and tokenises Rotten Tomatoes, timing each step, and prints length stats.
//!
//! ```text
//! cargo run --release -p zhijian-data --example rt_stats -- \
//!     ~/.cache/zhijian/assets/rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2 \
//!     ~/.cache/zhijian/assets/all-minilm-l6-v2/tokenizer.json [max_len=128]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use zhijian_data::rotten_tomatoes::rotten_tomatoes_with_report;
use zhijian_data::{TextTask, TextTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (csv, tok_json) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let max_len: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let cache = std::env::temp_dir().join(format!("zhijian-rt-stats-{}", std::process::id()));

    let t = Instant::now();
    let (data, report) = rotten_tomatoes_with_report(&csv)?;
    println!("load: {:.3}s  {report:?}  counts {:?} {:?}", t.elapsed().as_secs_f64(), data.classes, data.class_counts());

    let tok = TextTokenizer::from_file(&tok_json, max_len)?;
    let t = Instant::now();
    let plain = tok.encode(&data.texts)?;
    println!("encode (no cache): {:.3}s  shape {:?}", t.elapsed().as_secs_f64(), plain.ids.size());
    for label in ["cold", "cached"] {
        let t = Instant::now();
        let _ = tok.encode_cached(&data.texts, &cache)?;
        println!("encode_cached ({label}): {:.3}s", t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let (data2, _) = rotten_tomatoes_with_report(&csv)?;
    let splits = TextTask { cache_dir: Some(cache.clone()), ..TextTask::default() }.build(&data2, &tok)?;
    println!(
        "load + TextTask::build (cached): {:.3}s  train/val/test {}/{}/{}",
        t.elapsed().as_secs_f64(),
        splits.train.len(),
        splits.val.len(),
        splits.test.len()
    );

    // Lengths without truncation, to see what max_len cuts.
    let full = TextTokenizer::from_file(&tok_json, 100_000)?;
    let mut lens: Vec<i64> = Vec::try_from(full.encode(&data.texts)?.lengths())?;
    lens.sort_unstable();
    let n = lens.len();
    let mean = lens.iter().sum::<i64>() as f64 / n as f64;
    let pct = |p: f64| lens[((n - 1) as f64 * p).round() as usize];
    println!(
        "tokens per review incl. [CLS]/[SEP]: mean {mean:.1}, min {}, median {}, p95 {}, p99 {}, max {}; over {max_len}: {}",
        lens[0],
        pct(0.5),
        pct(0.95),
        pct(0.99),
        lens[n - 1],
        lens.iter().filter(|&&l| l > max_len as i64).count()
    );
    std::fs::remove_dir_all(&cache).ok();
    Ok(())
}
