// Device helpers that the decode (aqlm_decode.cu) and prefill (aqlm_prefill.cu) kernels share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "aqlm_layer.h"

namespace aqlm_ctx {

template <bool kBf16>
using Scalar = std::conditional_t<kBf16, __nv_bfloat16, __half>;

// Scalar conversions between float and fp16 / bf16 (round to nearest).
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<From, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// a + b on two packed fp16 or bf16 values.
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

// Split-K, after every thread of this CTA wrote its fp32 partial to p.workspace (slot k of `partials` at
// p.workspace + k * tokens * out_features): whether this CTA is the last of the tile's `partials` CTAs to get here
// (a ticket counter). Every thread of the CTA calls it (it has barriers).
__device__ __forceinline__ bool last_of_splits(const LayerParams& p, int tile, int partials, int& sh_last) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sh_last = atomicAdd(&p.counters[tile], 1) == partials - 1;
  __syncthreads();
  return sh_last;
}

// Then, in the last CTA: threads [0, workers) sum the partials of rows [row0, row0 + rows) x tokens
// [n0, n0 + n_count) in slot order, so results are deterministic, write y = sum * scale + bias, and reset the
// ticket counter. Each thread sums 4 quads of 4 consecutive rows at a time (16-byte loads when out_features is a
// multiple of 4), so 4 loads per slot are in flight, not one.
template <typename scalar_t>
__device__ __forceinline__ void sum_partials(const LayerParams& p, int tile, int partials, int row0, int rows, int n0,
                                             int n_count, int workers) {
  __threadfence();
  const scalar_t* scales = static_cast<const scalar_t*>(p.scales);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.y);
  const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
  const int row_count = min(rows, p.out_features - row0);
  const int quads = (row_count + 3) / 4;
  const int total = quads * min(n_count, p.tokens - n0);
  const bool vector = p.out_features % 4 == 0;
  constexpr int kQuads = 4;  // per thread and pass
  for (int base = threadIdx.x; base < total; base += kQuads * workers) {
    float sum[kQuads][4] = {};
    for (int s = 0; s < partials; ++s) {
#pragma unroll
      for (int u = 0; u < kQuads; ++u) {
        const int i = base + u * workers;
        if (i >= total) continue;
        const int row = row0 + 4 * (i % quads);
        const float* src = p.workspace + s * split_size + static_cast<int64_t>(n0 + i / quads) * p.out_features + row;
        if (vector) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(src));
          sum[u][0] += v.x;
          sum[u][1] += v.y;
          sum[u][2] += v.z;
          sum[u][3] += v.w;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (row + j < p.out_features) sum[u][j] += __ldcg(src + j);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kQuads; ++u) {
      const int i = base + u * workers;
      if (i >= total) continue;
      const int row = row0 + 4 * (i % quads);
      const int64_t at = static_cast<int64_t>(n0 + i / quads) * p.out_features + row;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (row + j >= row0 + row_count) continue;
        const float shift = bias != nullptr ? convert<float>(bias[row + j]) : 0.0f;
        y[at + j] = convert<scalar_t>(sum[u][j] * convert<float>(scales[row + j]) + shift);
      }
    }
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;
}

// Both, by every thread of the CTA.
template <typename scalar_t>
__device__ __forceinline__ void sum_splits(const LayerParams& p, int tile, int partials, int row0, int rows, int n0,
                                           int n_count, int& sh_last) {
  if (last_of_splits(p, tile, partials, sh_last)) {
    sum_partials<scalar_t>(p, tile, partials, row0, rows, n0, n_count, blockDim.x);
  }
}

// Host side: launches `kernel` on `stream` with `smem` bytes of dynamic shared memory (opted in, as above 48 KiB it
// must be) and, when `carveout` >= 0, that shared-memory share of L1 in percent. Returns the CUDA error.
template <typename Params>
inline cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, int threads, int smem, cudaStream_t stream,
                                 const Params& p, int carveout = -1) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess && carveout >= 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout);
  }
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace aqlm_ctx
