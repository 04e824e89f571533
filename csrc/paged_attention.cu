// Paged decode attention (one query token per sequence), GQA-aware, with split-KV, over a
// 16-bit (q's dtype) or FP8 e4m3 cache.
//
// Algorithm: a thread block of 128 threads owns (sequence b, kv head, split): the GP >=
// group query heads that share the kv head (padded to a power of two) and the split's
// token range [start, end). Tiles of TILE tokens are staged through shared memory with
// cp.async (two stages: tile i+1 loads while tile i computes); a token's row lives at page
// block_table[b][t / block_size], row t % block_size (any block_size; K and V each with
// their own strides). A 16-byte chunk holds VEC = 16 / sizeof(cache element) elements
// (8 for fp16/bf16, 16 for fp8). Per tile:
//   1. scores: thread (token t, head part) dots its K row (smem, 16-byte reads, rows padded
//      by 16 bytes: no bank conflicts) with the pre-scaled fp32 queries -> s[g][t] in
//      base 2 (soft-capped, -inf outside [window start, seq_len)).
//   2. softmax: warp w owns heads w, w+4: tile max, m_new, alpha = 2^(m - m_new),
//      p = 2^(s - m_new) in place, l = l * alpha + sum(p).
//   3. PV: thread (VEC-element chunk of D, head, token slot) scales its fp32 accumulator by
//      alpha and adds p[g][t] * V[t][chunk] over its tokens.
// Then token slots are summed through shared memory and the block writes acc / l to the
// output with the natural-log LSE, or (split-KV) the fp32 partial and its base-2 LSE;
// paged_merge_kernel combines the splits of each (b, q head) and writes out and LSE.
// FP8 dequantization is folded into the two ends: the query pre-scale carries k_scale[kvh]
// and the output is multiplied by v_scale[kvh], so the math is attention over
// k_fp8 * k_scale and v_fp8 * v_scale. Split ranges depend only on the sequence's own length
// (split_plan, the same rule as the Triton kernel), so with a fixed num_splits or
// split_size a sequence's output does not depend on the batch it is in.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace minikernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using fp8_t = __nv_fp8_e4m3;  // cache element of an FP8 cache (1 byte)

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Cache elements per 16-byte vector (a cp.async chunk): 8 (fp16/bf16) or 16 (fp8).
template <typename C> constexpr int vec_elems() { return 16 / static_cast<int>(sizeof(C)); }

// What one unpacked fp8 element is worth, relative to the true e4m3 value. sm_89+ converts
// with cvt.rn.f16x2.e4m3x2 (exact); older archs move the bits into an fp16 (exact, but
// the value times 2^-8: the exponent biases differ by 8). The kernel folds this unit into
// the k / v scales, so both give the same math.
__device__ __forceinline__ float fp8_unit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return 256.f;
#else
  return 1.f;
#endif
}

// 4 e4m3 bytes (little-endian in w) -> 4 floats, each fp8_unit()^-1 times the true value.
__device__ __forceinline__ void fp8x4_to_f32(uint32_t w, float* out) {
  __half2_raw lo, hi;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
#else
  // Byte b -> fp16 bits sign(b) << 15 | (b & 0x7f) << 7: an e4m3 number's exponent and
  // mantissa fields land in fp16's (subnormals included) = value * 2^(7 - 15).
  const uint32_t a = __byte_perm(w, 0u, 0x1404);  // b1 << 24 | b0 << 8
  const uint32_t c = __byte_perm(w, 0u, 0x3424);  // b3 << 24 | b2 << 8
  const uint32_t ha = (a & 0x80008000u) | ((a >> 1) & 0x3f803f80u);
  const uint32_t hc = (c & 0x80008000u) | ((c >> 1) & 0x3f803f80u);
  lo.x = static_cast<unsigned short>(ha & 0xffffu);
  lo.y = static_cast<unsigned short>(ha >> 16);
  hi.x = static_cast<unsigned short>(hc & 0xffffu);
  hi.y = static_cast<unsigned short>(hc >> 16);
#endif
  const float2 f0 = __half22float2(__half2(lo));
  const float2 f1 = __half22float2(__half2(hi));
  out[0] = f0.x;
  out[1] = f0.y;
  out[2] = f1.x;
  out[3] = f1.y;
}

// One 16-byte vector of cache elements -> vec_elems<C>() floats (fp8: / fp8_unit()).
template <typename C>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float (&out)[vec_elems<C>()]) {
  if constexpr (std::is_same_v<C, fp8_t>) {
    fp8x4_to_f32(raw.x, out + 0);
    fp8x4_to_f32(raw.y, out + 4);
    fp8x4_to_f32(raw.z, out + 8);
    fp8x4_to_f32(raw.w, out + 12);
  } else {
    const C* e = reinterpret_cast<const C*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_f32<C>(e[i]);
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

struct SplitPlan {
  int win_lo;   // first visible token
  int lo;       // win_lo rounded down to the tile
  int chunk;    // tokens per split (a multiple of the tile)
  int n_valid;  // splits that hold tokens
};

// Must match _split_plan in minikernels/ops/triton/paged_attention.py.
__device__ __forceinline__ SplitPlan split_plan(int seq_len, int window_left, int num_splits,
                                                int split_size, int tile) {
  SplitPlan p;
  p.win_lo = window_left >= 0 ? max(seq_len - 1 - window_left, 0) : 0;
  p.lo = (p.win_lo / tile) * tile;
  const int span = seq_len - p.lo;
  p.chunk = split_size > 0 ? split_size : cdiv(cdiv(span, num_splits), tile) * tile;
  p.chunk = max(p.chunk, tile);
  p.n_valid = cdiv(span, p.chunk);
  return p;
}

struct Params {
  void* out;              // [B, Hq, D] contiguous
  float* lse;             // [B, Hq] natural-log LSE (written without splits; else merge)
  const void* q;          // [B, Hq, D], rows strided
  const void* k_cache;    // [NB, BS, Hkv, D] strided, rows 16-byte aligned
  const void* v_cache;    // same shape, its own strides
  const int32_t* block_table;
  const int32_t* seq_lens;
  float* o_partial;       // [B, Hq, grid_splits, D] or nullptr (one split: write out)
  float* lse_partial;     // [B, Hq, grid_splits] base-2 LSE
  const float* k_scale;   // fp8 only: [1] or [Hkv]; index kvh * k_scale_stride
  const float* v_scale;
  int k_scale_stride, v_scale_stride;
  int64_t q_stride_b, q_stride_h;
  int64_t k_stride_block, k_stride_tok, k_stride_head;
  int64_t v_stride_block, v_stride_tok, v_stride_head;
  int64_t bt_stride;
  float scale, softcap;
  int window_left, num_splits, split_size, grid_splits;
  int group, num_q_heads, block_size, block_shift;  // block_shift -1: not a power of two
};

template <int D> constexpr int tile_for() { return D > 128 ? 32 : 64; }  // = tile_tokens()

template <typename C, int D, int GP>
struct Layout {
  static constexpr int kVec = vec_elems<C>();
  static constexpr int kTile = tile_for<D>();
  static constexpr int kRow = D + kVec;              // padded smem row (elements, +16 B)
  static constexpr int kSRow = kTile + 1;            // padded score row (floats)
  static constexpr int kKV = 2 * 2 * kTile * kRow;   // 2 stages x (K, V), elements
  static constexpr size_t kKVBytes = kKV * sizeof(C);
  static constexpr size_t kBytes = kKVBytes + (GP * D + GP * kSRow + 3 * GP) * 4;
};

// T: query / output type (fp16, bf16); C: cache element type (T, or fp8_t).
template <typename T, typename C, int D, int GP>
__global__ void __launch_bounds__(kThreads, 4)
paged_decode_kernel(const Params p) {
  using L = Layout<C, D, GP>;
  constexpr bool kFp8 = std::is_same_v<C, fp8_t>;
  constexpr int TILE = L::kTile;
  constexpr int VEC = L::kVec;                    // cache elements per 16-byte chunk
  constexpr int CH = D / VEC;                     // 16-byte chunks per row
  constexpr int HP = kThreads / TILE;             // phase 1: head parts
  constexpr int NH1 = (GP + HP - 1) / HP;         //          heads per thread
  constexpr int R = kThreads / CH;                // phase 3: (head, token slot) pairs
  constexpr int HSLOTS = GP < R ? GP : R;
  constexpr int TS = R / HSLOTS;                  //          token slots
  constexpr int NH3 = GP / HSLOTS;                //          heads per thread
  static_assert(D % VEC == 0 && TILE % 32 == 0 && kThreads % TILE == 0 &&
                kThreads % CH == 0 && R % HSLOTS == 0 && GP % HSLOTS == 0, "tiling");
  static_assert(TS == 1 || TS * GP * D * 4 <= L::kKVBytes, "slot reduction fits K/V smem");

  extern __shared__ __align__(16) unsigned char smem[];
  C* kv_s = reinterpret_cast<C*>(smem);                               // [2][2][TILE][kRow]
  float* q_s = reinterpret_cast<float*>(smem + L::kKVBytes);          // [GP][D]
  float* s_s = q_s + GP * D;                                          // [GP][kSRow]
  float* m_s = s_s + GP * L::kSRow;
  float* l_s = m_s + GP;
  float* a_s = l_s + GP;

  const int b = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x;
  const int seq_len = p.seq_lens[b];
  const SplitPlan plan = split_plan(seq_len, p.window_left, p.num_splits, p.split_size, TILE);
  const bool partial = p.o_partial != nullptr;
  if (partial && split >= plan.n_valid) return;   // block-uniform: no barrier skipped
  const int start = plan.lo + split * plan.chunk;
  const int end = min(start + plan.chunk, seq_len);
  const int n_tiles = end > start ? cdiv(end - start, TILE) : 0;

  const C* k_cache = static_cast<const C*>(p.k_cache) + kvh * p.k_stride_head;
  const C* v_cache = static_cast<const C*>(p.v_cache) + kvh * p.v_stride_head;
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride;

  auto load_tile = [&](int tile, int stage) {
    const int t0 = start + tile * TILE;
    C* k_dst = kv_s + (stage * 2 + 0) * TILE * L::kRow;
    C* v_dst = kv_s + (stage * 2 + 1) * TILE * L::kRow;
    for (int i = tid; i < TILE * CH; i += kThreads) {
      const int t = i / CH, c = i % CH;
      const int tok = t0 + t;
      const bool valid = tok < end && tok >= plan.win_lo;
      int64_t k_row = 0, v_row = 0;
      if (valid) {
        const int blk = p.block_shift >= 0 ? tok >> p.block_shift : tok / p.block_size;
        const int64_t page = bt_row[blk];
        const int64_t off = tok - blk * p.block_size;
        k_row = page * p.k_stride_block + off * p.k_stride_tok + c * VEC;
        v_row = page * p.v_stride_block + off * p.v_stride_tok + c * VEC;
      }
      cp_async16(k_dst + t * L::kRow + c * VEC, k_cache + k_row, valid);
      cp_async16(v_dst + t * L::kRow + c * VEC, v_cache + v_row, valid);
    }
  };

  if (n_tiles > 0) {
    load_tile(0, 0);
    cp_async_commit();
  }

  // Queries, pre-scaled (and in base 2 unless soft-capped: tanh needs natural units). FP8:
  // times k_scale (and the unpack unit), so s = q . (k_fp8 * k_scale) * scale.
  const bool softcap = p.softcap > 0.f;
  float qscale = softcap ? p.scale : p.scale * kLog2e;
  float out_scale = 1.f;
  if constexpr (kFp8) {
    qscale *= p.k_scale[kvh * p.k_scale_stride] * fp8_unit();
    out_scale = p.v_scale[kvh * p.v_scale_stride] * fp8_unit();
  }
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride_b;
  for (int i = tid; i < GP * D; i += kThreads) {
    const int g = i / D, d = i % D;
    q_s[i] = g < p.group
                 ? to_f32<T>(q[static_cast<int64_t>(kvh * p.group + g) * p.q_stride_h + d]) *
                       qscale
                 : 0.f;
  }
  if (tid < GP) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }

  const int c3 = tid % CH, r3 = tid / CH;
  const int g3 = r3 % HSLOTS, ts3 = r3 / HSLOTS;
  float acc[NH3][VEC];
#pragma unroll
  for (int j = 0; j < NH3; ++j)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) {
      load_tile(it + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const C* k_s = kv_s + (stage * 2 + 0) * TILE * L::kRow;
    const C* v_s = kv_s + (stage * 2 + 1) * TILE * L::kRow;
    const int t0 = start + it * TILE;

    {  // 1. scores
      const int t = tid % TILE, hp = tid / TILE;
      float dot[NH1];
#pragma unroll
      for (int j = 0; j < NH1; ++j) dot[j] = 0.f;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float kf[VEC];
        unpack_vec<C>(*reinterpret_cast<const uint4*>(k_s + t * L::kRow + c * VEC), kf);
#pragma unroll
        for (int j = 0; j < NH1; ++j) {
          const int g = hp + j * HP;
          if (g < GP) {
            const float* qg = q_s + g * D + c * VEC;
#pragma unroll
            for (int e = 0; e < VEC; e += 4) {
              const float4 qv = *reinterpret_cast<const float4*>(qg + e);
              dot[j] += qv.x * kf[e] + qv.y * kf[e + 1] + qv.z * kf[e + 2] + qv.w * kf[e + 3];
            }
          }
        }
      }
      const int tok = t0 + t;
      const bool visible = tok < end && tok >= plan.win_lo;
#pragma unroll
      for (int j = 0; j < NH1; ++j) {
        const int g = hp + j * HP;
        if (g < GP) {
          float s = dot[j];
          if (softcap) s = p.softcap * tanhf(s / p.softcap) * kLog2e;
          s_s[g * L::kSRow + t] = visible ? s : -INFINITY;
        }
      }
    }
    __syncthreads();

    {  // 2. online softmax over the tile
      const int lane = tid & 31, warp = tid >> 5;
      for (int g = warp; g < GP; g += kWarps) {
        float* row = s_s + g * L::kSRow;
        float mx = -INFINITY;
#pragma unroll
        for (int i = lane; i < TILE; i += 32) mx = fmaxf(mx, row[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_old = m_s[g];
        const float m_new = fmaxf(m_old, mx);
        const bool any = m_new != -INFINITY;
        float sum = 0.f;
#pragma unroll
        for (int i = lane; i < TILE; i += 32) {
          const float e = any ? exp2f(row[i] - m_new) : 0.f;
          row[i] = e;
          sum += e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        __syncwarp();
        if (lane == 0) {
          const float alpha = any ? exp2f(m_old - m_new) : 1.f;
          a_s[g] = alpha;
          l_s[g] = l_s[g] * alpha + sum;
          m_s[g] = m_new;
        }
      }
    }
    __syncthreads();

    {  // 3. acc = acc * alpha + P V
#pragma unroll
      for (int j = 0; j < NH3; ++j) {
        const float alpha = a_s[g3 + j * HSLOTS];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] *= alpha;
      }
      for (int t = ts3; t < TILE; t += TS) {
        float vf[VEC];
        unpack_vec<C>(*reinterpret_cast<const uint4*>(v_s + t * L::kRow + c3 * VEC), vf);
#pragma unroll
        for (int j = 0; j < NH3; ++j) {
          const float pr = s_s[(g3 + j * HSLOTS) * L::kSRow + t];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] += pr * vf[e];
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }

  __syncthreads();  // l_s / m_s visible to all (also when there was no tile at all)
  // Sum token slots (shared memory reuses the K/V stages: all cp.async groups are done).
  float* red = reinterpret_cast<float*>(smem);   // [TS][GP][D]
  if constexpr (TS > 1) {
#pragma unroll
    for (int j = 0; j < NH3; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        red[(ts3 * GP + g3 + j * HSLOTS) * D + c3 * VEC + e] = acc[j][e];
    __syncthreads();
    if (ts3 == 0) {
      for (int s = 1; s < TS; ++s)
#pragma unroll
        for (int j = 0; j < NH3; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            acc[j][e] += red[(s * GP + g3 + j * HSLOTS) * D + c3 * VEC + e];
    }
  }
  if (ts3 != 0) return;

#pragma unroll
  for (int j = 0; j < NH3; ++j) {
    const int g = g3 + j * HSLOTS;
    if (g >= p.group) continue;
    const int h = kvh * p.group + g;
    const float l = l_s[g];
    const float inv = l > 0.f ? out_scale / l : 0.f;   // acc / l (* v_scale for fp8)
    const float lse2 = l > 0.f ? m_s[g] + log2f(l) : -INFINITY;  // base 2
    const int64_t row = static_cast<int64_t>(b) * p.num_q_heads + h;
    if (!partial) {
      alignas(16) T o[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = from_f32<T>(acc[j][e] * inv);
      uint4* dst = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * D + c3 * VEC);
#pragma unroll
      for (int w = 0; w < VEC * static_cast<int>(sizeof(T)) / 16; ++w)
        dst[w] = reinterpret_cast<const uint4*>(o)[w];
      if (c3 == 0 && p.lse != nullptr) p.lse[row] = lse2 * kLn2;
    } else {
      const int64_t prow = row * p.grid_splits + split;
      float4* dst = reinterpret_cast<float4*>(p.o_partial + prow * D + c3 * VEC);
#pragma unroll
      for (int e = 0; e < VEC; e += 4)
        dst[e / 4] = make_float4(acc[j][e] * inv, acc[j][e + 1] * inv, acc[j][e + 2] * inv,
                                 acc[j][e + 3] * inv);
      if (c3 == 0) p.lse_partial[prow] = lse2;
    }
  }
}

// One block per (b, q head), one thread per element of D: out = sum_i w_i o_i / sum_i w_i,
// w_i = 2^(lse_i - M), M = max lse, over the sequence's valid splits; thread 0 writes
// lse = ln 2 * (M + log2(sum_i w_i)) (-inf when no split holds a token).
template <typename T>
__global__ void paged_merge_kernel(T* __restrict__ out, float* __restrict__ lse_out,
                                   const float* __restrict__ o_partial,
                                   const float* __restrict__ lse, const int32_t* __restrict__ seq_lens,
                                   int window_left, int num_splits, int split_size,
                                   int grid_splits, int num_q_heads, int head_dim, int tile) {
  const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const SplitPlan plan = split_plan(seq_lens[b], window_left, num_splits, split_size, tile);
  const int64_t row = (static_cast<int64_t>(b) * num_q_heads + h) * grid_splits;
  float m = -INFINITY;
  for (int i = 0; i < plan.n_valid; ++i) m = fmaxf(m, lse[row + i]);
  float acc = 0.f, total = 0.f;
  if (m != -INFINITY) {
    for (int i = 0; i < plan.n_valid; ++i) {
      const float w = exp2f(lse[row + i] - m);
      acc += w * o_partial[(row + i) * head_dim + d];
      total += w;
    }
  }
  const int64_t orow = static_cast<int64_t>(b) * num_q_heads + h;
  out[orow * head_dim + d] = from_f32<T>(total > 0.f ? acc / total : 0.f);
  if (d == 0 && lse_out != nullptr)
    lse_out[orow] = total > 0.f ? kLn2 * (m + log2f(total)) : -INFINITY;
}

template <typename T, typename C, int D, int GP>
cudaError_t launch_decode(const Params& p, int batch, int kv_heads, cudaStream_t stream) {
  using L = Layout<C, D, GP>;
  auto kernel = paged_decode_kernel<T, C, D, GP>;
  constexpr size_t smem = L::kBytes;
  if constexpr (smem > 48 * 1024) {
    // The attribute is per device (context): remember it per device, not per process (a
    // single static flag left every device but the first unconfigured -> launch failure).
    static std::atomic<uint64_t> configured{0};  // bit d: set on device d (d < 64)
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
    if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      configured.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(p.grid_splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename C, int D>
cudaError_t dispatch_group(const Params& p, int batch, int kv_heads, cudaStream_t stream) {
  if (p.group <= 1) return launch_decode<T, C, D, 1>(p, batch, kv_heads, stream);
  if (p.group <= 2) return launch_decode<T, C, D, 2>(p, batch, kv_heads, stream);
  if (p.group <= 4) return launch_decode<T, C, D, 4>(p, batch, kv_heads, stream);
  if (p.group <= 8) return launch_decode<T, C, D, 8>(p, batch, kv_heads, stream);
  return cudaErrorInvalidValue;
}

template <typename T, typename C>
cudaError_t dispatch_typed(const Params& p, int batch, int kv_heads, int head_dim,
                           cudaStream_t stream) {
  cudaError_t err;
  switch (head_dim) {
    case 64: err = dispatch_group<T, C, 64>(p, batch, kv_heads, stream); break;
    case 128: err = dispatch_group<T, C, 128>(p, batch, kv_heads, stream); break;
    case 256: err = dispatch_group<T, C, 256>(p, batch, kv_heads, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.o_partial == nullptr) return err;
  const int tile = head_dim > 128 ? 32 : 64;
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(p.num_q_heads));
  paged_merge_kernel<T><<<grid, head_dim, 0, stream>>>(
      static_cast<T*>(p.out), p.lse, p.o_partial, p.lse_partial, p.seq_lens, p.window_left,
      p.num_splits, p.split_size, p.grid_splits, p.num_q_heads, head_dim, tile);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_cache(const Params& p, int batch, int kv_heads, int head_dim,
                           bool fp8_cache, cudaStream_t stream) {
  if (fp8_cache) return dispatch_typed<T, fp8_t>(p, batch, kv_heads, head_dim, stream);
  return dispatch_typed<T, T>(p, batch, kv_heads, head_dim, stream);
}

}  // namespace

cudaError_t launch_paged_decode_attention(
    void* out, float* lse, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_table, const int32_t* seq_lens, float* o_partial, float* lse_partial,
    const float* k_scale, const float* v_scale, int64_t k_scale_numel, int64_t v_scale_numel,
    int batch, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_b, int64_t q_stride_h, int64_t k_stride_block, int64_t k_stride_token,
    int64_t k_stride_head, int64_t v_stride_block, int64_t v_stride_token,
    int64_t v_stride_head, int64_t block_table_stride, float scale, float softcap,
    int window_left, int num_splits, int split_size, int grid_splits, int dtype,
    int cache_dtype, cudaStream_t stream) {
  if (batch == 0 || num_q_heads == 0) return cudaSuccess;
  const bool fp8 = cache_dtype == kFloat8E4M3;
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads || block_size <= 0 ||
      (head_dim != 64 && head_dim != 128 && head_dim != 256) || grid_splits <= 0 || (grid_splits > 1 && o_partial == nullptr) ||
      (o_partial != nullptr && lse_partial == nullptr) ||
      (dtype != kFloat16 && dtype != kBFloat16) || (!fp8 && cache_dtype != dtype) ||
      (fp8 && (k_scale == nullptr || v_scale == nullptr || k_scale_numel < 1 ||
               v_scale_numel < 1)))
    return cudaErrorInvalidValue;
  // cp.async moves 16-byte chunks: every cache row (and each chunk) must start 16-byte
  // aligned, i.e. base pointers 16-byte aligned, strides multiples of 16 bytes.
  const int64_t vec = fp8 ? 16 : 8;  // elements per 16 bytes
  const auto misaligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 != 0;
  };
  if (misaligned(k_cache) || misaligned(v_cache) || head_dim % vec ||
      k_stride_block % vec || k_stride_token % vec || k_stride_head % vec ||
      v_stride_block % vec || v_stride_token % vec || v_stride_head % vec)
    return cudaErrorMisalignedAddress;
  Params p;
  p.out = out;
  p.lse = lse;
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_table = block_table;
  p.seq_lens = seq_lens;
  p.o_partial = o_partial;
  p.lse_partial = lse_partial;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.k_scale_stride = k_scale_numel > 1 ? 1 : 0;
  p.v_scale_stride = v_scale_numel > 1 ? 1 : 0;
  p.q_stride_b = q_stride_b;
  p.q_stride_h = q_stride_h;
  p.k_stride_block = k_stride_block;
  p.k_stride_tok = k_stride_token;
  p.k_stride_head = k_stride_head;
  p.v_stride_block = v_stride_block;
  p.v_stride_tok = v_stride_token;
  p.v_stride_head = v_stride_head;
  p.bt_stride = block_table_stride;
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.num_splits = num_splits > 0 ? num_splits : 1;
  p.split_size = split_size;
  p.grid_splits = grid_splits;
  p.group = num_q_heads / num_kv_heads;
  p.num_q_heads = num_q_heads;
  p.block_size = block_size;
  p.block_shift = -1;
  if ((block_size & (block_size - 1)) == 0) {
    int shift = 0;
    while ((1 << shift) < block_size) ++shift;
    p.block_shift = shift;
  }
  switch (dtype) {
    case kFloat16:
      return dispatch_cache<__half>(p, batch, num_kv_heads, head_dim, fp8, stream);
    case kBFloat16:
      return dispatch_cache<__nv_bfloat16>(p, batch, num_kv_heads, head_dim, fp8, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace minikernels
