//! What NCM, SimpleShot and kNN share: distances between pooled features,
//! class means, growable state and the frozen head.
//!
//! State lives in the method's own [`VarStore`] as variables without gradient,
//! made empty (first dimension 0) in `prepare` and grown to their fitted length
//! in [`zhijian_core::Method::fit`]; the artifact keeps them and
//! [`zhijian_core::train::restore`] grows a fresh method's to the saved length.
//! Empty state means "not fitted yet": the head's logits then pass through, so
//! the methods are the identity at initialisation and compose with methods that
//! train through the head (`lora` + `ncm` with `train_head = true`). Whether
//! state is fitted is read from its shape, never from the device.

use serde::{Deserialize, Serialize};
use tch::nn::Path;
use tch::{Kind, Tensor};
use zhijian_core::{Error, Model, ParamGroup, Result};

/// How two feature vectors are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Euclidean distance; scores are `-½‖x − y‖²`.
    #[default]
    Euclidean,
    /// Cosine similarity `x·y / (‖x‖ ‖y‖)`, in [-1, 1].
    Cosine,
}

/// Squared Euclidean distances between the rows of `x` and of `y`, through
/// `‖x‖² − 2 x·y + ‖y‖²` (one matmul; clamped at 0 against rounding), so a
/// memory of many training features never needs a `[b, n, hidden]` difference.
///
/// # Shapes
/// `x` `[b, d]`, `y` `[n, d]` → `[b, n]`.
pub fn sq_distances(x: &Tensor, y: &Tensor) -> Tensor {
    let xx = x.square().sum_dim_intlist(1, true, Kind::Float);
    let yy = y.square().sum_dim_intlist(1, true, Kind::Float).transpose(0, 1);
    (xx - x.matmul(&y.transpose(0, 1)) * 2.0 + yy).clamp_min(0.0)
}

/// Rows scaled to unit L2 norm (a zero row stays zero).
pub fn l2_normalise(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// Cosine similarities between the rows of `x` and of `y`.
///
/// # Shapes
/// `x` `[b, d]`, `y` `[n, d]` → `[b, n]`.
pub fn cosine_similarities(x: &Tensor, y: &Tensor) -> Tensor {
    l2_normalise(x).matmul(&l2_normalise(y).transpose(0, 1))
}

/// Scores of `x` against `y` under `metric`: `-½‖x − y‖²` or the cosine
/// similarity (larger = nearer).
///
/// # Shapes
/// `x` `[b, d]`, `y` `[n, d]` → `[b, n]`.
pub fn scores(x: &Tensor, y: &Tensor, metric: Metric) -> Tensor {
    match metric {
        Metric::Euclidean => sq_distances(x, y) * -0.5,
        Metric::Cosine => cosine_similarities(x, y),
    }
}

/// Checks that `labels` name classes of the head and that `features` has one
/// row per label; errors name `method`.
pub fn check_fit(method: &str, features: &Tensor, labels: &Tensor, classes: i64) -> Result<()> {
    let (n, m) = (features.size()[0], labels.size()[0]);
    if n != m || n == 0 {
        return Err(Error::Data(format!("{method}: fitting needs one label per feature row and at least one row, got {n} rows and {m} labels")));
    }
    let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
    if lo < 0 || hi >= classes {
        return Err(Error::Data(format!("{method}: training labels span {lo}..={hi}, outside the head's {classes} classes")));
    }
    Ok(())
}

/// Per-class means of `features` and how many rows each class has; a class
/// without rows gets a zero mean and a count of 0.
///
/// # Shapes
/// `features` `[n, d]`, `labels` `[n]` (int64) → (`[classes, d]`, `[classes]`).
pub fn class_means(features: &Tensor, labels: &Tensor, classes: i64) -> (Tensor, Tensor) {
    let (features, labels) = (features.to_kind(Kind::Float), labels.to_device(features.device()));
    let d = features.size()[1];
    let sums = Tensor::zeros([classes, d], (Kind::Float, features.device())).index_add(0, &labels, &features);
    let counts = Tensor::zeros([classes], (Kind::Float, features.device())).index_add(0, &labels, &labels.ones_like().to_kind(Kind::Float));
    (sums / counts.clamp_min(1.0).unsqueeze(1), counts)
}

/// A growable state variable of `root`: `[0, dims…]` until fitted.
pub fn empty_state(root: &Path, name: &str, dims: &[i64], kind: Kind) -> Tensor {
    let shape: Vec<i64> = std::iter::once(0).chain(dims.iter().copied()).collect();
    root.add(name, Tensor::zeros(shape.as_slice(), (kind, root.device())), false)
}

/// Replaces the data of state variable `var` by `value` (any first dimension):
/// `var` stays the variable its store holds, so the artifact sees the new data.
pub fn set_state(var: &mut Tensor, value: &Tensor) {
    let value = value.to_kind(var.kind()).to_device(var.device());
    tch::no_grad(|| var.set_data(&value));
}

/// Freezes the head: a method whose scores replace the head's logits leaves
/// nothing for it to learn, so a strategy of that method alone trains nothing.
pub fn freeze_head(model: &Model) {
    for (name, t) in model.vs.variables() {
        if model.group(&name) == ParamGroup::Head {
            let _ = t.set_requires_grad(false);
        }
    }
}

/// Class means over (transformed) pooled features, as growable state.
#[derive(Debug)]
pub struct ClassMeans {
    /// `[classes, hidden]` once fitted, `[0, hidden]` before.
    pub means: Tensor,
    /// Training rows per class, `[classes]` once fitted.
    pub counts: Tensor,
}

impl ClassMeans {
    /// Empty means of width `hidden` in `root` (`means`, `counts`).
    pub fn new(root: &Path, hidden: i64) -> Self {
        ClassMeans { means: empty_state(root, "means", &[hidden], Kind::Float), counts: empty_state(root, "counts", &[], Kind::Float) }
    }

    /// Whether [`ClassMeans::fit`] (or a restore) filled the means.
    pub fn is_fitted(&self) -> bool {
        self.means.size()[0] > 0
    }

    /// Sets the means of `features` per class of `labels` (checked first, naming `method`).
    pub fn fit(&mut self, method: &str, features: &Tensor, labels: &Tensor, classes: i64) -> Result<()> {
        check_fit(method, features, labels, classes)?;
        let (means, counts) = tch::no_grad(|| class_means(features, labels, classes));
        set_state(&mut self.means, &means);
        set_state(&mut self.counts, &counts);
        Ok(())
    }

    /// Scores of `x` against every class mean; a class no training row had
    /// scores `f32::MIN`, so it is never predicted over one that had.
    ///
    /// # Shapes
    /// `x` `[b, hidden]` → `[b, classes]`.
    pub fn scores(&self, x: &Tensor, metric: Metric) -> Tensor {
        scores(x, &self.means, metric).masked_fill(&self.counts.eq(0.0).unsqueeze(0), f64::from(f32::MIN))
    }
}

/// A tiny MLP backbone and inputs for the methods' unit tests (no download).
#[cfg(test)]
pub(crate) mod testing {
    use tch::{Device, Kind, Tensor};
    use zhijian_backbones::{Mlp, MlpConfig};
    use zhijian_core::{Input, Model, Split};

    /// 1 × 4 × 4 images → 8 → 3 features (ReLU), `classes` classes.
    pub fn model(seed: i64, classes: i64) -> Model {
        tch::manual_seed(seed);
        let config = MlpConfig { image_size: 4, in_chans: 1, hidden: vec![8, 3] };
        Model::new(Device::Cpu, classes, |p| Box::new(Mlp::new(p, &config).unwrap()))
    }

    /// `n` random images, labels `i mod classes`.
    pub fn split(seed: i64, n: i64, classes: i64) -> Split {
        tch::manual_seed(seed);
        let images = Tensor::randn([n, 1, 4, 4], (Kind::Float, Device::Cpu));
        Split { name: "toy".into(), input: Input::Images(images), labels: Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes) }
    }

    /// The pooled-feature tap map a forward pass would hand to `logits`.
    pub fn pooled(x: &Tensor) -> std::collections::BTreeMap<zhijian_core::Tap, Tensor> {
        [(zhijian_core::Tap::Pooled, x.shallow_clone())].into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    fn close(a: &Tensor, want: &[&[f32]]) {
        let b = t(want);
        assert!(a.allclose(&b, 1e-5, 1e-5, false), "got {a} want {b}");
    }

    /// Distances, cosines and class means against values worked by hand.
    #[test]
    fn distances_and_means_match_hand_computed_values() {
        let x = t(&[&[1.0, 1.0], &[3.0, 0.0]]);
        let y = t(&[&[1.0, 0.0], &[0.0, 4.0], &[1.0, 1.0]]);
        // (1,1)−(1,0) = (0,1) → 1; (1,1)−(0,4) = (1,−3) → 10; 0. (3,0): 4; 9+16 = 25; 4+1 = 5.
        close(&sq_distances(&x, &y), &[&[1.0, 10.0, 0.0], &[4.0, 25.0, 5.0]]);
        close(&scores(&x, &y, Metric::Euclidean), &[&[-0.5, -5.0, 0.0], &[-2.0, -12.5, -2.5]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        close(&scores(&x, &y, Metric::Cosine), &[&[h, h, 1.0], &[1.0, 0.0, h]]);
        close(&l2_normalise(&t(&[&[3.0, 4.0], &[0.0, 0.0]])), &[&[0.6, 0.8], &[0.0, 0.0]]);

        let features = t(&[&[0.0, 0.0], &[2.0, 0.0], &[0.0, 4.0]]);
        let labels = Tensor::from_slice(&[0i64, 0, 1]);
        let (means, counts) = class_means(&features, &labels, 3);
        close(&means, &[&[1.0, 0.0], &[0.0, 4.0], &[0.0, 0.0]]);
        assert_eq!(Vec::<f32>::try_from(&counts).unwrap(), [2.0, 1.0, 0.0]);
    }

    /// Fitted means score every class; the one without training rows never wins.
    #[test]
    fn class_means_state_grows_when_fitted_and_masks_absent_classes() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let mut cm = ClassMeans::new(&vs.root(), 2);
        assert!(!cm.is_fitted());
        let features = t(&[&[0.0, 0.0], &[2.0, 0.0], &[0.0, 4.0]]);
        cm.fit("ncm", &features, &Tensor::from_slice(&[0i64, 0, 1]), 3).unwrap();
        assert!(cm.is_fitted());
        // The store sees the fitted data (what the artifact saves).
        assert_eq!(vs.variables()["means"].size(), [3, 2]);
        let s = cm.scores(&t(&[&[1.0, 1.0]]), Metric::Euclidean);
        assert_eq!(Vec::<f32>::try_from(s.view([-1])).unwrap(), [-0.5, -5.0, f32::MIN]);
        let err = cm.fit("ncm", &features, &Tensor::from_slice(&[0i64, 3, 1]), 3).unwrap_err().to_string();
        assert!(err.contains("ncm") && err.contains("0..=3") && err.contains("3 classes"), "{err}");
    }
}
