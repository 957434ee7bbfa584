// Decode (few-token) kernels for AQLM layers (2x8 / 1x8 with shared-memory codebooks, 1x16 with the codebook read
// through L1 / L2): shared declarations of aqlm_decode.cu (kernels, compiled by nvcc without torch headers) and
// aqlm_decode.cpp (the torch binding).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "aqlm_layer.h"

namespace aqlm_ctx {

constexpr int kWarps = 8;                        // warps per CTA
constexpr int kTilesPerWarp = 2;                 // m16 row tiles per warp
constexpr int kRowsPerWarp = 16 * kTilesPerWarp;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;  // output rows one CTA owns (2x8 / 1x8)
constexpr int kMaxWarps1x16 = 16;                // the 1x16 kernel: one m16 row tile per warp, 4 to 16 warps per CTA
constexpr int kMaxCluster = 8;                   // the most CTAs of a (portable) thread-block cluster
constexpr int kCluster1x16 = 2;                  // CTAs of a thread-block cluster in the 1x16 kernel's kGatherCluster

// How the 1x16 kernel reads codebook entries: through L1 (ld.global.nc), from L2 only (ld.global.cg), the first
// cache_entries from a shared-memory copy and the rest from L2, or (sm_90+) the first kCluster1x16 x cache_entries
// from the shared memory of a thread-block cluster's CTAs (CTA r holds entries [r, r + 1) x cache_entries, read
// through distributed shared memory) and the rest through L1.
enum Gather1x16 : int { kGatherL1 = 0, kGatherL2 = 1, kGatherShared = 2, kGatherCluster = 3 };

// splits (LayerParams): the most CTAs that share a row block, i.e. the workspace's partial slots (none when clustered).
struct DecodeParams : LayerParams {
  int* counters;          // split-K tickets, one per row block, all zero between launches (the last CTA of a row
                          // block resets its own); nullptr without a workspace
  int window_groups;      // groups of x staged in shared memory at a time, multiple of the superstep
  int x_slots;            // shared-memory stride between tokens in 16-byte slots
  int tiles;              // 2x8 / 1x8: CTAs of the grid; 1x16: row blocks x splits, which the grid loops over
  int groups_per_split;   // split-K: groups per split, a multiple of the superstep; 2x8 / 1x8: 0 for stream-K
  int cluster;            // 2x8 / 1x8 split-K: 1, or `splits` when a row block's CTAs form one thread-block cluster
  int sum_kernel;         // 2x8 / 1x8: 1 when reduce_splits_kernel sums the partials after the decode kernel
  // 1x16 only:
  int rows_per_cta;       // 16 x warps per CTA
  int cache_entries;      // kGatherShared / kGatherCluster: codebook entries each CTA stages in shared memory
};

// Shared-memory stride between tokens (16-byte slots) for a window: 9 slots per 8 groups, padded so that the
// quarter-warps' 16-byte reads of x hit 8 different bank groups (odd stride when one 16-byte code load holds 16
// groups (1x8), 4 mod 8 when it holds 8 (2x8, 1x16)).
inline int decode_x_slots(int groups_per_load, int window_groups) {
  int slots = window_groups + window_groups / 8;
  while (slots % 8 != (groups_per_load == 8 ? 4 : 1)) ++slots;
  return slots;
}

// Shared-memory bytes of a launch: the codebooks replicated 8 times, then the x window, which a cluster's CTAs reuse
// for their fp32 partials (kRowsPerCta per token).
inline int decode_smem_bytes(int num_codebooks, const DecodeParams& p) {
  const int partials = p.cluster > 1 ? p.tokens * kRowsPerCta / 4 : 0;
  return (num_codebooks * 256 * 8 + (p.tokens * p.x_slots > partials ? p.tokens * p.x_slots : partials)) * 16;
}

// Launches the kernel for (num_codebooks in {1, 2}) x (bf16 or fp16) x (token tiles of 8: 1, 2 or 4) on `stream`,
// and after it the split-K sum kernel when p.sum_kernel. Returns the CUDA error of the launches.
cudaError_t decode_launch(const DecodeParams& p, int num_codebooks, bool bf16, cudaStream_t stream);

// Shared-memory bytes of a 1x16 launch: the codebook cache (kGatherShared, kGatherCluster), then the x window.
inline int decode_1x16_smem_bytes(const DecodeParams& p) { return (p.cache_entries + p.tokens * p.x_slots) * 16; }

// Launches the 1x16 kernel (one codebook of 65536 entries) with `grid` persistent CTAs of p.rows_per_cta / 16 warps,
// `gather` a Gather1x16, for fp16 or bf16 and token tiles of 8 (1, 2 or 4); `carveout` is the shared-memory share of
// L1 (percent) to ask for. Returns the CUDA error of the launch.
cudaError_t decode_1x16_launch(const DecodeParams& p, int gather, bool bf16, int grid, int carveout, cudaStream_t stream);

}  // namespace aqlm_ctx
