//! LoRA: low-rank adaptation (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>),
//! with the DoRA and rsLoRA variants and per-site ranks as flags.
//!
//! At each target linear layer with frozen weight `W` (`[out, in]`), the output
//! becomes `W x + s · B A dropout(x)` with `A: [r, in]` (Kaiming-uniform,
//! as PEFT), `B: [out, r]` (zeros) and `s = α / r`, so the model is unchanged at
//! initialisation.
//!
//! - trains: every `A`, `B` (and DoRA's magnitudes `m`) and the head; frozen: the whole backbone.
//! - merges: `W ← W + s B A` folds the update into the backbone, so
//!   inference costs nothing extra; `unmerge` subtracts it again.
//! - artifact: the adapter alone (`A`, `B` per site, named `<site>.lora_A` /
//!   `.lora_B`, and `<site>.lora_magnitude` with DoRA).
//!
//! On a convolution with weight `[out, in/groups, kh, kw]` the same low-rank
//! update applies to the weight seen as a matrix `[out, in/groups·kh·kw]`
//! (`A: [r, in/groups·kh·kw]`), and the hook adds the convolution of the input
//! with `s · B A` reshaped to the kernel — loralib's `ConvLoRA`
//! formulation, which makes merging exact for every kernel size and grouping.
//!
//! **rsLoRA** (`rslora = true`; Kalajdzievski 2023, <https://arxiv.org/abs/2312.03732>):
//! `s = α / √r`, which keeps the update's scale stable as the rank grows.
//!
//! **Per-site ranks** (`rank_pattern`, `alpha_pattern`, as PEFT's): the first
//! matching key (in key order) sets a site's `r` (or `α`); `s` uses the site's own values.
//!
//! **DoRA** (`use_dora = true`; Liu et al. 2024, <https://arxiv.org/abs/2402.09353>):
//! the adapted weight is `m ⊙ (W + s B A) / ‖W + s B A‖`, the norm taken per
//! output row (over `in`, or over `in/groups·kh·kw` for a convolution), with a
//! trainable magnitude `m: [out]` initialised to `‖W‖` — so the model is still
//! unchanged at initialisation (`B = 0`, `m / ‖W‖ = 1`). As in the paper (§4.3)
//! and HF PEFT, the norm is a constant for backpropagation (detached), and the
//! hook adds `(m/‖W + sBA‖ − 1) ⊙ W x + m/‖W + sBA‖ ⊙ s B A x` to the layer's
//! output, which equals `m/‖·‖ ⊙ (W + sBA) x + b`: the bias is not rescaled.
//! `W x` is recomputed from the hook's input rather than read off the output,
//! which would be wrong once dropout is on or another method has changed the
//! output first; with dropout, both DoRA terms see the dropped input, as in PEFT.
//! Merging writes `W ← m ⊙ (W + sBA) / ‖W + sBA‖` after keeping a copy of `W`,
//! which `unmerge` restores bit for bit (the copy costs one weight tensor per
//! DoRA site while merged); plain LoRA sites merge by addition, as before.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{Init, VarStore};
use zhijian_core::layers::dropout;
use zhijian_core::precision::cast_like;
use zhijian_core::targets::select_sites;
use zhijian_core::{Error, Method, Model, Result, Role, Site, config_table};

/// Configuration of LoRA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update (of every site `rank_pattern` does not match). Default 8.
    pub rank: i64,
    /// Scale numerator: the update is multiplied by `alpha / rank` (or
    /// `alpha / √rank` with `rslora`). Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.
    pub dropout: f64,
    /// Sites to adapt: exact paths, dot-suffixes (`query`) or `re:<regex>`.
    /// Empty (the default) means the attention query and value projections (or
    /// the fused `qkv`) of every block, as in the paper; on a backbone without
    /// attention (a CNN, an MLP), every 1×1 and full k×k convolution and every
    /// linear layer, except the stem, depthwise convolutions and the head.
    pub targets: Vec<String>,
    /// DoRA: learn a per-output-row magnitude `m` and adapt only the direction,
    /// `m ⊙ (W + sBA) / ‖W + sBA‖` (see the module docs). Default false.
    pub use_dora: bool,
    /// rsLoRA: scale by `alpha / √rank` instead of `alpha / rank`. Default false.
    pub rslora: bool,
    /// Per-site ranks: keys are target patterns (exact path, dot-suffix or
    /// `re:<regex>`, as in `targets`); the first key (in key order) matching a
    /// site gives its rank, other sites take `rank`. A key matching no adapted
    /// site is an error. Default empty.
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-site `alpha`, matched like `rank_pattern`. Default empty.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Vec::new(),
            use_dora: false,
            rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// DoRA's state at one site.
struct Dora {
    /// Trainable magnitude `[out]`.
    m: Tensor,
    /// The frozen weight (shares storage with the model's variable).
    w: Tensor,
    /// A copy of the frozen weight, kept while merged so unmerge is exact.
    saved: Option<Tensor>,
}

struct Pair {
    a: Tensor,
    b: Tensor,
    /// `α / r` (or `α / √r`) with the site's own rank and alpha.
    scale: f64,
    dora: Option<Dora>,
}

/// The L2 norm of each output row of a weight (`[out, …]` → `[out]`), over
/// everything else: `in` for a linear layer, `in/groups·kh·kw` for a convolution.
fn row_norm(w: &Tensor) -> Tensor {
    // The floor only keeps an all-zero row from dividing 0 by 0.
    w.flatten(1, -1).norm_scalaropt_dim(2, [1], false).clamp_min(1e-12)
}

/// Which value of a `*_pattern` map applies to each site: the first key (in
/// key order) whose pattern matches. A key matching none of `sites` is an error.
fn pattern_values<T: Copy>(field: &str, map: &BTreeMap<String, T>, sites: &[Site]) -> Result<BTreeMap<String, T>> {
    let mut values = BTreeMap::new();
    for (key, &value) in map {
        let matched = select_sites(std::slice::from_ref(key), sites).map_err(|e| match e {
            Error::NoMatchingSites { sites, .. } => Error::MethodConfig {
                method: "lora".into(),
                message: format!("{field} key `{key}` matches no adapted site; adapted sites are: {}", sites.join(", ")),
            },
            other => other,
        })?;
        for site in matched {
            values.entry(site.path).or_insert(value);
        }
    }
    Ok(values)
}

/// The LoRA method.
pub struct Lora {
    config: LoraConfig,
    vs: Option<VarStore>,
    pairs: BTreeMap<String, Pair>,
    merged: bool,
}

impl Lora {
    /// LoRA with `config` (parameters are created by `prepare`).
    pub fn new(config: LoraConfig) -> Self {
        Lora { config, vs: None, pairs: BTreeMap::new(), merged: false }
    }

    /// Paths of the adapted sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    /// The scale `s` of the update at `site` (after `prepare`).
    pub fn scale(&self, site: &str) -> Option<f64> {
        self.pairs.get(site).map(|p| p.scale)
    }

    /// The rank `r` of the update at `site` (after `prepare`).
    pub fn rank(&self, site: &str) -> Option<i64> {
        self.pairs.get(site).map(|p| p.a.size()[0])
    }

    fn scale_for(&self, rank: i64, alpha: f64) -> f64 {
        if self.config.rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 }
    }

    /// Merges (`sign = 1`) or unmerges (`sign = -1`) every site: plain LoRA
    /// sites by `W ← W ± s B A`, DoRA sites by writing the merged weight over a
    /// kept copy of `W`, and restoring it.
    fn fold(&mut self, model: &Model, sign: f64) -> Result<()> {
        let weights = model.vs.variables();
        tch::no_grad(|| {
            for (site, pair) in &mut self.pairs {
                let name = format!("{site}.weight");
                let mut w = weights.get(&name).ok_or_else(|| Error::MissingWeights { path: "<model>".into(), names: vec![name.clone()] })?.shallow_clone();
                let delta = pair.b.matmul(&pair.a).reshape(w.size()) * pair.scale;
                match &mut pair.dora {
                    None => {
                        let _ = w.g_add_(&(delta * sign).to_kind(w.kind()));
                    }
                    Some(dora) if sign > 0.0 => {
                        let original = w.copy();
                        let direction = &original + delta.to_kind(w.kind());
                        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, w.dim() - 1)).collect();
                        let ratio = (&dora.m / row_norm(&direction)).view(shape.as_slice());
                        w.copy_(&(direction * ratio));
                        dora.saved = Some(original);
                    }
                    Some(dora) => {
                        if let Some(original) = dora.saved.take() {
                            w.copy_(&original);
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

impl LoraConfig {
    /// Rejects values no backbone can take (checked when the config is parsed
    /// and again in `prepare`, for configs built in code).
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "lora".into(), message });
        if self.rank < 1 {
            return bad(format!("rank must be ≥ 1, got {}", self.rank));
        }
        if let Some((k, r)) = self.rank_pattern.iter().find(|(_, r)| **r < 1) {
            return bad(format!("rank_pattern `{k}` must be ≥ 1, got {r}"));
        }
        if !self.alpha.is_finite() || self.alpha_pattern.values().any(|a| !a.is_finite()) {
            return bad(format!("alpha and alpha_pattern values must be finite, got {} and {:?}", self.alpha, self.alpha_pattern));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        Ok(())
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        // Norm layers have no weight matrix to update.
        let all: Vec<Site> = model.sites().into_iter().filter(|s| s.role != Role::Norm).collect();
        let sites = if c.targets.is_empty() {
            let with_role = |roles: &[Role]| all.iter().filter(|s| roles.contains(&s.role)).cloned().collect::<Vec<_>>();
            let mut s = with_role(&[Role::Query, Role::Value, Role::Qkv]);
            if s.is_empty() {
                s = with_role(&[Role::Pointwise, Role::Spatial, Role::MlpUp, Role::MlpDown, Role::Other]);
            }
            if s.is_empty() {
                return Err(Error::NoMatchingSites {
                    pattern: "<default: attention query/value, else 1×1 / k×k convolutions and linear layers>".into(),
                    sites: all.iter().map(|s| s.path.clone()).collect(),
                });
            }
            s
        } else {
            select_sites(&c.targets, &all)?
        };
        let ranks = pattern_values("rank_pattern", &c.rank_pattern, &sites)?;
        let alphas = pattern_values("alpha_pattern", &c.alpha_pattern, &sites)?;
        let weights = model.vs.variables();
        let vs = VarStore::new(model.device());
        self.pairs.clear();
        for site in &sites {
            let (rank, alpha) = (ranks.get(&site.path).copied().unwrap_or(c.rank), alphas.get(&site.path).copied().unwrap_or(c.alpha));
            let p = site.path.split('.').fold(vs.root(), |p, part| p / part);
            // A convolution's weight, seen as a matrix, has in/groups·kh·kw columns.
            let fan_in = site.conv.map_or(site.in_features, |g| site.in_features / g.groups * g.kernel[0] * g.kernel[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a = p.var("lora_A", &[rank, fan_in], Init::Uniform { lo: -bound, up: bound });
            let b = p.zeros("lora_B", &[site.out_features, rank]);
            let dora = if c.use_dora {
                let name = format!("{}.weight", site.path);
                let w = weights.get(&name).ok_or_else(|| Error::MissingWeights { path: "<model>".into(), names: vec![name.clone()] })?;
                let m = p.var_copy("lora_magnitude", &tch::no_grad(|| row_norm(w)));
                Some(Dora { m, w: w.shallow_clone(), saved: None })
            } else {
                None
            };
            let scale = self.scale_for(rank, alpha);
            self.pairs.insert(site.path.clone(), Pair { a, b, scale, dora });
        }
        self.vs = Some(vs);
        self.merged = false;
        Ok(())
    }

    fn linear(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        match self.pairs.get(&site.path) {
            Some(pair) if !self.merged => {
                let x = dropout(x, self.config.dropout, train);
                // In the activations' precision (bf16 under mixed precision).
                let linear = |t: &Tensor, w: &Tensor| t.linear::<Tensor>(&cast_like(w, &x), None);
                // The scale goes on the small B, not on the [tokens, out] update.
                let update = linear(&linear(&x, &pair.a), &(&pair.b * pair.scale));
                match &pair.dora {
                    None => out + update,
                    Some(dora) => {
                        let ratio = dora_ratio(dora, &pair.b.matmul(&pair.a), pair.scale);
                        out + (&ratio - 1.0) * linear(&x, &dora.w) + ratio * update
                    }
                }
            }
            _ => out,
        }
    }

    fn conv(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        match (self.pairs.get(&site.path), site.conv) {
            (Some(pair), Some(g)) if !self.merged => {
                let x = dropout(x, self.config.dropout, train);
                let kernel = [site.out_features, site.in_features / g.groups, g.kernel[0], g.kernel[1]];
                let delta = pair.b.matmul(&pair.a).reshape(kernel);
                let conv = |w: &Tensor| x.conv2d::<Tensor>(&cast_like(w, &x), None, [g.stride; 2], [g.padding; 2], [1, 1], g.groups);
                let update = conv(&(&delta * pair.scale));
                match &pair.dora {
                    None => out + update,
                    Some(dora) => {
                        let ratio = dora_ratio(dora, &delta, pair.scale).view([1, -1, 1, 1]);
                        out + (&ratio - 1.0) * conv(&dora.w) + ratio * update
                    }
                }
            }
            _ => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    /// The earliest adapted site's block: LoRA on the top blocks leaves the
    /// ones below frozen and unchanged, so they can be cached.
    fn first_block(&self, model: &Model) -> Option<usize> {
        self.pairs.keys().map(|site| model.block_of_site(site)).min()
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut()
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn merge(&mut self, model: &Model) -> Result<()> {
        if !self.merged {
            self.fold(model, 1.0)?;
            self.merged = true;
        }
        Ok(())
    }

    fn unmerge(&mut self, model: &Model) -> Result<()> {
        if self.merged {
            self.fold(model, -1.0)?;
            self.merged = false;
        }
        Ok(())
    }
}

/// DoRA's per-row factor `m / ‖W + s·BA‖` (`[out]`), the norm detached from the
/// graph (DoRA §4.3): gradients reach `m` through the ratio and `A`, `B` only
/// through the update term.
fn dora_ratio(dora: &Dora, ba: &Tensor, scale: f64) -> Tensor {
    let norm = row_norm(&(&dora.w + ba.reshape(dora.w.size()).to_kind(dora.w.kind()) * scale)).detach();
    &dora.m / norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};
    use zhijian_core::layers::Linear;
    use zhijian_core::layers::{Conv2d, Padding};
    use zhijian_core::{Backbone, Ctx, Input, ParamGroup};

    /// The one hookable layer of [`OneSite`].
    enum Layer {
        Linear(Linear),
        Conv(Conv2d),
    }

    /// A one-site backbone: `features = L x` for a linear layer on features,
    /// the mean over pixels of `conv(x)` for a convolution on images.
    struct OneSite(Layer);

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
            match (&self.0, input) {
                (Layer::Linear(l), Input::Features(x)) => l.forward(cx, x),
                (Layer::Conv(c), Input::Images(x)) => c.forward(cx, x).mean_dim(&[2i64, 3][..], false, Kind::Float),
                _ => unreachable!("a linear site takes features, a convolution images"),
            }
        }
    }

    fn linear(role: Role) -> Model {
        Model::new(Device::Cpu, 2, |p| Box::new(OneSite(Layer::Linear(Linear::new(p / "proj", 4, 3, true, role)))))
    }

    /// The hook adds exactly (α/r)·B·A·x, and merging folds the same matrix into W.
    #[test]
    fn update_is_scaled_low_rank_product() {
        let model = linear(Role::Query);
        let mut lora = Lora::new(LoraConfig { rank: 2, alpha: 6.0, ..Default::default() });
        lora.prepare(&model).unwrap();
        let pair = &lora.pairs["proj"];
        tch::no_grad(|| pair.b.shallow_clone().copy_(&Tensor::randn([3, 2], (Kind::Float, Device::Cpu))));
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let base = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let site = model.sites()[0].clone();
        let other = Site::new("other".into(), 4, 3, Role::Query);
        let got = lora.linear(&site, &x, base.shallow_clone(), false);
        let want = &base + x.matmul(&pair.a.tr()).matmul(&pair.b.tr()) * 3.0;
        assert!(got.allclose(&want, 1e-5, 1e-6, false));
        assert!(lora.linear(&other, &x, base.shallow_clone(), false).equal(&base));

        let w0 = model.vs.variables()["proj.weight"].copy();
        let delta = pair.b.matmul(&pair.a) * 3.0;
        lora.merge(&model).unwrap();
        let w1 = model.vs.variables()["proj.weight"].copy();
        assert!(w1.allclose(&(&w0 + &delta), 1e-5, 1e-6, false));
        // While merged the hook adds nothing (the update is in W already).
        assert!(lora.linear(&site, &x, base.shallow_clone(), false).equal(&base));
        lora.unmerge(&model).unwrap();
        assert!(model.vs.variables()["proj.weight"].allclose(&w0, 1e-5, 1e-6, false));
    }

    #[test]
    fn bad_rank_and_unmatched_target_are_errors() {
        let model = linear(Role::Depthwise);
        assert!(Lora::new(LoraConfig { rank: 0, ..Default::default() }).prepare(&model).is_err());
        // The default targets skip depthwise convolutions (and stems, and heads): nothing is left.
        let err = Lora::new(LoraConfig::default()).prepare(&model).err().unwrap();
        assert!(err.to_string().contains("proj"), "{err}");
        let err = Lora::new(LoraConfig { targets: vec!["value".into()], ..Default::default() }).prepare(&model).err().unwrap();
        assert!(matches!(err, Error::NoMatchingSites { .. }));
    }

    /// On a strided, grouped, TF-"same"-padded 3×3 convolution the hook equals a
    /// convolution with `W + (α/r)·(B A reshaped)`, and merging gives the same outputs.
    #[test]
    fn conv_update_is_a_low_rank_kernel_delta() {
        let model = Model::new(Device::Cpu, 2, |p| Box::new(OneSite(Layer::Conv(Conv2d::new(p / "conv", 4, 6, 3, 2, Padding::TfSame, 2, true)))));
        let mut lora = Lora::new(LoraConfig { rank: 3, alpha: 6.0, ..Default::default() });
        lora.prepare(&model).unwrap(); // the default targets find the k×k convolution
        let pair = &lora.pairs["conv"];
        assert_eq!(pair.a.size(), [3, 2 * 3 * 3]);
        tch::no_grad(|| pair.b.shallow_clone().copy_(&Tensor::randn([6, 3], (Kind::Float, Device::Cpu))));
        let delta = pair.b.matmul(&pair.a).reshape([6, 2, 3, 3]) * 2.0;
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(lora)];
        let x = Input::Images(Tensor::randn([2, 4, 7, 9], (Kind::Float, Device::Cpu)));
        let adapted = model.backbone.forward(&Ctx::new(false, &methods, Vec::new()), &x);

        let weight = model.vs.variables()["conv.weight"].shallow_clone();
        let w0 = weight.copy();
        tch::no_grad(|| weight.shallow_clone().copy_(&(&w0 + &delta)));
        let by_kernel = model.backbone.forward(&Ctx::plain(false), &x);
        assert!(adapted.allclose(&by_kernel, 1e-5, 1e-5, false));
        tch::no_grad(|| weight.shallow_clone().copy_(&w0));

        methods[0].merge(&model).unwrap();
        let merged = model.backbone.forward(&Ctx::new(false, &methods, Vec::new()), &x);
        assert!(merged.allclose(&by_kernel, 1e-5, 1e-5, false));
        methods[0].unmerge(&model).unwrap();
        assert!(weight.allclose(&w0, 1e-5, 1e-6, false));
    }

    fn randomise(t: &Tensor, std: f64) {
        tch::no_grad(|| {
            let _ = t.shallow_clone().g_add_(&(t.randn_like() * std));
        });
    }

    /// The DoRA weight `m ⊙ (W + s·BA) / ‖W + s·BA‖_row`, written out by hand.
    fn dora_weight(w: &Tensor, pair: &Pair) -> Tensor {
        let d = w + pair.b.matmul(&pair.a).reshape(w.size()) * pair.scale;
        let norm = d.flatten(1, -1).pow_tensor_scalar(2).sum_dim_intlist(1, false, None).sqrt();
        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, w.dim() - 1)).collect();
        d * (pair.dora.as_ref().unwrap().m.detach() / norm).view(shape.as_slice())
    }

    /// On a linear layer with a bias, the DoRA hook gives `x W'ᵀ + b` with the
    /// hand-written DoRA weight `W'` (the bias unscaled); gradients see the
    /// norm as a constant; merging writes `W'`; unmerging restores `W` exactly.
    #[test]
    fn dora_linear_matches_the_formula() {
        let model = linear(Role::Query);
        let mut lora = Lora::new(LoraConfig { rank: 2, alpha: 6.0, use_dora: true, ..Default::default() });
        lora.prepare(&model).unwrap();
        let vars = model.vs.variables();
        let (w, bias) = (vars["proj.weight"].shallow_clone(), vars["proj.bias"].detach());
        let pair = &lora.pairs["proj"];
        assert!(pair.dora.as_ref().unwrap().m.allclose(&w.detach().pow_tensor_scalar(2).sum_dim_intlist(1, false, None).sqrt(), 1e-6, 1e-7, false));
        randomise(&pair.b, 1.0);
        randomise(&pair.dora.as_ref().unwrap().m, 0.3);
        let site = model.sites()[0].clone();
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let base = x.linear(&w.detach(), Some(&bias));
        let got = lora.linear(&site, &x, base.shallow_clone(), false);
        let w_dora = dora_weight(&w.detach(), pair);
        let want = x.linear(&w_dora, Some(&bias));
        assert!(got.allclose(&want, 1e-5, 1e-5, false), "{got} vs {want}");

        // The gradient of B is that of the formula with the norm held constant.
        got.sum(Kind::Float).backward();
        let b = pair.b.detach().copy().set_requires_grad(true);
        let m = pair.dora.as_ref().unwrap().m.detach();
        let d = w.detach() + b.matmul(&pair.a.detach()) * pair.scale;
        let norm = d.detach().pow_tensor_scalar(2).sum_dim_intlist(1, false, None).sqrt();
        x.linear(&(d * (m / norm).unsqueeze(1)), Some(&bias)).sum(Kind::Float).backward();
        assert!(pair.b.grad().allclose(&b.grad(), 1e-4, 1e-5, false), "{} vs {}", pair.b.grad(), b.grad());

        let w0 = w.copy();
        lora.merge(&model).unwrap();
        assert!(w.allclose(&w_dora, 1e-5, 1e-6, false));
        assert!(lora.linear(&site, &x, base.shallow_clone(), false).equal(&base));
        lora.unmerge(&model).unwrap();
        assert!(w.equal(&w0), "unmerge must restore the weight bit for bit");
    }

    /// On a strided, grouped, TF-padded convolution the DoRA hook equals the
    /// convolution with the hand-written DoRA kernel (norm per output channel
    /// over `in/groups·kh·kw`); merging gives the same outputs; unmerge is exact.
    #[test]
    fn dora_conv_matches_the_formula() {
        let model = Model::new(Device::Cpu, 2, |p| Box::new(OneSite(Layer::Conv(Conv2d::new(p / "conv", 4, 6, 3, 2, Padding::TfSame, 2, true)))));
        let mut lora = Lora::new(LoraConfig { rank: 3, alpha: 6.0, use_dora: true, ..Default::default() });
        lora.prepare(&model).unwrap();
        let pair = &lora.pairs["conv"];
        assert_eq!(pair.dora.as_ref().unwrap().m.size(), [6]);
        randomise(&pair.b, 1.0);
        randomise(&pair.dora.as_ref().unwrap().m, 0.3);
        let weight = model.vs.variables()["conv.weight"].shallow_clone();
        let w0 = weight.copy();
        let w_dora = dora_weight(&w0, pair);
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(lora)];
        let x = Input::Images(Tensor::randn([2, 4, 7, 9], (Kind::Float, Device::Cpu)));
        let adapted = model.backbone.forward(&Ctx::new(false, &methods, Vec::new()), &x);
        tch::no_grad(|| weight.shallow_clone().copy_(&w_dora));
        let by_kernel = model.backbone.forward(&Ctx::plain(false), &x);
        tch::no_grad(|| weight.shallow_clone().copy_(&w0));
        assert!(adapted.allclose(&by_kernel, 1e-5, 1e-5, false));

        methods[0].merge(&model).unwrap();
        assert!(weight.allclose(&w_dora, 1e-5, 1e-6, false));
        let merged = model.backbone.forward(&Ctx::new(false, &methods, Vec::new()), &x);
        assert!(merged.allclose(&by_kernel, 1e-5, 1e-5, false));
        methods[0].unmerge(&model).unwrap();
        assert!(weight.equal(&w0));
    }

    /// With `B = 0` and `m = ‖W‖`, DoRA leaves a transformer's and a CNN's logits exactly unchanged.
    #[test]
    fn dora_is_identity_at_init() {
        for (model, input) in [(crate::testing::vit(1), crate::testing::images()), (crate::testing::cnn(1), crate::testing::images())] {
            let plain = model.forward(&Ctx::plain(false), &input);
            let mut lora = Lora::new(LoraConfig { use_dora: true, ..Default::default() });
            lora.prepare(&model).unwrap();
            assert!(lora.pairs.values().all(|p| p.dora.is_some()));
            let methods: Vec<Box<dyn Method>> = vec![Box::new(lora)];
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).equal(&plain));
        }
    }

    /// rsLoRA scales by α/√r, and the hook uses that scale.
    #[test]
    fn rslora_scales_by_the_root_of_the_rank() {
        let model = linear(Role::Query);
        let mut plain = Lora::new(LoraConfig { rank: 4, alpha: 8.0, ..Default::default() });
        plain.prepare(&model).unwrap();
        assert_eq!(plain.scale("proj"), Some(2.0));
        let mut rs = Lora::new(LoraConfig { rank: 4, alpha: 8.0, rslora: true, ..Default::default() });
        rs.prepare(&model).unwrap();
        assert_eq!(rs.scale("proj"), Some(4.0));
        let pair = &rs.pairs["proj"];
        randomise(&pair.b, 1.0);
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let base = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
        let got = rs.linear(&model.sites()[0], &x, base, false);
        assert!(got.allclose(&(x.matmul(&pair.a.tr()).matmul(&pair.b.tr()) * 4.0), 1e-5, 1e-6, false));
    }

    /// `rank_pattern` / `alpha_pattern`: the first matching key in key order
    /// sets a site's rank and alpha, which shape `A`, `B` and set the scale.
    #[test]
    fn rank_pattern_sets_each_sites_rank() {
        let model = crate::testing::bert(0);
        let config = LoraConfig {
            rank_pattern: [("encoder.layer.1.attention.self.query".to_string(), 2), ("re:.*layer\\.0.*".to_string(), 5), ("value".to_string(), 3)].into(),
            alpha_pattern: [("value".to_string(), 6.0)].into(),
            ..Default::default()
        };
        let mut lora = Lora::new(config.clone());
        lora.prepare(&model).unwrap();
        let expect = [
            ("0.attention.self.query", 5, 16.0 / 5.0),
            ("0.attention.self.value", 5, 6.0 / 5.0),
            ("1.attention.self.query", 2, 8.0),
            ("1.attention.self.value", 3, 2.0),
        ];
        assert_eq!(lora.sites().count(), expect.len());
        for (suffix, rank, scale) in expect {
            let path = format!("encoder.layer.{suffix}");
            let pair = &lora.pairs[&path];
            assert_eq!((pair.a.size(), pair.b.size()), (vec![rank, 16], vec![16, rank]), "{path}");
            assert_eq!(lora.rank(&path), Some(rank));
            assert!((pair.scale - scale).abs() < 1e-12, "{path}: {}", pair.scale);
        }
        // The config, maps included, round-trips through TOML.
        assert_eq!(zhijian_core::parse_config::<LoraConfig>("lora", &lora.config()).unwrap(), config);
    }

    #[test]
    fn bad_patterns_are_errors() {
        let model = crate::testing::bert(0);
        let err = Lora::new(LoraConfig { rank_pattern: [("key".to_string(), 2)].into(), ..Default::default() }).prepare(&model).err().unwrap();
        assert!(matches!(&err, Error::MethodConfig { message, .. } if message.contains("rank_pattern key `key`") && message.contains("self.query")), "{err}");
        let err = Lora::new(LoraConfig { rank_pattern: [("query".to_string(), 0)].into(), ..Default::default() }).prepare(&model).err().unwrap();
        assert!(err.to_string().contains("rank_pattern"), "{err}");
        let err = Lora::new(LoraConfig { alpha_pattern: [("query".to_string(), f64::NAN)].into(), ..Default::default() }).prepare(&model).err().unwrap();
        assert!(err.to_string().contains("alpha"), "{err}");
    }

    /// Through the engine, a DoRA run trains `m`, `A`, `B` and the head and
    /// leaves the backbone untouched; the artifact holds the magnitudes.
    #[test]
    fn dora_trains_through_the_engine() {
        use zhijian_core::train::{self, Split, TrainConfig, TrainOptions};
        let model = crate::testing::bert(3);
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(Lora::new(LoraConfig { use_dora: true, ..Default::default() }))];
        train::prepare(&model, &mut methods, 0).unwrap();
        let copies = |vars: std::collections::HashMap<String, Tensor>| vars.into_iter().map(|(n, t)| (n, t.copy())).collect::<BTreeMap<_, _>>();
        let (backbone, own) = (copies(model.vs.variables()), copies(methods[0].var_store().unwrap().variables()));
        let data = Split { name: "toy".into(), input: crate::testing::tokens(), labels: crate::testing::labels() };
        let cfg = TrainConfig { max_steps: 2, batch_size: 6, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        train::train(&model, &mut methods, &data, None, &cfg, &TrainOptions::default()).unwrap();
        let vars = model.vs.variables();
        for (n, t) in &backbone {
            assert_eq!(vars[n].equal(t), !n.starts_with("head."), "{n}");
        }
        let now = methods[0].var_store().unwrap().variables();
        assert_eq!(own.len(), 4 * 3, "A, B and m at 4 sites");
        for (n, t) in &own {
            assert!(!now[n].equal(t), "{n} did not train");
        }
        let names: Vec<String> = train::artifact(&model, &methods).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"lora/encoder.layer.1.attention.self.value.lora_magnitude".to_string()), "{names:?}");
    }
}
