"""Shared pieces of the one-byte-weight fused MoE tests: the W8A16 dispatch check of
tests/test_moe_int8_op.py and tests/test_moe_fp8_op.py (their kernels share moe.py's tiles
and AOT specs), and the LoRA inputs and fp64 update of the W8A8 tests
(tests/test_moe_int8_w8a8_op.py, tests/test_moe_fp8_w8a8_op.py)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def assert_w8a16_dispatch_registered(prefix: str, config: Callable,
                                     k_cases: Sequence[tuple]) -> None:
    """Every (BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, warps, stages, x dtype) that
    ``config(n_pairs, dtype, *case, gate_up)`` picks for a kernel ``{prefix}_gate_up`` /
    ``{prefix}_down`` has an AOT spec, at a BLOCK_K no smaller than the dispatched one;
    each case ends with its ``aligned`` flag. The gate-up kernel's too with ACT
    gelu_tanh for fp16 / bf16 x (moe.py's ``gate_up_activations``), and non-gated
    (GATED False) with relu2 (``gate_up_variants``)."""
    from minikernels.ops.triton.registry import all_kernels

    registered = {}
    for s in all_kernels():
        if s.fn.__name__ in (f"{prefix}_gate_up_kernel", f"{prefix}_down_kernel"):
            c = s.constexprs
            key = (s.fn.__name__, c["BLOCK_M"], c["BLOCK_N"], c["EVEN_K"], c["ALIGNED"],
                   s.num_warps, s.num_stages,
                   s.signature["x_ptr" if "x_ptr" in s.signature else "act_ptr"],
                   c.get("ACT", "silu"), c.get("GATED", True))
            registered[key] = max(registered.get(key, 0), c["BLOCK_K"])
    for dt, tdt in (("*fp16", torch.float16), ("*bf16", torch.bfloat16),
                    ("*fp32", torch.float32)):
        for n_pairs in (1, 100, 1000, 64 * 20, 64 * 40, 64 * 100):
            for case in k_cases:
                for gate_up in (True, False):
                    cfg = config(n_pairs, tdt, *case, gate_up)
                    fn = f"{prefix}_gate_up_kernel" if gate_up else f"{prefix}_down_kernel"
                    acts = ((("silu", True), ("gelu_tanh", True), ("relu2", False))
                            if gate_up and dt != "*fp32" else (("silu", True),))
                    for act, gated in acts:
                        key = (fn, cfg.block_m, cfg.block_n, cfg.even_k, case[-1],
                               cfg.num_warps, cfg.num_stages, dt, act, gated)
                        assert key in registered and registered[key] >= cfg.block_k, key


def lora_delta_by_hand(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, slot: int,
                       e: int, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One LoRA update of expert e at ``slot`` in fp64, rounded to dtype (MoELoRA's
    contract): scaling[slot] * b[slot, e] @ (a[slot, e] @ v)."""
    d = float(scaling[slot]) * (b[slot, e].cpu().double() @ (a[slot, e].cpu().double() @ v))
    return d.to(dtype).double()


def random_moe_lora(t: int, h: int, inter: int, e: int, s: int, r: int, dtype: torch.dtype,
                    device: str, seed: int, gated: bool = True, slots: str = "mixed"):
    """Random MoELoRA adapters (updates O(1) next to the experts'), S = s slots of rank r:
    slots "mixed" in [-1, S), "none" all -1."""
    from minikernels.ops import MoELoRA

    g = torch.Generator().manual_seed(seed)
    n13 = (2 if gated else 1) * inter
    a13 = (torch.randn(s, e, r, h, generator=g) / h ** 0.5).to(dtype)
    b13 = (torch.randn(s, e, n13, r, generator=g) / r ** 0.5).to(dtype)
    a2 = (torch.randn(s, e, r, inter, generator=g) / inter ** 0.5).to(dtype)
    b2 = (torch.randn(s, e, h, r, generator=g) / r ** 0.5).to(dtype)
    slot_ids = torch.randint(-1, s, (t,), generator=g) if slots == "mixed" else \
        torch.full((t,), -1)
    return MoELoRA(*(v.to(device) for v in (a13, b13, a2, b2, slot_ids,
                                            torch.rand(s, generator=g) + 0.5)))
