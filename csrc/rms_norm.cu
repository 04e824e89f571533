// Fused (residual add +) RMSNorm.
//
// Algorithm: one thread block per row. Pass 1: each thread walks the row with stride
// blockDim (scalar, coalesced loads across the block), adds the residual,
// rounds the sum to the activation dtype, writes it as the new residual and accumulates
// sum(h^2) in fp32. A warp-shuffle + shared-memory reduction gives rsqrt(mean + eps).
// Pass 2: the same thread re-reads the elements it wrote (no sync needed for them),
// scales by the inverse RMS and the weight, stores y.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace minikernels {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

template <typename T, bool kResidual>
__global__ void rms_norm_kernel(T* __restrict__ y, T* __restrict__ residual_out,
                                const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ weight, int64_t hidden,
                                int64_t x_stride, int64_t r_stride, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  const T* rr = kResidual ? residual + row * r_stride : nullptr;
  T* hr = kResidual ? residual_out + row * hidden : nullptr;
  T* yr = y + row * hidden;

  float sumsq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float h = to_float(xr[i]);
    if constexpr (kResidual) {
      const T hs = from_float<T>(h + to_float(rr[i]));
      hr[i] = hs;
      h = to_float(hs);
    }
    sumsq += h * h;
  }
  const float inv = rsqrtf(block_sum(sumsq) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float h = kResidual ? to_float(hr[i]) : to_float(xr[i]);
    yr[i] = from_float<T>(h * inv * to_float(weight[i]));
  }
}

template <typename T>
cudaError_t launch_typed(void* y, void* residual_out, const void* x, const void* residual,
                         const void* weight, int64_t rows, int64_t hidden, int64_t x_stride,
                         int64_t r_stride, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  int threads = 1024;
  while (threads > 32 && threads / 2 >= hidden) threads /= 2;
  const dim3 grid(static_cast<unsigned>(rows));
  if (residual != nullptr) {
    rms_norm_kernel<T, true><<<grid, threads, 0, stream>>>(
        static_cast<T*>(y), static_cast<T*>(residual_out), static_cast<const T*>(x),
        static_cast<const T*>(residual), static_cast<const T*>(weight), hidden, x_stride,
        r_stride, eps);
  } else {
    rms_norm_kernel<T, false><<<grid, threads, 0, stream>>>(
        static_cast<T*>(y), nullptr, static_cast<const T*>(x), nullptr,
        static_cast<const T*>(weight), hidden, x_stride, 0, eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(void* y, void* residual_out, const void* x, const void* residual,
                            const void* weight, int64_t rows, int64_t hidden,
                            int64_t x_row_stride, int64_t residual_row_stride, float eps,
                            int dtype, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return launch_typed<float>(y, residual_out, x, residual, weight, rows, hidden,
                                 x_row_stride, residual_row_stride, eps, stream);
    case kFloat16:
      return launch_typed<__half>(y, residual_out, x, residual, weight, rows, hidden,
                                  x_row_stride, residual_row_stride, eps, stream);
    case kBFloat16:
      return launch_typed<__nv_bfloat16>(y, residual_out, x, residual, weight, rows, hidden,
                                         x_row_stride, residual_row_stride, eps, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace minikernels
