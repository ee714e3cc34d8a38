//! The pre-trained starting point of the parameters a run trains: what L2-SP
//! pulls toward, what FTP and TPGM project toward, what WiSE-FT interpolates from.

use tch::Tensor;

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
