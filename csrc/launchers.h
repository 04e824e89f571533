// Raw-pointer launchers for every CUDA C++ kernel in csrc/*.cu.
//
// Kernel files include only CUDA headers and this file; they compile with plain nvcc
// where no CUDA build of torch exists. bindings.cpp (the only C++ that includes torch)
// validates nothing itself: the Python op layer validated inputs already.
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace minikernels {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y[r, :] = rmsnorm(h[r, :]) * weight with h = x (+ residual, rounded to dtype and written
// to residual_out when residual != nullptr). x/residual rows are strided, y/residual_out
// contiguous [rows, hidden]; weight [hidden]; all of one dtype.
cudaError_t launch_rms_norm(void* y, void* residual_out, const void* x, const void* residual,
                            const void* weight, int64_t rows, int64_t hidden,
                            int64_t x_row_stride, int64_t residual_row_stride, float eps,
                            int dtype, cudaStream_t stream);

// ---- int4 (csrc/int4_gemv.cu; owner: int4 issue #3) ----------------------------------
// y [m, n] (contiguous) = x [m, k] (rows x_row_stride apart, 16-byte aligned) @ W^T (+ bias)
// with W in the canonical int4 layout: qweight int32 [n, k/8], scales/zeros [n, k/group],
// all of one dtype (fp16/bf16); bias [n] or nullptr. Needs m <= 16, k % 32 == 0,
// n % 8 == 0, group_size a multiple of 8 dividing k (per-channel: group_size = k).
cudaError_t launch_int4_gemv(void* y, const void* x, const void* qweight, const void* scales,
                             const void* zeros, const void* bias, int64_t m, int64_t n,
                             int64_t k, int64_t x_row_stride, int64_t group_size, int dtype,
                             cudaStream_t stream);

// ---- paged KV cache (csrc/kv_cache.cu, csrc/paged_attention.cu; owner: paged-KV #5) ----
// k_cache.view(-1, Hkv, D)[slot] = k[t] (same for v) for every t with slot_mapping[t] >= 0
// (int32 or int64 slots). A byte copy: any element size. k/v [T, Hkv, D] with the given
// element strides (last dim contiguous); caches contiguous [num_blocks, block_size, Hkv, D].
cudaError_t launch_write_kv_cache(const void* k, const void* v, void* k_cache, void* v_cache,
                                  const void* slot_mapping, bool slot_is_int64,
                                  int64_t num_tokens, int num_kv_heads, int head_dim,
                                  int elem_size, int64_t k_tok_stride, int64_t k_head_stride,
                                  int64_t v_tok_stride, int64_t v_head_stride,
                                  cudaStream_t stream);

// Decode attention over a paged cache: out [B, Hq, D] (contiguous, fp16/bf16) for q
// [B, Hq, D] (strided rows); caches [num_blocks, block_size, Hkv, D] with element strides
// (multiples of 8, 16-byte aligned base); block_table int32 [B, *] (row stride given);
// seq_lens int32 [B]. Needs head_dim in {64, 128, 256}, Hq / Hkv <= 8, block_size a power
// of two. grid_splits blocks per (sequence, kv head); with o_partial [B, Hq, grid_splits, D]
// and lse_partial [B, Hq, grid_splits] (fp32) each writes its split and a merge kernel
// writes out; with nullptr (grid_splits == 1) the blocks write out directly. Split rule per
// sequence: split_size > 0 tokens per split, else cdiv(len, num_splits) rounded up to the
// tile (64 tokens; 32 for D = 256). window_left -1 = none; softcap 0 = none.
cudaError_t launch_paged_decode_attention(
    void* out, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_table, const int32_t* seq_lens, float* o_partial, float* lse_partial,
    int batch, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_b, int64_t q_stride_h, int64_t cache_stride_block,
    int64_t cache_stride_token, int64_t cache_stride_head, int64_t block_table_stride,
    float scale, float softcap, int window_left, int num_splits, int split_size,
    int grid_splits, int dtype, cudaStream_t stream);

}  // namespace minikernels
