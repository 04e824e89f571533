"""Op family: MoE routing. Ops: ``minikernels::topk_softmax``, ``minikernels::topk_sigmoid``.

The softmax top-k router of Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / Granite-MoE, fused
(vLLM's ``topk_softmax`` kernel behind ``fused_topk``): each token's router logits ->
softmax in fp32 -> its k most probable experts, in descending order, ties to the lower
expert id -> optionally their weights renormalized to sum 1. The output is what
:func:`minikernels.ops.fused_moe` takes: ``topk_weights`` fp32 [T, k], ``topk_ids`` int32
(or int64) [T, k]. Spec: ``reference.topk_softmax``. Backends: reference, triton
(ops/triton/router.py). Tests: tests/test_router_op.py.

The sigmoid router (LFM2-MoE; vLLM's ``topk_sigmoid``, DeepSeek-V3's scoring without
expert groups): sigmoid scores, chosen with an optional per-expert correction bias that
only chooses, the weights the unbiased scores, optionally renormalized (+ an eps).
Spec: ``reference.topk_sigmoid``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor
from . import _alloc, reference

#: the most experts a row may have (the Triton kernel holds a row in registers)
MAX_EXPERTS = 4096
#: the most expert groups of group-limited routing (a loop per group in the kernel)
MAX_GROUPS = 64
_INDEX_DTYPES = (torch.int32, torch.int64)


@torch.library.custom_op("minikernels::topk_softmax", mutates_args=())
def _topk_softmax(gating_output: Tensor, topk: int, renormalize: bool,
                  indices_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if _backend.resolve("topk_softmax", gating_output.device) == "triton":
        from .triton import router as triton_router
        shape = (gating_output.shape[0], topk)
        weights = _alloc.empty(shape, torch.float32, gating_output.device)
        ids = _alloc.empty(shape, indices_dtype, gating_output.device)
        triton_router.topk_softmax(weights, ids, gating_output, renormalize)
        return weights, ids
    weights, ids = reference.topk_softmax(gating_output, topk, renormalize, indices_dtype)
    return weights.contiguous(), ids.contiguous()


@_topk_softmax.register_fake
def _(gating_output: Tensor, topk: int, renormalize: bool,
      indices_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (gating_output.shape[0], topk)
    return (torch.empty(shape, dtype=torch.float32, device=gating_output.device),
            torch.empty(shape, dtype=indices_dtype, device=gating_output.device))


@torch.library.custom_op("minikernels::topk_sigmoid", mutates_args=())
def _topk_sigmoid(gating_output: Tensor, topk: int, renormalize: bool,
                  correction_bias: Tensor | None, renorm_eps: float, num_groups: int,
                  topk_groups: int, indices_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if _backend.resolve("topk_sigmoid", gating_output.device) == "triton":
        from .triton import router as triton_router
        shape = (gating_output.shape[0], topk)
        weights = _alloc.empty(shape, torch.float32, gating_output.device)
        ids = _alloc.empty(shape, indices_dtype, gating_output.device)
        triton_router.topk_sigmoid(weights, ids, gating_output, renormalize, correction_bias,
                                   renorm_eps, num_groups, topk_groups)
        return weights, ids
    weights, ids = reference.topk_sigmoid(gating_output, topk, renormalize, correction_bias,
                                          renorm_eps, num_groups, topk_groups, indices_dtype)
    return weights.contiguous(), ids.contiguous()


@_topk_sigmoid.register_fake
def _(gating_output: Tensor, topk: int, renormalize: bool, correction_bias: Tensor | None,
      renorm_eps: float, num_groups: int, topk_groups: int,
      indices_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (gating_output.shape[0], topk)
    return (torch.empty(shape, dtype=torch.float32, device=gating_output.device),
            torch.empty(shape, dtype=indices_dtype, device=gating_output.device))


def _check(gating_output: Tensor, topk: int, renormalize: bool,
           indices_type: torch.dtype | None) -> torch.dtype:
    """Validate the router arguments; returns the ids dtype."""
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    experts = gating_output.shape[1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"gating_output must have 1..{MAX_EXPERTS} experts (columns), got "
                         f"shape {list(gating_output.shape)}")
    if not isinstance(topk, int) or isinstance(topk, bool):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= experts:
        raise ValueError(f"topk must be in [1, num_experts = {experts}], got {topk}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if indices_type is None:
        return torch.int32
    if indices_type not in _INDEX_DTYPES:
        raise TypeError(f"indices_type must be None, torch.int32 or torch.int64, got "
                        f"{indices_type!r}")
    return indices_type


def topk_softmax(gating_output: Tensor, topk: int, renormalize: bool = False,
                 indices_type: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Route each token to its ``topk`` most probable experts.

    gating_output [T, E] fp16/bf16/fp32 router logits (any strides; 1 <= E <= 4096), e.g.
    ``x @ gate.weight.T``; 1 <= topk <= E; renormalize: divide the k weights by their
    sum (Mixtral, Granite-MoE, Qwen3-MoE's ``norm_topk_prob``); indices_type: torch.int32
    (default) or torch.int64 ids (vLLM's ``indices_type``).

    Returns (topk_weights fp32 [T, topk], topk_ids [T, topk]), both contiguous: the
    softmax probabilities (fp32, max-subtracted) of the chosen experts, largest first;
    equal logits choose the lower expert id first. A row whose softmax is not finite
    (any NaN or +inf logit, or all -inf) gets experts 0..topk-1 with weight 0 (vLLM's
    clamp), so downstream MoE kernels always see distinct, in-range ids and finite weights.
    See :func:`minikernels.ops.reference.topk_softmax`.
    """
    ids_dtype = _check(gating_output, topk, renormalize, indices_type)
    return torch.ops.minikernels.topk_softmax(gating_output, topk, renormalize, ids_dtype)


def topk_sigmoid(gating_output: Tensor, topk: int, renormalize: bool = False,
                 correction_bias: Tensor | None = None, renorm_eps: float = 0.0,
                 indices_type: torch.dtype | None = None, num_groups: int = 1,
                 topk_groups: int | None = None) -> tuple[Tensor, Tensor]:
    """Route each token to the ``topk`` experts of the largest sigmoid scores.

    gating_output [T, E] fp16/bf16/fp32 router logits (any strides; 1 <= E <= 4096);
    correction_bias: None or [E] (any float dtype, on the logits' device): added to the
    scores to choose the experts only (LFM2-MoE's ``expert_bias``, DeepSeek-V3's
    ``e_score_correction_bias``); renormalize: divide the k weights by their sum plus
    ``renorm_eps`` (>= 0; LFM2-MoE uses 1e-6); indices_type as :func:`topk_softmax`;
    num_groups / topk_groups: group-limited routing (DeepSeek-V3, Nemotron 3; vLLM's
    grouped_topk with sigmoid scoring): the experts in num_groups equal groups, only the
    topk_groups best groups choosable (a group's score: the sum of its two best choices
    with a bias, its best without); topk_groups None = num_groups (no limit).

    Returns (topk_weights fp32 [T, topk], topk_ids [T, topk]), contiguous: the chosen
    experts' sigmoid scores (unbiased), largest choice first, ties to the lower expert id.
    Without a bias the choice is made on the logits (exact); with one, on fp32 s + bias,
    where a kernel's sigmoid may differ from torch's by an ulp (a near-tie may then go
    either way). A row with a NaN or +inf logit gets experts 0..topk-1 with weight 0.
    See :func:`minikernels.ops.reference.topk_sigmoid`.
    """
    ids_dtype = _check(gating_output, topk, renormalize, indices_type)
    if correction_bias is not None:
        check_tensor("correction_bias", correction_bias, dtypes=FLOAT_DTYPES, ndim=1,
                     device=gating_output.device)
        if correction_bias.shape[0] != gating_output.shape[1]:
            raise ValueError(f"correction_bias must have one value per expert "
                             f"({gating_output.shape[1]}), got shape "
                             f"{list(correction_bias.shape)}")
        correction_bias = correction_bias.contiguous()
    if not isinstance(renorm_eps, (int, float)) or isinstance(renorm_eps, bool) or \
            not 0 <= renorm_eps < float("inf"):
        raise ValueError(f"renorm_eps must be a finite number >= 0, got {renorm_eps!r}")
    experts = gating_output.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or \
            not 1 <= num_groups <= MAX_GROUPS or experts % num_groups:
        raise ValueError(f"num_groups must be an int in [1, {MAX_GROUPS}] dividing the "
                         f"{experts} experts, got {num_groups!r}")
    topk_groups = num_groups if topk_groups is None else topk_groups
    if not isinstance(topk_groups, int) or isinstance(topk_groups, bool) or \
            not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be an int in [1, num_groups = {num_groups}], "
                         f"got {topk_groups!r}")
    if topk > topk_groups * (experts // num_groups):
        raise ValueError(f"topk ({topk}) must be at most topk_groups x experts per group "
                         f"({topk_groups} x {experts // num_groups})")
    return torch.ops.minikernels.topk_sigmoid(gating_output, topk, renormalize,
                                              correction_bias, float(renorm_eps), num_groups,
                                              topk_groups, ids_dtype)


def fused_topk(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool,
               indices_type: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """vLLM's ``fused_topk``: :func:`topk_softmax` plus ``token_expert_indices``.

    hidden_states [T, H] (only its token count is used: it must match gating_output's).
    Returns (topk_weights fp32 [T, k], topk_ids int32 / indices_type [T, k],
    token_expert_indices int32 [T, k]). token_expert_indices[t, j] = j * T + t, what
    vLLM's kernel writes (``source_rows``: the row of token t's j-th choice in a
    slot-major [k * T] expansion, for permute-style MoE); it depends on the shape only.
    """
    check_tensor("hidden_states", hidden_states, min_ndim=1)
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(f"hidden_states has {hidden_states.shape[0]} tokens but "
                         f"gating_output has {gating_output.shape[0]} rows")
    weights, ids = topk_softmax(gating_output, topk, renormalize, indices_type)
    tokens = gating_output.shape[0]
    slot = torch.arange(topk, dtype=torch.int32, device=gating_output.device)
    token = torch.arange(tokens, dtype=torch.int32, device=gating_output.device)
    return weights, ids, slot[None, :] * tokens + token[:, None]
