//! The comparison table: one row per strategy, mean ± std over seeds.

use crate::record::Record;

/// Mean and sample standard deviation (0 for one value).
pub(crate) fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

fn pm(xs: &[f64], scale: f64, digits: usize) -> String {
    let (m, s) = mean_std(xs);
    if xs.len() > 1 { format!("{:.digits$} ± {:.digits$}", m * scale, s * scale) } else { format!("{:.digits$}", m * scale) }
}

/// Human-readable count: 22.7M, 4.6k.
pub fn human_count(n: i64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Human-readable bytes: 1.2 GiB, 35.0 KiB.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[u]) }
}

/// Mean ± std of a figure older records may lack (`n/a` if every run lacks it).
fn optional(runs: &[&Record], f: impl Fn(&Record) -> Option<f64>, digits: usize) -> String {
    let xs: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
    if xs.is_empty() { "n/a".into() } else { pm(&xs, 1.0, digits) }
}

/// A markdown table of `records`, one row per strategy in first-seen order
/// (`name (bf16)` when it trained in bf16). Train time includes computing
/// cached features; a samples/s figure marked † is the head's throughput on
/// those features, not comparable to whole-model rates.
pub fn markdown(records: &[Record]) -> String {
    let mut order: Vec<&str> = Vec::new();
    for r in records {
        if !order.contains(&r.strategy.as_str()) {
            order.push(&r.strategy);
        }
    }
    // One column per out-of-distribution split, in first-seen order.
    let mut shifts: Vec<&str> = Vec::new();
    for score in records.iter().flat_map(|r| &r.ood) {
        if !shifts.contains(&score.split.as_str()) {
            shifts.push(&score.split);
        }
    }
    let mut ood_header: String = shifts.iter().map(|s| format!(" {s} top-1 (%) |")).collect();
    // Forgetting, where runs scored the backbone's source task.
    let source_task = records.iter().find_map(|r| r.source.as_ref().map(|s| s.task.clone()));
    if let Some(task) = &source_task {
        ood_header.push_str(&format!(" forgetting on {task} (points) |"));
    }
    let extra_columns = shifts.len() + usize::from(source_task.is_some());
    let mut out = format!(
        "| strategy | seeds | trainable / total params | test top-1 (%) |{ood_header} train time (s) | samples/s | latency b=1 (ms) | inference/s | peak RSS | artifact |\n\
         |---|---|---|---|{}---|---|---|---|---|---|\n",
        "---|".repeat(extra_columns)
    );
    let failures: Vec<&Record> = records.iter().filter(|r| !r.finished()).collect();
    for name in order {
        let all_runs: Vec<&Record> = records.iter().filter(|r| r.strategy == name).collect();
        let runs: Vec<&Record> = all_runs.iter().copied().filter(|r| r.finished()).collect();
        let failed = all_runs.len() - runs.len();
        let seeds = if failed == 0 { runs.len().to_string() } else { format!("{} + {failed} failed", runs.len()) };
        if runs.is_empty() {
            // Every run of the strategy failed: no figure to show, and none shown.
            let first = all_runs[0];
            let reason = first.failed.as_deref().unwrap_or_default().split(';').next().unwrap_or_default();
            out.push_str(&format!(
                "| {name} | {seeds} | {} / {} | failed: {reason} |{} n/a | n/a | n/a | n/a | n/a | n/a |\n",
                human_count(first.trainable_params),
                human_count(first.total_params),
                " n/a |".repeat(extra_columns)
            ));
            continue;
        }
        let col = |f: &dyn Fn(&Record) -> f64| runs.iter().map(|r| f(r)).collect::<Vec<f64>>();
        let first = runs[0];
        let peak = runs.iter().filter_map(|r| r.peak_rss_bytes).max();
        let mut ood: String = shifts
            .iter()
            .map(|s| {
                let scores: Vec<f64> = runs.iter().filter_map(|r| r.ood.iter().find(|o| o.split == *s)).map(|o| o.top1).collect();
                if scores.is_empty() { " n/a |".to_string() } else { format!(" {} |", pm(&scores, 100.0, 2)) }
            })
            .collect();
        if source_task.is_some() {
            let lost: Vec<f64> = runs.iter().filter_map(|r| r.source.as_ref()).map(|s| s.forgetting()).collect();
            ood.push_str(&if lost.is_empty() { " n/a |".to_string() } else { format!(" {} |", pm(&lost, 1.0, 1)) });
        }
        let precision = if first.compute == Some(zhijian_core::Compute::Bf16) { " (bf16)" } else { "" };
        out.push_str(&format!(
            "| {name}{precision} | {seeds} | {} / {} ({:.2}%) | {} |{ood} {} | {} | {} | {} | {} | {} |\n",
            human_count(first.trainable_params),
            human_count(first.total_params),
            100.0 * first.trainable_params as f64 / first.total_params.max(1) as f64,
            pm(&col(&|r| r.test_top1), 100.0, 2),
            pm(&col(&|r| r.feature_seconds + r.train_seconds), 1.0, 1),
            samples_per_s(&runs),
            optional(&runs, |r| r.latency_ms, 1),
            optional(&runs, |r| r.inference_per_s, 0),
            peak.map_or("n/a".into(), human_bytes),
            human_bytes(first.artifact_bytes),
        ));
    }
    if !failures.is_empty() {
        out.push_str("\nFailed runs (recorded, never averaged in):\n");
        for r in failures {
            out.push_str(&format!("- {} seed {}: {}\n", r.strategy, r.seed, r.failed.as_deref().unwrap_or_default()));
        }
    }
    if records.iter().any(|r| r.cached_features && r.steps > 0) {
        out.push_str("\n† head trained on cached features of the frozen backbone: train time includes computing them; samples/s is the head's alone.\n");
    }
    let merged = |r: &Record| r.summaries.contains_key("merge");
    if records.iter().any(|r| r.finished() && r.steps == 0 && !merged(r)) {
        out.push_str("\n‡ no gradient step: fitted on the training split's features (class means, neighbours); train time is the fit.\n");
    }
    if records.iter().any(|r| r.finished() && merged(r)) {
        out.push_str(
            "\n‡ made from recorded runs (`[[merge]]`: merged in weight space, or ensembled in output space), no gradient step through a backbone: train time is the merge's (an ensemble's: its models' passes and the combination).\n",
        );
    }
    out
}

/// The training rate of a strategy's runs: † when a head trained on cached
/// features, ‡ (no rate) when they took no step and only fitted.
fn samples_per_s(runs: &[&Record]) -> String {
    if runs.iter().all(|r| r.steps == 0) {
        return "— ‡".into();
    }
    let rates: Vec<f64> = runs.iter().map(|r| r.train_samples_per_s).collect();
    pm(&rates, 1.0, 0) + if runs[0].cached_features { " †" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Record, SplitScore, sample};
    use crate::source::SourceScore;

    /// A strategy that only fits (NCM, kNN) has no training rate, and its
    /// footnote says so; the cached-features footnote is for heads that stepped.
    #[test]
    fn fitted_strategies_show_no_rate() {
        let ncm = Record { cached_features: true, steps: 0, train_samples_per_s: 0.0, ..sample("ncm", 0, 0.8) };
        let t = markdown(&[ncm.clone(), Record { seed: 1, ..ncm }]);
        let row = t.lines().find(|l| l.starts_with("| ncm ")).unwrap();
        assert!(row.contains("| — ‡ |") && !t.contains('†'), "{t}");
        assert!(t.contains("\n‡ no gradient step"), "{t}");
    }

    #[test]
    fn rows_aggregate_seeds() {
        let probe = Record { cached_features: true, ..sample("probe", 0, 0.70) };
        let bf16 = Record { compute: Some(zhijian_core::Compute::Bf16), ..sample("full", 0, 0.9) };
        let t = markdown(&[sample("lora", 0, 0.80), probe, sample("lora", 1, 0.84), bf16]);
        let rows: Vec<&str> = t.lines().skip(2).take_while(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[2].starts_with("| full (bf16) | 1 |"), "{}", rows[2]);
        assert!(rows[0].starts_with("| lora | 2 | 10 / 100 (10.00%) | 82.00 ± 2.83 |"), "{}", rows[0]);
        assert!(rows[1].starts_with("| probe | 1 |") && rows[1].contains("50 † |"), "{}", rows[1]);
        assert!(t.contains("\n† head trained on cached features"));
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_count(22_700_000), "22.7M");
        // No shifted splits, no shift columns: 10 columns.
        assert_eq!(t.lines().next().unwrap().matches('|').count(), 11);
        assert!(rows[0].contains("| 12.5 ± 0.0 | 400 ± 0 |"), "{}", rows[0]);
        let old = Record { latency_ms: None, inference_per_s: None, ..sample("old", 0, 0.5) };
        assert!(markdown(&[old]).contains("| n/a | n/a |"));
    }

    /// Failed runs show as failed, never as an accuracy, and stay out of the means.
    #[test]
    fn failed_runs_show_as_failed() {
        let failed = |strategy: &str, seed| Record {
            failed: Some(format!("training diverged: loss NaN at step {seed}; lower train.lr or set train.grad_clip")),
            test_top1: f64::NAN,
            train_samples_per_s: f64::NAN,
            ..sample(strategy, seed, 0.0)
        };
        let t = markdown(&[sample("lora", 0, 0.80), failed("lora", 1), failed("hot", 0), sample("lora", 2, 0.84)]);
        let rows: Vec<&str> = t.lines().skip(2).take_while(|l| l.starts_with('|')).collect();
        assert!(rows[0].starts_with("| lora | 2 + 1 failed | 10 / 100 (10.00%) | 82.00 ± 2.83 |"), "{}", rows[0]);
        assert!(rows[1].starts_with("| hot | 0 + 1 failed | 10 / 100 | failed: training diverged: loss NaN at step 0 | n/a |"), "{}", rows[1]);
        assert_eq!(rows[1].matches('|').count(), t.lines().next().unwrap().matches('|').count(), "{t}");
        assert!(!t.contains("NaN ±") && !t.contains("| NaN"), "{t}");
        assert!(t.contains("- lora seed 1: training diverged") && t.contains("- hot seed 0: training diverged"), "{t}");
    }

    #[test]
    fn shifted_splits_get_a_column_each() {
        let score = |split: &str, top1: f64| SplitScore { split: split.into(), top1, top5: None, n: 5 };
        let a = Record { ood: vec![score("optdigits", 0.5), score("noise:3", 0.25)], ..sample("a", 0, 0.9) };
        let b = Record { ood: vec![score("optdigits", 0.7)], ..sample("b", 0, 0.8) };
        let t = markdown(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("| test top-1 (%) | optdigits top-1 (%) | noise:3 top-1 (%) | train time"), "{}", lines[0]);
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert!(lines[2].starts_with("| a | 1 | 10 / 100 (10.00%) | 90.00 | 50.00 | 25.00 |"), "{}", lines[2]);
        assert!(lines[3].starts_with("| b | 1 | 10 / 100 (10.00%) | 80.00 | 70.00 | n/a |"), "{}", lines[3]);
    }

    #[test]
    fn forgetting_gets_a_column_where_a_source_task_was_scored() {
        let source = |after: f64| Some(SourceScore { task: "imagenet".into(), before: 0.85, after, n: 20 });
        let runs = [
            Record { source: source(0.85), ..sample("probe", 0, 0.9) },
            Record { source: source(0.40), ..sample("ft", 0, 0.9) },
            Record { source: source(0.50), ..sample("ft", 1, 0.9) },
        ];
        let t = markdown(&runs);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("| test top-1 (%) | forgetting on imagenet (points) | train time"), "{}", lines[0]);
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert!(lines[2].contains("| 90.00 | 0.0 |"), "{}", lines[2]);
        assert!(lines[3].contains("| 90.00 ± 0.00 | 40.0 ± 7.1 |"), "{}", lines[3]);
        assert!(!markdown(&[sample("a", 0, 0.5)]).contains("forgetting"));
    }
}
