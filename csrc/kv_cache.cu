// Paged KV-cache write (vLLM's reshape_and_cache):
//   k_cache[slot / block_size, slot % block_size, h, :] = k[t, h, :] for every kv head h.
//
// Algorithm: one thread block per token. The block reads the token's slot (-1: the whole
// block returns, the cache stays untouched), finds its page and row (any block_size; each
// cache with its own strides) and writes its Hkv rows of D elements for k and v.
//  - Same dtype: a dtype-agnostic byte copy, in 16-byte vectors when every address and
//    stride allows it, else 4-, 2- or 1-byte words.
//  - FP8 cache (float8_e4m3fn): each thread converts W consecutive elements (W = 16, 4 or
//    1, the widest the alignment allows): fp8 = saturate_rne(float(x) / scale[h]), with a
//    true (round-to-nearest) division so the bytes match torch's
//    (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <initializer_list>

#include "launchers.h"

namespace minikernels {
namespace {

// Strides of the sources [T, Hkv, D] and of the caches [NB, BS, Hkv, D]. Units: bytes for
// the copy kernel, elements of each tensor for the fp8 kernel (an fp8 element is a byte).
struct Geom {
  int heads, block_size;
  int64_t k_tok, k_head, v_tok, v_head;
  int64_t kc_block, kc_tok, kc_head, vc_block, vc_tok, vc_head;
};

template <typename Idx>
__device__ __forceinline__ bool cache_row(const Idx* slots, const Geom& g, int64_t& k_row,
                                          int64_t& v_row) {
  const int64_t slot = static_cast<int64_t>(slots[blockIdx.x]);
  if (slot < 0) return false;
  const int64_t blk = slot / g.block_size, off = slot - blk * g.block_size;
  k_row = blk * g.kc_block + off * g.kc_tok;
  v_row = blk * g.vc_block + off * g.vc_tok;
  return true;
}

// ---- same dtype: byte copy --------------------------------------------------------------
template <typename Vec, typename Idx>
__global__ void copy_kv_kernel(const char* __restrict__ k, const char* __restrict__ v,
                               char* __restrict__ k_cache, char* __restrict__ v_cache,
                               const Idx* __restrict__ slots, int64_t row_bytes, Geom g) {
  int64_t k_row, v_row;
  if (!cache_row(slots, g, k_row, v_row)) return;
  const int64_t tok = blockIdx.x;
  const int vecs = static_cast<int>(row_bytes / sizeof(Vec));
  const int total = g.heads * vecs;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / vecs;
    const int64_t off = static_cast<int64_t>(i - h * vecs) * sizeof(Vec);
    *reinterpret_cast<Vec*>(k_cache + k_row + h * g.kc_head + off) =
        *reinterpret_cast<const Vec*>(k + tok * g.k_tok + h * g.k_head + off);
    *reinterpret_cast<Vec*>(v_cache + v_row + h * g.vc_head + off) =
        *reinterpret_cast<const Vec*>(v + tok * g.v_tok + h * g.v_head + off);
  }
}

int block_threads(int64_t items) {
  int threads = 32;
  while (threads < 256 && threads < items) threads *= 2;
  return threads;
}

bool ptr_aligned(const void* p, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(n) == 0;
}

template <typename Vec, typename Idx>
cudaError_t launch_copy(const void* k, const void* v, void* k_cache, void* v_cache,
                        const void* slots, int64_t tokens, int64_t row_bytes, const Geom& g,
                        cudaStream_t stream) {
  const int threads = block_threads(g.heads * row_bytes / static_cast<int64_t>(sizeof(Vec)));
  copy_kv_kernel<Vec, Idx><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      static_cast<const char*>(k), static_cast<const char*>(v), static_cast<char*>(k_cache),
      static_cast<char*>(v_cache), static_cast<const Idx*>(slots), row_bytes, g);
  return cudaGetLastError();
}

// g in bytes. The widest word that divides every pointer, stride and the row.
template <typename Idx>
cudaError_t copy_idx(const void* k, const void* v, void* k_cache, void* v_cache,
                     const void* slots, int64_t tokens, int64_t row_bytes, const Geom& g,
                     cudaStream_t stream) {
  auto fits = [&](int64_t n) {
    for (int64_t s : {row_bytes, g.k_tok, g.k_head, g.v_tok, g.v_head, g.kc_block, g.kc_tok,
                      g.kc_head, g.vc_block, g.vc_tok, g.vc_head})
      if (s % n) return false;
    return ptr_aligned(k, n) && ptr_aligned(v, n) && ptr_aligned(k_cache, n) &&
           ptr_aligned(v_cache, n);
  };
  if (fits(16))
    return launch_copy<uint4, Idx>(k, v, k_cache, v_cache, slots, tokens, row_bytes, g, stream);
  if (fits(4))
    return launch_copy<uint32_t, Idx>(k, v, k_cache, v_cache, slots, tokens, row_bytes, g,
                                      stream);
  if (fits(2))
    return launch_copy<uint16_t, Idx>(k, v, k_cache, v_cache, slots, tokens, row_bytes, g,
                                      stream);
  return launch_copy<uint8_t, Idx>(k, v, k_cache, v_cache, slots, tokens, row_bytes, g, stream);
}

// ---- fp8 cache: quantize -----------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// N bytes in one load / store (N = 1, 2, 4, 8, 16).
template <int N> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

// W elements of T at src (aligned to min(16, W * sizeof(T)) bytes) -> W floats.
template <typename T, int W>
__device__ __forceinline__ void load_f32(const T* src, float (&x)[W]) {
  constexpr int kBytes = W * static_cast<int>(sizeof(T));
  constexpr int kWord = kBytes < 16 ? kBytes : 16;
  using Wd = typename Word<kWord>::type;
  Wd raw[kBytes / kWord];
#pragma unroll
  for (int r = 0; r < kBytes / kWord; ++r) raw[r] = reinterpret_cast<const Wd*>(src)[r];
  const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int i = 0; i < W; ++i) x[i] = to_f32(e[i]);
}

// dst[0:W] (aligned to W bytes) = fp8(src[0:W] / scale).
template <typename T, int W>
__device__ __forceinline__ void quantize(const T* src, uint8_t* dst, float scale) {
  float x[W];
  load_f32<T, W>(src, x);
#pragma unroll
  for (int i = 0; i < W; ++i) x[i] = __fdiv_rn(x[i], scale);  // exact division, fast-math too
  if constexpr (W == 1) {
    *dst = __nv_cvt_float_to_fp8(x[0], __NV_SATFINITE, __NV_E4M3);
  } else {
    static_assert(W % 4 == 0 && W <= 16, "W");
    uint32_t w[W / 4];
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
      const uint32_t lo =
          __nv_cvt_float2_to_fp8x2(make_float2(x[4 * i], x[4 * i + 1]), __NV_SATFINITE, __NV_E4M3);
      const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(x[4 * i + 2], x[4 * i + 3]),
                                                   __NV_SATFINITE, __NV_E4M3);
      w[i] = lo | (hi << 16);  // byte j = element j (little-endian)
    }
    if constexpr (W == 16)
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    else
      *reinterpret_cast<uint32_t*>(dst) = w[0];
  }
}

template <typename T, int W, typename Idx>
__global__ void quantize_kv_kernel(const T* __restrict__ k, const T* __restrict__ v,
                                   uint8_t* __restrict__ k_cache, uint8_t* __restrict__ v_cache,
                                   const Idx* __restrict__ slots, int head_dim, Geom g,
                                   const float* __restrict__ k_scale,
                                   const float* __restrict__ v_scale, int ks_stride,
                                   int vs_stride) {
  int64_t k_row, v_row;
  if (!cache_row(slots, g, k_row, v_row)) return;
  const int64_t tok = blockIdx.x;
  const int vecs = head_dim / W;
  const int total = g.heads * vecs;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / vecs;
    const int d = (i - h * vecs) * W;
    quantize<T, W>(k + tok * g.k_tok + h * g.k_head + d, k_cache + k_row + h * g.kc_head + d,
                   k_scale[h * ks_stride]);
    quantize<T, W>(v + tok * g.v_tok + h * g.v_head + d, v_cache + v_row + h * g.vc_head + d,
                   v_scale[h * vs_stride]);
  }
}

template <typename T, int W, typename Idx>
cudaError_t launch_quantize(const void* k, const void* v, void* k_cache, void* v_cache,
                            const void* slots, int64_t tokens, int head_dim, const Geom& g,
                            const float* k_scale, const float* v_scale, int ks_stride,
                            int vs_stride, cudaStream_t stream) {
  const int threads = block_threads(static_cast<int64_t>(g.heads) * (head_dim / W));
  quantize_kv_kernel<T, W, Idx><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      static_cast<const T*>(k), static_cast<const T*>(v), static_cast<uint8_t*>(k_cache),
      static_cast<uint8_t*>(v_cache), static_cast<const Idx*>(slots), head_dim, g, k_scale,
      v_scale, ks_stride, vs_stride);
  return cudaGetLastError();
}

// g in elements. W = 16 / 4 / 1 elements per step: the sources aligned to
// min(16, W * sizeof(T)) bytes, the caches (bytes) to W, head_dim a multiple of W.
template <typename T, typename Idx>
cudaError_t quantize_idx(const void* k, const void* v, void* k_cache, void* v_cache,
                         const void* slots, int64_t tokens, int head_dim, const Geom& g,
                         const float* k_scale, const float* v_scale, int ks_stride,
                         int vs_stride, cudaStream_t stream) {
  constexpr int64_t es = sizeof(T);
  auto fits = [&](int64_t w) {
    const int64_t in = w * es < 16 ? w * es : 16;
    for (int64_t s : {g.k_tok, g.k_head, g.v_tok, g.v_head})
      if ((s * es) % in) return false;
    for (int64_t s : {g.kc_block, g.kc_tok, g.kc_head, g.vc_block, g.vc_tok, g.vc_head})
      if (s % w) return false;
    return head_dim % w == 0 && ptr_aligned(k, in) && ptr_aligned(v, in) &&
           ptr_aligned(k_cache, w) && ptr_aligned(v_cache, w);
  };
  if (fits(16))
    return launch_quantize<T, 16, Idx>(k, v, k_cache, v_cache, slots, tokens, head_dim, g,
                                       k_scale, v_scale, ks_stride, vs_stride, stream);
  if (fits(4))
    return launch_quantize<T, 4, Idx>(k, v, k_cache, v_cache, slots, tokens, head_dim, g,
                                      k_scale, v_scale, ks_stride, vs_stride, stream);
  return launch_quantize<T, 1, Idx>(k, v, k_cache, v_cache, slots, tokens, head_dim, g,
                                    k_scale, v_scale, ks_stride, vs_stride, stream);
}

template <typename T>
cudaError_t quantize_typed(const void* k, const void* v, void* k_cache, void* v_cache,
                           const void* slots, bool slot_is_int64, int64_t tokens, int head_dim,
                           const Geom& g, const float* k_scale, const float* v_scale,
                           int ks_stride, int vs_stride, cudaStream_t stream) {
  if (slot_is_int64)
    return quantize_idx<T, int64_t>(k, v, k_cache, v_cache, slots, tokens, head_dim, g,
                                    k_scale, v_scale, ks_stride, vs_stride, stream);
  return quantize_idx<T, int32_t>(k, v, k_cache, v_cache, slots, tokens, head_dim, g, k_scale,
                                  v_scale, ks_stride, vs_stride, stream);
}

int elem_bytes(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: case kBFloat16: return 2;
    case kFloat8E4M3: return 1;
    default: return 0;
  }
}

}  // namespace

cudaError_t launch_write_kv_cache(
    const void* k, const void* v, void* k_cache, void* v_cache, const void* slot_mapping,
    bool slot_is_int64, int64_t num_tokens, int num_kv_heads, int head_dim, int block_size,
    int64_t k_tok_stride, int64_t k_head_stride, int64_t v_tok_stride, int64_t v_head_stride,
    int64_t kc_block_stride, int64_t kc_tok_stride, int64_t kc_head_stride,
    int64_t vc_block_stride, int64_t vc_tok_stride, int64_t vc_head_stride,
    const float* k_scale, const float* v_scale, int64_t k_scale_numel, int64_t v_scale_numel,
    int dtype, int cache_dtype, cudaStream_t stream) {
  const int es = elem_bytes(dtype);
  if (es == 0 || block_size <= 0) return cudaErrorInvalidValue;
  if (num_tokens == 0 || num_kv_heads == 0 || head_dim == 0) return cudaSuccess;
  Geom g{num_kv_heads, block_size, k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
         kc_block_stride, kc_tok_stride, kc_head_stride, vc_block_stride, vc_tok_stride,
         vc_head_stride};
  if (cache_dtype == dtype) {  // byte copy: strides to bytes
    for (int64_t* s : {&g.k_tok, &g.k_head, &g.v_tok, &g.v_head, &g.kc_block, &g.kc_tok,
                       &g.kc_head, &g.vc_block, &g.vc_tok, &g.vc_head})
      *s *= es;
    const int64_t row_bytes = static_cast<int64_t>(head_dim) * es;
    if (slot_is_int64)
      return copy_idx<int64_t>(k, v, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, g,
                               stream);
    return copy_idx<int32_t>(k, v, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, g,
                             stream);
  }
  if (cache_dtype != kFloat8E4M3 || k_scale == nullptr || v_scale == nullptr ||
      k_scale_numel < 1 || v_scale_numel < 1)
    return cudaErrorInvalidValue;
  const int ks = k_scale_numel > 1 ? 1 : 0, vs = v_scale_numel > 1 ? 1 : 0;
  switch (dtype) {
    case kFloat32:
      return quantize_typed<float>(k, v, k_cache, v_cache, slot_mapping, slot_is_int64,
                                   num_tokens, head_dim, g, k_scale, v_scale, ks, vs, stream);
    case kFloat16:
      return quantize_typed<__half>(k, v, k_cache, v_cache, slot_mapping, slot_is_int64,
                                    num_tokens, head_dim, g, k_scale, v_scale, ks, vs, stream);
    case kBFloat16:
      return quantize_typed<__nv_bfloat16>(k, v, k_cache, v_cache, slot_mapping, slot_is_int64,
                                           num_tokens, head_dim, g, k_scale, v_scale, ks, vs,
                                           stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace minikernels
