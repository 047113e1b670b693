// Helpers and entry points shared by the C++ autograd nodes of mm_spectral.kernels.native
// (low_rank_linear.cpp, spectral.cpp; bound to Python in module.cpp).
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <vector>

namespace mm_spectral_native {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// at::stack(ts), as a view where they lie back to back in one storage (the plan packs
// DoRA's frozen weights so: mm_spectral/adapters/packed_weights.py), with no copy.
inline Tensor stacked(at::TensorList ts) {
  const Tensor& first = ts[0];
  const int64_t size = first.numel();
  bool adjacent = first.is_contiguous();
  for (size_t i = 1; adjacent && i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    adjacent = t.sizes() == first.sizes() && t.scalar_type() == first.scalar_type() &&
               t.device() == first.device() && t.is_contiguous() &&
               t.storage().is_alias_of(first.storage()) &&
               t.storage_offset() == first.storage_offset() + static_cast<int64_t>(i) * size;
  }
  if (!adjacent) return at::stack(ts);
  std::vector<int64_t> sizes{static_cast<int64_t>(ts.size())};
  std::vector<int64_t> strides{size};
  sizes.insert(sizes.end(), first.sizes().begin(), first.sizes().end());
  strides.insert(strides.end(), first.strides().begin(), first.strides().end());
  return first.as_strided(sizes, strides);
}

// a + alpha · b, computed in the wider of their dtypes and stored as `dtype` (with a's
// memory format): one kernel where a sum and a cast would be two (the cast happens on store).
inline Tensor add_as(const Tensor& a, const Tensor& b, double alpha, at::ScalarType dtype) {
  Tensor out = at::empty_like(a, a.options().dtype(dtype));
  return at::add_out(out, a, b, alpha);
}

// a ⊙ b (broadcast), computed in the wider of their dtypes and stored as `dtype`, in a's
// shape and memory format: the product and its cast in one kernel.
inline Tensor mul_as(const Tensor& a, const Tensor& b, at::ScalarType dtype) {
  Tensor out = at::empty_like(a, a.options().dtype(dtype));
  return at::mul_out(out, a, b);
}

inline bool is_half(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

// The compute dtype: autocast's for x's device where it is on, else x's own. Asked before
// autocast's keys are excluded (which turns it off for this thread).
inline at::ScalarType compute_dtype(const Tensor& x) {
  const auto device_type = x.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    return at::autocast::get_autocast_dtype(device_type);
  }
  return x.scalar_type();
}

// Rows back to the input's leading shape.
inline Tensor shaped(const Tensor& y, const Tensor& x) {
  if (x.dim() == 2) {
    return y;
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

// Ends a node's forward: saves `saved` for the backward, records whether a bias came (see
// edge_after_bias) and gives the output rows y the input's leading shape.
inline Tensor finish_forward(AutogradContext* ctx, const std::vector<Tensor>& saved,
                             bool has_bias, const Tensor& y, const Tensor& x) {
  ctx->save_for_backward(saved);
  ctx->saved_data["has_bias"] = has_bias;
  return shaped(y, x);
}

// An input gradient's rows back in the input's shape, which the forward put in "x_shape".
inline Tensor input_shaped(AutogradContext* ctx, const Tensor& grad_rows) {
  const auto x_shape = ctx->saved_data["x_shape"].toIntVector();
  return x_shape.size() == 2 ? grad_rows : grad_rows.view(x_shape);
}

// The input's tokens as rows (tokens × in_features) in the compute dtype `dtype`.
inline Tensor input_rows(const Tensor& x, int64_t in_features, at::ScalarType dtype) {
  return as_dtype(x.dim() == 2 ? x : x.reshape({-1, in_features}), dtype);
}

// The output gradient as rows of `width` features in `dtype` (the forward's compute dtype).
inline Tensor gradient_rows(const Tensor& grad, int64_t width, at::ScalarType dtype) {
  return as_dtype(grad.reshape({-1, width}), dtype);
}

// The first gradient edge after x, W and the optional bias: only tensor inputs have edges,
// so a missing bias shifts the ones after it. Reads what forward put in "has_bias".
inline size_t edge_after_bias(AutogradContext* ctx) {
  return ctx->saved_data["has_bias"].toBool() ? 3 : 2;
}

// The bias gradient Σ_tokens g where the bias is there and needs one, else undefined.
inline Tensor bias_grad(AutogradContext* ctx, const Tensor& g) {
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
    return g.sum(0);
  }
  return Tensor();
}

// scale · a b for a parameter of `dtype`: on CUDA, half inputs and a float32 parameter,
// cuBLAS writes float32 itself (one op instead of a GEMM and a cast). In low_rank_linear.cpp.
Tensor factor_grad(const Tensor& a, const Tensor& b, double scale, at::ScalarType dtype);

// Entry points (see module.cpp for what each computes).
Tensor low_rank_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& down, const Tensor& up, double scale, int64_t form);
Tensor rescaled_low_rank_linear(const Tensor& x, const Tensor& weight,
                                const std::optional<Tensor>& bias, const Tensor& down,
                                const Tensor& up, double scale, const Tensor& magnitude,
                                const Tensor& inv_norm, int64_t form);
Tensor rescaled_weight_linear(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& down,
                              const Tensor& up, double scale, const Tensor& magnitude);
Tensor tucker_low_rank_linear(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& core,
                              const Tensor& u_out, const Tensor& u_in, double scale,
                              int64_t form);
Tensor low_rank_inverse_norms(const Tensor& weight, const Tensor& down, const Tensor& up,
                              double scale, const std::optional<Tensor>& base_squares);
Tensor sparse_spectrum_to_real(const Tensor& coefficients, const Tensor& positions,
                               int64_t rows, int64_t cols, double scale);
Tensor tucker_conv_factor(const Tensor& core, const Tensor& u_in, const Tensor& u_h,
                          const Tensor& u_w, const std::optional<Tensor>& u_out, double scale);
Tensor delta_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& delta, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, int64_t groups);
Tensor rescaled_delta_conv2d(const Tensor& x, const Tensor& weight,
                             const std::optional<Tensor>& bias, const Tensor& delta,
                             const Tensor& magnitude, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             int64_t groups);
Tensor delta_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& delta);
Tensor weight_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias);
Tensor batched_product(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys,
                       double scale, bool transpose);
Tensor batched_tucker_linear(const std::vector<Tensor>& cores,
                             const std::vector<Tensor>& u_outs,
                             const std::vector<Tensor>& u_ins, double scale);
Tensor batched_rescaled_weight(const std::vector<Tensor>& weights,
                              const std::vector<Tensor>& ups,
                              const std::vector<Tensor>& downs,
                              const std::vector<Tensor>& magnitudes, double scale);

}  // namespace mm_spectral_native
