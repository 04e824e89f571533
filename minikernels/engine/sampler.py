"""Batched sampler: one call turns the step's logits [B, V] into B next tokens, on device.

Per row (its request's SamplingParams), in this order:
    1. penalties   repetition (tokens in prompt or output), presence and frequency
                   (tokens in output); skipped when no row uses them.
    2. min_tokens  EOS / stop tokens masked until the row has min_tokens outputs.
    3. greedy      rows with temperature 0 take the argmax here.
    4. temperature logits / T.
    5. top-k, min-p, top-p  one op, ``mk.ops.top_k_top_p_mask_logits`` (on a GPU one
                   Triton kernel, no sort of the vocabulary); skipped when no row
                   filters, and a filter no row uses is left out.
    6. sampling    Exponential race: argmax(probs / q) with q ~ Exp(1), which samples
                   from probs exactly. A row with a seed draws its q from its own
                   torch.Generator, so its tokens do not depend on the rest of the batch.
Logprobs (when any row asks) come from the raw model logits, like vLLM's default.

``sample()`` never synchronizes with the device: it returns a ``DeviceSample`` whose
tensors stay on the device (the next step's forward can read its tokens there: async
scheduling); ``DeviceSample.to_host()`` is the one device->host copy. When every row
samples alike (one SamplingParams, or equal sampling fields: ``sampling_key``) the
parameters are scalars, not per-row
tensors, and the per-row Python work is a single pass.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import ops
from .._validation import index_checks
from .bad_words import banned_next_tokens

if TYPE_CHECKING:
    from .sampling_params import SamplingParams
    from .sequence import Sequence


_PLAIN_ROW = operator.attrgetter("plain_row")
_SAMPLING_KEY = operator.attrgetter("sampling_key")
_NEEDS_HOST_TOKENS = operator.attrgetter("needs_host_tokens")


def needs_host_tokens(params: list["SamplingParams"], grammars: bool = True) -> bool:
    """Whether any row's next step needs this step's tokens on the host (penalties, bad
    words, grammars; ``grammars=False``: the grammars need none - device-resident
    automata)."""
    if grammars:
        return any(map(_NEEDS_HOST_TOKENS, params))
    return any(p.uses_penalties or p.bad_words is not None
               for p in distinct_params(params))


def distinct_params(params: list["SamplingParams"]) -> list["SamplingParams"]:
    """The distinct SamplingParams objects of a batch (by identity, first-seen order).

    The common batch shares one object (LLM.generate with one SamplingParams): a set of
    ids (C loops) says so without a Python loop over the rows."""
    if not params:
        return []
    if len(set(map(id, params))) == 1:
        return [params[0]]
    return list({id(p): p for p in params}.values())


@dataclass
class SamplerOutput:
    """token_ids[i] is row i's next token. With logprobs asked by any row:
    logprobs[i] = (sampled logprob, sampled rank, top ids, top logprobs) else None."""

    token_ids: list[int]
    logprobs: list[tuple[float, int, list[int], list[float]] | None] | None = None


@dataclass
class DeviceSample:
    """The sampled tokens of one step, still on the device (no sync yet).

    tokens: int64 [B]. With logprobs: chosen [B], ranks [B], top_lp / top_ids [B, k]
    (k = the largest number asked) and want_lp[i] = row i's ``logprobs`` (None = none).
    """

    tokens: Tensor
    want_lp: list[int | None] | None = None
    chosen: Tensor | None = None
    ranks: Tensor | None = None
    top_lp: Tensor | None = None
    top_ids: Tensor | None = None

    def to_host(self) -> SamplerOutput:
        """Copy to the host (waits for the device to finish computing them)."""
        token_list = self.tokens.tolist()
        if self.want_lp is None:
            return SamplerOutput(token_ids=token_list)
        chosen_l, ranks_l = self.chosen.tolist(), self.ranks.tolist()
        top_lp = self.top_lp.tolist() if self.top_lp is not None else None
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        lps: list[tuple[float, int, list[int], list[float]] | None] = []
        for i, n in enumerate(self.want_lp):
            if n is None:
                lps.append(None)
            else:
                lps.append((chosen_l[i], ranks_l[i], top_ids[i][:n] if n else [],
                            top_lp[i][:n] if n else []))
        return SamplerOutput(token_ids=token_list, logprobs=lps)


class Sampler:
    """Samples the next token of each row (see the module docstring).

    Args:
        vocab_size: V (logits may have more columns, e.g. a padded lm_head: extra ones
            are ignored).
        device: where the logits live.
        seed: seeds the shared generator used by rows without their own seed.
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def _tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device="cpu").to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ pieces
    def penalty_state(self, seqs: list["Sequence"], vocab: int | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
        """Per row: counts [B, V] of its output tokens (on the host), and, when some row
        uses a repetition penalty, prompt_seen [B, V] bool (its prompt's tokens; else
        None). Ids >= V (a draft model's smaller vocabulary) are not counted."""
        B = len(seqs)
        V = self.vocab_size if vocab is None else vocab
        outs = [s.output_token_ids for s in seqs]
        max_out = max((len(o) for o in outs), default=0)
        counts = torch.zeros(B, V + 1, dtype=dtype, device=self.device)
        if max_out:
            pad = torch.full((B, max_out), V, dtype=torch.int64)
            for i, o in enumerate(outs):
                if o:
                    pad[i, :len(o)] = torch.tensor(o, dtype=torch.int64)
            pad = pad.clamp_(max=V).to(self.device)
            counts.scatter_add_(1, pad, torch.ones(pad.shape, dtype=dtype, device=self.device))
        seen = None
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            prompts = [s.token_ids[:s.num_prompt_tokens] for s in seqs]
            max_p = max(len(p) for p in prompts)
            ppad = torch.full((B, max_p), V, dtype=torch.int64)
            for i, p in enumerate(prompts):
                ppad[i, :len(p)] = torch.tensor(p, dtype=torch.int64)
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=self.device)
            seen.scatter_(1, ppad.clamp_(max=V).to(self.device), True)
            seen = seen[:, :V]
        return counts[:, :V], seen

    def penalize(self, logits: Tensor, counts: Tensor, prompt_seen: Tensor | None,
                 params: list["SamplingParams"]) -> Tensor:
        """Repetition / presence / frequency penalties of each row (params[i]) given its
        output-token counts [B, V] and prompt tokens (``penalty_state``)."""
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(r != 1.0 for r in rep):
            seen = counts > 0
            if prompt_seen is not None:
                seen = seen | prompt_seen
            r = self._tensor(rep, logits.dtype)[:, None]
            # Clamped so an extreme (but valid) penalty cannot make a logit infinite (and
            # the probabilities NaN), even after dividing by a small temperature.
            penalized = torch.where(logits > 0, logits / r, logits * r).clamp_(-1e30, 1e30)
            logits = torch.where(seen, penalized, logits)
        if any(p != 0.0 for p in pres) or any(f != 0.0 for f in freq):
            logits = (logits - self._tensor(freq, logits.dtype)[:, None] * counts
                      - self._tensor(pres, logits.dtype)[:, None] * (counts > 0).to(logits.dtype))
        return logits

    def _apply_penalties(self, logits: Tensor, seqs: list["Sequence"]) -> Tensor:
        counts, seen = self.penalty_state(seqs, logits.shape[1], logits.dtype)
        return self.penalize(logits, counts, seen, [s.params for s in seqs])

    def apply_logit_bias(self, logits: Tensor, params: list["SamplingParams"]) -> Tensor:
        """Each row's ``logit_bias`` added to its logits and, with ``allowed_token_ids``,
        every other token masked to -inf; logits fp32 [B, V] (a new tensor). One scatter
        per kind for the whole batch (rows and columns gathered on the host)."""
        logits = logits.clone()
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        allow_rows: list[int] = []
        allow_cols: list[int] = []
        for i, p in enumerate(params):
            for t, b in (p.logit_bias or {}).items():
                rows.append(i)
                cols.append(t)
                vals.append(b)
            for t in p.allowed_token_ids or ():
                allow_rows.append(i)
                allow_cols.append(t)
        if rows:
            logits.index_put_((self._tensor(rows, torch.int64), self._tensor(cols, torch.int64)),
                              self._tensor(vals, logits.dtype), accumulate=True)
        if allow_rows:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep[self._tensor(allow_rows, torch.int64), self._tensor(allow_cols, torch.int64)] = \
                True
            restricted = self._tensor([p.allowed_token_ids is not None for p in params],
                                      torch.bool)[:, None]
            logits = logits.masked_fill(restricted & ~keep, float("-inf"))
        return logits

    def _apply_bad_words(self, logits: Tensor, seqs: list["Sequence"]) -> Tensor:
        """-inf at every token that would complete one of a row's bad words (its
        request's ``bad_words_ids`` against its output tokens, all on the host for such
        rows); one scatter for the batch."""
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(seqs):
            bad = s.request.bad_words_ids
            if bad:
                banned = banned_next_tokens(bad, s.token_ids[s.num_prompt_tokens:])
                rows += [i] * len(banned)
                cols += banned
        if not rows:
            return logits
        logits = logits.clone()
        logits[self._tensor(rows, torch.int64), self._tensor(cols, torch.int64)] = \
            float("-inf")
        return logits

    def stop_id_mask(self, seqs: list["Sequence"], eos_token_ids: list[int],
                     vocab: int | None = None) -> Tensor | None:
        """bool [B, V]: the ids min_tokens suppresses per row (its stop ids, and EOS
        unless ignore_eos); None when no row has min_tokens."""
        if not any(s.params.min_tokens for s in seqs):
            return None
        V = self.vocab_size if vocab is None else vocab
        rows, cols = [], []
        for i, s in enumerate(seqs):
            if s.params.min_tokens:
                ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos
                                                       else list(eos_token_ids))
                for t in ids:
                    if t < V:
                        rows.append(i)
                        cols.append(t)
        mask = torch.zeros(len(seqs), V, dtype=torch.bool, device=self.device)
        if rows:
            mask[self._tensor(rows, torch.int64), self._tensor(cols, torch.int64)] = True
        return mask

    def spec_target_probs(self, logits: Tensor, seqs: list["Sequence"], drafts: Tensor,
                          num_drafts: list[int], eos_token_ids: list[int] = ()) -> Tensor:
        """Speculative verification: the target distribution of every position of every
        row, as plain decoding would sample it there. logits [B, K + 1, >=V] (position
        j: after the row's last token and drafts 0..j-1; positions past the row's
        num_drafts are copies of its last); drafts int64 [B, K] on the device. Position j
        gets the row's penalties with drafts 0..j-1 counted as output tokens, its
        logit_bias / allowed_token_ids, and its
        EOS / stop ids masked while num_output_tokens + j < min_tokens; then
        ``target_probs`` (temperature, top-k, top-p, min-p; greedy rows: the processed
        logits). Returns fp32 [B, K + 1, V]."""
        B, K1 = logits.shape[:2]
        V = self.vocab_size
        logits = logits[:, :, :V].float()
        params = [s.params for s in seqs]
        distinct = distinct_params(params)
        if any(p.uses_penalties for p in distinct):
            counts, seen = self.penalty_state(seqs, V, logits.dtype)
            valid = (torch.arange(K1 - 1)[None, :] < torch.tensor(num_drafts)[:, None])
            inc = torch.zeros(B, K1, V, dtype=logits.dtype, device=self.device)
            inc[:, 1:].scatter_(2, drafts[..., None].clamp(0, V - 1),
                                valid.to(self.device, logits.dtype)[..., None])
            counts = (counts[:, None] + inc.cumsum_(1)).reshape(B * K1, V)
            if seen is not None:
                seen = seen[:, None].expand(B, K1, V).reshape(B * K1, V)
            logits = self.penalize(logits.reshape(B * K1, V), counts, seen,
                                   [p for p in params for _ in range(K1)]).view(B, K1, V)
        if any(p.uses_logit_bias for p in distinct):
            logits = self.apply_logit_bias(logits.reshape(B * K1, V),
                                           [p for p in params for _ in range(K1)]
                                           ).view(B, K1, V)
        ids = self.stop_id_mask(seqs, eos_token_ids, V) if any(
            p.min_tokens for p in distinct) else None
        if ids is not None:
            n_out = torch.tensor([s.num_output_tokens + s.num_pending for s in seqs])
            mins = torch.tensor([s.params.min_tokens for s in seqs])
            below = (n_out[:, None] + torch.arange(K1)[None, :]) < mins[:, None]   # [B, K1]
            if bool(below.any()):
                logits = logits.masked_fill(
                    below.to(self.device, non_blocking=True)[:, :, None] & ids[:, None, :],
                    float("-inf"))
        probs = self.target_probs(logits.reshape(B * K1, V),
                                  [p for p in params for _ in range(K1)])
        return probs.view(B, K1, V)

    def spec_logprobs(self, logits: Tensor, out_tokens: Tensor, n_top: int
                      ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Logprobs of verified tokens, as ``sample`` gives them (from the raw logits):
        logits [B, K + 1, >=V], out_tokens int64 [B, K + 1] (-1 = none). Returns chosen
        [B, K + 1], ranks [B, K + 1], top_lp / top_ids [B, K + 1, n_top] (None if 0)."""
        lp = torch.log_softmax(logits[:, :, :self.vocab_size].float(), dim=2)
        chosen = lp.gather(2, out_tokens.clamp_min(0)[..., None])
        ranks = (lp > chosen).sum(dim=2) + 1
        n_top = min(n_top, lp.shape[2])
        top_lp = top_ids = None
        if n_top > 0:
            top_lp, top_ids = torch.topk(lp, n_top, dim=2)
        return chosen[..., 0], ranks, top_lp, top_ids

    def _filter_rows(self, scaled: Tensor, params: list["SamplingParams"]) -> Tensor:
        """Per-row top-k, min-p and top-p (``mk.ops.top_k_top_p_mask_logits``: the
        dropped logits become -inf); each filter is left out when no row uses it."""
        top_k = top_p = min_p = None
        if any(p.uses_top_k for p in params):
            V = scaled.shape[1]     # top_k >= V is "all": clamped on the host (no overflow)
            top_k = self._tensor([min(p.top_k, V) if p.uses_top_k else 0 for p in params],
                                 torch.int32)
        if any(p.uses_top_p for p in params):
            top_p = self._tensor([p.top_p if p.uses_top_p else 1.0 for p in params],
                                 torch.float32)
        if any(p.uses_min_p for p in params):
            min_p = self._tensor([p.min_p if p.uses_min_p else 0.0 for p in params],
                                 torch.float32)
        if top_k is None and top_p is None and min_p is None:
            return scaled
        # The values come from validated SamplingParams: no range check reading them
        # back from the device (a sync per step).
        with index_checks(False):
            return ops.top_k_top_p_mask_logits(scaled, top_k, top_p, min_p)

    # ------------------------------------------------------------------ main
    def __call__(self, logits: Tensor, seqs: list["Sequence"],
                 eos_token_ids: list[int] = ()) -> SamplerOutput:
        """Sample one token per row and copy them to the host (see :meth:`sample`)."""
        return self.sample(logits, seqs, eos_token_ids).to_host()

    def sample(self, logits: Tensor, seqs: list["Sequence"],
               eos_token_ids: list[int] = ()) -> DeviceSample:
        """Sample one token per row, on the device. logits fp32 [B, >=V]; seqs [B]."""
        if logits.shape[0] != len(seqs):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(seqs)} sequences")
        logits = logits[:, :self.vocab_size].float()
        params = [s.params for s in seqs]
        if all(map(_PLAIN_ROW, params)):
            # No logprobs, penalties or min_tokens in the batch (C-level checks, no
            # per-row Python: a server batch has one SamplingParams object per request).
            if len(set(map(id, map(_SAMPLING_KEY, params)))) == 1:   # keys are interned
                return DeviceSample(tokens=self._sample_uniform(logits, params[0], seqs))
            return DeviceSample(tokens=self._sample_mixed(logits, params, seqs))
        distinct = distinct_params(params)
        any_lp = any(p.logprobs is not None for p in distinct)
        raw_logprobs = torch.log_softmax(logits, dim=1) if any_lp else None

        if any(p.uses_penalties for p in distinct):
            logits = self._apply_penalties(logits, seqs)
        if any(p.uses_logit_bias for p in distinct):
            logits = self.apply_logit_bias(logits, params)
        if any(p.bad_words is not None for p in distinct):
            logits = self._apply_bad_words(logits, seqs)
        if any(p.min_tokens for p in distinct):
            logits = self._apply_min_tokens(logits, seqs, eos_token_ids)

        if len(distinct) == 1 or len({p.sampling_key for p in distinct}) == 1:
            tokens = self._sample_uniform(logits, distinct[0], seqs)
        else:
            tokens = self._sample_mixed(logits, params, seqs)

        if raw_logprobs is None:
            return DeviceSample(tokens=tokens)
        want_lp = [p.logprobs for p in params]
        n_top = min(max(n for n in want_lp if n is not None), raw_logprobs.shape[1])
        chosen = raw_logprobs.gather(1, tokens[:, None])
        out = DeviceSample(tokens=tokens, want_lp=want_lp, chosen=chosen[:, 0],
                           ranks=(raw_logprobs > chosen).sum(dim=1) + 1)
        if n_top > 0:
            out.top_lp, out.top_ids = torch.topk(raw_logprobs, n_top, dim=1)
        return out

    def prompt_logprobs(self, logits: Tensor, targets: Tensor,
                        k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Logprobs of prompt tokens from the raw logits of the positions before them.

        logits [N, >=V] fp32 (row j: the position before ``targets[j]``); k: top
        alternatives wanted (the largest of the rows' ``prompt_logprobs``). Returns
        (chosen [N]: log p(target), ranks [N] (1 = most likely), top_lp [N, k],
        top_ids [N, k]; None when k is 0), all on the device (no sync).
        """
        lp = torch.log_softmax(logits[:, :self.vocab_size].float(), dim=1)
        chosen = lp.gather(1, targets[:, None])
        ranks = (lp > chosen).sum(dim=1) + 1
        k = min(k, lp.shape[1])
        top_lp = top_ids = None
        if k > 0:
            top_lp, top_ids = torch.topk(lp, k, dim=1)
        return chosen[:, 0], ranks, top_lp, top_ids

    def target_probs(self, logits: Tensor, params: list["SamplingParams"]) -> Tensor:
        """Speculative decoding: each row's distribution after temperature, top-k, top-p
        and min-p (what ``sample`` draws from), fp32 [N, V]; greedy rows keep their
        logits (only their argmax is used). Penalties and min_tokens are not applied here:
        ``spec_target_probs`` applies them per position first (and the draft model's
        proposer per draft step)."""
        logits = logits[:, :self.vocab_size].float()
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits
        temps = self._tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                             logits.dtype)
        scaled = self._filter_rows(logits / temps[:, None], params)
        probs = torch.softmax(scaled, dim=1)
        if any(greedy):
            probs = torch.where(self._tensor(greedy, torch.bool)[:, None], logits, probs)
        return probs

    def spec_randoms(self, seqs: list["Sequence"], k: int, vocab: int, k_draw: int
                     ) -> tuple[Tensor, Tensor]:
        """Randoms of one verification per row: uniform [B, k] (acceptance) and Exp(1)
        [B, vocab] (the recovered / bonus token). Rows with a seed draw from their own
        generator k_draw (>= k, fixed per engine) uniforms, then vocab exponentials, so
        their tokens depend neither on the batch nor on other rows' draft counts."""
        B = len(seqs)
        u = torch.empty(B, k, device=self.device)
        q = torch.empty(B, vocab, device=self.device)
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if shared:
            u.uniform_(generator=self.generator)
            q.exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(k_draw, generator=s.generator, device=self.device)[:k]
                q[i].exponential_(generator=s.generator)
        return u, q.clamp_min_(1e-30)

    def _apply_min_tokens(self, logits: Tensor, seqs: list["Sequence"],
                          eos_token_ids: list[int]) -> Tensor:
        """Mask EOS / stop ids of rows with fewer than min_tokens outputs (counting a
        token still on the device)."""
        suppress = [(i, s) for i, s in enumerate(seqs)
                    if s.num_output_tokens + s.num_pending < s.params.min_tokens]
        if not suppress:
            return logits
        logits = logits.clone()
        for i, s in suppress:
            ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos
                                                   else list(eos_token_ids))
            ids = [t for t in ids if t < self.vocab_size]
            if ids:
                logits[i, ids] = float("-inf")
        return logits

    def _race(self, probs: Tensor, seqs: list["Sequence"], seeded: list[int]) -> Tensor:
        """argmax(probs / q), q ~ Exp(1): seeded rows draw q from their own generator."""
        q = torch.empty_like(probs)
        if len(seeded) < probs.shape[0]:
            q.exponential_(generator=self.generator)
        for i in seeded:
            q[i].exponential_(generator=seqs[i].generator)
        return (probs / q.clamp_min_(1e-30)).argmax(dim=1)

    def _sample_uniform(self, logits: Tensor, p: "SamplingParams",
                        seqs: list["Sequence"]) -> Tensor:
        """Every row has the same SamplingParams: scalar parameters."""
        if p.greedy:
            return logits.argmax(dim=1)
        scaled = logits / p.temperature
        if p.uses_top_k or p.uses_top_p or p.uses_min_p:
            scaled = ops.top_k_top_p_mask_logits(
                scaled, p.top_k if p.uses_top_k else None,
                float(p.top_p) if p.uses_top_p else None,
                float(p.min_p) if p.uses_min_p else None)
        seeded = [i for i, s in enumerate(seqs) if s.generator is not None] \
            if p.seed is not None else []
        return self._race(torch.softmax(scaled, dim=1), seqs, seeded)

    def _sample_mixed(self, logits: Tensor, params: list["SamplingParams"],
                      seqs: list["Sequence"]) -> Tensor:
        """Rows with different SamplingParams: per-row parameter tensors."""
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=1)
        temps = self._tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                             logits.dtype)
        scaled = self._filter_rows(logits / temps[:, None], params)
        seeded = [i for i, s in enumerate(seqs) if s.generator is not None and not greedy[i]]
        sampled = self._race(torch.softmax(scaled, dim=1), seqs, seeded)
        if any(greedy):
            return torch.where(self._tensor(greedy, torch.bool), logits.argmax(dim=1), sampled)
        return sampled
