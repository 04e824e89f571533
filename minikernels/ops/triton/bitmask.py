"""Token bitmask application (structured outputs) in Triton.

Algorithm: a 2-D grid over (masked row, vocab block). Each program reads its logits row
(through ``indices``: the rows that carry a constraint), loads BLOCK // 32 packed int32
words of that row's bitmask, expands them to BLOCK bits (bit t % 32 of word t // 32;
1 = allowed, xgrammar's packing) and stores -inf only where a bit is 0, so allowed logits
are never written. Rows not in ``indices`` are never touched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK = 4096


@triton.jit
def apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, indices_ptr, vocab_size,
                               logits_row_stride, bitmask_row_stride,
                               BLOCK: tl.constexpr, HAS_INDICES: tl.constexpr):
    if HAS_INDICES:
        row = tl.load(indices_ptr + tl.program_id(0)).to(tl.int64)
    else:
        row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    words = start // 32 + tl.arange(0, BLOCK // 32)
    packed = tl.load(bitmask_ptr + row * bitmask_row_stride + words,
                     mask=words * 32 < vocab_size, other=-1)
    bits = (packed[:, None] >> tl.arange(0, 32)[None, :]) & 1          # [BLOCK/32, 32]
    cols = start + tl.arange(0, BLOCK)
    blocked = tl.reshape(bits == 0, [BLOCK])
    # fp32 -inf, cast to the logits' dtype by the store (exact; the same PTX as a bf16/fp16
    # constant). triton 3.6's interpreter has no bf16 constants (InterpreterBuilder.get_bf16).
    tl.store(logits_ptr + row * logits_row_stride + cols,
             tl.full([BLOCK], float("-inf"), tl.float32),
             mask=blocked & (cols < vocab_size))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: torch.Tensor | None, vocab_size: int) -> None:
    """logits [B, V] (unit column stride), bitmask int32 [B, W] (unit column stride),
    indices int32/int64 [R] contiguous or None; masks columns < vocab_size in place."""
    rows = logits.shape[0] if indices is None else indices.shape[0]
    if rows == 0 or vocab_size == 0:
        return
    grid = (rows, triton.cdiv(vocab_size, BLOCK))
    apply_token_bitmask_kernel[grid](
        logits, bitmask, indices if indices is not None else bitmask, vocab_size,
        logits.stride(0), bitmask.stride(0), BLOCK=BLOCK, HAS_INDICES=indices is not None,
        num_warps=4)


for _dt in ("fp32", "fp16", "bf16"):
    for _idx in (None, "i32", "i64"):
        register(KernelSpec(
            name=f"apply_token_bitmask[{_dt},indices={_idx}]", fn=apply_token_bitmask_kernel,
            signature={"logits_ptr": f"*{_dt}", "bitmask_ptr": "*i32",
                       "indices_ptr": f"*{_idx}" if _idx else "*i32", "vocab_size": "i32",
                       "logits_row_stride": "i64", "bitmask_row_stride": "i64",
                       "BLOCK": "constexpr", "HAS_INDICES": "constexpr"},
            constexprs={"BLOCK": BLOCK, "HAS_INDICES": _idx is not None},
            num_warps=4, num_stages=1))
