// int4 weight-only decode matmul (W4A16) for M <= 16: y[M, N] = x[M, K] @ W^T (+ bias).
//
// Weight layout (canonical, minikernels.ops.reference): qweight int32 [N, K/8], nibble j of
// word w = q[n, 8w + j]; scales/zeros [N, K/G] (fp16/bf16); W = (q - z) * s. No repacking.
//
// Algorithm: one thread block per 16 output rows n; its 8 warps split K into chunks of 128
// and each warp runs tensor-core MMAs m16n8k16 with the WEIGHT as the A operand (16 rows n
// x 16 k) and x^T as B (16 k x 8 rows m): "swap AB", so M <= 8 uses one n8 tile and
// M <= 16 two. Per 128-k chunk, lane (g = lane / 4, t = lane % 4) issues two 16-byte loads
// (rows n0+g and n0+g+8, words 4t..4t+3 = k 32t..32t+31 of the chunk) and 16-byte loads
// of x row m = g for the same k: both operands come from contiguous loads because the dot
// over k does not care which k sits in which MMA slot, only that A and B agree. Word j of
// a row yields two MMA k-steps; nibble pairs (0,4) (1,5) (2,6) (3,7) fall out of the
// magic-number dequant ((w >> 4i) & 0x000F000F | magic gives half2(magic + q_lo,
// magic + q_hi) in one lop3), then (v - (magic + z)) * s is exact-then-rounded-once, the
// reference W rounded to the activation dtype. x is permuted to the same pairs with prmt.
// Loads for UNROLL chunks are issued before any math (several 16-byte loads in flight).
// The warps' fp32 partial tiles are summed in shared memory; bias added; stored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "launchers.h"

namespace minikernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkK = 128;  // k per warp step: 4 lanes x 4 words x 8 nibbles
constexpr int kUnroll = 2;    // chunks whose loads are in flight together

template <typename T> struct Traits;
template <> struct Traits<__half> {
  using T = __half;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kMagicValue = 1024.f;
  using T2 = __half2;
  __device__ static T2 pair(float v) { return __float2half2_rn(v); }
  __device__ static T2 from_raw(T v) { return __half2half2(v); }
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_float(float v) { return __float2half_rn(v); }
};
template <> struct Traits<__nv_bfloat16> {
  using T = __nv_bfloat16;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128)
  static constexpr float kMagicValue = 128.f;
  using T2 = __nv_bfloat162;
  __device__ static T2 pair(float v) { return __float2bfloat162_rn(v); }
  __device__ static T2 from_raw(T v) { return __bfloat162bfloat162(v); }
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_float(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) | c
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T2> __device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2> __device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// Nibble pair i of word w: (nib i, nib i+4) as (q - z) * s in T2.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, int i, typename Traits<T>::T2 mz,
                                                 typename Traits<T>::T2 s) {
  using T2 = typename Traits<T>::T2;
  const uint32_t v = lop3_and_or(w >> (4 * i), 0x000F000Fu, Traits<T>::kMagic);
  const T2 r = __hmul2(__hsub2(as_t2<T2>(v), mz), s);
  return as_u32(r);
}

__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b,
                                          __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b,
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// kMTiles: 1 (M <= 8) or 2 (M <= 16). kGroup32: group size is a multiple of 32, so the 32
// k a lane covers per chunk share one scale/zero per row.
template <typename T, int kMTiles, bool kGroup32>
__global__ void __launch_bounds__(kThreads)
int4_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const uint32_t* __restrict__ qw,
                 const T* __restrict__ scales, const T* __restrict__ zeros,
                 const T* __restrict__ bias, int M, int N, int K, int64_t x_stride, int group) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  __shared__ float partial[kWarps][kMTiles][32][4];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int kw = K / 8;                    // words per row
  const int num_groups = K / group;
  const int row_a = min(n0 + g, N - 1);    // clamp loads; stores are masked
  const int row_b = min(n0 + g + 8, N - 1);
  const uint32_t* wa_row = qw + static_cast<int64_t>(row_a) * kw;
  const uint32_t* wb_row = qw + static_cast<int64_t>(row_b) * kw;
  const T* sa_row = scales + static_cast<int64_t>(row_a) * num_groups;
  const T* sb_row = scales + static_cast<int64_t>(row_b) * num_groups;
  const T* za_row = zeros + static_cast<int64_t>(row_a) * num_groups;
  const T* zb_row = zeros + static_cast<int64_t>(row_b) * num_groups;

  float acc[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[mt][r] = 0.f;

  const int chunks = (K + kChunkK - 1) / kChunkK;
  for (int c0 = warp * kUnroll; c0 < chunks; c0 += kWarps * kUnroll) {
    uint4 wa[kUnroll], wb[kUnroll], xv[kUnroll][kMTiles][4];
    bool valid[kUnroll];
    // ---- issue every load of kUnroll chunks first
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (c0 + u) * kChunkK + 32 * t;   // first k of this lane's 32
      valid[u] = (c0 + u) < chunks && k < K;       // K % 32 == 0: all 32 or none
      const int word = k / 8;
      wa[u] = valid[u] ? ldg16(wa_row + word) : make_uint4(0, 0, 0, 0);
      wb[u] = valid[u] ? ldg16(wb_row + word) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int m = mt * 8 + g;
        const T* xp = x + static_cast<int64_t>(m) * x_stride + k;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          xv[u][mt][j] = (valid[u] && m < M) ? ldg16(xp + 8 * j) : make_uint4(0, 0, 0, 0);
      }
    }
    // ---- dequantize and multiply. mma.sync is warp-collective: skip only whole chunks
    // (warp-uniform). In a K tail chunk (K % 128 != 0) lanes with k >= K still join the
    // MMAs, with a = 0 (zero words, scale 0, zero-point 0: no scale/zero read) and b = 0.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c0 + u >= chunks) continue;
      const int k = (c0 + u) * kChunkK + 32 * t;
      const uint32_t wa_w[4] = {wa[u].x, wa[u].y, wa[u].z, wa[u].w};
      const uint32_t wb_w[4] = {wb[u].x, wb[u].y, wb[u].z, wb[u].w};
      T2 sa, sb, mza, mzb;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j == 0 || !kGroup32) {
          if (valid[u]) {
            const int grp = (k + 8 * j) / group;
            sa = Tr::from_raw(sa_row[grp]);
            sb = Tr::from_raw(sb_row[grp]);
            mza = Tr::pair(Tr::kMagicValue + Tr::to_float(za_row[grp]));
            mzb = Tr::pair(Tr::kMagicValue + Tr::to_float(zb_row[grp]));
          } else {
            sa = sb = Tr::pair(0.f);
            mza = mzb = Tr::pair(Tr::kMagicValue);
          }
        }
#pragma unroll
        for (int step = 0; step < 2; ++step) {
          // A: {row g k-slots 2t..2t+1, row g+8 same, row g slots +8, row g+8 slots +8}
          const uint32_t a[4] = {dequant_pair<T>(wa_w[j], 2 * step, mza, sa),
                                 dequant_pair<T>(wb_w[j], 2 * step, mzb, sb),
                                 dequant_pair<T>(wa_w[j], 2 * step + 1, mza, sa),
                                 dequant_pair<T>(wb_w[j], 2 * step + 1, mzb, sb)};
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            // x halves k+0..7 as u32 pairs (0,1) (2,3) (4,5) (6,7); the MMA wants
            // (x[2s], x[2s+4]) and (x[2s+1], x[2s+5]) to match the nibble pairs.
            const uint4 xq = xv[u][mt][j];
            const uint32_t lo = step == 0 ? xq.x : xq.y;
            const uint32_t hi = step == 0 ? xq.z : xq.w;
            const uint32_t b[2] = {__byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632)};
            mma_16816(acc[mt], a, b, T());
          }
        }
      }
    }
  }

  // ---- sum the warps' partial tiles, add bias, store y[m, n]
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][mt][lane][r] = acc[mt][r];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kMTiles * 32 * 4; idx += kThreads) {
    const int mt = idx / 128;
    const int l = (idx / 4) % 32;
    const int r = idx % 4;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][mt][l][r];
    // C fragment: r 0,1 -> row g, cols 2t, 2t+1; r 2,3 -> row g+8
    const int n = n0 + (l >> 2) + (r >= 2 ? 8 : 0);
    const int m = mt * 8 + 2 * (l & 3) + (r & 1);
    if (n < N && m < M) {
      if (bias != nullptr) v += Tr::to_float(bias[n]);
      y[static_cast<int64_t>(m) * N + n] = Tr::from_float(v);
    }
  }
}

template <typename T>
cudaError_t launch_typed(void* y, const void* x, const void* qweight, const void* scales,
                         const void* zeros, const void* bias, int64_t m, int64_t n, int64_t k,
                         int64_t x_stride, int64_t group, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + 15) / 16));
  const bool g32 = group % 32 == 0;
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(y), static_cast<const T*>(x), static_cast<const uint32_t*>(qweight),
        static_cast<const T*>(scales), static_cast<const T*>(zeros),
        static_cast<const T*>(bias), static_cast<int>(m), static_cast<int>(n),
        static_cast<int>(k), x_stride, static_cast<int>(group));
  };
  if (m <= 8) {
    g32 ? args(int4_gemv_kernel<T, 1, true>) : args(int4_gemv_kernel<T, 1, false>);
  } else {
    g32 ? args(int4_gemv_kernel<T, 2, true>) : args(int4_gemv_kernel<T, 2, false>);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_int4_gemv(void* y, const void* x, const void* qweight, const void* scales,
                             const void* zeros, const void* bias, int64_t m, int64_t n,
                             int64_t k, int64_t x_row_stride, int64_t group_size, int dtype,
                             cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > 16 || k % 32 != 0 || n % 8 != 0 || group_size <= 0 || group_size % 8 != 0 ||
      k % group_size != 0)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat16:
      return launch_typed<__half>(y, x, qweight, scales, zeros, bias, m, n, k, x_row_stride,
                                  group_size, stream);
    case kBFloat16:
      return launch_typed<__nv_bfloat16>(y, x, qweight, scales, zeros, bias, m, n, k,
                                         x_row_stride, group_size, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace minikernels
