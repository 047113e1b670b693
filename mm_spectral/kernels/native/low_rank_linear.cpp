// An adapted linear y = x Wᵀ + b + s · (x downᵀ) upᵀ as one C++ autograd node, with DoRA's
// rescaled form and FLoRA's Tucker form of it.
//
// The same arithmetic as mm_spectral/adapters/functional.py's LowRankLinear and
// RescaledLowRankLinear (which the tests hold them to), issued from C++: an eager step of
// a ViT with an adapter on every linear is bound by the host's cost per op, and each op
// costs far less to issue here than from Python, as does the autograd node itself. Built
// on first use by mm_spectral/kernels/native.py.
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <limits>
#include <utility>

#include "common.h"

namespace mm_spectral_native {
namespace {

// aten::mm.dtype (half inputs, float32 out, written by cuBLAS) where this torch has it.
using MmOutDtype = at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType);
const c10::TypedOperatorHandle<MmOutDtype>* mm_out_dtype() {
  static const std::optional<c10::TypedOperatorHandle<MmOutDtype>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<MmOutDtype>> {
    auto op = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
    if (!op.has_value()) {
      return std::nullopt;
    }
    return op->typed<MmOutDtype>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}

}  // namespace

// scale · a b for a parameter of `dtype` (factor_grad in functional.py; declared in common.h).
Tensor factor_grad(const Tensor& a, const Tensor& b, double scale, at::ScalarType dtype) {
  Tensor grad;
  const auto* op = mm_out_dtype();
  if (op != nullptr && dtype == at::kFloat && is_half(a.scalar_type()) && a.is_cuda()) {
    grad = op->call(a, b, at::kFloat);
  } else {
    grad = at::mm(a, b);
  }
  return scale == 1.0 ? grad : grad.mul_(scale);
}

namespace {

// How the rank term is stepped: mm_spectral.kernels.dispatch.FORMS, by index.
enum Form : int64_t { kOutput = 0, kWeight = 1, kDense = 2 };

Form as_form(int64_t code) {
  TORCH_CHECK(code >= kOutput && code <= kDense, "rank-term form code must be 0, 1 or 2, got ",
              code);
  return static_cast<Form>(code);
}

// scale · a b with the scale in the GEMM's alpha (beta 0 ignores the empty input).
Tensor scaled_product(const Tensor& a, const Tensor& b, double scale) {
  if (scale == 1.0) {
    return at::mm(a, b);
  }
  return at::addmm(at::empty({}, a.options()), a, b, 0.0, scale);
}

// W + s · up down in the wider of W's and the factors' dtypes (functional.py's _wide_sum),
// stored as `dtype`: up down in one GEMM, then the sum and its cast in one pass. (An addmm
// into W would first copy W, a memcpy per step, and still need the cast.)
Tensor wide_sum(const Tensor& weight, const Tensor& down, const Tensor& up, double scale,
                at::ScalarType dtype) {
  const auto wide = c10::promoteTypes(weight.scalar_type(), down.scalar_type());
  return add_as(weight, at::mm(as_dtype(up, wide), as_dtype(down, wide)), scale, dtype);
}

// W + s · up down in the compute dtype (functional.py's _summed_weight): one GEMM epilogue
// for a weight stored in it, else summed in the wider dtype and cast on store.
Tensor summed_weight(const Tensor& weight, const Tensor& down, const Tensor& up, double scale,
                     at::ScalarType dtype) {
  if (weight.scalar_type() == dtype) {
    return at::addmm(weight, as_dtype(up, dtype), as_dtype(down, dtype), 1.0, scale);
  }
  return wide_sum(weight, down, up, scale, dtype);
}

// dW = gᵀ x2, at least as wide as the factors' dtype (functional.py's _dense_weight_grad).
Tensor dense_weight_grad(const Tensor& g, const Tensor& x2, at::ScalarType factor_dtype) {
  const Tensor full = factor_grad(g.t(), x2, 1.0, factor_dtype);
  return as_dtype(full, c10::promoteTypes(full.scalar_type(), factor_dtype));
}

// The low-rank linear's forward as rows (tokens × out) in the compute dtype `dtype`. Its
// options go on ctx; the tensors the backward needs (x2, w, d, u, hidden) are returned for
// the caller to save with its own.
std::pair<Tensor, std::vector<Tensor>> low_rank_rows(AutogradContext* ctx, const Tensor& x,
                                                     const Tensor& weight, const Tensor& bias,
                                                     const Tensor& down, const Tensor& up,
                                                     double scale, Form form,
                                                     at::ScalarType dtype) {
  const Tensor x2 = input_rows(x, weight.size(1), dtype);
  // The dense form's products with dW run in the factors' own dtype.
  const Tensor d = form == kDense ? down : as_dtype(down, dtype);
  const Tensor u = form == kDense ? up : as_dtype(up, dtype);
  const Tensor b = bias.defined() ? as_dtype(bias, dtype) : Tensor();
  Tensor w, hidden, y;
  if (form == kOutput) {  // y = x Wᵀ + b + s (x downᵀ) upᵀ
    w = as_dtype(weight, dtype);
    hidden = at::linear(x2, d);
    y = at::linear(x2, w, b);
    y.addmm_(hidden, u.t(), 1.0, scale);
  } else {  // y = x (W + s·up·down)ᵀ + b; the weight form's cast factors serve a narrow sum
    const bool narrow = weight.scalar_type() == dtype;
    w = summed_weight(weight, narrow ? d : down, narrow ? u : up, scale, dtype);
    y = at::linear(x2, w, b);
  }
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["form"] = static_cast<int64_t>(form);
  ctx->saved_data["x_shape"] = x.sizes();
  ctx->saved_data["down_dtype"] = down.scalar_type();
  ctx->saved_data["up_dtype"] = up.scalar_type();
  return {y, {x2, w, d, u, hidden}};
}

struct Needs {
  bool x, w, d, u;
};

// (dx, dW, d_down, d_up) of low_rank_rows for output-gradient rows g (compute dtype);
// undefined where not needed. `saved`: what low_rank_rows returned, from ctx.
std::array<Tensor, 4> low_rank_grads(AutogradContext* ctx, const Tensor& g,
                                     const variable_list& saved, Needs need) {
  const Tensor& x2 = saved[0];
  const Tensor& w = saved[1];
  const Tensor& d = saved[2];
  const Tensor& u = saved[3];
  const Tensor& hidden = saved[4];
  const double scale = ctx->saved_data["scale"].toDouble();
  const auto down_dtype = ctx->saved_data["down_dtype"].toScalarType();
  const auto up_dtype = ctx->saved_data["up_dtype"].toScalarType();
  const auto form = static_cast<Form>(ctx->saved_data["form"].toInt());
  Tensor grad_x, grad_w, grad_d, grad_u;
  if (form == kDense) {  // dx in one GEMM; the factors' gradients from dW = gᵀx
    if (need.x) {
      grad_x = at::mm(g, w);
    }
    if (need.d || need.u || need.w) {
      const Tensor full = dense_weight_grad(g, x2, down_dtype);
      if (need.d) {
        grad_d = scaled_product(as_dtype(u, full.scalar_type()).t(), full, scale);
      }
      if (need.u) {
        grad_u = scaled_product(full, as_dtype(d, full.scalar_type()).t(), scale);
      }
      if (need.w) {
        grad_w = full;
      }
    }
  } else if (form == kWeight) {  // w is W + s·up·down: dx in one GEMM
    if (need.x) {
      grad_x = at::mm(g, w);
    }
    if (need.d) {
      grad_d = factor_grad(at::mm(g, u).t(), x2, scale, down_dtype);
    }
    if (need.u) {
      grad_u = factor_grad(g.t(), at::linear(x2, d), scale, up_dtype);
    }
  } else {
    Tensor g_hidden;
    if (need.x || need.d) {
      g_hidden = at::mm(g, u);
    }
    if (need.x) {
      grad_x = at::mm(g, w).addmm_(g_hidden, d, 1.0, scale);
    }
    if (need.d) {
      grad_d = factor_grad(g_hidden.t(), x2, scale, down_dtype);
    }
    if (need.u) {
      grad_u = factor_grad(g.t(), hidden, scale, up_dtype);
    }
  }
  if (need.w && !grad_w.defined()) {
    grad_w = at::mm(g.t(), x2);
  }
  if (need.x) {
    grad_x = input_shaped(ctx, grad_x);
  }
  return {grad_x, grad_w, grad_d, grad_u};
}

// y = x Wᵀ + b + s · (x downᵀ) upᵀ (functional.py's LowRankLinear).
struct LowRankLinear : public torch::autograd::Function<LowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& down, const Tensor& up,
                        double scale, int64_t form) {
    const auto dtype = compute_dtype(x);
    // Operands are cast here, once, as autocast would cast linear's; the float32 sum of
    // the weight form must not be cast by it.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor b = bias.has_value() ? *bias : Tensor();
    auto [y, saved] = low_rank_rows(ctx, x, weight, b, down, up, scale, as_form(form), dtype);
    return finish_forward(ctx, saved, b.defined(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& w = saved[1];
    const Tensor g = gradient_rows(grad_outputs[0], w.size(0), w.scalar_type());
    const size_t factors = edge_after_bias(ctx);  // edges: x, W, [b], down, up
    const Needs need{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                     ctx->needs_input_grad(factors), ctx->needs_input_grad(factors + 1)};
    auto [grad_x, grad_w, grad_d, grad_u] = low_rank_grads(ctx, g, saved, need);
    return {grad_x, grad_w, bias_grad(ctx, g), grad_d, grad_u, Tensor(), Tensor()};
  }
};

// y = c ⊙ (x Wᵀ + s · (x downᵀ) upᵀ) + b, c = magnitude · inv_norm per output channel: DoRA's
// linear (functional.py's RescaledLowRankLinear; inv_norm taken without gradient).
struct RescaledLowRankLinear : public torch::autograd::Function<RescaledLowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& down, const Tensor& up,
                        const Tensor& magnitude, const Tensor& inv_norm, double scale,
                        int64_t form) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto [z, saved] =
        low_rank_rows(ctx, x, weight, Tensor(), down, up, scale, as_form(form), dtype);
    const Tensor channel = as_dtype(at::mul(magnitude, inv_norm), z.scalar_type());
    const Tensor y = bias.has_value()
                         ? at::addcmul(as_dtype(*bias, z.scalar_type()), z, channel)
                         : at::mul(z, channel);
    saved.insert(saved.end(), {z, channel, inv_norm});
    return finish_forward(ctx, saved, bias.has_value(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& z = saved[5];
    const Tensor& channel = saved[6];
    const Tensor& inv_norm = saved[7];
    const Tensor g = gradient_rows(grad_outputs[0], z.size(1), z.scalar_type());
    const size_t factors = edge_after_bias(ctx);  // edges: x, W, [b], down, up, magnitude
    const Needs need{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                     ctx->needs_input_grad(factors), ctx->needs_input_grad(factors + 1)};
    Tensor grad_m;
    if (ctx->needs_input_grad(factors + 2)) {
      grad_m = at::sum(at::mul(g, z), {0}, false, at::kFloat).mul_(inv_norm);
    }
    auto [grad_x, grad_w, grad_d, grad_u] = low_rank_grads(ctx, g * channel, saved, need);
    return {grad_x, grad_w,   bias_grad(ctx, g), grad_d, grad_u,
            grad_m, Tensor(), Tensor(),          Tensor()};
  }
};

// DoRA's linear with the rescale in the weight (functional.py's RescaledWeightLinear):
// y = x W'ᵀ + b, W' = c ⊙ (W0 + s·up·down) per output row, c = m / ‖W0 + s·up·down‖, the
// norm without gradient; the backward takes one dW'' = gᵀx and no pass over the tokens.
struct RescaledWeightLinear : public torch::autograd::Function<RescaledWeightLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& down, const Tensor& up,
                        const Tensor& magnitude, double scale) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x2 = input_rows(x, weight.size(1), dtype);
    const auto [direction, norm, channel] = rescaled_direction(weight, down, up, magnitude, scale);
    const Tensor w = mul_as(direction, channel.unsqueeze(1), dtype);  // scaled and cast at once
    const Tensor b = bias.has_value() ? as_dtype(*bias, dtype) : Tensor();
    const Tensor y = at::linear(x2, w, b);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["x_shape"] = x.sizes();
    return finish_forward(ctx, {x2, w, weight, down, up, norm, channel}, bias.has_value(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x2 = saved[0];
    const Tensor& w = saved[1];
    const Tensor& norm = saved[5];
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor g = gradient_rows(grad_outputs[0], w.size(0), w.scalar_type());
    const size_t factors = edge_after_bias(ctx);  // edges: x, W, [b], down, up, magnitude
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_d = ctx->needs_input_grad(factors);
    const bool need_u = ctx->needs_input_grad(factors + 1);
    const bool need_m = ctx->needs_input_grad(factors + 2);
    Tensor grad_x, grad_w, grad_d, grad_u, grad_m;
    if (ctx->needs_input_grad(0)) {
      grad_x = input_shaped(ctx, at::mm(g, w));
    }
    if (need_w || need_d || need_u || need_m) {
      // From dW'' = gᵀx and p = dW'' downᵀ (out × r), without the summed weight again:
      // Σ_in dW'' ⊙ (W0 + s·up·down) = Σ_in dW'' ⊙ W0 + s · Σ_r up ⊙ p, and the factors see
      // dW' = c ⊙ dW'': d_up = s · c ⊙ p, d_down = s · (c ⊙ up)ᵀ dW''.
      Tensor full = dense_weight_grad(g, x2, norm.scalar_type());
      const auto wide = full.scalar_type();
      const Tensor d = as_dtype(saved[3], wide);
      const Tensor u = as_dtype(saved[4], wide);
      const Tensor channel = saved[6].unsqueeze(1);
      Tensor p;
      if (need_m || need_u) {
        p = at::mm(full, d.t());
      }
      if (need_m) {
        const int64_t rows = full.size(0);
        // In place on the fresh row sums: an out-of-place baddbmm would first copy them.
        grad_m = as_dtype(at::sum(at::mul(full, saved[2]), {1}), wide);
        grad_m.view({rows, 1, 1}).baddbmm_(u.view({rows, 1, -1}), p.view({rows, -1, 1}), 1.0, scale);
        grad_m.div_(norm);
      }
      if (need_u) {
        grad_u = scale == 1.0 ? p.mul_(channel) : p.mul_(channel).mul_(scale);
      }
      if (need_w) {
        grad_w = full.mul_(channel);
      }
      if (need_d) {
        grad_d = need_w ? scaled_product(u.t(), grad_w, scale)
                        : scaled_product(at::mul(u, channel).t(), full, scale);
      }
    }
    return {grad_x, grad_w, bias_grad(ctx, g), grad_d, grad_u, grad_m, Tensor()};
  }

 private:
  // (W0 + s·up·down, its row norms clamped at the smallest normal number, m / norms) in
  // the wider of W0's and the parameters' dtypes (functional.py's _rescaled_direction).
  static std::array<Tensor, 3> rescaled_direction(const Tensor& weight, const Tensor& down,
                                                  const Tensor& up, const Tensor& magnitude,
                                                  double scale) {
    const auto wide = c10::promoteTypes(
        c10::promoteTypes(weight.scalar_type(), down.scalar_type()), magnitude.scalar_type());
    const Tensor direction = wide_sum(weight, as_dtype(down, wide), up, scale, wide);
    const double tiny = wide == at::kDouble ? std::numeric_limits<double>::min()
                                            : std::numeric_limits<float>::min();
    const Tensor norm =
        at::linalg_vector_norm(direction, 2, at::IntArrayRef{1}, false, std::nullopt)
            .clamp_min_(tiny);
    return {direction, norm, at::div(as_dtype(magnitude, wide), norm)};
  }
};

// FLoRA's linear: the low-rank linear with down = core U_inᵀ (the Tucker core and the
// input factor, float32 beside the compute dtype) and up = U_out, the scale on the rank
// term. The core product and its gradients (d_core = d_down U_in, d_U_in = d_downᵀ core)
// run inside the node instead of in an autograd node of their own.
struct TuckerLowRankLinear : public torch::autograd::Function<TuckerLowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& core,
                        const Tensor& u_out, const Tensor& u_in, double scale, int64_t form) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor down = at::mm(core, u_in.t());
    const Tensor b = bias.has_value() ? *bias : Tensor();
    auto [y, saved] = low_rank_rows(ctx, x, weight, b, down, u_out, scale, as_form(form), dtype);
    saved.insert(saved.end(), {core, u_in});
    return finish_forward(ctx, saved, b.defined(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& w = saved[1];
    const Tensor& core = saved[5];
    const Tensor& u_in = saved[6];
    const Tensor g = gradient_rows(grad_outputs[0], w.size(0), w.scalar_type());
    const size_t factors = edge_after_bias(ctx);  // edges: x, W, [b], core, U_out, U_in
    const bool need_core = ctx->needs_input_grad(factors);
    const bool need_u_in = ctx->needs_input_grad(factors + 2);
    const Needs need{ctx->needs_input_grad(0), ctx->needs_input_grad(1), need_core || need_u_in,
                     ctx->needs_input_grad(factors + 1)};
    auto [grad_x, grad_w, grad_down, grad_u_out] = low_rank_grads(ctx, g, saved, need);
    Tensor grad_core, grad_u_in;
    // In the factors' dtype, as autograd would take the down factor's gradient.
    const Tensor grad_d = (need_core || need_u_in) ? as_dtype(grad_down, core.scalar_type())
                                                   : Tensor();
    if (need_core) {
      grad_core = at::mm(grad_d, u_in);
    }
    if (need_u_in) {
      grad_u_in = at::mm(grad_d.t(), core);
    }
    return {grad_x,    grad_w,   bias_grad(ctx, g), grad_core, grad_u_out,
            grad_u_in, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor tucker_low_rank_linear(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& core,
                              const Tensor& u_out, const Tensor& u_in, double scale,
                              int64_t form) {
  return TuckerLowRankLinear::apply(x, weight, bias, core, u_out, u_in, scale, form);
}

Tensor low_rank_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& down, const Tensor& up, double scale, int64_t form) {
  return LowRankLinear::apply(x, weight, bias, down, up, scale, form);
}

Tensor rescaled_weight_linear(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& down,
                              const Tensor& up, double scale, const Tensor& magnitude) {
  return RescaledWeightLinear::apply(x, weight, bias, down, up, magnitude, scale);
}

Tensor rescaled_low_rank_linear(const Tensor& x, const Tensor& weight,
                                const std::optional<Tensor>& bias, const Tensor& down,
                                const Tensor& up, double scale, const Tensor& magnitude,
                                const Tensor& inv_norm, int64_t form) {
  return RescaledLowRankLinear::apply(x, weight, bias, down, up, magnitude, inv_norm, scale,
                                      form);
}

// 1 / ‖W0 + s · up down‖ per output channel in float32, without forming the sum (dora.py's
// low_rank_inverse_norms): ‖W0ᵢ‖² + upᵢ · (2s·(down W0ᵢᵀ) + s²·(down downᵀ) upᵢᵀ).
Tensor low_rank_inverse_norms(const Tensor& weight, const Tensor& down, const Tensor& up,
                              double scale, const std::optional<Tensor>& base_squares) {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t rows = weight.size(0);
  const Tensor w = weight.reshape({rows, -1});
  const Tensor a = as_dtype(down, at::kFloat);
  const Tensor b = as_dtype(up, at::kFloat);
  const Tensor base = base_squares.has_value()
                          ? *base_squares
                          : at::linalg_vector_norm(w, 2, at::IntArrayRef{1}, false, at::kFloat)
                                .square_();
  const Tensor cross = at::mm(as_dtype(w, at::kFloat), a.t());
  const Tensor mixed = cross.addmm_(b, at::mm(a, a.t()), 2.0 * scale, scale * scale);
  const Tensor squares =
      at::baddbmm(base.view({rows, 1, 1}), b.view({rows, 1, -1}), mixed.view({rows, -1, 1}));
  return squares.view({rows}).clamp_min_(std::numeric_limits<float>::min()).rsqrt_();
}

}  // namespace mm_spectral_native
