"""flash-linear-attention's (``fla``) gated delta rule API on
:func:`minikernels.ops.gated_delta_rule`, so code written against FLA (Qwen3-Next /
Qwen3.5's Gated DeltaNet layers, transformers' hybrid models) swaps one import:

    from minikernels.compat.fla import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                            output_final_state=True)

FLA's names, defaults, layouts and returns (``fla.ops.gated_delta_rule``):

    chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None, head_first=False,
                           use_qk_l2norm_in_kernel=False)
    fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, scale=None,
                                     initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                                     *, gk=None, gv=None)

q, k [B, T, H, K], v [B, T, HV, V] (one dtype; HV a multiple of H: value head h reads q / k
head h // (HV // H)), g [B, T, HV] log-decay, beta [B, T, HV] (fused_recurrent: None =
ones); with cu_seqlens (int32 / int64 [N + 1], FlashAttention's layout) B must be 1 and the
T tokens are N sequences, else each batch row is one sequence (N = B). scale None =
K ** -0.5. initial_state [N, HV, K, V] (any float dtype; read, never written). Returns
(o [B, T, HV, V] in v's dtype, final_state fp32 [N, HV, K, V] or None when
output_final_state is False). Per sequence and value head, in fp32 with S [K, V]:
S = S * exp(g_t); S = S + outer(k_t, beta_t * (v_t - k_t^T S)); o_t = (scale q_t)^T S,
q and k L2-normalized per head first (x * rsqrt(sum(x^2) + 1e-6), FLA's) with
use_qk_l2norm_in_kernel. Both functions compute the same recurrence (the chunked and the
token-by-token forms are the same math; minikernels' op picks its own kernels).

The later arguments are best passed by keyword: their order changed across FLA releases
(newer ones put use_qk_l2norm_in_kernel before cu_seqlens, and gk / gv after g in
fused_recurrent); this module follows the order above.

Not supported (NotImplementedError naming the argument): head_first=True (deprecated in
FLA), gk / gv (per-key / per-value decays: another recurrence), beta of shape
[B, T, HV, V] (per-channel betas). Differences: fp32 inputs are accepted (FLA's chunk
kernel refuses them); no backward (inference). Shares its code with
:func:`minikernels.compat.vllm_ops.fused_recurrent_gated_delta_rule` (vLLM's in-place
state-pool flavour of the same function).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_shape, check_tensor
from . import vllm_ops

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
                      scale: float | None, initial_state: Tensor | None,
                      output_final_state: bool, cu_seqlens: Tensor | None,
                      use_qk_l2norm_in_kernel: bool) -> tuple[Tensor, Tensor | None]:
    """FLA's contract on vllm_ops' pool form: the final states land in a fresh fp32 pool
    (a copy of initial_state, or zeros), one slot per sequence."""
    _bool("output_final_state", output_final_state)
    _bool("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4, device=q.device)
    batch = q.shape[0]
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64), ndim=1,
                     device=q.device)
        if batch != 1:
            raise ValueError(f"The batch size is expected to be 1 rather than {batch} when "
                             "using cu_seqlens (flatten variable-length inputs into T)")
    n = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    # the op takes g / beta in fp32 or v's dtype: widen others (exact)
    if isinstance(g, Tensor) and g.dtype not in (torch.float32, v.dtype):
        g = g.float()
    if isinstance(beta, Tensor) and beta.dtype not in (torch.float32, v.dtype):
        beta = beta.float()
    pool = None
    if initial_state is not None:
        check_tensor("initial_state", initial_state, dtypes=FLOAT_DTYPES, ndim=4,
                     device=q.device)
        check_shape("initial_state", initial_state,
                    [n, v.shape[2], q.shape[3], v.shape[3]])
        pool = initial_state.to(torch.float32, copy=True)      # FLA never writes it
    o, final = vllm_ops.fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state=pool, inplace_final_state=True,
        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o, (final if output_final_state else None)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           output_final_state: bool = False,
                           cu_seqlens: Tensor | None = None, head_first: bool = False,
                           use_qk_l2norm_in_kernel: bool = False
                           ) -> tuple[Tensor, Tensor | None]:
    """FLA's chunk_gated_delta_rule -> (o [B, T, HV, V], final_state [N, HV, K, V] fp32 or
    None). See the module docstring."""
    if _bool("head_first", head_first):
        raise NotImplementedError("head_first=True is not supported by minikernels "
                                  "(deprecated in FLA): pass q / k / v as [B, T, H, ...]")
    if beta is None:
        raise TypeError("beta must be a torch.Tensor [B, T, HV] (chunk_gated_delta_rule has "
                        "no default beta)")
    return _gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                             cu_seqlens, use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None,
                                     beta: Tensor | None = None, scale: float | None = None,
                                     initial_state: Tensor | None = None,
                                     output_final_state: bool = False,
                                     cu_seqlens: Tensor | None = None,
                                     use_qk_l2norm_in_kernel: bool = False, *,
                                     gk: Tensor | None = None, gv: Tensor | None = None
                                     ) -> tuple[Tensor, Tensor | None]:
    """FLA's fused_recurrent_gated_delta_rule -> (o [B, T, HV, V], final_state [N, HV, K, V]
    fp32 or None). g None = no decay; beta None = ones. See the module docstring."""
    for name, value in (("gk", gk), ("gv", gv)):
        if value is not None:
            raise NotImplementedError(f"{name} is not supported by minikernels (per-key / "
                                      "per-value decays); pass g [B, T, HV]")
    if g is None:
        check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4)
        g = torch.zeros(v.shape[:3], dtype=torch.float32, device=v.device)
    return _gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                             cu_seqlens, use_qk_l2norm_in_kernel)
