// The dense conv path (FourierFT and grouped / loralib low-rank convs: ΔW built, one op with
// W0 + ΔW) as one C++ autograd node: adapters/base.py's `layer_op(layer, x, W + ΔW, b)`; and
// DoRA's, which rescales W0 + ΔW per output channel first (adapters/dora.py).
#include "common.h"

#include <limits>

namespace mm_spectral_native {
namespace {

// y = conv2d(x, W + ΔW, b) with the layer's stride, padding, dilation and groups. W + ΔW is
// summed in the higher of the two precisions and cast once to the compute dtype (autocast's
// where it is on); the backward is one convolution_backward, whose weight gradient is ΔW's.
struct DeltaConv2d : public torch::autograd::Function<DeltaConv2d> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& delta,
                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                        std::vector<int64_t> dilation, int64_t groups) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto wide = c10::promoteTypes(weight.scalar_type(), delta.scalar_type());
    const Tensor w = as_dtype(
        at::add(as_dtype(weight, wide), as_dtype(delta.view(weight.sizes()), wide)), dtype);
    const Tensor input = as_dtype(x, dtype);
    const Tensor b = bias.has_value() ? as_dtype(*bias, dtype) : Tensor();
    const Tensor y = at::convolution(input, w, b, stride, padding, dilation, false, {0, 0}, groups);
    ctx->save_for_backward({input, w});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["delta_shape"] = delta.sizes();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& w = saved[1];
    const Tensor g = as_dtype(grad_outputs[0], w.scalar_type());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    const bool need_delta = ctx->needs_input_grad(edge_after_bias(ctx));  // x, W, [b], ΔW
    const std::vector<int64_t> bias_sizes{w.size(0)};
    auto [grad_x, grad_weight, grad_bias] = at::convolution_backward(
        g, input, w, has_bias ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), false, {0, 0},
        ctx->saved_data["groups"].toInt(),
        {ctx->needs_input_grad(0), need_w || need_delta, need_bias});
    Tensor grad_delta;
    if (need_delta) {
      grad_delta = grad_weight.reshape(ctx->saved_data["delta_shape"].toIntVector());
    }
    return {grad_x, need_w ? grad_weight : Tensor(), need_bias ? grad_bias : Tensor(),
            grad_delta, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// DoRA on a conv that builds ΔW: y = conv2d(x, m ⊙ (W + ΔW) / ‖W + ΔW‖_c, b), the norm
// without gradient (DoRA §4.3), in the wider of W's and m's precisions, the rescaled weight
// cast once to the compute dtype. Backward: one convolution_backward, then the direction's
// gradient (rescaled) and the magnitude's (Σ_row ∂W' ⊙ direction / ‖·‖_c).
struct RescaledDeltaConv2d : public torch::autograd::Function<RescaledDeltaConv2d> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& delta,
                        const Tensor& magnitude, std::vector<int64_t> stride,
                        std::vector<int64_t> padding, std::vector<int64_t> dilation,
                        int64_t groups) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto wide = c10::promoteTypes(weight.scalar_type(), magnitude.scalar_type());
    const Tensor direction =
        at::add(as_dtype(weight, wide), as_dtype(delta.reshape(weight.sizes()), wide));
    const Tensor norm = at::linalg_vector_norm(direction.detach().reshape({weight.size(0), -1}),
                                               2, {1}, false, std::nullopt)
                            .clamp_min(wide == at::kDouble ? std::numeric_limits<double>::min()
                                                           : std::numeric_limits<float>::min());
    const Tensor scale = as_dtype(magnitude, wide) / norm;
    std::vector<int64_t> per_row(weight.dim(), 1);
    per_row[0] = -1;
    const Tensor w = as_dtype(direction * scale.view(per_row), dtype);
    const Tensor input = as_dtype(x, dtype);
    const Tensor b = bias.has_value() ? as_dtype(*bias, dtype) : Tensor();
    const Tensor y = at::convolution(input, w, b, stride, padding, dilation, false, {0, 0}, groups);
    ctx->save_for_backward({input, w, direction, scale, norm});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["delta_shape"] = delta.sizes();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& w = saved[1];
    const Tensor& direction = saved[2];
    const Tensor& scale = saved[3];
    const Tensor& norm = saved[4];
    const Tensor g = as_dtype(grad_outputs[0], w.scalar_type());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after = edge_after_bias(ctx);  // x, W, [b], ΔW, m
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    const bool need_delta = ctx->needs_input_grad(after);
    const bool need_m = ctx->needs_input_grad(after + 1);
    const std::vector<int64_t> bias_sizes{w.size(0)};
    auto [grad_x, grad_rescaled, grad_bias] = at::convolution_backward(
        g, input, w, has_bias ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), false, {0, 0},
        ctx->saved_data["groups"].toInt(),
        {ctx->needs_input_grad(0), need_w || need_delta || need_m, need_bias});
    Tensor grad_direction, grad_m;
    if (need_w || need_delta || need_m) {
      const Tensor gw = as_dtype(grad_rescaled, direction.scalar_type());
      std::vector<int64_t> per_row(direction.dim(), 1);
      per_row[0] = -1;
      if (need_w || need_delta) {
        grad_direction = gw * scale.view(per_row);
      }
      if (need_m) {
        grad_m = (gw * direction).reshape({direction.size(0), -1}).sum(1) / norm;
      }
    }
    Tensor grad_delta;
    if (need_delta) {
      grad_delta = grad_direction.reshape(ctx->saved_data["delta_shape"].toIntVector());
    }
    return {grad_x, need_w ? grad_direction : Tensor(), need_bias ? grad_bias : Tensor(),
            grad_delta, grad_m, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor rescaled_delta_conv2d(const Tensor& x, const Tensor& weight,
                             const std::optional<Tensor>& bias, const Tensor& delta,
                             const Tensor& magnitude, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             int64_t groups) {
  return RescaledDeltaConv2d::apply(x, weight, bias, delta, magnitude, stride, padding, dilation,
                                    groups);
}

Tensor delta_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& delta, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, int64_t groups) {
  return DeltaConv2d::apply(x, weight, bias, delta, stride, padding, dilation, groups);
}

}  // namespace mm_spectral_native
