// Raw-pointer launchers for every CUDA C++ kernel in csrc/*.cu.
//
// Kernel files include only CUDA headers and this file; they compile with plain nvcc
// where no CUDA build of torch exists. bindings.cpp (the only C++ that includes torch)
// validates nothing itself: the Python op layer validated inputs already.
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16, 3 = float8_e4m3fn (KV caches).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace minikernels {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

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
// Caches are [num_blocks, block_size, Hkv, D] (any block_size >= 1), each of k_cache and
// v_cache with its own element strides (block, token, head; last dim contiguous), e.g. the
// k / v views of a [num_blocks, 2, block_size, Hkv, D] tensor. FP8 caches hold
// float8_e4m3fn with float32 scales k_scale / v_scale of numel 1 (per tensor) or Hkv
// (scale of kv head h = scale[h]); stored value * scale ~= the original (vLLM's convention).

// For every t with slot = slot_mapping[t] >= 0 (int32 or int64 slots; -1 = skip), every kv
// head h: k_cache[slot / block_size, slot % block_size, h, :] = k[t, h, :] (same for v).
// k/v [T, Hkv, D] with their own element strides (last dim contiguous), dtype `dtype`.
//  - cache_dtype == dtype (any of the four codes): a byte copy, in 16-, 4-, 2- or 1-byte
//    words as every pointer, stride and the row allow (any alignment works).
//  - cache_dtype == kFloat8E4M3, dtype float32/float16/bfloat16: quantize,
//    fp8 = saturate_rne(float(x) / scale[h]) (a true division; torch's
//    (x.float() / scale).clamp(-448, 448).to(float8_e4m3fn) bit for bit). k_scale and
//    v_scale required (numel 1 or Hkv). 16 elements per step when pointers/strides allow,
//    else 4, else 1 (any alignment works).
// Returns cudaErrorInvalidValue for other dtype pairs, missing scales or block_size < 1.
cudaError_t launch_write_kv_cache(
    const void* k, const void* v, void* k_cache, void* v_cache, const void* slot_mapping,
    bool slot_is_int64, int64_t num_tokens, int num_kv_heads, int head_dim, int block_size,
    int64_t k_tok_stride, int64_t k_head_stride, int64_t v_tok_stride, int64_t v_head_stride,
    int64_t kc_block_stride, int64_t kc_tok_stride, int64_t kc_head_stride,
    int64_t vc_block_stride, int64_t vc_tok_stride, int64_t vc_head_stride,
    const float* k_scale, const float* v_scale, int64_t k_scale_numel, int64_t v_scale_numel,
    int dtype, int cache_dtype, cudaStream_t stream);

// Decode attention over a paged cache: out [B, Hq, D] (contiguous, q's dtype fp16/bf16)
// and lse [B, Hq] (contiguous fp32, natural log of the sum of exp of the scaled,
// soft-capped scores over the visible tokens; -inf and out = 0 when none; nullptr = skip)
// for q [B, Hq, D] (strided rows); block_table int32 [B, *] (row stride given, inner
// stride 1); seq_lens int32 [B]. cache_dtype is dtype (16-bit cache) or kFloat8E4M3 (then
// k_scale / v_scale are required: the kernel computes attention over k * k_scale[kvh],
// v * v_scale[kvh]). Needs head_dim in {64, 128, 256}, Hq / Hkv <= 8; cache base pointers
// 16-byte aligned and all six cache strides multiples of 16 bytes (8 elements for
// fp16/bf16, 16 for fp8), else cudaErrorMisalignedAddress. grid_splits blocks per
// (sequence, kv head); with o_partial [B, Hq, grid_splits, D] and lse_partial
// [B, Hq, grid_splits] (fp32) each writes its split and a merge kernel writes out and lse;
// with nullptr (grid_splits == 1) the blocks write out and lse directly. Split rule per
// sequence: split_size > 0 tokens per split, else cdiv(len, num_splits) rounded up to the
// tile (64 tokens; 32 for D = 256; the same for fp8). window_left -1 = none; softcap 0 =
// none.
cudaError_t launch_paged_decode_attention(
    void* out, float* lse, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_table, const int32_t* seq_lens, float* o_partial, float* lse_partial,
    const float* k_scale, const float* v_scale, int64_t k_scale_numel, int64_t v_scale_numel,
    int batch, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_b, int64_t q_stride_h, int64_t k_stride_block, int64_t k_stride_token,
    int64_t k_stride_head, int64_t v_stride_block, int64_t v_stride_token,
    int64_t v_stride_head, int64_t block_table_stride, float scale, float softcap,
    int window_left, int num_splits, int split_size, int grid_splits, int dtype,
    int cache_dtype, cudaStream_t stream);

}  // namespace minikernels
