// The Python bindings of mm_spectral.kernels.native's C++ autograd nodes.
#include "common.h"


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rescaled_low_rank_linear", &mm_spectral_native::rescaled_low_rank_linear,
        "DoRA's linear: magnitude · inv_norm ⊙ (the low-rank linear without bias) + bias, as "
        "one C++ autograd node");
  m.def("rescaled_weight_linear", &mm_spectral_native::rescaled_weight_linear,
        "DoRA's linear with the rescale in the weight: x (m ⊙ (W + scale · up down) / norm)ᵀ + "
        "bias, the norm without gradient, the factors' gradients from one dense dW, as one C++ "
        "autograd node");
  m.def("low_rank_inverse_norms", &mm_spectral_native::low_rank_inverse_norms,
        "1 / ‖W0 + scale · up down‖ per output channel, float32, without gradient");
  m.def("tucker_low_rank_linear", &mm_spectral_native::tucker_low_rank_linear,
        "FLoRA's linear: the low-rank linear with down = core U_inᵀ and up = U_out, one C++ "
        "autograd node");
  m.def("low_rank_linear", &mm_spectral_native::low_rank_linear,
        "y = x Wᵀ + b + scale · (x downᵀ) upᵀ as one C++ autograd node; form: how the rank "
        "term is stepped (mm_spectral.kernels.dispatch.FORMS, by index)");
  m.def("sparse_spectrum_to_real", &mm_spectral_native::sparse_spectrum_to_real,
        "scale · Re(ifft2(F)), float32, F zero but at the entries behind positions (FourierFT's "
        "ΔW, FoRA's factors), as one C++ autograd node");
  m.def("tucker_conv_factor", &mm_spectral_native::tucker_conv_factor,
        "FLoRA's conv factor scale · core ×₂ U_in ×₃ U_h ×₄ U_w as (J_out, in · kh · kw), "
        "times U_out (ΔW) when given, float32, as one C++ autograd node");
  m.def("delta_conv2d", &mm_spectral_native::delta_conv2d,
        "y = conv2d(x, W + ΔW, b) with the given stride, padding, dilation and groups as one "
        "C++ autograd node");
  m.def("rescaled_delta_conv2d", &mm_spectral_native::rescaled_delta_conv2d,
        "DoRA's conv that builds ΔW: conv2d(x, m ⊙ (W + ΔW) / ‖W + ΔW‖_c, b), the norm without "
        "gradient, as one C++ autograd node");
  m.def("delta_linear", &mm_spectral_native::delta_linear,
        "y = x (W + ΔW)ᵀ + b as one GEMM in one C++ autograd node");
  m.def("batched_product", &mm_spectral_native::batched_product,
        "scale · X_l Y_l (X_l Y_lᵀ with transpose) for L same-shape layers, float32, one batched "
        "GEMM in one C++ autograd node");
  m.def("batched_tucker_linear", &mm_spectral_native::batched_tucker_linear,
        "FLoRA's linear ΔW_l = scale · U_out,l G_l U_in,lᵀ for L same-shape layers, float32, as "
        "one C++ autograd node");
  m.def("weight_linear", &mm_spectral_native::weight_linear,
        "y = x Wᵀ + b for a weight built this step, cast to the compute dtype, its gradient in "
        "its own dtype, as one C++ autograd node");
  m.def("batched_rescaled_weight", &mm_spectral_native::batched_rescaled_weight,
        "DoRA's W'_l = m_l ⊙ S_l / ‖S_l‖, S_l = W0_l + scale · B_l A_l, for L same-shape "
        "linears (norm without gradient), float32, as one C++ autograd node");
}
