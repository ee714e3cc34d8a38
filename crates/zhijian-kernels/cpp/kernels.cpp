// LibTorch operators that tch 0.24 does not bind. tch's `C_tensor` is an
// `at::Tensor*`, so the Rust side passes its tensors' pointers straight through.
// Every entry point catches C++ exceptions and returns their message: an
// exception must not unwind into Rust.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <vector>

namespace {
// SplitMix64's output function: element i of the stream seeded at `seed` is
// mix(seed + (i + 1) * golden). A counter-based stream, so any thread can make
// any stretch of it, and the mask does not depend on the thread count.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::vector<at::Tensor> gather(at::Tensor *const *tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}
}  // namespace

// One AdamW step (decoupled weight decay) over `n` parameters in a single pass
// per tensor: ATen's `_fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs.
// `step` is the step number after this update (1 for the first), used for the
// bias corrections. Returns 0, or 1 with the error's message in `error`.
extern "C" int zhijian_fused_adamw(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *exp_avgs,
                                   at::Tensor *const *exp_avg_sqs, size_t n, double step, double lr, double beta1,
                                   double beta2, double weight_decay, double eps, char *error, size_t error_len) {
  try {
    if (n == 0) return 0;
    at::NoGradGuard no_grad;
    auto p = gather(params, n);
    auto steps = std::vector<at::Tensor>(n, at::full({}, step, p[0].options().dtype(at::kFloat)));
    at::_fused_adamw_(p, gather(grads, n), gather(exp_avgs, n), gather(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}

// Fills the contiguous CPU tensor `out` with a dropout mask: each element is
// 1 / (1 − p) with probability 1 − p (a 32-bit uniform below (1 − p)·2³²) and
// 0 otherwise, in `out`'s kind. The stream's seed is drawn from LibTorch's
// default CPU generator, so `manual_seed` makes masks repeat. One pass writing
// the mask; `bernoulli_` followed by the division costs about ten times more.
extern "C" int zhijian_dropout_mask(at::Tensor *out, double p, char *error, size_t error_len) {
  try {
    at::Tensor &mask = *out;
    TORCH_CHECK(mask.device().is_cpu() && mask.is_contiguous() && mask.is_floating_point(),
                "dropout mask: needs a contiguous floating CPU tensor");
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
    uint64_t seed;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      seed = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
    }
    const uint64_t keep = static_cast<uint64_t>((1.0 - p) * 4294967296.0);
    const int64_t n = mask.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mask.scalar_type(), "zhijian_dropout_mask", [&] {
      scalar_t *data = mask.data_ptr<scalar_t>();
      const scalar_t scale = static_cast<scalar_t>(1.0 / (1.0 - p));
      const scalar_t zero = static_cast<scalar_t>(0.0);
      // Each 64-bit draw decides two elements, one per 32-bit half.
      at::parallel_for(0, (n + 1) / 2, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const uint64_t r = splitmix64(seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ULL);
          data[2 * i] = (r & 0xFFFFFFFFULL) < keep ? scale : zero;
          if (2 * i + 1 < n) data[2 * i + 1] = (r >> 32) < keep ? scale : zero;
        }
      });
    });
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}
