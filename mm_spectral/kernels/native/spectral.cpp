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

// y = x2 wᵀ + b for the input's rows x2 and a weight w in the compute dtype `dtype`; saves
// what saved_linear_grads reads, `grad_dtype` being the dtype the weight's gradient wants.
Tensor saved_linear(AutogradContext* ctx, const Tensor& x, const Tensor& x2, const Tensor& w,
                    const std::optional<Tensor>& bias, at::ScalarType dtype,
                    at::ScalarType grad_dtype) {
  const Tensor y = at::linear(x2, w, bias.has_value() ? as_dtype(*bias, dtype) : Tensor());
  ctx->saved_data["x_shape"] = x.sizes();
  ctx->saved_data["grad_dtype"] = grad_dtype;
  return finish_forward(ctx, {x2, w}, bias.has_value(), y, x);
}

// (dx, gᵀx, Σ g) of saved_linear, each undefined unless asked for; gᵀx in the saved
// gradient dtype out of cuBLAS where it can write it (a float32 weight, half g), else g's.
std::array<Tensor, 3> saved_linear_grads(AutogradContext* ctx, const Tensor& grad, bool need_x,
                                         bool need_weight, bool own_dtype) {
  const auto saved = ctx->get_saved_variables();
  const Tensor& x2 = saved[0];
  const Tensor& w = saved[1];
  const Tensor g = gradient_rows(grad, w.size(0), w.scalar_type());
  Tensor grad_x, grad_weight;
  if (need_x) {
    grad_x = input_shaped(ctx, at::mm(g, w));
  }
  if (need_weight) {
    const auto dtype = own_dtype ? ctx->saved_data["grad_dtype"].toScalarType() : g.scalar_type();
    grad_weight = factor_grad(g.t(), x2, 1.0, dtype);
  }
  return {grad_x, grad_weight, bias_grad(ctx, g)};
}

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
    return saved_linear(ctx, x, x2, w, bias, dtype, delta.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_delta = ctx->needs_input_grad(edge_after_bias(ctx));  // x, W, [b], ΔW
    const auto [grad_x, grad_full, grad_b] = saved_linear_grads(
        ctx, grad_outputs[0], ctx->needs_input_grad(0), need_w || need_delta, need_delta);
    return {grad_x, need_w ? grad_full : Tensor(), grad_b, need_delta ? grad_full : Tensor()};
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
    return saved_linear(ctx, x, x2, as_dtype(weight, dtype), bias, dtype, weight.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto [grad_x, grad_w, grad_b] = saved_linear_grads(
        ctx, grad_outputs[0], ctx->needs_input_grad(0), ctx->needs_input_grad(1), true);
    return {grad_x, grad_w, grad_b};
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
