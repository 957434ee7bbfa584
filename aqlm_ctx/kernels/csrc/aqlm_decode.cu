// Decode kernels for AQLM layers with 8-bit codebooks (2x8 and 1x8, in_group_size 8, out_group_size 1).
//
// One launch computes y = (x @ W.T) * scales + bias for 1-32 tokens. Each CTA owns kRowsPerCta output rows and a
// range of input groups (split-K when there are too few row blocks to fill the GPU):
// * the codebooks are staged once into shared memory, 8 copies of each 16-byte entry, and lane l reads copy l % 8,
//   so every quarter-warp's 16-byte loads hit 8 different bank groups whatever the codes are;
// * codes stream from global memory with 16-byte loads (one load = 8 groups of one row for 2 codebooks, 16 for 1),
//   one superstep ahead, bypassing L1;
// * x is staged window by window in shared memory (padded against bank conflicts) and shared by all warps;
// * each thread decodes whole 8-element groups into registers, which are exactly the A operands of
//   mma.m16n8k16 once the reduction dimension is permuted (thread quad q owns groups 8q.. / 16q.. of a load, and
//   x is read in the same permuted order), so tokens go through tensor cores and every decoded group is reused for
//   all tokens of the launch;
// * fp32 accumulation; scales and bias are applied in the epilogue. With split-K every CTA writes an fp32
//   partial, and the last CTA of a row block (a ticket counter that resets itself) sums the partials in split order,
//   so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "aqlm_decode.h"

namespace aqlm_ctx {
namespace {

__device__ __forceinline__ uint4 load_stream(const uint8_t* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Byte offset of codebook entry `byte` of `codes` (entries are 8 copies x 16 bytes = 128 bytes apart).
__device__ __forceinline__ uint32_t entry_offset(const uint4& codes, int byte) {
  return ((word(codes, byte / 4) >> (8 * (byte % 4))) & 0xffu) * 128u;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (kBf16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(0x3f803f80u), "r"(b));  // a * 1 + b
  } else {
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
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

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// C codebooks of 256 entries; NT tiles of 8 tokens; kBf16 selects bf16 (else fp16) activations and codebooks.
template <int C, int NT, bool kBf16>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(const DecodeParams p) {
  using scalar_t = std::conditional_t<kBf16, __nv_bfloat16, __half>;
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
  const int g_begin = blockIdx.y * p.groups_per_split;
  const int g_end = min(g_begin + p.groups_per_split, p.groups);
  const int row_base = blockIdx.x * kRowsPerCta + (tid / 32) * kRowsPerWarp + row_in_tile;

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
  load_codes(cur, g_begin);  // in flight while the codebooks are staged

  const uint4* codebooks = static_cast<const uint4*>(p.codebooks);
  for (int i = tid; i < C * 256; i += kThreads) {
    const uint4 v = codebooks[i];
#pragma unroll
    for (int r = 0; r < 8; ++r) smem[8 * i + ((r + i) & 7)] = v;  // rotated: no bank conflicts while staging
  }

  // x[:, w0 : w0 + window) into shared memory, zero-padded to whole supersteps.
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  auto stage_x = [&](int w0, int w_len) {
    const int w_pad = (w_len + kSuper - 1) / kSuper * kSuper;
    for (int i = tid; i < p.tokens * w_pad; i += kThreads) {
      const int n = i / w_pad;
      const int j = i - n * w_pad;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (j < w_len) v = *reinterpret_cast<const uint4*>(x + n * p.x_stride + static_cast<int64_t>(w0 + j) * 8);
      sh_x[n * p.x_slots + j + j / 8] = v;
    }
  };

  float acc[kTilesPerWarp][NT][4] = {};
  for (int w0 = g_begin; w0 < g_end; w0 += p.window_groups) {
    const int w_len = min(p.window_groups, g_end - w0);
    __syncthreads();
    stage_x(w0, w_len);
    __syncthreads();
    for (int s0 = 0; s0 < w_len; s0 += kSuper) {
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
    }
  }

  // Accumulator element i of tile (t, nt): row row_base + 16 t + 8 (i / 2), token 8 nt + 2 quad + i % 2.
  const scalar_t* scales = static_cast<const scalar_t*>(p.scales);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.y);
  if (p.splits == 1) {
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row_base + 16 * t + 8 * (i / 2);
        if (row >= p.out_features) continue;
        const float scale = to_float(scales[row]);
        const float shift = bias != nullptr ? to_float(bias[row]) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = 8 * nt + 2 * quad + i % 2;
          if (n < p.tokens) y[static_cast<int64_t>(n) * p.out_features + row] = from_float<scalar_t>(acc[t][nt][i] * scale + shift);
        }
      }
    }
    return;
  }
  const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
  float* partial = p.workspace + blockIdx.y * split_size;
#pragma unroll
  for (int t = 0; t < kTilesPerWarp; ++t) {
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
  __threadfence();
  __syncthreads();
  if (tid == 0) sh_last = atomicAdd(&p.counters[blockIdx.x], 1) == p.splits - 1;
  __syncthreads();
  if (!sh_last) return;
  __threadfence();
  const int first_row = blockIdx.x * kRowsPerCta;
  for (int i = tid; i < p.tokens * kRowsPerCta; i += kThreads) {
    const int n = i / kRowsPerCta;
    const int row = first_row + i % kRowsPerCta;
    if (row >= p.out_features) continue;
    const float* src = p.workspace + static_cast<int64_t>(n) * p.out_features + row;
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) sum += __ldcg(src + s * split_size);
    const float shift = bias != nullptr ? to_float(bias[row]) : 0.0f;
    y[static_cast<int64_t>(n) * p.out_features + row] = from_float<scalar_t>(sum * to_float(scales[row]) + shift);
  }
  if (tid == 0) p.counters[blockIdx.x] = 0;
}

template <int C, int NT, bool kBf16>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const int smem = decode_smem_bytes(C, p);
  auto kernel = decode_kernel<C, NT, kBf16>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.out_features + kRowsPerCta - 1) / kRowsPerCta, p.splits);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int C, bool kBf16>
cudaError_t launch_tokens(const DecodeParams& p, cudaStream_t stream) {
  if (p.tokens <= 8) return launch<C, 1, kBf16>(p, stream);
  if (p.tokens <= 16) return launch<C, 2, kBf16>(p, stream);
  if (p.tokens <= 32) return launch<C, 4, kBf16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t decode_launch(const DecodeParams& p, int num_codebooks, bool bf16, cudaStream_t stream) {
  if (num_codebooks == 2) return bf16 ? launch_tokens<2, true>(p, stream) : launch_tokens<2, false>(p, stream);
  if (num_codebooks == 1) return bf16 ? launch_tokens<1, true>(p, stream) : launch_tokens<1, false>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace aqlm_ctx
