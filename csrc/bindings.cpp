// The only C++ that includes torch: thin wrappers from tensors to the raw-pointer
// launchers in launchers.h, exported as minikernels._C. Inputs were validated by the
// Python op layer. The CUDA stream comes from Python (torch.cuda.current_stream()
// .cuda_stream) so this file needs no ATen/cuda headers and syntax-checks without a CUDA
// build of torch. It includes only the Tensor class and torch's pybind11 casters, not
// <torch/extension.h> (all of ATen's operators and torch's C++ API): a quarter of the
// parse time.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>

#include "launchers.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return minikernels::kFloat32;
    case at::kHalf: return minikernels::kFloat16;
    case at::kBFloat16: return minikernels::kBFloat16;
    case at::kFloat8_e4m3fn: return minikernels::kFloat8E4M3;
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
  const c10::DeviceGuard device_guard(x.device());  // launch on the tensors' GPU
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
  const c10::DeviceGuard device_guard(x.device());  // launch on the tensors' GPU
  check(minikernels::launch_int4_gemv(
            y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
            zeros.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, x.size(0),
            qweight.size(0), x.size(1), x.stride(0), group_size, dtype_code(x),
            as_stream(stream)),
        "int4_gemv");
}

// ---- paged KV cache (owner: paged-KV issue #5) -------------------------------------------
const float* opt_f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}
int64_t opt_numel(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->numel() : 0; }

// k, v [T, Hkv, D] (last dim contiguous, own strides); k_cache, v_cache [NB, BS, Hkv, D]
// (last dim contiguous, own strides) of k's dtype or float8_e4m3fn; slot_mapping int32/int64
// [T]; k_scale, v_scale fp32 (numel 1 or Hkv) iff the cache is fp8.
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                    at::Tensor v_cache, const at::Tensor& slot_mapping,
                    const c10::optional<at::Tensor>& k_scale,
                    const c10::optional<at::Tensor>& v_scale, int64_t stream) {
  const c10::DeviceGuard device_guard(k.device());  // launch on the tensors' GPU
  check(minikernels::launch_write_kv_cache(
            k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            slot_mapping.data_ptr(), slot_mapping.scalar_type() == at::kLong, k.size(0),
            static_cast<int>(k.size(1)), static_cast<int>(k.size(2)),
            static_cast<int>(k_cache.size(1)), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), opt_f32(k_scale),
            opt_f32(v_scale), opt_numel(k_scale), opt_numel(v_scale), dtype_code(k),
            dtype_code(k_cache), as_stream(stream)),
        "write_kv_cache");
}

// out contiguous [B, Hq, D] (q's dtype); lse contiguous fp32 [B, Hq]; q [B, Hq, D] (last dim
// contiguous); k_cache, v_cache [NB, BS, Hkv, D] (own strides) of q's dtype or
// float8_e4m3fn; block_table int32 [B, max_blocks] (inner stride 1); seq_lens int32 [B];
// o_partial fp32 [B, Hq, grid_splits, D] and lse_partial fp32 [B, Hq, grid_splits], or None
// for one split; k_scale, v_scale fp32 (numel 1 or Hkv) iff the caches are fp8.
void paged_decode_attention(at::Tensor out, at::Tensor lse, const at::Tensor& q,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens,
                            const c10::optional<at::Tensor>& o_partial,
                            const c10::optional<at::Tensor>& lse_partial,
                            const c10::optional<at::Tensor>& k_scale,
                            const c10::optional<at::Tensor>& v_scale, double scale,
                            double softcap, int64_t window_left, int64_t num_splits,
                            int64_t split_size, int64_t grid_splits, int64_t stream) {
  const c10::DeviceGuard device_guard(q.device());  // launch on the tensors' GPU
  check(minikernels::launch_paged_decode_attention(
            out.data_ptr(), lse.data_ptr<float>(), q.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), block_table.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
            o_partial.has_value() ? o_partial->data_ptr<float>() : nullptr,
            lse_partial.has_value() ? lse_partial->data_ptr<float>() : nullptr,
            opt_f32(k_scale), opt_f32(v_scale), opt_numel(k_scale), opt_numel(v_scale),
            static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
            static_cast<int>(k_cache.size(2)), static_cast<int>(q.size(2)),
            static_cast<int>(k_cache.size(1)), q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), block_table.stride(0), static_cast<float>(scale),
            static_cast<float>(softcap), static_cast<int>(window_left),
            static_cast<int>(num_splits), static_cast<int>(split_size),
            static_cast<int>(grid_splits), dtype_code(q), dtype_code(k_cache),
            as_stream(stream)),
        "paged_decode_attention");
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
  // paged KV cache (owner: paged-KV issue #5)
  m.def("write_kv_cache", &write_kv_cache,
        "paged KV-cache write (slot -1 = skip; fp8 cache: quantize by k/v scale)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("k_scale"), py::arg("v_scale"), py::arg("stream"));
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention with split-KV (16-bit or fp8 cache), writes out and lse",
        py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("o_partial"),
        py::arg("lse_partial"), py::arg("k_scale"), py::arg("v_scale"), py::arg("scale"),
        py::arg("softcap"), py::arg("window_left"), py::arg("num_splits"),
        py::arg("split_size"), py::arg("grid_splits"), py::arg("stream"));
}
