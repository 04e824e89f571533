"""Split-K plumbing shared by the weight-only decode kernels (int4, int8, fp8 matmul).

At decode sizes (M <= ``GEMV_MAX_M``) one program per output tile cannot fill the GPU, so
K is split over ``SPLIT`` programs per tile; each writes its fp32 partial sums to a
workspace ``ws`` [SPLIT, M, N], and :func:`reduce_splits` adds them in split order
0..SPLIT-1 (+ bias) and casts once: the same bits run to run and for any batch
composition, unlike fp32 atomics, for one extra launch and SPLIT * M * N * 8 bytes of
traffic (tiny beside the weight at M <= 16). :func:`arch_and_sms` is what the configs
are chosen from.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

GEMV_MAX_M = 16
_REDUCE_BLOCK = 1024


@functools.cache
def arch_and_sms(device_index: int | None) -> tuple[int, int]:
    """(compute capability as 80 / 90 / ..., SM count) of a CUDA device; the interpreter
    (None) pretends to be an H100 / H200 so the split-K paths get used there too."""
    if device_index is None or not torch.cuda.is_available():
        return 90, 132
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor, torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(x: torch.Tensor) -> int | None:
    """x's CUDA device index (the current device for a bare "cuda"), None off the GPU."""
    if not x.is_cuda:
        return None
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def split_plan(k_tiles: int, n_tiles: int, sms: int,
               split_k: int | None = None) -> tuple[int, int]:
    """(SPLIT, K tiles per split): by default about 4 programs per SM (n_tiles x SPLIT),
    at most 16 splits; ``split_k`` forces a count (tests). No split is left empty."""
    if split_k is None:
        split_k = max(1, min(k_tiles, (4 * sms) // max(1, n_tiles), 16))
    split_k = max(1, min(int(split_k), k_tiles))
    per_split = triton.cdiv(k_tiles, split_k)
    return triton.cdiv(k_tiles, per_split), per_split


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, MN, N, HAS_BIAS: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """y = sum over splits in order 0..SPLIT-1 (+ bias), one cast: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if RNE_BF16:   # interpreter only (see interpreter_rounding)
        acc = rne_bf16(acc)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                  rne_bf16: bool = False) -> None:
    """y [M, N] = the sum of ws [SPLIT, M, N] over splits (+ bias [N]), cast to y.dtype."""
    split, m, n = ws.shape
    has_bias = bias is not None
    splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
        ws, bias if has_bias else ws, y, m * n, n, HAS_BIAS=has_bias, SPLIT=split,
        BLOCK=_REDUCE_BLOCK, RNE_BF16=rne_bf16, num_warps=4)


for _dt in ("fp16", "bf16", "fp32"):
    register(KernelSpec(
        name=f"splitk_reduce[{_dt}]", fn=splitk_reduce_kernel,
        signature={"ws_ptr": "*fp32", "bias_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "MN": "i32",
                   "N": "i32", "HAS_BIAS": "constexpr", "SPLIT": "constexpr",
                   "BLOCK": "constexpr", "RNE_BF16": "constexpr"},
        constexprs={"HAS_BIAS": True, "SPLIT": 4, "BLOCK": _REDUCE_BLOCK, "RNE_BF16": False},
        num_warps=4, num_stages=1))
