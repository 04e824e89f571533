"""Structured outputs: constraints compiled by xgrammar, per-sequence matchers, bitmasks.

A request's ``SamplingParams.structured_outputs`` (vLLM's :class:`StructuredOutputsParams`:
json schema, json_object, regex, choice or EBNF grammar) is compiled once per distinct
constraint by :class:`StructuredOutputManager` on a worker thread (xgrammar's compiler;
results cached by the constraint's canonical key), so a new schema never stalls the engine
thread. Each constrained sequence owns a ``GrammarMatcher``: before sampling, the matcher
fills its row of a packed int32 bitmask (1 bit per token, 1 = allowed) that
``minikernels.ops.apply_token_bitmask`` applies to the logits; after sampling, the matcher
accepts the token. A sequence whose grammar is complete and allows nothing more (only a
stop token) is finished by the engine.

Backends (``backend``, vLLM's ``structured_outputs_config={"backend": ...}``): "xgrammar"
(the default) matches every kind; "outlines" compiles the regular kinds (regex, choice,
JSON schemas without recursion) into token-level automata (engine/structured_fsm.py):
a step is then a table look-up per row and one gather of mask rows on the device, not a
matcher call per row; json_object, EBNF grammars and schemas it cannot express go to
xgrammar.

Layouts: bitmask int32 [rows, ceil(vocab_size / 32)] (xgrammar's), vocab_size the model's
(the lm_head may be wider than the tokenizer: extra ids are never allowed).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

import numpy as np

from ..ops.bitmask import apply_token_bitmask_unchecked
from ..ops.fsm import fsm_advance_unchecked, fsm_mask_logits_unchecked
from .structured_fsm import FsmBank, FsmGrammar, FsmIndex, fsm_regex

logger = logging.getLogger("minikernels")
BACKENDS = ("xgrammar", "outlines")

#: JSON-string control characters (U+0000..U+001F) must be escaped; grammar engines may
#: let them through as raw bytes inside strings, which strict JSON parsers reject. Tokens
#: holding them are masked inside JSON constraints (whitespace \t \n \r between tokens
#: goes too: any_whitespace still allows spaces).
_CONTROL_BYTES = frozenset(range(0x20))


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's names). Exactly one of json, json_object, regex, choice,
    grammar is set.

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular
    expression the whole output matches; choice: the output is exactly one of these strings;
    grammar: an EBNF grammar (GBNF syntax, root rule ``root``). disable_any_whitespace:
    compact JSON (no free whitespace between tokens). start_after: token ids (e.g. a
    reasoning model's ``</think>``): the output is free until it contains them, and the
    constraint governs what follows (the server sets it with ``--reasoning-parser``).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    start_after: list[int] | None = None

    def __post_init__(self) -> None:
        if self.start_after is not None:
            if (not isinstance(self.start_after, (list, tuple)) or not self.start_after
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                               for t in self.start_after)):
                raise ValueError("structured_outputs.start_after must be a non-empty list "
                                 "of token ids")
            self.start_after = list(self.start_after)
        set_fields = [n for n in ("json", "json_object", "regex", "choice", "grammar")
                      if getattr(self, n) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, "
                             f"regex, choice, grammar; got {set_fields or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise TypeError(f"structured_outputs.json must be a dict or JSON text, got "
                            f"{type(self.json).__name__}")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of "
                                 "non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        for name in ("json", "json_object", "regex", "choice", "grammar"):
            if getattr(self, name) not in (None, False):
                return name
        raise AssertionError("validated in __post_init__")

    def key(self) -> tuple[str, str, bool]:
        """Canonical cache key: equal constraints share one compiled grammar."""
        kind = self.kind
        if kind == "json":
            spec = (self.json if isinstance(self.json, str)
                    else json.dumps(self.json, sort_keys=True, separators=(",", ":")))
            spec = json.dumps(json.loads(spec), sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            spec = json.dumps(self.choice)
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return kind, spec, bool(self.disable_any_whitespace)


def _choice_regex(choices: Sequence[str]) -> str:
    """A regex matching exactly one of the strings (each escaped)."""
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


@dataclass
class CompiledConstraint:
    """A compiled grammar plus what the matcher needs to start."""

    grammar: Any                     # xgrammar.CompiledGrammar (None for an automaton)
    mask_control_chars: bool         # JSON: never emit raw control characters
    fsm: FsmIndex | None = None      # the outlines backend's automaton


class StructuredOutputManager:
    """Compiles constraints off the engine thread (cached) and builds matchers.

    tokenizer: the engine's tokenizer (an HF tokenizer wrapper with ``.tokenizer``, or the
    built-in byte tokenizer); vocab_size: the model's logits width; eos_token_ids: stop ids;
    backend: "xgrammar" or "outlines" (module docstring).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 backend: str = "xgrammar", device_states: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured outputs backend must be one of {BACKENDS}, got "
                             f"{backend!r}")
        if backend == "outlines":
            try:
                import outlines_core  # noqa: F401
            except ImportError as exc:
                raise ImportError("the outlines structured-outputs backend needs "
                                  "outlines-core: pip install outlines-core") from exc
        self.backend = backend
        # the automata's states live on the logits' device: a step masks and advances
        # them there (advance_step) and needs no host tokens for them (the engine without
        # a speculative proposer, whose drafts follow grammars on the host)
        self.device_states = bool(device_states) and backend == "outlines"
        try:
            import xgrammar as xgr
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ImportError("structured outputs need xgrammar: pip install xgrammar") \
                from exc
        self._xgr = xgr
        self.vocab_size = int(vocab_size)
        self.info = _tokenizer_info(xgr, tokenizer, self.vocab_size, list(eos_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="minikernels-grammar")
        self._lock = threading.Lock()
        # compiled constraints by key, least recently used first (bounded: a server may
        # see endless distinct schemas; grammars in use keep theirs alive)
        self._cache: dict[tuple[str, str, bool], Future[CompiledConstraint]] = {}
        self.max_cached = 512
        self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        self.words = (self.vocab_size + 31) // 32
        self._packed_rows: dict[str, torch.Tensor] = {}
        self._host: torch.Tensor | None = None     # persistent host bitmask (mask_logits)
        self._copy_done: Any = None                # CUDA event: its last copy to the device
        # the outlines backend: every automaton and every FSM grammar's state
        self.bank = FsmBank(self.words, self.vocab_size)
        # mask_step's cache: the last step's rows, valid while the batch's sequences and
        # ``epoch`` (bumped when a grammar starts) are unchanged
        self.epoch = 0
        self._step_key: tuple[int, list] | None = None
        self._step_rows: GrammarRows | None = None

    # ---------------------------------------------------------------- compilation
    def submit(self, params: StructuredOutputsParams) -> Future[CompiledConstraint]:
        """The compiled constraint, compiling it on the worker thread when not cached."""
        key = params.key()
        with self._lock:
            fut = self._cache.pop(key, None)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._executor.submit(self._compile, params)
            self._cache[key] = fut                 # (most recently used last)
            while len(self._cache) > self.max_cached:   # least recently used out
                self._cache.pop(next(iter(self._cache)))
            return fut

    def compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        """Blocking compile (cached); raises ValueError for an unsupported constraint."""
        return self.submit(params).result()

    def _compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        c, kind = self.compiler, params.kind
        compact = params.disable_any_whitespace
        if self.backend == "outlines" and kind in ("regex", "choice", "json"):
            try:
                index = FsmIndex(fsm_regex(kind, params), self.info.decoded_vocab,
                                 self._stop_ids(), self.vocab_size)
                return CompiledConstraint(None, False, fsm=index)
            except ValueError as exc:    # not regular for outlines-core: xgrammar matches it
                logger.info("structured outputs: outlines cannot compile this %s (%s); "
                            "using xgrammar", kind, exc)
        try:
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                grammar = c.compile_json_schema(schema, any_whitespace=not compact,
                                                strict_mode=True)
            elif kind == "json_object":
                grammar = c.compile_json_schema('{"type": "object"}',
                                                any_whitespace=not compact, strict_mode=False)
            elif kind == "regex":
                grammar = c.compile_regex(params.regex)
            elif kind == "choice":
                grammar = c.compile_regex(_choice_regex(params.choice or []))
            else:
                grammar = c.compile_grammar(params.grammar)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError / its own
            raise ValueError(f"structured_outputs.{kind} is not supported: "
                             f"{str(exc).strip().splitlines()[0][:300]}") from None
        return CompiledConstraint(grammar, mask_control_chars=kind in ("json", "json_object"))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------- matching
    def new_matcher(self, compiled: CompiledConstraint,
                    start_after: Sequence[int] | None = None
                    ) -> "SequenceGrammar | FsmGrammar":
        if compiled.fsm is not None:
            return self.bank.new_grammar(compiled.fsm,
                                         list(start_after) if start_after else None)
        matcher = self._xgr.GrammarMatcher(compiled.grammar)
        grammar = SequenceGrammar(matcher, compiled.mask_control_chars)
        if start_after:
            grammar.waiting_for = list(start_after)
        return grammar

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """Host int32 bitmask [rows, ceil(vocab / 32)], all tokens allowed."""
        return torch.full((rows, self.words), -1, dtype=torch.int32)

    def fill_bitmask(self, grammars: Sequence["SequenceGrammar"], bitmask: torch.Tensor,
                     rows: Sequence[int] | None = None) -> torch.Tensor:
        """Row rows[i] (default i) of the host ``bitmask`` <- the tokens grammars[i] allows
        next. Returns bool [len(grammars)]: the grammar allows nothing but a stop token
        (it is complete and nothing can follow)."""
        rows = list(range(len(grammars))) if rows is None else list(rows)
        self._fill(grammars, bitmask, rows)
        index = torch.tensor(rows, dtype=torch.int64)
        return ((bitmask.index_select(0, index) & ~self._packed(self._stop_ids)) == 0).all(
            dim=1)

    def _fill(self, grammars: Sequence["SequenceGrammar"], bitmask: torch.Tensor,
              rows: list[int]) -> None:
        """The matchers' next-token rows (at distinct ``rows``) of the host ``bitmask``,
        control characters removed from JSON rows. No advanced indexing: a list index
        goes through a parallel gather whose threads cost milliseconds on busy cores."""
        if any(isinstance(g, FsmGrammar) for g in grammars):
            # automata: their states' table rows, copied in one numpy assignment
            fsm = [(r, g.slot) for r, g in zip(rows, grammars) if isinstance(g, FsmGrammar)]
            states = self.bank.state[np.array([slot for _, slot in fsm], dtype=np.int64)]
            bitmask.numpy()[np.array([r for r, _ in fsm], dtype=np.int64)] = \
                self.bank.table[states]
            pairs = [(r, g) for r, g in zip(rows, grammars) if not isinstance(g, FsmGrammar)]
            if not pairs:
                return
            rows, grammars = [r for r, _ in pairs], [g for _, g in pairs]
        if len(grammars) == 1:
            grammars[0].matcher.fill_next_token_bitmask(bitmask, rows[0])
        else:   # xgrammar fills rows on its own threads (the GIL released)
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask,
                                                      rows)
        json_rows = [r for r, g in zip(rows, grammars) if g.mask_control_chars]
        if not json_rows:
            return
        cf = self._packed(self._control_free)
        lo, hi = min(json_rows), max(json_rows) + 1
        if hi - lo == len(json_rows):      # a dense run (every row, or a block of them)
            bitmask[lo:hi] &= cf
        else:
            index = torch.tensor(json_rows, dtype=torch.int64)
            bitmask.index_copy_(0, index, bitmask.index_select(0, index) & cf)

    def draft_bitmask(self, grammar: "SequenceGrammar", drafts: Sequence[int]
                      ) -> tuple[int, torch.Tensor]:
        """Speculative decoding: (m, host bitmask [m + 1, words]). m: how many of
        ``drafts`` the grammar accepts in a row (stopping after one that completes it);
        row j: the tokens allowed after the first j drafts (the mask plain decoding would
        apply at that position). The matcher is left as it was (rolled back)."""
        bits = self.allocate_bitmask(len(drafts) + 1)
        self._fill([grammar], bits, [0])
        m = 0
        for d in drafts:
            if not grammar.accept(d):
                break
            m += 1
            if grammar.terminated:
                break         # nothing may follow: row m stays all-allowed, never used
            self._fill([grammar], bits, [m])
        grammar.rollback(m)
        return m, bits[:m + 1]

    def mask_rows(self, logits: torch.Tensor, masks: dict[int, torch.Tensor]) -> None:
        """Row r of ``logits`` [R, V] (device) -> -inf outside the host bitmask row
        ``masks[r]`` ([words] int32), in place; other rows untouched."""
        from ..ops import apply_token_bitmask

        rows = sorted(masks)
        bits = torch.full((logits.shape[0], self.words), -1, dtype=torch.int32)
        bits[rows] = torch.stack([masks[r] for r in rows])
        index = torch.tensor(rows, dtype=torch.int32)
        dev = logits.device
        with torch.inference_mode():
            apply_token_bitmask(logits, bits.to(dev), index.to(dev),
                                vocab_size=min(self.vocab_size, logits.shape[1]))
            if logits.shape[1] > self.vocab_size:
                logits[:, self.vocab_size:].index_fill_(0, index.to(dev).long(),
                                                        float("-inf"))

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[int],
                    grammars: Sequence["SequenceGrammar"]) -> None:
        """Disallowed tokens of each constrained row -> -inf, in place.

        logits [B, V] on the device; rows[i] (distinct) is the logits row of grammars[i]. xgrammar fills the rows of a persistent host bitmask (page-locked on
        CUDA; nothing allocated or cleared per step: rows left unfilled are never read);
        only the span of constrained rows is copied and masked (a contiguous span - all
        rows, or a block - needs no index at all), by the Triton kernel on a GPU.
        """
        if not grammars:
            return
        from ..ops import apply_token_bitmask

        rows = rows if isinstance(rows, list) else list(rows)
        lo, hi = min(rows), max(rows) + 1
        dev = logits.device
        cuda = dev.type == "cuda"
        span = logits[lo:hi]
        index = None
        if hi - lo != len(rows):           # scattered rows: the kernel skips the others
            index = torch.tensor(rows, dtype=torch.int32)
            if lo:
                index -= lo
        host = self._host_bitmask(logits.shape[0], cuda)
        self._fill(grammars, host, rows)
        bits = host[lo:hi]
        if cuda:                           # async copies from page-locked memory
            bits = bits.to(dev, non_blocking=True)
            if index is not None:
                index = index.pin_memory().to(dev, non_blocking=True)
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()
        self._apply(logits, span, bits, index)

    def _apply(self, logits: torch.Tensor, span: torch.Tensor, bits: torch.Tensor,
               index: torch.Tensor | None) -> None:
        """``bits`` [rows of span, words] onto ``span`` (rows ``index`` of it, or all).
        Every argument is built here (int32 contiguous bits, an in-range contiguous
        index, logits rows from the sampler), so the op runs without its checks and the
        dispatcher (ops.bitmask.apply_token_bitmask_unchecked): tens of us per step."""
        if span.shape[1] > 1 and span.stride(1) != 1:      # (never from the sampler)
            raise ValueError("structured outputs: logits must be contiguous in the vocab")
        with torch.inference_mode():   # logits come from an inference-mode forward
            apply_token_bitmask_unchecked(span, bits.contiguous(),
                                          None if index is None else index.contiguous(),
                                          min(self.vocab_size, logits.shape[1]))
            if logits.shape[1] > self.vocab_size:   # a padded lm_head's extra columns
                pad = span[:, self.vocab_size:]
                if index is None:
                    pad.fill_(float("-inf"))
                else:
                    pad.index_fill_(0, index.long(), float("-inf"))

    # ------------------------------------------------------------- one engine step
    def mask_step(self, logits: torch.Tensor, seqs: Sequence[Any]) -> "GrammarRows | None":
        """Mask the step's constrained rows (row r: ``seqs[r]``'s grammar, active, its
        sequence running) in place; returns them for :meth:`accept_step` (None: none).

        The rows are found once per batch of automata: while the step's sequences
        (compared by identity, at C speed) and :attr:`epoch` are those of the last step,
        the last step's rows are reused. Automaton (outlines) rows cost no Python per
        row: one ``ops.fsm_mask_logits`` launch masks them all from the bank's table,
        read through each row's state (on the device when the states live there). xgrammar
        rows fill the host bitmask as in :meth:`mask_logits`."""
        key = self._step_key
        if key is not None and key[0] == self.epoch and key[1] == seqs and (
                self._step_rows is None or not self._step_rows.xgr_rows):
            # (a finished sequence's row may stay until the batch changes: masking or
            # matching its automaton is harmless, its token is dropped; xgrammar rows are
            # found again every step, a terminated matcher must not fill a mask)
            rows = self._step_rows
        else:
            rows = GrammarRows.of(seqs)
            self._step_key, self._step_rows = (self.epoch, list(seqs)), rows
        if rows is None:
            return None
        if rows.xgr_rows and not self.device_states:
            self.mask_logits(logits, rows.rows, rows.grammars)   # (its automata too)
            return rows
        if rows.xgr_rows:
            self.mask_logits(logits, rows.xgr_rows, [rows.grammars[i] for i in rows.xgr_pos])
        if not rows.fsm_rows.size:
            return rows
        dev = logits.device
        table = None
        if self.device_states:                 # the states live on the device
            d = self.bank.device_arrays(dev)
            state, slots, table = d.state, rows.device_tensor("fsm_slots", dev), d.table
        elif dev.type == "cuda":               # this step's host states, copied over
            state = torch.from_numpy(self.bank.state[rows.fsm_slots]).pin_memory().to(
                dev, non_blocking=True)
            slots = rows.device_tensor("fsm_order", dev)
        else:                                  # the host arrays themselves (no copy)
            state, slots = torch.from_numpy(self.bank.state), rows.device_tensor(
                "fsm_slots", dev)
        if table is None:
            table = self.bank.device_table(dev)
        # one launch: each row's table row, read through its state, masks its logits
        # (and a padded lm_head's columns); no per-row bitmask is gathered
        with torch.inference_mode():          # logits come from an inference-mode forward
            fsm_mask_logits_unchecked(logits, state, slots,
                                      rows.device_tensor("fsm_rows", dev), table,
                                      min(self.vocab_size, logits.shape[1]))
        return rows

    def advance_step(self, rows: "GrammarRows | None", tokens: torch.Tensor
                     ) -> torch.Tensor | None:
        """Device-resident automata: advance the step's automaton rows by the sampled
        ``tokens`` (device, one per step row) on the device (``ops.fsm_advance``); returns
        their int8 codes [rows] (0 moved, 1 done, 2 refused) on the device, None when
        the step has none."""
        if rows is None or not rows.fsm_rows.size or not self.device_states:
            return None
        dev = tokens.device
        d = self.bank.device_arrays(dev)
        # every array is the bank's own (contiguous, dtypes and ranges right): no checks
        # (host syncs on a GPU) and no dispatcher
        return fsm_advance_unchecked(
            d.state, d.codes, rows.device_tensor("fsm_slots", dev),
            rows.device_tensor("fsm_rows", dev), tokens.contiguous(), d.table, d.default,
            d.exc_keys, d.exc_next, d.eos, self.vocab_size)

    def accept_step(self, rows: "GrammarRows | None", tokens: Any,
                    codes: torch.Tensor | None = None) -> dict[int, int] | None:
        """Advance the step's automaton rows by their sampled ``tokens`` (all rows of the
        step, in order: a host tensor, array or list) at once - or, device-resident, read
        the ``codes`` advance_step left (on the host now); returns {row: 1 (accepted a
        stop token) | 2 (refused)} for the rows that need the engine's attention, None
        when none does. xgrammar rows are left to the engine's per-row accept."""
        if rows is None or not rows.fsm_rows.size:
            return None
        if codes is not None:
            result = codes.numpy()
            hit = np.flatnonzero(result)
        else:
            toks = tokens.numpy() if isinstance(tokens, torch.Tensor) else \
                np.asarray(tokens, dtype=np.int64)
            if not rows.fsm_dense:            # rows 0 .. n-1 of the step: no gather
                toks = toks[rows.fsm_rows]
            result = self.bank.accept(rows.fsm_slots, toks)
            hit = np.flatnonzero(result)
        if not hit.size:
            return None
        return {int(rows.fsm_rows[i]): int(result[i]) for i in hit}

    def _host_bitmask(self, rows: int, pinned: bool) -> torch.Tensor:
        """The persistent host bitmask's first ``rows`` rows (grown on demand; page-locked
        for a CUDA device). Waits for the previous step's copy out of it, if any (done
        already in practice: a constrained step is read back before the next one)."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None
        buf = self._host
        if buf is None or buf.shape[0] < rows or (pinned and not buf.is_pinned()):
            cap = max(rows, 2 * buf.shape[0] if buf is not None else 64)
            buf = torch.full((cap, self.words), -1, dtype=torch.int32, pin_memory=pinned)
            self._host = buf
        return buf[:rows]

    def _packed(self, which: Any) -> torch.Tensor:
        """Packed row for a token set (cached): see _control_free / _stop_ids."""
        cached = self._packed_rows.get(which.__name__)
        if cached is None:
            allowed = torch.zeros(self.words * 32, dtype=torch.bool)
            allowed[which()] = True
            bits = allowed.view(self.words, 32).to(torch.int64)
            packed = (bits << torch.arange(32, dtype=torch.int64)).sum(-1)
            cached = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
            self._packed_rows[which.__name__] = cached
        return cached

    def _control_free(self) -> list[int]:
        """Token ids whose bytes hold no raw control character."""
        vocab = self.info.decoded_vocab
        return [t for t in range(self.vocab_size)
                if t >= len(vocab) or not any(b in _CONTROL_BYTES for b in vocab[t])]

    def _stop_ids(self) -> list[int]:
        return [t for t in self.info.stop_token_ids if t < self.vocab_size]


@dataclass(eq=False)
class GrammarRows:
    """A step's constrained rows (see StructuredOutputManager.mask_step).

    rows: the logits rows of active grammars of running sequences (ascending), grammars
    theirs; lo / hi: their span; index: int32 rows - lo when they are scattered in it;
    fsm_rows / fsm_slots: the automaton rows and their bank slots (int64 arrays); bulk[r]:
    row r's grammar is an automaton matched in bulk (accept_step); xgr_rows: the others.
    """

    rows: list[int]
    grammars: list[Any]
    lo: int
    hi: int
    index: torch.Tensor | None
    fsm_rows: np.ndarray
    fsm_slots: np.ndarray
    bulk: list[bool]
    xgr_rows: list[int]
    xgr_pos: list[int]            # positions in ``rows`` / ``grammars`` of xgr_rows
    waiting: bool                 # some grammar of the batch waits for its start_after
    fsm_dense: bool = False       # fsm_rows is 0 .. len(seqs) - 1 (every row of the step)
    _device_index: torch.Tensor | None = None
    _on_device: dict[str, Any] | None = None

    @classmethod
    def of(cls, seqs: Sequence[Any]) -> "GrammarRows | None":
        from .sequence import SequenceStatus

        finished = SequenceStatus.FINISHED
        rows = [r for r, s in enumerate(seqs) if s.grammar is not None
                and s.grammar.active and s.status is not finished]
        if not rows:
            return None
        waiting = any(s.grammar is not None and not s.grammar.active for s in seqs)
        grammars = [seqs[r].grammar for r in rows]
        lo, hi = rows[0], rows[-1] + 1
        index = None
        if hi - lo != len(rows):
            index = torch.tensor(rows, dtype=torch.int32) - lo
        fsm = [(r, g.slot) for r, g in zip(rows, grammars) if type(g) is FsmGrammar]
        bulk = [False] * len(seqs)
        for r, _ in fsm:
            bulk[r] = True
        xgr_pos = [i for i, r in enumerate(rows) if not bulk[r]]
        return cls(rows, grammars, lo, hi, index,
                   np.array([r for r, _ in fsm], dtype=np.int64),
                   np.array([slot for _, slot in fsm], dtype=np.int64), bulk,
                   [rows[i] for i in xgr_pos], xgr_pos, waiting,
                   fsm_dense=len(fsm) == len(seqs))

    @property
    def host_tokens_free(self) -> bool:
        """Whether device-resident automata alone constrain the batch: the next step
        needs none of this step's tokens on the host for them."""
        return not self.xgr_rows and not self.waiting

    def device_tensor(self, name: str, dev: torch.device) -> torch.Tensor:
        """fsm_slots / fsm_rows / fsm_order (0 .. R - 1) on ``dev``, int64 (copied once
        per batch)."""
        cache = self._on_device
        if cache is None or cache.get("device") != dev:
            cache = self._on_device = {"device": dev}
        t = cache.get(name)
        if t is None:
            arr = np.arange(self.fsm_rows.size) if name == "fsm_order" else \
                getattr(self, name)
            t = cache[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(dev)
        return t

    def device_index(self, dev: torch.device) -> torch.Tensor:
        """``index`` on the logits' device (copied once per batch)."""
        t = self._device_index
        if t is None or t.device != dev:
            t = self._device_index = self.index.to(dev)
        return t


@dataclass
class SequenceGrammar:
    """One sequence's matcher state (lives on the Sequence, so it survives preemption)."""

    matcher: Any                     # xgrammar.GrammarMatcher
    mask_control_chars: bool
    # start_after tokens: the constraint is inactive (no mask, tokens not fed to the
    # matcher) until the output ends with them; None = active from the start
    waiting_for: list[int] | None = None

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    def wait(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """Before the constraint starts: activate it once the output (``token_ids`` after
        the prompt's ``num_prompt_tokens``) ends with the ``start_after`` tokens."""
        marker = self.waiting_for
        if marker is not None and len(token_ids) - num_prompt_tokens >= len(marker) and \
                token_ids[-len(marker):] == marker:
            self.waiting_for = None

    def __post_init__(self) -> None:
        # accept() runs once per constrained row per step: call xgrammar's native
        # accept_token(token, debug_print) directly when it is there (skips a Python frame)
        handle = getattr(self.matcher, "_handle", None)
        native = getattr(handle, "accept_token", None)
        self._native_accept = native if callable(native) else None

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False when the grammar refuses it."""
        native = self._native_accept
        if native is not None:
            return bool(native(int(token), False))
        return bool(self.matcher.accept_token(int(token)))

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens."""
        if n:
            self.matcher.rollback(n)

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: nothing may follow."""
        return bool(self.matcher.is_terminated())


def _tokenizer_info(xgr: Any, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    """xgrammar's TokenizerInfo for an HF tokenizer wrapper or the built-in byte tokenizer."""
    hf = getattr(tokenizer, "tokenizer", None)          # our HFTokenizer wrapper
    if hf is None and hasattr(tokenizer, "apply_chat_template") and \
            hasattr(tokenizer, "backend_tokenizer"):          # a transformers tokenizer
        hf = tokenizer
    if hf is None and hasattr(tokenizer, "backend_tokenizer"):   # a bare `tokenizers` one
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    if hf is not None:
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size,
                                                  stop_token_ids=eos or None)
    if tokenizer is not None and type(tokenizer).__name__ == "ByteTokenizer":
        specials = set(tokenizer.SPECIALS.values())
        vocab: list[bytes] = []
        for i in range(vocab_size):
            if i < 256:
                vocab.append(bytes([i]))
            elif i in specials:
                vocab.append(b"")          # special: only as a stop token
            else:
                vocab.append(f"<{i}>".encode())
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=eos or None)
    raise ValueError("structured outputs need the model's tokenizer (got "
                     f"{type(tokenizer).__name__})")
