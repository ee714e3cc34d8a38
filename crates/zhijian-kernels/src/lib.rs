//! LibTorch kernels that tch does not bind, called through a small C++ shim
//! (`cpp/*.cpp`, compiled against LibTorch's headers by `build.rs`; its hot
//! loops are built for AVX2 + FMA and for baseline x86-64 and picked at run time).
//!
//! - [`fused_adamw`]: ATen's fused AdamW, which updates a parameter and its two
//!   moments in one pass. Written as separate tensor operations, the same
//!   update reads and writes each parameter-sized tensor about ten times; on a
//!   MiniLM full fine-tuning step that is an eighth of the step's time.
//! - [`dropout_mask`]: a dropout mask from a counter-based random stream in one
//!   vectorised pass. LibTorch's CPU dropout draws its mask with `bernoulli_`, a fifth of a
//!   MiniLM full fine-tuning step.
//! - [`residual_layer_norm`]: `LayerNorm(residual + dropout(x))`, what a
//!   post-LN transformer block does after each sub-layer, as one autograd node
//!   whose forward and backward are one pass each, in place of about ten
//!   LibTorch kernels over the block's activations.

use std::ffi::{CStr, c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn zhijian_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn zhijian_dropout_mask(out: *mut C_tensor, p: f64, error: *mut c_char, error_len: usize) -> c_int;
    fn zhijian_residual_layer_norm(
        x: *mut C_tensor,
        residual: *mut C_tensor,
        weight: *mut C_tensor,
        bias: *mut C_tensor,
        p: f64,
        eps: f64,
        out: *mut *mut C_tensor,
        sum: *mut *mut C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// AdamW's hyper-parameters for one fused step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    /// The step number after this update (1 for the first): the bias corrections use it.
    pub step: i32,
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decoupled weight decay: each parameter is first scaled by `1 − lr · weight_decay`.
    pub weight_decay: f64,
    /// Denominator epsilon.
    pub eps: f64,
}

/// Updates `params[i]`, `exp_avgs[i]` and `exp_avg_sqs[i]` in place from
/// `grads[i]` with one AdamW step, exactly as `torch.optim.AdamW(fused=True)`
/// does: θ ← θ(1 − lr·λ) − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε).
///
/// All tensors must be dense and contiguous, of one floating kind and on one
/// device, and each quadruple of one shape ([`fusable`]); the error says which
/// is not, and nothing is updated then.
pub fn fused_adamw(params: &[&Tensor], grads: &[&Tensor], exp_avgs: &[&Tensor], exp_avg_sqs: &[&Tensor], h: AdamwStep) -> Result<(), String> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len()] != [n; 3] {
        return Err(format!(
            "fused AdamW needs as many gradients and moments as parameters: {n} parameters, {} gradients, {} first and {} second moments",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        ));
    }
    // ATen's CPU kernel walks each tensor's storage by the parameter's element
    // count and checks neither shapes nor layout: those checks are made here.
    for (i, ((p, g), (m, v))) in params.iter().zip(grads).zip(exp_avgs.iter().zip(exp_avg_sqs)).enumerate() {
        if !fusable(p, g) {
            return Err(format!(
                "fused AdamW: parameter {i} ({:?}, {:?}, {:?}) and its gradient ({:?}, {:?}, {:?}) must be contiguous floating tensors of one shape, kind and device",
                p.size(),
                p.kind(),
                p.device(),
                g.size(),
                g.kind(),
                g.device()
            ));
        }
        for (what, t) in [("first", m), ("second", v)] {
            if !same_layout(p, t) {
                return Err(format!(
                    "fused AdamW: parameter {i}'s {what} moment ({:?}, {:?}) does not match it ({:?}, {:?})",
                    t.size(),
                    t.kind(),
                    p.size(),
                    p.kind()
                ));
            }
        }
        if p.device() != params[0].device() || p.kind() != params[0].kind() {
            return Err(format!(
                "fused AdamW: parameter {i} is {:?} on {:?}, parameter 0 {:?} on {:?}",
                p.kind(),
                p.device(),
                params[0].kind(),
                params[0].device()
            ));
        }
    }
    // The shim only reads these pointers' targets (and writes through the
    // tensors they share storage with); `C_tensor` is an `at::Tensor`.
    let ptrs = |ts: &[&Tensor]| ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let mut error = [0 as c_char; 1024];
    // SAFETY: each array holds `n` pointers to live tensors (borrowed for this
    // call), and `error` is a writable buffer of the length given.
    let rc = unsafe {
        zhijian_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            f64::from(h.step),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    shim_result(rc, &error)
}

/// A dropout mask shaped and typed like `like` (a CPU tensor): each element
/// is `1 / (1 − p)` with probability `1 − p`, else 0, so `x * mask` is inverted
/// dropout. The random stream (two rounds of MurmurHash3's 32-bit finaliser
/// over the element index, eight elements an instruction with AVX2) is seeded from
/// LibTorch's default CPU generator: `tch::manual_seed` repeats the masks, but
/// they are not the ones `Tensor::dropout` would draw.
pub fn dropout_mask(like: &Tensor, p: f64) -> Result<Tensor, String> {
    let mut mask = Tensor::empty(like.size(), (like.kind(), tch::Device::Cpu));
    let mut error = [0 as c_char; 1024];
    // SAFETY: `mask` is a live tensor owned here; `error` is a writable buffer of the length given.
    let rc = unsafe { zhijian_dropout_mask(mask.as_mut_ptr(), p, error.as_mut_ptr(), error.len()) };
    shim_result(rc, &error).map(|()| mask)
}

/// `LayerNorm(residual + dropout(x, p))` over the last dimension with
/// `weight` and `bias`, as one autograd node: returns the normalised result
/// and the sum it normalised (both fp32), and gradients reach `x`, `residual`,
/// `weight` and `bias` through either. The mask is the one [`dropout_mask`]
/// would draw after the same seed; p = 0 drops nothing (evaluation).
///
/// `x`: a contiguous fp32 or bf16 CPU tensor `[..., h]`; `residual`: a
/// contiguous fp32 CPU tensor of the same shape; `weight`, `bias`: contiguous
/// fp32 `[h]`. Anything else is an error naming what does not fit.
pub fn residual_layer_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, bias: &Tensor, p: f64, eps: f64) -> Result<(Tensor, Tensor), String> {
    let (mut out, mut sum) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut error = [0 as c_char; 1024];
    // SAFETY: the four inputs are live tensors borrowed for this call (the
    // shim only reads them and takes its own references for the autograd
    // graph); `out` and `sum` receive tensors the shim allocated with `new`,
    // which `Tensor::from_ptr` takes ownership of (tch frees them with
    // `delete`); `error` is a writable buffer of the length given.
    let rc = unsafe {
        zhijian_residual_layer_norm(
            x.as_ptr() as *mut C_tensor,
            residual.as_ptr() as *mut C_tensor,
            weight.as_ptr() as *mut C_tensor,
            bias.as_ptr() as *mut C_tensor,
            p,
            eps,
            &mut out,
            &mut sum,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    shim_result(rc, &error)?;
    // SAFETY: status 0 means the shim stored two fresh tensors in `out` and `sum`.
    Ok(unsafe { (Tensor::from_ptr(out), Tensor::from_ptr(sum)) })
}

/// A shim call's outcome: `Ok` for status 0, else the message it wrote.
fn shim_result(rc: c_int, error: &[c_char; 1024]) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // The shim's snprintf always NUL-terminates within the buffer (cutting a longer message).
    let bytes = error.map(|c| c as u8);
    Err(CStr::from_bytes_until_nul(&bytes).map_or_else(|_| "the C++ shim's error message has no end".into(), |m| m.to_string_lossy().into_owned()))
}

/// Whether [`fused_adamw`] can update `param` from `grad`: both dense,
/// contiguous, floating, of one shape, kind and device. Anything else (a
/// sparse gradient, a transposed view) takes the unfused path.
pub fn fusable(param: &Tensor, grad: &Tensor) -> bool {
    param.is_floating_point() && same_layout(param, grad)
}

fn same_layout(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.device() == b.device() && !a.is_sparse() && !b.is_sparse() && a.is_contiguous() && b.is_contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};
    use tch::{Device, Kind};

    /// Held by every test here that draws from LibTorch's global generator:
    /// tests run on parallel threads, and a draw between a test's
    /// `manual_seed` and its own would change its mask.
    fn generator() -> MutexGuard<'static, ()> {
        static GENERATOR: Mutex<()> = Mutex::new(());
        GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Two steps on a known gradient against the update rule by hand, in f64.
    #[test]
    fn fused_adamw_matches_the_update_rule() {
        let opts = (Kind::Double, Device::Cpu);
        let p = Tensor::from_slice(&[1.0f64, -2.0, 0.5]);
        let (m, v) = (Tensor::zeros([3], opts), Tensor::zeros([3], opts));
        let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.1);
        let mut want = [1.0f64, -2.0, 0.5];
        let (mut wm, mut wv) = ([0.0f64; 3], [0.0f64; 3]);
        for t in 1..=2 {
            // g = 3θ (a fixed function of the current parameters).
            let g = &p * 3.0;
            fused_adamw(&[&p], &[&g], &[&m], &[&v], AdamwStep { step: t, lr, beta1: b1, beta2: b2, weight_decay: wd, eps }).unwrap();
            for i in 0..3 {
                let g = 3.0 * want[i];
                want[i] *= 1.0 - lr * wd;
                wm[i] = b1 * wm[i] + (1.0 - b1) * g;
                wv[i] = b2 * wv[i] + (1.0 - b2) * g * g;
                want[i] -= lr / (1.0 - b1.powi(t)) * wm[i] / (wv[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps);
            }
        }
        let got: Vec<f64> = Vec::try_from(&p).unwrap();
        for i in 0..3 {
            assert!((got[i] - want[i]).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        let got_m: Vec<f64> = Vec::try_from(&m).unwrap();
        assert!((got_m[0] - wm[0]).abs() < 1e-12, "first moment {got_m:?} vs {wm:?}");
    }

    /// The mask keeps each element with probability 1 − p at 1 / (1 − p) (so
    /// its mean is 1), repeats under one seed, differs from call to call, and
    /// has no visible structure between neighbours.
    #[test]
    fn dropout_mask_is_inverted_bernoulli() {
        let _generator = generator();
        let like = Tensor::zeros([1000, 1001], (Kind::Float, Device::Cpu));
        tch::manual_seed(7);
        let a = dropout_mask(&like, 0.1).unwrap();
        let b = dropout_mask(&like, 0.1).unwrap();
        tch::manual_seed(7);
        assert!(a.equal(&dropout_mask(&like, 0.1).unwrap()), "manual_seed repeats the mask");
        assert!(!a.equal(&b), "the next mask is a new draw");
        let dropped = a.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        // 1,001,000 Bernoulli(0.1) draws: sd 0.0003.
        assert!((dropped - 0.1).abs() < 0.0015, "dropped fraction {dropped}");
        let kept = a.masked_select(&a.ne(0.0));
        assert_eq!((kept.min().double_value(&[]), kept.max().double_value(&[])), (f64::from(1.0 / 0.9f32), f64::from(1.0 / 0.9f32)));
        // Neighbours (the two halves of one draw, and consecutive draws) are uncorrelated.
        let flat = a.flatten(0, -1).eq(0.0).to_kind(Kind::Double);
        for lag in [1, 2, 3] {
            let x = flat.narrow(0, 0, flat.size()[0] - lag);
            let y = flat.narrow(0, lag, flat.size()[0] - lag);
            let both = (&x * &y).mean(Kind::Double).double_value(&[]);
            assert!((both - dropped * dropped).abs() < 0.0015, "lag {lag}: P(both dropped) {both}");
        }
        let half = dropout_mask(&like.to_kind(Kind::BFloat16), 0.5).unwrap();
        assert_eq!(half.kind(), Kind::BFloat16);
        let dropped = half.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!((dropped - 0.5).abs() < 0.002, "p = 0.5 in bf16: dropped {dropped}");
        assert!(dropout_mask(&like, 1.0).unwrap_err().contains("[0, 1)"));
    }

    /// Tensors the kernel would walk out of bounds of, or misread, are refused
    /// before anything is updated.
    #[test]
    fn mismatched_tensors_are_an_error() {
        let p = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let h = AdamwStep { step: 1, lr: 0.1, beta1: 0.9, beta2: 0.999, weight_decay: 0.0, eps: 1e-8 };
        let (m, v) = (p.zeros_like(), p.zeros_like());
        let short = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let err = fused_adamw(&[&p], &[&short], &[&m], &[&v], h).unwrap_err();
        assert!(err.contains("parameter 0 ([2, 3]"), "{err}");
        let transposed = Tensor::ones([3, 2], (Kind::Float, Device::Cpu)).tr();
        assert!(fused_adamw(&[&p], &[&transposed], &[&m], &[&v], h).is_err());
        let double = p.to_kind(Kind::Double);
        assert!(fused_adamw(&[&p], &[&double], &[&m], &[&v], h).is_err());
        let err = fused_adamw(&[&p], &[&p.ones_like()], &[&short], &[&v], h).unwrap_err();
        assert!(err.contains("first moment"), "{err}");
        assert_eq!(Vec::<f32>::try_from(p.flatten(0, -1)).unwrap(), [1.0; 6], "nothing was updated");
        let err = fused_adamw(&[&p], &[], &[], &[], h).unwrap_err();
        assert!(err.contains("1 parameters, 0 gradients"), "{err}");
    }

    /// The fused node against the same computation in LibTorch's operators
    /// (the mask from [`dropout_mask`] after the same seed): the result, the
    /// sum and all four gradients, with gradients arriving through both
    /// outputs, for fp32 and bf16 inputs and without dropout.
    #[test]
    fn residual_layer_norm_matches_the_unfused_ops() {
        let _generator = generator();
        let (rows, h, eps) = (37, 48, 1e-12);
        let f32 = (Kind::Float, Device::Cpu);
        for (kind, p) in [(Kind::Float, 0.1), (Kind::Float, 0.0), (Kind::BFloat16, 0.3)] {
            let x = Tensor::randn([rows, h], f32).to_kind(kind).set_requires_grad(true);
            let residual = Tensor::randn([rows, h], f32).set_requires_grad(true);
            let w = (Tensor::randn([h], f32) * 0.1 + 1.0).set_requires_grad(true);
            let b = (Tensor::randn([h], f32) * 0.1).set_requires_grad(true);
            let (dy, ds) = (Tensor::randn([rows, h], f32), Tensor::randn([rows, h], f32));
            let fused = |x: &Tensor| residual_layer_norm(x, &residual, &w, &b, p, eps).unwrap();
            let unfused = |x: &Tensor| {
                let kept = if p > 0.0 { x.to_kind(Kind::Float) * dropout_mask(&x.to_kind(Kind::Float), p).unwrap() } else { x.to_kind(Kind::Float) };
                let sum = kept + &residual;
                (sum.layer_norm([h], Some(&w), Some(&b), eps, false), sum)
            };
            tch::manual_seed(3);
            let (y, s) = fused(&x);
            tch::manual_seed(3);
            let (want_y, want_s) = unfused(&x);
            assert!(s.allclose(&want_s, 1e-5, 1e-5, false), "{kind:?} p {p}: the same mask after the same seed");
            assert_eq!((y.kind(), s.kind()), (Kind::Float, Kind::Float));
            assert!(y.allclose(&want_y, 1e-4, 1e-4, false), "{kind:?} p {p}: {}", (&y - &want_y).abs().max());
            if p > 0.0 {
                let dropped = s.eq_tensor(&residual).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
                assert!((dropped - p).abs() < 0.06, "dropped {dropped}");
            }
            let grads = |y: &Tensor, s: &Tensor| {
                ((y * &dy).sum(Kind::Float) + (s * &ds).sum(Kind::Float)).backward();
                let g = [&x, &residual, &w, &b].map(|t| t.grad().to_kind(Kind::Float).copy());
                for t in [&x, &residual, &w, &b] {
                    let _ = t.grad().zero_();
                }
                g
            };
            let (got, want) = (grads(&y, &s), grads(&want_y, &want_s));
            for (name, (g, w)) in ["x", "residual", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
                let tol = if kind == Kind::BFloat16 && *name == "x" { 2e-2 } else { 1e-4 };
                assert!(g.allclose(w, tol, tol, false), "{kind:?} p {p}: the gradient of {name} is off by {}", (g - w).abs().max());
            }
            assert_eq!(x.grad().kind(), kind, "x's gradient comes back in x's kind");
        }
    }

    /// Inputs the kernel cannot read are refused with what does not fit.
    #[test]
    fn residual_layer_norm_refuses_what_it_cannot_read() {
        let _generator = generator();
        let f32 = (Kind::Float, Device::Cpu);
        let (x, w, b) = (Tensor::randn([4, 6], f32), Tensor::ones([6], f32), Tensor::zeros([6], f32));
        let err = residual_layer_norm(&x, &Tensor::randn([4, 5], f32), &w, &b, 0.1, 1e-5).unwrap_err();
        assert!(err.contains("residual must be") && err.contains("[4, 5]"), "{err}");
        assert!(residual_layer_norm(&x.tr(), &x, &w, &b, 0.1, 1e-5).unwrap_err().contains("contiguous"));
        assert!(residual_layer_norm(&x, &x, &Tensor::ones([5], f32), &b, 0.1, 1e-5).unwrap_err().contains("weight and bias"));
        assert!(residual_layer_norm(&x.to_kind(Kind::Double), &x, &w, &b, 0.1, 1e-5).unwrap_err().contains("fp32 or bf16"));
        assert!(residual_layer_norm(&x, &x, &w, &b, 1.0, 1e-5).unwrap_err().contains("[0, 1)"));
    }
}
