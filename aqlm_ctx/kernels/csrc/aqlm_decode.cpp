// torch binding of the decode kernels in aqlm_decode.cu and the prefill / dequantize kernels in aqlm_prefill.cu (see
// aqlm_ctx/kernels/cuda_kernels.py for the planning: token tiles, splits and windows are chosen there).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <utility>

#include "aqlm_decode.h"
#include "aqlm_prefill.h"

namespace {

// The checks every matmul entry point shares: x (2-D, unit inner stride, rows 16-byte aligned, fp16/bf16), codebooks
// [num_codebooks, codebook_size, 1, 8] of x's dtype, codes [out, in / 8, num_codebooks] of code_bytes-byte integers
// with rows of a multiple of 16 bytes, scales and bias one per output of x's dtype; all contiguous and on x's device.
void check_layer(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                 const torch::Tensor& scales, const std::optional<torch::Tensor>& bias, int64_t codebook_size,
                 int64_t code_bytes) {
  const int64_t num_codebooks = codebooks.size(0);
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0, "x: 2-D CUDA, rows aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16");
  TORCH_CHECK(codebooks.is_contiguous() && codebooks.dim() == 4 && codebooks.size(1) == codebook_size &&
                  codebooks.size(2) == 1 && codebooks.size(3) == 8 && codebooks.scalar_type() == x.scalar_type() &&
                  codebooks.device() == x.device(),
              "codebooks: contiguous [C, ", codebook_size, ", 1, 8] of x's dtype and device");
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 3 && codes.size(2) == num_codebooks &&
                  codes.element_size() == code_bytes && codes.size(1) * 8 == x.size(1) &&
                  (codes.size(1) * num_codebooks * code_bytes) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0 && codes.device() == x.device(),
              "codes: contiguous 16-byte aligned [out, in / 8, C] of ", code_bytes,
              "-byte integers, rows a multiple of 16 bytes");
  const int64_t out_features = codes.size(0);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == out_features && scales.scalar_type() == x.scalar_type(),
              "scales: contiguous, one per output, x's dtype");
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == out_features && bias->scalar_type() == x.scalar_type(),
                "bias: contiguous, one per output, x's dtype");
  }
}

void check_counters(const torch::Tensor& counters, int64_t splits, int64_t needed) {
  TORCH_CHECK(splits >= 1 && (splits == 1 || (counters.is_cuda() && counters.numel() >= needed &&
                                              counters.scalar_type() == at::kInt)),
              "split-K needs ", needed, " int32 counters");
}

// y [tokens, out_features] in x's dtype, and the fp32 split-K workspace [splits, tokens, out_features] (undefined
// without split-K).
std::pair<torch::Tensor, torch::Tensor> outputs(const torch::Tensor& x, int64_t out_features, int64_t splits) {
  auto y = torch::empty({x.size(0), out_features}, x.options());
  torch::Tensor workspace;
  if (splits > 1) workspace = torch::empty({splits, x.size(0), out_features}, x.options().dtype(at::kFloat));
  return {y, workspace};
}

// The fields of LayerParams, which every launch fills the same way.
void fill_layer(aqlm_ctx::LayerParams& p, const torch::Tensor& x, const torch::Tensor& codes,
                const torch::Tensor& codebooks, const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                torch::Tensor& y, torch::Tensor& workspace, int64_t splits) {
  p.x = x.data_ptr();
  p.codes = static_cast<const uint8_t*>(codes.data_ptr());
  p.codebooks = codebooks.data_ptr();
  p.scales = scales.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  p.x_stride = x.stride(0);
  p.tokens = static_cast<int>(x.size(0));
  p.out_features = static_cast<int>(codes.size(0));
  p.groups = static_cast<int>(codes.size(1));
  p.splits = static_cast<int>(splits);
}

// The fields of DecodeParams that every decode launch fills the same way (`counters` may be undefined without split-K).
aqlm_ctx::DecodeParams decode_params(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                                     const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                                     const torch::Tensor& counters, torch::Tensor& y, torch::Tensor& workspace,
                                     int64_t splits, int64_t groups_per_split, int64_t window_groups) {
  aqlm_ctx::DecodeParams p{};
  fill_layer(p, x, codes, codebooks, scales, bias, y, workspace, splits);
  p.counters = workspace.defined() && counters.defined() ? counters.data_ptr<int>() : nullptr;
  p.groups_per_split = static_cast<int>(groups_per_split);
  p.window_groups = static_cast<int>(window_groups);
  return p;
}

// 2x8 / 1x8: with `groups_per_split` > 0, split-K: `ctas` = row blocks x splits, each split that many groups of a
// row block, its CTAs one thread-block cluster when `cluster` (= splits, 2 to kMaxCluster; sm_90+) and otherwise
// summed through the workspace; with 0, a stream-K grid of `ctas` CTAs over the row blocks' supersteps (see
// decode_kernel). `window_groups` of x are staged in shared memory at a time. With `sum_kernel`, partials in the
// workspace are summed by a second kernel rather than by the last CTA of each row block.
torch::Tensor decode(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                     const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                     const torch::Tensor& counters, int64_t ctas, int64_t groups_per_split, int64_t window_groups,
                     int64_t cluster, bool sum_kernel) {
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  TORCH_CHECK(num_codebooks == 1 || num_codebooks == 2, "1 or 2 codebooks");
  check_layer(x, codes, codebooks, scales, bias, 256, 1);
  const int64_t out_features = codes.size(0);
  const int64_t tokens = x.size(0);
  TORCH_CHECK(tokens >= 1 && tokens <= 32, "1 to 32 tokens");
  const int super = 64 / num_codebooks;
  const int64_t row_blocks = (out_features + aqlm_ctx::kRowsPerCta - 1) / aqlm_ctx::kRowsPerCta;
  const int64_t steps = (codes.size(1) + super - 1) / super;
  const int64_t units = row_blocks * steps;
  TORCH_CHECK(ctas >= 1 && ctas <= units && window_groups % super == 0 && window_groups > 0, "bad plan");
  TORCH_CHECK((units + 1) * ctas < (int64_t{1} << 31), "layer too large for the decode kernel's 32-bit unit indices");
  int64_t partials = 1;  // the most CTAs that share a row block: the split-K partial slots of the workspace
  if (groups_per_split > 0) {
    TORCH_CHECK(groups_per_split % super == 0, "bad plan");
    partials = (codes.size(1) + groups_per_split - 1) / groups_per_split;
    TORCH_CHECK(ctas == row_blocks * partials, "bad plan");
  } else {
    const auto contributor = [&](int64_t u) { return ((u + 1) * ctas - 1) / units; };
    for (int64_t b = 0; b < row_blocks; ++b) {
      partials = std::max(partials, contributor((b + 1) * steps - 1) - contributor(b * steps) + 1);
    }
  }
  TORCH_CHECK(cluster == 1 || (groups_per_split > 0 && cluster == partials && cluster <= aqlm_ctx::kMaxCluster &&
                                at::cuda::getDeviceProperties(x.get_device())->major >= 9),
              "bad plan: a cluster is the 2 to ", aqlm_ctx::kMaxCluster, " split-K CTAs of a row block, on sm_90+");
  const int64_t slots = cluster > 1 ? 1 : partials;  // the workspace's partial slots (a cluster sums in shared memory)
  check_counters(counters, slots, row_blocks);

  const c10::cuda::CUDAGuard guard(x.device());
  auto [y, workspace] = outputs(x, out_features, slots);
  auto p = decode_params(x, codes, codebooks, scales, bias, counters, y, workspace, partials, groups_per_split,
                         window_groups);
  p.x_slots = aqlm_ctx::decode_x_slots(16 / num_codebooks, p.window_groups);
  p.tiles = static_cast<int>(ctas);
  p.cluster = static_cast<int>(cluster);
  p.sum_kernel = sum_kernel && cluster == 1 && partials > 1;
  const cudaError_t err = aqlm_ctx::decode_launch(p, num_codebooks, x.scalar_type() == at::kBFloat16,
                                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlm_ctx decode kernel: ", cudaGetErrorString(err));
  return y;
}

// 1x16: `warps` per CTA (rows 16 x warps), `grid` persistent CTAs over row blocks x splits (kGatherCluster: rounded up
// to whole clusters), `gather` a Gather1x16 with `cache_entries` per CTA for kGatherShared / kGatherCluster,
// `carveout` the shared-memory share of L1 in percent.
torch::Tensor decode_1x16(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                          const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                          const torch::Tensor& counters, int64_t splits, int64_t groups_per_split,
                          int64_t window_groups, int64_t warps, int64_t grid, int64_t gather, int64_t cache_entries,
                          int64_t carveout) {
  TORCH_CHECK(codebooks.size(0) == 1, "one codebook");
  check_layer(x, codes, codebooks, scales, bias, 65536, 2);
  const int64_t out_features = codes.size(0);
  const int64_t tokens = x.size(0);
  TORCH_CHECK(tokens >= 1 && tokens <= 32, "1 to 32 tokens");
  TORCH_CHECK(warps >= 1 && warps <= aqlm_ctx::kMaxWarps1x16, "1 to ", aqlm_ctx::kMaxWarps1x16, " warps");
  const int64_t row_blocks = (out_features + 16 * warps - 1) / (16 * warps);
  check_counters(counters, splits, row_blocks);
  TORCH_CHECK(groups_per_split % 32 == 0 && window_groups % 32 == 0 && window_groups > 0, "bad plan");
  TORCH_CHECK(splits == (codes.size(1) + groups_per_split - 1) / groups_per_split, "bad plan");
  TORCH_CHECK(grid >= 1 && carveout >= 0 && carveout <= 100, "bad plan");
  TORCH_CHECK(gather >= aqlm_ctx::kGatherL1 && gather <= aqlm_ctx::kGatherCluster, "gather mode 0 to 3");
  const bool cluster = gather == aqlm_ctx::kGatherCluster;
  const bool cached = gather == aqlm_ctx::kGatherShared || cluster;
  const int64_t copies = cluster ? aqlm_ctx::kCluster1x16 : 1;  // CTAs whose caches together hold distinct entries
  TORCH_CHECK(cached ? cache_entries >= (cluster ? 1 : 0) && cache_entries * copies <= 65536 : cache_entries == 0,
              "codebook cache entries: up to 65536 in all with gather modes 2 and 3 (at least 1 with 3), none "
              "otherwise");
  TORCH_CHECK(!cluster || at::cuda::getDeviceProperties(x.get_device())->major >= 9, "gather mode 3 needs sm_90+");

  const c10::cuda::CUDAGuard guard(x.device());
  auto [y, workspace] = outputs(x, out_features, splits);
  auto p = decode_params(x, codes, codebooks, scales, bias, counters, y, workspace, splits, groups_per_split,
                         window_groups);
  p.x_slots = aqlm_ctx::decode_x_slots(8, p.window_groups);
  p.rows_per_cta = static_cast<int>(16 * warps);
  p.tiles = static_cast<int>(row_blocks * splits);
  p.cache_entries = static_cast<int>(cache_entries);
  int64_t ctas = std::min<int64_t>(grid, p.tiles);
  if (cluster) ctas = (ctas + aqlm_ctx::kCluster1x16 - 1) / aqlm_ctx::kCluster1x16 * aqlm_ctx::kCluster1x16;
  const cudaError_t err = aqlm_ctx::decode_1x16_launch(p, static_cast<int>(gather), x.scalar_type() == at::kBFloat16,
                                                       static_cast<int>(ctas), static_cast<int>(carveout),
                                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlm_ctx 1x16 decode kernel: ", cudaGetErrorString(err));
  return y;
}

// Tiles of 128 rows x `token_tile` tokens; tiles [0, whole_tiles) take one CTA each, the others `splits` CTAs of
// `stages_per_split` 64-feature stages each, whose partials a second kernel sums (see PrefillParams).
torch::Tensor prefill(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
                      const torch::Tensor& scales, const std::optional<torch::Tensor>& bias, int64_t token_tile,
                      int64_t splits, int64_t stages_per_split, int64_t whole_tiles) {
  const int num_codebooks = static_cast<int>(codebooks.size(0));
  TORCH_CHECK(num_codebooks == 1 || num_codebooks == 2, "1 or 2 codebooks");
  check_layer(x, codes, codebooks, scales, bias, 256, 1);
  TORCH_CHECK(codes.size(1) % 8 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(token_tile == 64 || token_tile == 128 || token_tile == 256, "token tile 64, 128 or 256");
  const int64_t out_features = codes.size(0);
  const int64_t tokens = x.size(0);
  const int64_t stages = codes.size(1) / 8;
  TORCH_CHECK(tokens >= 1 && stages_per_split >= 1 && splits == (stages + stages_per_split - 1) / stages_per_split,
              "bad plan");
  const int64_t row_blocks = (out_features + aqlm_ctx::kPrefillRows - 1) / aqlm_ctx::kPrefillRows;
  const int64_t tiles = row_blocks * ((tokens + token_tile - 1) / token_tile);
  TORCH_CHECK(whole_tiles >= 0 && whole_tiles <= tiles, "bad plan");
  TORCH_CHECK(aqlm_ctx::prefill_ctas(tiles, whole_tiles, splits) < (int64_t{1} << 31), "too many tiles");

  const c10::cuda::CUDAGuard guard(x.device());
  auto [y, workspace] = outputs(x, out_features, splits);
  aqlm_ctx::PrefillParams p{};
  fill_layer(p, x, codes, codebooks, scales, bias, y, workspace, splits);
  p.row_blocks = static_cast<int>(row_blocks);
  p.whole_tiles = static_cast<int>(whole_tiles);
  p.stages_per_split = static_cast<int>(stages_per_split);
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
  m.def("decode_1x16", &decode_1x16, "AQLM 1x16 decode matmul (1-32 tokens)");
  m.def("prefill", &prefill, "AQLM 2x8 / 1x8 prefill matmul (wgmma, sm_90a)");
  m.def("dequantize", &dequantize, "AQLM 2x8 / 1x8 / 1x16 weight as a dense matrix");
}
