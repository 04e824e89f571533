"""Op family: RMSNorm fused with int8 / fp8 quantization of its output (the input of an
INT8 or FP8 W8A8 linear), optionally after a residual add.

Op: ``minikernels::rms_norm_quant``. One launch replaces ``rms_norm`` followed by
``scaled_int8_quant`` / ``per_token_group_quant_fp8`` / a static fp8 quantization, with the
same bits (the norm's output is rounded to x's dtype, then quantized), or reproduces
vLLM's fused kernels (``vllm_rounding``): ``rms_norm_dynamic_per_token_quant``,
``rms_norm_per_block_quant``, ``rms_norm_static_fp8_quant`` and their residual forms.
Exact math: :func:`minikernels.ops.reference.rms_norm_quant`.
Backends: reference; triton (ops/triton/norm_quant.py). float8_e4m3fn output needs sm_89+
on CUDA: below it the reference path runs (warned once).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_finite_float, check_positive_float,
                           check_shape, check_tensor)
from . import reference
from .fp8_w8a8 import fp8_tensor_cores

logger = logging.getLogger("minikernels")

QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)    # vLLM's floor of a dynamic fp8 scale
FP8_GROUP_EPS = 1e-10                    # per_token_group_quant_fp8's absmax floor
MAX_GROUP_TILE = 8192                    # a group (padded to a power of two) per tile
_warned: set[str] = set()


def quant_backend(op: str, device: torch.device, quant_dtype: torch.dtype) -> str:
    """'reference' or 'triton' for a fused quantizing op: fp8 output on a CUDA device
    without fp8 support (below sm_89) takes the reference path, warned once per op."""
    which = _backend.resolve(op, device)
    if which == "reference":
        return "reference"
    if quant_dtype != torch.int8 and device.type == "cuda" and not fp8_tensor_cores(device):
        if op not in _warned:
            _warned.add(op)
            logger.warning("minikernels: %s to float8_e4m3fn needs sm_89+; using the "
                           "reference path on this GPU", op)
        return "reference"
    return "triton"


@torch.library.custom_op("minikernels::rms_norm_quant", mutates_args=())
def _rms_norm_quant(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
                    weight_offset: float, quant_dtype: torch.dtype, scale: Tensor | None,
                    group_size: int, scale_ub: Tensor | None, min_scale: float,
                    vllm_rounding: bool) -> tuple[Tensor, Tensor, Tensor]:
    if x.shape[1] and quant_backend("rms_norm_quant", x.device, quant_dtype) == "triton":
        from .triton import norm_quant
        return norm_quant.rms_norm_quant(x, weight, residual, eps, weight_offset,
                                         quant_dtype, scale, group_size, scale_ub,
                                         min_scale, vllm_rounding)
    q, s, h = reference.rms_norm_quant(x, weight, residual, eps, weight_offset, quant_dtype,
                                       scale, group_size, scale_ub, min_scale,
                                       vllm_rounding)
    return (q.contiguous(), s.contiguous(),
            h.contiguous() if h is not None else x.new_empty((0,)))


@_rms_norm_quant.register_fake
def _(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float, weight_offset: float,
      quant_dtype: torch.dtype, scale: Tensor | None, group_size: int,
      scale_ub: Tensor | None, min_scale: float,
      vllm_rounding: bool) -> tuple[Tensor, Tensor, Tensor]:
    t, n = x.shape
    groups = 1 if group_size == 0 else n // group_size
    return (x.new_empty((t, n), dtype=quant_dtype),
            x.new_empty((0,) if scale is not None else (t, groups), dtype=torch.float32),
            x.new_empty((t, n) if residual is not None else (0,)))


def _check_scalar_tensor(name: str, t: object, device: torch.device) -> Tensor:
    check_tensor(name, t, dtypes=(torch.float32,), device=device)
    if t.numel() != 1:
        raise ValueError(f"{name} must have 1 element, got shape {list(t.shape)}")
    return t.reshape(1)


def default_min_scale(quant_dtype: torch.dtype, group_size: int | None) -> float:
    """The floor of a dynamic scale that makes the fused op equal the unfused one:
    int8 0 (``scaled_int8_quant``: an all-zero row gets scale 0), fp8 per token vLLM's
    1 / (448 * 512) (``scaled_fp8_quant``), fp8 per group 1e-10 / 448
    (``per_token_group_quant_fp8``'s eps)."""
    if quant_dtype == torch.int8:
        return 0.0
    return FP8_MIN_SCALE if not group_size else FP8_GROUP_EPS / 448.0


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float = 1e-6,
                   quant_dtype: torch.dtype = torch.int8, *, residual: Tensor | None = None,
                   scale: Tensor | None = None, group_size: int | None = None,
                   scale_ub: Tensor | None = None, min_scale: float | None = None,
                   weight_offset: float = 0.0, vllm_rounding: bool = False
                   ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """y = rms_norm(x [+ residual]) quantized to int8 or float8_e4m3fn, in one pass.

    x [..., H] fp16/bf16/fp32, any strides; weight [H] any float dtype (any stride);
    residual like x (any strides) or None. quant_dtype: torch.int8 or torch.float8_e4m3fn.
    Scales (fp32), one of:
        scale given (1 element): static; q = y / scale (fp8: y * (1 / scale)).
        group_size None / 0: dynamic, one scale per token, returned as [..., 1];
        group_size g (a divisor of H): one scale per token and g columns,
            [..., H / g] (vLLM's per-block / per-token-group layout, row-major).
        Dynamic scales are max(min(max |y|, scale_ub) / qmax, min_scale) with qmax 127 /
        448; scale_ub (fp32, 1 element) optional; min_scale defaults to the floor of the
        matching unfused op (:func:`default_min_scale`).
    y is rms_norm(x [+ residual], weight, eps, weight_offset=...) computed as ops.rms_norm
    computes it (rounded to x's dtype once), so the result equals ``rms_norm`` then
    ``scaled_int8_quant`` / ``per_token_group_quant_fp8``: bit for bit on the reference
    backend; a kernel's fp32 sum of squares may add in another order (or use the GPU's
    approximate rsqrt), which can move a normalized value by one ulp of x's dtype.
    vllm_rounding=True reproduces vLLM's fused kernels' arithmetic instead
    (:func:`minikernels.ops.reference.rms_norm_quant`).
    Returns (q [..., H] quant_dtype, scales) or, with a residual, (q, scales, h) where
    h = x + residual rounded to x's dtype (the next residual). Static scales come back
    as the given tensor.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    n = x.shape[-1]
    check_shape("weight", weight, [n])
    eps = check_positive_float("eps", eps)
    weight_offset = check_finite_float("weight_offset", weight_offset)
    if not isinstance(vllm_rounding, bool):
        raise TypeError(f"vllm_rounding must be a bool, got {type(vllm_rounding).__name__}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, n)
    r2 = None
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        check_shape("residual", residual, list(x.shape))
        r2 = residual.reshape(rows, n)
    static, group, ub, min_scale = check_quant_scales(quant_dtype, scale, group_size,
                                                      scale_ub, min_scale, n, x.device)
    q, s, h = torch.ops.minikernels.rms_norm_quant(
        x2, weight, r2, eps, weight_offset, quant_dtype, static, group, ub, min_scale,
        vllm_rounding)
    q = q.view(*lead, n)
    s = scale if scale is not None else s.view(*lead, s.shape[-1])
    if residual is None:
        return q, s
    return q, s, h.view(*lead, n)


def check_quant_scales(quant_dtype: torch.dtype, scale: Tensor | None,
                       group_size: int | None, scale_ub: Tensor | None,
                       min_scale: float | None, n: int, device: torch.device,
                       what: str = "x's last dim"
                       ) -> tuple[Tensor | None, int, Tensor | None, float]:
    """The fused quantizing ops' scale arguments, checked: (the static scale [1] or None,
    the group size (0: per token), scale_ub [1] or None, min_scale). n: the width the
    groups divide (``what`` names it)."""
    if quant_dtype not in QUANT_DTYPES:
        raise TypeError(f"quant_dtype must be torch.int8 or torch.float8_e4m3fn, got "
                        f"{quant_dtype}")
    static = None
    if scale is not None:
        static = _check_scalar_tensor("scale", scale, device)
        if group_size or scale_ub is not None:
            raise ValueError("group_size and scale_ub are for dynamic scales; a static "
                             "scale was given")
    group = _check_group_size(group_size, n, what)
    ub = _check_scalar_tensor("scale_ub", scale_ub, device) if scale_ub is not None \
        else None
    if min_scale is None:
        min_scale = default_min_scale(quant_dtype, group_size)
    return static, group, ub, check_positive_float("min_scale", min_scale, allow_zero=True)


def _check_group_size(group_size: object, n: int, what: str = "x's last dim") -> int:
    """0 (one scale per token) or a divisor of n (``what``); a group equal to the row is
    per token."""
    if group_size is None:
        return 0
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if group_size < 0 or (group_size and n % group_size):
        raise ValueError(f"group_size must be a positive divisor of {what} ({n}), "
                         f"got {group_size}")
    if group_size == n:
        return 0
    if group_size and 1 << (group_size - 1).bit_length() > MAX_GROUP_TILE:
        raise ValueError(f"group_size must be at most {MAX_GROUP_TILE} (or the whole row), "
                         f"got {group_size}")
    return group_size
