//! Deterministic, stratified train / validation / test splits.
//!
//! The shuffles use a self-contained SplitMix64 generator, so a seed gives the
//! same split on every platform and with every version of every dependency
//! (the `rand` crate does not promise stable streams across versions).

use std::collections::BTreeMap;

use zhijian_core::{Error, Result};

/// Row indices of the three parts of a split, each sorted ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitIndices {
    /// Training rows.
    pub train: Vec<usize>,
    /// Validation rows.
    pub val: Vec<usize>,
    /// Test rows.
    pub test: Vec<usize>,
}

pub use zhijian_core::SplitMix64;

/// Splits `total` into parts proportional to `weights` that sum to exactly
/// `total`: floors first, then the leftover units go to the largest fractional
/// parts (ties to the earlier part), so each part is within 1 of its exact share.
fn apportion(total: usize, weights: &[f64]) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut parts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Stable sort keeps ties in part order, so the result is deterministic.
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let left = total - parts.iter().sum::<usize>();
    for &i in order.iter().take(left) {
        parts[i] += 1;
    }
    parts
}

/// Rows of each class, classes in ascending label order, rows in input order.
fn by_class(indices: impl IntoIterator<Item = usize>, labels: &[i64]) -> BTreeMap<i64, Vec<usize>> {
    let mut classes: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for i in indices {
        classes.entry(labels[i]).or_default().push(i);
    }
    classes
}

/// Checks that `fractions` (named `field` in the error) are non-negative and sum to 1.
pub fn check_fractions(field: &str, fractions: [f64; 3]) -> Result<()> {
    if fractions.iter().any(|f| !f.is_finite() || *f < 0.0) || (fractions.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
        return Err(Error::Config(format!("{field} must be non-negative and sum to 1, got {fractions:?}")));
    }
    Ok(())
}

/// Splits rows `0..labels.len()` into train / validation / test with the given
/// `fractions` (non-negative, summing to 1), separately within each class.
///
/// Each class's rows are shuffled with a generator seeded from `seed` and cut
/// into counts apportioned so they add up to the class size, each within 1 of
/// `fraction × class size`. The same labels and seed always give the same split.
pub fn stratified_split(labels: &[i64], fractions: [f64; 3], seed: u64) -> Result<SplitIndices> {
    check_fractions("split fractions", fractions)?;
    let mut rng = SplitMix64::new(seed);
    let mut out = SplitIndices::default();
    for (_, mut rows) in by_class(0..labels.len(), labels) {
        rng.shuffle(&mut rows);
        let counts = apportion(rows.len(), &fractions);
        let (train, rest) = rows.split_at(counts[0]);
        let (val, test) = rest.split_at(counts[1]);
        out.train.extend_from_slice(train);
        out.val.extend_from_slice(val);
        out.test.extend_from_slice(test);
    }
    out.train.sort_unstable();
    out.val.sort_unstable();
    out.test.sort_unstable();
    Ok(out)
}

/// A subset of `n` of `indices` (rows of `labels`) keeping the class proportions:
/// each class gets its share of `n` apportioned as in [`stratified_split`] (so
/// within 1 of exact), drawn at random with `seed`. A class too rare for even
/// one slot can be left out entirely. With `n ≥ indices.len()` every index is kept.
/// The result is sorted ascending.
pub fn subsample_stratified(indices: &[usize], labels: &[i64], n: usize, seed: u64) -> Vec<usize> {
    if n >= indices.len() {
        let mut all = indices.to_vec();
        all.sort_unstable();
        return all;
    }
    let classes = by_class(indices.iter().copied(), labels);
    let sizes: Vec<f64> = classes.values().map(|rows| rows.len() as f64).collect();
    let quotas = apportion(n, &sizes);
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n);
    for ((_, mut rows), quota) in classes.into_iter().zip(quotas) {
        rng.shuffle(&mut rows);
        out.extend_from_slice(&rows[..quota]);
    }
    out.sort_unstable();
    out
}

/// At most `k` of `indices` (rows of `labels`) per class, drawn at random
/// with `seed` (a k-shot training set); a class with fewer rows keeps them
/// all. Sorted ascending.
pub fn per_class(indices: &[usize], labels: &[i64], k: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    for (_, mut rows) in by_class(indices.iter().copied(), labels) {
        rng.shuffle(&mut rows);
        out.extend_from_slice(&rows[..k.min(rows.len())]);
    }
    out.sort_unstable();
    out
}

/// The rows of `indices` whose label is one of `classes`; all of them when
/// `classes` is empty.
pub fn of_classes(indices: Vec<usize>, labels: &[i64], classes: &[i64]) -> Vec<usize> {
    if classes.is_empty() {
        return indices;
    }
    indices.into_iter().filter(|&i| classes.contains(&labels[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 classes of 101, 37 and 12 rows, in a scrambled order.
    fn labels() -> Vec<i64> {
        let mut l: Vec<i64> = [(0, 101), (1, 37), (2, 12)].iter().flat_map(|&(c, n)| vec![c; n]).collect();
        SplitMix64::new(0).shuffle(&mut l);
        l
    }

    fn count(rows: &[usize], labels: &[i64], class: i64) -> usize {
        rows.iter().filter(|&&i| labels[i] == class).count()
    }

    #[test]
    fn parts_are_disjoint_cover_everything_and_are_stratified() {
        let labels = labels();
        let fr = [0.7, 0.15, 0.15];
        let s = stratified_split(&labels, fr, 7).unwrap();
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "disjoint and covering");
        for class in 0..3 {
            let n = count(&(0..labels.len()).collect::<Vec<_>>(), &labels, class) as f64;
            for (part, f) in [&s.train, &s.val, &s.test].into_iter().zip(fr) {
                let got = count(part, &labels, class) as f64;
                assert!((got - n * f).abs() <= 1.0, "class {class}: {got} vs {}", n * f);
            }
        }
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let labels = labels();
        let a = stratified_split(&labels, [0.8, 0.1, 0.1], 1).unwrap();
        let b = stratified_split(&labels, [0.8, 0.1, 0.1], 1).unwrap();
        let c = stratified_split(&labels, [0.8, 0.1, 0.1], 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.test, c.test);
    }

    #[test]
    fn zero_fraction_and_bad_fractions() {
        let labels = labels();
        let s = stratified_split(&labels, [0.9, 0.0, 0.1], 3).unwrap();
        assert!(s.val.is_empty());
        assert_eq!(s.train.len() + s.test.len(), labels.len());
        assert!(stratified_split(&labels, [0.9, 0.2, 0.1], 3).is_err());
        assert!(stratified_split(&labels, [1.1, -0.1, 0.0], 3).is_err());
    }

    #[test]
    fn apportion_sums_exactly_and_stays_within_one() {
        for total in [0, 1, 2, 7, 10, 99, 1001] {
            for w in [[0.8, 0.1, 0.1], [1.0 / 3.0; 3], [0.5, 0.5, 0.0]] {
                let p = apportion(total, &w);
                assert_eq!(p.iter().sum::<usize>(), total);
                for (x, wi) in p.iter().zip(w) {
                    assert!((*x as f64 - total as f64 * wi).abs() < 1.0);
                }
            }
        }
    }

    #[test]
    fn subsample_keeps_proportions_and_is_a_subset() {
        let labels = labels();
        let s = stratified_split(&labels, [0.8, 0.1, 0.1], 5).unwrap();
        let n = 40;
        let sub = subsample_stratified(&s.train, &labels, n, 9);
        assert_eq!(sub.len(), n);
        assert!(sub.iter().all(|i| s.train.contains(i)));
        let mut dedup = sub.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), n);
        for class in 0..3 {
            let share = count(&s.train, &labels, class) as f64 / s.train.len() as f64;
            let got = count(&sub, &labels, class) as f64;
            assert!((got - share * n as f64).abs() <= 1.0, "class {class}");
        }
        assert_eq!(sub, subsample_stratified(&s.train, &labels, n, 9));
        assert_ne!(sub, subsample_stratified(&s.train, &labels, n, 10));
        assert_eq!(subsample_stratified(&s.train, &labels, 10_000, 9), s.train);
    }

    #[test]
    fn shuffle_is_a_permutation_and_roughly_uniform() {
        let mut rng = SplitMix64::new(42);
        let mut first = [0usize; 4];
        for _ in 0..4000 {
            let mut v = [0, 1, 2, 3];
            rng.shuffle(&mut v);
            let mut s = v;
            s.sort_unstable();
            assert_eq!(s, [0, 1, 2, 3]);
            first[v[0]] += 1;
        }
        // Each value leads ~1000 times; a broken shuffle (e.g. off-by-one range) skews this.
        assert!(first.iter().all(|&c| (850..1150).contains(&c)), "{first:?}");
    }

    #[test]
    fn per_class_draws_k_of_each_class_and_of_classes_filters() {
        let labels = labels();
        let all: Vec<usize> = (0..labels.len()).collect();
        let five = per_class(&all, &labels, 5, 3);
        assert_eq!([0, 1, 2].map(|c| count(&five, &labels, c)), [5, 5, 5]);
        assert!(five.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert_eq!(five, per_class(&all, &labels, 5, 3), "the same seed draws the same rows");
        assert_ne!(five, per_class(&all, &labels, 5, 4));
        // Class 2 has 12 rows: all of them.
        assert_eq!(count(&per_class(&all, &labels, 50, 3), &labels, 2), 12);
        let some = of_classes(all.clone(), &labels, &[0, 2]);
        assert_eq!(some.len(), 113);
        assert!(some.iter().all(|&i| labels[i] != 1));
        assert_eq!(of_classes(all.clone(), &labels, &[]), all);
    }
}
