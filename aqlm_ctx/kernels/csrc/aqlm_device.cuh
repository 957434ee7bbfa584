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

// The `entries` 16-byte codebook entries into shared memory, 8 copies of each (entry e at smem[8 e .. 8 e + 7]), by
// threads `first`, `first + stride`, ...; the copies are written in rotated order, so the stores hit no bank conflicts.
// Callers synchronise afterwards.
__device__ __forceinline__ void stage_codebooks(uint4* smem, const void* codebooks, int entries, int first,
                                                int stride) {
  const uint4* source = static_cast<const uint4*>(codebooks);
  for (int i = first; i < entries; i += stride) {
    const uint4 v = source[i];
#pragma unroll
    for (int r = 0; r < 8; ++r) smem[8 * i + ((r + i) & 7)] = v;
  }
}

// One output of row `row`: sum * scale + bias, rounded to scalar_t.
template <typename scalar_t>
__device__ __forceinline__ scalar_t scale_and_shift(const LayerParams& p, int row, float sum) {
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  const float shift = bias != nullptr ? convert<float>(bias[row]) : 0.0f;
  return convert<scalar_t>(sum * convert<float>(static_cast<const scalar_t*>(p.scales)[row]) + shift);
}

// The sum in slot order of one output's `partials` fp32 partials src[0], src[stride], ... (read through L2, 8 loads
// in flight), so that every path that sums split-K partials gives the same result.
__device__ __forceinline__ float sum_partials(const float* src, int64_t stride, int partials) {
  float sum = 0.0f;
  for (int s0 = 0; s0 < partials; s0 += 8) {
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = s0 + k < partials ? __ldcg(src + (s0 + k) * stride) : 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (s0 + k < partials) sum += v[k];
    }
  }
  return sum;
}

// Host side: launches `kernel` on `stream` with `smem` bytes of dynamic shared memory (opted in, as above 48 KiB it
// must be), when `carveout` >= 0 that shared-memory share of L1 in percent, and when `cluster` > 1 as thread-block
// clusters of `cluster` consecutive CTAs. Returns the CUDA error.
template <typename Params>
inline cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, int threads, int smem, cudaStream_t stream,
                                 const Params& p, int carveout = -1, int cluster = 1) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess && carveout >= 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout);
  }
  if (err != cudaSuccess) return err;
  if (cluster > 1) {
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, p);
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace aqlm_ctx
