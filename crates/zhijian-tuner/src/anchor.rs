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
