// Decode (few-token) kernels for AQLM layers with 8-bit codebooks: shared declarations of aqlm_decode.cu (kernels,
// compiled by nvcc without torch headers) and aqlm_decode.cpp (the torch binding).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace aqlm_ctx {

constexpr int kWarps = 8;                        // warps per CTA
constexpr int kTilesPerWarp = 2;                 // m16 row tiles per warp
constexpr int kRowsPerWarp = 16 * kTilesPerWarp;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;  // output rows one CTA owns

struct DecodeParams {
  const void* x;          // [tokens, in_features], rows 16-byte aligned, x_stride elements apart
  const uint8_t* codes;   // [out_features, groups, num_codebooks] contiguous, unsigned bytes
  const void* codebooks;  // [num_codebooks, 256, 1, 8] contiguous
  const void* scales;     // [out_features]
  const void* bias;       // [out_features] or nullptr
  void* y;                // [tokens, out_features] contiguous
  float* workspace;       // [splits, tokens, out_features] when splits > 1
  int* counters;          // [row blocks], all zero between launches (the last CTA of a row block resets its own)
  int64_t x_stride;
  int tokens;
  int out_features;
  int groups;             // in_features / 8
  int groups_per_split;   // multiple of the superstep (32 groups for 2 codebooks, 64 for 1)
  int window_groups;      // groups of x staged in shared memory at a time, multiple of the superstep
  int x_slots;            // shared-memory stride between tokens in 16-byte slots
  int splits;
};

// Shared-memory stride between tokens (16-byte slots) for a window: 9 slots per 8 groups, padded so that the
// quarter-warps' 16-byte reads of x hit 8 different bank groups (odd stride for 1 codebook, 4 mod 8 for 2).
inline int decode_x_slots(int num_codebooks, int window_groups) {
  int slots = window_groups + window_groups / 8;
  while (slots % 8 != (num_codebooks == 2 ? 4 : 1)) ++slots;
  return slots;
}

// Shared-memory bytes of a launch: the codebooks replicated 8 times, then the x window.
inline int decode_smem_bytes(int num_codebooks, const DecodeParams& p) {
  return (num_codebooks * 256 * 8 + p.tokens * p.x_slots) * 16;
}

// Launches the kernel for (num_codebooks in {1, 2}) x (bf16 or fp16) x (token tiles of 8: 1, 2 or 4) on `stream`.
// Returns the CUDA error of the launch.
cudaError_t decode_launch(const DecodeParams& p, int num_codebooks, bool bf16, cudaStream_t stream);

}  // namespace aqlm_ctx
