"""LoRA update of mixed-adapter batches in Triton (punica's BGMV: one token at a time).

Algorithm: two launches over (token, block of outputs). Shrink: h[t] = A[s] @ x[t] for
the token's slot s, the rank-R vector accumulated in fp32 over K blocks and kept in an
fp32 scratch [T, R] (never rounded). Expand: y[t, n-block] = scaling[s] * B[s][n-block] @
h[t], fp32 accumulation over R blocks, rounded once on store. A token with slot -1 loads
its adapter through slot 0 with every load masked off and stores zeros, so no branch
depends on a loaded value. Each token's adapter weights stream from memory once per
output block: decode batches (few tokens per adapter) are memory bound by design.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK_R = 16
BLOCK_K = 128
BLOCK_N = 64


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, K, R,
                       sx_t, sx_k, sa_s, sa_r, sa_k,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    s = tl.maximum(slot, 0)
    k_live = tl.where(slot >= 0, K, 0)      # no adapter: every load masked off
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_live
        xv = tl.load(x_ptr + t * sx_t + ks * sx_k, mask=kmask, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + s * sa_s + rs[:, None] * sa_r + ks[None, :] * sa_k,
                     mask=(rs[:, None] < R) & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(h_ptr + t * R + rs, acc, mask=rs < R)


@triton.jit
def lora_expand_kernel(h_ptr, b_ptr, slots_ptr, scaling_ptr, y_ptr, N, R,
                       sb_s, sb_n, sb_r, sy_t,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    s = tl.maximum(slot, 0)
    r_live = tl.where(slot >= 0, R, 0)      # no adapter: every load masked off, y = 0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rmask = rs < r_live
        hv = tl.load(h_ptr + t * R + rs, mask=rmask, other=0.0)
        bv = tl.load(b_ptr + s * sb_s + ns[:, None] * sb_n + rs[None, :] * sb_r,
                     mask=(ns[:, None] < N) & rmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bv * hv[None, :], axis=1)
    acc = acc * tl.load(scaling_ptr + s)
    tl.store(y_ptr + t * sy_t + ns, acc.to(y_ptr.dtype.element_ty), mask=ns < N)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               token_slots: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """See minikernels.ops.lora_delta (inputs checked there; any strides)."""
    t, k = x.shape
    _, r, _ = lora_a.shape
    n = lora_b.shape[1]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n == 0:
        return y
    if r == 0 or k == 0:
        return y.zero_()
    slots = token_slots.contiguous()
    h = torch.empty(t, r, dtype=torch.float32, device=x.device)
    lora_shrink_kernel[(t, triton.cdiv(r, BLOCK_R))](
        x, lora_a, slots, h, k, r, x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
    lora_expand_kernel[(t, triton.cdiv(n, BLOCK_N))](
        h, lora_b, slots, scaling.contiguous(), y, n, r,
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=4)
    return y


for _dt in ("fp32", "fp16", "bf16"):
    for _ix in ("i32", "i64"):
        register(KernelSpec(
            name=f"lora_shrink[{_dt},slots={_ix}]", fn=lora_shrink_kernel,
            signature={"x_ptr": f"*{_dt}", "a_ptr": f"*{_dt}", "slots_ptr": f"*{_ix}",
                       "h_ptr": "*fp32", "K": "i32", "R": "i32", "sx_t": "i64",
                       "sx_k": "i64", "sa_s": "i64", "sa_r": "i64", "sa_k": "i64",
                       "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=4, num_stages=3))
        register(KernelSpec(
            name=f"lora_expand[{_dt},slots={_ix}]", fn=lora_expand_kernel,
            signature={"h_ptr": "*fp32", "b_ptr": f"*{_dt}", "slots_ptr": f"*{_ix}",
                       "scaling_ptr": "*fp32", "y_ptr": f"*{_dt}", "N": "i32", "R": "i32",
                       "sb_s": "i64", "sb_n": "i64", "sb_r": "i64", "sy_t": "i64",
                       "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"},
            constexprs={"BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R}, num_warps=4, num_stages=3))
