//! Sparse fine-tuning: SAFT (Nguyen et al., ECCV 2024, "SAFT: Towards
//! Out-of-Distribution Generalization in Fine-Tuning", <https://arxiv.org/abs/2407.03036>)
//! and SHiRA-style random or weight-magnitude masks (Bhardwaj et al. 2024,
//! "Sparse High Rank Adapters", <https://arxiv.org/abs/2406.13175>).
//!
//! A fixed `density` fraction of the backbone's eligible parameter entries
//! trains; everything else stays as pre-trained. The entries are chosen once,
//! globally (one threshold over every eligible tensor, as SAFT ranks all
//! parameters together):
//!
//! - `gradient` (SAFT): the largest `|∂L/∂θ|` of the task loss, the gradient
//!   summed over up to `selection_batches` batches of the training split
//!   (a random subset when capped), computed in [`Method::before_train`] on the
//!   plain pre-trained backbone with the run's (fresh) head, in training mode.
//!   It is the magnitude of the summed gradient (the gradient of the loss on
//!   those examples, as the paper writes it), not a sum of per-batch magnitudes.
//! - `random` (SHiRA's default): a uniformly random subset, drawn in `prepare`.
//! - `magnitude` (SHiRA-WM): the largest pre-trained `|θ|`, chosen in `prepare`.
//!
//! - eligible: the weights of every linear layer and convolution of the backbone
//!   (every [`Model::sites`] entry except norms and the head), and, with
//!   `biases = true` (the default), their biases, ranked with the weights. Norm
//!   scales and shifts and embedding tables are not eligible: the hooks reach
//!   them only awkwardly (norms) or not at all (embeddings), a deviation from
//!   SAFT, which ranks every parameter.
//! - trains: the selected entries' deltas and the head; frozen: everything else.
//! - storage: one flat index space over the eligible tensors (in site order,
//!   weight then bias), fixed by the backbone's shapes; `indices` (int64, sorted
//!   flat positions; persistent state without gradient) and `values` (the
//!   trainable deltas, zero at init, so the model is unchanged) hold
//!   `k = ceil(density · eligible entries)` entries for the whole backbone,
//!   a size known at `prepare`, whatever the selection later puts in each tensor.
//! - forward: at each eligible site, `out + x·ΔWᵀ + Δb` (linear) or the same
//!   convolution of `x` with `ΔW` (convolutions, the site's geometry), where
//!   `ΔW`, `Δb` are scattered from `values` in one `index_add` each. Every
//!   eligible site runs its delta, even one the selection left empty: which
//!   sites are empty is only known on the device (after a restore the method is
//!   not told), and reading it back every forward would stall a GPU.
//!   The dense `ΔW` per site, its matmul and its weight gradient make a step
//!   dearer than full fine-tuning's (measured on MiniLM-L6, CPU, one thread,
//!   16 × 64 tokens: 0.69 s against 0.48 s for full fine-tuning and 0.32 s for
//!   LoRA), with optimiser state for the `k` values only. Gradient selection
//!   costs `selection_batches` forward and backward passes before the first
//!   step (inside the engine's training clock: they are part of the method's cost).
//! - merges: scatter-add of the deltas into the backbone's weights; `unmerge`
//!   writes back the original entries saved at merge time (bit-exact).
//! - artifact: `indices` and `values` (`k` int64 and `k` float) plus the head.
//!
//! The values get no weight decay (a vector, the engine's default): decay on
//! them would pull the entries towards the pre-trained weights, not towards
//! zero as the decay of full fine-tuning does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};
use zhijian_core::train::{Split, TrainConfig, batches};
use zhijian_core::{Ctx, Error, Method, Model, Result, Role, RunData, Site, config_table};

/// How the trainable entries are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Largest gradient magnitude of the task loss on the training split (SAFT).
    Gradient,
    /// Uniformly at random (SHiRA).
    Random,
    /// Largest pre-trained weight magnitude (SHiRA-WM).
    Magnitude,
}

/// Configuration of sparse fine-tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SparseFtConfig {
    /// Fraction of the eligible entries that train, in (0, 1]. Default 0.001 (0.1 %, SAFT's).
    pub density: f64,
    /// How the entries are chosen: `gradient` (SAFT), `random` or `magnitude`
    /// (SHiRA). Default `gradient`.
    pub selection: Selection,
    /// Gradient selection: at most this many training batches (of the run's
    /// batch size, a random subset of the split) are summed; 0 = the whole split.
    /// Default 100.
    pub selection_batches: usize,
    /// Whether the biases of the adapted layers are eligible, ranked together
    /// with the weights. Default true.
    pub biases: bool,
}

impl Default for SparseFtConfig {
    fn default() -> Self {
        SparseFtConfig { density: 0.001, selection: Selection::Gradient, selection_batches: 100, biases: true }
    }
}

/// One eligible tensor of the backbone: a stretch `[start, start + numel)` of
/// the flat index space.
pub(crate) struct Segment {
    /// The parameter's name (`<site>.weight`, `<site>.bias`).
    pub name: String,
    /// The backbone's tensor itself (shares its storage).
    pub tensor: Tensor,
    /// First flat position.
    pub start: i64,
    /// Number of entries.
    pub numel: i64,
}

/// The flat index space over every eligible tensor of a backbone, in site
/// order (weight, then bias), and the sparse-delta arithmetic on it shared by
/// sparse fine-tuning and diff pruning.
pub(crate) struct Flat {
    /// The eligible tensors, in flat order.
    pub segments: Vec<Segment>,
    /// Site path → (weight segment, bias segment).
    sites: BTreeMap<String, (usize, Option<usize>)>,
    /// Entries over all segments.
    pub total: i64,
}

impl Flat {
    /// The weights (and, if `biases`, the biases) of every linear layer and
    /// convolution of `model`'s backbone; an error naming `method` and the
    /// backbone if there is none.
    pub fn new(model: &Model, biases: bool, method: &str) -> Result<Flat> {
        let vars = model.vs.variables();
        let (mut segments, mut sites, mut total) = (Vec::new(), BTreeMap::new(), 0i64);
        for site in model.sites().into_iter().filter(|s| !matches!(s.role, Role::Norm | Role::Head)) {
            let name = format!("{}.weight", site.path);
            let weight = vars.get(&name).ok_or_else(|| Error::MissingWeights { path: "<model>".into(), names: vec![name.clone()] })?;
            let expected = match site.conv {
                Some(g) => vec![site.out_features, site.in_features / g.groups, g.kernel[0], g.kernel[1]],
                None => vec![site.out_features, site.in_features],
            };
            if weight.size() != expected {
                return Err(Error::ShapeMismatch { name, expected, got: weight.size() });
            }
            let mut push = |name: String, tensor: &Tensor| {
                let numel = tensor.numel() as i64;
                segments.push(Segment { name, tensor: tensor.shallow_clone(), start: total, numel });
                total += numel;
                segments.len() - 1
            };
            let w = push(name, weight);
            let bias = format!("{}.bias", site.path);
            let b = match vars.get(&bias) {
                Some(t) if biases => Some(push(bias, t)),
                _ => None,
            };
            sites.insert(site.path.clone(), (w, b));
        }
        if segments.is_empty() {
            return Err(Error::MethodConfig {
                method: method.into(),
                message: format!("needs linear layers or convolutions to adapt; backbone `{}` has none", model.backbone.arch()),
            });
        }
        Ok(Flat { segments, sites, total })
    }

    /// `ceil(density · total)` entries, at least 1.
    pub fn budget(&self, density: f64) -> i64 {
        ((density * self.total as f64).ceil() as i64).clamp(1, self.total)
    }

    /// The (weight, bias) segments of the site at `path`, if it is eligible.
    pub fn site(&self, path: &str) -> Option<(usize, Option<usize>)> {
        self.sites.get(path).copied()
    }

    /// The dense delta of segment `seg`, shaped as its tensor, from the sparse
    /// `(indices, values)` over the whole flat space: one `index_add`, where
    /// entries of other segments land in two dump slots (before and after) that
    /// are cut off. Differentiable in `values`; no host synchronisation.
    pub fn scatter(&self, seg: usize, indices: &Tensor, values: &Tensor) -> Tensor {
        let s = &self.segments[seg];
        let pos = indices.g_sub_scalar(s.start - 1).clamp(0, s.numel + 1);
        Tensor::zeros([s.numel + 2], (values.kind(), values.device())).index_add(0, &pos, values).narrow(0, 1, s.numel).view(s.tensor.size().as_slice())
    }

    /// The positions inside segment `seg` of those `indices` that fall in it,
    /// and their `values` (synchronises with the device; for merging).
    fn entries(&self, seg: usize, indices: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let s = &self.segments[seg];
        let inside = indices.ge(s.start).logical_and(&indices.lt(s.start + s.numel));
        (indices.masked_select(&inside).g_sub_scalar(s.start), values.masked_select(&inside))
    }

    /// `W ← W + scatter(values)` entry by entry; keeps the overwritten entries.
    pub fn merge_sparse(&self, indices: &Tensor, values: &Tensor) -> Merged {
        tch::no_grad(|| {
            let mut saved = Vec::new();
            for (i, s) in self.segments.iter().enumerate() {
                let (pos, v) = self.entries(i, indices, values);
                if pos.numel() == 0 {
                    continue;
                }
                let mut flat = s.tensor.view([-1]);
                let orig = flat.index_select(0, &pos);
                let _ = flat.index_copy_(0, &pos, &(&orig + v.to_kind(orig.kind())));
                saved.push(Saved::Entries { seg: i, pos, orig });
            }
            Merged(saved)
        })
    }

    /// `W ← W + delta(i)` for every segment `i`; keeps whole copies of the tensors.
    pub fn merge_dense(&self, delta: impl Fn(usize) -> Tensor) -> Merged {
        tch::no_grad(|| {
            let saved = (0..self.segments.len())
                .map(|i| {
                    let mut t = self.segments[i].tensor.shallow_clone();
                    let orig = t.copy();
                    let _ = t.g_add_(&delta(i).to_kind(t.kind()));
                    Saved::Whole { seg: i, orig }
                })
                .collect();
            Merged(saved)
        })
    }

    /// Writes back what a merge saved: the weights are bit-for-bit as before it.
    pub fn unmerge(&self, merged: Merged) {
        tch::no_grad(|| {
            for saved in merged.0 {
                match saved {
                    Saved::Entries { seg, pos, orig } => {
                        let _ = self.segments[seg].tensor.view([-1]).index_copy_(0, &pos, &orig);
                    }
                    Saved::Whole { seg, orig } => {
                        self.segments[seg].tensor.shallow_clone().copy_(&orig);
                    }
                }
            }
        })
    }
}

/// What a merge overwrote, to undo it exactly.
enum Saved {
    /// The original entries at positions `pos` of segment `seg`.
    Entries { seg: usize, pos: Tensor, orig: Tensor },
    /// A copy of the whole tensor of segment `seg`.
    Whole { seg: usize, orig: Tensor },
}

/// The state of a merged sparse delta.
pub(crate) struct Merged(Vec<Saved>);

/// `out` plus the layer at `site` applied to the weight delta `dw` (shaped as
/// the weight) and bias delta `db`: `x·dwᵀ + db` for a linear layer, the
/// site's convolution with kernel `dw` for a convolution.
pub(crate) fn add_delta(site: &Site, x: &Tensor, out: Tensor, dw: &Tensor, db: Option<&Tensor>) -> Tensor {
    let dw = dw.to_kind(x.kind());
    let db = db.map(|b| b.to_kind(x.kind()));
    match site.conv {
        Some(g) => out + x.conv2d(&dw, db.as_ref(), [g.stride; 2], [g.padding; 2], [1, 1], g.groups),
        None => out + x.linear(&dw, db.as_ref()),
    }
}

/// The flat positions of the `k` largest `scores` (`[total]`), sorted.
pub(crate) fn top_k(scores: &Tensor, k: i64) -> Tensor {
    scores.topk(k, 0, true, false).1.sort(0, false).0
}

/// `k` distinct positions out of `total`, uniformly at random, sorted. Drawn
/// with replacement and deduplicated (memory `O(k)`, not a permutation of all
/// `total`), then thinned at random to exactly `k`.
fn random_indices(total: i64, k: i64, device: Device) -> Tensor {
    let opts = (Kind::Int64, device);
    if 4 * k > total {
        return Tensor::randperm(total, opts).narrow(0, 0, k).sort(0, false).0;
    }
    let mut chosen = Tensor::empty([0], opts);
    while (chosen.numel() as i64) < k {
        let need = k - chosen.numel() as i64;
        let draw = Tensor::randint(total, [need + need / 8 + 8], opts);
        chosen = Tensor::cat(&[chosen, draw], 0).unique_dim(0, true, false, false).0;
    }
    let keep = Tensor::randperm(chosen.numel() as i64, opts).narrow(0, 0, k);
    chosen.index_select(0, &keep).sort(0, false).0
}

/// `k` evenly spaced positions: what `indices` holds until gradient selection runs.
pub(crate) fn spread_indices(total: i64, k: i64, device: Device) -> Tensor {
    Tensor::linspace(0.0, (total - 1) as f64, k, (Kind::Double, device)).floor().to_kind(Kind::Int64)
}

/// `|Σ ∂L/∂θ|` of every eligible entry (`[total]`), `L` the summed
/// cross-entropy of the plain model (no method active) on up to `max_batches`
/// random batches of `train` (0 = all). The eligible tensors require gradients
/// only while this runs; their `.grad` is never touched (the gradients are
/// returned by autograd, not accumulated into the parameters).
pub(crate) fn gradient_scores(model: &Model, flat: &Flat, train: &Split, cfg: &TrainConfig, max_batches: usize, method: &str) -> Result<Tensor> {
    let params: Vec<Tensor> = flat.segments.iter().map(|s| s.tensor.shallow_clone()).collect();
    let before: Vec<bool> = params.iter().map(Tensor::requires_grad).collect();
    for p in &params {
        let _ = p.set_requires_grad(true);
    }
    let summed = (|| -> Result<Vec<Option<Tensor>>> {
        let device = model.device();
        let mut acc: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let order = Tensor::randperm(train.len(), (Kind::Int64, Device::Cpu));
        let cx = Ctx::plain(true);
        for (b, idx) in batches(train.len(), cfg.batch_size).enumerate() {
            if max_batches > 0 && b >= max_batches {
                break;
            }
            let idx = order.index_select(0, &idx);
            let input = train.input.select(&idx, device)?;
            let labels = train.labels.index_select(0, &idx).to_device(device);
            let logits = model.forward(&cx, &input);
            let loss = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, cfg.label_smoothing);
            for (a, g) in acc.iter_mut().zip(Tensor::run_backward(&[&loss], &params, false, false)) {
                if g.defined() {
                    match a {
                        Some(a) => {
                            let _ = a.g_add_(&g);
                        }
                        None => *a = Some(g),
                    }
                }
            }
        }
        Ok(acc)
    })();
    for (p, b) in params.iter().zip(before) {
        let _ = p.set_requires_grad(b);
    }
    let summed = summed?;
    if summed.iter().all(Option::is_none) {
        return Err(Error::MethodConfig {
            method: method.into(),
            message: format!("gradient selection got no gradient from split `{}` (empty, or cached features that skip the backbone)", train.name),
        });
    }
    let scores: Vec<Tensor> = summed
        .into_iter()
        .zip(&flat.segments)
        .map(|(g, s)| g.map_or_else(|| Tensor::zeros([s.numel], (Kind::Float, s.tensor.device())), |g| g.abs().flatten(0, -1).to_kind(Kind::Float)))
        .collect();
    Ok(Tensor::cat(&scores, 0))
}

struct State {
    vs: VarStore,
    flat: Flat,
    indices: Tensor,
    values: Tensor,
}

/// The sparse fine-tuning method (SAFT, SHiRA masks).
pub struct SparseFt {
    config: SparseFtConfig,
    state: Option<State>,
    merged: Option<Merged>,
}

impl SparseFt {
    /// Sparse fine-tuning with `config` (the entries are chosen by `prepare`
    /// or, for gradient selection, by `before_train`).
    pub fn new(config: SparseFtConfig) -> Self {
        SparseFt { config, state: None, merged: None }
    }

    /// Number of trainable entries, once prepared.
    pub fn num_entries(&self) -> Option<i64> {
        self.state.as_ref().map(|s| s.values.numel() as i64)
    }

    /// The selected flat positions (sorted) and their deltas, once prepared.
    pub fn entries(&self) -> Option<(&Tensor, &Tensor)> {
        self.state.as_ref().map(|s| (&s.indices, &s.values))
    }

    fn apply(&self, site: &Site, x: &Tensor, out: Tensor) -> Tensor {
        let Some(s) = self.state.as_ref().filter(|_| self.merged.is_none()) else { return out };
        let Some((w, b)) = s.flat.site(&site.path) else { return out };
        let dw = s.flat.scatter(w, &s.indices, &s.values);
        let db = b.map(|b| s.flat.scatter(b, &s.indices, &s.values));
        add_delta(site, x, out, &dw, db.as_ref())
    }
}

impl Method for SparseFt {
    fn name(&self) -> &'static str {
        "sparse_ft"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        if !(c.density > 0.0 && c.density <= 1.0) {
            return Err(Error::MethodConfig { method: "sparse_ft".into(), message: format!("density must be in (0, 1], got {}", c.density) });
        }
        let flat = Flat::new(model, c.biases, "sparse_ft")?;
        let k = flat.budget(c.density);
        let device = model.device();
        let initial = tch::no_grad(|| match c.selection {
            Selection::Random => random_indices(flat.total, k, device),
            Selection::Magnitude => {
                let scores: Vec<Tensor> = flat.segments.iter().map(|s| s.tensor.abs().flatten(0, -1).to_kind(Kind::Float)).collect();
                top_k(&Tensor::cat(&scores, 0), k)
            }
            Selection::Gradient => spread_indices(flat.total, k, device),
        });
        let vs = VarStore::new(device);
        let indices = vs.root().add("indices", initial, false);
        let values = vs.root().zeros("values", &[k]);
        self.state = Some(State { vs, flat, indices, values });
        self.merged = None;
        Ok(())
    }

    /// Gradient selection. Skipped when the values are no longer all zero (a
    /// restored or already trained delta keeps the positions it came with).
    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let train = data.train;
        let Some(s) = self.state.as_mut() else { return Ok(()) };
        if self.config.selection != Selection::Gradient || s.values.abs().max().double_value(&[]) != 0.0 {
            return Ok(());
        }
        let scores = gradient_scores(model, &s.flat, train, cfg, self.config.selection_batches, "sparse_ft")?;
        let chosen = top_k(&scores, s.values.numel() as i64);
        tch::no_grad(|| s.indices.copy_(&chosen));
        Ok(())
    }

    fn linear(&self, site: &Site, x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.apply(site, x, out)
    }

    fn conv(&self, site: &Site, x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.apply(site, x, out)
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.state.as_ref().map(|s| &s.vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.state.as_mut().map(|s| &mut s.vs)
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn merge(&mut self, _model: &Model) -> Result<()> {
        if let (Some(s), None) = (&self.state, &self.merged) {
            self.merged = Some(s.flat.merge_sparse(&s.indices, &s.values));
        }
        Ok(())
    }

    fn unmerge(&mut self, _model: &Model) -> Result<()> {
        if let (Some(s), Some(m)) = (&self.state, self.merged.take()) {
            s.flat.unmerge(m);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing;
    use zhijian_core::layers::{Conv2d, Linear, Padding};
    use zhijian_core::{Backbone, Input, ParamGroup};

    /// The one hookable layer of [`OneSite`].
    pub(crate) enum Layer {
        Linear(Linear),
        Conv(Conv2d),
    }

    /// A one-site backbone on `Input::Images`: `features = L x` for a linear
    /// layer (`x`: `[n, in]`), the mean over pixels of `conv(x)` for a convolution.
    pub(crate) struct OneSite(pub Layer);

    impl OneSite {
        fn site(&self) -> &Site {
            match &self.0 {
                Layer::Linear(l) => l.site(),
                Layer::Conv(c) => c.site(),
            }
        }
    }

    impl Backbone for OneSite {
        fn arch(&self) -> &str {
            "one_site"
        }
        fn hidden_size(&self) -> i64 {
            self.site().out_features
        }
        fn num_blocks(&self) -> usize {
            1
        }
        fn sites(&self) -> Vec<Site> {
            vec![self.site().clone()]
        }
        fn group(&self, _: &str) -> ParamGroup {
            ParamGroup::Block(0)
        }
        fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
            let Input::Images(x) = input else { unreachable!("one_site takes Input::Images") };
            match &self.0 {
                Layer::Linear(l) => l.forward(cx, x),
                Layer::Conv(c) => c.forward(cx, x).mean_dim(&[2i64, 3][..], false, Kind::Float),
            }
        }
    }

    /// A linear site `proj` 4 → 3 with bias, and a 2-class head.
    pub(crate) fn linear_model() -> Model {
        tch::manual_seed(3);
        Model::new(Device::Cpu, 2, |p| Box::new(OneSite(Layer::Linear(Linear::new(p / "proj", 4, 3, true, Role::Query)))))
    }

    /// A strided, grouped, TF-"same"-padded 3×3 convolution 4 → 6 with bias.
    pub(crate) fn conv_model() -> Model {
        tch::manual_seed(4);
        Model::new(Device::Cpu, 2, |p| Box::new(OneSite(Layer::Conv(Conv2d::new(p / "conv", 4, 6, 3, 2, Padding::TfSame, 2, true)))))
    }

    fn methods(m: SparseFt) -> Vec<Box<dyn Method>> {
        vec![Box::new(m)]
    }

    fn outputs(model: &Model, methods: &[Box<dyn Method>], x: &Input) -> Tensor {
        tch::no_grad(|| model.forward(&Ctx::new(false, methods, Vec::new()), x))
    }

    /// Sets the values of a prepared method to random numbers.
    fn randomise(m: &SparseFt) {
        let values = &m.state.as_ref().unwrap().values;
        tch::no_grad(|| values.shallow_clone().copy_(&Tensor::randn(values.size(), (Kind::Float, Device::Cpu))));
    }

    /// Builds the dense delta of every segment with a host loop over the entries.
    pub(crate) fn dense_by_hand(flat: &Flat, indices: &Tensor, values: &Tensor) -> Vec<Tensor> {
        let idx = Vec::<i64>::try_from(indices).unwrap();
        let val = Vec::<f32>::try_from(values.detach()).unwrap();
        flat.segments
            .iter()
            .map(|s| {
                let mut d = vec![0f32; s.numel as usize];
                for (&i, &v) in idx.iter().zip(&val) {
                    if i >= s.start && i < s.start + s.numel {
                        d[(i - s.start) as usize] += v;
                    }
                }
                Tensor::from_slice(&d).view(s.tensor.size().as_slice())
            })
            .collect()
    }

    /// On a one-site linear model with a hand-computed gradient
    /// `∂L/∂W = Σₙ Hᵀ(pₙ − yₙ) xₙᵀ`, `∂L/∂b = Σₙ Hᵀ(pₙ − yₙ)` (summed
    /// cross-entropy through the head `H`), the selection is exactly the top k of
    /// `|∂L/∂θ|` over the 12 weights and 3 biases together; the weights are
    /// frozen again afterwards.
    #[test]
    fn gradient_selection_is_the_top_k_of_the_summed_gradient() {
        let model = linear_model();
        model.freeze_backbone();
        let mut m = SparseFt::new(SparseFtConfig { density: 5.0 / 15.0, selection_batches: 0, ..Default::default() });
        m.prepare(&model).unwrap();
        tch::manual_seed(11);
        let x = Tensor::randn([7, 4], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 1, 0, 1, 0, 0]);
        let train = Split { name: "train".into(), input: Input::Images(x.shallow_clone()), labels: labels.shallow_clone() };
        // Batches of 3 (the last one of 1): the sum must span them all.
        let cfg = TrainConfig { batch_size: 3, ..Default::default() };
        m.before_train(&model, &RunData::train_only(&train), &cfg).unwrap();

        let v = model.vs.variables();
        let (w, b, h, hb) = (&v["proj.weight"], &v["proj.bias"], &v["head.weight"], &v["head.bias"]);
        let logits = (x.matmul(&w.tr()) + b).matmul(&h.tr()) + hb;
        let err = logits.softmax(-1, Kind::Float) - labels.one_hot(2).to_kind(Kind::Float); // [7, 2]
        let back = err.matmul(h); // [7, 3]: Hᵀ(p − y) per example
        let grad_w = back.tr().matmul(&x); // [3, 4]
        let grad_b = back.sum_dim_intlist(0, false, Kind::Float);
        let scores = Tensor::cat(&[grad_w.flatten(0, -1), grad_b], 0).abs();
        let want = Vec::<i64>::try_from(scores.argsort(0, true).narrow(0, 0, 5).sort(0, false).0).unwrap();
        let got = Vec::<i64>::try_from(m.entries().unwrap().0).unwrap();
        assert_eq!(got, want, "scores {scores}");
        assert!(!w.requires_grad() && !b.requires_grad());
        assert!(!w.grad().defined(), "the selection must not leave gradients on the backbone");
    }

    /// Random selection picks exactly k distinct, sorted positions in range;
    /// magnitude selection picks the k largest pre-trained |θ|.
    #[test]
    fn random_and_magnitude_selection() {
        let model = testing::bert(0);
        let mut m = SparseFt::new(SparseFtConfig { density: 0.05, selection: Selection::Random, ..Default::default() });
        m.prepare(&model).unwrap();
        let flat = &m.state.as_ref().unwrap().flat;
        let k = (0.05 * flat.total as f64).ceil() as i64;
        let idx = Vec::<i64>::try_from(m.entries().unwrap().0).unwrap();
        assert_eq!(idx.len() as i64, k);
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert!(idx[0] >= 0 && *idx.last().unwrap() < flat.total);
        // Dense enough to take the permutation path: still exactly k distinct.
        let mut dense = SparseFt::new(SparseFtConfig { density: 0.5, selection: Selection::Random, ..Default::default() });
        dense.prepare(&model).unwrap();
        let idx = Vec::<i64>::try_from(dense.entries().unwrap().0).unwrap();
        assert_eq!(idx.len() as i64, dense.state.as_ref().unwrap().flat.budget(0.5));
        assert!(idx.windows(2).all(|w| w[0] < w[1]));

        let model = linear_model();
        let mut m = SparseFt::new(SparseFtConfig { density: 0.2, selection: Selection::Magnitude, ..Default::default() });
        m.prepare(&model).unwrap();
        let v = model.vs.variables();
        let all = Tensor::cat(&[v["proj.weight"].flatten(0, -1), v["proj.bias"].shallow_clone()], 0).abs();
        let want = Vec::<i64>::try_from(all.argsort(0, true).narrow(0, 0, 3).sort(0, false).0).unwrap();
        assert_eq!(Vec::<i64>::try_from(m.entries().unwrap().0).unwrap(), want);
    }

    /// The hook adds exactly `x·ΔWᵀ + Δb` (linear) and the convolution with
    /// `ΔW`, `Δb` (strided, grouped, TF-"same" convolution), with ΔW built by a
    /// host loop; the model's output equals the plain model with `W + ΔW`.
    #[test]
    fn hook_adds_the_scattered_delta() {
        for model in [linear_model(), conv_model()] {
            let mut m = SparseFt::new(SparseFtConfig { density: 0.3, selection: Selection::Random, ..Default::default() });
            m.prepare(&model).unwrap();
            randomise(&m);
            let s = m.state.as_ref().unwrap();
            let dense = dense_by_hand(&s.flat, &s.indices, &s.values);
            for (i, d) in dense.iter().enumerate() {
                assert!(s.flat.scatter(i, &s.indices, &s.values).allclose(d, 1e-6, 1e-7, false));
            }
            let site = model.sites()[0].clone();
            let x = match site.conv {
                Some(_) => Tensor::randn([2, 4, 7, 9], (Kind::Float, Device::Cpu)),
                None => Tensor::randn([5, 4], (Kind::Float, Device::Cpu)),
            };
            if site.conv.is_none() {
                let base = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
                let got = m.linear(&site, &x, base.shallow_clone(), false);
                let want = &base + x.matmul(&dense[0].tr()) + &dense[1];
                assert!(got.allclose(&want, 1e-5, 1e-6, false));
                let other = Site::new("other".into(), 4, 3, Role::Query);
                assert!(m.linear(&other, &x, base.shallow_clone(), false).equal(&base));
            }
            let input = Input::Images(x);
            let all = methods(m);
            let adapted = outputs(&model, &all, &input);
            let v = model.vs.variables();
            let (w, b) = (&v[&format!("{}.weight", site.path)], &v[&format!("{}.bias", site.path)]);
            let (w0, b0) = (w.copy(), b.copy());
            tch::no_grad(|| {
                w.shallow_clone().copy_(&(&w0 + &dense[0]));
                b.shallow_clone().copy_(&(&b0 + &dense[1]));
            });
            let by_weights = outputs(&model, &[], &input);
            tch::no_grad(|| {
                w.shallow_clone().copy_(&w0);
                b.shallow_clone().copy_(&b0);
            });
            assert!(adapted.allclose(&by_weights, 1e-5, 1e-5, false), "{}", site.path);
        }
    }

    /// Merging gives the unmerged outputs; unmerging restores every weight bit for bit.
    #[test]
    fn merge_then_unmerge_is_bit_exact() {
        for model in [testing::vit(1), testing::efficientnet(1)] {
            let x = testing::images();
            let mut m = SparseFt::new(SparseFtConfig { density: 0.05, selection: Selection::Random, ..Default::default() });
            m.prepare(&model).unwrap();
            randomise(&m);
            let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let mut all = methods(m);
            let unmerged = outputs(&model, &all, &x);
            assert!(!outputs(&model, &[], &x).allclose(&unmerged, 1e-4, 1e-4, false), "the delta must matter");
            all[0].merge(&model).unwrap();
            let merged = outputs(&model, &all, &x);
            assert!(merged.allclose(&unmerged, 1e-4, 1e-4, false), "{}", model.backbone.arch());
            all[0].unmerge(&model).unwrap();
            let after = model.vs.variables();
            for (n, t) in &before {
                assert!(after[n].equal(t), "{n} differs after unmerge");
            }
            assert!(outputs(&model, &all, &x).allclose(&unmerged, 1e-6, 1e-6, false));
        }
    }

    /// Right after `prepare` the output is exactly the plain model's, on every family.
    #[test]
    fn identity_at_init() {
        for (model, x) in [
            (testing::bert(2), testing::tokens()),
            (testing::vit(2), testing::images()),
            (testing::efficientnet(2), testing::images()),
            (testing::cnn(2), testing::images()),
        ] {
            let mut m = SparseFt::new(SparseFtConfig { density: 0.1, selection: Selection::Random, ..Default::default() });
            m.prepare(&model).unwrap();
            assert!(m.identity_at_init());
            let all = methods(m);
            assert!(outputs(&model, &all, &x).equal(&outputs(&model, &[], &x)), "{}", model.backbone.arch());
        }
    }

    /// A short run through the engine: gradient selection, only the values and
    /// the head change, and an artifact restored into a fresh model and method
    /// (indices included) gives the same outputs.
    #[test]
    fn train_save_restore_round_trip() {
        use zhijian_core::train::{TrainOptions, artifact, method_variables, prepare, restore, train};
        let x = testing::images();
        let split = Split { name: "train".into(), input: testing::images(), labels: testing::labels() };
        let model = testing::vit(5);
        let frozen: Vec<(String, Tensor)> = model.vs.variables().into_iter().filter(|(n, _)| !n.starts_with("head.")).map(|(n, t)| (n, t.copy())).collect();
        let mut all = methods(SparseFt::new(SparseFtConfig { density: 0.02, ..Default::default() }));
        prepare(&model, &mut all, 0).unwrap();
        let placeholder = method_variables(&all).into_iter().find(|(n, _)| n == "sparse_ft/indices").unwrap().1.copy();
        let cfg = TrainConfig { batch_size: 3, max_steps: 2, lr: 1e-2, ..Default::default() };
        train(&model, &mut all, &split, None, &cfg, &TrainOptions::default()).unwrap();
        let vars = method_variables(&all);
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sparse_ft/indices", "sparse_ft/values"]);
        assert!(!vars[0].1.equal(&placeholder), "before_train must select");
        assert!(vars[1].1.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the values must train");
        let after = model.vs.variables();
        for (n, t) in &frozen {
            assert!(after[n].equal(t), "{n} is frozen but changed");
        }
        let want = outputs(&model, &all, &x);

        let dir = std::env::temp_dir().join(format!("zhijian-sparse-ft-{}", std::process::id()));
        let path = dir.join("a.safetensors");
        zhijian_core::save_atomic(&artifact(&model, &all), &path).unwrap();
        let fresh = testing::with_weights(testing::vit(5), &frozen);
        let mut again = methods(SparseFt::new(SparseFtConfig { density: 0.02, ..Default::default() }));
        prepare(&fresh, &mut again, 0).unwrap();
        restore(&fresh, &again, &path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let restored = method_variables(&again);
        assert!(restored[0].1.equal(&vars[0].1), "the indices must survive the round trip");
        assert!(outputs(&fresh, &again, &x).equal(&want));
    }

    #[test]
    fn bad_density_and_a_backbone_without_layers_are_errors() {
        let model = linear_model();
        for density in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(SparseFt::new(SparseFtConfig { density, ..Default::default() }).prepare(&model).is_err(), "{density}");
        }
        assert!(SparseFt::new(SparseFtConfig { density: 1.0, ..Default::default() }).prepare(&model).is_ok());
        let norm_only = Model::new(Device::Cpu, 2, |p| Box::new(NormOnly(zhijian_core::layers::LayerNorm::new(p / "ln", 4, 1e-5))));
        let err = SparseFt::new(SparseFtConfig::default()).prepare(&norm_only).unwrap_err();
        assert!(err.to_string().contains("sparse_ft") && err.to_string().contains("norm_only"), "{err}");
    }

    /// The config survives TOML both ways (the selection as a snake-case name); a typo names itself.
    #[test]
    fn config_round_trips_through_toml() {
        let c = SparseFtConfig { density: 0.02, selection: Selection::Magnitude, selection_batches: 7, biases: false };
        let table = SparseFt::new(c.clone()).config();
        assert_eq!(table["selection"].as_str(), Some("magnitude"));
        assert_eq!(zhijian_core::parse_config::<SparseFtConfig>("sparse_ft", &table).unwrap(), c);
        let typo: toml::Table = toml::from_str("densty = 0.1").unwrap();
        assert!(zhijian_core::parse_config::<SparseFtConfig>("sparse_ft", &typo).unwrap_err().to_string().contains("densty"));
    }

    /// A backbone whose only site is a norm: nothing for sparse methods to adapt.
    pub(crate) struct NormOnly(pub zhijian_core::layers::LayerNorm);

    impl Backbone for NormOnly {
        fn arch(&self) -> &str {
            "norm_only"
        }
        fn hidden_size(&self) -> i64 {
            4
        }
        fn num_blocks(&self) -> usize {
            1
        }
        fn sites(&self) -> Vec<Site> {
            vec![self.0.site().clone()]
        }
        fn group(&self, _: &str) -> ParamGroup {
            ParamGroup::Block(0)
        }
        fn forward(&self, cx: &Ctx, input: &Input) -> Tensor {
            let Input::Images(x) = input else { unreachable!() };
            self.0.forward(cx, x)
        }
    }
}
