"""Regular constraints as token-level automata (the "outlines" structured-output backend).

A regex, a choice or a JSON schema without recursion is a regular language: outlines-core
(the Outlines project's Rust core, vLLM's "outlines" backend) compiles it over the
tokenizer's vocabulary into an automaton whose transitions are whole tokens. Everything a
decode step needs is then a table look-up by the sequence's state, precomputed once per
constraint:

    table    int32 [S, ceil(V / 32)]  state s's allowed tokens, packed like xgrammar's
                                      bitmask (bit t % 32 of word t // 32; EOS ids allowed
                                      in final states)
    step     next(s, t) = exceptions.get((s, t), default[s]) for an allowed t: most of a
                                      state's tokens lead to one state (a string's inside
                                      stays inside), the rest are listed

so a step costs a few numpy operations for the whole batch (accept) plus one kernel that
masks the logits straight from the table rows of the rows' states (``ops.fsm_mask_logits``),
instead of a grammar engine's per-row matching. The
price is paid at compile time (off the engine thread): seconds for a large vocabulary,
and memory S x V / 8 bytes for the table; constraints that are not regular (EBNF
grammars, ``json_object``, recursive schemas) stay with xgrammar.
"""
from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: JSON schemas: whitespace between tokens is at most one space (strict JSON parsers
#: accept it, and free whitespace lets a model ramble), none when compact
JSON_WHITESPACE = r"[ ]?"


class FsmIndex:
    """One compiled regular constraint (module docstring).

    regex: the pattern the whole output must match (outlines-core's regex dialect);
    token_bytes: each token id's bytes (empty: never allowed, e.g. special tokens);
    eos_ids: the stop ids (allowed, and kept in place, in final states); vocab_size: the
    model's logits width (ids past the tokenizer's are never allowed).
    """

    def __init__(self, regex: str, token_bytes: Sequence[bytes], eos_ids: Sequence[int],
                 vocab_size: int) -> None:
        from outlines_core import Index, Vocabulary

        eos = [int(t) for t in eos_ids if 0 <= int(t) < vocab_size]
        if not eos:
            raise ValueError("the outlines backend needs a stop token id")
        eos_set = set(eos)
        by_bytes: dict[bytes, list[int]] = {}
        for tok, raw in enumerate(token_bytes[:vocab_size]):
            if raw and tok not in eos_set:
                by_bytes.setdefault(bytes(raw), []).append(tok)
        index = Index(regex, Vocabulary(eos[0], by_bytes))
        transitions = index.get_transitions()
        finals = set(index.get_final_states())
        names = sorted(set(transitions) | finals | {index.get_initial_state()})
        local = {name: i for i, name in enumerate(names)}
        self.num_states = len(names)
        self.vocab_size = int(vocab_size)
        self.eos_ids = frozenset(eos)
        self.initial = local[index.get_initial_state()]
        words = (vocab_size + 31) // 32
        allowed = np.zeros((self.num_states, words * 32), dtype=bool)
        self.default: list[int] = [-1] * self.num_states
        self.exceptions: dict[int, int] = {}
        self.final = [False] * self.num_states
        for name, edges in transitions.items():
            s = local[name]
            moves = {t: local[n] for t, n in edges.items() if t not in eos_set}
            if moves:
                toks = np.fromiter(moves.keys(), dtype=np.int64, count=len(moves))
                allowed[s, toks] = True
                default = Counter(moves.values()).most_common(1)[0][0]
                self.default[s] = default
                self.exceptions.update({(s << 32) | t: n for t, n in moves.items()
                                        if n != default})
        for name in finals:
            s = local[name]
            self.final[s] = True
            allowed[s, eos] = True
        bits = allowed.reshape(self.num_states, words, 32).astype(np.int64)
        packed = (bits << np.arange(32, dtype=np.int64)).sum(-1)
        self.table = torch.from_numpy(np.where(packed >= 2**31, packed - 2**32, packed)
                                      .astype(np.int32))


class FsmBank:
    """Every automaton a manager compiled, stacked, and the state of every sequence
    following one: what a step reads, as arrays, so a batch of rows is matched with a
    few numpy operations instead of a call per row.

    Global state ids: automaton i's state s is row ``offset(i) + s`` of

        table     int32 [N, words]   allowed tokens (bit t % 32 of word t // 32)
        default   int64 [N]          the next state of most allowed tokens (-1: none)
        exc_keys  int64 [E] sorted   (state << 32) | token of the other tokens ...
        exc_next  int64 [E]          ... and their next states
        eos       bool  [vocab]      stop ids (accepted in final states, no move)

    Each sequence's grammar holds a slot: ``state[slot]`` (a global id) and
    ``done[slot]`` (it accepted a stop token). Slots are reused once a grammar is gone.
    When a new automaton would take the table past ``max_table_bytes``, the bank is
    rebuilt with only the automata live grammars follow (a server seeing many distinct
    schemas keeps a bounded table; their states are moved to the new ids).
    """

    def __init__(self, words: int, vocab_size: int, max_table_bytes: int = 256 << 20
                 ) -> None:
        self.max_table_bytes = int(max_table_bytes)
        self.words, self.vocab_size = int(words), int(vocab_size)
        self.table = np.zeros((0, words), dtype=np.int32)
        self.default = np.zeros(0, dtype=np.int64)
        self.exc_keys = np.zeros(0, dtype=np.int64)
        self.exc_next = np.zeros(0, dtype=np.int64)
        self.eos = np.zeros(vocab_size, dtype=bool)
        self.indices: list[FsmIndex] = []
        self._offsets: dict[int, int] = {}        # id(index) -> its first row
        self.state = np.zeros(64, dtype=np.int64)
        self.done = np.zeros(64, dtype=bool)
        self._free = list(range(63, -1, -1))
        self._slot_index: list[FsmIndex | None] = [None] * 64   # each slot's automaton
        self._device_table: torch.Tensor | None = None
        # device-resident states (device_arrays): the arrays there, the bank's version
        # they copy, and the slots whose host state is newer (new grammars)
        self._device: DeviceFsm | None = None
        self._version = 0
        self._pending: set[int] = set()

    def offset(self, index: FsmIndex) -> int:
        """The automaton's first global row (stacking it first if it is new here)."""
        base = self._offsets.get(id(index))
        if base is not None:
            return base
        if self.table.nbytes + index.table.numel() * 4 > self.max_table_bytes:
            self._compact()
        return self.add(index)

    def _compact(self) -> None:
        """Rebuild the stacked arrays with only the automata some grammar follows, and
        move those grammars' states to their new ids."""
        self._sync_from_device()
        live = {id(i): i for i in self._slot_index if i is not None}
        old = dict(self._offsets)
        slots = [s for s, i in enumerate(self._slot_index) if i is not None]
        local = {s: int(self.state[s]) - old[id(self._slot_index[s])] for s in slots}
        self.table = np.zeros((0, self.words), dtype=np.int32)
        self.default = np.zeros(0, dtype=np.int64)
        self.exc_keys = np.zeros(0, dtype=np.int64)
        self.exc_next = np.zeros(0, dtype=np.int64)
        self.indices, self._offsets = [], {}
        for index in live.values():
            self.add(index)
        for s in slots:
            self.state[s] = self._offsets[id(self._slot_index[s])] + local[s]
        self._push_to_device()

    def add(self, index: FsmIndex) -> int:
        """Stack a new automaton's arrays (its ids shifted to global ones); its offset."""
        base = int(self.table.shape[0])
        self._offsets[id(index)] = base
        self.indices.append(index)
        self.table = np.concatenate([self.table, index.table.numpy()])
        default = np.asarray(index.default, dtype=np.int64)
        self.default = np.concatenate([self.default, np.where(default >= 0, default + base,
                                                              -1)])
        if index.exceptions:
            keys = np.fromiter(index.exceptions.keys(), dtype=np.int64,
                               count=len(index.exceptions))
            nxt = np.fromiter(index.exceptions.values(), dtype=np.int64,
                              count=len(index.exceptions)) + base
            keys = ((keys >> 32) + base << 32) | (keys & 0xFFFFFFFF)
            keys = np.concatenate([self.exc_keys, keys])
            order = np.argsort(keys, kind="stable")
            self.exc_keys = keys[order]
            self.exc_next = np.concatenate([self.exc_next, nxt])[order]
        self.eos[list(index.eos_ids)] = True
        self._device_table = None
        self._version += 1
        return base

    def new_grammar(self, index: FsmIndex, waiting_for: list[int] | None) -> "FsmGrammar":
        base = self.offset(index)
        if not self._free:
            n = self.state.shape[0]
            self.state = np.concatenate([self.state, np.zeros(n, dtype=np.int64)])
            self.done = np.concatenate([self.done, np.zeros(n, dtype=bool)])
            self._slot_index += [None] * n
            self._free = list(range(2 * n - 1, n - 1, -1))
        slot = self._free.pop()
        self.state[slot] = base + index.initial
        self.done[slot] = False
        self._slot_index[slot] = index
        self._pending.add(slot)
        grammar = FsmGrammar(self, slot, index, waiting_for)
        weakref.finalize(grammar, self._release, slot)
        return grammar

    def _release(self, slot: int) -> None:
        self._slot_index[slot] = None
        self._free.append(slot)

    def device_table(self, dev: torch.device) -> torch.Tensor:
        """The stacked table on ``dev`` (copied once per new automaton)."""
        t = self._device_table
        if t is None or t.device != dev:
            t = self._device_table = torch.from_numpy(self.table).to(dev)
        return t

    # ------------------------------------------------------ states on the device
    def device_arrays(self, dev: torch.device) -> "DeviceFsm":
        """The bank on ``dev`` for device-resident states (``DeviceFsm``): the automata's
        arrays (copied again after a new automaton) and every slot's state and code,
        which then live there (new grammars' initial states are pushed on the way)."""
        d = self._device
        if d is None or d.device != dev:
            d = self._device = DeviceFsm(dev)
            d.state = torch.from_numpy(self.state.copy()).to(dev)
            d.codes = torch.from_numpy(self.done.astype(np.int8)).to(dev)
            self._pending.clear()
        if d.version != self._version:
            d.table = self.device_table(dev)
            d.default = torch.from_numpy(self.default).to(dev)
            d.exc_keys = torch.from_numpy(self.exc_keys).to(dev)
            d.exc_next = torch.from_numpy(self.exc_next).to(dev)
            d.eos = torch.from_numpy(self.eos).to(dev)
            d.version = self._version
        if d.state.shape[0] < self.state.shape[0]:        # more slots: grow, keep states
            grown = self.state.shape[0]
            d.state = torch.cat([d.state, d.state.new_zeros(grown - d.state.shape[0])])
            d.codes = torch.cat([d.codes, d.codes.new_zeros(grown - d.codes.shape[0])])
        if self._pending:                               # new grammars' initial states
            slots = torch.tensor(sorted(self._pending), dtype=torch.int64)
            d.state.index_copy_(0, slots.to(dev), torch.from_numpy(
                self.state[slots.numpy()]).to(dev))
            d.codes.index_fill_(0, slots.to(dev), 0)
            self._pending.clear()
        return d

    def _sync_from_device(self) -> None:
        """Device-resident states back into the host arrays (a grammar read one token at
        a time, or a rebuild of the bank)."""
        d = self._device
        if d is not None:
            n = d.state.shape[0]
            live = np.array([s for s in range(n) if s not in self._pending], dtype=np.int64)
            if live.size:
                self.state[live] = d.state.cpu().numpy()[live]
                self.done[live] = d.codes.cpu().numpy()[live] != 0

    def pull(self, slot: int) -> None:
        """One slot's device-resident state into the host arrays (no-op without)."""
        d = self._device
        if d is not None and slot not in self._pending:
            self.state[slot] = int(d.state[slot])
            self.done[slot] = int(d.codes[slot]) != 0

    def push(self, slot: int) -> None:
        """One slot's host state to the device at its next use (no-op without)."""
        if self._device is not None:
            self._pending.add(slot)

    def _push_to_device(self) -> None:
        """Host states (changed one token at a time) into the device arrays."""
        if self._device is not None:
            self._pending.update(range(self._device.state.shape[0]))

    def accept(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Advance the grammars in ``slots`` by ``tokens`` (int64 arrays, one per row);
        returns int8 per row: 0 moved on, 1 accepted a stop token (done), 2 refused."""
        state = self.state[slots]
        ok = (tokens >= 0) & (tokens < self.vocab_size) & ~self.done[slots]
        safe = np.where(ok, tokens, 0)
        ok &= ((self.table[state, safe >> 5] >> (safe & 31)) & 1).astype(bool)
        stop = ok & self.eos[safe]
        nxt = self.default[state]
        if self.exc_keys.shape[0]:
            keys = (state << 32) | safe
            at = np.minimum(np.searchsorted(self.exc_keys, keys), self.exc_keys.shape[0] - 1)
            hit = self.exc_keys[at] == keys
            nxt = np.where(hit, self.exc_next[at], nxt)
        move = ok & ~stop
        self.state[slots] = np.where(move, nxt, state)
        self.done[slots[stop]] = True
        return np.where(ok, stop.astype(np.int8), np.int8(2))


@dataclass(eq=False)
class DeviceFsm:
    """The bank's arrays on a device (FsmBank.device_arrays; layouts: ops/fsm.py)."""

    device: torch.device
    version: int = -1
    table: torch.Tensor | None = None
    default: torch.Tensor | None = None
    exc_keys: torch.Tensor | None = None
    exc_next: torch.Tensor | None = None
    eos: torch.Tensor | None = None
    state: torch.Tensor | None = None      # int64 [slots]
    codes: torch.Tensor | None = None      # int8 [slots]: 1 done


@dataclass(eq=False)
class FsmGrammar:
    """One sequence's place in an :class:`FsmIndex` (lives on the Sequence, so it
    survives preemption; its state sits in the bank's arrays); the interface of
    structured_outputs.SequenceGrammar, plus batch matching through the bank."""

    bank: FsmBank
    slot: int
    index: FsmIndex
    waiting_for: list[int] | None = None       # start_after (see SequenceGrammar)
    mask_control_chars: bool = False           # (the regex excludes raw control bytes)
    # earlier (local state, done) pairs, for rollback (local: the bank may move ids)
    _trail: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    def wait(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        marker = self.waiting_for
        if marker is not None and len(token_ids) - num_prompt_tokens >= len(marker) and \
                token_ids[-len(marker):] == marker:
            self.waiting_for = None

    @property
    def row(self) -> int:
        """The global table row of its state."""
        self.bank.pull(self.slot)
        return int(self.bank.state[self.slot])

    @property
    def base(self) -> int:
        """Its automaton's first global row in the bank."""
        return self.bank.offset(self.index)

    def accept(self, token: int) -> bool:
        """Advance by one token; False when the constraint refuses it."""
        bank, slot = self.bank, self.slot
        bank.pull(slot)
        before = (int(bank.state[slot]) - self.base, bool(bank.done[slot]))
        result = bank.accept(np.array([slot], dtype=np.int64),
                             np.array([int(token)], dtype=np.int64))[0]
        if result == 2:
            return False
        bank.push(slot)
        trail = self._trail
        if len(trail) >= 64:           # rollback only ever spans a speculative window
            del trail[:32]
        trail.append(before)
        return True

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` tokens accepted through :meth:`accept`."""
        if n:
            state, done = self._trail[-n]
            del self._trail[-n:]
            self.bank.state[self.slot] = self.base + state
            self.bank.done[self.slot] = done
            self.bank.push(self.slot)

    @property
    def terminated(self) -> bool:
        """The constraint accepted a stop token: nothing may follow."""
        self.bank.pull(self.slot)
        return bool(self.bank.done[self.slot])


#: JSON-schema keywords outlines-core's regex enforces (it ignores others, e.g. minimum,
#: multipleOf, uniqueItems: such a schema goes to xgrammar, which enforces them)
_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minLength", "maxLength", "minItems", "maxItems", "anyOf", "$ref", "$defs",
    "definitions", "format", "title", "description", "default", "examples", "$schema",
    "$id", "$comment"})
_FORMATS = frozenset({"date-time", "date", "time", "uuid"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def unsupported_schema_keyword(schema: Any) -> str | None:
    """The first keyword (or format) of a JSON schema the automaton would not enforce,
    None when it enforces all of them."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return "a non-object schema"
    for key, value in schema.items():
        if key not in _SCHEMA_KEYWORDS:
            return key
        if key == "format" and value not in _FORMATS:
            return f"format {value!r}"
        if key == "type" and isinstance(value, list):
            return "a list of types"
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            subs = list(value.values())
        elif key == "anyOf" and isinstance(value, list):
            subs = value
        elif key in ("items", "additionalProperties"):
            subs = value if isinstance(value, list) else [value]
        else:
            continue
        for sub in subs:
            found = unsupported_schema_keyword(sub)
            if found is not None:
                return found
    return None


def fsm_regex(kind: str, params: Any) -> str:
    """The regex of a regular constraint (regex / choice / JSON schema); ValueError for a
    schema outlines-core cannot turn into one."""
    import json
    import re

    if kind == "regex":
        return params.regex
    if kind == "choice":
        return "(" + "|".join(re.escape(c) for c in params.choice) + ")"
    from outlines_core.json_schema import build_regex_from_schema

    schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
    unsupported = unsupported_schema_keyword(json.loads(schema))
    if unsupported is not None:
        raise ValueError(f"the automaton would not enforce {unsupported}")
    ws = "" if params.disable_any_whitespace else JSON_WHITESPACE
    try:
        return build_regex_from_schema(schema, ws)
    except Exception as exc:  # noqa: BLE001 - outlines-core raises its own / ValueError
        raise ValueError(str(exc).strip().splitlines()[0][:300]) from None
