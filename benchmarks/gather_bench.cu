// Microbenchmark behind the 1x16 decode kernel's GATHER_CLUSTER mode: the rate of random 16-byte reads of a 1 MiB
// table (1x16's 65536-entry codebook) from L2 (ld.global.nc), and with the first cluster x entries of it split over
// the shared memory of a thread-block cluster's CTAs (CTA r holds entries [r, r + 1) x entries, read through
// distributed shared memory) and the rest from L2. Prints gathers per second and what that would mean for one
// 8192x28672 layer (29.36 M gathers). Results: benchmarks/results/gather_bench_h100.txt (BENCHMARKS.md, "1x16 decode").
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -std=c++17 benchmarks/gather_bench.cu -o gather_bench && ./gather_bench
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("ERR %s line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); return -1.0; } } while (0)

constexpr int kILP = 8;

template <bool kCluster>
__global__ void gather_kernel(const uint4* __restrict__ table, int iters, int per_cta, uint4* out) {
  extern __shared__ uint4 sh[];
  uint32_t cs = 1, rank = 0;
  const uint32_t magic = static_cast<uint32_t>((0x100000000ull + per_cta - 1) / per_cta);
  if (kCluster) {
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(cs));
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    for (int i = threadIdx.x; i < per_cta; i += blockDim.x) sh[i] = table[rank * per_cta + i];
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(sh));
  const uint32_t dsm_total = kCluster ? cs * per_cta : 0u;
  uint32_t s = (blockIdx.x * blockDim.x + threadIdx.x) * 2654435761u + 12345u;
  uint4 acc = make_uint4(0, 0, 0, 0);
  const char* tb = reinterpret_cast<const char*>(table);
  for (int it = 0; it < iters; ++it) {
    uint4 v[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      s = s * 1664525u + 1013904223u;
      const uint32_t code = s >> 16;
      if (kCluster && code < dsm_total) {
        const uint32_t owner = __umulhi(code, magic);
        const uint32_t local = base + (code - owner * per_cta) * 16u;
        uint32_t remote;
        asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(owner));
        asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v[k].x), "=r"(v[k].y), "=r"(v[k].z), "=r"(v[k].w) : "r"(remote));
      } else {
        asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v[k].x), "=r"(v[k].y), "=r"(v[k].z), "=r"(v[k].w) : "l"(tb + code * 16u));
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) { acc.x += v[k].x; acc.y ^= v[k].y; acc.z += v[k].z; acc.w ^= v[k].w; }
  }
  if (kCluster) asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

double run(const uint4* table, uint4* out, int cluster, int entries, int ctas, int threads, int iters, const char* label) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = cluster > 0 ? (16u * entries) : 0;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster > 0 ? cluster : 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 0 ? 1 : 0;
  auto kern = cluster > 0 ? gather_kernel<true> : gather_kernel<false>;
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int max_clusters = -1;
  if (cluster > 0) {
    CK(cudaOccupancyMaxActiveClusters(&max_clusters, kern, &cfg));
    if (max_clusters > 0 && max_clusters * cluster < ctas) { ctas = max_clusters * cluster; cfg.gridDim = dim3(ctas); }
  }
  for (int w = 0; w < 2; ++w) CK(cudaLaunchKernelEx(&cfg, kern, table, iters, entries, out));
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  cudaEventRecord(a);
  const int reps = 5;
  for (int r = 0; r < reps; ++r) CK(cudaLaunchKernelEx(&cfg, kern, table, iters, entries, out));
  cudaEventRecord(b);
  CK(cudaEventSynchronize(b));
  float ms; cudaEventElapsedTime(&ms, a, b);
  const double gathers = double(ctas) * threads * iters * kILP * reps;
  const double rate = gathers / (ms * 1e-3) / 1e9;
  const double frac = cluster > 0 ? double(cluster * entries) / 65536.0 : 0.0;
  printf("%-28s cluster=%2d slice=%6d entries dsm_frac=%.2f ctas=%4d thr=%4d max_clusters=%3d: %7.1f Ggather/s  -> 8192x28672 (29.36M) in %6.1f us\n",
         label, cluster, cluster > 0 ? entries : 0, frac > 1 ? 1.0 : frac, ctas, threads, max_clusters, rate, 29.36e6 / rate / 1e3);
  return rate;
}

int main() {
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  uint4* table; uint4* out;
  cudaMalloc(&table, 65536 * 16);
  cudaMemset(table, 1, 65536 * 16);
  cudaMalloc(&out, 64 << 20);
  const int iters = 2000;
  for (int k : {2, 4, 8}) run(table, out, 0, 0, sms * k, 256, iters, "L2 only");
  run(table, out, 0, 0, sms * 2, 512, iters, "L2 only");
  // Cluster of c CTAs, `entries` per CTA, threads per CTA, CTAs per SM (c = 1: this CTA's shared memory only).
  struct C { int cluster, entries, threads, per_sm; };
  C cs[] = {{8, 8192, 512, 1}, {8, 8192, 1024, 1}, {16, 4096, 512, 1}, {16, 4096, 512, 2}, {8, 4096, 512, 2},
            {4, 8192, 512, 1}, {4, 8192, 1024, 1}, {2, 4096, 512, 2}, {4, 4096, 512, 2}, {8, 2048, 256, 4},
            {16, 2048, 256, 4}, {1, 8192, 1024, 1},{2, 8192, 1024, 1}, {2, 8192, 512, 1}, {2, 10240, 1024, 1}, {2, 12288, 1024, 1}, {2, 12288, 512, 1},
            {2, 13312, 1024, 1}, {2, 13824, 1024, 1}, {2, 13824, 512, 1}, {1, 13824, 1024, 1}, {1, 12288, 1024, 1},
            {3, 8192, 1024, 1}, {3, 10240, 1024, 1}, {3, 12288, 1024, 1}, {3, 13824, 1024, 1}, {4, 6144, 1024, 1},
            {4, 10240, 1024, 1}, {2, 6144, 512, 2}, {2, 5120, 512, 2}, {4, 4096, 512, 2}};
  for (auto c : cs) {
    int ctas = sms * c.per_sm / c.cluster * c.cluster;
    run(table, out, c.cluster, c.entries, ctas, c.threads, iters, "cluster");
  }
  return 0;
}
