// FLoRA's conv factors as one C++ autograd node (adapters/flora.py's _ConvTuckerDown, and
// the product with the output factor that makes a grouped conv's ΔW), the same ops issued
// from C++.
#include "common.h"

namespace mm_spectral_native {
namespace {

// down = scale · core ×₂ U_in ×₃ U_h ×₄ U_w unfolded to (J_out, in · kh · kw): one GEMM
// against the Kronecker product U_in ⊗ U_h ⊗ U_w (two broadcast products). With U_out also
// ×₁ U_out: ΔW as (out, in · kh · kw). Always float32 (weight-space products are tiny; under
// autocast they would only add casts). The backward is written out: two GEMMs (four with
// U_out) and four small reductions.
struct TuckerConvFactor : public torch::autograd::Function<TuckerConvFactor> {
  static Tensor forward(AutogradContext* ctx, const Tensor& core, const Tensor& u_in,
                        const Tensor& u_h, const Tensor& u_w, const std::optional<Tensor>& u_out,
                        double scale) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t i = u_in.size(0), r_in = u_in.size(1);
    const int64_t h = u_h.size(0), r_h = u_h.size(1);
    const int64_t w = u_w.size(0), r_w = u_w.size(1);
    const Tensor spatial = (u_h.view({h, 1, r_h, 1}) * u_w.view({1, w, 1, r_w}))
                               .view({h * w, r_h * r_w});
    const Tensor kron = (u_in.view({i, 1, r_in, 1}) * spatial.view({1, h * w, 1, r_h * r_w}))
                            .view({i * h * w, r_in * r_h * r_w});
    const Tensor unfolded = core.reshape({core.size(0), -1});
    Tensor down = at::mm(unfolded, kron.t());
    if (scale != 1.0) {
      down.mul_(scale);
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["core_shape"] = core.sizes();
    if (!u_out.has_value()) {
      ctx->save_for_backward({unfolded, u_in, u_h, u_w, spatial, kron});
      return down;
    }
    ctx->save_for_backward({unfolded, u_in, u_h, u_w, spatial, kron, *u_out, down});
    return at::mm(*u_out, down);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& unfolded = saved[0];
    const Tensor& u_in = saved[1];
    const Tensor& u_h = saved[2];
    const Tensor& u_w = saved[3];
    const Tensor& spatial = saved[4];
    const Tensor& kron = saved[5];
    const int64_t i = u_in.size(0), r_in = u_in.size(1);
    const int64_t h = u_h.size(0), r_h = u_h.size(1);
    const int64_t w = u_w.size(0), r_w = u_w.size(1);
    Tensor g = as_dtype(grad_outputs[0], kron.scalar_type());
    Tensor grad_out_factor;
    if (saved.size() == 8) {  // with U_out: out = U_out · down
      grad_out_factor = at::mm(g, saved[7].t());
      g = at::mm(saved[6].t(), g);
    }
    const double scale = ctx->saved_data["scale"].toDouble();
    if (scale != 1.0) {
      g = g * scale;
    }
    const Tensor grad_core = at::mm(g, kron).view(ctx->saved_data["core_shape"].toIntVector());
    const Tensor grad_kron = at::mm(g.t(), unfolded).view({i, h * w, r_in, r_h * r_w});
    // Named arrays: a braced {0, 2} is ambiguous with DimnameList on torch 2.11's headers.
    const std::array<int64_t, 2> outer_dims{1, 3}, inner_dims{0, 2};
    const Tensor grad_in = (grad_kron * spatial.view({1, h * w, 1, r_h * r_w})).sum(outer_dims);
    const Tensor grad_spatial =
        (grad_kron * u_in.view({i, 1, r_in, 1})).sum(inner_dims).view({h, w, r_h, r_w});
    const Tensor grad_h = (grad_spatial * u_w.view({1, w, 1, r_w})).sum(outer_dims);
    const Tensor grad_w = (grad_spatial * u_h.view({h, 1, r_h, 1})).sum(inner_dims);
    return {grad_core, grad_in, grad_h, grad_w, grad_out_factor, Tensor()};
  }
};

}  // namespace

Tensor tucker_conv_factor(const Tensor& core, const Tensor& u_in, const Tensor& u_h,
                          const Tensor& u_w, const std::optional<Tensor>& u_out, double scale) {
  return TuckerConvFactor::apply(core, u_in, u_h, u_w, u_out, scale);
}

}  // namespace mm_spectral_native
