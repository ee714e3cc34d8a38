//! Classification metrics and the process's peak memory.

use serde::Serialize;
use tch::{Kind, Tensor};

/// Correct predictions at top-1 and top-5 over `n` examples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Accuracy {
    /// Examples with the true class ranked first.
    pub correct1: i64,
    /// Examples with the true class among the five highest (all, with ≤ 5 classes).
    pub correct5: i64,
    /// Examples.
    pub n: i64,
}

impl Accuracy {
    /// Counts from logits `[n, classes]` and labels `[n]`.
    pub fn from_logits(logits: &Tensor, labels: &Tensor) -> Accuracy {
        let labels = labels.to_device(logits.device()).unsqueeze(1);
        let k = logits.size()[1].min(5);
        let (_, top) = logits.topk(k, 1, true, true);
        let hits = top.eq_tensor(&labels);
        let correct1 = hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
        let correct5 = hits.sum(Kind::Int64).int64_value(&[]);
        Accuracy { correct1, correct5, n: logits.size()[0] }
    }

    /// Top-1 accuracy in [0, 1].
    pub fn top1(&self) -> f64 {
        self.correct1 as f64 / self.n.max(1) as f64
    }

    /// Top-5 accuracy in [0, 1].
    pub fn top5(&self) -> f64 {
        self.correct5 as f64 / self.n.max(1) as f64
    }
}

/// Peak resident set size of this process in bytes (`VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5), so each run
/// of a comparison reports its own peak. Returns false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_and_top5() {
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, // predicts 1
            0.9, 0.1, 0.0, 0.0, 0.0, 0.0, // predicts 0
            0.0, 0.0, 0.0, 0.0, 0.0, 1.0, // 5th-ranked class 0 (ties resolve by index)
        ])
        .reshape([3, 6]);
        let labels = Tensor::from_slice(&[1i64, 1, 4]);
        let acc = Accuracy::from_logits(&logits, &labels);
        assert_eq!(acc.correct1, 1);
        assert_eq!(acc.correct5, 3);
        assert!((acc.top1() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn peak_rss_is_readable_on_linux() {
        assert!(peak_rss_bytes().unwrap() > 1 << 20);
    }
}
