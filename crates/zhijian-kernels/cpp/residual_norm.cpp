// `LayerNorm(residual + dropout(x))` as one autograd node, forward and
// backward each one pass over the rows: what a post-LN transformer block (BERT)
// does after each sub-layer. Written with LibTorch's operators it is a mask,
// a multiply, an add (and a cast from bf16), a LayerNorm and, backward, as
// many passes again over activations of [tokens, hidden]; at MiniLM's hidden
// size of 384 those are bandwidth-bound passes that cost more than the
// matmuls around them in a bf16 step.
//
// The dropout mask is the one `zhijian_dropout_mask` draws from the same seed
// (masks.h), kept as one byte per element for the backward pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>

#include "masks.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Sums are kept in this many independent lanes, so the compiler can vectorise
// them without reassociating floating-point additions.
constexpr int64_t kLanes = 16;

// Σ_j f(j) over j < n, in lanes.
template <typename F>
ZHIJIAN_INLINE float lane_sum(int64_t n, F f) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  for (; j < n; ++j) acc[0] += f(j);
  float t = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) t += acc[l];
  return t;
}

template <typename T>
struct Forward {
  const T *x;
  const float *res, *w, *b;
  float *s, *y, *mean, *rstd;
  uint8_t *keep;  // null when nothing drops out
  int64_t h;
  uint64_t seed;
  uint32_t threshold;
  float scale, eps;
};

// Rows [r0, r1) of the forward pass.
template <typename T>
ZHIJIAN_INLINE void forward_rows(const Forward<T> &a, int64_t r0, int64_t r1) {
  const int64_t h = a.h;
  if (a.keep != nullptr) zhijian::keep_flags(a.keep + r0 * h, r0 * h, r1 * h, a.seed, a.threshold);
  for (int64_t r = r0; r < r1; ++r) {
    const T *__restrict x = a.x + r * h;
    const float *__restrict res = a.res + r * h;
    float *__restrict s = a.s + r * h;
    if (a.keep != nullptr) {
      const uint8_t *__restrict keep = a.keep + r * h;
      for (int64_t j = 0; j < h; ++j) s[j] = static_cast<float>(keep[j]) * a.scale * static_cast<float>(x[j]) + res[j];
    } else {
      for (int64_t j = 0; j < h; ++j) s[j] = static_cast<float>(x[j]) + res[j];
    }
    const float mu = lane_sum(h, [&](int64_t j) { return s[j]; }) / static_cast<float>(h);
    const float var = lane_sum(h, [&](int64_t j) { return (s[j] - mu) * (s[j] - mu); }) / static_cast<float>(h);
    const float inv = 1.0f / std::sqrt(var + a.eps);
    a.mean[r] = mu;
    a.rstd[r] = inv;
    const float *__restrict w = a.w, *__restrict b = a.b;
    float *__restrict y = a.y + r * h;
    for (int64_t j = 0; j < h; ++j) y[j] = (s[j] - mu) * inv * w[j] + b[j];
  }
}

template <typename T>
struct Backward {
  const float *dy, *ds_in;  // ds_in: the gradient reaching the returned sum directly, or null
  const float *s, *mean, *rstd, *w;
  const uint8_t *keep;  // null when nothing dropped out
  float *dres;
  T *dx;
  int64_t h;
  float scale;
};

// Rows [r0, r1) of the backward pass; `dw` and `db` accumulate this chunk's
// share of the weight and bias gradients.
template <typename T>
ZHIJIAN_INLINE void backward_rows(const Backward<T> &a, float *__restrict dw, float *__restrict db, int64_t r0,
                                  int64_t r1) {
  const int64_t h = a.h;
  const float *__restrict w = a.w;
  for (int64_t r = r0; r < r1; ++r) {
    const float *__restrict dy = a.dy + r * h;
    const float *__restrict s = a.s + r * h;
    const float mu = a.mean[r], inv = a.rstd[r];
    const float g_mean = lane_sum(h, [&](int64_t j) { return dy[j] * w[j]; }) / static_cast<float>(h);
    const float gx_mean = lane_sum(h, [&](int64_t j) { return dy[j] * w[j] * (s[j] - mu) * inv; }) / static_cast<float>(h);
    float *__restrict dres = a.dres + r * h;
    for (int64_t j = 0; j < h; ++j) {
      const float xhat = (s[j] - mu) * inv;
      dres[j] = inv * (dy[j] * w[j] - g_mean - xhat * gx_mean);
      dw[j] += dy[j] * xhat;
      db[j] += dy[j];
    }
    if (a.ds_in != nullptr) {
      const float *__restrict ds = a.ds_in + r * h;
      for (int64_t j = 0; j < h; ++j) dres[j] += ds[j];
    }
    T *__restrict dx = a.dx + r * h;
    if (a.keep != nullptr) {
      const uint8_t *__restrict keep = a.keep + r * h;
      for (int64_t j = 0; j < h; ++j) dx[j] = static_cast<T>(static_cast<float>(keep[j]) * a.scale * dres[j]);
    } else {
      for (int64_t j = 0; j < h; ++j) dx[j] = static_cast<T>(dres[j]);
    }
  }
}

ZHIJIAN_BUILT_TWICE(forward_rows)
ZHIJIAN_BUILT_TWICE(backward_rows)

// Splits `rows` into one chunk per thread (at most), each with its own row of
// `partials`, so the weight and bias gradients need no atomics.
int64_t chunk_count(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)); }

struct ResidualLayerNorm : public torch::autograd::Function<ResidualLayerNorm> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &residual,
                               const at::Tensor &weight, const at::Tensor &bias, double p, double eps) {
    const int64_t h = x.size(-1), rows = x.numel() / std::max<int64_t>(h, 1);
    auto f32 = x.options().dtype(at::kFloat);
    at::Tensor s = at::empty(x.sizes(), f32), y = at::empty(x.sizes(), f32);
    at::Tensor mean = at::empty({rows}, f32), rstd = at::empty({rows}, f32);
    at::Tensor keep = p > 0.0 ? at::empty(x.sizes(), x.options().dtype(at::kByte)) : at::Tensor();
    const uint64_t seed = p > 0.0 ? zhijian::dropout_seed() : 0;
    const float scale = p > 0.0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "zhijian_residual_layer_norm", [&] {
      const Forward<scalar_t> args{x.const_data_ptr<scalar_t>(), residual.const_data_ptr<float>(),
                                   weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), s.data_ptr<float>(),
                                   y.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                   keep.defined() ? keep.data_ptr<uint8_t>() : nullptr, h, seed,
                                   zhijian::keep_max(p), scale, static_cast<float>(eps)};
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        forward_rows_fast(args, r0, r1);
      });
    });
    ctx->save_for_backward({s, mean, rstd, weight});
    ctx->saved_data["keep"] = keep;
    ctx->saved_data["scale"] = static_cast<double>(scale);
    ctx->saved_data["x_kind"] = static_cast<int64_t>(x.scalar_type());
    return {y, s};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3];
    const at::Tensor keep = ctx->saved_data["keep"].toTensor();
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const auto x_kind = static_cast<at::ScalarType>(ctx->saved_data["x_kind"].toInt());
    const int64_t h = s.size(-1), rows = s.numel() / std::max<int64_t>(h, 1);
    const at::Tensor dy = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s);
    const at::Tensor ds_in = grads[1].defined() ? grads[1].contiguous() : at::Tensor();
    at::Tensor dres = at::empty_like(s), dx = at::empty(s.sizes(), s.options().dtype(x_kind));
    const int64_t chunks = chunk_count(rows);
    at::Tensor partials = at::zeros({chunks, 2, h}, s.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_kind, "zhijian_residual_layer_norm_backward", [&] {
      const Backward<scalar_t> args{dy.const_data_ptr<float>(), ds_in.defined() ? ds_in.const_data_ptr<float>() : nullptr,
                                    s.const_data_ptr<float>(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                                    weight.const_data_ptr<float>(), keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr,
                                    dres.data_ptr<float>(), dx.data_ptr<scalar_t>(), h, scale};
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          float *dw = partials.data_ptr<float>() + c * 2 * h;
          const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
          backward_rows_fast(args, dw, dw + h, r0, r1);
        }
      });
    });
    at::Tensor sums = partials.sum(0);
    return {dx, dres, sums[0], sums[1], at::Tensor(), at::Tensor()};
  }
};
}  // namespace

// `LayerNorm(residual + dropout(x, p))` over the last dimension, as one
// autograd node. `x`: contiguous fp32 or bf16 CPU tensor [..., h];
// `residual`: contiguous fp32 of the same shape; `weight`, `bias`: contiguous
// fp32 [h]. Writes two new tensors: `*out`, the normalised fp32 result, and
// `*sum`, the fp32 sum it normalised (what a hook on the norm's input sees;
// gradients reaching it flow back too). p = 0 drops nothing. Returns 0, or 1
// with the error's message in `error`.
extern "C" int zhijian_residual_layer_norm(at::Tensor *x, at::Tensor *residual, at::Tensor *weight, at::Tensor *bias,
                                           double p, double eps, at::Tensor **out, at::Tensor **sum, char *error,
                                           size_t error_len) {
  try {
    const int64_t h = x->dim() > 0 ? x->size(-1) : 0;
    TORCH_CHECK(x->device().is_cpu() && x->is_contiguous() && (x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16),
                "residual LayerNorm: x must be a contiguous fp32 or bf16 CPU tensor, got ", x->scalar_type(), " on ",
                x->device());
    TORCH_CHECK(h > 0, "residual LayerNorm: x must have a non-empty last dimension, got ", x->sizes());
    TORCH_CHECK(residual->sizes() == x->sizes() && residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->device().is_cpu(),
                "residual LayerNorm: the residual must be a contiguous fp32 CPU tensor shaped like x ", x->sizes(), ", got ",
                residual->scalar_type(), " ", residual->sizes());
    for (const at::Tensor *t : {weight, bias})
      TORCH_CHECK(t->dim() == 1 && t->size(0) == h && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->device().is_cpu(),
                  "residual LayerNorm: weight and bias must be contiguous fp32 CPU vectors of ", h, ", got ",
                  t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
    auto outs = ResidualLayerNorm::apply(*x, *residual, *weight, *bias, p, eps);
    *out = new at::Tensor(outs[0]);
    *sum = new at::Tensor(outs[1]);
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}
