// The dense conv path (FourierFT and grouped / loralib low-rank convs: ΔW built, one op with
// W0 + ΔW) as one C++ autograd node: adapters/base.py's `layer_op(layer, x, W + ΔW, b)`; and
// DoRA's, which rescales W0 + ΔW per output channel first (adapters/dora.py).
#include "common.h"

#include <limits>

namespace mm_spectral_native {
namespace {

// Ends a conv node's forward: y = conv2d(input, w, b) with the layer's options, which are kept
// (with whether a bias came and ΔW's shape) for conv_backward; `saved` is saved for the backward.
Tensor conv_forward(AutogradContext* ctx, const std::vector<Tensor>& saved, const Tensor& input,
                    const Tensor& w, const std::optional<Tensor>& bias, const Tensor& delta,
                    std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, int64_t groups) {
  const Tensor b = bias.has_value() ? as_dtype(*bias, w.scalar_type()) : Tensor();
  const Tensor y = at::convolution(input, w, b, stride, padding, dilation, false, {0, 0}, groups);
  ctx->save_for_backward(saved);
  ctx->saved_data["has_bias"] = bias.has_value();
  ctx->saved_data["stride"] = stride;
  ctx->saved_data["padding"] = padding;
  ctx->saved_data["dilation"] = dilation;
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["delta_shape"] = delta.sizes();
  return y;
}

// (∂x, ∂w, ∂b) of conv_forward's conv for output gradient g, each where asked (∂b also only
// where a bias came); ∂w is the gradient of the weight the conv ran with.
std::tuple<Tensor, Tensor, Tensor> conv_backward(AutogradContext* ctx, const Tensor& g,
                                                 const Tensor& input, const Tensor& w,
                                                 bool need_x, bool need_w, bool need_bias) {
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const std::vector<int64_t> bias_sizes{w.size(0)};
  auto [grad_x, grad_w, grad_bias] = at::convolution_backward(
      as_dtype(g, w.scalar_type()), input, w,
      has_bias ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
      ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
      ctx->saved_data["dilation"].toIntVector(), false, {0, 0},
      ctx->saved_data["groups"].toInt(), {need_x, need_w, has_bias && need_bias});
  return {grad_x, grad_w, has_bias && need_bias ? grad_bias : Tensor()};
}

// ΔW's gradient in ΔW's own shape (the weight's, or its matrix view).
Tensor as_delta_shape(AutogradContext* ctx, const Tensor& grad) {
  return grad.reshape(ctx->saved_data["delta_shape"].toIntVector());
}

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
    const Tensor w = add_as(weight, delta.view(weight.sizes()), 1.0, dtype);  // cast on store
    const Tensor input = as_dtype(x, dtype);
    return conv_forward(ctx, {input, w}, input, w, bias, delta, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& w = saved[1];
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_delta = ctx->needs_input_grad(edge_after_bias(ctx));  // x, W, [b], ΔW
    auto [grad_x, grad_weight, grad_bias] =
        conv_backward(ctx, grad_outputs[0], input, w, ctx->needs_input_grad(0),
                      need_w || need_delta, ctx->needs_input_grad(2));
    const Tensor grad_delta = need_delta ? as_delta_shape(ctx, grad_weight) : Tensor();
    return {grad_x, need_w ? grad_weight : Tensor(), grad_bias, grad_delta,
            Tensor(), Tensor(), Tensor(), Tensor()};
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
    const Tensor w = mul_as(direction, scale.view(per_row), dtype);  // scaled and cast at once
    const Tensor input = as_dtype(x, dtype);
    return conv_forward(ctx, {input, w, direction, scale, norm}, input, w, bias, delta, stride,
                        padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& w = saved[1];
    const Tensor& direction = saved[2];
    const Tensor& scale = saved[3];
    const Tensor& norm = saved[4];
    const size_t after = edge_after_bias(ctx);  // x, W, [b], ΔW, m
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_delta = ctx->needs_input_grad(after);
    const bool need_m = ctx->needs_input_grad(after + 1);
    auto [grad_x, grad_rescaled, grad_bias] =
        conv_backward(ctx, grad_outputs[0], input, w, ctx->needs_input_grad(0),
                      need_w || need_delta || need_m, ctx->needs_input_grad(2));
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
    const Tensor grad_delta = need_delta ? as_delta_shape(ctx, grad_direction) : Tensor();
    return {grad_x, need_w ? grad_direction : Tensor(), grad_bias, grad_delta, grad_m,
            Tensor(), Tensor(), Tensor(), Tensor()};
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
