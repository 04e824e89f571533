"""FlashInfer's fused mixture-of-experts API (``flashinfer.fused_moe``) on minikernels'
fused MoE ops.

    from minikernels.compat import flashinfer_moe as fused_moe  # instead of:
    # import flashinfer.fused_moe as fused_moe
    out = fused_moe.cutlass_fused_moe(x, selected_experts.to(torch.int), routing_weights,
                                      w31_weight, w2_weight, x.dtype, quant_scales=None)[0]

Signature followed: ``flashinfer.fused_moe.cutlass_fused_moe`` as defined in FlashInfer's
``flashinfer/fused_moe/core.py`` on its main branch (version.txt 0.7.0rc3; the 0.6.x
releases have the same arguments up to ``activation_type``, later ones add
``swizzled_input_sf``, ``use_fused_finalize``, ``use_wfp4afp8_humming``, ``profile_ids``
and ``workspace_buffer``, all accepted here). Enum values: ``flashinfer/tllm_enums.py``
of the same tree. The semantics below were checked against FlashInfer's own tests
(``tests/moe/test_trtllm_cutlass_fused_moe.py``: ``compute_routing``,
``compute_with_experts``, the EP / TP / fp8 tests) and its CUTLASS binding
(``csrc/fused_moe/cutlass_backend/flashinfer_cutlass_fused_moe_binding.cu``).

Layouts (FlashInfer's; E = experts on this EP rank, I = this TP rank's intermediate size):

    input                  [T, H] fp16 / bf16 (fp32 accepted too); float8_e4m3fn for the
                           per-tensor FP8 experts (already quantized by the caller)
    token_selected_experts [T, k] int32 (int64 accepted): GLOBAL expert ids
    token_final_scales     [T, k] fp32 router weights (None: every weight is 1)
    fc1_expert_weights     [E, 2I, H] gated experts, FlashInfer's "w31" order: rows [:I] the
                           up (linear, w3) projection, rows [I:] the gate (w1) projection
                           (``w3, w1 = torch.chunk(w31, 2, dim=0)`` in FlashInfer's test
                           reference; act(x @ w1.T) * (x @ w3.T)); [E, I, H] for the
                           non-gated activations (Gelu / Silu / Relu2)
    fc2_expert_weights     [E, H, I]
    fc1_expert_biases      [E, 2I] in output_dtype, the same [up; gate] order;
    fc2_expert_biases      [E, H] in output_dtype; both or neither (FlashInfer's binding
                           requires both)
    output                 [T, H] in output_dtype: written and returned

    out[t] = sum_j token_final_scales[t, j] * (fc2[e] @ act(gate, up) + fc2_bias[e]),
    e = token_selected_experts[t, j] - ep_rank * E, choices with e outside [0, E) add
    nothing. Returns ``[output]`` (a list: callers take ``[0]``, as FlashInfer's tests do).

Weight formats:

    fp16 / bf16 experts, quant_scales None or []          ops.fused_moe
    per-tensor FP8 (fp8 input and fp8 weights), quant_scales = [fc1_dequant [E],
        fc2_quant (0-D or [E]), fc2_dequant [E], fc1_input_dequant (0-D)], fp32:
        FlashInfer's gemm1 is x_q @ w1_q.T * fc1_dequant[e] (fc1_dequant already holds
        the input scale: its test builds it as w1_scale * input_scale), its gemm2 reads
        the intermediate quantized with fc2_quant and dequantizes with fc2_dequant[e]
                                                          ops.fused_moe_fp8 (W8A16) on
                                                          x = input in output_dtype
                                                          (exact: every e4m3 value is a
                                                          bf16 / fp16 value), fc1 scale
                                                          fc1_dequant[e], fc2 scale
                                                          fc2_quant * fc2_dequant[e]
    use_deepseek_fp8_block_scale=True: fp16 / bf16 input, fp8 weights, quant_scales =
        [fc1 block scales [E, 2I / 128, H / 128], fc2 block scales [E, H / 128, I / 128]]
        fp32 (128 x 128 blocks, the fc1 block rows in the same [up; gate] order);
        H and I multiples of 128                          ops.fused_moe_fp8_w8a8 with
                                                          (128, 128) blocks: activations
                                                          quantized per token and group of
                                                          128 (DeepSeek-V3 style, as
                                                          FlashInfer's Hopper kernel)

Gate / up order: minikernels' ops take [gate; up]; FlashInfer's fc1 (its biases and its
block scales) hold [up; gate], which no strided view can reorder, so each call copies
fc1 with its halves swapped (and the small bias / scale tensors): a compat path (one
copy of the fc1 stack per call), not a serving one.

Activations (``activation_type``: a FlashInfer ``ActivationType`` member, this module's,
or an int; ints are read only for 0..6, the values every FlashInfer release shares):
Swiglu / SwigluBias (silu(gate) * up, or the SwiGLU variant below), Geglu (gelu(gate) * up,
erf GELU: CUTLASS's ``GELU`` in FlashInfer's activation kernel), GegluTanh (tanh GELU),
Gelu / Silu / Relu2 (non-gated: act(fc1 @ x), fc1 [E, I, H]). Refused by name
(NotImplementedError): Relu, Identity, SwigluStep, Situ, InvalidType.

SwiGLU variant (``swiglu_alpha`` / ``swiglu_beta`` / ``swiglu_limit``: fp32 [E], one
value per local expert; defaults 1, 0, +inf, FlashInfer's ``SwigluBiasAdaptor``):
act = g * sigmoid(alpha * g) * (clamp(up, -limit, limit) + beta), g = min(gate, limit).
With beta = 1 that is GPT-OSS's clamped SwiGLU, ops' "swigluoai" (limit +inf as the
largest fp32); alpha = 1, beta = 0 and no limit is plain SwiGLU. Other values
(beta not 1, or beta 0 with alpha not 1 or a finite limit) have no minikernels
activation: a NotImplementedError naming ``swiglu_beta``. The parameters are read on
the host (one sync); experts with different values run as one op call per distinct
(alpha, limit) with the other experts' router weights zeroed, the partial outputs
summed in fp32 (a compat path; one call in the usual uniform case).

Parallelism: ``ep_size`` / ``ep_rank``: fc1 / fc2 hold experts [ep_rank * E,
(ep_rank + 1) * E) and token_selected_experts holds global ids; choices of experts
elsewhere (or ids outside every rank, such as -1) contribute nothing, as FlashInfer's
kernel skips them; the ranks' outputs sum to the full result. ``tp_size`` / ``tp_rank``:
the weights passed are already this rank's slices (FlashInfer's test shards w3 and w1
separately and restacks [w3_shard; w1_shard], and w2 along I); the math does not
change, except that fc2_expert_biases is added on tp_rank 0 only (FlashInfer's finalize:
"Only add bias on rank 0 for tensor parallelism"), so the ranks' outputs sum to the full
result.

Differences, by design: per-tensor FP8 experts run W8A16 (the intermediate stays 16-bit
where FlashInfer quantizes it to fp8 with fc2_quant: results differ by that rounding,
closer to the unquantized product); ``fc1_input_dequant`` is checked and unused (already
in fc1_dequant); every GPU (and the CPU) runs the fp8 block-scale path, which FlashInfer
runs on sm90 only; int64 expert ids, fp32 inputs and any T are accepted; the result is
deterministic (``use_fused_finalize`` has no effect). Accepted and unused (they tune
FlashInfer's kernels only): ``tune_max_num_tokens``, ``enable_pdl``, ``swizzled_input_sf``
(read only with ``input_sf``), ``use_fused_finalize``, ``profile_ids`` (two tactic ids),
``workspace_buffer``.

Not covered, each refused by name (NotImplementedError): NVFP4 / MXFP4 / MXFP8 / W4A8 /
W4A16 / INT4 experts (int64- or uint8-packed weights, ``input_sf``,
``use_w4_group_scaling``, ``use_mxfp8_act_scaling``, ``use_packed_weights``,
``use_wfp4afp8_humming``), ``min_latency_mode``, ``enable_alltoall``, ``cluster_size`` /
``cluster_rank`` other than 1 / 0, fp8 / fp4 ``output_dtype``, int8 experts (FlashInfer's
``cutlass_fused_moe`` has no int8 path; TensorRT-LLM's ``use_int8_woq_per_channel`` is
not a FlashInfer argument). FlashInfer's trtllm-gen MoE functions
(``trtllm_*_moe``), its CuTe-DSL / b12x MoE and its unified ``MoELayer`` API are not
provided.

Routing: ``fused_topk_deepseek`` (DeepSeek-V3's grouped sigmoid routing, on
``ops.topk_sigmoid``) and the ``RoutingMethodType`` enum.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from enum import IntEnum

import torch
from torch import Tensor

from .. import ops
from .._validation import (FLOAT_DTYPES, HALF_DTYPES, check_finite_float, check_shape,
                           check_tensor)
from .flashinfer import _int

__all__ = ["ActivationType", "RoutingMethodType", "cutlass_fused_moe",
           "fused_topk_deepseek"]

FP8 = torch.float8_e4m3fn
_FP32_MAX = torch.finfo(torch.float32).max
_DEEPSEEK_BLOCK = 128


class ActivationType(IntEnum):
    """FlashInfer's ``ActivationType`` (``flashinfer/tllm_enums.py``, main branch).
    Values 7 and up differ between FlashInfer releases: pass members, not ints."""
    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9
    InvalidType = 10


class RoutingMethodType(IntEnum):
    """FlashInfer's ``RoutingMethodType`` (the trtllm-gen MoE routing methods), for code
    that imports it; minikernels' routers: ``ops.topk_softmax`` / ``ops.topk_sigmoid``."""
    Default = 0           # Softmax -> TopK
    Renormalize = 1       # TopK -> Softmax
    DeepSeekV3 = 2        # Sigmoid -> bias -> top-2 per group -> top groups -> TopK
    Llama4 = 3            # Top1 -> Sigmoid
    RenormalizeNaive = 4  # Softmax -> TopK -> Renormalize (Qwen3)
    TopK = 5              # TopK only
    SigmoidRenorm = 6     # Sigmoid -> TopK -> Renormalize
    MiniMax2 = 7          # Sigmoid + bias -> TopK -> scaled sum normalize
    Sigmoid = 8           # Sigmoid -> TopK
    Unspecified = 9


# FlashInfer activation name -> (minikernels activation, gated)
_ACTIVATIONS: dict[str, tuple[str, bool]] = {
    "Swiglu": ("silu", True), "SwigluBias": ("silu", True), "Geglu": ("gelu", True),
    "GegluTanh": ("gelu_tanh", True), "GeluTanh": ("gelu_tanh", True),
    "Gelu": ("gelu", False), "Silu": ("silu", False), "Relu2": ("relu2", False),
}
_REFUSED_ACTIVATIONS = {
    "Relu": "non-gated ReLU", "Identity": "an identity (no) activation",
    "SwigluStep": "min(silu(gate), limit) * clamp(up): Step-3's clipped SwiGLU",
    "Situ": "SiTU-GLU", "InvalidType": "an invalid activation",
}
_STABLE_INT_ACTIVATIONS = 7  # 0..6 (Gelu .. Relu2) name the same activation everywhere

# one op call: (router weights fp32 [T, k], local ids [T, k], activation kwargs) -> [T, H]
_ExpertCall = Callable[[Tensor, Tensor, dict], Tensor]


# ----------------------------------------------------------------------------- arguments


def _rank(size_name: str, size: object, rank_name: str, rank: object) -> tuple[int, int]:
    """(size >= 1, rank in [0, size))."""
    n = _int(size_name, size, 1)
    r = _int(rank_name, rank, 0)
    if r >= n:
        raise ValueError(f"{rank_name} must be in [0, {size_name} = {n}), got {r}")
    return n, r


def _not_covered(name: str, value: object, what: str) -> None:
    if value is not None and value is not False:
        raise NotImplementedError(
            f"{name} is not supported by minikernels' FlashInfer fused-MoE compat layer "
            f"({what}); leave it at its default")


def _refuse_features(input_sf: object, enable_alltoall: object,
                     use_w4_group_scaling: object, use_mxfp8_act_scaling: object,
                     min_latency_mode: object, use_packed_weights: object,
                     use_wfp4afp8_humming: object) -> None:
    """FlashInfer features with no minikernels counterpart: each must keep its default."""
    _not_covered("input_sf", input_sf, "block-scaled NVFP4 / MXFP8 activations")
    _not_covered("enable_alltoall", enable_alltoall, "all-to-all expert communication")
    _not_covered("use_w4_group_scaling", use_w4_group_scaling,
                 "W4A8 / W4A16 group-scaled 4-bit experts")
    _not_covered("use_mxfp8_act_scaling", use_mxfp8_act_scaling, "MXFP8 activations")
    _not_covered("min_latency_mode", min_latency_mode, "per-expert min-latency outputs")
    _not_covered("use_packed_weights", use_packed_weights, "packed INT4 experts")
    _not_covered("use_wfp4afp8_humming", use_wfp4afp8_humming, "MXFP4 x FP8 experts")


def _check_tuning(tune_max_num_tokens: object, enable_pdl: object, swizzled_input_sf: object,
                  use_fused_finalize: object, profile_ids: object,
                  workspace_buffer: object) -> None:
    """Knobs that only tune FlashInfer's kernels: checked like FlashInfer, then unused."""
    _int("tune_max_num_tokens", tune_max_num_tokens, 1)
    for name, flag in (("swizzled_input_sf", swizzled_input_sf),
                       ("use_fused_finalize", use_fused_finalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if enable_pdl is not None and not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be None or a bool, got {type(enable_pdl).__name__}")
    if profile_ids is not None:
        if not isinstance(profile_ids, (list, tuple)) or len(profile_ids) != 2:
            raise ValueError(f"profile_ids must contain [gemm1_profile, gemm2_profile], got "
                             f"{profile_ids!r}")
        for i in profile_ids:
            _int("profile_ids entries", i, -1)
    if workspace_buffer is not None:
        check_tensor("workspace_buffer", workspace_buffer, dtypes=(torch.uint8, torch.int8),
                     ndim=1)


def _activation(activation_type: object) -> tuple[str, str, bool]:
    """FlashInfer's activation_type -> (its name, minikernels' activation, gated)."""
    if isinstance(activation_type, bool):
        raise TypeError("activation_type must be an ActivationType, got bool")
    name = getattr(activation_type, "name", None)
    if not isinstance(name, str):
        try:
            value = operator.index(activation_type)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"activation_type must be an ActivationType member, got "
                            f"{type(activation_type).__name__}") from None
        if not 0 <= value < _STABLE_INT_ACTIVATIONS:
            raise ValueError(
                f"activation_type {value}: plain ints above {_STABLE_INT_ACTIVATIONS - 1} "
                f"name different activations in different FlashInfer releases; pass the "
                f"ActivationType member (e.g. ActivationType.GegluTanh)")
        name = ActivationType(value).name
    if name in _REFUSED_ACTIVATIONS:
        raise NotImplementedError(
            f"activation_type {name} ({_REFUSED_ACTIVATIONS[name]}) is not supported by "
            f"minikernels' fused MoE ops (supported: {', '.join(sorted(_ACTIVATIONS))})")
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation_type must be one of {sorted(_ACTIVATIONS)}, got "
                         f"{activation_type!r}")
    act, gated = _ACTIVATIONS[name]
    return name, act, gated


def _output_dtype(output_dtype: object, x: Tensor) -> torch.dtype:
    """FlashInfer writes fp16 / bf16 (fp32 here too); 16-bit experts write x's dtype."""
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"output_dtype must be a torch.dtype, got {output_dtype!r}")
    if output_dtype in (FP8, torch.int64, torch.uint8):
        raise NotImplementedError(f"output_dtype {output_dtype} (quantized outputs) is not "
                                  f"supported: use float16 or bfloat16")
    if output_dtype not in FLOAT_DTYPES:
        raise ValueError(f"output_dtype must be float16, bfloat16 or float32, got "
                         f"{output_dtype}")
    if x.dtype != FP8 and output_dtype != x.dtype:
        raise ValueError(f"output_dtype ({output_dtype}) must be input's dtype ({x.dtype}) "
                         f"for unquantized inputs (FlashInfer's kernels write the "
                         f"activations' type)")
    return output_dtype


# ------------------------------------------------------------------------------ routing


def _route(ids: object, scales: object, t: int, num_local: int, ep_rank: int,
           device: torch.device) -> tuple[Tensor, Tensor]:
    """(router weights fp32 [T, k], local ids [T, k]): global id g is local expert
    g - ep_rank * E when that is in [0, E); other choices get weight 0 and id 0."""
    check_tensor("token_selected_experts", ids, dtypes=(torch.int32, torch.int64), ndim=2,
                 device=device)
    assert isinstance(ids, Tensor)
    if ids.shape[0] != t or ids.shape[1] < 1:
        raise ValueError(f"token_selected_experts must have shape [T = {t}, k >= 1] (one row "
                         f"per input token), got {list(ids.shape)}")
    if scales is None:
        weights = torch.ones(ids.shape, dtype=torch.float32, device=device)
    else:
        check_tensor("token_final_scales", scales, dtypes=(torch.float32,), ndim=2,
                     device=device)
        assert isinstance(scales, Tensor)
        if scales.shape != ids.shape:
            raise ValueError(f"token_final_scales must have token_selected_experts' shape "
                             f"{list(ids.shape)}, got {list(scales.shape)}")
        weights = scales
    local = ids.long() - ep_rank * num_local
    here = (local >= 0) & (local < num_local)
    return (torch.where(here, weights, 0.0),
            torch.where(here, local, 0).to(torch.int32))


# ------------------------------------------------------------------------------ weights


def _gate_first(t: Tensor, dim: int = 1) -> Tensor:
    """FlashInfer's [up; gate] halves along ``dim`` -> minikernels' [gate; up] (a copy;
    fp8 tensors are moved as bytes)."""
    raw = t.view(torch.uint8) if t.dtype == FP8 else t
    up, gate = raw.chunk(2, dim=dim)
    out = torch.cat((gate, up), dim=dim)
    return out.view(FP8) if t.dtype == FP8 else out


def _check_experts(fc1: object, fc2: object, h: int, gated: bool, dtype: torch.dtype,
                   device: torch.device) -> tuple[int, int]:
    """fc1 [E, 2I, H] (gated; [E, I, H] not gated), fc2 [E, H, I], both in ``dtype``;
    returns (E, I)."""
    for name, w in (("fc1_expert_weights", fc1), ("fc2_expert_weights", fc2)):
        check_tensor(name, w, dtypes=(dtype,), ndim=3, device=device)
    assert isinstance(fc1, Tensor) and isinstance(fc2, Tensor)
    e, _, inter = fc2.shape
    if fc2.shape[1] != h or e == 0 or inter == 0:
        raise ValueError(f"fc2_expert_weights must have shape [E, H = {h}, I] (input's "
                         f"hidden size H), got {list(fc2.shape)}")
    rows = 2 * inter if gated else inter
    if tuple(fc1.shape) != (e, rows, h):
        want = "[E, 2I, H] (up rows, then gate rows)" if gated else \
            "[E, I, H] (a non-gated activation)"
        raise ValueError(f"fc1_expert_weights must have shape {want} = {[e, rows, h]} "
                         f"(E and I from fc2_expert_weights), got {list(fc1.shape)}")
    return e, inter


def _biases(fc1_bias: object, fc2_bias: object, e: int, rows: int, h: int, tp_rank: int,
            gated: bool, dtype: torch.dtype, device: torch.device
            ) -> tuple[Tensor | None, Tensor | None]:
    """FlashInfer's biases -> minikernels' (w13_bias [E, rows] gate first, w2_bias
    [E, H]); fc2's only on tp_rank 0 (FlashInfer adds it there alone)."""
    if fc1_bias is None and fc2_bias is None:
        return None, None
    for name, b, other in (("fc1_expert_biases", fc1_bias, "fc2_expert_biases"),
                           ("fc2_expert_biases", fc2_bias, "fc1_expert_biases")):
        if b is None:
            raise ValueError(f"{name} is required with {other} (FlashInfer's kernel takes "
                             f"both biases or neither; pass zeros)")
    for name, b, shape in (("fc1_expert_biases", fc1_bias, [e, rows]),
                           ("fc2_expert_biases", fc2_bias, [e, h])):
        check_tensor(name, b, dtypes=(dtype,), ndim=2, device=device)
        check_shape(name, b, shape)  # type: ignore[arg-type]
    assert isinstance(fc1_bias, Tensor) and isinstance(fc2_bias, Tensor)
    return (_gate_first(fc1_bias) if gated else fc1_bias), (fc2_bias if tp_rank == 0 else None)


def _scales(quant_scales: object, count: int, what: str) -> list[Tensor]:
    """A quantized format's ``quant_scales``: a list (or tuple) of ``count`` tensors."""
    if not isinstance(quant_scales, (list, tuple)):
        raise ValueError(f"quant_scales must be a list of {count} tensors for {what}, got "
                         f"{type(quant_scales).__name__}")
    if len(quant_scales) != count:
        raise ValueError(f"quant_scales must be a list of {count} tensors for {what}, got "
                         f"{len(quant_scales)}")
    return list(quant_scales)


def _dense_experts(x: Tensor, fc1: Tensor, fc2: Tensor, quant_scales: object,
                   gated: bool, biases: tuple[Tensor | None, Tensor | None]) -> _ExpertCall:
    """fp16 / bf16 / fp32 experts: ops.fused_moe on fc1 with its halves swapped."""
    if quant_scales is not None and (not isinstance(quant_scales, (list, tuple))
                                     or len(quant_scales)):
        raise ValueError(f"quant_scales must be None or empty for unquantized "
                         f"{fc1.dtype} experts (fp8 experts take fp8 fc1_expert_weights), "
                         f"got {type(quant_scales).__name__}")
    w13 = _gate_first(fc1) if gated else fc1

    def run(weights: Tensor, ids: Tensor, act: dict) -> Tensor:
        return ops.fused_moe(x, w13, fc2, weights, ids, gated=gated, w13_bias=biases[0],
                             w2_bias=biases[1], **act)
    return run


def _fp8_per_tensor_experts(x: Tensor, fc1: Tensor, fc2: Tensor, quant_scales: object,
                            gated: bool, biases: tuple[Tensor | None, Tensor | None]
                            ) -> _ExpertCall:
    """FlashInfer's per-tensor FP8 experts (fp8 input, quant_scales [fc1_dequant [E],
    fc2_quant 0-D / [E], fc2_dequant [E], fc1_input_dequant 0-D]) -> ops.fused_moe_fp8
    (W8A16) with one scale per expert and matrix: fc1_dequant[e] (input scale included)
    and fc2_quant * fc2_dequant[e]; x is the fp8 input in the output dtype (exact)."""
    fc1_dequant, fc2_quant, fc2_dequant, fc1_input_dequant = _scales(
        quant_scales, 4, "per-tensor FP8 experts ([fc1_dequant, fc2_quant, fc2_dequant, "
        "fc1_input_dequant])")
    e, h, inter = fc2.shape
    for i, name, s, dims in ((0, "fc1_dequant", fc1_dequant, ((e,),)),
                             (1, "fc2_quant", fc2_quant, ((), (e,))),
                             (2, "fc2_dequant", fc2_dequant, ((e,),)),
                             (3, "fc1_input_dequant", fc1_input_dequant, ((), (1,)))):
        label = f"quant_scales[{i}] ({name})"
        check_tensor(label, s, dtypes=(torch.float32,), device=x.device)
        if tuple(s.shape) not in dims:
            raise ValueError(f"{label} must have shape {' or '.join(map(str, map(list, dims)))}"
                             f", got {list(s.shape)}")
    s13 = fc1_dequant.reshape(e, 1, 1)
    s2 = (fc2_dequant * fc2_quant).reshape(e, 1, 1)
    w13 = _gate_first(fc1) if gated else fc1
    block = [max(w13.shape[1], h), max(h, inter)]  # one block per matrix: per-tensor scales

    def run(weights: Tensor, ids: Tensor, act: dict) -> Tensor:
        return ops.fused_moe_fp8(x, w13, s13, fc2, s2, weights, ids, block, gated=gated,
                                 w13_bias=biases[0], w2_bias=biases[1], **act)
    return run


def _fp8_block_experts(x: Tensor, fc1: Tensor, fc2: Tensor, quant_scales: object,
                       gated: bool, biases: tuple[Tensor | None, Tensor | None]
                       ) -> _ExpertCall:
    """FlashInfer's DeepSeek FP8 block-scale experts (quant_scales [fc1 scales
    [E, 2I / 128, H / 128], fc2 scales [E, H / 128, I / 128]] fp32) ->
    ops.fused_moe_fp8_w8a8 with (128, 128) blocks, fc1 and its block rows gate first."""
    s1, s2 = _scales(quant_scales, 2, "use_deepseek_fp8_block_scale ([fc1 block scales, "
                     "fc2 block scales])")
    e, h, inter = fc2.shape
    for name, size in (("H", h), ("I", inter)):
        if size % _DEEPSEEK_BLOCK:
            raise ValueError(f"use_deepseek_fp8_block_scale needs {name} a multiple of "
                             f"{_DEEPSEEK_BLOCK} (128 x 128 weight blocks, activations "
                             f"quantized in groups of 128), got {name} = {size} "
                             f"(fc2_expert_weights {list(fc2.shape)})")
    b = _DEEPSEEK_BLOCK
    for i, s, shape in ((0, s1, [e, fc1.shape[1] // b, h // b]), (1, s2, [e, h // b,
                                                                         inter // b])):
        label = f"quant_scales[{i}] ({'fc1' if i == 0 else 'fc2'} block scales)"
        check_tensor(label, s, dtypes=(torch.float32,), ndim=3, device=x.device)
        check_shape(label, s, shape)
    w13, s13 = (_gate_first(fc1), _gate_first(s1)) if gated else (fc1, s1)

    def run(weights: Tensor, ids: Tensor, act: dict) -> Tensor:
        return ops.fused_moe_fp8_w8a8(x, w13, s13, fc2, s2, weights, ids, [b, b],
                                      gated=gated, w13_bias=biases[0], w2_bias=biases[1],
                                      **act)
    return run


def _refuse_weight_dtype(fc1: object) -> None:
    """Weight formats FlashInfer packs in integer tensors: none is covered."""
    dtype = getattr(fc1, "dtype", None)
    if dtype == torch.int64:
        raise NotImplementedError(
            "fc1_expert_weights of dtype int64 (FlashInfer's packed NVFP4 / MXFP4 experts) "
            "are not supported by minikernels' FlashInfer fused-MoE compat layer")
    if dtype == torch.uint8:
        raise NotImplementedError(
            "fc1_expert_weights of dtype uint8 (FlashInfer's W4A16 MXFP4 / INT4 experts) "
            "are not supported by minikernels' FlashInfer fused-MoE compat layer")
    if dtype == torch.int8:
        raise NotImplementedError(
            "fc1_expert_weights of dtype int8: FlashInfer's cutlass_fused_moe has no int8 "
            "weight-only path (TensorRT-LLM's use_int8_woq_per_channel is not a FlashInfer "
            "argument); minikernels runs int8 experts with ops.fused_moe_int8 or "
            "minikernels.compat.vllm_ops.fused_experts(use_int8_w8a16=True)")


def _experts(x: Tensor, fc1: object, fc2: object, quant_scales: object, gated: bool,
             deepseek_fp8: bool, fc1_bias: object, fc2_bias: object, tp_rank: int,
             dtype: torch.dtype) -> tuple[_ExpertCall, int, Tensor]:
    """The op call for this weight format, E, and the op's x (in ``dtype``)."""
    _refuse_weight_dtype(fc1)
    h = x.shape[1]
    if deepseek_fp8:
        if x.dtype not in HALF_DTYPES:
            raise TypeError(f"use_deepseek_fp8_block_scale needs a float16 / bfloat16 input "
                            f"(quantized inside, per token and group of 128), got {x.dtype}")
        wdtype, make = FP8, _fp8_block_experts
    elif x.dtype == FP8:
        wdtype, make = FP8, _fp8_per_tensor_experts
        x = x.to(dtype)  # exact: every e4m3 value is an fp16 / bf16 / fp32 value
    else:
        if getattr(fc1, "dtype", None) == FP8:
            raise ValueError(
                f"float8_e4m3fn fc1_expert_weights with a {x.dtype} input need "
                f"use_deepseek_fp8_block_scale=True (128 x 128 block scales), or an fp8 "
                f"input (per-tensor FP8 experts)")
        wdtype, make = x.dtype, _dense_experts
    e, inter = _check_experts(fc1, fc2, h, gated, wdtype, x.device)
    assert isinstance(fc1, Tensor) and isinstance(fc2, Tensor)
    biases = _biases(fc1_bias, fc2_bias, e, fc1.shape[1], h, tp_rank, gated, dtype, x.device)
    return make(x, fc1, fc2, quant_scales, gated, biases), e, x


# -------------------------------------------------------------------------- activations


def _swiglu_param(name: str, value: object, e: int, default: float,
                  device: torch.device) -> list[float]:
    """One of swiglu_alpha / _beta / _limit: None (default) or fp32 [E] -> E floats."""
    if value is None:
        return [default] * e
    check_tensor(name, value, dtypes=(torch.float32,), ndim=1, device=device)
    assert isinstance(value, Tensor)
    if value.shape[0] != e:
        raise ValueError(f"{name} must have one value per local expert ([{e}]), got "
                         f"{list(value.shape)}")
    return [float(v) for v in value.tolist()]  # (one host sync)


def _swiglu_kwargs(alpha: float, beta: float, limit: float, e: int) -> dict:
    """One expert's FlashInfer SwiGLU parameters -> the op's activation kwargs."""
    if math.isnan(alpha) or math.isinf(alpha) or math.isnan(beta) or math.isnan(limit):
        raise ValueError(f"swiglu_alpha / swiglu_beta / swiglu_limit of expert {e} must be "
                         f"numbers (alpha finite), got {alpha}, {beta}, {limit}")
    if limit <= 0:
        raise ValueError(f"swiglu_limit of expert {e} must be > 0 (the clamp bound), got "
                         f"{limit}")
    if beta == 1.0:  # GPT-OSS's clamped SwiGLU
        return {"activation": "swigluoai", "alpha": alpha,
                "limit": limit if math.isfinite(limit) else _FP32_MAX}
    if beta == 0.0 and alpha == 1.0 and math.isinf(limit):  # plain SwiGLU
        return {"activation": "silu"}
    raise NotImplementedError(
        f"swiglu_beta {beta} (expert {e}, with swiglu_alpha {alpha}, swiglu_limit {limit}) "
        f"has no minikernels activation: its clamped SwiGLU ('swigluoai') adds 1 to the "
        f"clamped up projection (swiglu_beta = 1, GPT-OSS); swiglu_beta 0 is supported "
        f"only as plain SwiGLU (swiglu_alpha 1, no swiglu_limit)")


def _activation_groups(name: str, act: str, alpha: object, beta: object, limit: object,
                       e: int, device: torch.device) -> list[tuple[Tensor | None, dict]]:
    """[(local experts' mask or None = all, activation kwargs)]: one entry unless the
    SwiGLU parameters differ between experts."""
    given = [n for n, v in (("swiglu_alpha", alpha), ("swiglu_beta", beta),
                            ("swiglu_limit", limit)) if v is not None]
    if name not in ("Swiglu", "SwigluBias"):
        if given:
            raise ValueError(f"{given[0]} applies to activation_type Swiglu / SwigluBias "
                             f"only, got activation_type {name}")
        return [(None, {"activation": act})]
    if not given:
        return [(None, {"activation": act})]
    params = zip(_swiglu_param("swiglu_alpha", alpha, e, 1.0, device),
                 _swiglu_param("swiglu_beta", beta, e, 0.0, device),
                 _swiglu_param("swiglu_limit", limit, e, math.inf, device))
    experts_of: dict[tuple, list[int]] = {}
    kwargs_of: dict[tuple, dict] = {}
    for i, (a, b, lim) in enumerate(params):
        kw = _swiglu_kwargs(a, b, lim, i)
        key = tuple(sorted(kw.items()))
        experts_of.setdefault(key, []).append(i)
        kwargs_of[key] = kw
    if len(experts_of) == 1:
        return [(None, next(iter(kwargs_of.values())))]
    groups = []
    for key, members in experts_of.items():
        mask = torch.zeros(e, dtype=torch.bool, device=device)
        mask[members] = True
        groups.append((mask, kwargs_of[key]))
    return groups


def _run_groups(run: _ExpertCall, weights: Tensor, ids: Tensor,
                groups: list[tuple[Tensor | None, dict]]) -> Tensor:
    """One op call per activation group (its experts' weights kept, the others' zeroed);
    several groups' outputs are summed in fp32 and rounded once more."""
    if len(groups) == 1 and groups[0][0] is None:
        return run(weights, ids, groups[0][1])
    total = None
    for mask, kw in groups:
        part = run(torch.where(mask[ids.long()], weights, 0.0), ids, kw).float()
        total = part if total is None else total + part
    assert total is not None
    return total


def _write(out: Tensor, output: object, dtype: torch.dtype) -> Tensor:
    """FlashInfer's ``output``: [T, H] in output_dtype on input's device, written."""
    if output is None:
        return out.to(dtype)
    check_tensor("output", output, dtypes=(dtype,), device=out.device)
    assert isinstance(output, Tensor)
    check_shape("output", output, list(out.shape))
    return output.copy_(out)


# ------------------------------------------------------------------------------ the API


def cutlass_fused_moe(
    input: Tensor,
    token_selected_experts: Tensor,
    token_final_scales: Tensor | None,
    fc1_expert_weights: Tensor,
    fc2_expert_weights: Tensor,
    output_dtype: torch.dtype,
    quant_scales: list[Tensor] | None,
    fc1_expert_biases: Tensor | None = None,
    fc2_expert_biases: Tensor | None = None,
    input_sf: Tensor | None = None,
    swiglu_alpha: Tensor | None = None,
    swiglu_beta: Tensor | None = None,
    swiglu_limit: Tensor | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    ep_size: int = 1,
    ep_rank: int = 0,
    cluster_size: int = 1,
    cluster_rank: int = 0,
    output: Tensor | None = None,
    enable_alltoall: bool = False,
    use_deepseek_fp8_block_scale: bool = False,
    use_w4_group_scaling: bool = False,
    use_mxfp8_act_scaling: bool = False,
    min_latency_mode: bool = False,
    use_packed_weights: bool = False,
    use_wfp4afp8_humming: bool = False,
    tune_max_num_tokens: int = 8192,
    enable_pdl: bool | None = None,
    activation_type: ActivationType | int = ActivationType.Swiglu,
    swizzled_input_sf: bool = True,
    use_fused_finalize: bool = True,
    profile_ids: list[int] | None = None,
    workspace_buffer: Tensor | None = None,
) -> list[Tensor]:
    """FlashInfer's ``cutlass_fused_moe`` (its main-branch signature; module doc for the
    layouts, formats, parallelism and differences): out[t] = sum_j
    token_final_scales[t, j] * expert_e(input[t]) over this EP rank's experts e.

    input [T, H] fp16 / bf16 (fp32 too; float8_e4m3fn for per-tensor FP8 experts);
    token_selected_experts [T, k] int32 global expert ids; token_final_scales [T, k] fp32
    (None: weights 1); fc1_expert_weights [E, 2I, H] with the up rows first, then the gate
    rows ([E, I, H] for a non-gated activation); fc2_expert_weights [E, H, I];
    output_dtype the result's dtype (input's for 16-bit inputs); quant_scales None / []
    for 16-bit experts, else the format's list (module doc). Returns ``[output]``:
    [T, H] in output_dtype, the caller's ``output`` buffer when given.
    """
    _refuse_features(input_sf, enable_alltoall, use_w4_group_scaling, use_mxfp8_act_scaling,
                     min_latency_mode, use_packed_weights, use_wfp4afp8_humming)
    if not isinstance(use_deepseek_fp8_block_scale, bool):
        raise TypeError(f"use_deepseek_fp8_block_scale must be a bool, got "
                        f"{type(use_deepseek_fp8_block_scale).__name__}")
    _check_tuning(tune_max_num_tokens, enable_pdl, swizzled_input_sf, use_fused_finalize,
                  profile_ids, workspace_buffer)
    _, tp_rank = _rank("tp_size", tp_size, "tp_rank", tp_rank)
    _, ep_rank = _rank("ep_size", ep_size, "ep_rank", ep_rank)
    if (_int("cluster_size", cluster_size, 1), _int("cluster_rank", cluster_rank, 0)) != (1, 0):
        raise NotImplementedError("cluster_size / cluster_rank other than 1 / 0 (FlashInfer's "
                                  "smart router, min-latency mode only) are not supported")
    name, act, gated = _activation(activation_type)
    check_tensor("input", input, dtypes=(*FLOAT_DTYPES, FP8), ndim=2)
    dtype = _output_dtype(output_dtype, input)
    run, e, x = _experts(input, fc1_expert_weights, fc2_expert_weights, quant_scales, gated,
                         use_deepseek_fp8_block_scale, fc1_expert_biases, fc2_expert_biases,
                         tp_rank, dtype)
    weights, ids = _route(token_selected_experts, token_final_scales, x.shape[0], e, ep_rank,
                          x.device)
    groups = _activation_groups(name, act, swiglu_alpha, swiglu_beta, swiglu_limit, e,
                                x.device)
    return [_write(_run_groups(run, weights, ids, groups), output, dtype)]


def fused_topk_deepseek(scores: Tensor, bias: Tensor, n_group: int, topk_group: int,
                        topk: int, routed_scaling_factor: float, topk_values: Tensor,
                        topk_indices: Tensor, launch_with_pdl: bool = True,
                        routing_replay_out: Tensor | None = None, *,
                        backend: str = "default") -> None:
    """FlashInfer's ``fused_topk_deepseek`` (DeepSeek-V3's no-aux-loss routing), written in
    place: s = sigmoid(scores); the experts in n_group equal groups, a group's score the
    sum of its two best s + bias; the topk_group best groups stay choosable; the topk
    experts of largest s + bias among them; weights s / sum(s over the chosen) *
    routed_scaling_factor.

    scores [T, E] fp16 / bf16 / fp32 router logits; bias [E] in scores' dtype;
    topk_values [T, topk] in scores' dtype (the weights), topk_indices [T, topk] int32 (the
    expert ids), both written; routing_replay_out: optional int16 [>= T, topk], its
    first T rows get the ids. On ``ops.topk_sigmoid`` (ties go to the lower expert id;
    FlashInfer's kernel limits, topk <= 8 and group sizes, do not apply).
    ``launch_with_pdl`` and ``backend`` ("default" / "cake") are accepted and unused.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, ndim=2)
    t, e = scores.shape
    check_tensor("bias", bias, dtypes=(scores.dtype,), ndim=1, device=scores.device)
    check_shape("bias", bias, [e])
    n_group = _int("n_group", n_group, 1)
    topk_group = _int("topk_group", topk_group, 1)
    topk = _int("topk", topk, 1)
    if e % n_group:
        raise ValueError(f"n_group ({n_group}) must divide the number of experts ({e})")
    if topk_group > n_group or topk_group * n_group < topk:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group}) and "
                         f"topk_group * n_group >= topk ({topk})")
    if topk > topk_group * (e // n_group):
        raise ValueError(f"topk ({topk}) must be at most topk_group x experts per group "
                         f"({topk_group} x {e // n_group})")
    scale = check_finite_float("routed_scaling_factor", routed_scaling_factor)
    if not isinstance(launch_with_pdl, bool):
        raise TypeError(f"launch_with_pdl must be a bool, got {type(launch_with_pdl).__name__}")
    if backend not in ("default", "cake"):
        raise ValueError(f"backend must be 'default' or 'cake', got {backend!r}")
    check_tensor("topk_values", topk_values, dtypes=(scores.dtype,), device=scores.device)
    check_shape("topk_values", topk_values, [t, topk])
    check_tensor("topk_indices", topk_indices, dtypes=(torch.int32,), device=scores.device)
    check_shape("topk_indices", topk_indices, [t, topk])
    if routing_replay_out is not None:
        check_tensor("routing_replay_out", routing_replay_out, dtypes=(torch.int16,), ndim=2,
                     device=scores.device)
        if routing_replay_out.shape[0] < t or routing_replay_out.shape[1] != topk:
            raise ValueError(f"routing_replay_out must have shape [>= {t}, {topk}], got "
                             f"{list(routing_replay_out.shape)}")
    weights, ids = ops.topk_sigmoid(scores, topk, True, bias, num_groups=n_group,
                                    topk_groups=topk_group)
    topk_values.copy_(weights * scale)
    topk_indices.copy_(ids)
    if routing_replay_out is not None:
        routing_replay_out[:t].copy_(ids)
