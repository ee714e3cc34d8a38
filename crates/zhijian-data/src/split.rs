//! Deterministic stratified splits.

use zhijian_core::{Error, Result};

/// SplitMix64: a tiny PRNG whose stream is fixed by its definition, so splits
/// never change with a dependency's version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher–Yates shuffle.
    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            xs.swap(i, j);
        }
    }
}

/// Indices of the train, validation and test examples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitIndices {
    /// Training examples.
    pub train: Vec<usize>,
    /// Validation examples.
    pub val: Vec<usize>,
    /// Test examples.
    pub test: Vec<usize>,
}

fn by_class(labels: &[i64], among: impl Iterator<Item = usize>) -> std::collections::BTreeMap<i64, Vec<usize>> {
    let mut classes = std::collections::BTreeMap::<i64, Vec<usize>>::new();
    for i in among {
        classes.entry(labels[i]).or_default().push(i);
    }
    classes
}

/// Splits `0..labels.len()` into train / validation / test with the given
/// fractions (summing to 1), class by class, so each split keeps the class
/// proportions. The same seed always gives the same split.
pub fn stratified_split(labels: &[i64], fractions: [f64; 3], seed: u64) -> Result<SplitIndices> {
    if fractions.iter().any(|f| *f < 0.0) || (fractions.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
        return Err(Error::Config(format!("split fractions must be ≥ 0 and sum to 1, got {fractions:?}")));
    }
    let mut rng = SplitMix64(seed);
    let mut out = SplitIndices::default();
    for (_, mut idx) in by_class(labels, 0..labels.len()) {
        rng.shuffle(&mut idx);
        let n = idx.len() as f64;
        let n_train = (fractions[0] * n).round() as usize;
        let n_val = ((fractions[1] * n).round() as usize).min(idx.len() - n_train);
        out.train.extend_from_slice(&idx[..n_train]);
        out.val.extend_from_slice(&idx[n_train..n_train + n_val]);
        out.test.extend_from_slice(&idx[n_train + n_val..]);
    }
    for part in [&mut out.train, &mut out.val, &mut out.test] {
        rng.shuffle(part);
    }
    Ok(out)
}

/// A stratified subset of `n` of `indices` (all of them if `n` is larger).
pub fn subsample_stratified(indices: &[usize], labels: &[i64], n: usize, seed: u64) -> Vec<usize> {
    if n >= indices.len() {
        return indices.to_vec();
    }
    let mut rng = SplitMix64(seed ^ 0x5EED);
    let frac = n as f64 / indices.len() as f64;
    let mut out = Vec::with_capacity(n);
    for (_, mut idx) in by_class(labels, indices.iter().copied()) {
        rng.shuffle(&mut idx);
        out.extend_from_slice(&idx[..((frac * idx.len() as f64).round() as usize).min(idx.len())]);
    }
    rng.shuffle(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<i64> {
        (0..1000).map(|i| if i % 10 < 3 { 0 } else { 1 }).collect()
    }

    #[test]
    fn disjoint_complete_stratified_and_seeded() {
        let l = labels();
        let s = stratified_split(&l, [0.8, 0.1, 0.1], 0).unwrap();
        let mut all: Vec<usize> = [s.train.clone(), s.val.clone(), s.test.clone()].concat();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        let zeros = |ix: &[usize]| ix.iter().filter(|&&i| l[i] == 0).count();
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (800, 100, 100));
        assert_eq!((zeros(&s.train), zeros(&s.val), zeros(&s.test)), (240, 30, 30));
        assert_eq!(stratified_split(&l, [0.8, 0.1, 0.1], 0).unwrap(), s);
        assert_ne!(stratified_split(&l, [0.8, 0.1, 0.1], 1).unwrap(), s);
        assert!(stratified_split(&l, [0.8, 0.1, 0.2], 0).is_err());
    }

    #[test]
    fn subsample_keeps_proportions() {
        let l = labels();
        let s = stratified_split(&l, [0.8, 0.1, 0.1], 0).unwrap();
        let sub = subsample_stratified(&s.train, &l, 200, 3);
        assert_eq!(sub.len(), 200);
        assert_eq!(sub.iter().filter(|&&i| l[i] == 0).count(), 60);
        assert!(sub.iter().all(|i| s.train.contains(i)));
        assert_eq!(subsample_stratified(&s.train, &l, 200, 3), sub);
    }
}
