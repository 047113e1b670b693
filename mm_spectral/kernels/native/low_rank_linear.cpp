// An adapted linear y = x Wᵀ + b + s · (x downᵀ) upᵀ as one C++ autograd node.
//
// The same arithmetic as mm_spectral/adapters/functional.py's LowRankLinear (which the
// tests hold it to), issued from C++: an eager step of a ViT with an adapter on every
// linear is bound by the host's cost per op, and each op costs far less to issue here
// than from Python, as does the autograd node itself. Built on first use by
// mm_spectral/kernels/native.py.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

bool is_half(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

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

// scale · a b for a parameter of `dtype` (factor_grad in functional.py).
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

// The compute dtype: autocast's for x's device where it is on, else x's own.
at::ScalarType compute_dtype(const Tensor& x) {
  const auto device_type = x.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    return at::autocast::get_autocast_dtype(device_type);
  }
  return x.scalar_type();
}

struct LowRankLinear : public torch::autograd::Function<LowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& down, const Tensor& up,
                        double scale, bool in_weight) {
    const auto dtype = compute_dtype(x);
    // Operands are cast here, once, as autocast would cast linear's; the float32 sum of
    // the weight form must not be cast by it.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t out_features = weight.size(0);
    const int64_t in_features = weight.size(1);
    const Tensor x2 = as_dtype(x.dim() == 2 ? x : x.reshape({-1, in_features}), dtype);
    const Tensor d = as_dtype(down, dtype);
    const Tensor u = as_dtype(up, dtype);
    const Tensor b = bias.has_value() ? as_dtype(*bias, dtype) : Tensor();
    Tensor w, hidden, y;
    if (in_weight) {  // y = x (W + s·up·down)ᵀ + b
      if (weight.scalar_type() == dtype) {
        w = at::addmm(weight, u, d, 1.0, scale);
      } else {  // summed in the wider dtype, cast once
        const auto wide = at::promote_types(weight.scalar_type(), down.scalar_type());
        w = as_dtype(
            at::addmm(as_dtype(weight, wide), as_dtype(up, wide), as_dtype(down, wide), 1.0, scale),
            dtype);
      }
      y = at::linear(x2, w, b);
    } else {  // y = x Wᵀ + b + s (x downᵀ) upᵀ
      w = as_dtype(weight, dtype);
      hidden = at::linear(x2, d);
      y = at::linear(x2, w, b);
      y.addmm_(hidden, u.t(), 1.0, scale);
    }
    ctx->save_for_backward({x2, w, d, u, hidden});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["in_weight"] = in_weight;
    ctx->saved_data["has_bias"] = b.defined();
    ctx->saved_data["x_shape"] = x.sizes();
    ctx->saved_data["down_dtype"] = down.scalar_type();
    ctx->saved_data["up_dtype"] = up.scalar_type();
    if (x.dim() == 2) {
      return y;
    }
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out_features;
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x2 = saved[0];
    const Tensor& w = saved[1];
    const Tensor& d = saved[2];
    const Tensor& u = saved[3];
    const Tensor& hidden = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool in_weight = ctx->saved_data["in_weight"].toBool();
    const Tensor g = as_dtype(grad_outputs[0].reshape({-1, w.size(0)}), w.scalar_type());
    // Gradient edges exist for tensor inputs only: a missing bias shifts the factors'.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t factors = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_d = ctx->needs_input_grad(factors);
    const bool need_u = ctx->needs_input_grad(factors + 1);
    const auto down_dtype = ctx->saved_data["down_dtype"].toScalarType();
    const auto up_dtype = ctx->saved_data["up_dtype"].toScalarType();
    Tensor grad_x, grad_w, grad_b, grad_d, grad_u;
    if (in_weight) {  // w is W + s·up·down: dx in one GEMM
      if (need_x) {
        grad_x = at::mm(g, w);
      }
      if (need_d) {
        grad_d = factor_grad(at::mm(g, u).t(), x2, scale, down_dtype);
      }
      if (need_u) {
        grad_u = factor_grad(g.t(), at::linear(x2, d), scale, up_dtype);
      }
    } else {
      Tensor g_hidden;
      if (need_x || need_d) {
        g_hidden = at::mm(g, u);
      }
      if (need_x) {
        grad_x = at::mm(g, w).addmm_(g_hidden, d, 1.0, scale);
      }
      if (need_d) {
        grad_d = factor_grad(g_hidden.t(), x2, scale, down_dtype);
      }
      if (need_u) {
        grad_u = factor_grad(g.t(), hidden, scale, up_dtype);
      }
    }
    if (need_b) {
      grad_b = g.sum(0);
    }
    if (need_w) {
      grad_w = at::mm(g.t(), x2);
    }
    if (need_x) {
      const auto x_shape = ctx->saved_data["x_shape"].toIntVector();
      if (x_shape.size() != 2) {
        grad_x = grad_x.view(x_shape);
      }
    }
    return {grad_x, grad_w, grad_b, grad_d, grad_u, Tensor(), Tensor()};
  }
};

Tensor low_rank_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& down, const Tensor& up, double scale, bool in_weight) {
  return LowRankLinear::apply(x, weight, bias, down, up, scale, in_weight);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("low_rank_linear", &low_rank_linear,
        "y = x Wᵀ + b + scale · (x downᵀ) upᵀ as one C++ autograd node; in_weight: as "
        "y = x (W + scale · up down)ᵀ + b (mm_spectral.kernels.dispatch.rank_term_in_weight)");
}
