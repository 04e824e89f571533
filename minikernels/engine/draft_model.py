"""Speculative decoding with a draft model: ``{"method": "draft_model", "model": ...}``.

A smaller CausalLM with the target's vocabulary proposes k tokens per sequence and step;
the engine verifies them with the target (engine/llm_engine.py ``_verify``) using the
probabilities the drafts were sampled from, so the output follows the target exactly.

What the proposer owns (all on the target's device):

- the draft model (loaded like the target: same loader, dtype, device; built-in names,
  HF directories, hub ids; int4 RTN when the target is int4, unless the config says);
- a second :class:`ModelRunner` over it: its own paged KV pool, per layer (k, v) each
  ``[num_blocks, block_size, draft_kv_heads, draft_head_dim]`` in the draft's dtype (or
  fp8 like the target's), and CUDA graphs for its single-token decode steps;
- a :class:`BlockManager` of that pool and, per target sequence it drafts for, a
  :class:`_DraftSeq`: the draft's block table (its own row in the mirror), how many of
  the sequence's tokens have K/V in the draft cache, and the drafts whose K/V was
  written after them;
- a prefix cache over that pool (when the engine's is on), keyed by the target
  sequence's chained block hashes: a sequence that starts drafting shares the draft
  blocks of its longest cached prefix and catches up from there (a shared system prompt
  is computed by the draft once, as by the target). Only blocks of tokens known on the
  host are offered; draft positions never are.

KV budget. Both pools have the same number of blocks (``num_kv_blocks``; the same token
capacity, since every drafted sequence needs draft K/V for all its tokens). Automatic
sizing (``gpu_memory_utilization`` on a GPU, the 1 GiB default on the CPU) divides the
one memory budget by the sum of both models' KV bytes per block
(``ModelRunner(extra_kv_bytes_per_token=)``), so the draft's pool is carved from the
target's budget: with a draft whose KV is 10% of the target's the target keeps ~91% of
the blocks it would have alone. When the draft pool is full a sequence simply gets no
drafts that step.

One ``propose`` call (all proposing sequences batched):

1. Roll back: drafts whose K/V was written last time count as computed only as far as
   the target accepted them (the longest prefix equal to the tokens now known); the rest
   is garbage past the draft's length (never attended, overwritten) and blocks past the
   kept tokens go back to the pool (``BlockManager.trim``). The last known token is
   always recomputed (its logits give the first draft).
2. Catch-up: one varlen forward (prefill rows over the draft's paged prefix) over the
   tokens the draft has not seen (a new sequence's prompt, the accepted tokens and the
   target's own token), at most ``max_num_batched_tokens`` tokens per call (a longer
   catch-up is chunked over steps; that sequence drafts once it is done). In steady
   decode (one or two tokens per row) it replays the runner's CUDA graphs.
3. k - 1 decode forwards (one token per sequence, all sequences together; graph
   replays on CUDA), each fed the previous draft tokens, still on the device.

Each draft token is sampled from the draft's distribution after the request's
penalties (outputs and the drafts before it counted) and min_tokens masking, as the
target's verification applies them, then temperature / top-k / top-p / min-p
(``Sampler.target_probs``, the same processing the target's probabilities get) by the
exponential race (seeded requests draw from their own
generator: reproducible run to run); those probabilities are returned (fp32
``[len(seqs), k, V]``) for the rejection sampler. Greedy rows take the argmax (their
probabilities are zeros: the verifier uses only the target's argmax for them).

Sequences leave the draft pool when they finish, are aborted (``release``, called by the
engine) or preempted (``release``, and a sweep of non-running sequences each call).

EAGLE heads (engine/eagle.py) reuse the drafting loop and its sampling (:class:`DraftSampler`)
but keep their K/V in the target's blocks and read the target's hidden states.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..models.metadata import AttentionMetadata
from .block_manager import BlockManager
from .model_runner import ModelRunner, StepInputs
from .sampler import Sampler
from .sequence import SequenceStatus
from .spec_decode import Proposer, SpeculativeConfig

if TYPE_CHECKING:
    from .sequence import Sequence

logger = logging.getLogger("minikernels.engine")


class _DraftSeq:
    """The draft model's state for one target sequence (duck-types the fields of a
    Sequence that :class:`BlockManager` reads, prefix caching included).

    num_computed_tokens: tokens of ``seq.token_ids`` whose K/V is in the draft cache.
    num_registered_blocks: its first blocks offered to the draft pool's prefix cache.
    tail: draft tokens whose K/V was written after them (positions
    ``num_computed_tokens ..``); valid only as far as the target accepts them.

    The prefix-cache keys are the target sequence's own chained block hashes (same block
    size, tokens and cache salt; the list is shared, so each block is hashed once): a
    draft block registered under a hash holds the draft's K/V of exactly that prefix.
    """

    __slots__ = ("seq", "block_table", "block_row", "num_computed_tokens",
                 "num_registered_blocks", "tail")
    num_pending = 0        # the draft reads only tokens known on the host

    def __init__(self, seq: "Sequence") -> None:
        self.seq = seq
        self.block_table: list[int] = []
        self.block_row = -1
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.tail: list[int] = []

    @property
    def params(self) -> Any:
        return self.seq.params

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.seq.token_ids)

    @property
    def block_hashes(self) -> list[bytes]:
        return self.seq.block_hashes

    def __repr__(self) -> str:
        return (f"_DraftSeq(seq={self.seq.seq_id}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, tail={len(self.tail)})")


@dataclass
class _Row:
    """One sequence in a propose call: index into ``seqs``, its state, first position
    and length of its catch-up chunk, drafts wanted (0: catch-up only), known tokens."""

    i: int
    st: _DraftSeq
    start: int
    take: int
    k: int
    n: int


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, lens)), vectorized (int64)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)


def check_vocab(target_vocab: int, draft_vocab: int, tokenizer: Any = None,
                draft_tokenizer: Any = None) -> int:
    """The number of token ids both models score (ValueError naming
    ``speculative_config.model`` when the vocabularies differ).

    Equal ``vocab_size`` is compatible. Sizes that differ only in padding rows no
    tokenizer id reaches (e.g. 151936 vs 152064) are compatible when the target's
    tokenizer is known and fits the smaller one. When both tokenizers are known their
    vocabularies (HF: token -> id maps; otherwise their sizes) must be equal.
    """
    if tokenizer is not None and draft_tokenizer is not None:
        a = getattr(getattr(tokenizer, "tokenizer", None), "get_vocab", None)
        b = getattr(getattr(draft_tokenizer, "tokenizer", None), "get_vocab", None)
        same = a() == b() if a is not None and b is not None else \
            getattr(tokenizer, "vocab_size", None) == getattr(draft_tokenizer, "vocab_size", None)
        if not same:
            raise ValueError("speculative_config.model: the draft model's tokenizer has a "
                             "different vocabulary than the target's (a draft model must "
                             "share the target's vocabulary)")
    if target_vocab != draft_vocab:
        used = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
        if used is None or used > min(target_vocab, draft_vocab):
            raise ValueError(f"speculative_config.model: the draft model's vocab_size "
                             f"({draft_vocab}) differs from the target's ({target_vocab}); "
                             f"a draft model must share the target's vocabulary")
    return min(target_vocab, draft_vocab)


def peek_vocab_size(model: str, revision: str | None = None) -> int | None:
    """A draft's vocab_size from its config alone (built-in name or local HF directory),
    so a wrong draft fails before its weights load; None when unknown."""
    import json
    import os

    from ..models.config import DecoderConfig, builtin_config, list_models
    try:
        if model.lower() in list_models():
            return int(builtin_config(model).vocab_size)
        path = os.path.join(model, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return int(DecoderConfig.from_hf(json.load(f)).vocab_size)
    except Exception:  # noqa: BLE001 - unknown here; checked again after loading
        return None
    return None


def load_draft_model(cfg: SpeculativeConfig, target: torch.nn.Module, dtype: Any,
                     quantization: str | None, seed: int, tokenizer: Any = None
                     ) -> torch.nn.Module:
    """The draft CausalLM of ``cfg`` on the target's device (a built one is used as is;
    ValueError naming ``speculative_config.model`` if it is elsewhere). A built-in name or
    local directory whose config's vocab_size is incompatible with the target's
    (``check_vocab``; tokenizer: the target's) fails here, before loading."""
    device = torch.device(target.device)
    model = cfg.model
    if isinstance(model, str):
        vocab = peek_vocab_size(model, cfg.revision)
        if vocab is not None and vocab != int(target.config.vocab_size):
            check_vocab(int(target.config.vocab_size), vocab, tokenizer)
        from ..models.loader import load_model
        quant = cfg.quantization
        if quant == "auto":
            quant = quantization if quantization in ("int4", "fp8", "fp8_w8a8",
                                                     "int8") else None
        draft = load_model(model, dtype=dtype, device=device, quantization=quant, seed=seed,
                           revision=cfg.revision)
    else:
        draft = model
        if torch.device(draft.device) != device:
            raise ValueError(f"speculative_config.model is on {draft.device}, the target on "
                             f"{device}: the draft model must be on the target's device")
    return draft


def load_draft_tokenizer(cfg: SpeculativeConfig) -> Any:
    """The draft model's tokenizer (None for a built model or when it has none)."""
    if not isinstance(cfg.model, str):
        return None
    try:
        from ..models import load_tokenizer
        from ..models.hub import resolve_model
        return load_tokenizer(resolve_model(cfg.model, cfg.revision))
    except Exception:  # noqa: BLE001 - no tokenizer: only vocab sizes are compared
        return None


class DraftSampler(Proposer):
    """Drawing k draft tokens per sequence from a drafter's logits, one step after the
    other (a draft model, an EAGLE head): the request's penalties and min_tokens
    masking, then its temperature / top-k / top-p / min-p, an exponential race per row
    (seeded rows from their own generator); greedy rows take the argmax. A subclass sets
    ``k``, ``vocab_size``, ``common_vocab``, ``device``, ``sampler`` and
    ``eos_token_ids``."""

    k: int
    vocab_size: int
    common_vocab: int
    device: torch.device
    sampler: Sampler
    eos_token_ids: list[int]
    structured: Any = None     # the engine's StructuredOutputManager, once it has one

    def _draft(self, rows: "list[_Row]", num_seqs: int, logits: Tensor,
               decode: Callable[[list[int], int, Tensor], Tensor]
               ) -> tuple[list[list[int]], Tensor | None]:
        """Draw up to ``r.k`` drafts per row: ``logits`` [len(rows), V'] give each row's
        first draft; ``decode(active, j, prev)`` runs draft step j (j >= 1) for the rows
        ``active`` (indices into rows) fed their draft j - 1 (int64 [len(active)], on
        the device) and returns their logits. -> (drafts per row, fp32 [num_seqs, k, V]
        probabilities at row ``r.i`` or None when every row is greedy)."""
        K = max(r.k for r in rows)
        seq_of = [r.st.seq for r in rows]
        any_random = not all(s.params.greedy for s in seq_of)
        probs_out = torch.zeros(num_seqs, self.k, self.vocab_size, device=self.device) \
            if any_random else None
        toks = torch.zeros(len(rows), K, dtype=torch.int64, device=self.device)
        # penalties and min_tokens, as the target's verification applies them (the
        # drafts so far count as output tokens): drafts closer to the target's choices
        counts = seen = stop_ids = None
        if any(s.params.uses_penalties for s in seq_of):
            counts, seen = self.sampler.penalty_state(seq_of)
        if any(s.params.min_tokens > s.num_output_tokens for s in seq_of):
            stop_ids = self.sampler.stop_id_mask(seq_of, self.eos_token_ids)
        # structured outputs: constrained rows draft only what their grammar allows
        # (the matcher follows the drafts, and is rolled back at the end)
        grammars = {a: s.grammar for a, s in enumerate(seq_of)
                    if s.grammar is not None and s.grammar.active} \
            if self.structured is not None else {}
        followed = dict.fromkeys(grammars, 0)
        active = list(range(len(rows)))
        for j in range(K):
            if j > 0:
                if len(active) != len([a for a in active if rows[a].k > j]):
                    active = [a for a in active if rows[a].k > j]
                if not active:
                    break
                idx = torch.tensor(active, dtype=torch.int64).to(self.device) \
                    if len(active) != len(rows) else None
                prev = toks[:, j - 1] if idx is None else toks[:, j - 1].index_select(0, idx)
                logits = decode(active, j, prev.contiguous())
            else:
                idx = None
            act_seqs = [seq_of[a] for a in active]
            logits = self._process(logits, act_seqs, j, idx, counts, seen, stop_ids)
            g_pos = [p for p, a in enumerate(active) if a in grammars]
            if g_pos:
                logits = self._mask_grammar(logits, [grammars[active[p]] for p in g_pos],
                                            g_pos)
            tok, probs = self._sample(logits, act_seqs)
            if g_pos:
                self._follow_grammar(tok, g_pos, active, rows, grammars, followed, j)
            if counts is not None:
                counts.index_put_((torch.arange(len(rows), device=self.device)
                                   if idx is None else idx, tok),
                                  torch.ones(tok.shape, device=self.device), accumulate=True)
            if idx is None:
                toks[:, j] = tok
            else:
                toks[:, j].index_copy_(0, idx, tok)
            if probs is not None:
                dst = torch.tensor([rows[a].i for a in active], dtype=torch.int64
                                   ).to(self.device)
                probs_out[:, j, :self.common_vocab].index_copy_(0, dst, probs)
        for a, n in followed.items():
            if n:
                grammars[a].rollback(n)
        host = toks.tolist()
        return [row[:r.k] for r, row in zip(rows, host)], probs_out

    def _mask_grammar(self, logits: Tensor, grammars: list[Any], pos: list[int]) -> Tensor:
        """Rows ``pos`` of logits -> -inf outside what their grammars allow next."""
        logits = logits[:, :self.common_vocab].float().clone()
        bits = self.structured.allocate_bitmask(len(grammars))
        self.structured.fill_bitmask(grammars, bits)
        self.structured.mask_rows(logits, {p: bits[i] for i, p in enumerate(pos)})
        return logits

    def _follow_grammar(self, tok: Tensor, pos: list[int], active: list[int],
                        rows: "list[_Row]", grammars: dict[int, Any],
                        followed: dict[int, int], j: int) -> None:
        """Advance the constrained rows' matchers by their draft j; a row whose grammar
        refuses it (nothing was allowed) or is complete after it drafts no further."""
        picked = tok[torch.tensor(pos, dtype=torch.int64).to(tok.device)].tolist()
        for p, t in zip(pos, picked):
            a = active[p]
            g = grammars[a]
            if not g.accept(t):
                rows[a].k = j          # (cut here; the engine's check agrees)
                continue
            followed[a] += 1
            if g.terminated:
                rows[a].k = j + 1

    # ------------------------------------------------------------------ sampling
    def _process(self, logits: Tensor, seqs: "list[Sequence]", j: int, idx: Tensor | None,
                 counts: Tensor | None, seen: Tensor | None, stop_ids: Tensor | None
                 ) -> Tensor:
        """Draft step j's logits after the rows' penalties (counts: outputs and the
        drafts so far, one row per proposing row; idx: the active rows, None = all) and
        min_tokens (EOS / stop ids masked while the output, drafts included, is short)."""
        if counts is None and stop_ids is None:
            return logits
        logits = logits[:, :self.common_vocab].float()
        if counts is not None:
            pick = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
            logits = self.sampler.penalize(logits, pick(counts),
                                           None if seen is None else pick(seen),
                                           [s.params for s in seqs])
        if stop_ids is not None:
            below = [s.num_output_tokens + j < s.params.min_tokens for s in seqs]
            if any(below):
                ids = stop_ids if idx is None else stop_ids.index_select(0, idx)
                logits = logits.masked_fill(
                    ids & torch.tensor(below).to(self.device)[:, None], float("-inf"))
        return logits

    def _sample(self, logits: Tensor, seqs: "list[Sequence]") -> tuple[Tensor, Tensor | None]:
        """One draft token per row: int64 [R] and, unless every row is greedy, the fp32
        [R, common_vocab] probabilities they were drawn from (greedy rows: zeros)."""
        logits = logits[:, :self.common_vocab].float()
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=1), None
        probs = self.sampler.target_probs(logits, params)
        g = None
        if any(greedy):
            g = torch.tensor(greedy).to(self.device)
            probs = probs.masked_fill(g[:, None], 0.0)
        q = torch.empty_like(probs)
        if any(s.generator is None for s in seqs):
            q.exponential_(generator=self.sampler.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not greedy[i]:
                q[i].exponential_(generator=s.generator)
        tok = (probs / q.clamp_min_(1e-30)).argmax(dim=1)
        if g is not None:
            tok = torch.where(g, logits.argmax(dim=1), tok)
        return tok, probs

    # ------------------------------------------------------------------ uploads
    def _catch_up_meta(self, plan: "list[_Row]", shift: int
                       ) -> tuple[Tensor, AttentionMetadata]:
        """One varlen prefill over paged prefixes: row r's positions [start, start +
        take) take its sequence's tokens from ``start + shift`` on (1: an EAGLE head's
        position p holds token p + 1); logits of the last position of rows that draft
        (``r.k > 0``). The subclass gives ``block_size`` and ``_table(rows, width)``."""
        bs, n = self.block_size, len(plan)
        starts = np.fromiter((r.start for r in plan), np.int64, n)
        takes = np.fromiter((r.take for r in plan), np.int64, n)
        drafting = np.fromiter((r.k > 0 for r in plan), bool, n)
        ids = [t for r in plan
               for t in r.st.seq.token_ids[r.start + shift:r.start + r.take + shift]]
        ends = starts + takes
        pos = _ranges(starts, takes)
        cu_q = np.concatenate([[0], np.cumsum(takes)])
        cu_k = np.concatenate([[0], np.cumsum(ends)])
        lidx = cu_q[1:][drafting] - 1
        max_k = int(ends.max())
        width = -(-max_k // bs)
        tab = self._table(plan, width)
        slots = tab[np.repeat(np.arange(n), takes), pos // bs].astype(np.int64) * bs + \
            pos % bs
        ids_t, pos_t, slots_t, lidx_t, cuq_t, cuk_t, tab_t = self._upload(
            [ids, pos, slots, lidx, cu_q, cu_k, tab.reshape(-1)])
        meta = AttentionMetadata(
            positions=pos_t, slot_mapping=slots_t, num_decode=0,
            cu_seqlens_q=cuq_t.to(torch.int32), cu_seqlens_k=cuk_t.to(torch.int32),
            max_seqlen_q=int(takes.max()), max_seqlen_k=max_k,
            prefill_block_table=tab_t.to(torch.int32).reshape(n, width),
            logits_indices=lidx_t)
        return ids_t, meta

    def _upload(self, parts: list[Any]) -> list[Tensor]:
        """int64 host arrays -> device tensors, in one copy."""
        sizes = [len(p) for p in parts]
        host = np.empty(sum(sizes), dtype=np.int64)
        o = 0
        for p in parts:
            host[o:o + len(p)] = p
            o += len(p)
        flat = torch.from_numpy(host).to(self.device)
        return list(torch.split(flat, sizes))



class DraftModelProposer(DraftSampler):
    """Drafts with a smaller model over its own paged KV pool (see the module docstring).

    Args:
        cfg: the validated config (method "draft_model").
        model: the draft CausalLM (on the target's device).
        vocab_size: the target's V (rows of the returned probabilities).
        common_vocab: ids both models score (``check_vocab``); draft logits past it are
            dropped.
        block_size, num_blocks: the draft pool (num_blocks: the target pool's count).
        max_model_len: the target's; the draft's is capped by its own position limit
            (sequences longer than that get no drafts).
        max_num_seqs, max_num_batched_tokens: the engine's (the latter bounds one
            catch-up forward).
        enforce_eager, kv_cache_dtype: as the target's runner.
        seed: seeds the generator of drafts of unseeded requests.
        eos_token_ids: the target's EOS ids (masked in drafts before min_tokens).
    """

    def __init__(self, cfg: SpeculativeConfig, model: torch.nn.Module, *, vocab_size: int,
                 common_vocab: int, block_size: int, num_blocks: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, enforce_eager: bool,
                 kv_cache_dtype: str = "auto", seed: int = 0,
                 eos_token_ids: list[int] = (), enable_prefix_caching: bool = True) -> None:
        self.k = cfg.num_speculative_tokens
        self.vocab_size = vocab_size
        self.common_vocab = common_vocab
        self.block_size = block_size
        max_len = min(max_model_len, int(model.config.max_position_embeddings))
        # graphs: single-token decode steps, and (verification graphs of 1 + 1 tokens
        # per row) the steady catch-up of one or two tokens per sequence
        self.runner = ModelRunner(model, block_size, num_blocks, max_num_seqs=min(
            max_num_seqs, cfg.disable_by_batch_size), max_num_batched_tokens=
            max_num_batched_tokens, max_model_len=max_len, enforce_eager=enforce_eager,
            kv_cache_dtype=kv_cache_dtype, num_speculative_tokens=1,
            max_spec_batch=cfg.disable_by_batch_size)
        self.device = self.runner.device
        self.max_len = self.runner.max_model_len
        self.max_catch_up = max_num_batched_tokens
        self.bm = BlockManager(num_blocks, block_size,
                               enable_prefix_caching=enable_prefix_caching,
                               max_blocks_per_seq=self.runner.max_blocks_per_seq)
        self.sampler = Sampler(common_vocab, self.device, seed + 1)
        self.eos_token_ids = list(eos_token_ids)
        self.states: dict[int, _DraftSeq] = {}     # target seq_id -> draft state
        # counters (tests, stats): draft forwards and tokens they computed
        self.num_forwards = 0
        self.num_catch_up_tokens = 0

    # ------------------------------------------------------------------ bookkeeping
    def release(self, seq: "Sequence") -> None:
        st = self.states.pop(seq.seq_id, None)
        if st is not None:
            self.bm.free_seq(st)

    def _sweep(self) -> None:
        """Free the states of sequences that are no longer running (finished, aborted,
        preempted) and were not released explicitly."""
        dead = [sid for sid, st in self.states.items()
                if st.seq.status is not SequenceStatus.RUNNING]
        for sid in dead:
            self.bm.free_seq(self.states.pop(sid))

    def check_invariants(self) -> None:
        self.bm.check_invariants(list(self.states.values()))

    def release_pool(self) -> None:
        """Sleep: forget every sequence, drop the draft's graphs and free its KV pool."""
        for st in list(self.states.values()):
            self.bm.free_seq(st)
        self.states.clear()
        self.bm.reset_prefix_cache()      # the pool comes back zeroed
        self.runner.release()

    def reset_prefix_cache(self) -> None:
        """Forget the draft pool's cached blocks (their holders keep them)."""
        self.bm.reset_prefix_cache()

    def restore_pool(self) -> None:
        """Wake up: a zeroed pool and the graphs again (the weights come back first)."""
        self.runner.restore()
        self.runner.capture_graphs()

    @property
    def num_free_blocks(self) -> int:
        return self.bm.num_free_blocks

    def _rollback(self, st: _DraftSeq) -> None:
        """Keep the K/V of the drafts the target accepted, drop the rest (see module)."""
        toks = st.seq.token_ids
        c = st.num_computed_tokens
        if st.tail:
            m = 0
            for a, b in zip(st.tail, toks[c:c + len(st.tail)]):
                if a != b:
                    break
                m += 1
            c += m
            st.tail = []
        c = min(c, len(toks) - 1)      # the last token's logits give the first draft
        st.num_computed_tokens = c
        self.bm.trim(st, c)

    # ------------------------------------------------------------------ propose
    @torch.inference_mode()
    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> tuple[list[list[int]], Tensor | None]:
        self._sweep()
        drafts: list[list[int]] = [[] for _ in seqs]
        plan: list[_Row] = []
        budget = self.max_catch_up
        for i, (seq, room) in enumerate(zip(seqs, max_tokens)):
            n = len(seq.token_ids)
            # drafts d_1..d_k; d_1..d_{k-1} are fed back at positions n .. n + k - 2
            k = min(self.k, room, self.max_len - n + 1)
            if k <= 0 or budget <= 0:
                continue
            st = self.states.get(seq.seq_id)
            if st is None:
                st = self.states[seq.seq_id] = _DraftSeq(seq)
            self._rollback(st)
            # a sequence holding no draft blocks starts from the prefix cache's hits
            hits = self.bm.lookup_prefix(st) if not st.block_table else []
            c = len(hits) * self.block_size if hits else st.num_computed_tokens
            take = min(n - c, budget)
            if take < n - c:
                k = 0              # catch-up continues next step; no drafts yet
            if not self.bm.allocate(st, take + max(k - 1, 0), cached_blocks=hits):
                continue           # draft pool full: no drafts for it this step
            budget -= take
            plan.append(_Row(i, st, c, take, k, n))
        if not plan:
            return drafts, None
        logits = self._forward(self._catch_up_inputs(plan))
        self.num_catch_up_tokens += sum(r.take for r in plan)
        for r in plan:
            r.st.num_computed_tokens = r.start + r.take
        rows = [r for r in plan if r.k > 0]
        if not rows:
            return drafts, None
        tokens, probs_out = self._draft(rows, len(seqs), logits, lambda active, j, prev:
                                        self._forward(self._decode_inputs(
                                            [rows[a] for a in active], j, prev)))
        for r, d in zip(rows, tokens):
            drafts[r.i] = d
            r.st.tail = d[:-1]        # their K/V was written by the decode steps
        return drafts, probs_out

    # ------------------------------------------------------------------ forwards
    def _forward(self, inputs: StepInputs) -> Tensor:
        """One draft forward -> logits of the rows in ``inputs.meta.logits_indices``."""
        self.num_forwards += 1
        return self.runner.forward(inputs)

    def _table(self, rows: list[_Row], width: int) -> np.ndarray:
        return self.bm.table[[r.st.block_row for r in rows], :width]

    def _catch_up_inputs(self, plan: list[_Row]) -> StepInputs:
        """Prefill rows: each row's unseen tokens over its paged draft prefix; logits of
        the last token of the rows that draft.

        The steady state (every row drafts and catches up one or two tokens: the
        target's own token, after the last draft when all were accepted) is shaped for
        the runner's CUDA graphs: one token per row is a decode step (decode graphs),
        one or two a verification-shaped step (``spec``: rows of 1 + (take - 1) tokens,
        replayed by the 1 + 1-token verification graphs, short rows left-padded). Other
        catch-ups (prompts, chunks) run eagerly."""
        steady = all(r.k > 0 and r.take <= 2 for r in plan)
        if steady and all(r.take == 1 for r in plan):
            ids = self._upload([[r.st.seq.token_ids[r.start] for r in plan]])[0]
            return self._decode_inputs(plan, 0, ids)
        ids_t, meta = self._catch_up_meta(plan, shift=0)
        return StepInputs(input_ids=ids_t, meta=meta,
                          sample_rows=list(range(sum(r.k > 0 for r in plan))),
                          decode_only=False,
                          spec=[(i, r.take - 1) for i, r in enumerate(plan)] if steady
                          else None)

    def _decode_inputs(self, rows: list[_Row], j: int, ids: Tensor) -> StepInputs:
        """Decode rows for draft step j (j >= 1): input the draft token j - 1 (on the
        device) at position n - 1 + j of each sequence (j = 0: the last known token,
        ``ids``, at n - 1: a one-token catch-up)."""
        bs = self.block_size
        pos = np.array([r.n - 1 + j for r in rows], dtype=np.int64)
        width = -(-int(pos.max() + 1) // bs)
        tab = self._table(rows, width)
        slots = tab[np.arange(len(rows)), pos // bs].astype(np.int64) * bs + pos % bs
        pos_t, slots_t, lens_t, lidx_t, tab_t = self._upload(
            [pos, slots, pos + 1, np.arange(len(rows)), tab.reshape(-1)])
        meta = AttentionMetadata(
            positions=pos_t, slot_mapping=slots_t, num_decode=len(rows),
            decode_block_table=tab_t.to(torch.int32).reshape(len(rows), width),
            decode_seq_lens=lens_t.to(torch.int32), logits_indices=lidx_t)
        return StepInputs(input_ids=ids, meta=meta, sample_rows=list(range(len(rows))),
                          decode_only=True)
