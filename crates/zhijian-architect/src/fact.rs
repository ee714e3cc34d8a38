//! FacT: factor-tuning (Jie & Deng, AAAI 2023, <https://arxiv.org/abs/2212.03145>).
//!
//! The weight updates of every block's linear maps are stacked into one tensor
//! and factorised with factors shared across all layers, as the reference code
//! (JieShibo/PETL-ViT `FacT/fact_tt.py`, `fact_tk.py`; LAMDA-ZhiJian copies it):
//! two shared projections `U` `[r, d]` (`d → r`, PyTorch `[out, in]` layout) and
//! `V` `[d, r]` (`r → d`), and a small core per `r × r` slot. Every update is
//! `ΔW_j = s · V K_jᵀ U` on one `d × d` slot `j` of a weight, added through the
//! `linear` hook as `s · dropout(x Uᵀ K_j) Vᵀ` (dropout on the `r`-wide
//! middle, as the reference).
//!
//! Adapted (per block, `k = mlp width / d`, 4 on ViT and BERT):
//! - the attention query, key and value maps (BERT: three sites; ViT: the fused
//!   `qkv`, whose output is `[q | k | v]`, three `d × d` slots), the attention
//!   output projection: one slot each;
//! - the MLP up-projection `[k·d, d]`: `k` slots stacked along its output, and
//!   the down-projection `[d, k·d]`: `k` slots side by side along its input
//!   (the reference's reshape of the `4d` width into 4 blocks of `d`).
//!
//! So `4 + 2k` (12) slots per block. The cores:
//! - **tt** (tensor-train): one free core per slot, stored per site as the
//!   reference's `nn.Linear` weights: `<site>.fact_core` `[slots·r, r]` (slot
//!   `j` = rows `j·r‥`) for attention and MLP-up sites, `[r, slots·r]` (slot `j`
//!   = columns `j·r‥`) for the MLP down-projection. `12·r²` per block.
//! - **tk** (Tucker): one core tensor `fact_c` `[r, r, r]` for all slots and a
//!   per-slot vector: `<site>.fact_p` `[r, slots]` holds the reference's
//!   `FacTp` columns of that site (its `[r, 12·L]` matrix split by site, same
//!   initialisation). `r³ + 12·L·r` in all. A site's slot matrices are
//!   `M = fact_c · fact_p` `[r, r, slots]`; attention slot `j` applies
//!   `M[:, :, j]`. For the MLP maps the reference flattens `M` row-major to
//!   `[r, k·r]` and cuts that into `k` blocks of `r` columns, so an MLP slot
//!   mixes columns of every `M[:, :, j]` rather than using `M[:, :, j]` alone as
//!   a literal reading of the paper would; we follow the code, whose results
//!   the paper reports.
//!
//! Initialisation as the reference: `V = 0` (so the model is unchanged at
//! initialisation), `U` and the TT cores as `nn.Linear` (uniform `±1/√fan_in`),
//! the TK core and vectors xavier-uniform. Defaults: `dim` 8 and `scale` 1 (the
//! reference's CIFAR-100 FacT-TT setting and LAMDA-ZhiJian's defaults; the
//! reference tunes `scale` per VTAB task over 0.01‥100 and TK's rank over
//! 16/32), dropout 0.1 (the reference's fixed value).
//!
//! - trains: `U`, `V`, the cores and the head; frozen: the whole backbone.
//! - merges: the update is linear in the input, so `W ← W + ΔW` on every
//!   adapted site gives the evaluation-mode outputs (dropout off); `unmerge`
//!   subtracts the same `ΔW`, restoring the weights up to float rounding (as
//!   LoRA; exact copies would double the memory of nearly every weight).
//! - artifact: `fact_u`, `fact_v`, then `<site>.fact_core` (tt) or `fact_c` and
//!   `<site>.fact_p` (tk).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{Init, VarStore};
use zhijian_core::layers::dropout;
use zhijian_core::precision::cast_like;
use zhijian_core::{Error, Method, Model, Result, Role, Site, config_table};

/// How the stacked weight updates are factorised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    /// Tensor-train: shared `U`, `V`, a free `r × r` core per slot.
    #[default]
    Tt,
    /// Tucker: shared `U`, `V`, one `r × r × r` core, an `r`-vector per slot.
    Tk,
}

/// Configuration of FacT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactConfig {
    /// `tt` (tensor-train) or `tk` (Tucker). Default `tt`.
    pub kind: FactKind,
    /// Rank `r` of the factors. Default 8.
    pub dim: i64,
    /// Scale `s` of every update. Default 1.
    pub scale: f64,
    /// Dropout on the rank-`r` middle of each update during training. Default 0.1.
    pub dropout: f64,
}

impl Default for FactConfig {
    fn default() -> Self {
        FactConfig { kind: FactKind::Tt, dim: 8, scale: 1.0, dropout: 0.1 }
    }
}

/// How a site's weight splits into `d × d` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Attention maps: slots stacked along the output (`[slots·d, d]`).
    Attn,
    /// The MLP up-projection: slots stacked along the output.
    MlpUp,
    /// The MLP down-projection: slots side by side along the input (`[d, slots·d]`).
    MlpDown,
}

struct Adapted {
    layout: Layout,
    slots: i64,
    /// TT: the core `[slots·r, r]` (`[r, slots·r]` for `MlpDown`); TK: `fact_p` `[r, slots]`.
    factor: Tensor,
}

/// The FacT method.
pub struct Fact {
    config: FactConfig,
    vs: Option<VarStore>,
    /// `U` `[r, d]`.
    u: Option<Tensor>,
    /// `V` `[d, r]`.
    v: Option<Tensor>,
    /// TK's core `[r, r, r]`.
    core: Option<Tensor>,
    sites: BTreeMap<String, Adapted>,
    merged: bool,
}

impl Fact {
    /// FacT with `config` (parameters are created by `prepare`).
    pub fn new(config: FactConfig) -> Self {
        Fact { config, vs: None, u: None, v: None, core: None, sites: BTreeMap::new(), merged: false }
    }

    /// Paths of the adapted sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.sites.keys().map(String::as_str)
    }

    /// The site's slot matrices side by side, as the hook applies them to
    /// `x Uᵀ`: `[r, slots·r]` (slot `j` = columns `j·r‥`), or `[slots·r, r]`
    /// (slot `j` = rows `j·r‥`, applied to the slots' concatenated `x_j Uᵀ`) for `MlpDown`.
    fn mixing(&self, a: &Adapted) -> Tensor {
        let r = self.config.dim;
        match (self.config.kind, &self.core) {
            (FactKind::Tk, Some(c)) => {
                let m = c.matmul(&a.factor); // [r, r, slots]
                match a.layout {
                    Layout::Attn => m.permute([0, 2, 1]).reshape([r, a.slots * r]),
                    Layout::MlpUp => m.reshape([r, a.slots * r]),
                    Layout::MlpDown => m.reshape([r, a.slots * r]).tr(),
                }
            }
            _ => a.factor.tr(),
        }
    }

    /// The update `ΔW` `[out, in]` of an adapted site: slot `j` is `s · V K_jᵀ U`.
    fn delta_weight(&self, a: &Adapted) -> Tensor {
        let (u, v, r) = (self.u.as_ref().expect("prepared"), self.v.as_ref().expect("prepared"), self.config.dim);
        let mix = self.mixing(a);
        let along = if a.layout == Layout::MlpDown { 0 } else { 1 };
        let slots: Vec<Tensor> = (0..a.slots).map(|j| v.matmul(&mix.narrow(along, j * r, r).tr()).matmul(u)).collect();
        Tensor::cat(&slots, 1 - along) * self.config.scale
    }

    /// `W ← W + sign · ΔW` on every adapted site's weight.
    fn fold(&self, model: &Model, sign: f64) -> Result<()> {
        let weights = model.vs.variables();
        tch::no_grad(|| {
            for (path, a) in &self.sites {
                let name = format!("{path}.weight");
                let mut w = weights.get(&name).ok_or_else(|| Error::MissingWeights { path: "<model>".into(), names: vec![name.clone()] })?.shallow_clone();
                let _ = w.g_add_(&(self.delta_weight(a) * sign).to_kind(w.kind()));
            }
            Ok(())
        })
    }
}

/// Which sites FacT adapts and how each splits into `d × d` slots, or why one cannot.
fn slots_of(site: &Site, d: i64) -> Option<std::result::Result<(Layout, i64), String>> {
    let (i, o) = (site.in_features, site.out_features);
    let shape = |ok: bool, layout: Layout, slots: i64, what: &str| {
        if ok { Ok((layout, slots)) } else { Err(format!("{} ({what}) is {o}×{i}, not made of {d}×{d} slots", site.path)) }
    };
    Some(match site.role {
        Role::Query | Role::Key | Role::Value | Role::AttnOut => shape(i == d && o == d, Layout::Attn, 1, "attention map"),
        Role::Qkv => shape(i == d && o == 3 * d, Layout::Attn, 3, "fused qkv"),
        Role::MlpUp => shape(i == d && o % d == 0, Layout::MlpUp, o / d, "MLP up-projection"),
        Role::MlpDown => shape(o == d && i % d == 0, Layout::MlpDown, i / d, "MLP down-projection"),
        _ => return None,
    })
}

impl Method for Fact {
    fn name(&self) -> &'static str {
        "fact"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = self.config.clone();
        let bad = |message: String| Err(Error::MethodConfig { method: "fact".into(), message });
        if c.dim < 1 {
            return bad(format!("dim must be ≥ 1, got {}", c.dim));
        }
        if !c.scale.is_finite() {
            return bad(format!("scale must be a finite number, got {}", c.scale));
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", c.dropout));
        }
        let arch = model.backbone.arch();
        let all = model.sites();
        if !model.has_attention() {
            return bad(format!("needs a transformer backbone (bert, vit) with attention and MLP projections to factorise; `{arch}` has none"));
        }
        let d = model.backbone.hidden_size();
        let mut found = Vec::new();
        for site in &all {
            match slots_of(site, d) {
                Some(Ok((layout, slots))) => found.push((site, layout, slots)),
                Some(Err(why)) => return bad(format!("{arch}: {why}")),
                None => {}
            }
        }
        let r = c.dim;
        let uniform = |bound: f64| Init::Uniform { lo: -bound, up: bound };
        let vs = VarStore::new(model.device());
        let root = vs.root();
        self.u = Some(root.var("fact_u", &[r, d], uniform(1.0 / (d as f64).sqrt())));
        self.v = Some(root.zeros("fact_v", &[d, r]));
        let total_slots: i64 = found.iter().map(|(_, _, n)| n).sum();
        self.core = (c.kind == FactKind::Tk).then(|| root.var("fact_c", &[r, r, r], uniform(3f64.sqrt() / r as f64)));
        self.sites.clear();
        for (site, layout, slots) in found {
            let p = site.path.split('.').fold(vs.root(), |p, part| p / part);
            let factor = match (c.kind, layout) {
                (FactKind::Tt, Layout::MlpDown) => p.var("fact_core", &[r, slots * r], uniform(1.0 / ((slots * r) as f64).sqrt())),
                (FactKind::Tt, _) => p.var("fact_core", &[slots * r, r], uniform(1.0 / (r as f64).sqrt())),
                (FactKind::Tk, _) => p.var("fact_p", &[r, slots], uniform((6.0 / (r + total_slots) as f64).sqrt())),
            };
            self.sites.insert(site.path.clone(), Adapted { layout, slots, factor });
        }
        self.merged = false;
        self.vs = Some(vs);
        Ok(())
    }

    fn linear(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        let (Some(a), Some(u), Some(v)) = (self.sites.get(&site.path), &self.u, &self.v) else { return out };
        if self.merged {
            return out;
        }
        let (r, d, p) = (self.config.dim, u.size()[1], self.config.dropout);
        let drop = |y: Tensor| dropout(&y, p, train);
        // In the activations' precision (bf16 under mixed precision).
        let (mix, u, v) = (cast_like(&self.mixing(a), x), &cast_like(u, x), &cast_like(v, x));
        let delta = match a.layout {
            Layout::MlpDown => drop(x.unflatten(-1, [a.slots, d]).linear::<Tensor>(u, None).flatten(-2, -1).matmul(&mix)).linear::<Tensor>(v, None),
            _ => drop(x.linear::<Tensor>(u, None).matmul(&mix)).unflatten(-1, [a.slots, r]).linear::<Tensor>(v, None).flatten(-2, -1),
        };
        out + delta * self.config.scale
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
    use crate::testing;
    use tch::{Device, Kind};
    use zhijian_core::{Ctx, Input, parse_config};

    fn prepared(model: &Model, kind: FactKind, dim: i64, scale: f64) -> Fact {
        let mut f = Fact::new(FactConfig { kind, dim, scale, dropout: 0.1 });
        f.prepare(model).unwrap();
        // V starts at zero; a random V makes every update visible.
        tch::no_grad(|| f.v.as_ref().unwrap().shallow_clone().copy_(&Tensor::randn([model.backbone.hidden_size(), dim], (Kind::Float, Device::Cpu))));
        f
    }

    fn site(model: &Model, path: &str) -> Site {
        model.sites().into_iter().find(|s| s.path == path).unwrap()
    }

    fn var(f: &Fact, name: &str) -> Tensor {
        f.var_store().unwrap().variables()[name].shallow_clone()
    }

    /// Applies the `[out, in]` weight `w` as `nn.Linear` without bias.
    fn lin(x: &Tensor, w: &Tensor) -> Tensor {
        x.matmul(&w.tr())
    }

    /// Checks the hook (`out = 0`, evaluation) and `x ΔWᵀ` against `want`.
    fn check(f: &Fact, s: &Site, x: &Tensor, want: &Tensor) {
        let zeros = Tensor::zeros([x.size()[0], x.size()[1], s.out_features], (Kind::Float, Device::Cpu));
        let hook = f.linear(s, x, zeros, false);
        assert!(hook.allclose(want, 1e-4, 1e-5, false), "{}: hook vs reference", s.path);
        let merged = lin(x, &f.delta_weight(&f.sites[&s.path]));
        assert!(merged.allclose(want, 1e-4, 1e-5, false), "{}: ΔW vs reference", s.path);
    }

    /// FacT-TT on ViT against the reference forward (PETL-ViT `fact_tt.py`),
    /// written out with its own reshapes: d = 16, r = 2, MLP width 4·d.
    #[test]
    fn tt_updates_equal_the_reference_products() {
        let model = testing::vit(0);
        let f = prepared(&model, FactKind::Tt, 2, 0.5);
        let (u, v) = (var(&f, "fact_u"), var(&f, "fact_v"));
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let h = Tensor::randn([2, 3, 64], (Kind::Float, Device::Cpu));
        let ux = lin(&x, &u);

        let qkv = var(&f, "blocks.1.attn.qkv.fact_core"); // q_FacTs, k_FacTs, v_FacTs stacked
        assert_eq!(qkv.size(), [6, 2]);
        let parts: Vec<Tensor> = (0..3).map(|j| lin(&lin(&ux, &qkv.narrow(0, 2 * j, 2)), &v)).collect();
        check(&f, &site(&model, "blocks.1.attn.qkv"), &x, &(Tensor::cat(&parts, 2) * 0.5));

        let proj = var(&f, "blocks.1.attn.proj.fact_core");
        check(&f, &site(&model, "blocks.1.attn.proj"), &x, &(lin(&lin(&ux, &proj), &v) * 0.5));

        let fc1 = var(&f, "blocks.1.mlp.fc1.fact_core"); // fc1_FacTs: Linear(r, 4r)
        assert_eq!(fc1.size(), [8, 2]);
        let want = lin(&lin(&ux, &fc1).reshape([2, 3, 4, 2]), &v).reshape([2, 3, 64]) * 0.5;
        check(&f, &site(&model, "blocks.1.mlp.fc1"), &x, &want);

        let fc2 = var(&f, "blocks.1.mlp.fc2.fact_core"); // fc2_FacTs: Linear(4r, r)
        assert_eq!(fc2.size(), [2, 8]);
        let want = lin(&lin(&lin(&h.reshape([2, 3, 4, 16]), &u).reshape([2, 3, 8]), &fc2), &v) * 0.5;
        check(&f, &site(&model, "blocks.1.mlp.fc2"), &h, &want);

        // FacT-TT's parameter count: 2·d·r shared + 12·r² per block.
        let n: i64 = f.var_store().unwrap().variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(n, 2 * 16 * 2 + 2 * 12 * 4);
        assert!(f.linear(&site(&model, "head"), &x, x.shallow_clone(), false).equal(&x), "the head is not adapted");
    }

    /// FacT-TK on ViT against the reference forward (PETL-ViT `fact_tk.py`):
    /// `FacTc @ FacTp[:, idx:idx+4]` for attention, `[:, :, :4].reshape(r, 4r)` for the MLP.
    #[test]
    fn tk_updates_equal_the_reference_products() {
        let model = testing::vit(1);
        let f = prepared(&model, FactKind::Tk, 2, 2.0);
        let (u, v, c) = (var(&f, "fact_u"), var(&f, "fact_v"), var(&f, "fact_c"));
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let h = Tensor::randn([2, 3, 64], (Kind::Float, Device::Cpu));
        let ux = lin(&x, &u);
        let p_attn = Tensor::cat(&[var(&f, "blocks.0.attn.qkv.fact_p"), var(&f, "blocks.0.attn.proj.fact_p")], 1);
        let attn = c.matmul(&p_attn); // [r, r, 4]
        let parts: Vec<Tensor> = (0..3).map(|j| lin(&ux.matmul(&attn.select(2, j)), &v)).collect();
        check(&f, &site(&model, "blocks.0.attn.qkv"), &x, &(Tensor::cat(&parts, 2) * 2.0));
        check(&f, &site(&model, "blocks.0.attn.proj"), &x, &(lin(&ux.matmul(&attn.select(2, 3)), &v) * 2.0));

        let p_mlp = Tensor::cat(&[var(&f, "blocks.0.mlp.fc1.fact_p"), var(&f, "blocks.0.mlp.fc2.fact_p")], 1);
        let mlp = c.matmul(&p_mlp); // [r, r, 8]
        let (fc1, fc2) = (mlp.narrow(2, 0, 4).reshape([2, 8]), mlp.narrow(2, 4, 4).reshape([2, 8]));
        let want = lin(&ux.matmul(&fc1).reshape([2, 3, 4, 2]), &v).reshape([2, 3, 64]) * 2.0;
        check(&f, &site(&model, "blocks.0.mlp.fc1"), &x, &want);
        let want = lin(&lin(&h.reshape([2, 3, 4, 16]), &u).reshape([2, 3, 8]).matmul(&fc2.tr()), &v) * 2.0;
        check(&f, &site(&model, "blocks.0.mlp.fc2"), &h, &want);

        // FacT-TK's parameter count: 2·d·r + r³ + 12·L·r.
        let n: i64 = f.var_store().unwrap().variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(n, 2 * 16 * 2 + 8 + 12 * 2 * 2);
        assert!(var(&f, "blocks.0.mlp.fc1.fact_p").size() == [2, 4] && var(&f, "blocks.0.attn.qkv.fact_p").size() == [2, 3]);
    }

    /// On BERT the query, key and value are separate one-slot sites, and the
    /// MLP (width 2·d in the test BERT) has 2 slots.
    #[test]
    fn bert_sites_are_separate_query_key_value() {
        let model = testing::bert(0);
        for kind in [FactKind::Tt, FactKind::Tk] {
            let f = prepared(&model, kind, 3, 1.0);
            assert_eq!(f.sites().count(), 2 * 6);
            let q = &f.sites["encoder.layer.1.attention.self.key"];
            assert_eq!((q.layout, q.slots), (Layout::Attn, 1));
            let up = &f.sites["encoder.layer.1.intermediate.dense"];
            assert_eq!((up.layout, up.slots), (Layout::MlpUp, 2));
            assert_eq!(f.delta_weight(&f.sites["encoder.layer.1.output.dense"]).size(), [16, 32]);
            // A one-slot site is V K_jᵀ U scaled, K = the core (tt) or C·p (tk).
            let s = site(&model, "encoder.layer.1.attention.self.key");
            let k = match kind {
                FactKind::Tt => var(&f, "encoder.layer.1.attention.self.key.fact_core").tr(),
                FactKind::Tk => var(&f, "fact_c").matmul(&var(&f, "encoder.layer.1.attention.self.key.fact_p")).select(2, 0),
            };
            let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
            check(&f, &s, &x, &lin(&lin(&x, &var(&f, "fact_u")).matmul(&k), &var(&f, "fact_v")));
        }
    }

    fn features(model: &Model, methods: &[Box<dyn Method>], input: &Input) -> Tensor {
        model.features(&Ctx::new(false, methods, vec![]), input)
    }

    #[test]
    fn unchanged_at_init() {
        for (model, input) in [(testing::vit(4), testing::images()), (testing::bert(4), testing::tokens())] {
            for kind in [FactKind::Tt, FactKind::Tk] {
                let mut f = Fact::new(FactConfig { kind, ..Default::default() });
                f.prepare(&model).unwrap();
                assert!(f.identity_at_init());
                let methods: Vec<Box<dyn Method>> = vec![Box::new(f)];
                assert!(features(&model, &methods, &input).equal(&model.features(&Ctx::plain(false), &input)), "{kind:?}");
            }
        }
    }

    /// Merged outputs equal unmerged ones; unmerge restores the weights.
    #[test]
    fn merge_matches_unmerged_and_unmerge_restores() {
        for (model, input) in [(testing::vit(5), testing::images()), (testing::bert(5), testing::tokens())] {
            for kind in [FactKind::Tt, FactKind::Tk] {
                let f = prepared(&model, kind, 4, 0.3);
                let w0: Vec<(String, Tensor)> = f.sites().map(|p| (p.to_string(), model.variable(&format!("{p}.weight")).unwrap().copy())).collect();
                let mut methods: Vec<Box<dyn Method>> = vec![Box::new(f)];
                let plain = model.features(&Ctx::plain(false), &input);
                let unmerged = features(&model, &methods, &input);
                assert!(!unmerged.allclose(&plain, 1e-3, 1e-3, false), "{kind:?}: the update is visible");
                methods[0].merge(&model).unwrap();
                assert!(features(&model, &methods, &input).allclose(&unmerged, 1e-4, 1e-4, false), "{kind:?}: merged");
                assert!(model.features(&Ctx::plain(false), &input).allclose(&unmerged, 1e-4, 1e-4, false), "{kind:?}: folded into W");
                methods[0].unmerge(&model).unwrap();
                for (p, w) in &w0 {
                    assert!(model.variable(&format!("{p}.weight")).unwrap().allclose(w, 1e-6, 1e-6, false), "{kind:?}: {p}");
                }
                assert!(features(&model, &methods, &input).allclose(&unmerged, 1e-5, 1e-5, false));
            }
        }
    }

    #[test]
    fn cnn_and_bad_configs_are_errors() {
        let model = testing::efficientnet(0);
        let err = Fact::new(FactConfig::default()).prepare(&model).err().unwrap().to_string();
        assert!(err.contains("fact") && err.contains(model.backbone.arch()), "{err}");
        let model = testing::vit(0);
        assert!(Fact::new(FactConfig { dim: 0, ..Default::default() }).prepare(&model).is_err());
        assert!(Fact::new(FactConfig { dropout: 1.0, ..Default::default() }).prepare(&model).is_err());
        assert!(Fact::new(FactConfig { scale: f64::NAN, ..Default::default() }).prepare(&model).is_err());
        let c = FactConfig { kind: FactKind::Tk, dim: 16, scale: 10.0, dropout: 0.0 };
        let table = Fact::new(c.clone()).config();
        assert_eq!(table["kind"].as_str(), Some("tk"));
        assert_eq!(parse_config::<FactConfig>("fact", &table).unwrap(), c);
    }
}
