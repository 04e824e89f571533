// Paged decode attention (one query token per sequence), GQA-aware, with split-KV.
//
// Algorithm: a thread block of 128 threads owns (sequence b, kv head, split): the GP >=
// group query heads that share the kv head (padded to a power of two) and the split's
// token range [start, end). Tiles of TILE tokens are staged through shared memory with
// cp.async (two stages: tile i+1 loads while tile i computes); a token's row lives at page
// block_table[b][t / block_size], row t % block_size. Per tile:
//   1. scores: thread (token t, head part) dots its K row (smem, 16-byte reads, rows padded
//      by 16 bytes: no bank conflicts) with the pre-scaled fp32 queries -> s[g][t] in
//      base 2 (soft-capped, -inf outside [window start, seq_len)).
//   2. softmax: warp w owns heads w, w+4: tile max, m_new, alpha = 2^(m - m_new),
//      p = 2^(s - m_new) in place, l = l * alpha + sum(p).
//   3. PV: thread (8-element chunk of D, head, token slot) scales its fp32 accumulator by
//      alpha and adds p[g][t] * V[t][chunk] over its tokens.
// Then token slots are summed through shared memory and the block writes acc / l to the
// output, or (split-KV) the fp32 partial and its base-2 LSE; paged_merge_kernel combines
// the splits of each (b, q head). Split ranges depend only on the sequence's own length
// (split_plan, the same rule as the Triton kernel), so with a fixed num_splits or
// split_size a sequence's output does not depend on the batch it is in.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>

#include "launchers.h"

namespace minikernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

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

// 8 consecutive 16-bit elements (one 16-byte vector) -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f32<T>(e[i]);
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
  const void* q;          // [B, Hq, D], rows strided
  const void* k_cache;    // [NB, BS, Hkv, D] strided, rows 16-byte aligned
  const void* v_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  float* o_partial;       // [B, Hq, grid_splits, D] or nullptr (one split: write out)
  float* lse_partial;     // [B, Hq, grid_splits] base-2 LSE
  int64_t q_stride_b, q_stride_h;
  int64_t c_stride_block, c_stride_tok, c_stride_head;
  int64_t bt_stride;
  float scale, softcap;
  int window_left, num_splits, split_size, grid_splits;
  int group, num_q_heads, block_shift;
};

template <int D> constexpr int tile_for() { return D > 128 ? 32 : 64; }  // = tile_tokens()

template <typename T, int D, int GP>
struct Layout {
  static constexpr int kTile = tile_for<D>();
  static constexpr int kRow = D + 8;                 // padded smem row (elements)
  static constexpr int kSRow = kTile + 1;            // padded score row (floats)
  static constexpr int kKV = 2 * 2 * kTile * kRow;   // 2 stages x (K, V), elements
  static constexpr size_t kBytes = kKV * sizeof(T) + (GP * D + GP * kSRow + 3 * GP) * 4;
};

template <typename T, int D, int GP>
__global__ void __launch_bounds__(kThreads, 4)
paged_decode_kernel(const Params p) {
  using L = Layout<T, D, GP>;
  constexpr int TILE = L::kTile;
  constexpr int CH = D / 8;                       // 16-byte chunks per row
  constexpr int HP = kThreads / TILE;             // phase 1: head parts
  constexpr int NH1 = (GP + HP - 1) / HP;         //          heads per thread
  constexpr int R = kThreads / CH;                // phase 3: (head, token slot) pairs
  constexpr int HSLOTS = GP < R ? GP : R;
  constexpr int TS = R / HSLOTS;                  //          token slots
  constexpr int NH3 = GP / HSLOTS;                //          heads per thread
  static_assert(TILE % 32 == 0 && kThreads % TILE == 0 && kThreads % CH == 0, "tiling");

  extern __shared__ __align__(16) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem);                               // [2][2][TILE][kRow]
  float* q_s = reinterpret_cast<float*>(smem + L::kKV * sizeof(T));   // [GP][D]
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

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  const int64_t head_off = static_cast<int64_t>(kvh) * p.c_stride_head;
  const int block_mask = (1 << p.block_shift) - 1;

  auto load_tile = [&](int tile, int stage) {
    const int t0 = start + tile * TILE;
    T* k_dst = kv_s + (stage * 2 + 0) * TILE * L::kRow;
    T* v_dst = kv_s + (stage * 2 + 1) * TILE * L::kRow;
    for (int i = tid; i < TILE * CH; i += kThreads) {
      const int t = i / CH, c = i % CH;
      const int tok = t0 + t;
      const bool valid = tok < end && tok >= plan.win_lo;
      int64_t row = 0;
      if (valid) {
        const int64_t page = bt_row[tok >> p.block_shift];
        row = page * p.c_stride_block + static_cast<int64_t>(tok & block_mask) * p.c_stride_tok +
              head_off + c * 8;
      }
      cp_async16(k_dst + t * L::kRow + c * 8, k_cache + row, valid);
      cp_async16(v_dst + t * L::kRow + c * 8, v_cache + row, valid);
    }
  };

  if (n_tiles > 0) {
    load_tile(0, 0);
    cp_async_commit();
  }

  // Queries, pre-scaled (and in base 2 unless soft-capped: tanh needs natural units).
  const bool softcap = p.softcap > 0.f;
  const float qscale = softcap ? p.scale : p.scale * kLog2e;
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
  float acc[NH3][8];
#pragma unroll
  for (int j = 0; j < NH3; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;

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
    const T* k_s = kv_s + (stage * 2 + 0) * TILE * L::kRow;
    const T* v_s = kv_s + (stage * 2 + 1) * TILE * L::kRow;
    const int t0 = start + it * TILE;

    {  // 1. scores
      const int t = tid % TILE, hp = tid / TILE;
      float dot[NH1];
#pragma unroll
      for (int j = 0; j < NH1; ++j) dot[j] = 0.f;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float kf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(k_s + t * L::kRow + c * 8), kf);
#pragma unroll
        for (int j = 0; j < NH1; ++j) {
          const int g = hp + j * HP;
          if (g < GP) {
            const float4 qa = *reinterpret_cast<const float4*>(q_s + g * D + c * 8);
            const float4 qb = *reinterpret_cast<const float4*>(q_s + g * D + c * 8 + 4);
            dot[j] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                      qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
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
        for (int e = 0; e < 8; ++e) acc[j][e] *= alpha;
      }
      for (int t = ts3; t < TILE; t += TS) {
        float vf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(v_s + t * L::kRow + c3 * 8), vf);
#pragma unroll
        for (int j = 0; j < NH3; ++j) {
          const float pr = s_s[(g3 + j * HSLOTS) * L::kSRow + t];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j][e] += pr * vf[e];
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
      for (int e = 0; e < 8; ++e)
        red[(ts3 * GP + g3 + j * HSLOTS) * D + c3 * 8 + e] = acc[j][e];
    __syncthreads();
    if (ts3 == 0) {
      for (int s = 1; s < TS; ++s)
#pragma unroll
        for (int j = 0; j < NH3; ++j)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j][e] += red[(s * GP + g3 + j * HSLOTS) * D + c3 * 8 + e];
    }
  }
  if (ts3 != 0) return;

#pragma unroll
  for (int j = 0; j < NH3; ++j) {
    const int g = g3 + j * HSLOTS;
    if (g >= p.group) continue;
    const int h = kvh * p.group + g;
    const float l = l_s[g];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (!partial) {
      alignas(16) T o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = from_f32<T>(acc[j][e] * inv);
      T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.num_q_heads + h) * D + c3 * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(o);
    } else {
      const int64_t prow =
          (static_cast<int64_t>(b) * p.num_q_heads + h) * p.grid_splits + split;
      float* dst = p.o_partial + prow * D + c3 * 8;
      reinterpret_cast<float4*>(dst)[0] =
          make_float4(acc[j][0] * inv, acc[j][1] * inv, acc[j][2] * inv, acc[j][3] * inv);
      reinterpret_cast<float4*>(dst)[1] =
          make_float4(acc[j][4] * inv, acc[j][5] * inv, acc[j][6] * inv, acc[j][7] * inv);
      if (c3 == 0) p.lse_partial[prow] = l > 0.f ? m_s[g] + log2f(l) : -INFINITY;
    }
  }
}

// One block per (b, q head), one thread per element of D: out = sum_i w_i o_i / sum_i w_i,
// w_i = 2^(lse_i - max lse), over the sequence's valid splits.
template <typename T>
__global__ void paged_merge_kernel(T* __restrict__ out, const float* __restrict__ o_partial,
                                   const float* __restrict__ lse, const int32_t* __restrict__ seq_lens,
                                   int window_left, int num_splits, int split_size,
                                   int grid_splits, int num_q_heads, int head_dim, int tile) {
  const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const SplitPlan plan = split_plan(seq_lens[b], window_left, num_splits, split_size, tile);
  const int64_t row = (static_cast<int64_t>(b) * num_q_heads + h) * grid_splits;
  float m = -INFINITY;
  for (int i = 0; i < plan.n_valid; ++i) m = fmaxf(m, lse[row + i]);
  float acc = 0.f, total = 0.f;
  for (int i = 0; i < plan.n_valid; ++i) {
    const float w = exp2f(lse[row + i] - m);
    acc += w * o_partial[(row + i) * head_dim + d];
    total += w;
  }
  out[(static_cast<int64_t>(b) * num_q_heads + h) * head_dim + d] =
      from_f32<T>(total > 0.f ? acc / total : 0.f);
}

template <typename T, int D, int GP>
cudaError_t launch_decode(const Params& p, int batch, int kv_heads, cudaStream_t stream) {
  using L = Layout<T, D, GP>;
  auto kernel = paged_decode_kernel<T, D, GP>;
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

template <typename T, int D>
cudaError_t dispatch_group(const Params& p, int batch, int kv_heads, cudaStream_t stream) {
  if (p.group <= 1) return launch_decode<T, D, 1>(p, batch, kv_heads, stream);
  if (p.group <= 2) return launch_decode<T, D, 2>(p, batch, kv_heads, stream);
  if (p.group <= 4) return launch_decode<T, D, 4>(p, batch, kv_heads, stream);
  if (p.group <= 8) return launch_decode<T, D, 8>(p, batch, kv_heads, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_typed(const Params& p, int batch, int kv_heads, int head_dim,
                           cudaStream_t stream) {
  cudaError_t err;
  switch (head_dim) {
    case 64: err = dispatch_group<T, 64>(p, batch, kv_heads, stream); break;
    case 128: err = dispatch_group<T, 128>(p, batch, kv_heads, stream); break;
    case 256: err = dispatch_group<T, 256>(p, batch, kv_heads, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.o_partial == nullptr) return err;
  const int tile = head_dim > 128 ? 32 : 64;
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(p.num_q_heads));
  paged_merge_kernel<T><<<grid, head_dim, 0, stream>>>(
      static_cast<T*>(p.out), p.o_partial, p.lse_partial, p.seq_lens, p.window_left,
      p.num_splits, p.split_size, p.grid_splits, p.num_q_heads, head_dim, tile);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_decode_attention(
    void* out, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_table, const int32_t* seq_lens, float* o_partial, float* lse_partial,
    int batch, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_b, int64_t q_stride_h, int64_t cache_stride_block,
    int64_t cache_stride_token, int64_t cache_stride_head, int64_t block_table_stride,
    float scale, float softcap, int window_left, int num_splits, int split_size,
    int grid_splits, int dtype, cudaStream_t stream) {
  if (batch == 0 || num_q_heads == 0) return cudaSuccess;
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads || block_size <= 0 ||
      (block_size & (block_size - 1)) || grid_splits <= 0 ||
      (grid_splits > 1 && o_partial == nullptr))
    return cudaErrorInvalidValue;
  // cp.async moves 16-byte chunks: every cache row must start 16-byte aligned.
  const auto misaligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 != 0;
  };
  if (misaligned(k_cache) || misaligned(v_cache) || cache_stride_block % 8 ||
      cache_stride_token % 8 || cache_stride_head % 8)
    return cudaErrorMisalignedAddress;
  Params p;
  p.out = out;
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_table = block_table;
  p.seq_lens = seq_lens;
  p.o_partial = o_partial;
  p.lse_partial = lse_partial;
  p.q_stride_b = q_stride_b;
  p.q_stride_h = q_stride_h;
  p.c_stride_block = cache_stride_block;
  p.c_stride_tok = cache_stride_token;
  p.c_stride_head = cache_stride_head;
  p.bt_stride = block_table_stride;
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.num_splits = num_splits > 0 ? num_splits : 1;
  p.split_size = split_size;
  p.grid_splits = grid_splits;
  p.group = num_q_heads / num_kv_heads;
  p.num_q_heads = num_q_heads;
  int shift = 0;
  while ((1 << shift) < block_size) ++shift;
  p.block_shift = shift;
  switch (dtype) {
    case kFloat16: return dispatch_typed<__half>(p, batch, num_kv_heads, head_dim, stream);
    case kBFloat16:
      return dispatch_typed<__nv_bfloat16>(p, batch, num_kv_heads, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace minikernels
