//! Model soups (Wortsman et al., "Model soups: averaging weights of multiple
//! fine-tuned models improves accuracy without increasing inference time",
//! ICML 2022, <https://arxiv.org/abs/2203.05482>): fine-tunes of one
//! pre-trained model, averaged in weight space.
//!
//! - uniform: the mean of every ingredient.
//! - greedy (the paper's Recipe 1): ingredients sorted by held-out accuracy,
//!   best first; each is kept only if adding it to the soup does not lower the
//!   held-out accuracy of the soup (ties kept, as in the reference `>=`).

use tch::Tensor;
use zhijian_core::Result;

use super::{Weights, combine};

/// The element-wise mean of `models`.
pub fn uniform(models: &[&Weights]) -> Weights {
    let n = models.len() as f64;
    combine(models, |ts| sum(ts) / n)
}

/// The sum of same-shaped tensors.
pub(crate) fn sum(ts: &[&Tensor]) -> Tensor {
    ts[1..].iter().fold(ts[0].copy(), |acc, t| acc + *t)
}

/// What the greedy soup chose: ingredients (indices into `models`, in the
/// order tried) and the held-out score of each, alone and of the soup after
/// each try.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GreedyTrace {
    /// Each model's held-out score alone.
    pub alone: Vec<f64>,
    /// Indices of the models in the soup, in the order they were added.
    pub kept: Vec<usize>,
    /// The soup's held-out score after each model was tried (sorted order).
    pub soup: Vec<f64>,
}

/// Greedy soup over `models`, scored by `score` (higher is better, e.g.
/// validation accuracy).
pub fn greedy(models: &[&Weights], mut score: impl FnMut(&Weights) -> Result<f64>) -> Result<(Weights, GreedyTrace)> {
    let alone = models.iter().map(|m| score(m)).collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..models.len()).collect();
    // Best first; the sort is stable, so equal scores keep the models' order.
    order.sort_by(|&a, &b| alone[b].total_cmp(&alone[a]));
    let mut kept = vec![order[0]];
    let mut best = alone[order[0]];
    let mut soup_scores = vec![best];
    let mut soup = uniform(&[models[order[0]]]);
    for &i in &order[1..] {
        let trial: Vec<&Weights> = kept.iter().chain([&i]).map(|&k| models[k]).collect();
        let candidate = uniform(&trial);
        let s = score(&candidate)?;
        soup_scores.push(s);
        if s >= best {
            kept.push(i);
            best = s;
            soup = candidate;
        }
    }
    Ok((soup, GreedyTrace { alone, kept, soup: soup_scores }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::tests::weights;

    #[test]
    fn uniform_is_the_mean() {
        let a = weights(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
        let b = weights(&[("w", &[3.0, -2.0]), ("b", &[1.0])]);
        let m = uniform(&[&a, &b]);
        assert_eq!(Vec::<f32>::try_from(&m["w"]).unwrap(), [2.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(&m["b"]).unwrap(), [0.5]);
    }

    #[test]
    fn greedy_keeps_only_ingredients_that_do_not_lower_the_score() {
        // Score: minus the distance of w to 1. Alone: a 0, b −1, c −3 (order a, b, c).
        // a+b → w = 1.5, −0.5: dropped. a+c → w = −0.5, −1.5: dropped.
        let a = weights(&[("w", &[1.0])]);
        let b = weights(&[("w", &[2.0])]);
        let c = weights(&[("w", &[-2.0])]);
        let score = |w: &Weights| Ok(-(f64::try_from(&w["w"].sum(tch::Kind::Double)).unwrap() - 1.0).abs());
        let (soup, trace) = greedy(&[&c, &a, &b], score).unwrap();
        assert_eq!(trace.alone, [-3.0, 0.0, -1.0]);
        assert_eq!(trace.kept, [1]);
        assert_eq!(trace.soup, [0.0, -0.5, -1.5]);
        assert_eq!(Vec::<f32>::try_from(&soup["w"]).unwrap(), [1.0]);
        // b at 0.5 and c at 1.5: together they are 1, better than b alone.
        let b = weights(&[("w", &[0.5])]);
        let c = weights(&[("w", &[1.5])]);
        let (soup, trace) = greedy(&[&b, &c], score).unwrap();
        assert_eq!(trace.kept, [0, 1]);
        assert_eq!(Vec::<f32>::try_from(&soup["w"]).unwrap(), [1.0]);
    }
}
