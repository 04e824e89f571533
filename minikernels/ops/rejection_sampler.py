"""Op family: speculative decoding. Op: ``minikernels::rejection_sample``.

Verifies draft tokens against the target model's distributions so that the emitted
tokens follow the target distribution exactly (speculative sampling, Leviathan et al.
2023; vLLM's rejection sampler layouts): accept draft x with probability
min(1, p_target(x) / p_draft(x)); at the first rejection emit a token from
normalize(max(0, p_target - p_draft)) and stop; greedy rows accept the longest prefix
that matches the target argmax; when every draft is accepted emit a bonus token from the
target. The randoms are inputs (``uniform`` for acceptance, ``exp_q`` for the exponential
race), so seeded sampling reproduces. Spec: ``reference.rejection_sample``. Backends:
reference, triton (ops/triton/rejection_sampler.py). Tests: tests/test_rejection_sampler.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import check_tensor
from . import _alloc, reference


@torch.library.custom_op("minikernels::rejection_sample", mutates_args=())
def _rejection_sample(draft_token_ids: Tensor, num_draft_tokens: Tensor, target_probs: Tensor,
                      draft_probs: Tensor | None, uniform: Tensor, exp_q: Tensor,
                      is_greedy: Tensor) -> Tensor:
    if _backend.resolve("rejection_sample", target_probs.device) == "triton":
        from .triton import rejection_sampler as triton_rs
        B, K = draft_token_ids.shape
        out = _alloc.empty((B, K + 1), torch.int64, target_probs.device)
        triton_rs.rejection_sample(out, draft_token_ids, num_draft_tokens.to(torch.int32),
                                   target_probs, draft_probs, uniform, exp_q,
                                   is_greedy.to(torch.int8))
        return out
    return reference.rejection_sample(draft_token_ids, num_draft_tokens, target_probs,
                                      draft_probs, uniform, exp_q, is_greedy)


@_rejection_sample.register_fake
def _(draft_token_ids: Tensor, num_draft_tokens: Tensor, target_probs: Tensor,
      draft_probs: Tensor | None, uniform: Tensor, exp_q: Tensor, is_greedy: Tensor) -> Tensor:
    B, K = draft_token_ids.shape
    return draft_token_ids.new_empty((B, K + 1))


def rejection_sample(draft_token_ids: Tensor, num_draft_tokens: Tensor, target_probs: Tensor,
                     draft_probs: Tensor | None, uniform: Tensor, exp_q: Tensor,
                     is_greedy: Tensor) -> Tensor:
    """Verify each row's draft tokens; returns int64 [B, K + 1] (-1 after the last token).

    draft_token_ids int64 [B, K] (entries past num_draft_tokens[b] are ignored);
    num_draft_tokens int32/int64 [B] in [0, K]; target_probs fp32 [B, K + 1, V] (row b,
    position j: the target distribution after draft j - 1, already temperature / top-k /
    top-p / min-p processed; greedy rows may pass raw logits: only their argmax is used);
    draft_probs fp32 [B, K, V] or None (None: each draft is a point mass, e.g. n-gram);
    uniform fp32 [B, K] in [0, 1) (acceptance randoms); exp_q fp32 [B, V], Exp(1) randoms
    (the recovered / bonus token is ``argmax(r / exp_q)``); is_greedy bool [B].
    Semantics: :func:`minikernels.ops.reference.rejection_sample`.
    """
    check_tensor("draft_token_ids", draft_token_ids, dtypes=(torch.int64,), ndim=2)
    dev = draft_token_ids.device
    B, K = draft_token_ids.shape
    check_tensor("num_draft_tokens", num_draft_tokens, dtypes=(torch.int32, torch.int64),
                 ndim=1, device=dev)
    check_tensor("target_probs", target_probs, dtypes=(torch.float32,), ndim=3, device=dev)
    V = target_probs.shape[2]
    if num_draft_tokens.shape[0] != B or tuple(target_probs.shape[:2]) != (B, K + 1):
        raise ValueError(f"num_draft_tokens must be [{B}] and target_probs [{B}, {K + 1}, V]"
                         f" for draft_token_ids [{B}, {K}], got "
                         f"{list(num_draft_tokens.shape)} and {list(target_probs.shape)}")
    if V < 1:
        raise ValueError("target_probs must have a vocabulary dimension >= 1")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), ndim=3, device=dev)
        if tuple(draft_probs.shape) != (B, K, V):
            raise ValueError(f"draft_probs must be [{B}, {K}, {V}], got "
                             f"{list(draft_probs.shape)}")
        draft_probs = draft_probs.contiguous()
    check_tensor("uniform", uniform, dtypes=(torch.float32,), ndim=2, device=dev)
    check_tensor("exp_q", exp_q, dtypes=(torch.float32,), ndim=2, device=dev)
    check_tensor("is_greedy", is_greedy, dtypes=(torch.bool,), ndim=1, device=dev)
    if tuple(uniform.shape) != (B, K) or tuple(exp_q.shape) != (B, V) or \
            is_greedy.shape[0] != B:
        raise ValueError(f"uniform must be [{B}, {K}], exp_q [{B}, {V}], is_greedy [{B}]; got "
                         f"{list(uniform.shape)}, {list(exp_q.shape)}, "
                         f"{list(is_greedy.shape)}")
    return torch.ops.minikernels.rejection_sample(
        draft_token_ids.contiguous(), num_draft_tokens.contiguous(), target_probs.contiguous(),
        draft_probs, uniform.contiguous(), exp_q.contiguous(), is_greedy.contiguous())
