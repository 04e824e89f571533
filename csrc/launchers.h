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

}  // namespace minikernels
