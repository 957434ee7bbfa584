// Prefill kernels for AQLM layers (many tokens) and a dequantizer.
//
// prefill_kernel (Hopper, sm_90a): y = (x @ W.T) * scales + bias for 2x8 and 1x8 layers (in_group_size 8,
// out_group_size 1) in one launch. A CTA owns 128 output rows and a tile of 64/128/256 tokens and is warp-specialized:
// * a producer warpgroup streams x tiles (64 input features = one 128-byte row per token and stage, in the
//   128-byte-swizzled K-major layout of wgmma) and the matching code tiles into a 4-stage shared-memory ring with
//   cp.async; the stage's "full" mbarrier completes when every producer thread's copies have landed
//   (cp.async.mbarrier.arrive.noinc), and a slot is refilled once its "empty" mbarrier says every consumer warp is
//   done with it: no CTA-wide barrier in the main loop, and the producer never waits for its own copies. (Publishing
//   a stage from the producer after cp.async.wait_group and a proxy fence measured 1-8% slower on an H200.) The
//   consumers fence the async proxy after the wait, before their wgmmas read the stage;
// * two consumer warpgroups each compute a 64-row x N-token block with wgmma, the weight as the register operand A
//   and x as the shared-memory operand B (the "swapped" product y.T = W x.T), fp32 accumulation. The codebooks are
//   staged once into shared memory, 8 copies of each 16-byte entry; the thread in row r / quad q of the A fragment
//   reads 4-byte word q of copy r, so a warp's 32 codebook reads hit 32 different banks whatever the codes are, and
//   the decoded words land directly in the wgmma A-fragment layout. Each k16 step is decoded into its own registers
//   while the previous steps' wgmmas run (wgmma.wait_group 3, not 0: ptxas keeps them asynchronous);
// * setmaxnreg moves registers from the producer (40 per thread) to the consumers (232 with one CTA per SM);
// * scales and bias in the epilogue; split-K (when row x token tiles do not fill the GPU, or only for the tiles of the
//   last wave, whose CTAs would otherwise leave SMs idle: PrefillParams::whole_tiles) writes fp32 partials, and a
//   second kernel (sum_split_tiles_kernel) sums them in split order, so results are deterministic.
//
// dequantize_kernel (any GPU): W = scales * sum_c codebooks[c][codes] as a dense matrix, for a dequantize-then-cuBLAS
// path.
#include "aqlm_device.cuh"
#include "aqlm_prefill.h"

namespace aqlm_ctx {
namespace {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// Waits for every cp.async this thread issued (committed to a group or not).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keep the compiler from moving definitions or uses of wgmma operand registers across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(uint64_t& r) { asm volatile("" : "+l"(r)::"memory"); }

// Shared-memory descriptor of a K-major operand with 128-byte swizzle: rows of 128 bytes, 8-row atoms 1024 bytes
// apart (stride byte offset); a k16 step starts 32 bytes further into the (unswizzled) row.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// wgmma.mma_async m64nNk16, A (4 registers of 2 elements) from registers, B from shared memory, D += A B. One asm
// statement serves every tile width N and element type: AQLM_D<R> lists the R = N / 2 accumulators as operands,
// AQLM_WGMMA_OPERANDS<R> names them in the instruction, then A (%R..%R+3) and the descriptor (%R+4); the immediate
// scale-d (1: accumulate) is %R+5.
#define AQLM_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define AQLM_D16(i) AQLM_D4(i), AQLM_D4(i + 4), AQLM_D4(i + 8), AQLM_D4(i + 12)
#define AQLM_D32(i) AQLM_D16(i), AQLM_D16(i + 16)
#define AQLM_D64(i) AQLM_D32(i), AQLM_D32(i + 32)
#define AQLM_D128(i) AQLM_D64(i), AQLM_D64(i + 64)
#define AQLM_WGMMA_OPERANDS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
  "{%32, %33, %34, %35}, %36"
#define AQLM_WGMMA_SCALE_D32 "%37"
#define AQLM_WGMMA_OPERANDS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
  "{%64, %65, %66, %67}, %68"
#define AQLM_WGMMA_SCALE_D64 "%69"
#define AQLM_WGMMA_OPERANDS128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
  "{%128, %129, %130, %131}, %132"
#define AQLM_WGMMA_SCALE_D128 "%133"
#define AQLM_WGMMA(N, R, TYPE)                                                                              \
  asm volatile("{ .reg .pred p; setp.ne.b32 p, " AQLM_WGMMA_SCALE_D##R ", 0; "                                   \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " AQLM_WGMMA_OPERANDS##R         \
               ", p, 1, 1, 0; }"                                                                                \
               : AQLM_D##R(0)                                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1))

template <int N>
struct Wgmma {
  template <bool kBf16>
  static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t* a, uint64_t desc) {
    static_assert(N == 64 || N == 128 || N == 256, "tile widths 64, 128, 256");
    if constexpr (N == 64 && kBf16) {
      AQLM_WGMMA(64, 32, "bf16");
    } else if constexpr (N == 64) {
      AQLM_WGMMA(64, 32, "f16");
    } else if constexpr (N == 128 && kBf16) {
      AQLM_WGMMA(128, 64, "bf16");
    } else if constexpr (N == 128) {
      AQLM_WGMMA(128, 64, "f16");
    } else if constexpr (kBf16) {
      AQLM_WGMMA(256, 128, "bf16");
    } else {
      AQLM_WGMMA(256, 128, "f16");
    }
  }
};
#undef AQLM_WGMMA
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// mbarrier helpers (shared::cta): init with an arrival count, arrive, wait for the phase of a given parity.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{ .reg .pred done; WAIT: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; @!done bra WAIT; }" ::"r"(
          smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// CTAs per SM the prefill kernel is compiled for, and the registers per thread of its producer and consumer
// warpgroups after setmaxnreg: 128 * producer + 256 * consumer fits the 384 * (65536 / 384 / kCtas, rounded down to
// 8) registers a CTA is given: no spills in the 128/256-token tiles, 4-16 bytes in the 64-token tile (a producer of
// 32 registers there spills 52).
template <int N>
struct PrefillRegisters {
  static constexpr int kCtas = N == 64 ? 2 : 1;
  static constexpr int kProducer = 40;
  static constexpr int kConsumer = kCtas == 1 ? 232 : 96;
};

// C codebooks of 256 entries, N tokens per CTA, kBf16 selects bf16 (else fp16) activations and codebooks.
// Warp-specialized: warpgroups 0 and 1 decode and multiply, warpgroup 2 streams x and code tiles into the ring.
template <int C, int N, bool kBf16>
__global__ void __launch_bounds__(kPrefillThreads, PrefillRegisters<N>::kCtas) prefill_kernel(const PrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using scalar_t = Scalar<kBf16>;
  constexpr int kXTile = N * kPrefillStageK * 2;  // bytes of x per stage (1024-byte aligned)
  constexpr int kCodeRow = 8 * C;                 // bytes of codes per row per stage
  constexpr int kStageBytes = kXTile + kPrefillRows * kCodeRow;
  constexpr int S = kPrefillStages;
  extern __shared__ __align__(1024) uint4 smem_raw[];
  // The swizzled tiles need 1024-byte alignment: start the codebooks (whose size is a multiple of 1024) there.
  uint4* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023) / 16;
  uint8_t* sh_stage = reinterpret_cast<uint8_t*>(smem + C * 256 * 8);
  uint64_t* full = reinterpret_cast<uint64_t*>(sh_stage + S * kStageBytes);  // stage landed in slot
  uint64_t* empty = full + S;                                                // slot read by every warp

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  // This CTA's tile and split of it (0 for a whole tile); it writes y itself unless the tile has several splits.
  const int cta = static_cast<int>(blockIdx.x);
  const bool whole = cta < p.whole_tiles;
  const int tile = whole ? cta : p.whole_tiles + (cta - p.whole_tiles) / p.splits;
  const int split = whole ? 0 : (cta - p.whole_tiles) % p.splits;
  const bool writes_y = whole || p.splits == 1;
  const int row0 = tile % p.row_blocks * kPrefillRows;
  const int n0 = tile / p.row_blocks * N;
  const int s_begin = whole ? 0 : split * p.stages_per_split;
  const int n_stages = whole ? p.groups / 8 : min(p.stages_per_split, p.groups / 8 - s_begin);
  if (tid == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(full + i, kPrefillProducerThreads);
      mbar_init(empty + i, kPrefillConsumerWarps);
    }
  }
  __syncthreads();

  const int local_row = (warp % kPrefillConsumerWarps) * 16 + lane / 4;  // consumer A rows local_row, local_row + 8
  if (warp >= kPrefillConsumerWarps) {
    // Producer: stage s (input features 64 s ...) into ring slot it % S, x (token n, 8-feature block kb) at
    // n * 128 + (kb ^ n % 8) * 16 (thread: block ptid % 8 of tokens ptid / 8 + 16 i), then row ptid's codes; tokens
    // and rows past the end read zeros.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PrefillRegisters<N>::kProducer));
    const scalar_t* x = static_cast<const scalar_t*>(p.x);
    const int ptid = tid - kPrefillConsumerWarps * 32;
    const int kb = ptid % 8;
    const int swizzled = (kb ^ (ptid / 8 % 8)) * 16;
    static_assert(kPrefillRows == kPrefillProducerThreads, "one code row per producer thread");
    for (int it = 0; it < n_stages; ++it) {
      const int slot = it % S;
      if (it >= S) mbar_wait(empty + slot, ((it / S) + 1) & 1);
      const uint32_t base = smem_u32(sh_stage + slot * kStageBytes);
      const int k0 = (s_begin + it) * kPrefillStageK;
      const scalar_t* x_row = x + static_cast<int64_t>(n0 + ptid / 8) * p.x_stride + k0 + kb * 8;
#pragma unroll 4
      for (int i = 0; i < N / 16; ++i) {
        const int n = ptid / 8 + 16 * i;
        const bool ok = n0 + n < p.tokens;
        cp_async16(base + n * 128 + swizzled, ok ? x_row + 16 * i * p.x_stride : x, ok ? 16 : 0);
      }
      const bool ok = row0 + ptid < p.out_features;
      const uint8_t* src = ok ? p.codes + (static_cast<int64_t>(row0 + ptid) * p.groups + (s_begin + it) * 8) * C : p.codes;
      const uint32_t dst = base + kXTile + ptid * kCodeRow;
      if constexpr (C == 2) {
        cp_async16(dst, src, ok ? 16 : 0);
      } else {
        cp_async8(dst, src, ok ? 8 : 0);
      }
      // The stage's "full" barrier counts this thread's arrival once its copies have landed.
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(full + slot)) : "memory");
    }
    cp_async_wait_all();  // nothing in flight when this thread leaves
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(PrefillRegisters<N>::kConsumer));
    stage_codebooks(smem, p.codebooks, C * 256, tid, kPrefillConsumerWarps * 32);
    asm volatile("bar.sync 1, %0;" ::"n"(kPrefillConsumerWarps * 32) : "memory");  // consumers only

    // Word `lane % 4` of copy `lane / 4` of codebook entry e is cb_words[32 * e].
    const uint32_t* cb_words = reinterpret_cast<const uint32_t*>(smem) + lane;
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) fence_operand(acc[i]);
    // A fragments: k16 step t of a stage covers groups 2t (k-slots 2q, 2q+1) and 2t + 1 (k-slots 2q + 8, 2q + 9) of
    // rows local_row (+0) and local_row + 8 (+1): a[4t + {row r g 2t, row r+8 g 2t, row r g 2t+1, r+8 g 2t+1}]. Each
    // step is decoded while the previous steps' wgmmas run; its registers were last read by the wgmma of the same
    // step one stage earlier, which wgmma_wait<3> (at most 3 newer ones pending) has retired.
    uint32_t a[16];
    for (int it = 0; it < n_stages; ++it) {
      const int slot = it % S;
      mbar_wait(full + slot, (it / S) & 1);
      fence_proxy_async();  // the cp.async writes, seen through the barrier, before the tensor cores read them
      const uint8_t* codes = sh_stage + slot * kStageBytes + kXTile;
      uint32_t w[2][2 * C];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (C == 2) {
          const uint4 v = *reinterpret_cast<const uint4*>(codes + (local_row + 8 * h) * 16);
          w[h][0] = v.x;
          w[h][1] = v.y;
          w[h][2] = v.z;
          w[h][3] = v.w;
        } else {
          const uint2 v = *reinterpret_cast<const uint2*>(codes + (local_row + 8 * h) * 8);
          w[h][0] = v.x;
          w[h][1] = v.y;
        }
      }
      const uint32_t x_tile = smem_u32(sh_stage + slot * kStageBytes);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        wgmma_wait<3>();
        if (t == 3 && it > 0 && lane == 0) mbar_arrive(empty + (it - 1) % S);  // stage it - 1 fully multiplied
#pragma unroll
        for (int gg = 0; gg < 2; ++gg) {
          const int g = 2 * t + gg;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t e;
            if constexpr (C == 2) {
              const uint32_t code0 = (w[h][g / 2] >> (16 * (g % 2))) & 0xffu;
              const uint32_t code1 = (w[h][g / 2] >> (16 * (g % 2) + 8)) & 0xffu;
              e = add2<kBf16>(cb_words[32 * code0], cb_words[32 * (256 + code1)]);
            } else {
              e = cb_words[32 * ((w[h][g / 4] >> (8 * (g % 4))) & 0xffu)];
            }
            a[4 * t + 2 * gg + h] = e;
          }
        }
        uint64_t desc = make_desc(x_tile + 32 * t);
        fence_operand(desc);
#pragma unroll
        for (int i = 0; i < 4; ++i) fence_operand(a[4 * t + i]);
        wgmma_fence();
        Wgmma<N>::template run<kBf16>(acc, a + 4 * t, desc);
        wgmma_commit();
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < N / 2; ++i) fence_operand(acc[i]);

    // Accumulator 4j + 2h + e: row local_row + 8h, token 8j + 2(lane % 4) + e.
    const scalar_t* scales = static_cast<const scalar_t*>(p.scales);
    const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
    scalar_t* y = static_cast<scalar_t*>(p.y);
    const int quad = lane % 4;
    const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
    float* partial = p.workspace + split * split_size;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + local_row + 8 * h;
      if (row >= p.out_features) continue;
      const float scale = convert<float>(scales[row]);
      const float shift = bias != nullptr ? convert<float>(bias[row]) : 0.0f;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + 8 * j + 2 * quad + e;
          if (n >= p.tokens) continue;
          const int64_t at = static_cast<int64_t>(n) * p.out_features + row;
          if (writes_y) {
            y[at] = convert<scalar_t>(acc[4 * j + 2 * h + e] * scale + shift);
          } else {
            partial[at] = acc[4 * j + 2 * h + e];
          }
        }
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// The split tiles' sum, launched after prefill_kernel: one thread per output of tiles [p.whole_tiles, tiles) (row
// fastest), which sums the output's partials in split order. (The last CTA of each tile summing its 128 x N outputs
// alone was the tail of the launch, and its registers made the producer warpgroup spill.)
template <int N, bool kBf16>
__global__ void __launch_bounds__(256) sum_split_tiles_kernel(const PrefillParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int tile = p.whole_tiles + static_cast<int>(i / (kPrefillRows * N));
  const int local = static_cast<int>(i % (kPrefillRows * N));
  const int row = tile % p.row_blocks * kPrefillRows + local % kPrefillRows;
  const int n = tile / p.row_blocks * N + local / kPrefillRows;
  if (tile >= p.row_blocks * ((p.tokens + N - 1) / N) || row >= p.out_features || n >= p.tokens) return;
  const int64_t split_size = static_cast<int64_t>(p.tokens) * p.out_features;
  const int64_t at = static_cast<int64_t>(n) * p.out_features + row;
  static_cast<Scalar<kBf16>*>(p.y)[at] =
      scale_and_shift<Scalar<kBf16>>(p, row, sum_partials(p.workspace + at, split_size, p.splits));
}

template <int C, int N, bool kBf16>
cudaError_t launch(const PrefillParams& p, cudaStream_t stream) {
  const int64_t tiles = static_cast<int64_t>(p.row_blocks) * ((p.tokens + N - 1) / N);
  const int64_t ctas = prefill_ctas(tiles, p.whole_tiles, p.splits);
  const cudaError_t err = launch_kernel(prefill_kernel<C, N, kBf16>, dim3(static_cast<unsigned>(ctas)),
                                        kPrefillThreads, prefill_smem_bytes(C, N), stream, p);
  if (err != cudaSuccess || p.splits == 1 || p.whole_tiles == tiles) return err;
  const int64_t outputs = (tiles - p.whole_tiles) * kPrefillRows * N;
  sum_split_tiles_kernel<N, kBf16><<<static_cast<unsigned>((outputs + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int C, bool kBf16>
cudaError_t launch_tile(const PrefillParams& p, int token_tile, cudaStream_t stream) {
  if (token_tile == 64) return launch<C, 64, kBf16>(p, stream);
  if (token_tile == 128) return launch<C, 128, kBf16>(p, stream);
  if (token_tile == 256) return launch<C, 256, kBf16>(p, stream);
  return cudaErrorInvalidValue;
}

// One 8-weight group per thread; C codebooks of 2**kBits entries, gathered through L1 (8-bit) or L2 (16-bit). (A
// persistent variant with shared-memory codebooks measured slower on an H200: 377 vs 307 us at 8192x28672.)
template <int C, int kBits, bool kBf16>
__global__ void dequantize_kernel(const void* codes, const uint4* codebooks, const Scalar<kBf16>* scales, uint4* w,
                                  int64_t out_features, int64_t groups) {
  using scalar_t = Scalar<kBf16>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= out_features * groups) return;
  float sum[8] = {};
#pragma unroll
  for (int c = 0; c < C; ++c) {
    uint32_t code;
    if constexpr (kBits == 16) {
      code = static_cast<const uint16_t*>(codes)[i];
    } else {
      code = static_cast<const uint8_t*>(codes)[i * C + c];
    }
    const uint4 e = __ldg(codebooks + (c << kBits) + code);
    const scalar_t* v = reinterpret_cast<const scalar_t*>(&e);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] += convert<float>(v[j]);
  }
  const float scale = convert<float>(scales[i / groups]);
  uint4 out;
  scalar_t* o = reinterpret_cast<scalar_t*>(&out);
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j] = convert<scalar_t>(sum[j] * scale);
  w[i] = out;
}

template <int C, int kBits, bool kBf16>
cudaError_t launch_dequantize(const void* codes, const void* codebooks, const void* scales, void* w,
                              int64_t out_features, int64_t groups, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (out_features * groups + kThreads - 1) / kThreads;
  dequantize_kernel<C, kBits, kBf16><<<blocks, kThreads, 0, stream>>>(
      codes, static_cast<const uint4*>(codebooks), static_cast<const Scalar<kBf16>*>(scales), static_cast<uint4*>(w),
      out_features, groups);
  return cudaGetLastError();
}

template <bool kBf16>
cudaError_t dequantize_format(const void* codes, const void* codebooks, const void* scales, void* w,
                              int64_t out_features, int64_t groups, int num_codebooks, int nbits, cudaStream_t stream) {
  if (num_codebooks == 2 && nbits == 8) {
    return launch_dequantize<2, 8, kBf16>(codes, codebooks, scales, w, out_features, groups, stream);
  }
  if (num_codebooks == 1 && nbits == 8) {
    return launch_dequantize<1, 8, kBf16>(codes, codebooks, scales, w, out_features, groups, stream);
  }
  if (num_codebooks == 1 && nbits == 16) {
    return launch_dequantize<1, 16, kBf16>(codes, codebooks, scales, w, out_features, groups, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t prefill_launch(const PrefillParams& p, int num_codebooks, bool bf16, int token_tile, cudaStream_t stream) {
  if (num_codebooks == 2) return bf16 ? launch_tile<2, true>(p, token_tile, stream) : launch_tile<2, false>(p, token_tile, stream);
  if (num_codebooks == 1) return bf16 ? launch_tile<1, true>(p, token_tile, stream) : launch_tile<1, false>(p, token_tile, stream);
  return cudaErrorInvalidValue;
}

cudaError_t dequantize_launch(const void* codes, const void* codebooks, const void* scales, void* w, int64_t out_features,
                              int64_t groups, int num_codebooks, int nbits, bool bf16, cudaStream_t stream) {
  if (bf16) return dequantize_format<true>(codes, codebooks, scales, w, out_features, groups, num_codebooks, nbits, stream);
  return dequantize_format<false>(codes, codebooks, scales, w, out_features, groups, num_codebooks, nbits, stream);
}

}  // namespace aqlm_ctx
