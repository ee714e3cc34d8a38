//! The pre-trained starting point of the parameters a run trains: what L2-SP
//! pulls toward, what FTP and TPGM project toward, what WiSE-FT interpolates
//! from; and the weight penalty L2 and L2-SP share ([`WeightPenalty`]).

use serde::Serialize;
use tch::Tensor;
use zhijian_core::{Method, Model, Result, RunData, StepOutput, TrainConfig, config_table};

/// One trainable parameter with a copy of its value before the first step.
pub struct Anchored {
    /// Its name: a checkpoint key, or a method's `instance/param`.
    pub name: String,
    /// The live parameter (shares storage with the model's or method's variable).
    pub param: Tensor,
    /// Its value when training started (no gradient).
    pub start: Tensor,
}

/// Snapshots of the parameters `keep` selects among `params` (named as in
/// [`zhijian_core::RunData::params`]), taken now.
pub fn snapshot(params: &[(String, Tensor)], keep: impl Fn(&str) -> bool) -> Vec<Anchored> {
    params.iter().filter(|(name, _)| keep(name)).map(|(name, t)| Anchored { name: name.clone(), param: t.shallow_clone(), start: t.detach().copy() }).collect()
}

/// `½ Σ ‖θ − θ₀‖²` over `anchored` (toward the pre-trained values), or
/// `½ Σ ‖θ‖²` when `toward_start` is false; `None` when nothing is anchored.
pub fn half_squared_distance(anchored: &[Anchored], toward_start: bool) -> Option<Tensor> {
    anchored
        .iter()
        .map(|a| if toward_start { (&a.param - &a.start).square().sum(tch::Kind::Float) } else { a.param.square().sum(tch::Kind::Float) } * 0.5)
        .reduce(|x, y| x + y)
}

/// `½ Σ ‖θ‖²` over the parameters of `params` that are the model's head.
pub fn half_squared_head(head: &[Tensor]) -> Option<Tensor> {
    head.iter().map(|t| t.square().sum(tch::Kind::Float) * 0.5).reduce(|x, y| x + y)
}

/// The configuration of a weight penalty `α·½Σ‖w − a‖² + β·½‖w_head‖²` over
/// the reused weights (`a` = 0 or the pre-trained value) and the head.
pub trait PenaltyConfig: Serialize + Send + 'static {
    /// Registered name.
    const NAME: &'static str;
    /// Whether the reused weights are pulled toward their pre-trained values (L2-SP) or toward 0 (L2).
    const TOWARD_START: bool;
    /// α, the weight of the reused weights' term.
    fn alpha(&self) -> f64;
    /// β, the weight of the head's term.
    fn beta(&self) -> f64;
}

/// A weight penalty as its configuration `C` says (L2, L2-SP). The reused
/// weights are the model's trainable non-head parameters when training
/// starts; methods' own parameters (LoRA's factors) are not reused weights.
pub struct WeightPenalty<C> {
    config: C,
    reused: Vec<Anchored>,
    head: Vec<Tensor>,
}

impl<C: PenaltyConfig> WeightPenalty<C> {
    /// The penalty with `config`.
    pub fn new(config: C) -> Self {
        WeightPenalty { config, reused: Vec::new(), head: Vec::new() }
    }
}

impl<C: PenaltyConfig> Method for WeightPenalty<C> {
    fn name(&self) -> &'static str {
        C::NAME
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        self.reused = snapshot(data.params, |name| !name.contains('/') && !data.is_head(model, name));
        self.head = data.params.iter().filter(|(name, _)| data.is_head(model, name)).map(|(_, t)| t.shallow_clone()).collect();
        Ok(())
    }

    fn extra_loss(&self, _step: &StepOutput) -> Option<Tensor> {
        let reused = half_squared_distance(&self.reused, C::TOWARD_START).map(|t| t * self.config.alpha());
        let head = half_squared_head(&self.head).map(|t| t * self.config.beta());
        [reused, head].into_iter().flatten().reduce(|a, b| a + b)
    }
}
