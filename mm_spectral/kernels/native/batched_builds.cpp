// The batched weight-space builds of adapters/batched_tucker.py and adapters/batched_dora.py
// (one build per chunk of same-shape layers, made in an eager step) as C++ autograd nodes:
// the same ops, without the Python autograd Function's host cost per call and per backward.
// Every input is float32 and autocast is off inside (the builds are weight-space, float32).
#include "common.h"

#include <limits>

namespace mm_spectral_native {
namespace {

// scale · a b per batch entry, the scale in the GEMM's alpha (beta 0 ignores the empty input).
Tensor scaled_bmm(const Tensor& a, const Tensor& b, double scale) {
  if (scale == 1.0) {
    return at::bmm(a, b);
  }
  return at::baddbmm(at::empty({}, a.options()), a, b, 0.0, scale);
}

// Each layer's slice of a (L, ...) gradient, appended to `grads` in layer order.
void append_layers(variable_list& grads, const Tensor& batch) {
  for (const Tensor& layer : batch.unbind(0)) {
    grads.push_back(layer);
  }
}

// scale · X_ℓ Y_ℓ (X_ℓ Y_ℓᵀ with `transpose`) for L layers: (L, rows, cols) float32.
// Gradients come back as one batched GEMM per operand, each layer's a slice of it.
struct BatchedProduct : public torch::autograd::Function<BatchedProduct> {
  static Tensor forward(AutogradContext* ctx, at::TensorList xs, at::TensorList ys,
                        double scale, bool transpose) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x = at::stack(xs);
    const Tensor y = at::stack(ys);
    ctx->save_for_backward({x, y});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["transpose"] = transpose;
    return scaled_bmm(x, transpose ? y.transpose(1, 2) : y, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& y = saved[1];
    const double s = ctx->saved_data["scale"].toDouble();
    const Tensor g = as_dtype(grad_outputs[0], x.scalar_type());
    Tensor grad_x, grad_y;
    if (ctx->saved_data["transpose"].toBool()) {  // out = s·X Yᵀ: dX = s·g Y, dY = s·gᵀ X
      grad_x = scaled_bmm(g, y, s);
      grad_y = scaled_bmm(g.transpose(1, 2), x, s);
    } else {  // out = s·X Y: dX = s·g Yᵀ, dY = s·Xᵀ g
      grad_x = scaled_bmm(g, y.transpose(1, 2), s);
      grad_y = scaled_bmm(x.transpose(1, 2), g, s);
    }
    variable_list grads;
    grads.reserve(2 * x.size(0) + 2);
    append_layers(grads, grad_x);
    append_layers(grads, grad_y);
    grads.emplace_back();  // scale
    grads.emplace_back();  // transpose
    return grads;
  }
};

// ΔW_ℓ = scale · U_out,ℓ G_ℓ U_in,ℓᵀ for L FLoRA linears: (L, out, in) float32. The scale
// goes into the small down factor s · G U_inᵀ, never over the weight-sized product.
struct BatchedTuckerLinear : public torch::autograd::Function<BatchedTuckerLinear> {
  static Tensor forward(AutogradContext* ctx, at::TensorList cores, at::TensorList u_outs,
                        at::TensorList u_ins, double scale) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor core = at::stack(cores);
    const Tensor u_out = at::stack(u_outs);
    const Tensor u_in = at::stack(u_ins);
    const Tensor down = scaled_bmm(core, u_in.transpose(1, 2), scale);  // (L, J_out, in)
    ctx->save_for_backward({core, u_out, u_in, down});
    ctx->saved_data["scale"] = scale;
    return at::bmm(u_out, down);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& core = saved[0];
    const Tensor& u_out = saved[1];
    const Tensor& u_in = saved[2];
    const Tensor& down = saved[3];
    const double s = ctx->saved_data["scale"].toDouble();
    const Tensor g = as_dtype(grad_outputs[0], core.scalar_type());
    const Tensor grad_out = at::bmm(g, down.transpose(1, 2));  // down holds the scale
    const Tensor grad_down = at::bmm(u_out.transpose(1, 2), g);  // of the scaled down
    variable_list grads;
    grads.reserve(3 * core.size(0) + 1);
    append_layers(grads, scaled_bmm(grad_down, u_in, s));
    append_layers(grads, grad_out);
    append_layers(grads, scaled_bmm(grad_down.transpose(1, 2), core, s));
    grads.emplace_back();  // scale
    return grads;
  }
};

// DoRA's W'_ℓ = c_ℓ ⊙ S_ℓ for L linears, S_ℓ = W0_ℓ + s·B_ℓ A_ℓ and c_ℓ = m_ℓ / ‖S_ℓ‖ per
// output row, the norm without gradient: (L, out, in) float32. The frozen W0 get no
// gradient; the sums S are formed again in the backward rather than kept (a float32 copy
// of every layer's weight until then).
struct BatchedRescaledWeight : public torch::autograd::Function<BatchedRescaledWeight> {
  static Tensor forward(AutogradContext* ctx, at::TensorList weights, at::TensorList ups,
                        at::TensorList downs, at::TensorList magnitudes, double scale) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor base = as_dtype(stacked(weights), at::kFloat);  // a view if packed
    const Tensor up = at::stack(ups);
    const Tensor down = at::stack(downs);
    Tensor summed = at::baddbmm(base, up, down, 1.0, scale);
    const Tensor norm = at::linalg_vector_norm(summed, 2, {2}, false, std::nullopt)
                            .clamp_min_(std::numeric_limits<float>::min());
    const Tensor channel = at::stack(magnitudes) / norm;
    Tensor out = summed.mul_(channel.unsqueeze(2));
    std::vector<Tensor> saved{up, down, norm, channel};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& up = saved[0];
    const Tensor& down = saved[1];
    const Tensor& norm = saved[2];
    const Tensor& channel = saved[3];
    const std::vector<Tensor> weights(saved.begin() + 4, saved.end());
    const double s = ctx->saved_data["scale"].toDouble();
    const Tensor& grad = grad_outputs[0];
    // A cast gradient is our own to scale in place; autograd's float32 one is not.
    const bool cast = grad.scalar_type() != at::kFloat;
    const Tensor g = cast ? grad.to(at::kFloat) : grad;
    Tensor summed = at::baddbmm(as_dtype(stacked(weights), at::kFloat), up, down, 1.0, s);
    const Tensor grad_m = summed.mul_(g).sum(2).div_(norm);
    const Tensor g_sum = cast ? g.mul_(channel.unsqueeze(2)) : g * channel.unsqueeze(2);
    const int64_t layers = up.size(0);
    variable_list grads(static_cast<size_t>(layers), Tensor());  // the frozen W0
    grads.reserve(4 * layers + 1);
    append_layers(grads, scaled_bmm(g_sum, down.transpose(1, 2), s));
    append_layers(grads, scaled_bmm(up.transpose(1, 2), g_sum, s));
    append_layers(grads, grad_m);
    grads.emplace_back();  // scale
    return grads;
  }
};

}  // namespace

// (The lists go to apply as TensorList: only then are their tensors the node's inputs.)
Tensor batched_product(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys,
                       double scale, bool transpose) {
  return BatchedProduct::apply(at::TensorList(xs), at::TensorList(ys), scale, transpose);
}

Tensor batched_tucker_linear(const std::vector<Tensor>& cores,
                             const std::vector<Tensor>& u_outs,
                             const std::vector<Tensor>& u_ins, double scale) {
  return BatchedTuckerLinear::apply(at::TensorList(cores), at::TensorList(u_outs),
                                    at::TensorList(u_ins), scale);
}

Tensor batched_rescaled_weight(const std::vector<Tensor>& weights,
                               const std::vector<Tensor>& ups,
                               const std::vector<Tensor>& downs,
                               const std::vector<Tensor>& magnitudes, double scale) {
  return BatchedRescaledWeight::apply(at::TensorList(weights), at::TensorList(ups),
                                     at::TensorList(downs), at::TensorList(magnitudes), scale);
}

}  // namespace mm_spectral_native
