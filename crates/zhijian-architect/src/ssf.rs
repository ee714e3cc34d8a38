//! SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022,
//! <https://arxiv.org/abs/2210.08823>).
//!
//! After each chosen operation the output is rescaled and shifted per
//! channel, `y ← γ ⊙ y + β`: along the last dimension for linear layers and
//! LayerNorms, along dimension 1 (channels of NCHW tensors) for convolutions
//! and BatchNorms. As in the official code, `γ ~ N(1, σ²)` and `β ~ N(0, σ²)`
//! with `σ = 0.02`, so the model is **not** exactly unchanged at
//! initialisation (it is with `init_std = 0`).
//!
//! - trains: `<site>.ssf_scale` (γ) and `<site>.ssf_shift` (β) per chosen site,
//!   and the head; frozen: the whole backbone.
//! - merges: a site folds into its own layer, `W ← γ ⊙ W` (output rows of a
//!   linear or convolution weight, the affine weight of a norm) and
//!   `b ← γ ⊙ b + β`. A layer without a bias cannot absorb β, so merging a
//!   strategy that chose such a site is refused ([`Method::can_merge`] is
//!   false after `prepare`, and `merge` names the sites). `merge` keeps copies
//!   of what it rewrites (one copy of each chosen layer's parameters while
//!   merged), so `unmerge` restores them exactly.
//! - artifact: the γ and β vectors alone.
//!
//! Default sites (deliberately chosen so the default config merges on every
//! backbone): every norm (LayerNorm, BatchNorm: they always have a bias) and
//! every linear layer and convolution that has a bias, the head excepted. On a
//! transformer that is every projection, every LayerNorm and ViT's patch
//! embedding, as in the official code; on CNNs whose convolutions have no bias
//! (EfficientNet-Lite, ResNet, the small CNN) it is every BatchNorm. That loses
//! nothing: a frozen BatchNorm is a per-channel affine map, so SSF after a
//! convolution followed by one equals SSF after the BatchNorm with different γ, β.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{Init, VarStore};
use zhijian_core::targets::select_sites;
use zhijian_core::{Error, Method, Model, Result, Role, Site, config_table};

/// Configuration of SSF.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SsfConfig {
    /// Sites to scale and shift: exact paths, dot-suffixes or `re:<regex>`,
    /// over every linear, convolution and norm site but the head. Empty (the
    /// default) means every norm and every linear layer or convolution with a
    /// bias (see the module docs); naming a bias-less layer here works but
    /// makes the method unmergeable.
    pub targets: Vec<String>,
    /// σ of the initialisation `γ ~ N(1, σ²)`, `β ~ N(0, σ²)`. Default 0.02
    /// (the official code's); 0 starts from the identity.
    pub init_std: f64,
}

impl Default for SsfConfig {
    fn default() -> Self {
        SsfConfig { targets: Vec::new(), init_std: 0.02 }
    }
}

/// Which dimension of a site's output holds its channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Axis {
    /// `[…, channels]`: linear layers, LayerNorm.
    Last,
    /// `[batch, channels, h, w]`: convolutions, BatchNorm.
    Channel,
}

struct Affine {
    scale: Tensor,
    shift: Tensor,
    axis: Axis,
    /// Whether the site's layer has a bias to absorb the shift.
    has_bias: bool,
}

impl Affine {
    fn apply(&self, y: Tensor) -> Tensor {
        match self.axis {
            Axis::Last => y * &self.scale + &self.shift,
            Axis::Channel => y * self.scale.view([1, -1, 1, 1]) + self.shift.view([1, -1, 1, 1]),
        }
    }
}

/// The SSF method.
pub struct Ssf {
    config: SsfConfig,
    vs: Option<VarStore>,
    sites: BTreeMap<String, Affine>,
    /// Copies of the weights and biases merge overwrote.
    saved: BTreeMap<String, (Tensor, Tensor)>,
}

impl Ssf {
    /// SSF with `config` (parameters are created by `prepare`).
    pub fn new(config: SsfConfig) -> Self {
        Ssf { config, vs: None, sites: BTreeMap::new(), saved: BTreeMap::new() }
    }

    /// Paths of the scaled and shifted sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.sites.keys().map(String::as_str)
    }

    fn merged(&self) -> bool {
        !self.saved.is_empty()
    }

    fn hook(&self, site: &Site, out: Tensor) -> Tensor {
        match self.sites.get(&site.path) {
            Some(a) if !self.merged() => a.apply(out),
            _ => out,
        }
    }

    /// Chosen sites whose layer has no bias to absorb β.
    fn without_bias(&self) -> Vec<&str> {
        self.sites.iter().filter(|(_, a)| !a.has_bias).map(|(p, _)| p.as_str()).collect()
    }
}

impl Method for Ssf {
    fn name(&self) -> &'static str {
        "ssf"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        if !(c.init_std.is_finite() && c.init_std >= 0.0) {
            return Err(Error::MethodConfig { method: "ssf".into(), message: format!("init_std must be finite and ≥ 0, got {}", c.init_std) });
        }
        let vars = model.vs.variables();
        let has_bias = |s: &Site| vars.contains_key(&format!("{}.bias", s.path));
        let all: Vec<Site> = model.sites().into_iter().filter(|s| s.role != Role::Head).collect();
        let sites = if c.targets.is_empty() {
            let s: Vec<Site> = all.iter().filter(|s| s.role == Role::Norm || has_bias(s)).cloned().collect();
            if s.is_empty() {
                return Err(Error::MethodConfig {
                    method: "ssf".into(),
                    message: format!(
                        "{} has no norm layer nor biased linear layer or convolution to scale and shift by default; name sites in `targets`",
                        model.backbone.arch()
                    ),
                });
            }
            s
        } else {
            select_sites(&c.targets, &all)?
        };
        let vs = VarStore::new(model.device());
        self.sites.clear();
        self.saved.clear();
        for site in &sites {
            let p = site.path.split('.').fold(vs.root(), |p, part| p / part);
            let n = site.out_features;
            let scale = p.var("ssf_scale", &[n], Init::Randn { mean: 1.0, stdev: c.init_std });
            let shift = p.var("ssf_shift", &[n], Init::Randn { mean: 0.0, stdev: c.init_std });
            // A BatchNorm keeps running statistics; a LayerNorm does not.
            let batch_norm = vars.contains_key(&format!("{}.running_var", site.path));
            let axis = if site.conv.is_some() || batch_norm { Axis::Channel } else { Axis::Last };
            self.sites.insert(site.path.clone(), Affine { scale, shift, axis, has_bias: has_bias(site) });
        }
        self.vs = Some(vs);
        Ok(())
    }

    fn linear(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.hook(site, out)
    }

    fn conv(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.hook(site, out)
    }

    fn norm(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        self.hook(site, out)
    }

    fn alters_forward(&self) -> bool {
        true
    }

    /// The earliest scaled site's block.
    fn first_block(&self, model: &Model) -> Option<usize> {
        self.sites.keys().map(|site| model.block_of_site(site)).min()
    }

    fn identity_at_init(&self) -> bool {
        self.config.init_std == 0.0
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut()
    }

    /// True unless a chosen site's layer has no bias (known after `prepare`).
    fn can_merge(&self) -> bool {
        self.without_bias().is_empty()
    }

    fn merge(&mut self, model: &Model) -> Result<()> {
        if self.merged() {
            return Ok(());
        }
        let missing = self.without_bias();
        if !missing.is_empty() {
            return Err(Error::Unsupported {
                method: "ssf".into(),
                operation: format!("merge: these sites' layers have no bias to absorb the shift: {}", missing.join(", ")),
            });
        }
        let vars = model.vs.variables();
        let get = |name: String| vars.get(&name).map(Tensor::shallow_clone).ok_or(Error::MissingWeights { path: "<model>".into(), names: vec![name] });
        // Every tensor is looked up before any is changed: a failed merge changes nothing.
        let mut layers = Vec::new();
        for (path, a) in &self.sites {
            layers.push((path.clone(), a, get(format!("{path}.weight"))?, get(format!("{path}.bias"))?));
        }
        let mut saved = BTreeMap::new();
        tch::no_grad(|| {
            for (path, a, w, b) in layers {
                saved.insert(path, (w.copy(), b.copy()));
                // γ multiplies output rows: dimension 0 of every weight layout here.
                let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, w.dim() - 1)).collect();
                let scale = a.scale.to_kind(w.kind());
                w.shallow_clone().copy_(&(&w * scale.view(shape.as_slice())));
                b.shallow_clone().copy_(&(&b * a.scale.to_kind(b.kind()) + a.shift.to_kind(b.kind())));
            }
        });
        self.saved = saved;
        Ok(())
    }

    fn unmerge(&mut self, model: &Model) -> Result<()> {
        let vars = model.vs.variables();
        tch::no_grad(|| {
            for (path, (w, b)) in &self.saved {
                vars[&format!("{path}.weight")].shallow_clone().copy_(w);
                vars[&format!("{path}.bias")].shallow_clone().copy_(b);
            }
        });
        self.saved.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::{Device, Kind};
    use zhijian_core::{Ctx, Input};

    fn prepared(model: &Model, config: SsfConfig) -> Ssf {
        let mut m = Ssf::new(config);
        m.prepare(model).unwrap();
        m
    }

    fn site(model: &Model, path: &str) -> Site {
        model.sites().into_iter().find(|s| s.path == path).unwrap()
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// Linear and LayerNorm sites act on the last dimension: `y·γ + β` per feature.
    #[test]
    fn linear_and_layer_norm_act_on_the_last_dimension() {
        let model = testing::bert(0);
        let m = prepared(&model, SsfConfig { init_std: 0.5, ..Default::default() });
        for path in ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.LayerNorm", "embeddings.LayerNorm"] {
            let s = site(&model, path);
            let a = &m.sites[path];
            let y = randn(&[2, 5, 16]);
            let got = if s.role == Role::Norm { m.norm(&s, &y, y.shallow_clone(), false) } else { m.linear(&s, &y, y.shallow_clone(), false) };
            let (g, b) = (Vec::<f32>::try_from(a.scale.detach()).unwrap(), Vec::<f32>::try_from(a.shift.detach()).unwrap());
            let want: Vec<Tensor> = (0..16).map(|i| y.select(2, i) * g[i as usize] as f64 + b[i as usize] as f64).collect();
            assert!(got.allclose(&Tensor::stack(&want, 2), 1e-6, 1e-6, false), "{path}");
        }
        // The FFN's up projection is 32 wide.
        assert_eq!(m.sites["encoder.layer.0.intermediate.dense"].scale.size(), [32]);
    }

    /// Convolution and BatchNorm sites act on dimension 1 (channels) of NCHW outputs.
    #[test]
    fn conv_and_batch_norm_act_on_channels() {
        let vit = testing::vit(0);
        let cnn = testing::cnn(0);
        let mv = prepared(&vit, SsfConfig { init_std: 0.5, ..Default::default() });
        let mc = prepared(&cnn, SsfConfig { init_std: 0.5, targets: vec!["features.1.bn".into()] });
        for (m, s, c) in [(&mv, site(&vit, "patch_embed.proj"), 16), (&mc, site(&cnn, "features.1.bn"), 8)] {
            let a = &m.sites[&s.path];
            assert_eq!(a.axis, Axis::Channel);
            let y = randn(&[2, c, 3, 5]);
            let got = if s.role == Role::Norm { m.norm(&s, &y, y.shallow_clone(), false) } else { m.conv(&s, &y, y.shallow_clone(), false) };
            let (g, b) = (Vec::<f32>::try_from(a.scale.detach()).unwrap(), Vec::<f32>::try_from(a.shift.detach()).unwrap());
            let want: Vec<Tensor> = (0..c).map(|i| y.select(1, i) * g[i as usize] as f64 + b[i as usize] as f64).collect();
            assert!(got.allclose(&Tensor::stack(&want, 1), 1e-6, 1e-6, false), "{}", s.path);
        }
    }

    /// The defaults: on transformers every projection, every norm and ViT's
    /// patch embedding (not the head); on CNNs with bias-less convolutions the BatchNorms.
    #[test]
    fn default_sites_are_mergeable_everywhere() {
        let bert = testing::bert(0);
        let m = prepared(&bert, SsfConfig::default());
        assert_eq!(m.sites().count(), 1 + 2 * 8, "embeddings LayerNorm + 8 sites per layer");
        let vit = testing::vit(0);
        let m = prepared(&vit, SsfConfig::default());
        assert_eq!(m.sites().count(), 1 + 2 * 6 + 1, "patch embedding + 6 per block + final norm");
        for model in [testing::efficientnet(0), testing::cnn(0)] {
            let m = prepared(&model, SsfConfig::default());
            let norms = model.sites().iter().filter(|s| s.role == Role::Norm).count();
            assert_eq!(m.sites().count(), norms);
            assert!(m.can_merge());
        }
        // σ = 0.02: close to, but not, the identity.
        let a = &m.sites.values().next().unwrap();
        let d = (&a.scale - 1.0).abs().max().double_value(&[]);
        assert!(d > 0.0 && d < 0.2, "{d}");
        assert!(!m.identity_at_init());
    }

    /// With σ = 0 the logits are exactly unchanged (and `identity_at_init` says so).
    #[test]
    fn zero_std_is_the_identity() {
        let model = testing::vit(1);
        let plain = model.forward(&Ctx::plain(false), &testing::images());
        let m = prepared(&model, SsfConfig { init_std: 0.0, ..Default::default() });
        assert!(m.identity_at_init());
        let methods: Vec<Box<dyn Method>> = vec![Box::new(m)];
        assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &testing::images()).equal(&plain));
    }

    /// On every backbone the merged model gives the unmerged logits (within
    /// 1e-5), the merged weights alone give them too, and unmerge restores
    /// every weight bit for bit.
    #[test]
    fn merge_matches_unmerged_and_unmerge_is_exact() {
        let cases: [(Model, Input); 4] = [
            (testing::bert(2), testing::tokens()),
            (testing::vit(2), testing::images()),
            (testing::efficientnet(2), testing::images()),
            (testing::cnn(2), testing::images()),
        ];
        for (model, input) in cases {
            let mut methods: Vec<Box<dyn Method>> = vec![Box::new(prepared(&model, SsfConfig { init_std: 0.3, ..Default::default() }))];
            let arch = model.backbone.arch().to_string();
            let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let unmerged = model.forward(&Ctx::new(false, &methods, Vec::new()), &input);
            assert!(methods[0].can_merge(), "{arch}");
            methods[0].merge(&model).unwrap();
            let merged = model.forward(&Ctx::plain(false), &input);
            let d = (&merged - &unmerged).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{arch}: merged differs by {d}");
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).equal(&merged), "{arch}: hooks must be off while merged");
            methods[0].unmerge(&model).unwrap();
            let vars = model.vs.variables();
            for (n, t) in before {
                assert!(vars[&n].equal(&t), "{arch}: {n} not restored");
            }
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).allclose(&unmerged, 1e-6, 1e-6, false), "{arch}: hooks back on");
        }
    }

    /// A chosen bias-less layer makes the method unmergeable; merge refuses and names it.
    #[test]
    fn bias_less_sites_refuse_to_merge() {
        let model = testing::cnn(0);
        let mut m = prepared(&model, SsfConfig { targets: vec!["features.1.conv".into(), "features.1.bn".into()], ..Default::default() });
        assert_eq!(m.sites["features.1.conv"].axis, Axis::Channel);
        assert!(!m.can_merge());
        let w = model.vs.variables()["features.1.bn.weight"].copy();
        let err = m.merge(&model).unwrap_err();
        assert!(matches!(&err, Error::Unsupported { operation, .. } if operation.contains("features.1.conv") && !operation.contains("features.1.bn")), "{err}");
        assert!(model.vs.variables()["features.1.bn.weight"].equal(&w), "a refused merge changes nothing");
    }

    #[test]
    fn bad_configs_are_errors() {
        let model = testing::bert(0);
        for std in [-0.1, f64::NAN] {
            let err = Ssf::new(SsfConfig { init_std: std, ..Default::default() }).prepare(&model).unwrap_err();
            assert!(matches!(&err, Error::MethodConfig { message, .. } if message.contains("init_std")), "{err}");
        }
        // The head is not a site SSF can choose.
        let err = Ssf::new(SsfConfig { targets: vec!["head".into()], ..Default::default() }).prepare(&model).unwrap_err();
        assert!(matches!(err, Error::NoMatchingSites { .. }));
        let table: toml::Table = toml::from_str("init_sd = 0.1").unwrap();
        assert!(zhijian_core::parse_config::<SsfConfig>("ssf", &table).unwrap_err().to_string().contains("init_sd"));
        let config = SsfConfig { targets: vec!["query".into()], init_std: 0.1 };
        assert_eq!(zhijian_core::parse_config::<SsfConfig>("ssf", &Ssf::new(config.clone()).config()).unwrap(), config);
    }
}
