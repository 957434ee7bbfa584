// Decode kernels for AQLM layers (in_group_size 8, out_group_size 1): 2x8 and 1x8 (8-bit codebooks in shared memory),
// and 1x16 (one codebook of 65536 entries, read through L1 / L2; see decode_1x16_kernel below).
//
// One launch computes y = (x @ W.T) * scales + bias for 1-32 tokens. Each CTA works on blocks of kRowsPerCta output
// rows and ranges of input groups: one row block, all of it or one split of it (split-K), or an even share of all
// (row block, superstep) units that may span row blocks (stream-K, where split-K would leave SMs idle):
// * the codebooks are staged once into shared memory, 8 copies of each 16-byte entry, and lane l reads copy l % 8,
//   so every quarter-warp's 16-byte loads hit 8 different bank groups whatever the codes are;
// * codes stream from global memory with 16-byte loads (one load = 8 groups of one row for 2 codebooks, 16 for 1),
//   one superstep ahead, bypassing L1;
// * x is staged window by window in shared memory (padded against bank conflicts) and shared by all warps;
// * each thread decodes whole 8-element groups into registers, which are exactly the A operands of
//   mma.m16n8k16 once the reduction dimension is permuted (thread quad q owns groups 8q.. / 16q.. of a load, and
//   x is read in the same permuted order), so tokens go through tensor cores and every decoded group is reused for
//   all tokens of the launch;
// * fp32 accumulation; scales and bias are applied in the epilogue. When a row block has several CTAs, each writes an
//   fp32 partial, and the last to finish (a ticket counter that resets itself) sums the partials in a fixed order,
//   so results are deterministic; or, when the plan makes a row block's split-K CTAs one thread-block cluster (sm_90+),
//   they sum the partials together through distributed shared memory, in the same order (cluster_store_output); or,
//   from 9 tokens on, a second kernel sums them, one thread per output (reduce_splits_kernel).
#include <type_traits>

#include "aqlm_decode.h"
#include "aqlm_device.cuh"

namespace aqlm_ctx {
namespace {

__device__ __forceinline__ uint4 load_stream(const uint8_t* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// A barrier of every thread of the thread-block cluster; shared-memory writes before it are visible to the cluster's
// CTAs after it (sm_90+; a no-op below).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// This CTA's rank in its thread-block cluster (sm_90+; 0 below).
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
  return rank;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Byte offset of codebook entry `byte` of `codes` (entries are 8 copies x 16 bytes = 128 bytes apart).
__device__ __forceinline__ uint32_t entry_offset(const uint4& codes, int byte) {
  return ((word(codes, byte / 4) >> (8 * (byte % 4))) & 0xffu) * 128u;
}

template <bool kBf16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// x[:, w0 : w0 + w_len) into shared memory (token n from slot n * x_slots, 9 slots per 8 groups), zero-padded to whole
// supersteps of kSuper groups. Callers synchronise before and after.
template <int kSuper, typename scalar_t>
__device__ __forceinline__ void stage_x(uint4* sh_x, const DecodeParams& p, int w0, int w_len) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int w_pad = (w_len + kSuper - 1) / kSuper * kSuper;
  for (int i = threadIdx.x; i < p.tokens * w_pad; i += blockDim.x) {
    const int n = i / w_pad;
    const int j = i - n * w_pad;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (j < w_len) v = *reinterpret_cast<const uint4*>(x + n * p.x_stride + static_cast<int64_t>(w0 + j) * 8);
    sh_x[n * p.x_slots + j + j / 8] = v;
  }
}

// Stages x window by window over groups [g_begin, g_end) and calls step(w0, s0) for every superstep s0 of window w0.
template <int kSuper, typename scalar_t, typename Step>
__device__ __forceinline__ void over_windows(uint4* sh_x, const DecodeParams& p, int g_begin, int g_end, Step&& step) {
  for (int w0 = g_begin; w0 < g_end; w0 += p.window_groups) {
    const int w_len = min(p.window_groups, g_end - w0);
    __syncthreads();
    stage_x<kSuper, scalar_t>(sh_x, p, w0, w_len);
    __syncthreads();
    for (int s0 = 0; s0 < w_len; s0 += kSuper) step(w0, s0);
  }
}

// Split-K without a second kernel, after every thread of this CTA wrote its fp32 partial to p.workspace (slot k of
// `partials` at p.workspace + k * tokens * out_features): the last of row block `block`'s `partials` CTAs to get here
// (a ticket counter, which it then resets) sums the partials of rows [row0, row0 + rows) for every token in slot order
// (sum_partials), so results are deterministic, and writes y = sum * scale + bias. Every thread of the CTA calls it
// (it has barriers).
template <typename scalar_t>
__device__ __forceinline__ void sum_splits(const DecodeParams& p, int block, int partials, int row0, int rows,
                                           int& sh_last) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sh_last = atomicAdd(&p.counters[block], 1) == partials - 1;
  __syncthreads();
  if (!sh_last) return;
  __threadfence();
  scalar_t* y = static_cast<scalar_t*>(p.y);
  const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
  for (int i = threadIdx.x; i < p.tokens * rows; i += blockDim.x) {
    const int row = row0 + i % rows;
    if (row >= p.out_features) continue;
    const int64_t at = static_cast<int64_t>(i / rows) * p.out_features + row;
    y[at] = scale_and_shift<scalar_t>(p, row, sum_partials(p.workspace + at, split_size, partials));
  }
  if (threadIdx.x == 0) p.counters[block] = 0;
}

// The epilogue for kTiles m16 row tiles x NT token tiles of accumulators per thread (element i of tile (t, nt): row
// row_base + 16 t + 8 (i / 2), token 8 nt + 2 quad + i % 2) of row block `block`. When this CTA is the row block's
// only contributor (`partials` == 1) it writes y = acc * scale + bias; otherwise it writes its fp32 partial into
// workspace slot `slot` of `partials`, and the last contributor sums them in slot order (sum_splits), unless
// p.sum_kernel says that reduce_splits_kernel sums them after this kernel.
// Every thread of the CTA calls it (it has barriers when splitting).
template <typename scalar_t, int kTiles, int NT>
__device__ __forceinline__ void store_output(const DecodeParams& p, const float (&acc)[kTiles][NT][4], int row_base,
                                             int quad, int block, int slot, int partials, int rows_per_cta,
                                             int& sh_last) {
  const scalar_t* scales = static_cast<const scalar_t*>(p.scales);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.y);
  if (partials == 1) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row_base + 16 * t + 8 * (i / 2);
        if (row >= p.out_features) continue;
        const float scale = convert<float>(scales[row]);
        const float shift = bias != nullptr ? convert<float>(bias[row]) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = 8 * nt + 2 * quad + i % 2;
          if (n < p.tokens) y[static_cast<int64_t>(n) * p.out_features + row] = convert<scalar_t>(acc[t][nt][i] * scale + shift);
        }
      }
    }
    return;
  }
  const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
  float* partial = p.workspace + slot * split_size;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row_base + 16 * t + 8 * (i / 2);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = 8 * nt + 2 * quad + i % 2;
        if (row < p.out_features && n < p.tokens) partial[static_cast<int64_t>(n) * p.out_features + row] = acc[t][nt][i];
      }
    }
  }
  if (p.sum_kernel) return;
  sum_splits<scalar_t>(p, block, partials, block * rows_per_cta, rows_per_cta, sh_last);
}

// Stream-K: the CTA, of `ctas`, that holds work unit `u` of `units` (CTA i holds units [i units / ctas, (i + 1) units /
// ctas)).
__device__ __forceinline__ int contributor(int u, int ctas, int units) { return ((u + 1) * ctas - 1) / units; }

// Split-K through a thread-block cluster (p.cluster CTAs, one per split of row block `block`, cluster rank = split):
// each CTA puts its fp32 partial for the block's kRowsPerCta rows x tokens into its own shared memory (over the x
// window, which it no longer needs), then CTA r of the cluster sums outputs [r * share, (r + 1) * share) over all the
// cluster's partials, read through distributed shared memory in split order (the same sum as sum_splits), and writes
// y = sum * scale + bias. No workspace, no ticket, and the summing is spread over the whole cluster.
// Every thread of the CTA calls it (it has cluster barriers).
template <typename scalar_t, int kTiles, int NT>
__device__ __forceinline__ void cluster_store_output(const DecodeParams& p, const float (&acc)[kTiles][NT][4],
                                                     float* sh_partial, int local_row, int quad, int block) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __syncthreads();  // every warp is done reading x
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = 8 * nt + 2 * quad + i % 2;
        if (n < p.tokens) sh_partial[n * kRowsPerCta + local_row + 16 * t + 8 * (i / 2)] = acc[t][nt][i];
      }
    }
  }
  cluster_sync();
  const uint32_t rank = cluster_rank();
  scalar_t* y = static_cast<scalar_t*>(p.y);
  const int outputs = p.tokens * kRowsPerCta;
  const int share = (outputs + p.cluster - 1) / p.cluster;
  const int end = min(outputs, static_cast<int>(rank + 1) * share);
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(sh_partial));
  for (int i = static_cast<int>(rank) * share + static_cast<int>(threadIdx.x); i < end; i += blockDim.x) {
    const int row = block * kRowsPerCta + i % kRowsPerCta;
    float v[kMaxCluster];
#pragma unroll
    for (int k = 0; k < kMaxCluster; ++k) {
      v[k] = 0.0f;
      if (k < p.cluster) {
        uint32_t remote;
        asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local + i * 4u), "r"(k));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v[k]) : "r"(remote));
      }
    }
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxCluster; ++k) {
      if (k < p.cluster) sum += v[k];
    }
    if (row < p.out_features) {
      y[static_cast<int64_t>(i / kRowsPerCta) * p.out_features + row] = scale_and_shift<scalar_t>(p, row, sum);
    }
  }
  cluster_sync();
#endif
}

// The minimum CTAs per SM that __launch_bounds__ gives ptxas for each instantiation (0: none); it steers ptxas's
// register allocation (the plan assumes two CTAs per SM). 9-16 tokens: 2, which caps registers at 128 (uncapped, ~210
// registers leave one CTA per SM: 30-40% slower). 1x8 at 1-8 tokens: 1, with which ptxas schedules more shared-memory
// loads ahead (109 registers instead of 88, still two CTAs per SM; 6-10% faster on an H100, BENCHMARKS.md). 2x8 at
// 1-8 tokens: none (with 1, 142 registers and one CTA per SM, 10-25% slower). 17-32 tokens: none (150-162 registers).
template <int C, int NT>
constexpr int kDecodeMinCtas = NT == 2 ? 2 : (C == 1 && NT == 1 ? 1 : 0);

// C codebooks of 256 entries; NT tiles of 8 tokens; kBf16 selects bf16 (else fp16) activations and codebooks.
template <int C, int NT, bool kBf16>
__global__ void __launch_bounds__(kWarps * 32, kDecodeMinCtas<C, NT>) decode_kernel(const DecodeParams p) {
  using scalar_t = Scalar<kBf16>;
  constexpr int kGroupsPerLoad = 16 / C;  // groups in one 16-byte code load
  constexpr int kSuper = 4 * kGroupsPerLoad;  // groups one warp covers per superstep (4 quads x one load)
  constexpr int kThreads = kWarps * 32;
  extern __shared__ uint4 smem[];
  uint4* sh_x = smem + C * 256 * 8;
  const char* sh_cb = reinterpret_cast<const char*>(smem);
  __shared__ int sh_last;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int row_in_tile = lane / 4;
  const uint32_t copy = (lane % 8) * 16u;
  // Work units are supersteps of one row block, numbered row block after row block. With split-K
  // (p.groups_per_split > 0) CTA i takes split i % p.splits of row block i / p.splits. Otherwise (stream-K) the
  // units are split evenly over the grid: CTA i takes units [i W / G, (i + 1) W / G), in segments of one row block
  // each, and contributor(u, ...) is the CTA holding unit u.
  const int steps = (p.groups + kSuper - 1) / kSuper;
  const int units = (p.out_features + kRowsPerCta - 1) / kRowsPerCta * steps;  // units x CTAs < 2^31 (host check)
  const int ctas = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);
  const int split_steps = p.groups_per_split / kSuper;
  int u_begin, u_end;
  if (split_steps > 0) {
    u_begin = cta / p.splits * steps + cta % p.splits * split_steps;
    u_end = min(u_begin + split_steps, (cta / p.splits + 1) * steps);
  } else {
    u_begin = units * cta / ctas;
    u_end = units * (cta + 1) / ctas;
  }
#pragma unroll 1
  for (int u = u_begin; u < u_end;) {
    const int block = u / steps;
    const int segment_end = min(u_end, (block + 1) * steps);
    const int g_begin = (u - block * steps) * kSuper;
    const int g_end = min((segment_end - block * steps) * kSuper, p.groups);
    const int row_base = block * kRowsPerCta + (tid / 32) * kRowsPerWarp + row_in_tile;

    // This thread's rows: row_base + 16 * t + 8 * h (the two halves of each m16 tile).
    const uint8_t* code_ptr[kTilesPerWarp][2];
    bool row_ok[kTilesPerWarp][2];
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row_base + 16 * t + 8 * h;
        row_ok[t][h] = row < p.out_features;
        code_ptr[t][h] = p.codes + static_cast<int64_t>(row_ok[t][h] ? row : 0) * p.groups * C + quad * 16;
      }
    }
    auto load_codes = [&](uint4 (&dst)[kTilesPerWarp][2], int g) {
      const bool in_range = g + quad * kGroupsPerLoad < g_end;
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dst[t][h] = in_range && row_ok[t][h] ? load_stream(code_ptr[t][h] + static_cast<int64_t>(g) * C)
                                               : make_uint4(0, 0, 0, 0);
        }
      }
    };

    uint4 cur[kTilesPerWarp][2];
    load_codes(cur, g_begin);  // in flight while the codebooks are staged (first segment)

    if (u == u_begin) stage_codebooks(smem, p.codebooks, C * 256, tid, kThreads);

    float acc[kTilesPerWarp][NT][4] = {};
    over_windows<kSuper, scalar_t>(sh_x, p, g_begin, g_end, [&](int w0, int s0) {
        uint4 next[kTilesPerWarp][2];
        load_codes(next, w0 + s0 + kSuper);
#pragma unroll
        for (int s = 0; s < kGroupsPerLoad; ++s) {
          const int j = s0 + quad * kGroupsPerLoad + s;  // this thread's group in the window
          uint32_t b[NT][4];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int n = row_in_tile + 8 * nt;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (n < p.tokens) v = sh_x[n * p.x_slots + j + j / 8];
            b[nt][0] = v.x;
            b[nt][1] = v.y;
            b[nt][2] = v.z;
            b[nt][3] = v.w;
          }
#pragma unroll
          for (int t = 0; t < kTilesPerWarp; ++t) {
            uint32_t a[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              uint4 e = *reinterpret_cast<const uint4*>(sh_cb + entry_offset(cur[t][h], s * C) + copy);
              if constexpr (C == 2) {
                const uint4 e1 =
                    *reinterpret_cast<const uint4*>(sh_cb + 256 * 128 + entry_offset(cur[t][h], s * C + 1) + copy);
                e.x = add2<kBf16>(e.x, e1.x);
                e.y = add2<kBf16>(e.y, e1.y);
                e.z = add2<kBf16>(e.z, e1.z);
                e.w = add2<kBf16>(e.w, e1.w);
              }
              a[h][0] = e.x;
              a[h][1] = e.y;
              a[h][2] = e.z;
              a[h][3] = e.w;
            }
            // Elements 4k..4k+3 of the group go to mma k: thread quad q holds k-slots 2q, 2q+1, 2q+8, 2q+9.
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const uint32_t frag[4] = {a[0][2 * k], a[1][2 * k], a[0][2 * k + 1], a[1][2 * k + 1]};
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) mma<kBf16>(acc[t][nt], frag, b[nt][2 * k], b[nt][2 * k + 1]);
            }
          }
        }
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
          cur[t][0] = next[t][0];
          cur[t][1] = next[t][1];
        }
    });

    if (p.cluster > 1) {
      cluster_store_output<scalar_t, kTilesPerWarp, NT>(p, acc, reinterpret_cast<float*>(sh_x),
                                                        row_base - block * kRowsPerCta, quad, block);
      break;  // split-K: one row block per CTA
    }
    const int first = split_steps > 0 ? block * p.splits : contributor(block * steps, ctas, units);
    const int partials = split_steps > 0 ? p.splits : contributor((block + 1) * steps - 1, ctas, units) - first + 1;
    store_output<scalar_t, kTilesPerWarp, NT>(p, acc, row_base, quad, block, cta - first, partials, kRowsPerCta,
                                              sh_last);
    u = segment_end;
  }
}

template <int C, int NT, bool kBf16>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  return launch_kernel(decode_kernel<C, NT, kBf16>, dim3(p.tiles), kWarps * 32, decode_smem_bytes(C, p), stream, p,
                       -1, p.cluster);
}

// The split-K / stream-K sum as a kernel of its own, launched right after decode_kernel when p.sum_kernel: one
// thread per output (token-major), which sums its row block's partials in slot order as sum_splits does, so the
// results are the same. (From 9 tokens on, decode_kernel's last CTA per row block, alone summing tokens x
// kRowsPerCta outputs, was the tail of large layers.)
template <int C, bool kBf16>
__global__ void __launch_bounds__(256) reduce_splits_kernel(const DecodeParams p) {
  using scalar_t = Scalar<kBf16>;
  const int64_t outputs = static_cast<int64_t>(p.tokens) * p.out_features;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outputs) return;
  const int row = static_cast<int>(i % p.out_features);
  int partials = p.splits;
  if (p.groups_per_split == 0) {  // stream-K: the row block's contributors
    constexpr int kSuper = 64 / C;
    const int block = row / kRowsPerCta;
    const int steps = (p.groups + kSuper - 1) / kSuper;
    const int units = (p.out_features + kRowsPerCta - 1) / kRowsPerCta * steps;
    partials = contributor((block + 1) * steps - 1, p.tiles, units) - contributor(block * steps, p.tiles, units) + 1;
  }
  static_cast<scalar_t*>(p.y)[i] = scale_and_shift<scalar_t>(p, row, sum_partials(p.workspace + i, outputs, partials));
}

template <int C, bool kBf16>
cudaError_t launch_tokens(const DecodeParams& p, cudaStream_t stream) {
  const cudaError_t err = p.tokens <= 8    ? launch<C, 1, kBf16>(p, stream)
                          : p.tokens <= 16 ? launch<C, 2, kBf16>(p, stream)
                          : p.tokens <= 32 ? launch<C, 4, kBf16>(p, stream)
                                           : cudaErrorInvalidValue;
  if (err != cudaSuccess || !p.sum_kernel) return err;
  const int64_t outputs = static_cast<int64_t>(p.tokens) * p.out_features;
  reduce_splits_kernel<C, kBf16><<<static_cast<unsigned>((outputs + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}


// ---------------------------------------------------------------- 1x16: one codebook of 65536 entries (1 MiB)
//
// The codebook is too large for shared memory, so each 8-weight group is one random 16-byte read of it through L1 / L2
// (kGatherShared: the first cache_entries entries from a shared-memory copy instead; kGatherCluster: the first
// 2 x cache_entries from the copies of a two-CTA cluster, through distributed shared memory). Throughput is set by
// those scattered reads, so the kernel keeps many in flight: every warp owns one m16 row tile, each thread two rows (r
// and r + 8) of it; per superstep of 32 groups a thread loads 16 bytes of codes per row (8 groups, one step ahead, the
// step after that prefetched into L2) and issues its 16 codebook reads in two batches of 8, the second batch (and the
// next superstep's first) in flight while the previous one goes through the tensor cores. The decoded groups are
// mma.m16n8k16 A operands exactly as in decode_kernel, x comes from the same padded shared window, and the epilogue is
// store_output. CTAs are persistent: the grid loops over (row block, split) tiles.

// Codebook entry `code`: from `codebook` in global memory, or (kGatherShared) from this CTA's shared-memory copy of
// entries [0, cache_entries) at `sh_codebook`, or (kGatherCluster) from the copy of entries
// [r, r + 1) x cache_entries at `sh_codebook` in the shared memory of cluster CTA r (`magic` = ceil(2^32 /
// cache_entries), so that r = umulhi(code, magic) for every code < 65536).
template <int kGather>
__device__ __forceinline__ uint4 gather_1x16(const char* codebook, uint32_t sh_codebook, uint32_t code,
                                             uint32_t cache_entries, uint32_t magic) {
  const char* ptr = codebook + code * 16u;
  uint4 v;
  if constexpr (kGather == kGatherCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t owner = __umulhi(code, magic);
    asm volatile(
        "{\n\t.reg .pred p;\n\t.reg .b32 r;\n\tsetp.lt.u32 p, %4, %5;\n\t@p mapa.shared::cluster.u32 r, %6, %7;\n\t"
        "@p ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [r];\n\t@!p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%8];\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "r"(code), "r"(cache_entries * kCluster1x16), "r"(sh_codebook + (code - owner * cache_entries) * 16u),
          "r"(owner), "l"(ptr));
#else
    v = make_uint4(0, 0, 0, 0);
    __trap();  // the binding refuses kGatherCluster below sm_90
#endif
  } else if constexpr (kGather == kGatherL1) {
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else if constexpr (kGather == kGatherL2) {
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.lt.u32 p, %4, %5;\n\t@p ld.shared.v4.u32 {%0, %1, %2, %3}, [%6];\n\t"
        "@!p ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%7];\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "r"(code), "r"(cache_entries), "r"(sh_codebook + code * 16u), "l"(ptr));
  }
  return v;
}

template <int NT, bool kBf16, int kGather>
__global__ void __launch_bounds__(kMaxWarps1x16 * 32) decode_1x16_kernel(const DecodeParams p) {
  using scalar_t = Scalar<kBf16>;
  constexpr int kGroupsPerLoad = 8;           // 16-bit codes in one 16-byte load
  constexpr int kSuper = 4 * kGroupsPerLoad;  // groups one warp covers per superstep (4 quads x one load)
  constexpr int kBatch = kGroupsPerLoad / 2;  // groups per batch of codebook reads (x 2 rows)
  extern __shared__ uint4 smem[];
  constexpr bool kCached = kGather == kGatherShared || kGather == kGatherCluster;
  uint4* sh_x = smem + (kCached ? p.cache_entries : 0);
  __shared__ int sh_last;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int row_in_tile = lane / 4;
  const char* codebook = static_cast<const char*>(p.codebooks);
  const uint32_t sh_codebook = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t cache_entries = kCached ? p.cache_entries : 0u;
  const uint32_t magic =
      kGather == kGatherCluster ? static_cast<uint32_t>((0x100000000ull + cache_entries - 1) / cache_entries) : 0u;

  if constexpr (kCached) {
    uint32_t first = 0;  // this CTA's first cached entry
    if constexpr (kGather == kGatherCluster) first = cluster_rank() * cache_entries;
    for (int i = tid; i < p.cache_entries; i += blockDim.x) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sh_codebook + i * 16u),
                   "l"(codebook + (static_cast<int64_t>(first) + i) * 16)
                   : "memory");
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if constexpr (kGather == kGatherCluster) cluster_sync();  // every CTA's copy is in place
  }

  const int row_blocks = (p.out_features + p.rows_per_cta - 1) / p.rows_per_cta;
  for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int block = tile % row_blocks;
    const int split = tile / row_blocks;
    const int g_begin = split * p.groups_per_split;
    const int g_end = min(g_begin + p.groups_per_split, p.groups);
    const int row_base = block * p.rows_per_cta + (tid / 32) * 16 + row_in_tile;  // rows row_base + 8 h

    const uint8_t* code_ptr[2];
    bool row_ok[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row_base + 8 * h;
      row_ok[h] = row < p.out_features;
      code_ptr[h] = p.codes + static_cast<int64_t>(row_ok[h] ? row : 0) * p.groups * 2 + quad * 16;
    }
    auto load_codes = [&](uint4 (&dst)[2], int g) {
      const bool in_range = g + quad * kGroupsPerLoad < g_end;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        dst[h] = in_range && row_ok[h] ? load_stream(code_ptr[h] + static_cast<int64_t>(g) * 2) : make_uint4(0, 0, 0, 0);
      }
      // The superstep after: into L2 (one 64-byte row segment per quad 0 lane).
      const int g2 = g + kSuper;
      if (quad == 0 && g2 < g_end) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (row_ok[h]) asm volatile("prefetch.global.L2 [%0];" ::"l"(code_ptr[h] + static_cast<int64_t>(g2) * 2));
        }
      }
    };
    // Codebook entries of groups kBatch * half .. + kBatch - 1 of this thread's code loads, for both rows.
    auto gather = [&](uint4 (&dst)[2][kBatch], const uint4 (&codes)[2], auto half_constant) {
      constexpr int half = decltype(half_constant)::value;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int s = 0; s < kBatch; ++s) {
          const int k = kBatch * half + s;
          const uint32_t code = (word(codes[h], k / 2) >> (16 * (k % 2))) & 0xffffu;
          dst[h][s] = gather_1x16<kGather>(codebook, sh_codebook, code, cache_entries, magic);
        }
      }
    };
    float acc[1][NT][4] = {};
    auto multiply = [&](const uint4 (&e)[2][kBatch], int s0, auto half_constant) {
      constexpr int half = decltype(half_constant)::value;
#pragma unroll
      for (int s = 0; s < kBatch; ++s) {
        const int j = s0 + quad * kGroupsPerLoad + kBatch * half + s;  // this thread's group in the window
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = row_in_tile + 8 * nt;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (n < p.tokens) v = sh_x[n * p.x_slots + j + j / 8];
          // Elements 4k..4k+3 of the group go to mma k: thread quad q holds k-slots 2q, 2q+1, 2q+8, 2q+9.
          const uint32_t frag0[4] = {e[0][s].x, e[1][s].x, e[0][s].y, e[1][s].y};
          const uint32_t frag1[4] = {e[0][s].z, e[1][s].z, e[0][s].w, e[1][s].w};
          mma<kBf16>(acc[0][nt], frag0, v.x, v.y);
          mma<kBf16>(acc[0][nt], frag1, v.z, v.w);
        }
      }
    };
    using First = std::integral_constant<int, 0>;
    using Second = std::integral_constant<int, 1>;

    uint4 cur[2];
    uint4 batch0[2][kBatch];
    uint4 batch1[2][kBatch];
    load_codes(cur, g_begin);
    gather(batch0, cur, First{});
    over_windows<kSuper, scalar_t>(sh_x, p, g_begin, g_end, [&](int w0, int s0) {
        const int g_next = w0 + s0 + kSuper;
        uint4 next[2];
        load_codes(next, g_next);
        gather(batch1, cur, Second{});
        multiply(batch0, s0, First{});
        if (g_next < g_end) gather(batch0, next, First{});
        multiply(batch1, s0, Second{});
        cur[0] = next[0];
        cur[1] = next[1];
    });
    store_output<scalar_t, 1, NT>(p, acc, row_base, quad, block, split, p.splits, p.rows_per_cta, sh_last);
  }
  if constexpr (kGather == kGatherCluster) cluster_sync();  // no CTA leaves while others may read its copy
}

template <int NT, bool kBf16, int kGather>
cudaError_t launch_1x16(const DecodeParams& p, int grid, int carveout, cudaStream_t stream) {
  return launch_kernel(decode_1x16_kernel<NT, kBf16, kGather>, dim3(grid), p.rows_per_cta / 16 * 32,
                       decode_1x16_smem_bytes(p), stream, p, carveout, kGather == kGatherCluster ? kCluster1x16 : 1);
}

template <bool kBf16, int kGather>
cudaError_t launch_1x16_tokens(const DecodeParams& p, int grid, int carveout, cudaStream_t stream) {
  if (p.tokens <= 8) return launch_1x16<1, kBf16, kGather>(p, grid, carveout, stream);
  if (p.tokens <= 16) return launch_1x16<2, kBf16, kGather>(p, grid, carveout, stream);
  if (p.tokens <= 32) return launch_1x16<4, kBf16, kGather>(p, grid, carveout, stream);
  return cudaErrorInvalidValue;
}

template <bool kBf16>
cudaError_t launch_1x16_gather(const DecodeParams& p, int gather, int grid, int carveout, cudaStream_t stream) {
  if (gather == kGatherL1) return launch_1x16_tokens<kBf16, kGatherL1>(p, grid, carveout, stream);
  if (gather == kGatherL2) return launch_1x16_tokens<kBf16, kGatherL2>(p, grid, carveout, stream);
  if (gather == kGatherShared) return launch_1x16_tokens<kBf16, kGatherShared>(p, grid, carveout, stream);
  if (gather == kGatherCluster) return launch_1x16_tokens<kBf16, kGatherCluster>(p, grid, carveout, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t decode_launch(const DecodeParams& p, int num_codebooks, bool bf16, cudaStream_t stream) {
  if (num_codebooks == 2) return bf16 ? launch_tokens<2, true>(p, stream) : launch_tokens<2, false>(p, stream);
  if (num_codebooks == 1) return bf16 ? launch_tokens<1, true>(p, stream) : launch_tokens<1, false>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t decode_1x16_launch(const DecodeParams& p, int gather, bool bf16, int grid, int carveout, cudaStream_t stream) {
  return bf16 ? launch_1x16_gather<true>(p, gather, grid, carveout, stream)
              : launch_1x16_gather<false>(p, gather, grid, carveout, stream);
}

}  // namespace aqlm_ctx
