//! Weight-space merging: one model made from the weights of several runs of
//! one pre-trained backbone (fine-tunes of one task or of several), with no
//! further training. A merge rule reads whole model states (checkpoint key →
//! tensor): the pre-trained weights θ₀ and each run's θᵢ, adapters already
//! folded in; some rules also read per-model statistics (Fisher, Grams) or a
//! held-out score. One rule per file:
//!
//! | rule | file | reads |
//! |---|---|---|
//! | `soup` (uniform, greedy) | [`soup`] | θᵢ; greedy: held-out accuracy |
//! | `task_arithmetic` | [`task_arithmetic`] | θ₀, θᵢ |
//! | `ties` | [`ties`] | θ₀, θᵢ |
//! | `dare` | [`dare`] | θ₀, θᵢ |
//! | `fisher` | [`fisher`] | θᵢ, each model's diagonal Fisher on its task |
//! | `regmean` | [`regmean`] | θᵢ, each model's input Grams on its task |
//! | `rebasin` | [`rebasin`] | θᵢ of a chain backbone (MLP, small CNN) |
//! | `ensemble` | [`crate::ensemble`] | no weights: each model's outputs (probabilities, logits or pooled features) |
//!
//! `ensemble` is the one rule in output space: every model runs and their
//! predictions are combined (or one probe is fitted on their concatenated
//! features), so its models may be different backbones. It is listed here
//! because a `[[merge]]` entry names it like the others; the bench runs it
//! ([`MergeRule::merge`] refuses it).
//! Tensors that are not floating point (BatchNorm's step counters) are taken
//! from the first model. The rules on task vectors (task arithmetic, TIES,
//! DARE) average BatchNorm's running statistics instead of treating them as
//! weights: a variance dropped and rescaled, or trimmed, can turn negative.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use zhijian_core::{Error, Result};

pub mod batchnorm;
pub mod dare;
pub mod fisher;
pub mod rebasin;
pub mod regmean;
pub mod soup;
pub mod task_arithmetic;
pub mod ties;

/// A whole model state: checkpoint key → tensor.
pub type Weights = BTreeMap<String, Tensor>;

/// What a pass-through recorder (RegMean's Grams, BatchNorm statistics) sums
/// per layer during a forward pass, shared with the caller that reads it after.
pub(crate) type SiteSums<T> = std::sync::Arc<std::sync::Mutex<BTreeMap<String, T>>>;

/// A merge rule and its settings. A `[[merge]]` entry writes it as a table
/// with its `kind` (`rule = { kind = "ties", density = 0.2 }`), read by
/// [`MergeRule::from_table`]; serde sees it tagged by the variant's name
/// (`{ ties = { density = 0.2 } }`), which keeps the span of a bad value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MergeRule {
    /// Model soup: the mean of the models, or greedy on held-out accuracy.
    Soup {
        /// Greedy soup (add a model only if held-out accuracy does not drop). Default false: uniform.
        #[serde(default)]
        greedy: bool,
    },
    /// Task arithmetic: θ₀ + λ Σᵢ (θᵢ − θ₀).
    TaskArithmetic {
        /// λ, the task vectors' scale. Default 0.4 (Ilharco et al. pick λ in 0‥1 on validation; 0.3–0.5 is typical for a few tasks).
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
    /// TIES: trim each task vector to its largest entries, elect signs, average the agreeing values.
    Ties {
        /// Share of each task vector's entries kept, in (0, 1]. Default 0.2 (the paper's k = 20 %).
        #[serde(default = "default_ties_density")]
        density: f64,
        /// λ, the merged task vector's scale. Default 1 (the paper's value with the disjoint mean).
        #[serde(default = "one")]
        lambda: f64,
    },
    /// DARE: drop each task vector's entries with probability 1 − density, rescale, add as task arithmetic.
    Dare {
        /// Share of each task vector's entries kept, in (0, 1]. Default 0.1 (the paper drops 90 %).
        #[serde(default = "default_dare_density")]
        density: f64,
        /// λ, as task arithmetic's. Default 0.4.
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
    /// Fisher merging: the models' values weighted by their diagonal Fisher.
    Fisher {
        /// Training examples each model's Fisher is estimated on (one backward pass each). Default 256.
        #[serde(default = "default_examples")]
        examples: i64,
        /// Floor on the Fisher (the reference's `fisher_floor`). Default 1e-6.
        #[serde(default = "default_floor")]
        floor: f64,
    },
    /// RegMean: each linear map solves the regression onto every model's outputs on its own inputs.
    Regmean {
        /// Training examples each model's Grams are taken on. Default 256.
        #[serde(default = "default_examples")]
        examples: i64,
        /// Scale of the Grams' off-diagonal entries, in [0, 1]. Default 0.95 (the paper's choice for vision).
        #[serde(default = "default_alpha")]
        alpha: f64,
    },
    /// Git Re-Basin weight matching: permute every model's hidden units onto the first's, then average.
    Rebasin {
        /// Most rounds of coordinate descent over the permutations. Default 100.
        #[serde(default = "default_rounds")]
        max_iters: usize,
    },
    /// Output-space ensemble: the models' probabilities or logits combined,
    /// or one probe on their concatenated features ([`crate::ensemble`]).
    Ensemble(crate::ensemble::Ensemble),
}

fn default_lambda() -> f64 {
    0.4
}
fn one() -> f64 {
    1.0
}
fn default_ties_density() -> f64 {
    0.2
}
fn default_dare_density() -> f64 {
    0.1
}
fn default_examples() -> i64 {
    256
}
fn default_floor() -> f64 {
    1e-6
}
fn default_alpha() -> f64 {
    0.95
}
fn default_rounds() -> usize {
    100
}

/// What a rule reads besides the models' weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Each model's diagonal Fisher on this many of its task's training examples.
    pub fisher: Option<i64>,
    /// Each model's linear-map input Grams on this many of its task's training examples.
    pub grams: Option<i64>,
    /// A held-out score of candidate merges.
    pub score: bool,
    /// The pre-trained weights θ₀.
    pub base: bool,
    /// The permutation symmetries of the backbone.
    pub permutations: bool,
}

/// What a rule merges: the models' weights and whatever [`MergeRule::needs`] asked for.
pub struct MergeInputs<'a> {
    /// The pre-trained weights θ₀ (empty when not needed).
    pub base: &'a Weights,
    /// Each model's weights θᵢ, adapters folded in.
    pub models: &'a [Weights],
    /// Each model's diagonal Fisher, when the rule needs it.
    pub fishers: &'a [Weights],
    /// Each model's linear-map input Grams, when the rule needs them.
    pub grams: &'a [Weights],
    /// The backbone's permutation symmetries, when the rule needs them.
    pub permutations: Option<&'a rebasin::PermutationSpec>,
    /// Seed of the rule's random draws (DARE's masks, re-basin's order).
    pub seed: u64,
}

/// The rules' `kind`s.
pub const RULES: [&str; 8] = ["soup", "task_arithmetic", "ties", "dare", "fisher", "regmean", "rebasin", "ensemble"];

impl MergeRule {
    /// The rule a `rule` table writes, `kind` and settings, checked: a
    /// missing `kind` lists the table's keys and the rules; a misspelt or
    /// ill-typed setting is quoted; a setting out of range is named.
    pub fn from_table(table: &toml::Table) -> Result<MergeRule> {
        let kind = match table.get("kind") {
            Some(toml::Value::String(kind)) => kind.clone(),
            _ => {
                let keys: Vec<&str> = table.keys().map(String::as_str).collect();
                return Err(Error::Config(format!(
                    "a merge rule needs `kind = \"<rule>\"`, one of {}; the table has {}",
                    RULES.join(", "),
                    if keys.is_empty() { "no keys".to_string() } else { keys.join(", ") }
                )));
            }
        };
        let mut settings = table.clone();
        settings.remove("kind");
        let tagged = toml::Table::from_iter([(kind, toml::Value::Table(settings))]);
        let mut rule: MergeRule = zhijian_core::from_table(&tagged).map_err(|e| Error::Config(format!("merge rule: {e}")))?;
        rule.validate()?;
        // The probe's defaults, written in so that records and run keys hold them.
        if let MergeRule::Ensemble(e) = &mut rule {
            e.fill_defaults();
        }
        Ok(rule)
    }

    /// The rule's name, as `kind` writes it.
    pub fn name(&self) -> &'static str {
        match self {
            MergeRule::Soup { greedy: false } => "uniform soup",
            MergeRule::Soup { greedy: true } => "greedy soup",
            MergeRule::TaskArithmetic { .. } => "task arithmetic",
            MergeRule::Ties { .. } => "TIES",
            MergeRule::Dare { .. } => "DARE",
            MergeRule::Fisher { .. } => "Fisher merging",
            MergeRule::Regmean { .. } => "RegMean",
            MergeRule::Rebasin { .. } => "re-basin (weight matching)",
            MergeRule::Ensemble(e) => e.name(),
        }
    }

    /// Checks the settings' ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(format!("merge rule `{}`: {what}", self.name())));
        match *self {
            MergeRule::Ties { density, .. } | MergeRule::Dare { density, .. } if !(density > 0.0 && density <= 1.0) => bad("density must be in (0, 1]"),
            MergeRule::Fisher { examples, .. } | MergeRule::Regmean { examples, .. } if examples < 1 => bad("examples must be ≥ 1"),
            MergeRule::Fisher { floor, .. } if floor.is_nan() || floor <= 0.0 => bad("floor must be > 0"),
            MergeRule::Regmean { alpha, .. } if !(0.0..=1.0).contains(&alpha) => bad("alpha must be in [0, 1]"),
            MergeRule::Rebasin { max_iters: 0 } => bad("max_iters must be ≥ 1"),
            MergeRule::Ensemble(ref e) => e.validate(),
            _ => Ok(()),
        }
    }

    /// What the rule reads besides the models' weights.
    pub fn needs(&self) -> Needs {
        match *self {
            MergeRule::Soup { greedy } => Needs { score: greedy, ..Needs::default() },
            MergeRule::TaskArithmetic { .. } | MergeRule::Ties { .. } | MergeRule::Dare { .. } => Needs { base: true, ..Needs::default() },
            MergeRule::Fisher { examples, .. } => Needs { fisher: Some(examples), ..Needs::default() },
            MergeRule::Regmean { examples, .. } => Needs { grams: Some(examples), ..Needs::default() },
            MergeRule::Rebasin { .. } => Needs { permutations: true, ..Needs::default() },
            // It reads no weights: its models run.
            MergeRule::Ensemble(_) => Needs::default(),
        }
    }

    /// Merges `inputs.models` into one state; `score` rates a candidate state
    /// on held-out data (greedy soups). Returns the state and what the rule
    /// chose (the greedy soup's ingredients, the permutations' agreement).
    pub fn merge(&self, inputs: &MergeInputs, score: impl FnMut(&Weights) -> Result<f64>) -> Result<(Weights, serde_json::Value)> {
        if inputs.models.is_empty() {
            return Err(Error::Config(format!("merge rule `{}`: no models to merge", self.name())));
        }
        let models: Vec<&Weights> = inputs.models.iter().collect();
        let need = |what: &str, have: usize| {
            if have == models.len() {
                Ok(())
            } else {
                Err(Error::Config(format!("merge rule `{}` needs {what} for each of the {} models, got {have}", self.name(), models.len())))
            }
        };
        let (mut floats, fixed) = split_off_fixed(&models);
        // BatchNorm's running statistics are not weights: dropping, rescaling or trimming a
        // variance's task vector can make it negative. The rules on task vectors average them.
        let statistics = if self.needs().base { split_off_statistics(&mut floats) } else { Weights::new() };
        let floats: Vec<&Weights> = floats.iter().collect();
        let mut summary = serde_json::Value::Null;
        let mut merged = match *self {
            MergeRule::Soup { greedy: false } => soup::uniform(&floats),
            MergeRule::Soup { greedy: true } => {
                let (soup, trace) = soup::greedy(&floats, score)?;
                summary = serde_json::to_value(trace).unwrap_or_default();
                soup
            }
            MergeRule::TaskArithmetic { lambda } => task_arithmetic::merge(inputs.base, &floats, lambda),
            MergeRule::Ties { density, lambda } => ties::merge(inputs.base, &floats, density, lambda),
            MergeRule::Dare { density, lambda } => dare::merge(inputs.base, &floats, density, lambda, inputs.seed),
            MergeRule::Fisher { floor, .. } => {
                need("a Fisher", inputs.fishers.len())?;
                fisher::merge(&floats, &inputs.fishers.iter().collect::<Vec<_>>(), floor)
            }
            MergeRule::Regmean { alpha, .. } => {
                need("Grams", inputs.grams.len())?;
                regmean::merge(&floats, &inputs.grams.iter().collect::<Vec<_>>(), alpha)
            }
            MergeRule::Rebasin { max_iters } => {
                let spec = inputs.permutations.ok_or_else(|| Error::Config("re-basin needs the backbone's permutation symmetries".into()))?;
                let first = floats[0];
                let mut aligned = Vec::new();
                let mut moved = Vec::new();
                for other in &floats[1..] {
                    let (w, units) = align(spec, first, other, max_iters, inputs.seed)?;
                    aligned.push(w);
                    moved.push(units);
                }
                summary = serde_json::json!({ "units_moved": moved });
                soup::uniform(&[first].into_iter().chain(&aligned).collect::<Vec<_>>())
            }
            MergeRule::Ensemble(_) => {
                return Err(Error::Config(
                    "merge rule `ensemble` combines the models' outputs, not their weights: run each model and combine them with `zhijian_merger::ensemble`"
                        .into(),
                ));
            }
        };
        merged.extend(fixed);
        merged.extend(statistics);
        Ok((merged, summary))
    }
}

/// `other` with its hidden units permuted to match `first`'s by weight
/// matching, and how many units moved.
pub fn align(spec: &rebasin::PermutationSpec, first: &Weights, other: &Weights, max_iters: usize, seed: u64) -> Result<(Weights, usize)> {
    // Only the tensors merged: not the step counters, nor a head left out of a merge across tasks.
    let axes = spec.axes.iter().filter(|(k, _)| first.contains_key(*k)).map(|(k, a)| (k.clone(), a.clone())).collect();
    let spec = &rebasin::PermutationSpec { axes, sizes: spec.sizes.clone() };
    let perms = rebasin::weight_matching(spec, first, other, max_iters, seed)?;
    let moved = perms.iter().map(|p| p.iter().enumerate().filter(|&(i, &j)| i as i64 != j).count()).sum();
    Ok((rebasin::permute(spec, &perms, other)?, moved))
}

/// The floating-point tensors of each model, and the first model's others (step counters).
fn split_off_fixed(models: &[&Weights]) -> (Vec<Weights>, Weights) {
    let fixed: Weights = models[0].iter().filter(|(_, t)| !t.is_floating_point()).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let floats = models.iter().map(|m| m.iter().filter(|(k, _)| !fixed.contains_key(*k)).map(|(k, t)| (k.clone(), t.shallow_clone())).collect()).collect();
    (floats, fixed)
}

/// Takes BatchNorm's running statistics out of each model; returns their mean over the models.
fn split_off_statistics(models: &mut [Weights]) -> Weights {
    let keys: Vec<String> = models[0].keys().filter(|k| zhijian_core::layers::is_buffer(k)).cloned().collect();
    let taken: Vec<Weights> = models.iter_mut().map(|m| keys.iter().filter_map(|k| m.remove_entry(k)).collect()).collect();
    soup::uniform(&taken.iter().collect::<Vec<_>>())
}

/// Applies `f` to each key's tensors across `models` (every model has the
/// first's keys, in the same shapes: the caller checks).
pub(crate) fn combine(models: &[&Weights], mut f: impl FnMut(&[&Tensor]) -> Tensor) -> Weights {
    tch::no_grad(|| models[0].keys().map(|k| (k.clone(), f(&models.iter().map(|m| &m[k]).collect::<Vec<_>>()))).collect())
}

/// θ₀ + f(τ₁, …, τₙ) per key, with τᵢ = θᵢ − θ₀.
pub(crate) fn combine_deltas(base: &Weights, models: &[&Weights], mut f: impl FnMut(&[&Tensor]) -> Tensor) -> Weights {
    tch::no_grad(|| {
        models[0]
            .keys()
            .map(|k| {
                let b = &base[k];
                let taus: Vec<Tensor> = models.iter().map(|m| &m[k] - b).collect();
                (k.clone(), b + f(&taus.iter().collect::<Vec<_>>()))
            })
            .collect()
    })
}

/// Checks that every model has the first's keys in the same shapes (and the
/// pre-trained weights too, when given), naming what differs.
pub fn check_compatible(names: &[String], models: &[Weights], base: Option<&Weights>) -> Result<()> {
    let first = &models[0];
    let base_name = String::from("the pre-trained weights");
    let others = models.iter().zip(names).skip(1).chain(base.map(|b| (b, &base_name)));
    for (m, name) in others {
        let missing: Vec<&String> = first.keys().filter(|k| !m.contains_key(*k)).collect();
        let shapes: Vec<String> =
            first.iter().filter_map(|(k, t)| m.get(k).filter(|o| o.size() != t.size()).map(|o| format!("{k} {:?} against {:?}", t.size(), o.size()))).collect();
        if !missing.is_empty() || !shapes.is_empty() {
            return Err(Error::Config(format!(
                "cannot merge {} with {name}: it lacks {missing:?}{}{}",
                names[0],
                if shapes.is_empty() { "" } else { "; shapes differ: " },
                shapes.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state of 1-d f32 tensors.
    pub fn weights(entries: &[(&str, &[f64])]) -> Weights {
        entries.iter().map(|(k, v)| (k.to_string(), Tensor::from_slice(v).to_kind(tch::Kind::Float))).collect()
    }

    #[test]
    fn rule_tables_parse_and_name_what_is_wrong() {
        let table = |text: &str| text.parse::<toml::Table>().unwrap();
        assert_eq!(MergeRule::from_table(&table("kind = \"ties\"")).unwrap(), MergeRule::Ties { density: 0.2, lambda: 1.0 });
        assert_eq!(MergeRule::from_table(&table("kind = \"soup\"\ngreedy = true")).unwrap(), MergeRule::Soup { greedy: true });
        let err = |text: &str| MergeRule::from_table(&table(text)).unwrap_err().to_string();
        let e = err("knd = \"ties\"\ndensity = 0.5");
        assert!(e.contains("`kind") && e.contains("knd") && e.contains("rebasin"), "{e}");
        let e = err("kind = \"soup\"\ngreedy = -2.5");
        assert!(e.contains("greedy = -2.5"), "{e}");
        let e = err("kind = \"dare\"\ndensty = 0.5");
        assert!(e.contains("densty"), "{e}");
        let e = err("kind = \"fisher\"\nexamples = 0");
        assert!(e.contains("examples must be ≥ 1"), "{e}");
        let e = err("kind = \"rebase\"");
        assert!(e.contains("rebase") && e.contains("rebasin") && e.contains("ensemble"), "{e}");
        // The output-space rule parses as the others; a feature ensemble's probe settings get their defaults.
        let MergeRule::Ensemble(e) = MergeRule::from_table(&table("kind = \"ensemble\"\ncombine = \"features\"\nsteps = 50")).unwrap() else {
            panic!("not an ensemble")
        };
        assert_eq!((e.combine, e.steps, e.lr), (crate::ensemble::Combine::Features, Some(50), Some(1e-2)));
        let e = err("kind = \"ensemble\"\nweights = [1.0, -1.0]");
        assert!(e.contains("weights[1] = -1"), "{e}");
        let e = err("kind = \"ensemble\"\ncombine = \"vote\"");
        assert!(e.contains("vote"), "{e}");
        let rule = MergeRule::from_table(&table("kind = \"ensemble\"")).unwrap();
        let one = MergeInputs { base: &Weights::new(), models: &[weights(&[("w", &[1.0])])], fishers: &[], grams: &[], permutations: None, seed: 0 };
        let e = rule.merge(&one, |_| Ok(0.0)).unwrap_err().to_string();
        assert!(e.contains("outputs, not their weights"), "{e}");
    }

    /// The f32 values of `w[key]`.
    pub fn values(w: &Weights, key: &str) -> Vec<f32> {
        Vec::<f32>::try_from(&w[key].flatten(0, -1)).expect("f32")
    }
}

/// The table every rule passes: merging a model with itself returns it; with
/// λ = 0 the rules on task vectors return the pre-trained weights; TIES and
/// DARE at density 1 are task arithmetic.
#[cfg(test)]
mod conformance {
    use tch::{Device, Kind};

    use super::tests::weights;
    use zhijian_core::Model;
    use zhijian_core::train::Split;

    use super::*;

    fn state(model: &Model) -> Weights {
        model.vs.variables().into_iter().map(|(k, t)| (k, t.detach().copy())).collect()
    }

    /// The toy MLP's weights plus `scale` × a seeded perturbation: a "fine-tune".
    fn tuned(base: &Weights, seed: i64, scale: f64) -> Weights {
        tch::manual_seed(seed);
        base.iter().map(|(k, t)| (k.clone(), t + Tensor::randn_like(t) * scale)).collect()
    }

    fn close(a: &Weights, b: &Weights, what: &str) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
        for (k, t) in a {
            assert!(t.allclose(&b[k], 1e-5, 1e-6, false), "{what}: {k} differs by {}", (t - &b[k]).abs().max());
        }
    }

    fn model_with(w: &Weights) -> Model {
        let model = zhijian_backbones::toys::mlp(0, 3);
        tch::no_grad(|| {
            for (k, v) in model.vs.variables() {
                v.shallow_clone().copy_(&w[&k]);
            }
        });
        model
    }

    fn every_rule() -> Vec<MergeRule> {
        vec![
            MergeRule::Soup { greedy: false },
            MergeRule::Soup { greedy: true },
            MergeRule::TaskArithmetic { lambda: 1.0 },
            MergeRule::Ties { density: 1.0, lambda: 1.0 },
            MergeRule::Dare { density: 1.0, lambda: 1.0 },
            MergeRule::Fisher { examples: 8, floor: 1e-6 },
            MergeRule::Regmean { examples: 8, alpha: 0.95 },
            MergeRule::Rebasin { max_iters: 20 },
        ]
    }

    /// `rule` over `models`, with the statistics it reads computed on 8 random images.
    fn run(rule: &MergeRule, base: &Weights, models: &[Weights]) -> Weights {
        let images = Tensor::randn([8, 1, 4, 4], (Kind::Float, Device::Cpu));
        let split = Split { name: "train".into(), input: zhijian_core::Input::Images(images), labels: Tensor::zeros([8], (Kind::Int64, Device::Cpu)) };
        let needs = rule.needs();
        let fishers: Vec<Weights> = match needs.fisher {
            Some(n) => models.iter().map(|m| fisher::diagonal(&model_with(m), &split, n, 0).unwrap()).collect(),
            None => Vec::new(),
        };
        let grams: Vec<Weights> = match needs.grams {
            Some(n) => models.iter().map(|m| regmean::grams(&model_with(m), &split, n, 4).unwrap()).collect(),
            None => Vec::new(),
        };
        let spec = rebasin::PermutationSpec::chain(&zhijian_backbones::toys::mlp(0, 3)).unwrap();
        let inputs = MergeInputs { base, models, fishers: &fishers, grams: &grams, permutations: Some(&spec), seed: 0 };
        // Greedy soups score by closeness to the first model: ties keep everything.
        let first = &models[0];
        let score = |w: &Weights| Ok(-w.iter().map(|(k, t)| (t - &first[k]).abs().max().double_value(&[])).fold(0.0, f64::max));
        rule.merge(&inputs, score).unwrap().0
    }

    #[test]
    fn merging_a_model_with_itself_returns_it() {
        let base = state(&zhijian_backbones::toys::mlp(0, 3));
        let a = tuned(&base, 1, 0.1);
        for rule in every_rule() {
            // Rules on task vectors add them up: one model, λ = 1.
            let models = if rule.needs().base { vec![shallow(&a)] } else { vec![shallow(&a), shallow(&a)] };
            close(&run(&rule, &base, &models), &a, rule.name());
        }
    }

    /// The output-space rule's form of the property: the probabilities or
    /// logits of a model ensembled with itself are its own, whatever the
    /// weights. (Not the feature ensemble: its probe on two copies of one
    /// model's features is a new head, not the model's.)
    #[test]
    fn ensembling_a_model_with_itself_returns_its_predictions() {
        use crate::ensemble::{Combine, Ensemble};
        let base = state(&zhijian_backbones::toys::mlp(0, 3));
        let model = model_with(&tuned(&base, 1, 0.1));
        let images = zhijian_core::Input::Images(Tensor::randn([8, 1, 4, 4], (Kind::Float, Device::Cpu)));
        let logits = zhijian_core::train::predict(&model, &[], &images, 4, zhijian_core::Compute::Fp32).unwrap();
        for combine in [Combine::Probabilities, Combine::Logits] {
            let rule = Ensemble { combine, weights: Some(vec![1.0, 3.0]), ..Ensemble::default() };
            let out = rule.combine(&[&logits, &logits], &rule.member_weights(2).unwrap()).unwrap();
            let own = if combine == Combine::Logits { logits.shallow_clone() } else { logits.softmax(-1, Kind::Float) };
            assert!(out.allclose(&own, 1e-5, 1e-6, false), "{}", rule.name());
            assert!(out.argmax(1, false).equal(&logits.argmax(1, false)), "{}", rule.name());
        }
    }

    #[test]
    fn lambda_zero_returns_the_pre_trained_weights() {
        let base = state(&zhijian_backbones::toys::mlp(0, 3));
        let models = [tuned(&base, 1, 0.1), tuned(&base, 2, 0.1)];
        for rule in [MergeRule::TaskArithmetic { lambda: 0.0 }, MergeRule::Ties { density: 0.5, lambda: 0.0 }, MergeRule::Dare { density: 0.5, lambda: 0.0 }] {
            close(&run(&rule, &base, &models), &base, rule.name());
        }
    }

    #[test]
    fn ties_and_dare_at_density_one_are_task_arithmetic() {
        let base = state(&zhijian_backbones::toys::mlp(0, 3));
        let (a, b) = (tuned(&base, 1, 0.1), tuned(&base, 2, 0.1));
        let arithmetic = |models: &[Weights], lambda| run(&MergeRule::TaskArithmetic { lambda }, &base, models);
        let two = [shallow(&a), shallow(&b)];
        close(&run(&MergeRule::Dare { density: 1.0, lambda: 0.7 }, &base, &two), &arithmetic(&two, 0.7), "DARE");
        // TIES averages the values that agree in sign: with task vectors τ and 3τ that is 2τ, task arithmetic's sum at λ / 2.
        let thrice: Weights = a.iter().map(|(k, t)| (k.clone(), (t - &base[k]) * 3.0 + &base[k])).collect();
        let agreeing = [shallow(&a), thrice];
        close(&run(&MergeRule::Ties { density: 1.0, lambda: 0.7 }, &base, &agreeing), &arithmetic(&agreeing, 0.35), "TIES");
    }

    #[test]
    fn task_vector_rules_average_batchnorm_statistics() {
        let base = weights(&[("w", &[0.0, 0.0]), ("bn.running_var", &[1.0, 1.0])]);
        let a = weights(&[("w", &[1.0, 2.0]), ("bn.running_var", &[0.2, 0.4])]);
        let b = weights(&[("w", &[3.0, -2.0]), ("bn.running_var", &[0.4, 0.6])]);
        for rule in [MergeRule::TaskArithmetic { lambda: 1.0 }, MergeRule::Ties { density: 0.5, lambda: 1.0 }, MergeRule::Dare { density: 0.1, lambda: 1.0 }] {
            let inputs = MergeInputs { base: &base, models: &[shallow(&a), shallow(&b)], fishers: &[], grams: &[], permutations: None, seed: 3 };
            let (merged, _) = rule.merge(&inputs, |_| Ok(0.0)).unwrap();
            let var = Vec::<f32>::try_from(&merged["bn.running_var"]).unwrap();
            assert!((var[0] - 0.3).abs() < 1e-6 && (var[1] - 0.5).abs() < 1e-6, "{}: {var:?}", rule.name());
        }
    }

    #[test]
    fn rebasin_undoes_a_permutation_of_hidden_units() {
        let base = state(&zhijian_backbones::toys::mlp(0, 3));
        let a = tuned(&base, 1, 0.1);
        let spec = rebasin::PermutationSpec::chain(&zhijian_backbones::toys::mlp(0, 3)).unwrap();
        tch::manual_seed(5);
        let perms: Vec<Vec<i64>> = spec.sizes.iter().map(|&n| Vec::<i64>::try_from(&Tensor::randperm(n, (Kind::Int64, Device::Cpu))).unwrap()).collect();
        let shuffled = rebasin::permute(&spec, &perms, &a).unwrap();
        // The plain mean of a and its shuffled copy is another model; re-basin's is a.
        let plain = run(&MergeRule::Soup { greedy: false }, &base, &[shallow(&a), shallow(&shuffled)]);
        assert!(!plain["layers.0.weight"].allclose(&a["layers.0.weight"], 1e-3, 1e-3, false));
        close(&run(&MergeRule::Rebasin { max_iters: 20 }, &base, &[shallow(&a), shallow(&shuffled)]), &a, "re-basin");
    }

    fn shallow(w: &Weights) -> Weights {
        w.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    }
}
