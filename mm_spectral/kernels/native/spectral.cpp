// FourierFT's and FoRA's per-step builds as C++ autograd nodes: a sparse real spectrum's
// inverse FFT (adapters/spectral.py's _SparseSpectrumToReal), y = x (W + ΔW)ᵀ + b
// (adapters/functional.py's DeltaLinear) and y = x Wᵀ + b for a built W (WeightLinear),
// the same ops issued from C++.
#include "common.h"

namespace mm_spectral_native {
namespace {

// scale · Re(ifft2(F)) in float32 for F zero but at the entries behind `positions` (3n
// flat float slots of the Hermitian half spectrum: own, mirror, read back): a scatter and
// one inverse real FFT forward; one real FFT of the gradient and a gather backward.
struct SparseSpectrumToReal : public torch::autograd::Function<SparseSpectrumToReal> {
  static Tensor forward(AutogradContext* ctx, const Tensor& coefficients, const Tensor& positions,
                        int64_t rows, int64_t cols, double scale) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t n = coefficients.numel();
    const int64_t half_cols = cols / 2 + 1;
    Tensor flat = at::zeros({2 * (rows * half_cols + 1)},
                            coefficients.options().dtype(at::kFloat));
    const Tensor values = as_dtype(coefficients, at::kFloat);
    // Half of each coefficient to its entry, half to its mirror; slots outside the stored
    // half land in the dropped extra one.
    flat.index_add_(0, positions.slice(0, 0, n), values, 0.5 * scale);
    flat.index_add_(0, positions.slice(0, n, 2 * n), values, 0.5 * scale);
    const Tensor half =
        at::view_as_complex(flat.view({-1, 2}).slice(0, 0, rows * half_cols)).view({rows, half_cols});
    ctx->save_for_backward({positions.slice(0, 2 * n)});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dtype"] = coefficients.scalar_type();
    return at::fft_irfft2(half, at::IntArrayRef{rows, cols});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor gather = ctx->get_saved_variables()[0];
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const int64_t cols = ctx->saved_data["cols"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    // take() reads in logical order whatever the strides of cuFFT's spectrum.
    const Tensor spectrum = at::view_as_real(at::fft_rfft2(as_dtype(grad_outputs[0], at::kFloat)));
    const Tensor grad = at::take(spectrum, gather).mul_(scale / static_cast<double>(rows * cols));
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    return {as_dtype(grad, dtype), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// y = x (W + ΔW)ᵀ + b as one GEMM; ΔW's gradient (gᵀx, in ΔW's dtype where cuBLAS can write
// it) goes back to its own graph.
struct DeltaLinear : public torch::autograd::Function<DeltaLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& delta) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x2 = input_rows(x, weight.size(1), dtype);
    // W + ΔW added in the higher of the two precisions, cast once on store.
    const Tensor w = add_as(weight, delta, 1.0, dtype);
    const Tensor y = at::linear(x2, w, bias.has_value() ? as_dtype(*bias, dtype) : Tensor());
    ctx->saved_data["x_shape"] = x.sizes();
    ctx->saved_data["delta_dtype"] = delta.scalar_type();
    return finish_forward(ctx, {x2, w}, bias.has_value(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x2 = saved[0];
    const Tensor& w = saved[1];
    const Tensor g = gradient_rows(grad_outputs[0], w.size(0), w.scalar_type());
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_delta = ctx->needs_input_grad(edge_after_bias(ctx));  // x, W, [b], ΔW
    Tensor grad_x, grad_w, grad_delta;
    if (ctx->needs_input_grad(0)) {
      grad_x = input_shaped(ctx, at::mm(g, w));
    }
    if (need_w || need_delta) {
      // In ΔW's dtype out of cuBLAS where it can write it (float32 ΔW, half g).
      const auto dtype = need_delta ? ctx->saved_data["delta_dtype"].toScalarType()
                                    : g.scalar_type();
      const Tensor grad_full = factor_grad(g.t(), x2, 1.0, dtype);
      grad_w = need_w ? grad_full : Tensor();
      grad_delta = need_delta ? grad_full : Tensor();
    }
    return {grad_x, grad_w, bias_grad(ctx, g), grad_delta};
  }
};

// y = x Wᵀ + b for a weight W built this step (DoRA's rescaled weight from a batched build):
// W cast to the compute dtype on the way in, its gradient gᵀx in W's dtype where cuBLAS can
// write it. DeltaLinear without the frozen weight to add.
struct WeightLinear : public torch::autograd::Function<WeightLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias) {
    const auto dtype = compute_dtype(x);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x2 = input_rows(x, weight.size(1), dtype);
    const Tensor w = as_dtype(weight, dtype);
    const Tensor y = at::linear(x2, w, bias.has_value() ? as_dtype(*bias, dtype) : Tensor());
    ctx->saved_data["x_shape"] = x.sizes();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return finish_forward(ctx, {x2, w}, bias.has_value(), y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x2 = saved[0];
    const Tensor& w = saved[1];
    const Tensor g = gradient_rows(grad_outputs[0], w.size(0), w.scalar_type());
    Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) {
      grad_x = input_shaped(ctx, at::mm(g, w));
    }
    if (ctx->needs_input_grad(1)) {
      grad_w = factor_grad(g.t(), x2, 1.0, ctx->saved_data["weight_dtype"].toScalarType());
    }
    return {grad_x, grad_w, bias_grad(ctx, g)};
  }
};

}  // namespace

Tensor weight_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return WeightLinear::apply(x, weight, bias);
}

Tensor sparse_spectrum_to_real(const Tensor& coefficients, const Tensor& positions,
                               int64_t rows, int64_t cols, double scale) {
  return SparseSpectrumToReal::apply(coefficients, positions, rows, cols, scale);
}

Tensor delta_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& delta) {
  return DeltaLinear::apply(x, weight, bias, delta);
}

}  // namespace mm_spectral_native
