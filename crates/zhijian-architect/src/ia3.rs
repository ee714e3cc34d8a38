//! IA³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et
//! al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
//! than In-Context Learning", <https://arxiv.org/abs/2205.05638>).
//!
//! Learned vectors rescale, element-wise, the attention keys and values (the
//! outputs of the key and value projections) and the feed-forward network's
//! intermediate activation (the input of its down projection, through the
//! `linear_input` hook): `k ← l_k ⊙ k`, `v ← l_v ⊙ v`, `h ← l_ff ⊙ h`. Every
//! vector starts at ones, so the model is unchanged at initialisation.
//!
//! - trains: the vectors `<site>.ia3_l` (one per adapted site) and the head;
//!   frozen: the whole backbone.
//! - On ViT's fused `qkv` (output `[q | k | v]`, width 3d) only the key and
//!   value thirds are scaled: the site's vector holds 2d values, and the query
//!   third is a constant 1 (not a parameter, never trained).
//! - merges: scaling a projection's output by `l` is scaling the rows of its
//!   weight and its bias by `l`; scaling the down projection's input is
//!   scaling the columns of its weight. `merge` keeps copies of the weights and
//!   biases it rewrites (one copy of each adapted layer while merged), so
//!   `unmerge` restores them exactly rather than dividing by `l`.
//! - artifact: the vectors alone.
//!
//! Applies to transformers (bert, vit), or to any backbone's linear layers
//! named in `targets`; on a CNN, whose only linear layer is the head,
//! `prepare` is an error. Sites with [`Role::MlpDown`] have their input scaled,
//! every other chosen site its output (PEFT's `feedforward_modules` rule, with
//! the role standing in for the list).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use zhijian_core::targets::select_sites;
use zhijian_core::{Error, Method, Model, Result, Role, Site, config_table};

/// Configuration of IA³.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ia3Config {
    /// Linear sites to rescale: exact paths, dot-suffixes (`key`) or `re:<regex>`.
    /// Empty (the default) means, by role, every attention key and value
    /// projection (or fused `qkv`, whose key and value thirds are scaled) and
    /// every FFN down projection (whose input is scaled), as in the paper.
    pub targets: Vec<String>,
}

/// What the vector of a site rescales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scales {
    /// The layer's output (key and value projections).
    Output,
    /// The key and value thirds of a fused `[q | k | v]` output.
    KeyValueThirds,
    /// The layer's input (the FFN down projection).
    Input,
}

struct Vector {
    l: Tensor,
    scales: Scales,
}

impl Vector {
    /// The factor applied along the layer's output (or input) features.
    fn factor(&self) -> Tensor {
        match self.scales {
            Scales::KeyValueThirds => {
                let ones = Tensor::ones([self.l.size()[0] / 2], (self.l.kind(), self.l.device()));
                Tensor::cat(&[ones, self.l.shallow_clone()], 0)
            }
            Scales::Output | Scales::Input => self.l.shallow_clone(),
        }
    }
}

/// The IA³ method.
pub struct Ia3 {
    config: Ia3Config,
    vs: Option<VarStore>,
    vectors: BTreeMap<String, Vector>,
    /// Copies of the weights (and biases) merge overwrote.
    saved: BTreeMap<String, (Tensor, Option<Tensor>)>,
}

impl Ia3 {
    /// IA³ with `config` (parameters are created by `prepare`).
    pub fn new(config: Ia3Config) -> Self {
        Ia3 { config, vs: None, vectors: BTreeMap::new(), saved: BTreeMap::new() }
    }

    /// Paths of the adapted sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.vectors.keys().map(String::as_str)
    }

    fn merged(&self) -> bool {
        !self.saved.is_empty()
    }
}

impl Method for Ia3 {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        // Linear layers only (no convolution geometry, not a norm); the head trains anyway.
        let linear: Vec<Site> = model.sites().into_iter().filter(|s| s.conv.is_none() && !matches!(s.role, Role::Norm | Role::Head)).collect();
        let arch = model.backbone.arch().to_string();
        if linear.is_empty() {
            return Err(Error::MethodConfig {
                method: "ia3".into(),
                message: format!("needs a transformer backbone (bert, vit) or linear layers to rescale; {arch} has none besides its head"),
            });
        }
        let sites = if self.config.targets.is_empty() {
            let s: Vec<Site> = linear.iter().filter(|s| matches!(s.role, Role::Key | Role::Value | Role::Qkv | Role::MlpDown)).cloned().collect();
            if s.is_empty() {
                return Err(Error::MethodConfig {
                    method: "ia3".into(),
                    message: format!(
                        "{arch} has no attention key/value or FFN down projection to rescale by default (bert, vit have); name linear sites in `targets`: {}",
                        linear.iter().map(|s| s.path.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            s
        } else {
            select_sites(&self.config.targets, &linear)?
        };
        if let Some(site) = sites.iter().find(|s| s.role == Role::Qkv && s.out_features % 3 != 0) {
            let message = format!("fused qkv site {} has {} outputs, not a multiple of 3", site.path, site.out_features);
            return Err(Error::MethodConfig { method: "ia3".into(), message });
        }
        let vs = VarStore::new(model.device());
        self.vectors.clear();
        self.saved.clear();
        for site in &sites {
            let p = site.path.split('.').fold(vs.root(), |p, part| p / part);
            let (scales, len) = match site.role {
                Role::MlpDown => (Scales::Input, site.in_features),
                Role::Qkv => (Scales::KeyValueThirds, site.out_features / 3 * 2),
                _ => (Scales::Output, site.out_features),
            };
            let l = p.ones("ia3_l", &[len]);
            self.vectors.insert(site.path.clone(), Vector { l, scales });
        }
        self.vs = Some(vs);
        Ok(())
    }

    fn linear_input(&self, site: &Site, x: Tensor, _train: bool) -> Tensor {
        match self.vectors.get(&site.path) {
            Some(v) if v.scales == Scales::Input && !self.merged() => x * v.factor(),
            _ => x,
        }
    }

    fn linear(&self, site: &Site, _x: &Tensor, out: Tensor, _train: bool) -> Tensor {
        match self.vectors.get(&site.path) {
            Some(v) if v.scales != Scales::Input && !self.merged() => out * v.factor(),
            _ => out,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    /// The earliest rescaled site's block.
    fn first_block(&self, model: &Model) -> Option<usize> {
        self.vectors.keys().map(|site| model.block_of_site(site)).min()
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
        if self.merged() {
            return Ok(());
        }
        let vars = model.vs.variables();
        // Every weight is looked up before any is changed: a failed merge changes nothing.
        let mut layers = Vec::new();
        for (path, v) in &self.vectors {
            let name = format!("{path}.weight");
            let w = vars.get(&name).ok_or_else(|| Error::MissingWeights { path: "<model>".into(), names: vec![name] })?;
            layers.push((path.clone(), v, w.shallow_clone(), vars.get(&format!("{path}.bias")).map(Tensor::shallow_clone)));
        }
        let mut saved = BTreeMap::new();
        tch::no_grad(|| {
            for (path, v, w, b) in layers {
                saved.insert(path, (w.copy(), b.as_ref().map(Tensor::copy)));
                let f = v.factor().to_kind(w.kind());
                match v.scales {
                    Scales::Input => {
                        w.shallow_clone().copy_(&(&w * f.unsqueeze(0)));
                    }
                    Scales::Output | Scales::KeyValueThirds => {
                        w.shallow_clone().copy_(&(&w * f.unsqueeze(1)));
                        if let Some(b) = b {
                            b.shallow_clone().copy_(&(&b * f.to_kind(b.kind())));
                        }
                    }
                }
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
                if let Some(b) = b {
                    vars[&format!("{path}.bias")].shallow_clone().copy_(b);
                }
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
    use zhijian_core::Ctx;

    fn prepared(model: &Model, config: Ia3Config) -> Vec<Box<dyn Method>> {
        let mut m = Ia3::new(config);
        m.prepare(model).unwrap();
        vec![Box::new(m)]
    }

    fn randomise(methods: &[Box<dyn Method>]) {
        tch::no_grad(|| {
            for (_, t) in methods[0].var_store().unwrap().variables() {
                t.shallow_clone().copy_(&(t.randn_like() * 0.5 + 1.0));
            }
        });
    }

    fn vector(methods: &[Box<dyn Method>], site: &str) -> Tensor {
        methods[0].var_store().unwrap().variables()[&format!("{site}.ia3_l")].detach()
    }

    /// The default sites on BERT are the key, value and FFN down projections,
    /// each vector as wide as what it scales; the hooks multiply outputs
    /// (key, value) or inputs (down) by the vector, and leave other sites alone.
    #[test]
    fn bert_hooks_scale_keys_values_and_ffn_inputs() {
        let model = testing::bert(0);
        let methods = prepared(&model, Ia3Config::default());
        let sites = model.sites();
        let site = |path: &str| sites.iter().find(|s| s.path == path).unwrap().clone();
        let names: Vec<String> = methods[0].var_store().unwrap().variables().into_keys().collect();
        assert_eq!(names.len(), 6, "{names:?}");
        randomise(&methods);
        let (key, down, query) =
            (site("encoder.layer.0.attention.self.key"), site("encoder.layer.0.output.dense"), site("encoder.layer.0.attention.self.query"));
        assert_eq!(vector(&methods, &key.path).size(), [16]);
        assert_eq!(vector(&methods, &down.path).size(), [32]);
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let out = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let got = methods[0].linear(&key, &x, out.shallow_clone(), false);
        assert!(got.allclose(&(&out * vector(&methods, &key.path)), 1e-6, 1e-7, false));
        assert!(methods[0].linear_input(&key, x.shallow_clone(), false).equal(&x));
        let h = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        assert!(methods[0].linear_input(&down, h.shallow_clone(), false).allclose(&(&h * vector(&methods, &down.path)), 1e-6, 1e-7, false));
        assert!(methods[0].linear(&down, &h, out.shallow_clone(), false).equal(&out));
        assert!(methods[0].linear(&query, &x, out.shallow_clone(), false).equal(&out));
    }

    /// On ViT's fused qkv the query third of the output is untouched and the
    /// key and value thirds are scaled by the two halves of the 2d vector.
    #[test]
    fn vit_qkv_scales_only_keys_and_values() {
        let model = testing::vit(0);
        let methods = prepared(&model, Ia3Config::default());
        randomise(&methods);
        let qkv = model.sites().into_iter().find(|s| s.path == "blocks.1.attn.qkv").unwrap();
        let l = vector(&methods, &qkv.path);
        assert_eq!(l.size(), [32]);
        let out = Tensor::randn([2, 17, 48], (Kind::Float, Device::Cpu));
        let got = methods[0].linear(&qkv, &out, out.shallow_clone(), false);
        assert!(got.narrow(2, 0, 16).equal(&out.narrow(2, 0, 16)));
        assert!(got.narrow(2, 16, 16).allclose(&(out.narrow(2, 16, 16) * l.narrow(0, 0, 16)), 1e-6, 1e-7, false));
        assert!(got.narrow(2, 32, 16).allclose(&(out.narrow(2, 32, 16) * l.narrow(0, 16, 16)), 1e-6, 1e-7, false));
        // Only the key/value part trains: no parameter covers the query third.
        let total: i64 = methods[0].var_store().unwrap().variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, 2 * (32 + 64), "2 blocks × (2d for qkv + mlp hidden for fc2)");
    }

    /// Ones at init: the logits are exactly those of the plain backbone.
    #[test]
    fn identity_at_init_on_bert_and_vit() {
        for (model, input) in [(testing::bert(1), testing::tokens()), (testing::vit(1), testing::images())] {
            let plain = model.forward(&Ctx::plain(false), &input);
            let methods = prepared(&model, Ia3Config::default());
            assert!(methods[0].identity_at_init());
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).equal(&plain));
        }
    }

    /// Merging into rows, biases and columns gives the unmerged logits, the
    /// hooks then do nothing, and unmerge restores every weight exactly.
    #[test]
    fn merge_matches_unmerged_and_unmerge_is_exact() {
        for (model, input) in [(testing::bert(2), testing::tokens()), (testing::vit(2), testing::images())] {
            let mut methods = prepared(&model, Ia3Config::default());
            randomise(&methods);
            let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let unmerged = model.forward(&Ctx::new(false, &methods, Vec::new()), &input);
            methods[0].merge(&model).unwrap();
            let merged = model.forward(&Ctx::new(false, &methods, Vec::new()), &input);
            assert!(merged.allclose(&unmerged, 1e-5, 1e-5, false), "{}", (&merged - &unmerged).abs().max());
            // The merged weights alone (no method) give the same output.
            assert!(model.forward(&Ctx::plain(false), &input).allclose(&unmerged, 1e-5, 1e-5, false));
            methods[0].unmerge(&model).unwrap();
            let vars = model.vs.variables();
            for (n, t) in before {
                assert!(vars[&n].equal(&t), "{n} not restored");
            }
            assert!(model.forward(&Ctx::new(false, &methods, Vec::new()), &input).allclose(&unmerged, 1e-6, 1e-6, false));
        }
    }

    /// Explicit targets pick any linear site, and scale its output (or its
    /// input for a down projection).
    #[test]
    fn explicit_targets() {
        let model = testing::bert(0);
        let mut m = Ia3::new(Ia3Config { targets: vec!["query".into(), "encoder.layer.1.output.dense".into()] });
        m.prepare(&model).unwrap();
        assert_eq!(
            m.sites().collect::<Vec<_>>(),
            ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense"]
        );
        assert_eq!(m.vectors["encoder.layer.1.output.dense"].scales, Scales::Input);
        assert_eq!(m.vectors["encoder.layer.0.attention.self.query"].scales, Scales::Output);
    }

    /// On CNNs the error names the method and the backbone; a pattern that
    /// matches no linear site (a norm) is an error listing the linear sites.
    #[test]
    fn cnn_and_bad_targets_are_errors() {
        for model in [testing::efficientnet(0), testing::cnn(0)] {
            let err = Ia3::new(Ia3Config::default()).prepare(&model).err().unwrap();
            let arch = model.backbone.arch().to_string();
            assert!(matches!(&err, Error::MethodConfig { method, message } if method == "ia3" && message.contains(&arch)), "{err}");
        }
        let err = Ia3::new(Ia3Config { targets: vec!["LayerNorm".into()] }).prepare(&testing::bert(0)).err().unwrap();
        assert!(matches!(&err, Error::NoMatchingSites { sites, .. } if sites.iter().all(|s| !s.contains("LayerNorm"))), "{err}");
    }

    /// The config round-trips through TOML, and a misspelt field is named.
    #[test]
    fn config_round_trip() {
        let config = Ia3Config { targets: vec!["key".into()] };
        assert_eq!(zhijian_core::parse_config::<Ia3Config>("ia3", &Ia3::new(config.clone()).config()).unwrap(), config);
        let table: toml::Table = toml::from_str("target = [\"key\"]").unwrap();
        let err = zhijian_core::parse_config::<Ia3Config>("ia3", &table).unwrap_err();
        assert!(err.to_string().contains("target"), "{err}");
    }
}
