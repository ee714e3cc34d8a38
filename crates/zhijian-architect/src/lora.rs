//! LoRA: low-rank adaptation (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>).
//!
//! At each target linear layer with frozen weight `W` (`[out, in]`), the output
//! becomes `W x + (α / r) · B A dropout(x)` with `A: [r, in]` (Kaiming-uniform,
//! as PEFT) and `B: [out, r]` (zeros), so the model is unchanged at initialisation.
//!
//! - trains: every `A`, `B` and the head; frozen: the whole backbone.
//! - merges: `W ← W + (α / r) B A` folds the update into the backbone, so
//!   inference costs nothing extra; `unmerge` subtracts it again.
//! - artifact: the adapter alone (`A`, `B` per site, named `<site>.lora_A` / `.lora_B`).
//!
//! On a convolution with weight `[out, in/groups, kh, kw]` the same low-rank
//! update applies to the weight seen as a matrix `[out, in/groups·kh·kw]`
//! (`A: [r, in/groups·kh·kw]`), and the hook adds the convolution of the input
//! with `(α / r) B A` reshaped to the kernel — loralib's `ConvLoRA`
//! formulation, which makes merging exact for every kernel size and grouping.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::Tensor;
use zhijian_core::targets::select_sites;
use zhijian_core::{config_table, Error, Method, Model, Result, Role, Site};

/// Configuration of LoRA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update. Default 8.
    pub rank: i64,
    /// Scale numerator: the update is multiplied by `alpha / rank`. Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.
    pub dropout: f64,
    /// Sites to adapt: exact paths, dot-suffixes (`query`) or `re:<regex>`.
    /// Empty (the default) means the attention query and value projections (or
    /// the fused `qkv`) of every block, as in the paper; on a backbone without
    /// attention (a CNN, an MLP), every 1×1 and full k×k convolution and every
    /// linear layer, except the stem, depthwise convolutions and the head.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: Vec::new() }
    }
}

struct Pair {
    a: Tensor,
    b: Tensor,
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

    fn scale(&self) -> f64 {
        self.config.alpha / self.config.rank as f64
    }

    /// Paths of the adapted sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    /// `W ← W + sign · (α / r) B A` on every adapted site's weight.
    fn fold(&mut self, model: &Model, sign: f64) -> Result<()> {
        let weights = model.vs.variables();
        tch::no_grad(|| {
            for (site, pair) in &self.pairs {
                let name = format!("{site}.weight");
                let mut w = weights.get(&name).ok_or_else(|| Error::MissingWeights {
                    path: "<model>".into(),
                    names: vec![name.clone()],
                })?.shallow_clone();
                let delta = pair.b.matmul(&pair.a).reshape(w.size()) * (sign * self.scale());
                let _ = w.g_add_(&delta.to_kind(w.kind()));
            }
            Ok(())
        })
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
        if c.rank < 1 {
            return Err(Error::MethodConfig { method: "lora".into(), message: format!("rank must be ≥ 1, got {}", c.rank) });
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return Err(Error::MethodConfig { method: "lora".into(), message: format!("dropout must be in [0, 1), got {}", c.dropout) });
        }
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
        let vs = VarStore::new(model.device());
        for site in &sites {
            let p = site.path.split('.').fold(vs.root(), |p, part| p / part);
            // A convolution's weight, seen as a matrix, has in/groups·kh·kw columns.
            let fan_in = site.conv.map_or(site.in_features, |g| site.in_features / g.groups * g.kernel[0] * g.kernel[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a = p.var("lora_A", &[c.rank, fan_in], Init::Uniform { lo: -bound, up: bound });
            let b = p.zeros("lora_B", &[site.out_features, c.rank]);
            self.pairs.insert(site.path.clone(), Pair { a, b });
        }
        self.vs = Some(vs);
        Ok(())
    }

    fn linear(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        match self.pairs.get(&site.path) {
            Some(pair) if !self.merged => {
                let x = if train && self.config.dropout > 0.0 { x.dropout(self.config.dropout, true) } else { x.shallow_clone() };
                out + x.linear::<Tensor>(&pair.a, None).linear::<Tensor>(&pair.b, None) * self.scale()
            }
            _ => out,
        }
    }

    fn conv(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        match (self.pairs.get(&site.path), site.conv) {
            (Some(pair), Some(g)) if !self.merged => {
                let x = if train && self.config.dropout > 0.0 { x.dropout(self.config.dropout, true) } else { x.shallow_clone() };
                let kernel = [site.out_features, site.in_features / g.groups, g.kernel[0], g.kernel[1]];
                let delta = pair.b.matmul(&pair.a).reshape(kernel) * self.scale();
                out + x.conv2d::<Tensor>(&delta, None, [g.stride; 2], [g.padding; 2], [1, 1], g.groups)
            }
            _ => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
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
}
