// torch binding of the decode kernels in aqlm_decode.cu and the prefill / dequantize kernels in aqlm_prefill.cu (see
// aqlm_ctx/kernels/cuda_kernels.py for the planning: token tiles, splits and windows are chosen there).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "aqlm_decode.h"
#include "aqlm_prefill.h"

namespace {

void check_layer(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                 const torch::Tensor& scales, const std::optional<torch::Tensor>& bias) {
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0, "x: 2-D CUDA, rows aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16");
  TORCH_CHECK(num_codebooks == 1 || num_codebooks == 2, "1 or 2 codebooks");
  TORCH_CHECK(codebooks.is_contiguous() && codebooks.dim() == 4 && codebooks.size(1) == 256 &&
                  codebooks.size(2) == 1 && codebooks.size(3) == 8 && codebooks.scalar_type() == x.scalar_type(),
              "codebooks: contiguous [C, 256, 1, 8] of x's dtype");
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 3 && codes.size(2) == num_codebooks &&
                  codes.element_size() == 1 && codes.size(1) * 8 == x.size(1) &&
                  (codes.size(1) * num_codebooks) % 16 == 0 && reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0,
              "codes: contiguous 16-byte aligned [out, in / 8, C] bytes, rows a multiple of 16 bytes");
  const int64_t out_features = codes.size(0);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == out_features && scales.scalar_type() == x.scalar_type(),
              "scales: contiguous, one per output, x's dtype");
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == out_features && bias->scalar_type() == x.scalar_type(),
                "bias: contiguous, one per output, x's dtype");
  }
}

torch::Tensor decode(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                     const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                     const torch::Tensor& counters, int64_t splits, int64_t groups_per_split, int64_t window_groups) {
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  check_layer(x, codes, codebooks, scales, bias);
  const int64_t out_features = codes.size(0);
  const int64_t tokens = x.size(0);
  TORCH_CHECK(tokens >= 1 && tokens <= 32, "1 to 32 tokens");
  const int64_t row_blocks = (out_features + aqlm_ctx::kRowsPerCta - 1) / aqlm_ctx::kRowsPerCta;
  TORCH_CHECK(splits >= 1 && (splits == 1 || (counters.is_cuda() && counters.numel() >= row_blocks &&
                                              counters.scalar_type() == at::kInt)),
              "split-K needs an int32 counter per row block");
  const int super = 64 / num_codebooks;
  TORCH_CHECK(groups_per_split % super == 0 && window_groups % super == 0 && window_groups > 0, "bad plan");
  TORCH_CHECK(splits == (codes.size(1) + groups_per_split - 1) / groups_per_split, "bad plan");

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({tokens, out_features}, x.options());
  torch::Tensor workspace;
  if (splits > 1) workspace = torch::empty({splits, tokens, out_features}, x.options().dtype(at::kFloat));

  aqlm_ctx::DecodeParams p{};
  p.x = x.data_ptr();
  p.codes = static_cast<const uint8_t*>(codes.data_ptr());
  p.codebooks = codebooks.data_ptr();
  p.scales = scales.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.workspace = splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  p.x_stride = x.stride(0);
  p.tokens = static_cast<int>(tokens);
  p.out_features = static_cast<int>(out_features);
  p.groups = static_cast<int>(codes.size(1));
  p.groups_per_split = static_cast<int>(groups_per_split);
  p.window_groups = static_cast<int>(window_groups);
  p.x_slots = aqlm_ctx::decode_x_slots(num_codebooks, p.window_groups);
  p.splits = static_cast<int>(splits);
  const cudaError_t err = aqlm_ctx::decode_launch(p, num_codebooks, x.scalar_type() == at::kBFloat16,
                                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlm_ctx decode kernel: ", cudaGetErrorString(err));
  return y;
}

torch::Tensor prefill(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                      const torch::Tensor& scales, const std::optional<torch::Tensor>& bias, const torch::Tensor& counters,
                      int64_t token_tile, int64_t splits, int64_t stages_per_split) {
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  check_layer(x, codes, codebooks, scales, bias);
  TORCH_CHECK(codes.size(1) % 8 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(token_tile == 64 || token_tile == 128 || token_tile == 256, "token tile 64, 128 or 256");
  const int64_t out_features = codes.size(0);
  const int64_t tokens = x.size(0);
  const int64_t stages = codes.size(1) / 8;
  TORCH_CHECK(tokens >= 1 && stages_per_split >= 1 && splits == (stages + stages_per_split - 1) / stages_per_split,
              "bad plan");
  const int64_t tiles = ((out_features + aqlm_ctx::kPrefillRows - 1) / aqlm_ctx::kPrefillRows) *
                        ((tokens + token_tile - 1) / token_tile);
  TORCH_CHECK(splits == 1 || (counters.is_cuda() && counters.numel() >= tiles && counters.scalar_type() == at::kInt),
              "split-K needs an int32 counter per tile");

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({tokens, out_features}, x.options());
  torch::Tensor workspace;
  if (splits > 1) workspace = torch::empty({splits, tokens, out_features}, x.options().dtype(at::kFloat));
  aqlm_ctx::PrefillParams p{};
  p.x = x.data_ptr();
  p.codes = static_cast<const uint8_t*>(codes.data_ptr());
  p.codebooks = codebooks.data_ptr();
  p.scales = scales.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.workspace = splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  p.x_stride = x.stride(0);
  p.tokens = static_cast<int>(tokens);
  p.out_features = static_cast<int>(out_features);
  p.groups = static_cast<int>(codes.size(1));
  p.stages_per_split = static_cast<int>(stages_per_split);
  p.splits = static_cast<int>(splits);
  const cudaError_t err = aqlm_ctx::prefill_launch(p, num_codebooks, x.scalar_type() == at::kBFloat16,
                                                   static_cast<int>(token_tile), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlm_ctx prefill kernel: ", cudaGetErrorString(err));
  return y;
}

torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& codebooks, const torch::Tensor& scales) {
  TORCH_CHECK(codebooks.is_cuda() && codebooks.is_contiguous() && codebooks.dim() == 4 && codebooks.size(2) == 1 &&
                  codebooks.size(3) == 8 &&
                  (codebooks.scalar_type() == at::kHalf || codebooks.scalar_type() == at::kBFloat16),
              "codebooks: contiguous fp16/bf16 CUDA [C, 2**bits, 1, 8]");
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  const int nbits = codebooks.size(1) == 65536 ? 16 : codebooks.size(1) == 256 ? 8 : 0;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 3 && codes.size(2) == num_codebooks && codes.device() == codebooks.device() &&
                  codes.element_size() == nbits / 8,
              "codes: contiguous [out, in / 8, C] of 1 (8-bit) or 2 (16-bit) bytes");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == codes.size(0) && scales.scalar_type() == codebooks.scalar_type(),
              "scales: contiguous, one per output, the codebooks' dtype");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto w = torch::empty({codes.size(0), codes.size(1) * 8}, codebooks.options());
  if (w.numel() == 0) return w;
  const cudaError_t err = aqlm_ctx::dequantize_launch(
      codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(), w.data_ptr(), codes.size(0), codes.size(1),
      num_codebooks, nbits, codebooks.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlm_ctx dequantize kernel: ", cudaGetErrorString(err));
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "AQLM 2x8 / 1x8 decode matmul (1-32 tokens)");
  m.def("prefill", &prefill, "AQLM 2x8 / 1x8 prefill matmul (wgmma, sm_90a)");
  m.def("dequantize", &dequantize, "AQLM 2x8 / 1x8 / 1x16 weight as a dense matrix");
}
