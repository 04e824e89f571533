"""Op family: INT8 W8A8 (SmoothQuant-style; what vLLM runs for compressed-tensors
``int-quantized`` W8A8 checkpoints), with vLLM's names and semantics.

Ops: ``minikernels::scaled_int8_quant`` (int8 quantization of activations: one fp32 scale
per token, dynamic, or a given per-tensor scale; symmetric or with an int32 zero point)
and ``minikernels::scaled_mm`` (vLLM's ``cutlass_scaled_mm``: int8 a x int8 b with exact
int32 accumulation, per-tensor / per-token scale_a, per-tensor / per-channel scale_b,
optional bias; float8_e4m3fn a and b too). Layouts and the exact math:
:mod:`minikernels.ops.reference`. Backends: reference; triton (ops/triton/int8_w8a8.py).
fp8 inputs need fp8 tensor cores: on CUDA devices below capability (8, 9) they take the
reference path. Tests: tests/test_int8_w8a8.py.

Typical use (a Linear with an int8 weight [N, K] and per-channel weight scales [N, 1])::

    x_q, x_s, _ = scaled_int8_quant(x)                          # x [T, K] bf16
    y = scaled_mm(x_q, w_q.t(), x_s, w_s, torch.bfloat16, bias)
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor
from . import reference
from .fp8_w8a8 import fp8_tensor_cores

logger = logging.getLogger("minikernels")

INT8_DTYPES = (torch.int8, torch.float8_e4m3fn)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[str] = set()


def _which(op: str, device: torch.device, dtype: torch.dtype = torch.int8) -> str:
    """The op's backend: 'reference' or 'triton' (fp8 inputs: triton only where fp8
    tensor cores exist)."""
    which = _backend.resolve(op, device)
    if which == "reference":
        return "reference"
    if dtype == torch.float8_e4m3fn and device.type == "cuda" and not fp8_tensor_cores(device):
        if op not in _warned:
            _warned.add(op)
            logger.warning("minikernels: %s on float8_e4m3fn needs fp8 tensor cores (sm_89+); "
                           "using the reference path on this GPU", op)
        return "reference"
    return "triton"


# ----------------------------------------------------------------------- quantization

@torch.library.custom_op("minikernels::scaled_int8_quant", mutates_args=())
def _scaled_int8_quant(x: Tensor, scale: Tensor | None, azp: Tensor | None,
                       symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    if _which("scaled_int8_quant", x.device) == "triton":
        from .triton import int8_w8a8 as tri
        return tri.scaled_int8_quant(x, scale, azp, symmetric)
    x_q, s, z = reference.scaled_int8_quant(x, scale, azp, symmetric)
    empty_s = x.new_empty((0,), dtype=torch.float32)
    empty_z = x.new_empty((0,), dtype=torch.int32)
    if scale is not None:
        return x_q.contiguous(), empty_s, empty_z
    return x_q.contiguous(), s, empty_z if z is None else z


@_scaled_int8_quant.register_fake
def _(x: Tensor, scale: Tensor | None, azp: Tensor | None,
      symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    m, k = x.shape
    static = scale is not None
    return (x.new_empty((m, k), dtype=torch.int8),
            x.new_empty((0,) if static else (m, 1), dtype=torch.float32),
            x.new_empty((0,) if static or symmetric else (m, 1), dtype=torch.int32))


def scaled_int8_quant(x: Tensor, scale: Tensor | None = None, azp: Tensor | None = None,
                      symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize x to int8 (vLLM's ``scaled_int8_quant``).

    x [..., K] fp16/bf16/fp32, any strides; M = x.numel() // K rows (tokens).
    Dynamic (scale None): one fp32 scale per row, returned as [M, 1].
        symmetric=True:  s = max|x| / 127; x_q = clamp(round(x / s), -128, 127); azp None.
        symmetric=False: s = (max - min) / 255; azp = round(-128 - min / s) (int32 [M, 1]);
                         x_q = clamp(round(x / s) + azp, -128, 127).
    Static (scale: fp32 tensor with numel 1): x_q = clamp(round(x / scale) (+ azp),
        -128, 127) with azp an int32 tensor of numel 1, given exactly when symmetric is
        False (like vLLM); returns (x_q, scale, azp) as given.
    fp32 math, IEEE division, round half to even. Edge cases (see the reference): a zero
    scale divides to 0 (an all-zero row: s = 0, x_q = 0 symmetric; s = 0, azp = -128,
    x_q = -128 asymmetric); an asymmetric constant row c has its range widened to include
    0 (s = |c| / 255, x_q = 127 / -128), so s * (x_q - azp) reproduces it.
    Returns (x_q int8 with x's shape (contiguous), scales fp32, azp int32 or None).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if scale is not None:
        check_tensor("scale", scale, dtypes=(torch.float32,), device=x.device)
        if scale.numel() != 1:
            raise ValueError(f"scale must have numel 1 (a static per-tensor scale), got shape "
                             f"{list(scale.shape)}")
        if azp is None and not symmetric:
            raise ValueError("azp must be given with a static scale when symmetric=False")
        if azp is not None and symmetric:
            raise ValueError("azp must only be given for asymmetric quantization "
                             "(symmetric=False)")
    elif azp is not None:
        raise ValueError("azp must only be given with a static scale (dynamic quantization "
                         "computes it)")
    if azp is not None:
        check_tensor("azp", azp, dtypes=(torch.int32,), device=x.device)
        if azp.numel() != 1:
            raise ValueError(f"azp must have numel 1 (a static zero point), got shape "
                             f"{list(azp.shape)}")
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    x_q, s, z = torch.ops.minikernels.scaled_int8_quant(x.reshape(m, k), scale, azp,
                                                        symmetric)
    x_q = x_q.view(x.shape)
    if scale is not None:
        return x_q, scale, azp
    return x_q, s, None if symmetric else z


# -------------------------------------------------------------------------- scaled mm

@torch.library.custom_op("minikernels::scaled_mm", mutates_args=())
def _scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor,
               out_dtype: torch.dtype, bias: Tensor | None, azp_adj: Tensor | None = None,
               azp: Tensor | None = None) -> Tensor:
    if _which("scaled_mm", a.device, a.dtype) == "triton":
        from .triton import int8_w8a8 as tri
        return tri.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, azp_adj, azp)
    return reference.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, azp_adj,
                               azp).contiguous()


@_scaled_mm.register_fake
def _(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
      bias: Tensor | None, azp_adj: Tensor | None = None,
      azp: Tensor | None = None) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor,
              out_dtype: torch.dtype, bias: Tensor | None = None,
              azp_adj: Tensor | None = None, azp: Tensor | None = None) -> Tensor:
    """out = scale_a * scale_b * (a @ b) (+ bias) (vLLM's ``cutlass_scaled_mm``), or with
    azp_adj for asymmetric int8 activations a = q - zero point (vLLM's
    ``cutlass_scaled_mm_azp``): out = scale_a * scale_b * (a_q @ b - azp * azp_adj).

    a [..., K] int8 (quantized activations; float8_e4m3fn also accepted);
    b [K, N] a's dtype: usually ``weight.t()`` of a contiguous weight [N, K] (column-major),
    any strides work; scale_a fp32 with numel 1 (per tensor) or M = a.numel() // K (per
    token, e.g. [M, 1]); scale_b fp32 with numel 1 or N (per output channel, e.g. [1, N],
    [N, 1]); bias [N] in out_dtype or None; out_dtype float16 / bfloat16 / float32.
    azp_adj: int32 with numel N (sum_k b[k, n], times the per-tensor zero point when
    azp is None), azp: int32 with numel M (per-token zero points) or None; int8 only.
    Every tensor may be a strided view. In fp32, in this order:
        acc = a @ b   (int8: the exact int32 sum, K <= 131072; fp8: fp32 accumulation)
        acc -= azp[m] * azp_adj[n]  (azp_adj[n] alone when azp is None; int32, exact)
        out[m, n] = scale_a[m] * (scale_b[n] * float(acc[m, n])) (+ bias[n])
    cast to out_dtype once. Returns [..., N] (contiguous); M = 0 gives an empty out.
    Any M, N, K (no multiple-of-16 requirement). fp8 on CUDA devices below capability
    (8, 9) runs the reference path.
    """
    check_tensor("a", a, dtypes=INT8_DTYPES, min_ndim=1)
    check_tensor("b", b, dtypes=(a.dtype,), ndim=2, device=a.device)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, got {out_dtype}")
    k, n = b.shape
    if a.shape[-1] != k:
        raise ValueError(f"a's last dim ({a.shape[-1]}) must equal b's first dim K ({k}); "
                         f"b is [K, N] (pass weight.t() for a weight [N, K])")
    m = math.prod(a.shape[:-1])
    check_tensor("scale_a", scale_a, dtypes=(torch.float32,), device=a.device)
    if scale_a.numel() not in (1, m):
        raise ValueError(f"scale_a must have numel 1 (per tensor) or M={m} (per token), got "
                         f"shape {list(scale_a.shape)}")
    check_tensor("scale_b", scale_b, dtypes=(torch.float32,), device=a.device)
    if scale_b.numel() not in (1, n):
        raise ValueError(f"scale_b must have numel 1 (per tensor) or N={n} (per channel), "
                         f"got shape {list(scale_b.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(out_dtype,), device=a.device)
        if list(bias.shape) != [n]:
            raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")
    if azp_adj is not None:
        if a.dtype != torch.int8:
            raise TypeError("azp_adj / azp (asymmetric activations) need int8 a, got "
                            f"{a.dtype}")
        check_tensor("azp_adj", azp_adj, dtypes=(torch.int32,), device=a.device)
        if azp_adj.numel() != n:
            raise ValueError(f"azp_adj must have numel N={n} (b's column sums, times the "
                             f"zero point when azp is None), got shape {list(azp_adj.shape)}")
        azp_adj = azp_adj.reshape(-1).contiguous()
        if azp is not None:
            check_tensor("azp", azp, dtypes=(torch.int32,), device=a.device)
            if azp.numel() != m:
                raise ValueError(f"azp must have numel M={m} (one zero point per token), "
                                 f"got shape {list(azp.shape)}")
            azp = azp.reshape(-1).contiguous()
    elif azp is not None:
        raise ValueError("azp needs azp_adj (b's column sums): pass both, or azp_adj alone "
                         "for a per-tensor zero point")
    out = torch.ops.minikernels.scaled_mm(a.reshape(m, k), b, scale_a.reshape(-1),
                                          scale_b.reshape(-1), out_dtype, bias, azp_adj, azp)
    return out.view(*a.shape[:-1], n)
