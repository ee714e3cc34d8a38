//! Git Re-Basin weight matching: permute the hidden units of model B so that
//! its weights line up with model A's before the two are merged (Ainsworth,
//! Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation
//! Symmetries", ICLR 2023, <https://arxiv.org/abs/2209.04836>, Algorithm 1
//! "weight matching"; reference code `weight_matching` in
//! <https://github.com/samuela/git-re-basin>).
//!
//! - what is permuted: the hidden units of every layer of a chain. Reordering
//!   the output units of layer `i` (rows of its weight and bias, and the
//!   channels of the BatchNorm after it) together with the input units of
//!   layer `i + 1` (columns of its weight, or of the head's) leaves the
//!   function unchanged, so B and P(B) are the same model. The input pixels
//!   and the classes are never permuted.
//! - what is matched: the permutations `P_i` that maximise
//!   `Σ_tensors ⟨W_A, P(W_B)⟩`, the agreement of A's weights with B's permuted
//!   ones. This is a sum of bilinear terms: with every other permutation held
//!   fixed, finding `P_i` is a linear assignment problem over the
//!   `n × n` similarities of A's and B's units (summed over every tensor
//!   `P_i` touches). Coordinate descent visits the permutations in a seeded
//!   random order, solves each assignment exactly ([`linear_assignment`]), and
//!   stops after a sweep that improves none of them (or after `max_iters`
//!   sweeps). Each step never lowers the objective, so it converges, to a
//!   local optimum (the joint problem is NP-hard).
//! - [`PermutationSpec`] says which permutation acts on which axis of every
//!   checkpoint key; [`PermutationSpec::chain`] builds it for the backbones
//!   whose layers form a plain chain (`mlp`, `small_cnn`); [`permute`] applies
//!   permutations to a whole model state.
//! - trains: nothing; merges: the aligned B is what a merge rule then
//!   interpolates with A (`merge`).

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use zhijian_core::layers::Role;
use zhijian_core::{Error, Model, Result, SplitMix64};

/// The architectures whose hidden units feed only the next layer (through
/// element-wise activations, BatchNorm and pooling, which commute with a
/// permutation of units): the ones [`PermutationSpec::chain`] supports.
const CHAINS: [&str; 2] = ["mlp", "small_cnn"];

/// Which permutation of hidden units acts on which axis of every tensor of a
/// model state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermutationSpec {
    /// For every checkpoint key, for each axis of its tensor, the index of the
    /// permutation that reorders that axis, or `None`. Every tensor of the
    /// state is listed, unpermuted ones with all `None` (an empty list for a
    /// scalar), so none is silently left out.
    pub axes: BTreeMap<String, Vec<Option<usize>>>,
    /// Size of each permutation: the number of units it reorders.
    pub sizes: Vec<i64>,
}

impl PermutationSpec {
    /// The spec of a backbone whose layers form a plain chain (`mlp`,
    /// `small_cnn`), read from the model's hook sites and variables.
    ///
    /// Walking [`Model::sites`] in forward order:
    /// - a linear layer or convolution at `path` opens permutation `k` (the
    ///   next index) of its `out_features` units: `{path}.weight` axis 0 by
    ///   `P_k`, axis 1 by `P_{k-1}` (none for the first layer, whose input is
    ///   the pixels), kernel axes none; `{path}.bias` axis 0 by `P_k`;
    /// - a normalisation layer (BatchNorm) acts on the units of the layer
    ///   before it: each of its vectors (`weight`, `bias`, `running_mean`,
    ///   `running_var`) axis 0 by the latest permutation, the scalar
    ///   `num_batches_tracked` untouched;
    /// - the head: `weight` axis 1 by the last permutation, `bias` untouched.
    ///
    /// Every variable of the model must belong to one of these sites and have
    /// the shape the chain implies; anything else is refused rather than left
    /// unpermuted.
    ///
    /// # Errors
    /// [`Error::Config`] for any other architecture, or a model whose sites
    /// or variables do not form such a chain.
    pub fn chain(model: &Model) -> Result<PermutationSpec> {
        let arch = model.backbone.arch();
        if !CHAINS.contains(&arch) {
            return Err(Error::Config(format!(
                "rebasin: architecture `{arch}` is not supported; weight matching supports chains of layers ({}), whose hidden units feed only the next layer",
                CHAINS.join(", ")
            )));
        }
        let not_chain = |why: String| Error::Config(format!("rebasin: `{arch}` is not a chain of layers as weight matching needs it: {why}"));
        let shapes: BTreeMap<String, Vec<i64>> = model.vs.variables().into_iter().map(|(name, t)| (name, t.size())).collect();
        let mut axes: BTreeMap<String, Vec<Option<usize>>> = BTreeMap::new();
        let mut sizes: Vec<i64> = Vec::new();
        let mut head_seen = false;
        for site in model.sites() {
            if head_seen {
                return Err(not_chain(format!("site `{}` comes after the head", site.path)));
            }
            // The site's own tensors: `{path}.{name}`, `name` without further dots.
            let own: Vec<(&str, &String, &Vec<i64>)> = shapes
                .iter()
                .filter_map(|(key, shape)| {
                    let name = key.strip_prefix(site.path.as_str())?.strip_prefix('.')?;
                    (!name.contains('.')).then_some((name, key, shape))
                })
                .collect();
            let latest = sizes.len().checked_sub(1);
            match site.role {
                Role::Norm => {
                    let p = latest.ok_or_else(|| not_chain(format!("normalisation `{}` before any layer", site.path)))?;
                    for (name, key, shape) in own {
                        let entry = match shape.as_slice() {
                            // A count of batches, not per unit.
                            [] => Vec::new(),
                            [n] if *n == sizes[p] => vec![Some(p)],
                            _ => return Err(not_chain(format!("`{key}` has shape {shape:?}, not [{}] ({name} of {} units)", sizes[p], sizes[p]))),
                        };
                        axes.insert(key.clone(), entry);
                    }
                }
                Role::Head => {
                    let p = latest.ok_or_else(|| not_chain("a head without hidden layers".into()))?;
                    Self::require_weight(&own, &site.path, &not_chain)?;
                    for (name, key, shape) in own {
                        let entry = match (name, shape.as_slice()) {
                            ("weight", [_, n]) if *n == sizes[p] => vec![None, Some(p)],
                            ("bias", [_]) => vec![None],
                            _ => return Err(not_chain(format!("head tensor `{key}` of shape {shape:?} over {} features", sizes[p]))),
                        };
                        axes.insert(key.clone(), entry);
                    }
                    head_seen = true;
                }
                // Attention mixes its units across heads, and a depthwise or
                // grouped convolution ties output units to input units: neither
                // is a free permutation of one layer's units.
                Role::Query | Role::Key | Role::Value | Role::Qkv | Role::AttnOut | Role::Depthwise => {
                    return Err(not_chain(format!("site `{}` ({:?}) is not a plain linear layer or convolution", site.path, site.role)));
                }
                Role::MlpUp | Role::MlpDown | Role::Stem | Role::Pointwise | Role::Spatial | Role::Other => {
                    if site.conv.is_some_and(|g| g.groups != 1) {
                        return Err(not_chain(format!("convolution `{}` is grouped", site.path)));
                    }
                    Self::require_weight(&own, &site.path, &not_chain)?;
                    let k = sizes.len();
                    let n = site.out_features;
                    for (name, key, shape) in own {
                        let entry = match (name, shape.as_slice()) {
                            ("weight", [out, input, kernel @ ..]) if *out == n => {
                                let input_perm = match latest {
                                    Some(q) if *input == sizes[q] => Some(q),
                                    Some(q) => return Err(not_chain(format!("`{key}` takes {input} inputs but the layer before has {} units", sizes[q]))),
                                    None => None,
                                };
                                [Some(k), input_perm].into_iter().chain(kernel.iter().map(|_| None)).collect()
                            }
                            ("bias", [out]) if *out == n => vec![Some(k)],
                            _ => return Err(not_chain(format!("`{key}` of shape {shape:?} in a layer of {n} units"))),
                        };
                        axes.insert(key.clone(), entry);
                    }
                    sizes.push(n);
                }
            }
        }
        if !head_seen {
            return Err(not_chain("no head".into()));
        }
        let missed: Vec<&str> = shapes.keys().filter(|key| !axes.contains_key(*key)).map(String::as_str).collect();
        if !missed.is_empty() {
            return Err(not_chain(format!("tensors outside every layer: {}", missed.join(", "))));
        }
        Ok(PermutationSpec { axes, sizes })
    }

    /// Refuses a layer site without a `weight` among its tensors.
    fn require_weight(own: &[(&str, &String, &Vec<i64>)], path: &str, not_chain: &impl Fn(String) -> Error) -> Result<()> {
        if own.iter().any(|(name, ..)| *name == "weight") { Ok(()) } else { Err(not_chain(format!("layer `{path}` has no weight"))) }
    }

    /// Checks that `state` holds exactly the spec's keys, each of the rank the
    /// spec lists and with `sizes[p]` entries along every axis permuted by `p`.
    ///
    /// # Errors
    /// [`Error::MissingWeights`] for keys of the spec the state lacks (`what`
    /// names the state), [`Error::Config`] for keys the spec does not cover,
    /// [`Error::ShapeMismatch`] for a tensor of the wrong shape.
    pub fn check(&self, state: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        let missing: Vec<String> = self.axes.keys().filter(|key| !state.contains_key(*key)).cloned().collect();
        if !missing.is_empty() {
            return Err(Error::MissingWeights { path: what.into(), names: missing });
        }
        let uncovered: Vec<&str> = state.keys().filter(|key| !self.axes.contains_key(*key)).map(String::as_str).collect();
        if !uncovered.is_empty() {
            return Err(Error::Config(format!("rebasin: {what} holds tensors the permutation spec does not cover: {}", uncovered.join(", "))));
        }
        for (key, axes) in &self.axes {
            let got = state[key].size();
            let mut expected = got.clone();
            expected.resize(axes.len(), 1);
            for (size, p) in expected.iter_mut().zip(axes) {
                if let Some(p) = p {
                    *size = *self.sizes.get(*p).ok_or_else(|| Error::Config(format!("rebasin: `{key}` names permutation {p} of {}", self.sizes.len())))?;
                }
            }
            if got != expected {
                return Err(Error::ShapeMismatch { name: format!("{what}: {key}"), expected, got });
            }
        }
        Ok(())
    }

    /// Checks that `perms` holds one permutation of `0..sizes[p]` per permutation `p`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first wrong one.
    pub fn check_perms(&self, perms: &[Vec<i64>]) -> Result<()> {
        if perms.len() != self.sizes.len() {
            return Err(Error::Config(format!("rebasin: {} permutations given, the spec has {}", perms.len(), self.sizes.len())));
        }
        for (p, (perm, &n)) in perms.iter().zip(&self.sizes).enumerate() {
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if !sorted.iter().copied().eq(0..n) {
                return Err(Error::Config(format!("rebasin: permutation {p} is not a permutation of 0..{n}: {perm:?}")));
            }
        }
        Ok(())
    }

    /// For each permutation, the `(key, axis)` pairs it reorders.
    fn touched(&self) -> Vec<Vec<(&str, usize)>> {
        let mut touched = vec![Vec::new(); self.sizes.len()];
        for (key, axes) in &self.axes {
            for (axis, p) in axes.iter().enumerate() {
                if let Some(p) = p {
                    touched[*p].push((key.as_str(), axis));
                }
            }
        }
        touched
    }
}

/// The permutations that align `b` with `a`: `permute(spec, &perms, b)` is
/// the copy of B whose units best match A's (Git Re-Basin weight matching).
/// `perms[p][i]` is the unit of B that goes to place `i` of permutation `p`.
///
/// Starts from the identity and runs at most `max_iters` sweeps of
/// coordinate descent; each sweep visits the permutations in a random order
/// drawn from `seed` and replaces each by the solution of its linear
/// assignment problem when that strictly raises `Σ ⟨W_A, P(W_B)⟩` (ties keep
/// the current permutation, so the descent cannot cycle). Similarities are
/// summed in f64 on the tensors' device.
///
/// # Errors
/// A state that does not fit the spec (see [`PermutationSpec::check`]),
/// tensors of `a` and `b` of different shapes, or weights that are not finite.
pub fn weight_matching(
    spec: &PermutationSpec,
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    max_iters: usize,
    seed: u64,
) -> Result<Vec<Vec<i64>>> {
    spec.check(a, "model a")?;
    spec.check(b, "model b")?;
    for (key, wa) in a {
        let (expected, got) = (wa.size(), b[key].size());
        if expected != got {
            return Err(Error::ShapeMismatch { name: format!("model b: {key}"), expected, got });
        }
    }
    let touched = spec.touched();
    let mut perms: Vec<Vec<i64>> = spec.sizes.iter().map(|&n| (0..n).collect()).collect();
    let mut rng = SplitMix64::new(seed);
    tch::no_grad(|| {
        for _ in 0..max_iters {
            let mut improved = false;
            for p in rng.permutation(spec.sizes.len()) {
                let gain = similarity(spec, &touched[p], &perms, a, b)?;
                if gain.iter().flatten().any(|g| !g.is_finite()) {
                    return Err(Error::Config(format!(
                        "rebasin: the unit similarities of permutation {p} are not finite: the models hold NaN or infinite weights"
                    )));
                }
                let best = linear_assignment(&gain);
                let total =
                    |perm: &mut dyn Iterator<Item = usize>| perm.enumerate().map(|(i, j)| gain[i][j]).fold((0.0, 0.0), |(s, m), g| (s + g, m + g.abs()));
                let (old, old_scale) = total(&mut perms[p].iter().map(|&j| j as usize));
                let (new, new_scale) = total(&mut best.iter().copied());
                // Rounding in the two sums differs by about n·ε of their scale;
                // anything below that is a tie, not progress.
                if new - old > 1e-10 * (old_scale + new_scale) {
                    perms[p] = best.into_iter().map(|j| j as i64).collect();
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
        Ok(perms)
    })
}

/// The `n × n` similarities of A's units `i` and B's units `j` under
/// permutation `p`: `Σ_(key, axis) ⟨A[key] unit i, B[key] unit j⟩` over every
/// tensor `p` touches, B's other axes permuted by the current `perms`.
fn similarity(
    spec: &PermutationSpec,
    touched: &[(&str, usize)],
    perms: &[Vec<i64>],
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
) -> Result<Vec<Vec<f64>>> {
    let Some(&(first, axis)) = touched.first() else { return Ok(Vec::new()) };
    let n = a[first].size()[axis];
    let device = a[first].device();
    let mut gain = Tensor::f_zeros([n, n], (Kind::Double, device))?;
    for &(key, axis) in touched {
        let wa = a[key].f_to_kind(Kind::Double)?;
        let wb = permuted(&b[key].f_to_device(device)?, &spec.axes[key], perms, Some(axis))?.f_to_kind(Kind::Double)?;
        // Units along axis 0, everything else flattened: one row per unit.
        let rows = |w: &Tensor| w.f_transpose(0, axis as i64)?.f_reshape([n, -1]);
        gain = gain.f_add(&rows(&wa)?.f_mm(&rows(&wb)?.f_tr()?)?)?;
    }
    Ok(Vec::<Vec<f64>>::try_from(&gain.f_to_device(Device::Cpu)?.f_contiguous()?)?)
}

/// `w` with each axis reordered by its permutation in `axes`, except `skip`.
fn permuted(w: &Tensor, axes: &[Option<usize>], perms: &[Vec<i64>], skip: Option<usize>) -> Result<Tensor> {
    let mut w = w.shallow_clone();
    for (axis, p) in axes.iter().enumerate() {
        if let Some(p) = p
            && Some(axis) != skip
        {
            w = w.f_index_select(axis as i64, &Tensor::from_slice(&perms[*p]).f_to_device(w.device())?)?;
        }
    }
    Ok(w)
}

/// `state` with every axis the spec permutes reordered by `perms`
/// (`perms[p][i]`: the unit that goes to place `i`): a fresh state of the
/// same keys, detached and sharing no storage with `state`.
///
/// # Errors
/// A state that does not fit the spec ([`PermutationSpec::check`]) or
/// permutations that do not ([`PermutationSpec::check_perms`]).
pub fn permute(spec: &PermutationSpec, perms: &[Vec<i64>], state: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    spec.check(state, "state")?;
    spec.check_perms(perms)?;
    tch::no_grad(|| {
        state
            .iter()
            .map(|(key, w)| {
                let axes = &spec.axes[key];
                // index_select already copies; an unpermuted tensor is copied here.
                let w = if axes.iter().all(Option::is_none) { w.f_detach_copy()? } else { permuted(w, axes, perms, None)? };
                Ok((key.clone(), w))
            })
            .collect()
    })
}

/// The assignment of rows to columns that maximises the total of `cost`:
/// `assignment[i]` is row `i`'s column, each column used once.
///
/// Shortest augmenting paths with dual potentials (the Hungarian method in
/// Jonker–Volgenant's form), O(n³): row by row, the cheapest path from the
/// new row to a free column in the reduced costs is found by a Dijkstra-like
/// sweep, the potentials move so that path's edges become tight, and the
/// matching is flipped along it.
///
/// # Panics
/// If `cost` is not square or holds a value that is not finite.
pub fn linear_assignment(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    assert!(cost.iter().all(|row| row.len() == n), "linear_assignment needs a square matrix");
    assert!(cost.iter().flatten().all(|c| c.is_finite()), "linear_assignment needs finite costs");
    // Minimise the negated gains. Index 0 of rows and columns is a sentinel:
    // column 0 holds the row being inserted, and row 0 matches nothing.
    let c = |i: usize, j: usize| -cost[i - 1][j - 1];
    let mut row_potential = vec![0.0f64; n + 1];
    let mut col_potential = vec![0.0f64; n + 1];
    // Row matched to each column (0: free).
    let mut row_of = vec![0usize; n + 1];
    // The column before each column on the current shortest path.
    let mut previous = vec![0usize; n + 1];
    for row in 1..=n {
        row_of[0] = row;
        let mut col = 0;
        let mut distance = vec![f64::INFINITY; n + 1];
        let mut reached = vec![false; n + 1];
        // Grow the shortest-path tree until it reaches a free column.
        loop {
            reached[col] = true;
            let i = row_of[col];
            let (mut delta, mut next) = (f64::INFINITY, 0);
            for j in 1..=n {
                if reached[j] {
                    continue;
                }
                let reduced = c(i, j) - row_potential[i] - col_potential[j];
                if reduced < distance[j] {
                    distance[j] = reduced;
                    previous[j] = col;
                }
                if distance[j] < delta {
                    delta = distance[j];
                    next = j;
                }
            }
            for j in 0..=n {
                if reached[j] {
                    row_potential[row_of[j]] += delta;
                    col_potential[j] -= delta;
                } else {
                    distance[j] -= delta;
                }
            }
            col = next;
            if row_of[col] == 0 {
                break;
            }
        }
        // Flip the matching along the path back to the new row.
        while col != 0 {
            let before = previous[col];
            row_of[col] = row_of[before];
            col = before;
        }
    }
    let mut assignment = vec![0; n];
    for j in 1..=n {
        assignment[row_of[j] - 1] = j - 1;
    }
    assignment
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhijian_backbones::{SmallCnn, SmallCnnConfig, toys};
    use zhijian_core::{Ctx, Input};

    /// A detached copy of the model's variables.
    fn state(model: &Model) -> BTreeMap<String, Tensor> {
        model.vs.variables().into_iter().map(|(name, t)| (name, t.detach().copy())).collect()
    }

    /// Random BatchNorm scales, shifts and statistics, so the test sees whether
    /// they are permuted with their channels (the defaults are the same for all).
    fn randomise_norms(model: &Model) {
        tch::no_grad(|| {
            for (name, t) in model.vs.variables() {
                let mut t = t.shallow_clone();
                if name.contains(".bn.") && t.dim() == 1 {
                    let fresh = if name.ends_with("running_var") { t.rand_like() + 0.5 } else { t.randn_like() * 0.5 };
                    t.copy_(&fresh);
                }
            }
        });
    }

    /// One random permutation per permutation of the spec, none the identity.
    fn random_perms(spec: &PermutationSpec, seed: u64) -> Vec<Vec<i64>> {
        let mut rng = SplitMix64::new(seed);
        spec.sizes
            .iter()
            .map(|&n| {
                let mut perm: Vec<i64> = rng.permutation(n as usize).into_iter().map(|j| j as i64).collect();
                if perm.iter().copied().eq(0..n) {
                    perm.reverse();
                }
                perm
            })
            .collect()
    }

    fn inverse(perm: &[i64]) -> Vec<i64> {
        let mut inv = vec![0; perm.len()];
        for (i, &j) in perm.iter().enumerate() {
            inv[j as usize] = i as i64;
        }
        inv
    }

    fn logits(model: &Model, input: &Input) -> Tensor {
        tch::no_grad(|| model.forward(&Ctx::plain(false), input))
    }

    fn brute_force_best(cost: &[Vec<f64>]) -> f64 {
        fn go(cost: &[Vec<f64>], row: usize, used: &mut Vec<bool>) -> f64 {
            if row == cost.len() {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            for j in 0..cost.len() {
                if !used[j] {
                    used[j] = true;
                    best = best.max(cost[row][j] + go(cost, row + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        go(cost, 0, &mut vec![false; cost.len()])
    }

    /// On 200 random 5×5 matrices (some with repeated values, so ties occur)
    /// the assignment is a permutation whose total equals the brute-force optimum.
    #[test]
    fn linear_assignment_matches_brute_force_on_random_5x5() {
        let mut rng = SplitMix64::new(11);
        for trial in 0..200 {
            let coarse = trial % 2 == 0;
            let cost: Vec<Vec<f64>> = (0..5)
                .map(|_| {
                    (0..5)
                        .map(|_| {
                            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                            if coarse { (u * 4.0).floor() - 2.0 } else { u * 200.0 - 100.0 }
                        })
                        .collect()
                })
                .collect();
            let assignment = linear_assignment(&cost);
            let mut sorted = assignment.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "{cost:?}");
            let total: f64 = assignment.iter().enumerate().map(|(i, &j)| cost[i][j]).sum();
            let best = brute_force_best(&cost);
            assert!((total - best).abs() < 1e-9, "trial {trial}: {total} vs {best} for {cost:?}");
        }
    }

    /// Hand-checked cases: empty, 1×1, a 3×3 whose best total (11) is off the
    /// diagonal, negative gains, and a constant matrix.
    #[test]
    fn linear_assignment_hand_cases() {
        assert_eq!(linear_assignment(&[]), Vec::<usize>::new());
        assert_eq!(linear_assignment(&[vec![-3.0]]), vec![0]);
        // Totals: 012 → 6, 021 → 11, 102 → 5, 120 → 9, 201 → 7, 210 → 6.
        assert_eq!(linear_assignment(&[vec![4.0, 1.0, 3.0], vec![2.0, 0.0, 5.0], vec![3.0, 2.0, 2.0]]), vec![0, 2, 1]);
        // −1 − 10 = −11 against −2 − 3 = −5.
        assert_eq!(linear_assignment(&[vec![-1.0, -2.0], vec![-3.0, -10.0]]), vec![1, 0]);
        let mut constant = linear_assignment(&vec![vec![1.5; 4]; 4]);
        constant.sort_unstable();
        assert_eq!(constant, vec![0, 1, 2, 3]);
    }

    /// The spec of the toy CNN and MLP lists every variable with the axes
    /// each permutation reorders (the key names the backbones really use).
    #[test]
    fn chain_spec_names_every_key_of_the_toy_cnn_and_mlp() {
        let cnn = toys::cnn(0);
        let spec = PermutationSpec::chain(&cnn).unwrap();
        assert_eq!(spec.sizes, vec![4, 8]);
        assert_eq!(spec.axes.keys().collect::<Vec<_>>(), state(&cnn).keys().collect::<Vec<_>>());
        let (p0, p1) = (Some(0), Some(1));
        for (key, axes) in [
            ("features.0.conv.weight", vec![p0, None, None, None]),
            ("features.0.bn.weight", vec![p0]),
            ("features.0.bn.bias", vec![p0]),
            ("features.0.bn.running_mean", vec![p0]),
            ("features.0.bn.running_var", vec![p0]),
            ("features.0.bn.num_batches_tracked", vec![]),
            ("features.1.conv.weight", vec![p1, p0, None, None]),
            ("features.1.bn.running_var", vec![p1]),
            ("head.weight", vec![None, p1]),
            ("head.bias", vec![None]),
        ] {
            assert_eq!(spec.axes[key], axes, "{key}");
        }
        let mlp = toys::mlp(0, 3);
        let spec = PermutationSpec::chain(&mlp).unwrap();
        assert_eq!(spec.sizes, vec![8, 6]);
        let want: BTreeMap<String, Vec<Option<usize>>> = [
            ("layers.0.weight", vec![p0, None]),
            ("layers.0.bias", vec![p0]),
            ("layers.1.weight", vec![p1, p0]),
            ("layers.1.bias", vec![p1]),
            ("head.weight", vec![None, p1]),
            ("head.bias", vec![None]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(spec.axes, want);
    }

    /// Transformers and other non-chains are refused, naming the architecture.
    #[test]
    fn chain_refuses_other_architectures() {
        for model in [toys::vit(0), toys::bert(0), toys::efficientnet(0)] {
            let arch = model.backbone.arch().to_string();
            match PermutationSpec::chain(&model) {
                Err(Error::Config(message)) => assert!(message.contains(&format!("`{arch}`")) && message.contains("mlp, small_cnn"), "{message}"),
                other => panic!("{arch}: expected a config error, got {other:?}"),
            }
        }
    }

    /// Permuting the hidden units of a CNN (BatchNorm included) or an MLP
    /// leaves its logits unchanged; forgetting the BatchNorm tensors, or the
    /// head's input axis, does not.
    #[test]
    fn permuted_models_compute_the_same_logits() {
        let cases = [
            (toys::cnn(1), toys::cnn(2), toys::images(), ".bn."),
            (toys::mlp(1, 3), toys::mlp(2, 3), Input::Images(Tensor::randn([6, 1, 4, 4], tch::kind::FLOAT_CPU)), "head."),
        ];
        for (seed, (model, twin, input, forgotten)) in cases.into_iter().enumerate() {
            randomise_norms(&model);
            let spec = PermutationSpec::chain(&model).unwrap();
            let perms = random_perms(&spec, seed as u64);
            let permuted_state = permute(&spec, &perms, &state(&model)).unwrap();
            assert!(permuted_state.iter().any(|(k, t)| !t.equal(&state(&model)[k])), "the permutation changed nothing");
            let want = logits(&model, &input);
            let twin = toys::with_weights(twin, &permuted_state.into_iter().collect::<Vec<_>>());
            let got = logits(&twin, &input);
            assert!(got.allclose(&want, 1e-5, 1e-5, false), "{got} vs {want}");

            let mut incomplete = spec.clone();
            for (key, axes) in incomplete.axes.iter_mut() {
                if key.contains(forgotten) {
                    axes.iter_mut().for_each(|a| *a = None);
                }
            }
            let wrong = toys::with_weights(twin, &permute(&incomplete, &perms, &state(&model)).unwrap().into_iter().collect::<Vec<_>>());
            let diff = (logits(&wrong, &input) - &want).abs().max().double_value(&[]);
            assert!(diff > 1e-3, "forgetting `{forgotten}` left the logits unchanged ({diff})");
        }
    }

    /// A randomly permuted copy is matched back exactly (the toy CNN and MLP,
    /// and a CNN of three wider stages): the permutations found are the
    /// inverses, and they restore every tensor bit for bit.
    #[test]
    fn weight_matching_recovers_a_permuted_copy() {
        let wide =
            Model::new(Device::Cpu, 5, |p| Box::new(SmallCnn::new(p, &SmallCnnConfig { image_size: 8, in_chans: 3, channels: vec![16, 32, 32] }).unwrap()));
        for (seed, model) in [toys::cnn(3), toys::mlp(3, 3), wide].into_iter().enumerate() {
            randomise_norms(&model);
            let spec = PermutationSpec::chain(&model).unwrap();
            let a = state(&model);
            let scramble = random_perms(&spec, 100 + seed as u64);
            let b = permute(&spec, &scramble, &a).unwrap();
            let found = weight_matching(&spec, &a, &b, 100, seed as u64).unwrap();
            assert_eq!(found, scramble.iter().map(|p| inverse(p)).collect::<Vec<_>>());
            let aligned = permute(&spec, &found, &b).unwrap();
            assert!(aligned.iter().all(|(k, t)| t.equal(&a[k])), "the aligned copy differs from a");
        }
    }

    /// One step by hand: a 2-unit layer `l` and an output `out` reading it.
    /// A's units: l rows (1,0), (0,1), out columns 1, 2; B's: l rows (0,3),
    /// (2,0), out columns 2, 1. Similarities `S[i][j] = ⟨l_A[i], l_B[j]⟩ +
    /// out_A[i]·out_B[j]` = [[0+2, 2+1], [3+4, 0+2]] = [[2, 3], [7, 2]]:
    /// the identity scores 4, the swap 10, so B's units swap.
    #[test]
    fn one_matching_step_by_hand() {
        let spec = PermutationSpec {
            axes: [("l.weight".to_string(), vec![Some(0), None]), ("out.weight".to_string(), vec![None, Some(0)])].into_iter().collect(),
            sizes: vec![2],
        };
        let m = |v: &[f32], cols: i64| Tensor::from_slice(v).view([-1, cols]);
        let a: BTreeMap<String, Tensor> =
            [("l.weight".to_string(), m(&[1.0, 0.0, 0.0, 1.0], 2)), ("out.weight".to_string(), m(&[1.0, 2.0], 2))].into_iter().collect();
        let b: BTreeMap<String, Tensor> =
            [("l.weight".to_string(), m(&[0.0, 3.0, 2.0, 0.0], 2)), ("out.weight".to_string(), m(&[2.0, 1.0], 2))].into_iter().collect();
        let gain = similarity(&spec, &spec.touched()[0], &[vec![0, 1]], &a, &b).unwrap();
        assert_eq!(gain, vec![vec![2.0, 3.0], vec![7.0, 2.0]]);
        let perms = weight_matching(&spec, &a, &b, 10, 0).unwrap();
        assert_eq!(perms, vec![vec![1, 0]]);
        let aligned = permute(&spec, &perms, &b).unwrap();
        assert!(aligned["l.weight"].equal(&m(&[2.0, 0.0, 0.0, 3.0], 2)));
        assert!(aligned["out.weight"].equal(&m(&[1.0, 2.0], 2)));
    }

    /// States and permutations that do not fit the spec are refused with the
    /// name of what is wrong, before any work.
    #[test]
    fn misfit_states_and_permutations_are_refused() {
        let model = toys::mlp(4, 3);
        let spec = PermutationSpec::chain(&model).unwrap();
        let a = state(&model);
        let mut lacking = state(&model);
        lacking.remove("layers.1.bias");
        assert!(matches!(weight_matching(&spec, &a, &lacking, 5, 0), Err(Error::MissingWeights { names, .. }) if names == ["layers.1.bias"]));
        let mut extra = state(&model);
        extra.insert("stray".into(), Tensor::zeros([2], tch::kind::FLOAT_CPU));
        assert!(matches!(permute(&spec, &[(0..8).collect(), (0..6).collect()], &extra), Err(Error::Config(m)) if m.contains("stray")));
        let mut misshapen = state(&model);
        misshapen.insert("layers.1.bias".into(), Tensor::zeros([7], tch::kind::FLOAT_CPU));
        assert!(matches!(weight_matching(&spec, &a, &misshapen, 5, 0), Err(Error::ShapeMismatch { got, .. }) if got == [7]));
        assert!(matches!(permute(&spec, &[(0..8).collect(), vec![0, 0, 1, 2, 3, 4]], &a), Err(Error::Config(m)) if m.contains("permutation 1")));
        let mut nan = state(&model);
        nan.insert("head.weight".into(), a["head.weight"].full_like(f64::NAN));
        assert!(matches!(weight_matching(&spec, &a, &nan, 5, 0), Err(Error::Config(m)) if m.contains("not finite")));
    }
}
