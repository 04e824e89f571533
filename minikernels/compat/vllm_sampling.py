"""vLLM V1's top-k / top-p sampler (``vllm.v1.sample.ops.topk_topp_sampler``) on
minikernels' sampling op, so sampler code and tests written against vLLM swap one import:

    from minikernels.compat.vllm_sampling import apply_top_k_top_p, random_sample
    # was: from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, random_sample
    logits = apply_top_k_top_p(logits, k, p)         # masked in place, returned
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    next_ids = random_sample(probs, generators)      # [B] int64

Covered (vLLM name -> minikernels):
    apply_top_k_top_p(logits, k, p), apply_top_k_top_p_pytorch(logits, k, p,
        allow_cpu_sync=False), apply_top_k_only(logits, k)
                                  ops.top_k_top_p_mask_logits (one launch on a GPU: no
                                  sort of the vocabulary, no host sync); the result is
                                  written into logits (vLLM: "may be updated in place") and
                                  logits is returned
    random_sample(probs, generators, use_fp64_gumbel=False)
                                  plain PyTorch: the exponential race argmax(probs / q),
                                  q ~ Exp(1), rows with their own torch.Generator drawn
                                  from it (vLLM's method: no host sync)
    flashinfer_sample(logits, k, p, generators={})
                                  minikernels.compat.flashinfer's sampling functions
    TopKTopPSampler(logprobs_mode="raw_logprobs", use_fp64_gumbel=False)
                                  forward(logits, generators, k, p) -> (token ids [B],
                                  processed logits / logprobs or None): vLLM's native path
                                  on the functions above

k: integer tensor [B] (k >= vocab size: no top-k for that row) or None; p: float tensor [B]
(or one element for every row) in [0, 1] (1: no top-p) or None. Filters apply top-k then
top-p on what top-k kept, as vLLM's. Difference: vLLM's sort-based top-p breaks ties at its
edge by sort order; minikernels keeps tokens tied with the last kept one together (the
same set whenever the edge is not a tie).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .._validation import FLOAT_DTYPES, check_tensor

__all__ = ["TopKTopPSampler", "apply_top_k_only", "apply_top_k_top_p",
           "apply_top_k_top_p_pytorch", "flashinfer_sample", "random_sample"]

#: vLLM's logprobs modes whose logprobs come from the processed (filtered) logits.
PROCESSED_LOGPROBS_MODES = ("processed_logits", "processed_logprobs")
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", *PROCESSED_LOGPROBS_MODES)


def _per_row(name: str, t: Tensor | None, rows: int, device: torch.device,
             integer: bool) -> Tensor | None:
    """k / p as one value per row ([B], or one element broadcast to every row)."""
    if t is None:
        return None
    dtypes = (torch.int32, torch.int64) if integer else FLOAT_DTYPES
    check_tensor(name, t, dtypes=dtypes, ndim=1, device=device)
    if t.shape[0] not in (1, rows):
        raise ValueError(f"{name} must have one value per row ({rows}) or one for all, got "
                         f"shape {list(t.shape)}")
    return t.expand(rows)


def apply_top_k_top_p(logits: Tensor, k: Tensor | None, p: Tensor | None) -> Tensor:
    """Set to -inf the logits [B, V] (fp32 / fp16 / bf16) that top-k (k [B] int) and then
    top-p (p [B] float) drop; in place, returns logits. See the module docstring."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    if k is None and p is None:
        return logits
    rows = logits.shape[0]
    kk = _per_row("k", k, rows, logits.device, True)
    pp = _per_row("p", p, rows, logits.device, False)
    masked = ops.top_k_top_p_mask_logits(
        logits, top_k=None if kk is None else kk.clamp(max=logits.shape[1]), top_p=pp)
    return logits.copy_(masked)


def apply_top_k_top_p_pytorch(logits: Tensor, k: Tensor | None, p: Tensor | None,
                              allow_cpu_sync: bool = False) -> Tensor:
    """vLLM's PyTorch fallback's name: :func:`apply_top_k_top_p` (no sort or sync here,
    whatever ``allow_cpu_sync``)."""
    return apply_top_k_top_p(logits, k, p)


def apply_top_k_only(logits: Tensor, k: Tensor) -> Tensor:
    """Top-k alone (k [B]; k == vocab size: row unchanged); in place, returns logits."""
    if k is None:
        raise ValueError("k must be a tensor of one value per row, got None")
    return apply_top_k_top_p(logits, k, None)


def random_sample(probs: Tensor, generators: dict[int, torch.Generator],
                  use_fp64_gumbel: bool = False) -> Tensor:
    """One token per row of probs [B, V] (fp32): argmax(probs / q) with q ~ Exp(1) i.i.d.
    (token i wins with probability probs[i] / sum(probs)); rows named in ``generators``
    draw their q from that torch.Generator (reproducible per request), the others from the
    default one. ``use_fp64_gumbel``: q in fp64. Returns int64 [B]. Plain PyTorch."""
    check_tensor("probs", probs, dtypes=FLOAT_DTYPES, ndim=2)
    if not isinstance(generators, dict):
        raise TypeError(f"generators must be a dict of row -> torch.Generator, got "
                        f"{type(generators).__name__}")
    for i in generators:
        if not isinstance(i, int) or not 0 <= i < probs.shape[0]:
            raise ValueError(f"generators has row {i!r}, outside [0, {probs.shape[0]})")
    q = torch.empty(probs.shape, device=probs.device,
                    dtype=torch.float64 if use_fp64_gumbel else probs.dtype)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for i, gen in generators.items():
        q[i].exponential_(generator=gen)
    scores = probs / q if q.dtype == probs.dtype else probs.to(q.dtype) / q
    return scores.argmax(dim=-1).view(-1)


def flashinfer_sample(logits: Tensor, k: Tensor | None, p: Tensor | None,
                      generators: dict[int, torch.Generator] | None = None) -> Tensor:
    """vLLM's FlashInfer path (statistically the same as random_sample after
    apply_top_k_top_p): minikernels.compat.flashinfer's top_p / top_k sampling from
    probs, or top_k_top_p_sampling_from_logits. Per-row generators are not taken (vLLM
    falls back to the native path for them): ValueError."""
    from . import flashinfer

    if k is None and p is None:
        raise ValueError("flashinfer_sample needs k or p (vLLM asserts one is set)")
    if generators:
        raise ValueError("flashinfer_sample does not take per-row generators (vLLM samples "
                         "such batches with random_sample)")
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    rows = logits.shape[0]
    kk = _per_row("k", k, rows, logits.device, True)
    pp = _per_row("p", p, rows, logits.device, False)
    if kk is None:
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        ids = flashinfer.top_p_sampling_from_probs(probs, pp, deterministic=True)
    elif pp is None:
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        ids = flashinfer.top_k_sampling_from_probs(probs, kk, deterministic=True)
    else:
        ids = flashinfer.top_k_top_p_sampling_from_logits(logits, kk, pp, deterministic=True)
    return ids.view(-1)


class TopKTopPSampler(nn.Module):
    """vLLM's sampler module: optional top-k / top-p filtering, then one random token per
    row. ``forward(logits [B, V], generators, k, p)`` -> (token ids int64 [B], None, or
    with ``logprobs_mode`` "processed_logits" / "processed_logprobs" the filtered logits
    / their fp32 log-softmax). The logits may be updated in place (as vLLM's)."""

    def __init__(self, logprobs_mode: str = "raw_logprobs",
                 use_fp64_gumbel: bool = False) -> None:
        super().__init__()
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got "
                             f"{logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        self.use_fp64_gumbel = bool(use_fp64_gumbel)

    def forward(self, logits: Tensor, generators: dict[int, torch.Generator],
                k: Tensor | None, p: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.forward_native(logits, generators, k, p)

    def forward_native(self, logits: Tensor, generators: dict[int, torch.Generator],
                       k: Tensor | None, p: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits = apply_top_k_top_p(logits, k, p)
        processed = None
        if self.logprobs_mode == "processed_logits":
            processed = logits
        elif self.logprobs_mode == "processed_logprobs":
            processed = logits.log_softmax(dim=-1, dtype=torch.float32)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        return random_sample(probs, generators, self.use_fp64_gumbel), processed

    forward_cuda = forward_cpu = forward_native
