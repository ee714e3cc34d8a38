//! Mixed precision in zhijian's own layers: what `torch.autocast` does, written
//! where our layers are (tch exposes no CPU autocast).
//!
//! Under [`Compute::Bf16`] the matmuls, convolutions and attention of
//! [`crate::layers`] run in bfloat16 on bf16 copies of their inputs and
//! weights; master weights, gradients and optimiser state stay fp32, and norms,
//! the pooled features, the logits and the loss are fp32. Frozen weights are
//! cast once per training run or evaluation ([`WeightCache`]), not once per
//! step as autocast's per-forward cache does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The precision a config asks for (`train.precision`, `train.eval_precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 where a short matmul probe on this device runs bf16 at least
    /// [`AUTO_MIN_SPEEDUP`] times as fast as fp32, otherwise fp32.
    Auto,
    /// Everything in fp32.
    #[default]
    Fp32,
    /// bf16 compute, fp32 master weights (whatever the hardware).
    Bf16,
}

/// What a forward pass computes its matmuls in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    /// fp32.
    #[default]
    Fp32,
    /// bf16 matmuls, convolutions and attention; fp32 elsewhere.
    Bf16,
}

impl Compute {
    /// The tensor kind of the matmuls.
    pub fn kind(self) -> Kind {
        match self {
            Compute::Fp32 => Kind::Float,
            Compute::Bf16 => Kind::BFloat16,
        }
    }
}

/// `auto` takes bf16 only when the probe measures at least this speed-up: a
/// smaller one is eaten by the casts around the matmuls.
pub const AUTO_MIN_SPEEDUP: f64 = 1.3;

/// The matmul probe behind `auto`: achievable FLOP/s of a square matmul in
/// fp32 and bf16 on one device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// fp32 matmul FLOP/s.
    pub fp32_flops: f64,
    /// bf16 matmul FLOP/s.
    pub bf16_flops: f64,
}

impl Probe {
    /// Measures both (n = 512, best of 5 after a warm-up; ~50 ms on a CPU
    /// with fast bf16, ~1 s without: the slow path is what it detects).
    pub fn measure(device: Device) -> Probe {
        let n = 512;
        let rate = |kind: Kind| {
            let a = Tensor::randn([n, n], (Kind::Float, device)).to_kind(kind);
            let b = Tensor::randn([n, n], (Kind::Float, device)).to_kind(kind);
            let mut best = f64::INFINITY;
            for _ in 0..6 {
                let t = Instant::now();
                let c = a.matmul(&b);
                // Reading one value waits for the device to finish.
                let _ = c.double_value(&[0, 0]);
                best = best.min(t.elapsed().as_secs_f64());
            }
            2.0 * (n * n * n) as f64 / best
        };
        tch::no_grad(|| Probe { fp32_flops: rate(Kind::Float), bf16_flops: rate(Kind::BFloat16) })
    }

    /// The probe of `device`, measured once per process.
    pub fn cached(device: Device) -> Probe {
        static PROBES: Mutex<Vec<(Device, Probe)>> = Mutex::new(Vec::new());
        let mut probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = probes.iter().find(|(d, _)| *d == device) {
            return *p;
        }
        let p = Probe::measure(device);
        probes.push((device, p));
        p
    }

    /// bf16 ÷ fp32 FLOP/s.
    pub fn speedup(&self) -> f64 {
        self.bf16_flops / self.fp32_flops
    }
}

impl Precision {
    /// Whether this is fp32, the default (configs that leave it out keep
    /// their run keys).
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }

    /// The compute precision on `device`; `auto` runs (once per process) the
    /// probe, which is returned so records can say why.
    pub fn resolve(self, device: Device) -> (Compute, Option<Probe>) {
        match self {
            Precision::Fp32 => (Compute::Fp32, None),
            Precision::Bf16 => (Compute::Bf16, None),
            Precision::Auto => {
                let probe = Probe::cached(device);
                (if probe.speedup() >= AUTO_MIN_SPEEDUP { Compute::Bf16 } else { Compute::Fp32 }, Some(probe))
            }
        }
    }
}

/// bf16 copies of frozen weights, kept for one training run or evaluation.
///
/// Keyed by storage address and shape. Whoever owns the cache must drop it
/// before writing a frozen weight in place (loading, merging): the engine
/// makes one per [`crate::train::train`] and per evaluation, and nothing
/// writes frozen weights inside those.
#[derive(Default)]
pub struct WeightCache(RefCell<HashMap<(usize, Vec<i64>), Tensor>>);

impl WeightCache {
    /// An empty cache.
    pub fn new() -> WeightCache {
        WeightCache::default()
    }

    /// `w` in `kind`: a cached copy when `w` is frozen, a differentiable
    /// cast when it trains (its gradient then reaches the fp32 master).
    pub fn get(&self, w: &Tensor, kind: Kind) -> Tensor {
        if w.kind() == kind {
            return w.shallow_clone();
        }
        if w.requires_grad() {
            return w.to_kind(kind);
        }
        let key = (w.data_ptr() as usize, w.size());
        self.0.borrow_mut().entry(key).or_insert_with(|| w.detach().to_kind(kind)).shallow_clone()
    }

    /// How many weights are cached.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `t` in the kind of `like` when both are floating point and differ: how a
/// method's own matmuls follow the precision of the activations they see.
pub fn cast_like(t: &Tensor, like: &Tensor) -> Tensor {
    if t.kind() == like.kind() || !t.is_floating_point() || !like.is_floating_point() { t.shallow_clone() } else { t.to_kind(like.kind()) }
}

/// `t` in fp32 if it is a lower-precision float (norms, pooled features,
/// logits): the places autocast keeps in fp32.
pub fn to_fp32(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::BFloat16 | Kind::Half => t.to_kind(Kind::Float),
        _ => t.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_precisions_need_no_probe() {
        assert_eq!(Precision::Fp32.resolve(Device::Cpu), (Compute::Fp32, None));
        assert_eq!(Precision::Bf16.resolve(Device::Cpu), (Compute::Bf16, None));
    }

    /// `auto` follows its probe's speed-up against the threshold.
    #[test]
    fn auto_follows_the_probe() {
        let (compute, probe) = Precision::Auto.resolve(Device::Cpu);
        let probe = probe.expect("auto reports its probe");
        assert!(probe.fp32_flops > 0.0 && probe.bf16_flops > 0.0);
        assert_eq!(compute == Compute::Bf16, probe.speedup() >= AUTO_MIN_SPEEDUP);
        assert_eq!(Probe::cached(Device::Cpu), probe, "measured once per process");
    }

    #[test]
    fn config_names_are_snake_case() {
        #[derive(Deserialize)]
        struct C {
            p: Precision,
        }
        let parse = |s: &str| toml::from_str::<C>(&format!("p = \"{s}\"")).map(|c| c.p);
        assert_eq!(parse("auto").unwrap(), Precision::Auto);
        assert_eq!(parse("bf16").unwrap(), Precision::Bf16);
        assert_eq!(parse("fp32").unwrap(), Precision::Fp32);
        assert!(parse("fp16").unwrap_err().to_string().contains("auto"), "the error lists the choices");
    }

    /// Frozen weights are cast once and shared; trainable ones are cast anew
    /// each time, differentiably, so their gradient reaches the fp32 master.
    #[test]
    fn cache_holds_frozen_weights_only() {
        let cache = WeightCache::new();
        let frozen = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let a = cache.get(&frozen, Kind::BFloat16);
        let b = cache.get(&frozen, Kind::BFloat16);
        assert_eq!(a.kind(), Kind::BFloat16);
        assert_eq!(a.data_ptr(), b.data_ptr());
        assert_eq!(cache.len(), 1);
        assert!(a.to_kind(Kind::Float).allclose(&frozen, 1e-2, 1e-2, false));

        let trained = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let c = cache.get(&trained, Kind::BFloat16);
        assert_eq!(cache.len(), 1, "trainable weights are not cached");
        c.to_kind(Kind::Float).sum(Kind::Float).backward();
        let grad = trained.grad();
        assert_eq!(grad.kind(), Kind::Float);
        assert!(grad.equal(&Tensor::ones([3, 4], (Kind::Float, Device::Cpu))));
        assert_eq!(cache.get(&frozen, Kind::Float).data_ptr(), frozen.data_ptr(), "no copy in the weight's own kind");
    }

    #[test]
    fn casts_touch_only_floats_that_differ() {
        let x = Tensor::ones([2], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let ids = Tensor::ones([2], (Kind::Int64, Device::Cpu));
        assert_eq!(cast_like(&w, &x).kind(), Kind::BFloat16);
        assert_eq!(cast_like(&ids, &x).kind(), Kind::Int64);
        assert_eq!(cast_like(&w, &ids).kind(), Kind::Float);
        assert_eq!(to_fp32(&x).kind(), Kind::Float);
        assert_eq!(to_fp32(&ids).kind(), Kind::Int64);
    }
}
