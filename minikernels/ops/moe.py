"""Op family: mixture of experts. Op: ``minikernels::fused_moe`` (each token through its
top-k experts' gated MLPs, weighted and summed: the MLP of Qwen3-MoE, OLMoE, Mixtral,
Granite-MoE). Backends: reference (ops/reference.py), triton (ops/triton/moe.py).
Tests: tests/test_moe_op.py.

All seven fused ops take ``activation``: the experts' gate activation, "silu" (SwiGLU:
Qwen3-MoE, OLMoE, Mixtral, ...; the default), "gelu" (erf), "gelu_tanh" (Gemma 4's
GELU-tanh-gated experts) or "swigluoai" (GPT-OSS's clamped SwiGLU,
(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit); the
ops' ``alpha`` / ``limit``), vLLM's ``fused_experts`` names; a constexpr of the gate-up
kernels' epilogue. Optional per-expert biases ``w13_bias`` [E, 2I] / ``w2_bias`` [E, H]
(GPT-OSS's; vLLM's ``w1_bias`` / ``w2_bias``): added to the gate / up pre-activations and
to each expert's down output before the router weight (the constexpr ``HAS_BIAS`` of
each kernel). And ``gated``: True (the default) for gated experts (w13 holds gate
rows then up rows, act(gate) * up); False for non-gated ones (w13 holds the up rows only,
act(up): Nemotron 3's squared-ReLU experts, activation "relu2"; vLLM's
``is_act_and_mul=False`` with "relu2_no_mul" / "silu_no_mul" / "gelu_no_mul"), the
gate-up kernels' ``GATED`` constexpr.

Op: ``minikernels::fused_moe_int4``: the same with int4 experts (W4A16, the canonical
int4 layout of docs/int4_format.md per expert). Backends: reference, triton
(ops/triton/moe_int4.py). Tests: tests/test_moe_int4_op.py.

Op: ``minikernels::fused_moe_mxfp4``: the same with MXFP4 experts (W4A16: FP4 e2m1 codes
in 32-value blocks with one E8M0 scale each, GPT-OSS's checkpoint format). Backends:
reference, triton (ops/triton/moe_mxfp4.py). Tests: tests/test_moe_mxfp4_op.py.

Op: ``minikernels::fused_moe_fp8``: the same with FP8 (e4m3) experts and block-wise
scales (W8A16, fp8_matmul's weight layout per expert). Backends: reference, triton
(ops/triton/moe_fp8.py). Tests: tests/test_moe_fp8_op.py.

Op: ``minikernels::fused_moe_int8``: the same with INT8 experts and one fp32 scale per
output row (W8A16, vLLM's ``use_int8_w8a16`` layout). Backends: reference, triton
(ops/triton/moe_int8.py). Tests: tests/test_moe_int8_op.py.

Op: ``minikernels::fused_moe_fp8_w8a8``: the fp8 experts run W8A8 (activations
quantized per token and group of bk columns, fp8 x fp8 tensor-core GEMMs: vLLM's
``use_fp8_w8a8`` with ``block_shape``). Backends: reference, triton
(ops/triton/moe_fp8_w8a8.py; sm_89+). Tests: tests/test_moe_fp8_w8a8_op.py.

Op: ``minikernels::fused_moe_int8_w8a8``: the same int8 experts run W8A8 (activations
quantized per token, int8 x int8 tensor-core GEMMs with exact int32 sums: vLLM's
``use_int8_w8a8`` with ``per_channel_quant``). Backends: reference, triton
(ops/triton/moe_int8_w8a8.py). Tests: tests/test_moe_int8_w8a8_op.py.

The seven fused ops take optional per-token LoRA adapters on the experts (``MoELoRA``:
PEFT adapters trained with expert targets on Qwen3-MoE / OLMoE / Mixtral), applied
inside the MoE computation. Tests: tests/test_moe_lora_op.py.

Op: ``minikernels::moe_align_block_size``: vLLM's MoE alignment step (the (token, slot)
pairs grouped by expert into block_size tiles, the layout of the fused MoE kernels).
Backends: reference, triton (ops/triton/moe_align.py; the seven fused MoE Triton paths sort
with it). Tests: tests/test_moe_align_op.py.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, HALF_DTYPES, check_index_range, check_tensor
from . import reference
from .fp8 import check_block_size
from .reference import (MOE_ACTIVATIONS, MOE_NONGATED_ACTIVATIONS, SWIGLUOAI_ALPHA,
                        SWIGLUOAI_LIMIT)


class MoELoRA(NamedTuple):
    """Per-token LoRA adapters on the experts of a fused MoE op (all seven: dense, int4,
    fp8, int8, MXFP4 experts; the 8-bit ones W8A16 or W8A8), S adapter slots; ranks R13 (gate / up) and R2 (down), each adapter
    zero-padded to its slot's rank:

    a13         [S, E, R13, H]   x.dtype  lora_A of each expert's gate_proj and up_proj,
                                          stacked along R13 (gate's rows, then up's:
                                          R13 = 2r when both are adapted with rank r)
    b13         [S, E, 2I, R13]  x.dtype  lora_B of gate_proj (rows :I) and up_proj (rows
                                          I:), block-diagonal against a13's stacking (0
                                          where a row of B meets the other module's A)
                                          (non-gated experts, gated=False: b13
                                          [S, E, I, R13], lora_B of up_proj; a13 is
                                          up_proj's lora_A)
    a2          [S, E, R2, I]    x.dtype  lora_A of down_proj
    b2          [S, E, H, R2]    x.dtype  lora_B of down_proj
    token_slots [T] int32 / int64 in [-1, S): each token's adapter slot, -1 = base model
    scaling     [S] fp32: lora_alpha / r (or / sqrt(r) for rsLoRA) per slot (one per
                slot: a module with another scale folds the ratio into its B rows)
    Any strides (a stack whose S and E dims do not merge into one stride is copied per
    call). For pair p = (t, j), e = topk_ids[t, j], s = token_slots[t] >= 0:
      d13_p = round_to_x_dtype(scaling[s] * b13[s, e] @ (a13[s, e] @ x[t]))
      gate / up pre-activations of p (fp32) += d13_p[:I] / d13_p[I:];
        act_p = act(gate) * up rounded to x.dtype (act: the op's ``activation``)
        (non-gated: up += d13_p; act_p = act(up) rounded to x.dtype)
      d2_p = round_to_x_dtype(scaling[s] * b2[s, e] @ (a2[s, e] @ act_p))
      the down projection's fp32 result of p += d2_p, then times topk_weights[t, j];
        the k-sum in fp32, rounded once.
    Each d is ``lora_delta``'s math: fp32, the rank-R intermediate never rounded.
    s = -1: exactly the op without LoRA."""
    a13: Tensor
    b13: Tensor
    a2: Tensor
    b2: Tensor
    token_slots: Tensor
    scaling: Tensor


_LORA_ARGS = ("lora_a13", "lora_b13", "lora_a2", "lora_b2", "lora_token_slots",
              "lora_scaling")
_NO_LORA: tuple[None, ...] = (None,) * 6


def _op_lora(*tensors: Tensor | None) -> MoELoRA | None:
    """The op's six optional LoRA arguments -> MoELoRA, or None when none is given; some
    but not all: a ValueError naming the first missing one."""
    if all(v is None for v in tensors):
        return None
    for name, v in zip(_LORA_ARGS, tensors):
        if v is None:
            raise ValueError(f"{name} is missing: give all six LoRA tensors "
                             f"({', '.join(_LORA_ARGS)}) or none")
    return MoELoRA(*tensors)


def _fused_moe_op(name: str
                  ) -> Callable[[Callable[..., Tensor]], torch.library.CustomOpDef]:
    """``torch.library.custom_op("minikernels::<name>")`` for one of the seven fused MoE
    ops, with the fake (meta) kernel they share: out [T, H] like x (contiguous), after the
    checks the real kernel makes of the op's trailing arguments (the six LoRA tensors all
    or none, ``activation`` / ``gated``, ``alpha`` / ``limit``). The decorated function's
    signature is the op's schema; it must have x first, the six ``lora_*`` arguments,
    ``w13_bias`` / ``w2_bias``, ``alpha`` / ``limit``, ``activation`` and ``gated``
    (the last two last)."""
    def register(fn: Callable[..., Tensor]) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"minikernels::{name}", mutates_args=())(fn)
        signature = inspect.signature(fn)

        @op.register_fake
        def _(*args: object, **kwargs: object) -> Tensor:
            # the dispatcher may leave out trailing arguments at their defaults: bind them
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            _op_lora(*(a[arg] for arg in _LORA_ARGS))
            _check_activation(a["activation"], a["gated"])
            _check_swiglu(a["alpha"], a["limit"])
            return torch.empty_like(a["x"], memory_format=torch.contiguous_format)
        return op
    return register


def _check_activation(activation: object, gated: object = True) -> str:
    """fused_moe*'s ``activation`` and ``gated``: gated experts take one of
    MOE_ACTIVATIONS ("silu", "gelu", "gelu_tanh", "swigluoai"); non-gated ones
    (gated=False) one of MOE_NONGATED_ACTIVATIONS ("silu", "gelu", "gelu_tanh",
    "relu2")."""
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
    allowed = MOE_ACTIVATIONS if gated else MOE_NONGATED_ACTIVATIONS
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {allowed}, got "
                        f"{type(activation).__name__}")
    if gated and activation == "relu2":
        raise ValueError("activation 'relu2' (squared ReLU: Nemotron 3's experts) is for "
                         "non-gated experts: pass gated=False (w13 [E, I, H], the up_proj "
                         f"rows only); gated experts (gated=True) take one of {allowed}")
    if not gated and activation == "swigluoai":
        raise ValueError("activation 'swigluoai' (GPT-OSS's clamped SwiGLU) gates the up "
                         "projection: it is for gated experts (gated=True, w13 [E, 2I, H]); "
                         f"non-gated experts (gated=False) take one of {allowed}")
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}"
                         f"{'' if gated else ' with gated=False'}, got {activation!r}")
    return activation


def _check_swiglu(alpha: object, limit: object) -> tuple[float, float]:
    """fused_moe*'s ``alpha`` / ``limit`` (swigluoai's; read by that activation only):
    finite numbers, limit > 0."""
    import math

    for name, v in (("alpha", alpha), ("limit", limit)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if limit <= 0:
        raise ValueError(f"limit must be > 0 (swigluoai clamps up to [-limit, limit]), got "
                         f"{limit!r}")
    return float(alpha), float(limit)


def _check_biases(x: Tensor, w13_bias: Tensor | None, w2_bias: Tensor | None,
                  num_experts: int, rows13: int, gated: bool) -> None:
    """fused_moe*'s optional expert biases: w13_bias [E, 2I] (gated=False: [E, I]) and
    w2_bias [E, H], each in x.dtype on x's device, any strides; None = no bias."""
    h = x.shape[1]
    for name, b, dims, shape in (
            ("w13_bias", w13_bias, "[E, 2I]" if gated else "[E, I]", (num_experts, rows13)),
            ("w2_bias", w2_bias, "[E, H]", (num_experts, h))):
        if b is None:
            continue
        check_tensor(name, b, dtypes=(x.dtype,), ndim=2, device=x.device)
        if tuple(b.shape) != shape:
            raise ValueError(f"{name} must have shape {dims} = {list(shape)} (one bias row "
                             f"per expert), got {list(b.shape)}")


def _expert_inter(name: str, w13_shape: tuple[int, ...] | torch.Size, w2_inter: int,
                  gated: bool, got: object) -> int:
    """The intermediate size I from the rows of w13 (op argument ``name``): 2I gated
    experts' (gate rows then up rows), I non-gated ones' (gated=False: up rows only);
    ``w2_inter``: w2's I, ``got``: what a gated error shows of w13."""
    n13 = w13_shape[1]
    if gated:
        if n13 == 0 or n13 % 2:
            raise ValueError(f"{name}'s second dim must be 2I > 0 (gate rows then up "
                             f"rows), got {got}")
        return n13 // 2
    if n13 == 0:
        raise ValueError(f"{name}'s second dim must be I > 0 (gated=False: the up_proj "
                         f"rows only), got {list(w13_shape)}")
    if n13 == 2 * w2_inter:
        raise ValueError(f"{name} must have I = {w2_inter} rows per expert with "
                         f"gated=False (the up_proj rows only; I from w2), got "
                         f"{list(w13_shape)}: gate and up rows stacked (2I) are gated "
                         f"experts' (gated=True)")
    return n13


def _check_lora(lora: object, x: Tensor, num_experts: int, inter: int, gated: bool = True
                ) -> tuple[Tensor | None, ...]:
    """Check fused_moe*'s ``lora`` against x [T, H], E and I (b13: 2I rows for gated
    experts, I for non-gated ones); return the op's six LoRA arguments (all None without
    LoRA). Errors name the op argument (lora_a13 ...) and the MoELoRA field."""
    if lora is None:
        return _NO_LORA
    if not isinstance(lora, tuple) or len(lora) != 6:
        raise TypeError(f"lora must be a minikernels.ops.MoELoRA (a13, b13, a2, b2, "
                        f"token_slots, scaling) or None, got {type(lora).__name__}")
    lora = MoELoRA(*lora)
    for name, field, v in zip(_LORA_ARGS, MoELoRA._fields, lora):
        if v is None:
            raise ValueError(f"{name} (MoELoRA.{field}) is missing: give all six LoRA "
                             f"tensors or lora=None")
    t, h = x.shape
    for name, v in zip(_LORA_ARGS[:4], lora[:4]):
        check_tensor(name, v, dtypes=(x.dtype,), ndim=4, device=x.device)
    check_tensor("lora_token_slots", lora.token_slots, dtypes=(torch.int32, torch.int64),
                 ndim=1, device=x.device)
    check_tensor("lora_scaling", lora.scaling, dtypes=(torch.float32,), ndim=1,
                 device=x.device)
    s, _, r13, _ = lora.a13.shape
    r2 = lora.a2.shape[2]
    e = num_experts
    b13 = ("[S, E, 2I, R13]", (s, e, 2 * inter, r13)) if gated else \
        ("[S, E, I, R13]", (s, e, inter, r13))
    want = (("[S, E, R13, H]", (s, e, r13, h)), b13,
            ("[S, E, R2, I]", (s, e, r2, inter)), ("[S, E, H, R2]", (s, e, h, r2)))
    for name, v, (dims, shape) in zip(_LORA_ARGS[:4], lora[:4], want):
        if tuple(v.shape) != shape:
            raise ValueError(f"{name} must have shape {dims} = {list(shape)} (S and R13 "
                             f"from lora_a13, R2 from lora_a2, E = {e}, H = {h}, "
                             f"I = {inter}" + ("" if gated else ", gated=False: "
                                               "lora_b13 covers the up rows only")
                             + f"), got {list(v.shape)}")
    if lora.token_slots.shape[0] != t:
        raise ValueError(f"lora_token_slots must have one entry per token ([T = {t}]), "
                         f"got {list(lora.token_slots.shape)}")
    if lora.scaling.shape[0] != s:
        raise ValueError(f"lora_scaling must have one entry per slot ([S = {s}]), got "
                         f"{list(lora.scaling.shape)}")
    if t:
        check_index_range("lora_token_slots", lora.token_slots, -1, s)
    return tuple(lora)


@_fused_moe_op("fused_moe")
def _fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
               lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
               lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
               lora_token_slots: Tensor | None = None,
               lora_scaling: Tensor | None = None,
               w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
               alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
               activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    _check_activation(activation, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    args = (x, w13, w2, topk_weights, topk_ids, lora, activation, gated, w13_bias, w2_bias,
            alpha, limit)
    if _backend.resolve("fused_moe", x.device) == "triton":
        from .triton import moe as triton_moe
        return triton_moe.fused_moe(*args)
    return reference.fused_moe(*args)


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
              topk_ids: Tensor, *, lora: MoELoRA | None = None,
              activation: str = "silu", gated: bool = True,
              w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
              alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """A mixture-of-experts MLP with gated experts: out [T, H] in x.dtype,
    out[t] = sum_j topk_weights[t, j] * (w2[e] @ act(g, u) + w2_bias[e]) with
    e = topk_ids[t, j], g = w13[e, :I] @ x[t] + w13_bias[e, :I] (the gate) and
    u = w13[e, I:] @ x[t] + w13_bias[e, I:] (the up projection); act(g, u) = act(g) * u.

    activation: act, vLLM's ``fused_experts`` names: "silu" (SwiGLU; the default),
    "gelu" (erf: gelu(g) = g * Phi(g)) or "gelu_tanh" (0.5 g (1 + tanh(sqrt(2/pi)
    (g + 0.044715 g^3))): Gemma 4's experts, ``gelu_pytorch_tanh``); fp32 math as
    ``gelu_and_mul``. "swigluoai" (GPT-OSS's experts, vLLM's name): act(g, u) =
    (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g') with g' = min(g, limit)
    (``reference.moe_swigluoai``). Another value: ValueError.

    alpha, limit: swigluoai's sigmoid gain and clamp (GPT-OSS's ``swiglu_alpha`` /
    ``swiglu_limit``; defaults 1.702 / 7.0); finite floats, limit > 0; read by
    "swigluoai" only.

    w13_bias: optional [E, 2I] in x.dtype (gated=False: [E, I]), each expert's gate
    biases then its up biases, added to the fp32 pre-activations; w2_bias: optional
    [E, H] in x.dtype, added to each expert's fp32 down output before the router weight
    multiplies it (vLLM's ``w1_bias`` / ``w2_bias``; GPT-OSS's ``gate_up_proj_bias`` /
    ``down_proj_bias``, de-interleaved). Any strides. None: no bias (bit for bit the op
    without it).

    gated: True (the default) as above. False: non-gated experts (Nemotron 3's; vLLM's
    ``is_act_and_mul=False``), w13 [E, I, H] holds each expert's up_proj rows only and
    out[t] = sum_j topk_weights[t, j] * w2[e] @ act(w13[e] @ x[t]), act one of "silu",
    "gelu", "gelu_tanh" or "relu2" (squared ReLU, relu(u)^2: Nemotron 3, vLLM's
    "relu2_no_mul"; non-gated only: "relu2" with gated=True is a ValueError naming both).

    x [T, H] fp16/bf16/fp32; w13 [E, 2I, H] in x's dtype (each expert's gate_proj rows,
    then its up_proj rows; gated=False: [E, I, H], up_proj); w2 [E, H, I] in x's dtype
    (down_proj); topk_weights [T, k] fp32 (the router's weights, already normalized as
    the model wants); topk_ids [T, k] int32/int64 in [0, E) (the same expert twice in a
    row is allowed: both count). Every tensor may be a view with its own strides. fp32
    accumulation; the activated [I] intermediate is rounded to x.dtype; out is rounded
    once.

    lora: optional per-token LoRA adapters on the experts (:class:`MoELoRA`: layouts,
    dtypes and the exact math there): each (token, expert) pair's gate / up
    pre-activations get its expert's adapter update before the activation-and-mul, and its
    down projection its update before the router weight. Slot -1 or lora=None: the
    result without LoRA, bit for bit. Non-gated experts: lora.b13 [S, E, I, R13] (the up
    rows only), added to up before the activation.
    """
    _check_activation(activation, gated)
    _check_input_dtypes(x, FLOAT_DTYPES, ("w13", w13), ("w2", w2), None, topk_weights,
                        topk_ids)
    e, two_i, h = w13.shape
    if h != x.shape[1]:
        raise ValueError(f"w13 must have shape [E, {'2I' if gated else 'I'}, H = "
                         f"{x.shape[1]}], got {list(w13.shape)}")
    inter = _expert_inter("w13", w13.shape, w2.shape[2], gated, two_i)
    if tuple(w2.shape) != (e, h, inter):
        raise ValueError(f"w2 must have shape [E = {e}, H = {h}, I = {inter}], got "
                         f"{list(w2.shape)}")
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe(x, w13, w2, topk_weights, topk_ids, *lora_args,
                                           w13_bias, w2_bias, alpha, limit, activation, gated)


# ------------------------------------------------------------------------ int4 experts

@_fused_moe_op("fused_moe_int4")
def _fused_moe_int4(x: Tensor, w13_qweight: Tensor, w13_scales: Tensor, w13_zeros: Tensor,
                    w2_qweight: Tensor, w2_scales: Tensor, w2_zeros: Tensor,
                    topk_weights: Tensor, topk_ids: Tensor, group_size: int,
                    lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
                    lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
                    lora_token_slots: Tensor | None = None,
                    lora_scaling: Tensor | None = None,
                    w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                    alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                    activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    args = (x, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros,
            topk_weights, topk_ids, group_size, lora, _check_activation(activation, gated),
            gated, w13_bias, w2_bias, *_check_swiglu(alpha, limit))
    if _backend.resolve("fused_moe_int4", x.device) == "triton":
        from .triton import moe_int4 as triton_moe_int4
        return triton_moe_int4.fused_moe_int4(*args)
    return reference.fused_moe_int4(*args)


def _check_int4_experts(prefix: str, qweight: Tensor, scales: Tensor, zeros: Tensor,
                        shape: tuple[int, int, int], group_size: int,
                        device: torch.device) -> None:
    """qweight int32 [E, N, K/8], scales / zeros [E, N, K/G] (fp16/bf16, one dtype)."""
    e, n, k = shape
    check_tensor(f"{prefix}_qweight", qweight, dtypes=(torch.int32,), ndim=3, device=device)
    if tuple(qweight.shape) != (e, n, k // 8):
        raise ValueError(f"{prefix}_qweight must have shape [E = {e}, {n}, {k} / 8 = "
                         f"{k // 8}] (int32 words of 8 nibbles packed along K), got "
                         f"{list(qweight.shape)}")
    groups = 1 if group_size == -1 else k // group_size
    check_tensor(f"{prefix}_scales", scales, dtypes=HALF_DTYPES, ndim=3, device=device)
    if tuple(scales.shape) != (e, n, groups):
        raise ValueError(f"{prefix}_scales must have shape [E = {e}, {n}, K / G = {groups}], "
                         f"got {list(scales.shape)}")
    check_tensor(f"{prefix}_zeros", zeros, dtypes=(scales.dtype,), ndim=3, device=device)
    if tuple(zeros.shape) != (e, n, groups):
        raise ValueError(f"{prefix}_zeros must have shape [E = {e}, {n}, K / G = {groups}], "
                         f"got {list(zeros.shape)}")


def fused_moe_int4(x: Tensor, w13_qweight: Tensor, w13_scales: Tensor, w13_zeros: Tensor,
                   w2_qweight: Tensor, w2_scales: Tensor, w2_zeros: Tensor,
                   topk_weights: Tensor, topk_ids: Tensor, group_size: int, *,
                   lora: MoELoRA | None = None, activation: str = "silu",
                   gated: bool = True, w13_bias: Tensor | None = None,
                   w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                   limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe` with int4 experts (W4A16): out [T, H] in x.dtype, exactly
    fused_moe on the dequantized experts W = (q - z) * s rounded to x.dtype.

    Each expert's matrix is in the canonical int4 layout (docs/int4_format.md): int32 words
    packed along K, lowest nibble first; scales and zeros per (row, group of G along K).
    x [T, H] fp16/bf16 (as int4_matmul: no fp32); w13_qweight int32 [E, 2I, H/8] (each
    expert's gate_proj rows, then its up_proj rows); w13_scales / w13_zeros [E, 2I, H/G];
    w2_qweight int32 [E, H, I/8] (down_proj); w2_scales / w2_zeros [E, H, I/G]. Scales are
    fp16 or bf16, zeros in the scales' dtype (float zero points); scales and zeros of the
    other half type than x are converted to x.dtype first (int4_matmul's kernels do the
    same). group_size: a positive multiple of 8 dividing both H and I (32, 64, 128
    typical), or -1 = per channel (G = H for w13, G = I for w2). H and I are multiples of
    8. topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count).
    Every tensor may be a view with its own strides (a strided last dim is copied).
    fp32 accumulation; the activated [I] intermediate is rounded to x.dtype; out is
    rounded once.
    lora: optional per-token LoRA on the experts, as :func:`fused_moe` (:class:`MoELoRA`,
    dense adapters in x.dtype added to the int4 experts' fp32 results).
    activation: the experts' gate activation, "silu" / "gelu" / "gelu_tanh" /
    "swigluoai" (with ``alpha`` / ``limit``), as :func:`fused_moe`.
    w13_bias / w2_bias: optional dense expert biases [E, 2I] / [E, H] in x.dtype, as
    :func:`fused_moe` (added to the int4 experts' fp32 results).
    gated: False for non-gated experts (as :func:`fused_moe`: act(up), activation also
    "relu2"): w13_qweight [E, I, H/8] and w13_scales / w13_zeros [E, I, H/G] hold each
    expert's up_proj rows only.
    """
    _check_activation(activation, gated)
    _check_input_dtypes(x, HALF_DTYPES, ("w13_qweight", w13_qweight),
                        ("w2_qweight", w2_qweight), torch.int32, topk_weights, topk_ids)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    h = x.shape[1]
    if h == 0 or h % 8:
        raise ValueError(f"x's hidden size H must be a positive multiple of 8 (int4 words "
                         f"hold 8 values), got x shape {list(x.shape)}")
    e, two_i = w13_qweight.shape[0], w13_qweight.shape[1]
    inter = _expert_inter("w13_qweight", w13_qweight.shape, w2_qweight.shape[2] * 8, gated,
                          list(w13_qweight.shape))
    if w13_qweight.shape[2] != h // 8:
        raise ValueError(f"w13_qweight must have shape [E, {'2I' if gated else 'I'}, H / 8 "
                         f"= {h // 8}] (x's H = {h}), got {list(w13_qweight.shape)}")
    if inter % 8:
        raise ValueError(f"the intermediate size I must be a multiple of 8 (int4 words), "
                         f"got w13_qweight shape {list(w13_qweight.shape)} (I = {inter})")
    if group_size != -1:
        if group_size <= 0 or group_size % 8:
            raise ValueError(f"group_size must be -1 (per channel) or a positive multiple "
                             f"of 8, got {group_size}")
        if h % group_size or inter % group_size:
            raise ValueError(f"group_size ({group_size}) must divide H ({h}) and I "
                             f"({inter})")
    _check_int4_experts("w13", w13_qweight, w13_scales, w13_zeros, (e, two_i, h),
                        group_size, x.device)
    _check_int4_experts("w2", w2_qweight, w2_scales, w2_zeros, (e, h, inter),
                        group_size, x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_int4(x, w13_qweight, w13_scales, w13_zeros,
                                                w2_qweight, w2_scales, w2_zeros,
                                                topk_weights, topk_ids, group_size,
                                                *lora_args, w13_bias, w2_bias, alpha, limit,
                                                activation, gated)


# ----------------------------------------------------------------------- MXFP4 experts

@_fused_moe_op("fused_moe_mxfp4")
def _fused_moe_mxfp4(x: Tensor, w13_blocks: Tensor, w13_scales: Tensor, w2_blocks: Tensor,
                     w2_scales: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                     lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
                     lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
                     lora_token_slots: Tensor | None = None,
                     lora_scaling: Tensor | None = None,
                     w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                     alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                     activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    args = (x, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights, topk_ids, lora,
            _check_activation(activation, gated), gated, w13_bias, w2_bias,
            *_check_swiglu(alpha, limit))
    if _backend.resolve("fused_moe_mxfp4", x.device) == "triton":
        from .triton import moe_mxfp4 as triton_moe_mxfp4
        return triton_moe_mxfp4.fused_moe_mxfp4(*args)
    return reference.fused_moe_mxfp4(*args)


def _check_mxfp4_experts(prefix: str, blocks: Tensor, scales: Tensor,
                         shape: tuple[int, int, int], device: torch.device) -> None:
    """blocks uint8 [E, N, K/32, 16] (dtype / device checked by the caller), scales uint8
    [E, N, K/32]."""
    e, n, k = shape
    if tuple(blocks.shape) != (e, n, k // 32, 16):
        raise ValueError(f"{prefix}_blocks must have shape [E = {e}, {n}, {k} / 32 = "
                         f"{k // 32}, 16] (32 FP4 codes per 16-byte block along K), got "
                         f"{list(blocks.shape)}")
    check_tensor(f"{prefix}_scales", scales, dtypes=(torch.uint8,), ndim=3, device=device)
    if tuple(scales.shape) != (e, n, k // 32):
        raise ValueError(f"{prefix}_scales must have shape [E = {e}, {n}, {k} / 32 = "
                         f"{k // 32}] (one E8M0 byte per block), got {list(scales.shape)}")


def fused_moe_mxfp4(x: Tensor, w13_blocks: Tensor, w13_scales: Tensor, w2_blocks: Tensor,
                    w2_scales: Tensor, topk_weights: Tensor, topk_ids: Tensor, *,
                    lora: MoELoRA | None = None, activation: str = "silu",
                    gated: bool = True, w13_bias: Tensor | None = None,
                    w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                    limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe` with MXFP4 experts (W4A16, OCP MX FP4, the GPT-OSS checkpoints'
    ``*_blocks`` / ``*_scales``): out [T, H] in x.dtype, exactly fused_moe on the
    dequantized experts W[e, n, 32g + i] = FP4_E2M1[code] * 2 ** (scales[e, n, g] - 127)
    rounded to x.dtype (exact for bf16 / fp32 short of their range's ends, for fp16
    while |W| lies in [2^-24, 65504]; the kernels decode and scale each weight tile in
    registers), i.e. ``reference.fused_moe_mxfp4``.

    x          [T, H] fp16 / bf16 / fp32 (fp32: exact fp32 dots, slower tiles).
    w13_blocks uint8 [E, 2I, H/32, 16]: each expert's gate_proj rows, then its up_proj
               rows (NOT GPT-OSS's stored interleaving gate, up, gate, up, ...: permute
               the rows first, e.g. models/gpt_oss.py's ``deinterleave`` on dim 1, no
               dequantization); per row, H/32 blocks of 16 bytes, each byte two FP4 e2m1
               codes (the even element in the low nibble, the odd one in the high
               nibble; a code: sign bit 3, exponent bits 2..1, mantissa bit 0, values
               0, 0.5, 1, 1.5, 2, 3, 4, 6). w13_scales uint8 [E, 2I, H/32]: one E8M0
               scale byte per block, 2 ** (s - 127) (255, E8M0's NaN, is not a valid
               scale).
    w2_blocks  uint8 [E, H, I/32, 16] (down_proj), w2_scales uint8 [E, H, I/32].
    H and I    positive multiples of 32 (one block); I from w2_blocks.
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count):
               fused_moe's routing contract.
    Every tensor may be a view with its own strides (the kernels read each block's 16
    bytes as 4 int32 words in place; blocks whose bytes are not contiguous and 4-byte
    aligned are copied first); T = 0 gives [0, H]. fp32 accumulation; the activated [I] intermediate
    is rounded to x.dtype; the router weight and the k-sum are fp32; out rounded once.
    lora       optional per-token LoRA on the experts, as :func:`fused_moe`
               (:class:`MoELoRA`, dense adapters in x.dtype added to the fp32 results).
    activation the experts' gate activation, "silu" / "gelu" / "gelu_tanh" /
               "swigluoai" (GPT-OSS's, with ``alpha`` / ``limit``), as :func:`fused_moe`.
    w13_bias / w2_bias  optional dense expert biases [E, 2I] / [E, H] in x.dtype, as
               :func:`fused_moe` (gate biases then up biases, de-interleaved like w13).
    gated      False for non-gated experts (as :func:`fused_moe`: act(up), activation
               also "relu2"): w13_blocks [E, I, H/32, 16] / w13_scales [E, I, H/32] hold
               each expert's up_proj rows only.
    """
    _check_activation(activation, gated)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    for name, blocks in (("w13_blocks", w13_blocks), ("w2_blocks", w2_blocks)):
        check_tensor(name, blocks, dtypes=(torch.uint8,), ndim=4, device=x.device)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                 device=x.device)
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2,
                 device=x.device)
    h = x.shape[1]
    if h == 0 or h % 32:
        raise ValueError(f"x's hidden size H must be a positive multiple of 32 (one MXFP4 "
                         f"block), got x shape {list(x.shape)}")
    e, two_i = w13_blocks.shape[0], w13_blocks.shape[1]
    inter = _expert_inter("w13_blocks", w13_blocks.shape, w2_blocks.shape[2] * 32, gated,
                          list(w13_blocks.shape))
    if inter % 32:
        raise ValueError(f"the intermediate size I must be a multiple of 32 (one MXFP4 "
                         f"block), got w13_blocks shape {list(w13_blocks.shape)} "
                         f"(I = {inter})")
    _check_mxfp4_experts("w13", w13_blocks, w13_scales, (e, two_i, h), x.device)
    _check_mxfp4_experts("w2", w2_blocks, w2_scales, (e, h, inter), x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_mxfp4(x, w13_blocks, w13_scales, w2_blocks,
                                                 w2_scales, topk_weights, topk_ids,
                                                 *lora_args, w13_bias, w2_bias, alpha,
                                                 limit, activation, gated)


# ------------------------------------------------------------------------- fp8 experts

def _check_w8a16_inputs(x: Tensor, w13: Tensor, w2: Tensor, wdtype: torch.dtype,
                        topk_weights: Tensor, topk_ids: Tensor, gated: bool = True
                        ) -> tuple[int, int, int, int]:
    """fused_moe_fp8's / fused_moe_int8's x, one-byte weights (dtype wdtype), routing
    dtypes and w13's shape; (H, E, 2I, I) from x [T, H] and w13 [E, 2I, H]
    (gated=False: (H, E, I, I) from w13 [E, I, H])."""
    _check_input_dtypes(x, FLOAT_DTYPES, ("w13", w13), ("w2", w2), wdtype, topk_weights,
                        topk_ids)
    h = x.shape[1]
    e, two_i = w13.shape[0], w13.shape[1]
    if h == 0:
        raise ValueError(f"x's hidden size H must be positive, got x shape {list(x.shape)}")
    inter = _expert_inter("w13", w13.shape, w2.shape[2], gated, list(w13.shape))
    if w13.shape[2] != h:
        raise ValueError(f"w13 must have shape [E, {'2I' if gated else 'I'}, H = {h}] "
                         f"(x's H), got {list(w13.shape)}")
    return h, e, two_i, inter


def _check_expert_shape(name: str, weight: Tensor, shape: tuple[int, int, int]) -> None:
    """An expert stack's weight [E, N, K] (dtype checked by the caller)."""
    e, n, k = shape
    if tuple(weight.shape) != (e, n, k):
        raise ValueError(f"{name} must have shape [E = {e}, {n}, {k}], got "
                         f"{list(weight.shape)}")


# The op takes the fp8 weights' bytes (a free uint8 view), as fp8_matmul's op does: torch's
# schema checks (opcheck) compare inputs with allclose, which float8 lacks on the CPU.
@_fused_moe_op("fused_moe_fp8")
def _fused_moe_fp8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor,
                   topk_weights: Tensor, topk_ids: Tensor, block_size: list[int],
                   lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
                   lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
                   lora_token_slots: Tensor | None = None,
                   lora_scaling: Tensor | None = None,
                   w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                   alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                   activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    _check_activation(activation, gated)
    extra = (w13_bias, w2_bias, *_check_swiglu(alpha, limit))
    if _backend.resolve("fused_moe_fp8", x.device) == "triton":
        from .triton import moe_fp8 as triton_moe_fp8
        return triton_moe_fp8.fused_moe_fp8(x, w13, w13_scale, w2, w2_scale, topk_weights,
                                            topk_ids, block_size, lora, activation, gated,
                                            *extra)
    return reference.fused_moe_fp8(x, w13.view(torch.float8_e4m3fn), w13_scale,
                                   w2.view(torch.float8_e4m3fn), w2_scale, topk_weights,
                                   topk_ids, (block_size[0], block_size[1]), lora,
                                   activation, gated, *extra)


def _check_fp8_experts(name: str, weight: Tensor, scale: Tensor, shape: tuple[int, int, int],
                       bn: int, bk: int, device: torch.device) -> None:
    """weight float8_e4m3fn [E, N, K] (dtype checked by the caller), scale fp32
    [E, ceil(N / bn), ceil(K / bk)]."""
    e, n, k = shape
    _check_expert_shape(name, weight, shape)
    want = [e, -(-n // bn), -(-k // bk)]
    check_tensor(f"{name}_scale", scale, dtypes=(torch.float32,), ndim=3, device=device)
    if list(scale.shape) != want:
        raise ValueError(f"{name}_scale must have shape [E, ceil({n} / bn), ceil({k} / bk)] "
                         f"= {want} for block_size ({bn}, {bk}), got {list(scale.shape)}")


def fused_moe_fp8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor,
                  topk_weights: Tensor, topk_ids: Tensor,
                  block_size: tuple[int, int] | list[int], *,
                  lora: MoELoRA | None = None, activation: str = "silu",
                  gated: bool = True, w13_bias: Tensor | None = None,
                  w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                  limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe` with FP8 (e4m3) experts and block-wise scales (W8A16): out [T, H]
    in x.dtype, exactly fused_moe on the dequantized experts
    W_e[n, k] = float(weight[e, n, k]) * scale[e, n // bn, k // bk] kept in fp32 (NOT
    rounded to x.dtype: the kernels scale each K tile's fp32 partial sum by its block
    scale), i.e. ``reference.fused_moe_fp8``.

    x          [T, H] fp16 / bf16 / fp32 (fp32: exact fp32 dots, slower tiles).
    w13        [E, 2I, H] torch.float8_e4m3fn: each expert's gate_proj rows, then its
               up_proj rows. w13_scale fp32 [E, ceil(2I / bn), ceil(H / bk)].
    w2         [E, H, I] torch.float8_e4m3fn (down_proj). w2_scale fp32
               [E, ceil(H / bn), ceil(I / bk)].
    block_size (bn, bk) positive ints, one pair for both matrices; bk a multiple of 16 or
               >= the K of each matrix (H for w13, I for w2). (128, 128): DeepSeek-V3 /
               Qwen3-FP8 MoE checkpoints (scales = their ``weight_scale_inv``); per channel:
               (1, K) with K >= max(H, I) (scales [E, 2I, 1] and [E, H, 1]); a block past a
               matrix's edge covers the whole edge.
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count):
               fused_moe's routing contract.
    Every tensor may be a view with its own strides; T = 0 gives [0, H]. The NaN bytes
    0x7F / 0xFF are not valid weights (undefined results). fp32 accumulation; the
    activated [I] intermediate is rounded to x.dtype; the k-sum is fp32; out is rounded
    once.
    lora       optional per-token LoRA on the experts, as :func:`fused_moe`
               (:class:`MoELoRA`, dense adapters in x.dtype added to the fp8 experts' fp32
               results).
    activation the experts' gate activation, "silu" / "gelu" / "gelu_tanh" /
               "swigluoai" (with ``alpha`` / ``limit``), as :func:`fused_moe`.
    w13_bias / w2_bias  optional dense expert biases [E, 2I] / [E, H] in x.dtype, as
               :func:`fused_moe` (added to the fp8 experts' fp32 results).
    gated      False for non-gated experts (as :func:`fused_moe`: act(up), activation
               also "relu2"): w13 [E, I, H] holds each expert's up_proj rows only,
               w13_scale fp32 [E, ceil(I / bn), ceil(H / bk)].
    """
    _check_activation(activation, gated)
    h, e, two_i, inter = _check_w8a16_inputs(x, w13, w2, torch.float8_e4m3fn,
                                              topk_weights, topk_ids, gated)
    # bk % 16 == 0, or one K block in both matrices (bk >= H and bk >= I)
    bn, bk = check_block_size(block_size, max(h, inter))
    _check_fp8_experts("w13", w13, w13_scale, (e, two_i, h), bn, bk, x.device)
    _check_fp8_experts("w2", w2, w2_scale, (e, h, inter), bn, bk, x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_fp8(
        x, w13.view(torch.uint8), w13_scale, w2.view(torch.uint8), w2_scale, topk_weights,
        topk_ids, [bn, bk], *lora_args, w13_bias, w2_bias, alpha, limit, activation, gated)


# ------------------------------------------------------------------------ int8 experts

@_fused_moe_op("fused_moe_int8")
def _fused_moe_int8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                    w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
                    lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
                    lora_token_slots: Tensor | None = None,
                    lora_scaling: Tensor | None = None,
                    w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                    alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                    activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    args = (x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, lora,
            _check_activation(activation, gated), gated, w13_bias, w2_bias,
            *_check_swiglu(alpha, limit))
    if _backend.resolve("fused_moe_int8", x.device) == "triton":
        from .triton import moe_int8 as triton_moe_int8
        return triton_moe_int8.fused_moe_int8(*args)
    return reference.fused_moe_int8(*args)


def _check_int8_experts(name: str, weight: Tensor, scale: Tensor,
                        shape: tuple[int, int, int], device: torch.device) -> None:
    """weight int8 [E, N, K] (dtype checked by the caller), scale fp32 [E, N]."""
    e, n, _ = shape
    _check_expert_shape(name, weight, shape)
    check_tensor(f"{name}_scale", scale, dtypes=(torch.float32,), ndim=2, device=device)
    if tuple(scale.shape) != (e, n):
        raise ValueError(f"{name}_scale must have shape [E = {e}, {n}] (one scale per "
                         f"output row of {name}), got {list(scale.shape)}")


def fused_moe_int8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor,
                   topk_weights: Tensor, topk_ids: Tensor, *,
                   lora: MoELoRA | None = None, activation: str = "silu",
                   gated: bool = True, w13_bias: Tensor | None = None,
                   w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                   limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe` with INT8 experts and per-output-channel scales (W8A16, vLLM's
    ``fused_experts(..., use_int8_w8a16=True)`` layout): out [T, H] in x.dtype, exactly
    fused_moe on the dequantized experts W_e[n, k] = weight[e, n, k] * scale[e, n] kept
    in fp32 (NOT rounded to x.dtype: the kernels scale the fp32 accumulators), i.e.
    ``reference.fused_moe_int8``. Activations are not quantized.

    x          [T, H] fp16 / bf16 / fp32 (fp32: exact fp32 dots, slower tiles).
    w13        [E, 2I, H] int8: each expert's gate_proj rows, then its up_proj rows.
               w13_scale fp32 [E, 2I]: one scale per row.
    w2         [E, H, I] int8 (down_proj). w2_scale fp32 [E, H].
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count):
               fused_moe's routing contract.
    Every tensor may be a view with its own strides; T = 0 gives [0, H]. fp32
    accumulation; the activated [I] intermediate is rounded to x.dtype; the router weight
    and the k-sum are fp32; out is rounded once.
    lora       optional per-token LoRA on the experts, as :func:`fused_moe`
               (:class:`MoELoRA`, dense adapters in x.dtype added to the int8 experts'
               fp32 results).
    activation the experts' gate activation, "silu" / "gelu" / "gelu_tanh" /
               "swigluoai" (with ``alpha`` / ``limit``), as :func:`fused_moe`.
    w13_bias / w2_bias  optional dense expert biases [E, 2I] / [E, H] in x.dtype, as
               :func:`fused_moe` (added to the int8 experts' fp32 results).
    gated      False for non-gated experts (as :func:`fused_moe`: act(up), activation
               also "relu2"): w13 [E, I, H] int8 holds each expert's up_proj rows only,
               w13_scale fp32 [E, I].
    """
    _check_activation(activation, gated)
    h, e, two_i, inter = _check_w8a16_inputs(x, w13, w2, torch.int8, topk_weights,
                                              topk_ids, gated)
    _check_int8_experts("w13", w13, w13_scale, (e, two_i, h), x.device)
    _check_int8_experts("w2", w2, w2_scale, (e, h, inter), x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_int8(x, w13, w13_scale, w2, w2_scale,
                                                topk_weights, topk_ids, *lora_args,
                                                w13_bias, w2_bias, alpha, limit,
                                                activation, gated)


# ------------------------------------------------------------------- fp8 W8A8 experts

@_fused_moe_op("fused_moe_fp8_w8a8")
def _fused_moe_fp8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                        w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                        block_size: list[int], lora_a13: Tensor | None = None,
                        lora_b13: Tensor | None = None, lora_a2: Tensor | None = None,
                        lora_b2: Tensor | None = None,
                        lora_token_slots: Tensor | None = None,
                        lora_scaling: Tensor | None = None,
                        w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                        alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                        activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    args = (lora, _check_activation(activation, gated), gated, w13_bias, w2_bias,
            *_check_swiglu(alpha, limit))
    if _fp8_w8a8_backend(x.device) == "triton":
        from .triton import moe_fp8_w8a8 as triton_moe_fp8_w8a8
        return triton_moe_fp8_w8a8.fused_moe_fp8_w8a8(
            x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_size, *args)
    return reference.fused_moe_fp8_w8a8(
        x, w13.view(torch.float8_e4m3fn), w13_scale, w2.view(torch.float8_e4m3fn),
        w2_scale, topk_weights, topk_ids, (block_size[0], block_size[1]), *args)


def _fp8_w8a8_backend(device: torch.device) -> str:
    """'triton' or 'reference' for fused_moe_fp8_w8a8: the Triton kernels need fp8
    tensor cores (sm_89+); older GPUs take the reference path (with a warning, once)."""
    from .fp8_w8a8 import _which

    return _which("fused_moe_fp8_w8a8", device)


def fused_moe_fp8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                       w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                       block_size: tuple[int, int] | list[int], *,
                       lora: MoELoRA | None = None, activation: str = "silu",
                       gated: bool = True, w13_bias: Tensor | None = None,
                       w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                       limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe_fp8` run W8A8: the same fp8 experts with block scales, and fp8
    activations quantized per token and group of bk columns at run time, both GEMMs on
    fp8 tensor cores (vLLM's ``fused_experts(..., use_fp8_w8a8=True, block_shape=[bn,
    bk])``: how vLLM runs DeepSeek-V3 / Qwen3-FP8 MoE checkpoints). Out [T, H] in
    x.dtype, exactly ``reference.fused_moe_fp8_w8a8``: x quantized per token group
    (``per_token_group_quant_fp8``: s = max(max|group|, 1e-10) / 448, q = fp8(x / s)),
    each K group's fp8 x fp8 partial sum times s_x * s_w added in fp32 (+ bias),
    act(gate) * up rounded to x.dtype, that intermediate quantized per (token, slot)
    row and group the same way, the down GEMM likewise (+ bias), times the router
    weight, summed over k in fp32 and rounded once.

    x          [T, H] fp16 / bf16 / fp32.
    w13        [E, 2I, H] torch.float8_e4m3fn (gate rows, then up rows), w13_scale fp32
               [E, ceil(2I / bn), H / bk].
    w2         [E, H, I] torch.float8_e4m3fn, w2_scale fp32 [E, ceil(H / bn), I / bk].
    block_size (bn, bk): bk a multiple of 32 (fp8 MMA's K step) dividing H and I (the
               activations' quantization groups); a bk >= K covers that K whole (one
               group per row), which must then be a multiple of 32. (128, 128) for the
               hub's checkpoints.
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count).
    Every tensor may be a view with its own strides; T = 0 gives [0, H].
    activation / gated / w13_bias / w2_bias / alpha / limit: as :func:`fused_moe_fp8`.
    lora       optional per-token LoRA on the experts, as :func:`fused_moe` (dense adapters
               in x.dtype on the unquantized inputs: d13 from x, added to the dequantized
               gate / up; d2 from the x.dtype intermediate before its quantization,
               added to the down output before the router weight).
    The fp8 GEMMs need fp8 tensor cores (sm_89+): on older GPUs the op takes the
    reference path (slow; :func:`fused_moe_fp8` runs the same weights W8A16 there).
    """
    _check_activation(activation, gated)
    h, e, two_i, inter = _check_w8a16_inputs(x, w13, w2, torch.float8_e4m3fn,
                                              topk_weights, topk_ids, gated)
    bn, bk = check_block_size(block_size, max(h, inter))
    for k_dim in (h, inter):
        if min(bk, k_dim) % 32 or k_dim % min(bk, k_dim):
            raise ValueError(f"block_size bk ({bk}) must be a multiple of 32 that divides H "
                             f"({h}) and I ({inter}), or cover such a K whole: the "
                             f"activations are quantized in groups of bk columns; got "
                             f"block_size {tuple(block_size)}")
    _check_fp8_experts("w13", w13, w13_scale, (e, two_i, h), bn, bk, x.device)
    _check_fp8_experts("w2", w2, w2_scale, (e, h, inter), bn, bk, x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_fp8_w8a8(
        x, w13.view(torch.uint8), w13_scale, w2.view(torch.uint8), w2_scale, topk_weights,
        topk_ids, [bn, bk], *lora_args, w13_bias, w2_bias, alpha, limit, activation, gated)


# ------------------------------------------------------------------ int8 W8A8 experts

@_fused_moe_op("fused_moe_int8_w8a8")
def _fused_moe_int8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                         w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                         lora_a13: Tensor | None = None, lora_b13: Tensor | None = None,
                         lora_a2: Tensor | None = None, lora_b2: Tensor | None = None,
                         lora_token_slots: Tensor | None = None,
                         lora_scaling: Tensor | None = None,
                         w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                         alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT,
                         activation: str = "silu", gated: bool = True) -> Tensor:
    lora = _op_lora(lora_a13, lora_b13, lora_a2, lora_b2, lora_token_slots, lora_scaling)
    args = (x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, lora,
            _check_activation(activation, gated), gated, w13_bias, w2_bias,
            *_check_swiglu(alpha, limit))
    if _backend.resolve("fused_moe_int8_w8a8", x.device) == "triton":
        from .triton import moe_int8_w8a8 as triton_moe_w8a8
        return triton_moe_w8a8.fused_moe_int8_w8a8(*args)
    return reference.fused_moe_int8_w8a8(*args)


def fused_moe_int8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                        w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor, *,
                        lora: MoELoRA | None = None, activation: str = "silu",
                        gated: bool = True, w13_bias: Tensor | None = None,
                        w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                        limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """:func:`fused_moe` with INT8 W8A8 experts: int8 weights with one fp32 scale per
    output row (:func:`fused_moe_int8`'s layout) AND int8 activations quantized per token
    at run time, multiplied on integer tensor cores with exact int32 sums (vLLM's
    ``fused_experts(..., use_int8_w8a8=True, per_channel_quant=True)``; the experts of
    compressed-tensors int8 W8A8 MoE checkpoints). Out [T, H] in x.dtype, exactly
    ``reference.fused_moe_int8_w8a8``: x quantized per token (``scaled_int8_quant``:
    s = max|row| / 127, round half to even), gate / up = s_x * (s_w * the integer sum),
    (+ bias), act(gate) * up rounded to x.dtype, that intermediate quantized per
    (token, slot) row the same way, down = s_act * (s_w2 * the integer sum) (+ bias),
    times the router weight, summed over k in fp32 and rounded once.

    x          [T, H] fp16 / bf16 / fp32.
    w13        [E, 2I, H] int8 (gate rows, then up rows), w13_scale fp32 [E, 2I].
    w2         [E, H, I] int8 (down_proj), w2_scale fp32 [E, H].
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 in [0, E) (repeats count):
               fused_moe's routing contract.
    Every tensor may be a view with its own strides; T = 0 gives [0, H]. Exact while
    H and I are at most 131072 (int32 sums of int8 products).
    activation "silu" / "gelu" / "gelu_tanh" / "swigluoai" (with ``alpha`` / ``limit``),
               as :func:`fused_moe`; gated=False: non-gated experts (w13 [E, I, H], its
               scales [E, I]; also "relu2").
    w13_bias / w2_bias  optional dense expert biases [E, 2I] / [E, H] in x.dtype, added to
               the dequantized fp32 results, as :func:`fused_moe`.
    lora       optional per-token LoRA on the experts, as :func:`fused_moe` (dense adapters
               in x.dtype on the unquantized inputs: d13 from x, added to the dequantized
               gate / up; d2 from the x.dtype intermediate before its quantization,
               added to the down output before the router weight).
    Compared with :func:`fused_moe_int8` (W8A16), the activations' rounding to int8 adds
    an error of about 1 / 254 of each row's largest entry per element; in exchange both
    GEMMs run on int8 tensor cores (twice the 16-bit rate on sm_80 / sm_90) and read
    half the activation bytes.
    """
    _check_activation(activation, gated)
    h, e, two_i, inter = _check_w8a16_inputs(x, w13, w2, torch.int8, topk_weights,
                                              topk_ids, gated)
    _check_int8_experts("w13", w13, w13_scale, (e, two_i, h), x.device)
    _check_int8_experts("w2", w2, w2_scale, (e, h, inter), x.device)
    lora_args = _check_routing_and_lora(x, topk_weights, topk_ids, e, inter, gated, lora)
    _check_biases(x, w13_bias, w2_bias, e, two_i, gated)
    alpha, limit = _check_swiglu(alpha, limit)
    return torch.ops.minikernels.fused_moe_int8_w8a8(x, w13, w13_scale, w2, w2_scale,
                                                     topk_weights, topk_ids, *lora_args,
                                                     w13_bias, w2_bias, alpha, limit,
                                                     activation, gated)


# ------------------------------------------------------------------- alignment (sorting)

MOE_ALIGN_MAX_EXPERTS = 1024


@torch.library.custom_op("minikernels::moe_align_block_size", mutates_args=())
def _moe_align_block_size(topk_ids: Tensor, block_size: int, num_experts: int,
                          expert_map: Tensor | None, pad_sorted_ids: bool,
                          ignore_invalid_experts: bool) -> tuple[Tensor, Tensor, Tensor]:
    args = (topk_ids, block_size, num_experts, expert_map, pad_sorted_ids,
            ignore_invalid_experts)
    if _backend.resolve("moe_align_block_size", topk_ids.device) == "triton":
        from .triton import moe_align as triton_moe_align
        return triton_moe_align.moe_align_block_size(*args)
    return reference.moe_align_block_size(*args)


@_moe_align_block_size.register_fake
def _(topk_ids: Tensor, block_size: int, num_experts: int, expert_map: Tensor | None,
      pad_sorted_ids: bool, ignore_invalid_experts: bool) -> tuple[Tensor, Tensor, Tensor]:
    size = reference.moe_align_length(topk_ids.numel(), num_experts, block_size,
                                      pad_sorted_ids)
    ints = {"dtype": torch.int32, "device": topk_ids.device}
    return (torch.empty(size, **ints), torch.empty(-(-size // block_size), **ints),
            torch.empty(1, **ints))


def _check_positive_int(name: str, value: object, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1 or (high is not None and value > high):
        limit = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be >= 1{limit}, got {value}")
    return value


def moe_align_block_size(topk_ids: Tensor, block_size: int, num_experts: int,
                         expert_map: Tensor | None = None, pad_sorted_ids: bool = False,
                         ignore_invalid_experts: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """vLLM's ``moe_align_block_size``: the n = T*k (token, slot) pairs p = t * k + j of
    topk_ids grouped by expert into tiles of block_size rows, the input layout of the fused
    MoE GEMMs. No host sync (sizes come from shapes): CUDA-graph capturable.

    topk_ids    int32/int64 [T, k] (any strides), experts in [0, num_experts).
    block_size  rows per tile, any int >= 1 (powers of 2 typical: 16 .. 256).
    num_experts E, 1 .. 1024 (global experts when expert_map is given).
    expert_map  int32/int64 [E] or None: global -> local expert id, -1 = not on this rank.
    pad_sorted_ids: round sorted_token_ids' length up to a multiple of block_size.
    ignore_invalid_experts: with expert_map, leave out the pairs of experts mapped to -1
                and group the rest by local id (vLLM's flag of that name).

    Returns (int32 tensors on topk_ids' device):
      sorted_token_ids [S]: pair ids, expert 0's first (increasing p: stable, so the
          output is deterministic), its run padded to a multiple of block_size with the
          sentinel n, then expert 1's, ...; the sentinel n in every slot after the last
          run. S = min(n + E * (block_size - 1) (rounded up to a multiple of block_size if
          pad_sorted_ids), n * block_size) (``reference.moe_align_length``).
      expert_ids [ceil(S / block_size)]: the expert of each tile; -1 for the tiles from
          num_tokens_post_pad / block_size on (always -1: vLLM's default expert_map mode
          maps that -1 through expert_map as well). With expert_map (and not
          ignore_invalid_experts) the pairs are grouped by global expert and each tile's
          expert is then mapped: tiles of experts on other ranks read -1.
      num_tokens_post_pad [1]: the used length of sorted_token_ids (sum of the padded runs).
    With index checks off (e.g. under graph capture) ids outside [0, E) are left out.
    """
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2)
    _check_positive_int("block_size", block_size)
    _check_positive_int("num_experts", num_experts, MOE_ALIGN_MAX_EXPERTS)
    for name, flag in (("pad_sorted_ids", pad_sorted_ids),
                       ("ignore_invalid_experts", ignore_invalid_experts)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    n = topk_ids.numel()
    if n + num_experts * (block_size - 1) + block_size >= 2**31:
        raise ValueError(f"topk_ids ({n} pairs) with num_experts {num_experts} and "
                         f"block_size {block_size} overflow int32 slot ids")
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtypes=(torch.int32, torch.int64), ndim=1,
                     device=topk_ids.device)
        if expert_map.shape[0] != num_experts:
            raise ValueError(f"expert_map must have shape [num_experts = {num_experts}], "
                             f"got {list(expert_map.shape)}")
        expert_map = expert_map.to(torch.int32).contiguous()
        check_index_range("expert_map", expert_map, -1, num_experts)
    check_index_range("topk_ids", topk_ids, 0, num_experts)
    return torch.ops.minikernels.moe_align_block_size(
        topk_ids, block_size, num_experts, expert_map, pad_sorted_ids,
        ignore_invalid_experts)


def _check_input_dtypes(x: Tensor, x_dtypes: tuple[torch.dtype, ...],
                        w13: tuple[str, Tensor], w2: tuple[str, Tensor],
                        expert_dtype: torch.dtype | None, topk_weights: Tensor,
                        topk_ids: Tensor) -> None:
    """The checks every fused MoE op starts with, before any shape: x 2-D [T, H] in one
    of ``x_dtypes``; the (op argument name, tensor) expert stacks w13 and w2 3-D in
    ``expert_dtype`` (None: x's dtype, dense experts) on x's device; the routing tensors
    2-D on x's device, topk_weights fp32 and topk_ids int32 / int64 (their shapes:
    :func:`_check_routing_shapes`)."""
    check_tensor("x", x, dtypes=x_dtypes, ndim=2)
    wdtype = x.dtype if expert_dtype is None else expert_dtype
    for name, weight in (w13, w2):
        check_tensor(name, weight, dtypes=(wdtype,), ndim=3, device=x.device)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                 device=x.device)
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2,
                 device=x.device)


def _check_routing_and_lora(x: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                            num_experts: int, inter: int, gated: bool,
                            lora: MoELoRA | None) -> tuple[Tensor | None, ...]:
    """The checks every fused MoE op ends with, once E and I are known: the routing
    shapes and ids (:func:`_check_routing_shapes`) and the LoRA adapters
    (:func:`_check_lora`); returns the op's six LoRA arguments (all None without LoRA)."""
    _check_routing_shapes(x.shape[0], topk_weights, topk_ids, num_experts)
    return _check_lora(lora, x, num_experts, inter, gated)


def _check_routing_shapes(t: int, topk_weights: Tensor, topk_ids: Tensor,
                          num_experts: int) -> None:
    """topk_ids [T, k >= 1] in [0, E), topk_weights of the same shape."""
    if topk_ids.shape[0] != t or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T = {t}, k >= 1], got "
                         f"{list(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {list(topk_ids.shape)}, "
                         f"got {list(topk_weights.shape)}")
    if topk_ids.numel():
        check_index_range("topk_ids", topk_ids, 0, num_experts)
