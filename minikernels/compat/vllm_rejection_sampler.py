"""vLLM V1's speculative-decoding rejection sampler (``vllm.v1.sample.rejection_sampler``,
``vllm.v1.spec_decode.metadata.SpecDecodeMetadata``, the fields of
``vllm.v1.sample.metadata.SamplingMetadata`` it reads) on ``ops.rejection_sample``:

    from minikernels.compat.vllm_rejection_sampler import (RejectionSampler,
                                                           SamplingMetadata,
                                                           SpecDecodeMetadata)
    meta = SpecDecodeMetadata.make_dummy([[1, 2, 3], [4]], device="cuda")
    out = RejectionSampler()(meta, draft_probs, target_logits, bonus_token_ids,
                             sampling_metadata)   # int32 [B, max_spec_len + 1], -1 padded
    tokens = RejectionSampler.parse_output(out, vocab_size)

vLLM's layouts: the drafts of all requests flattened (``draft_token_ids`` [num_tokens],
``cu_num_draft_tokens`` [B] inclusive cumulative counts, ``num_draft_tokens`` a list),
``draft_probs`` / ``target_logits`` [num_tokens, V] (None draft_probs: n-gram drafts, a
point mass each), ``bonus_token_ids`` [B, 1] (sampled by the caller from the last
position). Greedy requests (``all_greedy``, or temperature == -1, vLLM's
``GREEDY_TEMPERATURE``) accept a draft iff it is the target's argmax and emit the argmax
at the first mismatch; random requests accept draft x with probability min(1, p(x) /
q(x)) and emit a token from normalize(max(p - q, 0)) at the first rejection; all accepted:
the bonus token. Target probabilities are ``compute_probs``: logits / temperature, top-k /
top-p (:func:`minikernels.compat.vllm_sampling.apply_top_k_top_p`), fp32 softmax.

How it maps: the flat drafts are padded to [B, max_spec_len] and the target's rows to [B,
max_spec_len + 1, V] (the bonus position holds a point mass on the caller's bonus token),
then one ``ops.rejection_sample`` launch (reference on the CPU, Triton on a GPU). Random
numbers are drawn in vLLM's order and shapes (the acceptance uniforms [num_tokens], then
one Exp(1) vector [B, V] per request for the recovered token; requests with their own
``generators`` entry and at least one draft draw from it), so seeded requests are
reproducible run to run.

Differences (edges of measure zero for consistent inputs): a draft accepted when u * q(x)
< p(x) (vLLM: p(x) / q(x) >= u, and a draft with q(x) = 0 rejected); where max(p - q, 0)
is all zero the recovered token is sampled from p (vLLM's argmax of zeros is token 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from .._validation import FLOAT_DTYPES, check_tensor
from .vllm_sampling import apply_top_k_top_p

__all__ = ["GREEDY_TEMPERATURE", "MAX_SPEC_LEN", "PLACEHOLDER_TOKEN_ID", "RejectionSampler",
           "SamplingMetadata", "SpecDecodeMetadata", "compute_probs", "expand_batch_to_tokens",
           "generate_uniform_probs", "rejection_sample"]

PLACEHOLDER_TOKEN_ID = -1
GREEDY_TEMPERATURE = -1
#: vLLM's largest number of drafts per request in one step.
MAX_SPEC_LEN = 32


@dataclass
class SamplingMetadata:
    """The fields of vLLM's ``SamplingMetadata`` (same names; those the rejection sampler
    does not read have defaults). temperature fp32 [B] (-1: greedy) or None with
    all_greedy; top_p float [B] / top_k int [B] or None; generators: request index ->
    torch.Generator."""

    temperature: Tensor | None
    all_greedy: bool
    all_random: bool
    top_p: Tensor | None = None
    top_k: Tensor | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int | None = None
    no_penalties: bool = True
    prompt_token_ids: Tensor | None = None
    frequency_penalties: Tensor | None = None
    presence_penalties: Tensor | None = None
    repetition_penalties: Tensor | None = None
    output_token_ids: list[list[int]] = field(default_factory=list)
    allowed_token_ids_mask: Tensor | None = None
    bad_words_token_ids: dict[int, list[list[int]]] = field(default_factory=dict)
    logitsprocs: Any = None
    min_p: Tensor | None = None


@dataclass
class SpecDecodeMetadata:
    """vLLM's speculative-decoding step metadata: draft_token_ids int [num_tokens] (all
    requests' drafts, flattened), num_draft_tokens list [B], cu_num_draft_tokens int32 [B]
    (inclusive cumulative sums), and the logits row indices (target_logits_indices
    [num_tokens], bonus_logits_indices [B], logits_indices [num_tokens + B]), which the
    sampler does not read. ``max_spec_len`` = max(num_draft_tokens)."""

    draft_token_ids: Tensor
    num_draft_tokens: list[int]
    cu_num_draft_tokens: Tensor
    target_logits_indices: Tensor
    bonus_logits_indices: Tensor
    logits_indices: Tensor

    def __post_init__(self) -> None:
        self.max_spec_len = max(self.num_draft_tokens, default=0)

    @classmethod
    def make_dummy(cls, draft_token_ids: list[list[int]],
                   device: torch.device | str) -> "SpecDecodeMetadata":
        """Metadata for the given per-request drafts (vLLM's test constructor; the logits
        indices are zeros)."""
        counts = [len(ids) for ids in draft_token_ids]
        flat = [t for ids in draft_token_ids for t in ids]
        n, b = len(flat), len(counts)
        cu = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        zeros = lambda size: torch.zeros(size, dtype=torch.int32, device=device)  # noqa: E731
        return cls(torch.tensor(flat, dtype=torch.int32, device=device), counts,
                   cu.to(device), zeros(n), zeros(b), zeros(n + b))


def expand_batch_to_tokens(x: Tensor, cu_num_tokens: Tensor, num_tokens: int,
                           replace_from: int = 0, replace_to: int = 0) -> Tensor:
    """x [B] -> [num_tokens]: x[b] repeated for request b's tokens (cu_num_tokens [B]
    inclusive cumulative counts), values equal to replace_from replaced by replace_to."""
    check_tensor("cu_num_tokens", cu_num_tokens, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=x.device)
    if x.shape[0] != cu_num_tokens.shape[0]:
        raise ValueError(f"x ({x.shape[0]}) and cu_num_tokens ({cu_num_tokens.shape[0]}) "
                         f"must have one entry per request")
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return out


def compute_probs(logits: Tensor, cu_num_draft_tokens: Tensor,
                  sampling_metadata: SamplingMetadata) -> Tensor:
    """The target distributions at the draft positions: logits [num_tokens, V] /
    temperature (greedy requests' -1 read as 1), top-k / top-p, fp32 softmax; with
    all_greedy the logits as given (only their argmax is used)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    if sampling_metadata.all_greedy:
        return logits
    n = logits.shape[0]
    temperature = expand_batch_to_tokens(sampling_metadata.temperature, cu_num_draft_tokens,
                                         n, GREEDY_TEMPERATURE, 1)
    scaled = logits / temperature.unsqueeze(-1)
    top_k = None if sampling_metadata.top_k is None else expand_batch_to_tokens(
        sampling_metadata.top_k, cu_num_draft_tokens, n)
    top_p = None if sampling_metadata.top_p is None else expand_batch_to_tokens(
        sampling_metadata.top_p, cu_num_draft_tokens, n)
    return apply_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1, dtype=torch.float32)


def generate_uniform_probs(num_tokens: int, num_draft_tokens: list[int],
                           generators: dict[int, torch.Generator],
                           device: torch.device | str) -> Tensor:
    """fp32 [num_tokens] uniforms in [0, 1) (vLLM's draws: one batch from the default
    generator, then each request with its own generator and drafts redraws its slice)."""
    u = torch.rand((num_tokens,), dtype=torch.float32, device=device)
    start = 0
    for req, n in enumerate(num_draft_tokens):
        if n == 0:
            continue
        gen = generators.get(req)
        if gen is not None:
            u[start:start + n].uniform_(generator=gen)
        start += n
    return u


def _padded(flat: Tensor, starts: Tensor, counts: Tensor, width: int, fill: float | int
            ) -> Tensor:
    """Rows of a flat [num_tokens, ...] tensor into [B, width, ...] (request b's rows
    starts[b] .. starts[b] + counts[b] - 1 first, then ``fill``)."""
    b = counts.shape[0]
    out = flat.new_full((b, width, *flat.shape[1:]), fill)
    j = torch.arange(width, device=flat.device)
    valid = j[None, :] < counts[:, None]
    out[valid] = flat[(starts[:, None] + j[None, :])[valid]]
    return out


def rejection_sample(draft_token_ids: Tensor, num_draft_tokens: list[int], max_spec_len: int,
                     cu_num_draft_tokens: Tensor, draft_probs: Tensor | None,
                     target_probs: Tensor, bonus_token_ids: Tensor,
                     sampling_metadata: SamplingMetadata) -> Tensor:
    """Verify every request's drafts (module docstring); returns int32 [B, max_spec_len +
    1]: accepted drafts, then the recovered or bonus token, then PLACEHOLDER_TOKEN_ID."""
    check_tensor("draft_token_ids", draft_token_ids, dtypes=(torch.int32, torch.int64), ndim=1)
    dev = draft_token_ids.device
    check_tensor("target_probs", target_probs, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    check_tensor("cu_num_draft_tokens", cu_num_draft_tokens,
                 dtypes=(torch.int32, torch.int64), ndim=1, device=dev)
    check_tensor("bonus_token_ids", bonus_token_ids, dtypes=(torch.int32, torch.int64),
                 device=dev)
    b, n_tok = len(num_draft_tokens), draft_token_ids.shape[0]
    v = target_probs.shape[1]
    if not isinstance(max_spec_len, int) or not 0 <= max_spec_len <= MAX_SPEC_LEN or \
            max(num_draft_tokens, default=0) > max_spec_len:
        raise ValueError(f"max_spec_len must be an int in [max(num_draft_tokens), "
                         f"{MAX_SPEC_LEN}], got {max_spec_len!r}")
    if sum(num_draft_tokens) != n_tok or target_probs.shape[0] != n_tok:
        raise ValueError(f"num_draft_tokens must sum to draft_token_ids' length ({n_tok}) "
                         f"and target_probs must have that many rows, got "
                         f"{sum(num_draft_tokens)} and {target_probs.shape[0]}")
    if cu_num_draft_tokens.shape[0] != b or bonus_token_ids.numel() != b:
        raise ValueError(f"cu_num_draft_tokens and bonus_token_ids must have one entry per "
                         f"request ({b}), got {cu_num_draft_tokens.shape[0]} and "
                         f"{bonus_token_ids.numel()}")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
        if tuple(draft_probs.shape) != (n_tok, v):
            raise ValueError(f"draft_probs must be [{n_tok}, {v}], got "
                             f"{list(draft_probs.shape)}")
    sm = sampling_metadata
    counts = torch.tensor(num_draft_tokens, dtype=torch.int64, device=dev)
    starts = cu_num_draft_tokens.long() - counts
    k = max_spec_len
    drafts = _padded(draft_token_ids.long(), starts, counts, k, 0)
    probs = _padded(target_probs.float(), starts, counts, k + 1, 0.0)
    # the bonus position: a point mass on the caller's bonus token
    probs[torch.arange(b, device=dev), counts] = torch.nn.functional.one_hot(
        bonus_token_ids.reshape(b).long().clamp(0, v - 1), v).float()
    if sm.all_greedy:
        is_greedy = torch.ones(b, dtype=torch.bool, device=dev)
    else:
        is_greedy = (sm.temperature == GREEDY_TEMPERATURE).to(dev)
    if sm.all_greedy:       # (vLLM draws no random numbers for an all-greedy batch)
        uniform = torch.zeros((b, k), dtype=torch.float32, device=dev)
        exp_q = torch.ones((b, v), dtype=torch.float32, device=dev)
    else:
        uniform = _padded(generate_uniform_probs(n_tok, num_draft_tokens, sm.generators, dev),
                          starts, counts, k, 0.0)
        exp_q = torch.empty((b, v), dtype=torch.float32, device=dev).exponential_()
        for req, gen in sm.generators.items():
            if num_draft_tokens[req] > 0:
                exp_q[req].exponential_(generator=gen)
    dprobs = None if draft_probs is None else _padded(draft_probs.float(), starts, counts, k,
                                                      0.0)
    out = ops.rejection_sample(drafts, counts, probs, dprobs, uniform, exp_q, is_greedy)
    return out.to(torch.int32)


class RejectionSampler(nn.Module):
    """vLLM's ``RejectionSampler``: ``forward(metadata, draft_probs, target_logits,
    bonus_token_ids, sampling_metadata)`` -> int32 [B, max_spec_len + 1] (``compute_probs``
    then :func:`rejection_sample`); ``parse_output(output, vocab_size)`` -> per request the
    list of its tokens."""

    def forward(self, metadata: SpecDecodeMetadata, draft_probs: Tensor | None,
                target_logits: Tensor, bonus_token_ids: Tensor,
                sampling_metadata: SamplingMetadata) -> Tensor:
        if metadata.max_spec_len > MAX_SPEC_LEN:
            raise ValueError(f"max_spec_len ({metadata.max_spec_len}) exceeds {MAX_SPEC_LEN}")
        target_probs = compute_probs(target_logits, metadata.cu_num_draft_tokens,
                                     sampling_metadata)
        return rejection_sample(metadata.draft_token_ids, metadata.num_draft_tokens,
                                metadata.max_spec_len, metadata.cu_num_draft_tokens,
                                draft_probs, target_probs, bonus_token_ids, sampling_metadata)

    @staticmethod
    def parse_output(output_token_ids: Tensor, vocab_size: int) -> list[list[int]]:
        """Each request's tokens: the entries that are not the placeholder and are below
        vocab_size."""
        rows = output_token_ids.cpu()
        keep = (rows != PLACEHOLDER_TOKEN_ID) & (rows < vocab_size)
        return [row[mask].tolist() for row, mask in zip(rows, keep)]
