// What every AQLM matmul launch (decode and prefill) passes its kernel: the layer's tensors and the split-K workspace.
// Shared by the kernels (compiled by nvcc without torch headers) and the torch binding in aqlm_decode.cpp.
#pragma once

#include <cstdint>

namespace aqlm_ctx {

struct LayerParams {
  const void* x;          // [tokens, in_features], rows 16-byte aligned, x_stride elements apart
  const uint8_t* codes;   // [out_features, groups, num_codebooks] contiguous, unsigned (1x16: 2 bytes a code)
  const void* codebooks;  // [num_codebooks, codebook_size, 1, 8] contiguous
  const void* scales;     // [out_features]
  const void* bias;       // [out_features] or nullptr
  void* y;                // [tokens, out_features] contiguous
  float* workspace;       // [splits, tokens, out_features] when splits > 1
  int64_t x_stride;
  int tokens;
  int out_features;
  int groups;             // in_features / 8
  int splits;
};

}  // namespace aqlm_ctx
