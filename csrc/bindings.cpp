// The only C++ that includes torch: thin wrappers from tensors to the raw-pointer
// launchers in launchers.h, exported as minikernels._C. Inputs were validated by the
// Python op layer. The CUDA stream comes from Python (torch.cuda.current_stream()
// .cuda_stream) so this file needs no ATen/cuda headers and syntax-checks without a CUDA
// build of torch.
#include <torch/extension.h>

#include "launchers.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return minikernels::kFloat32;
    case at::kHalf: return minikernels::kFloat16;
    case at::kBFloat16: return minikernels::kBFloat16;
    default: TORCH_CHECK(false, "minikernels._C: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "minikernels._C.", what, " failed: ", cudaGetErrorString(err));
}

// y, residual_out: contiguous [rows, hidden]; x, residual: [rows, hidden], rows strided.
void rms_norm(at::Tensor y, const at::Tensor& x, const at::Tensor& weight, double eps,
              const c10::optional<at::Tensor>& residual,
              const c10::optional<at::Tensor>& residual_out, int64_t stream) {
  const bool has_res = residual.has_value();
  check(minikernels::launch_rms_norm(
            y.data_ptr(), has_res ? residual_out->data_ptr() : nullptr, x.data_ptr(),
            has_res ? residual->data_ptr() : nullptr, weight.data_ptr(), x.size(0), x.size(1),
            x.stride(0), has_res ? residual->stride(0) : 0, static_cast<float>(eps),
            dtype_code(x), as_stream(stream)),
        "rms_norm");
}

// ---- int4 (owner: int4 issue #3) ---------------------------------------------------------
// y: contiguous [m, n]; x: [m, k] with 16-byte aligned rows; qweight int32 [n, k/8];
// scales/zeros [n, k/group] in x's dtype; bias [n] in x's dtype or None.
void int4_gemv(at::Tensor y, const at::Tensor& x, const at::Tensor& qweight,
               const at::Tensor& scales, const at::Tensor& zeros,
               const c10::optional<at::Tensor>& bias, int64_t group_size, int64_t stream) {
  check(minikernels::launch_int4_gemv(
            y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
            zeros.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, x.size(0),
            qweight.size(0), x.size(1), x.stride(0), group_size, dtype_code(x),
            as_stream(stream)),
        "int4_gemv");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minikernels CUDA C++ kernels (raw-pointer launchers behind torch tensors)";
  m.def("rms_norm", &rms_norm, "fused (residual add +) RMSNorm", py::arg("y"), py::arg("x"),
        py::arg("weight"), py::arg("eps"), py::arg("residual"), py::arg("residual_out"),
        py::arg("stream"));
  // int4 (owner: int4 issue #3)
  m.def("int4_gemv", &int4_gemv, "int4 weight-only decode matmul, M <= 16", py::arg("y"),
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("group_size"), py::arg("stream"));
}
