// Paged KV-cache write (vLLM's reshape_and_cache): k_cache.view(-1, Hkv, D)[slot] = k[t].
//
// Algorithm: one thread block per token. The block reads the token's slot (-1: the whole
// block returns, the cache stays untouched) and copies its Hkv rows of D elements for k
// and v into row `slot` of the flattened caches. The copy is dtype-agnostic (bytes), in
// 16-byte vectors when every address and stride allows it, else 4- or 2-byte words.
#include <cstdint>

#include "launchers.h"

namespace minikernels {
namespace {

template <typename Vec, typename Idx>
__global__ void write_kv_cache_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                      char* __restrict__ k_cache, char* __restrict__ v_cache,
                                      const Idx* __restrict__ slots, int heads,
                                      int64_t row_bytes, int64_t k_tok, int64_t k_head,
                                      int64_t v_tok, int64_t v_head) {
  const int64_t tok = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[tok]);
  if (slot < 0) return;
  const int vecs = static_cast<int>(row_bytes / sizeof(Vec));
  const int total = heads * vecs;
  const int64_t dst_base = slot * heads * row_bytes;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / vecs;
    const int64_t off = static_cast<int64_t>(i - h * vecs) * sizeof(Vec);
    const int64_t dst = dst_base + h * row_bytes + off;
    *reinterpret_cast<Vec*>(k_cache + dst) =
        *reinterpret_cast<const Vec*>(k + tok * k_tok + h * k_head + off);
    *reinterpret_cast<Vec*>(v_cache + dst) =
        *reinterpret_cast<const Vec*>(v + tok * v_tok + h * v_head + off);
  }
}

template <typename Vec, typename Idx>
cudaError_t launch_vec(const void* k, const void* v, void* k_cache, void* v_cache,
                       const void* slots, int64_t tokens, int heads, int64_t row_bytes,
                       int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head,
                       cudaStream_t stream) {
  const int64_t vecs = heads * row_bytes / static_cast<int64_t>(sizeof(Vec));
  int threads = 32;
  while (threads < 256 && threads < vecs) threads *= 2;
  write_kv_cache_kernel<Vec, Idx><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      static_cast<const char*>(k), static_cast<const char*>(v), static_cast<char*>(k_cache),
      static_cast<char*>(v_cache), static_cast<const Idx*>(slots), heads, row_bytes, k_tok,
      k_head, v_tok, v_head);
  return cudaGetLastError();
}

bool aligned(int64_t value, int64_t n) { return value % n == 0; }

bool ptr_aligned(const void* p, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(n) == 0;
}

template <typename Idx>
cudaError_t launch_idx(const void* k, const void* v, void* k_cache, void* v_cache,
                       const void* slots, int64_t tokens, int heads, int64_t row_bytes,
                       int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head,
                       cudaStream_t stream) {
  auto fits = [&](int64_t n) {
    return aligned(row_bytes, n) && aligned(k_tok, n) && aligned(k_head, n) &&
           aligned(v_tok, n) && aligned(v_head, n) && ptr_aligned(k, n) && ptr_aligned(v, n) &&
           ptr_aligned(k_cache, n) && ptr_aligned(v_cache, n);
  };
  if (fits(16))
    return launch_vec<uint4, Idx>(k, v, k_cache, v_cache, slots, tokens, heads, row_bytes,
                                  k_tok, k_head, v_tok, v_head, stream);
  if (fits(4))
    return launch_vec<uint32_t, Idx>(k, v, k_cache, v_cache, slots, tokens, heads, row_bytes,
                                     k_tok, k_head, v_tok, v_head, stream);
  if (fits(2))
    return launch_vec<uint16_t, Idx>(k, v, k_cache, v_cache, slots, tokens, heads, row_bytes,
                                     k_tok, k_head, v_tok, v_head, stream);
  return cudaErrorMisalignedAddress;
}

}  // namespace

cudaError_t launch_write_kv_cache(const void* k, const void* v, void* k_cache, void* v_cache,
                                  const void* slot_mapping, bool slot_is_int64,
                                  int64_t num_tokens, int num_kv_heads, int head_dim,
                                  int elem_size, int64_t k_tok_stride, int64_t k_head_stride,
                                  int64_t v_tok_stride, int64_t v_head_stride,
                                  cudaStream_t stream) {
  if (num_tokens == 0 || num_kv_heads == 0 || head_dim == 0) return cudaSuccess;
  const int64_t e = elem_size;
  const int64_t row_bytes = static_cast<int64_t>(head_dim) * e;
  if (slot_is_int64)
    return launch_idx<int64_t>(k, v, k_cache, v_cache, slot_mapping, num_tokens,
                               num_kv_heads, row_bytes, k_tok_stride * e, k_head_stride * e,
                               v_tok_stride * e, v_head_stride * e, stream);
  return launch_idx<int32_t>(k, v, k_cache, v_cache, slot_mapping, num_tokens, num_kv_heads,
                             row_bytes, k_tok_stride * e, k_head_stride * e,
                             v_tok_stride * e, v_head_stride * e, stream);
}

}  // namespace minikernels
