"""RMSNorm and LayerNorm (each optionally fused with a residual add) in Triton.

RMSNorm algorithm: one program per row. Load the row (plus the residual, whose sum
h = x + r is rounded to the activation dtype and stored as the new residual), reduce
sum(h^2) in fp32, scale by rsqrt(mean + eps) * (weight + w_offset), store (w_offset 1.0:
Gemma's norm). Rows up to BLOCK stay in registers (one pass); longer rows are streamed
in BLOCK chunks (two passes).

LayerNorm algorithm: the same row program; in fp32 the mean, then the mean of squared
deviations from it (two reductions over registers, no E[x^2] - E[x]^2 cancellation),
y = (h - mean) * rsqrt(var + eps) * weight (+ bias). Long rows stream three passes
(sum, squared deviations, write).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

MAX_SINGLE_PASS = 8192


@triton.jit
def _load_row(x_row, r_row, ro_row, c, mask, HAS_RESIDUAL: tl.constexpr,
              RNE_BF16: tl.constexpr):
    """Columns ``c`` of the row in fp32: x, or with a residual h = x + r, rounded to the
    activation dtype and stored as the new residual (the first pass over a row).
    RNE_BF16 (interpreter only, bf16): round to nearest even before the cast, as a GPU's
    cast does (interpreter_rounding)."""
    h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
        hs = h + r
        if RNE_BF16:
            hs = rne_bf16(hs)
        hs = hs.to(ro_row.dtype.element_ty)
        tl.store(ro_row + c, hs, mask=mask)
        h = hs.to(tl.float32)
    return h


@triton.jit
def _reload_row(x_row, ro_row, c, mask, HAS_RESIDUAL: tl.constexpr):
    """Columns ``c`` of the row again in fp32 (h as the first pass stored it)."""
    if HAS_RESIDUAL:
        h = tl.load(ro_row + c, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, n_cols, x_row_stride,
                    res_row_stride, eps, w_offset, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                    SINGLE_PASS: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * n_cols
    r_row = res_ptr + row * res_row_stride
    ro_row = res_out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = cols < n_cols
        h = _load_row(x_row, r_row, ro_row, cols, mask, HAS_RESIDUAL, RNE_BF16)
        inv = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + w_offset
        y = h * inv * w
        if RNE_BF16:
            y = rne_bf16(y)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            h = _load_row(x_row, r_row, ro_row, c, mask, HAS_RESIDUAL, RNE_BF16)
            acc += h * h
        inv = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            h = _reload_row(x_row, ro_row, c, mask, HAS_RESIDUAL)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) + w_offset
            y = h * inv * w
            if RNE_BF16:
                y = rne_bf16(y)
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x2: torch.Tensor, weight: torch.Tensor, eps: float, w_offset: float,
            y: torch.Tensor, res2: torch.Tensor | None, res_out: torch.Tensor | None) -> None:
    rows, n = x2.shape
    if rows == 0 or n == 0:
        return
    single = n <= MAX_SINGLE_PASS
    block = triton.next_power_of_2(n) if single else 4096
    warps = max(1, min(16, block // 256))
    rms_norm_kernel[(rows,)](
        x2, res2 if res2 is not None else x2, weight, y, res_out if res_out is not None else y,
        n, x2.stride(0), res2.stride(0) if res2 is not None else 0, eps,
        float(w_offset),
        HAS_RESIDUAL=res2 is not None, BLOCK=block, SINGLE_PASS=single,
        RNE_BF16=_rne(y), num_warps=warps)


def _rne(y: torch.Tensor) -> bool:
    """Round bf16 outputs to nearest even in the kernel: under the interpreter only."""
    return y.dtype == torch.bfloat16 and _backend.interpreter_enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_offset: float = 0.0) -> torch.Tensor:
    """x [..., H] (last dim contiguous) -> contiguous y [..., H] in x.dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    y = _alloc.empty(x.shape, x.dtype, x.device)
    _launch(x2, weight, eps, weight_offset, y.view(-1, x.shape[-1]), None, None)
    return y


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, weight_offset: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), both contiguous in x.dtype."""
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n), residual.reshape(-1, n)
    y = _alloc.empty(x.shape, x.dtype, x.device)
    h = _alloc.empty(x.shape, x.dtype, x.device)
    _launch(x2, weight, eps, weight_offset, y.view(-1, n), r2, h.view(-1, n))
    return y, h


for _dt in ("fp16", "bf16"):
    for _res in (False, True):
        for _n, _single in ((4096, True), (8192, True), (16384, False)):
            _block = _n if _single else 4096
            register(KernelSpec(
                name=f"rms_norm[{_dt},H={_n},residual={_res}]", fn=rms_norm_kernel,
                signature={"x_ptr": f"*{_dt}", "res_ptr": f"*{_dt}", "w_ptr": f"*{_dt}",
                           "y_ptr": f"*{_dt}", "res_out_ptr": f"*{_dt}", "n_cols": "i32",
                           "x_row_stride": "i64", "res_row_stride": "i64", "eps": "fp32", "w_offset": "fp32",
                           "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr",
                           "SINGLE_PASS": "constexpr", "RNE_BF16": "constexpr"},
                constexprs={"HAS_RESIDUAL": _res, "BLOCK": _block, "SINGLE_PASS": _single,
                            "RNE_BF16": False},
                num_warps=max(1, min(16, _block // 256)), num_stages=1))


@triton.jit
def layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, n_cols,
                      x_row_stride, res_row_stride, eps, HAS_RESIDUAL: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
                      RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * n_cols
    r_row = res_ptr + row * res_row_stride
    ro_row = res_out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = cols < n_cols
        h = _load_row(x_row, r_row, ro_row, cols, mask, HAS_RESIDUAL, RNE_BF16)
        mean = tl.sum(h, axis=0) / n_cols
        d = tl.where(mask, h - mean, 0.0)
        inv = tl.rsqrt(tl.sum(d * d, axis=0) / n_cols + eps)
        y = d * inv * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if RNE_BF16:
            y = rne_bf16(y)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):          # pass 1: the sum (and h = x + r)
            c = start + cols
            mask = c < n_cols
            acc += _load_row(x_row, r_row, ro_row, c, mask, HAS_RESIDUAL, RNE_BF16)
        mean = tl.sum(acc, axis=0) / n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):          # pass 2: squared deviations
            c = start + cols
            mask = c < n_cols
            h = _reload_row(x_row, ro_row, c, mask, HAS_RESIDUAL)
            d = tl.where(mask, h - mean, 0.0)
            acc += d * d
        inv = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):          # pass 3: normalize, scale, shift
            c = start + cols
            mask = c < n_cols
            h = _reload_row(x_row, ro_row, c, mask, HAS_RESIDUAL)
            y = (h - mean) * inv * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if RNE_BF16:
                y = rne_bf16(y)
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_layer_norm(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float, y: torch.Tensor, res2: torch.Tensor | None,
                       res_out: torch.Tensor | None) -> None:
    rows, n = x2.shape
    if rows == 0 or n == 0:
        return
    single = n <= MAX_SINGLE_PASS
    block = triton.next_power_of_2(n) if single else 4096
    warps = max(1, min(16, block // 256))
    layer_norm_kernel[(rows,)](
        x2, res2 if res2 is not None else x2, weight, bias if bias is not None else weight,
        y, res_out if res_out is not None else y, n, x2.stride(0),
        res2.stride(0) if res2 is not None else 0, eps, HAS_RESIDUAL=res2 is not None,
        HAS_BIAS=bias is not None, BLOCK=block, SINGLE_PASS=single, RNE_BF16=_rne(y),
        num_warps=warps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """x [..., H] (last dim contiguous) -> contiguous y [..., H] in x.dtype."""
    n = x.shape[-1]
    y = _alloc.empty(x.shape, x.dtype, x.device)
    _launch_layer_norm(x.reshape(-1, n), weight, bias, eps, y.view(-1, n), None, None)
    return y


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (layer_norm(x + residual), x + residual), both contiguous in x.dtype."""
    n = x.shape[-1]
    y = _alloc.empty(x.shape, x.dtype, x.device)
    h = _alloc.empty(x.shape, x.dtype, x.device)
    _launch_layer_norm(x.reshape(-1, n), weight, bias, eps, y.view(-1, n),
                       residual.reshape(-1, n), h.view(-1, n))
    return y, h


for _dt in ("fp16", "bf16"):
    for _res in (False, True):
        # bias False: the bias-free LayerNorms the engine launches
        for _n, _single, _bias in ((2048, True, True), (4096, True, True),
                                   (16384, False, True), (4096, True, False)):
            _block = _n if _single else 4096
            register(KernelSpec(
                name=f"layer_norm[{_dt},H={_n},residual={_res}{'' if _bias else ',bias=False'}]",
                fn=layer_norm_kernel,
                signature={"x_ptr": f"*{_dt}", "res_ptr": f"*{_dt}", "w_ptr": f"*{_dt}",
                           "b_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "res_out_ptr": f"*{_dt}",
                           "n_cols": "i32", "x_row_stride": "i64", "res_row_stride": "i64",
                           "eps": "fp32", "HAS_RESIDUAL": "constexpr", "HAS_BIAS": "constexpr",
                           "BLOCK": "constexpr", "SINGLE_PASS": "constexpr",
                           "RNE_BF16": "constexpr"},
                constexprs={"HAS_RESIDUAL": _res, "HAS_BIAS": _bias, "BLOCK": _block,
                            "SINGLE_PASS": _single, "RNE_BF16": False},
                num_warps=max(1, min(16, _block // 256)), num_stages=1))
