// Prefill (many-token) kernels for AQLM layers: shared declarations of aqlm_prefill.cu (kernels, compiled by nvcc
// without torch headers) and aqlm_decode.cpp (the torch binding).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "aqlm_layer.h"

namespace aqlm_ctx {

constexpr int kPrefillConsumerWarps = 8;  // two warpgroups, 64 output rows each
constexpr int kPrefillProducerThreads = 128;  // one warpgroup streaming tiles into shared memory
constexpr int kPrefillThreads = 32 * kPrefillConsumerWarps + kPrefillProducerThreads;
constexpr int kPrefillRows = 128;     // output rows one CTA owns
constexpr int kPrefillStageK = 64;    // input features per pipeline stage (8 groups)
constexpr int kPrefillStages = 4;     // shared-memory pipeline depth

// Tiles (128 rows x token_tile tokens) are numbered row block first: tile t = row block t % row_blocks, token block
// t / row_blocks. Tiles [0, whole_tiles) take one CTA each over every stage; the others (all of them when
// whole_tiles is 0) take `splits` CTAs each, of stages_per_split stages (split-K). The grid is one-dimensional:
// whole_tiles + (tiles - whole_tiles) x splits CTAs, so a launch can fill its last wave with split tiles.
struct PrefillParams : LayerParams {  // groups is a multiple of 8; a second kernel sums the splits
  int row_blocks;         // ceil(out_features / kPrefillRows)
  int whole_tiles;        // tiles computed by one CTA each
  int stages_per_split;   // pipeline stages (64 input features each) per split
};

// CTAs of a prefill launch over `tiles` tiles (see PrefillParams).
inline int64_t prefill_ctas(int64_t tiles, int64_t whole_tiles, int64_t splits) {
  return whole_tiles + (tiles - whole_tiles) * splits;
}

// Shared-memory bytes of a prefill launch with `token_tile` tokens per CTA: codebooks, the stage ring, two mbarriers
// per stage and up to 1 KiB to align the ring to 1024 bytes.
inline int prefill_smem_bytes(int num_codebooks, int token_tile) {
  return num_codebooks * 256 * 128 + kPrefillStages * (token_tile * kPrefillStageK * 2 + kPrefillRows * 8 * num_codebooks) +
         16 * kPrefillStages + 1024;
}

// Launches the wgmma prefill kernel (sm_90a only) for num_codebooks in {1, 2}, fp16 or bf16, token_tile in
// {64, 128, 256}: prefill_ctas CTAs (see PrefillParams). Returns the CUDA error of the launch.
cudaError_t prefill_launch(const PrefillParams& p, int num_codebooks, bool bf16, int token_tile, cudaStream_t stream);

// W = scales * sum_c codebooks[c][codes] as a dense [out_features, groups * 8] matrix (for any GPU): 8-bit codes with
// 1 or 2 codebooks of 256 entries, or 16-bit codes with 1 codebook of 65536.
cudaError_t dequantize_launch(const void* codes, const void* codebooks, const void* scales, void* w, int64_t out_features,
                              int64_t groups, int num_codebooks, int nbits, bool bf16, cudaStream_t stream);

}  // namespace aqlm_ctx
