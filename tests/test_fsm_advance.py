"""fsm_advance (structured outputs' device automata): the Triton kernel against the
reference, and the reference against an independent per-row loop, over random automata
(tables, defaults, exceptions, stop tokens), random slots / rows / tokens (refused ones,
out-of-range ones, done slots), int32 / int64 indices and views; errors; opcheck."""
from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", *kernel_backends()]


def _bank(n: int, vocab: int, n_exc: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A random stack of automata: N states over a vocabulary, packed tables, defaults,
    sorted exception keys (distinct (state, token) pairs) and stop tokens."""
    words = -(-vocab // 32)
    allowed = torch.rand(n, words * 32, generator=g) < 0.4
    allowed[:, vocab:] = False
    bits = allowed.view(n, words, 32).long() << torch.arange(32)
    packed = bits.sum(-1)
    table = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    default = torch.randint(0, max(n, 1), (n,), generator=g)
    pairs = torch.randperm(n * vocab, generator=g)[:n_exc] if n * vocab else \
        torch.zeros(0, dtype=torch.int64)
    keys = ((pairs // vocab) << 32) | (pairs % vocab)
    keys = keys.sort().values
    nxt = torch.randint(0, max(n, 1), (keys.shape[0],), generator=g)
    eos = torch.zeros(vocab, dtype=torch.bool)
    eos[torch.randint(0, vocab, (2,), generator=g)] = True
    return dict(table=table, default=default, exc_keys=keys, exc_next=nxt, eos=eos)


def _loop(state, codes, slots, rows, tokens, bank, vocab):
    """Independent spec: one row at a time, dict look-ups."""
    state, codes = state.clone(), codes.clone()
    exc = dict(zip(bank["exc_keys"].tolist(), bank["exc_next"].tolist()))
    out = []
    for slot, row in zip(slots.tolist(), rows.tolist()):
        s, t = int(state[slot]), int(tokens[row])
        ok = codes[slot] == 0 and 0 <= t < vocab and \
            (int(bank["table"][s, t // 32]) >> (t % 32)) & 1 == 1
        if not ok:
            out.append(2)
            continue
        if bank["eos"][t]:
            codes[slot] = 1
            out.append(1)
            continue
        state[slot] = exc.get((s << 32) | t, int(bank["default"][s]))
        out.append(0)
    return state, codes, torch.tensor(out, dtype=torch.int8)


def _case(data, g, device):
    n = data.draw(st.integers(1, 40))
    vocab = data.draw(st.sampled_from([1, 31, 32, 33, 100, 700]))
    bank = _bank(n, vocab, data.draw(st.sampled_from([0, 1, 5, 300])), g)
    slots_n = data.draw(st.integers(1, 12))
    rows = data.draw(st.integers(0, slots_n))
    state = torch.randint(0, n, (slots_n,), generator=g)
    codes = (torch.rand(slots_n, generator=g) < 0.2).to(torch.int8)
    slots = torch.randperm(slots_n, generator=g)[:rows]
    batch = rows + data.draw(st.integers(0, 3))
    row_ids = torch.randperm(max(batch, 1), generator=g)[:rows]
    tokens = torch.randint(-2, vocab + 3, (max(batch, 1),), generator=g)
    for i in range(rows):      # mostly allowed tokens, so states move and stops happen
        allowed = [t for t in range(vocab)
                   if (int(bank["table"][state[slots[i]], t // 32]) >> (t % 32)) & 1]
        if allowed and data.draw(st.booleans()):
            tokens[row_ids[i]] = allowed[data.draw(st.integers(0, len(allowed) - 1))]
    idx = data.draw(st.sampled_from([torch.int32, torch.int64]))
    tok = data.draw(st.sampled_from([torch.int32, torch.int64]))
    return (state.to(device), codes.to(device), slots.to(idx).to(device),
            row_ids.to(idx).to(device), tokens.to(tok).to(device),
            {k: v.to(device) for k, v in bank.items()}, vocab)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference_and_loop(backend, device, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    state, codes, slots, rows, tokens, bank, vocab = _case(data, g, device)
    want_state, want_codes, want_out = _loop(state.cpu(), codes.cpu(), slots.cpu(),
                                             rows.cpu(), tokens.cpu(),
                                             {k: v.cpu() for k, v in bank.items()}, vocab)
    ref_state, ref_codes = state.clone(), codes.clone()
    ref_out = reference.fsm_advance(ref_state, ref_codes, slots, rows, tokens, **bank,
                                    vocab_size=vocab)
    assert torch.equal(ref_out.cpu(), want_out) and torch.equal(ref_state.cpu(), want_state)
    assert torch.equal(ref_codes.cpu(), want_codes)
    strided = data.draw(st.booleans())
    args = dict(bank)
    if strided:   # every read-only tensor a view with strides of its own
        args["table"] = torch.cat([bank["table"], bank["table"]], 1)[:, :bank["table"].shape[1]]
        for k in ("default", "exc_keys", "exc_next", "eos"):
            args[k] = torch.stack([bank[k], bank[k]], 1)[:, 0]
        slots = torch.stack([slots, slots], 1)[:, 0]
        rows = torch.stack([rows, rows], 1)[:, 0]
        tokens = torch.stack([tokens, tokens], 1)[:, 0]
    got_state, got_codes = state.clone(), codes.clone()
    with mk.use_backend(backend):
        out = mk.ops.fsm_advance(got_state, got_codes, slots, rows, tokens, **args,
                                 vocab_size=vocab)
    assert torch.equal(out.cpu(), want_out)
    assert torch.equal(got_state.cpu(), want_state) and torch.equal(got_codes.cpu(), want_codes)


def test_errors(device):
    g = torch.Generator().manual_seed(0)
    bank = {k: v.to(device) for k, v in _bank(4, 40, 3, g).items()}
    state = torch.zeros(3, dtype=torch.int64, device=device)
    codes = torch.zeros(3, dtype=torch.int8, device=device)
    slots = torch.tensor([0, 2], device=device)
    rows = torch.tensor([1, 0], device=device)
    tokens = torch.tensor([5, 7], device=device)
    f = mk.ops.fsm_advance
    with pytest.raises(TypeError, match="state must have dtype"):
        f(state.int(), codes, slots, rows, tokens, **bank)
    with pytest.raises(ValueError, match="state must be contiguous"):
        f(torch.zeros(6, dtype=torch.int64, device=device)[::2], codes, slots, rows, tokens,
          **bank)
    with pytest.raises(ValueError, match="rows must match"):
        f(state, codes, slots, rows[:1], tokens, **bank)
    with pytest.raises(ValueError, match="slots values must be in"):
        f(state, codes, torch.tensor([0, 3], device=device), rows, tokens, **bank)
    with pytest.raises(ValueError, match="rows values must be in"):
        f(state, codes, slots, torch.tensor([0, 2], device=device), tokens, **bank)
    with pytest.raises(ValueError, match=r"state\[slots\] values must be in"):
        f(torch.tensor([0, 0, 9], device=device), codes, slots, rows, tokens, **bank)
    with pytest.raises(ValueError, match="vocab_size must be"):
        f(state, codes, slots, rows, tokens, **bank, vocab_size=41)
    with pytest.raises(ValueError, match="exc_next must match"):
        f(state, codes, slots, rows, tokens, **{**bank, "exc_next": bank["exc_next"][:1]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    g = torch.Generator().manual_seed(2)
    bank = {k: v.to(device) for k, v in _bank(6, 70, 10, g).items()}
    args = (torch.tensor([1, 4, 0], device=device), torch.zeros(3, dtype=torch.int8,
                                                                 device=device),
            torch.tensor([2, 0], device=device), torch.tensor([0, 1], device=device),
            torch.tensor([3, 69], device=device), bank["table"], bank["default"],
            bank["exc_keys"], bank["exc_next"], bank["eos"], 70)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.fsm_advance, args)


# ---------------------------------------------------------------- fsm_mask_logits
def _mask_loop(logits, state, slots, rows, table, vocab):
    """Independent spec: one row and one token at a time."""
    out = logits.clone()
    v = min(vocab, logits.shape[1], 32 * table.shape[1])
    for slot, row in zip(slots.tolist(), rows.tolist()):
        s = int(state[slot])
        for t in range(logits.shape[1]):
            if t >= v or not (int(table[s, t // 32]) >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_mask_logits_matches_loop(backend, device, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    n = data.draw(st.integers(1, 30))
    table_vocab = data.draw(st.sampled_from([1, 31, 32, 33, 100, 700]))
    table = _bank(n, table_vocab, 0, g)["table"]
    cols = data.draw(st.sampled_from([1, table_vocab, table_vocab + 5, 4097, 4200]))
    vocab = data.draw(st.sampled_from([None, max(cols - 3, 0), cols, cols + 7]))
    n_slots = data.draw(st.integers(1, 10))
    batch = data.draw(st.integers(1, 9))
    r = data.draw(st.integers(0, min(batch, n_slots)))
    state = torch.randint(0, n, (n_slots,), generator=g)
    slots = torch.randperm(n_slots, generator=g)[:r]
    rows = torch.randperm(batch, generator=g)[:r]
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    logits = torch.randn(batch, cols, generator=g).to(dtype)
    want = _mask_loop(logits, state, slots, rows, table, cols if vocab is None else vocab)
    idx = data.draw(st.sampled_from([torch.int32, torch.int64]))
    slots, rows = slots.to(idx), rows.to(idx)
    if data.draw(st.booleans()):   # every tensor a view with strides of its own
        big = torch.randn(batch, cols + 9, generator=g).to(dtype)
        big[:, 3:3 + cols] = logits
        logits = big[:, 3:3 + cols]
        state = torch.stack([state, state], 1)[:, 0]
        slots = torch.stack([slots, slots], 1)[:, 0]
        rows = torch.stack([rows, rows], 1)[:, 0]
        table = torch.cat([table, table], 1)[:, :table.shape[1]]
    logits, state, slots, rows, table = (t.to(device) for t in (logits, state, slots, rows,
                                                                 table))
    ref = logits.clone()
    reference.fsm_mask_logits(ref, state, slots, rows, table,
                              cols if vocab is None else vocab)
    assert torch.equal(ref.cpu(), want)
    with mk.use_backend(backend):
        mk.ops.fsm_mask_logits(logits, state, slots, rows, table, vocab_size=vocab)
    assert torch.equal(logits.cpu(), want)
    if data.draw(st.booleans()) and r:   # the same as the bitmask op on gathered rows
        again = want.to(device).clone()
        bits = table[state[slots.long()]]
        mk.ops.apply_token_bitmask(again, torch.full((batch, table.shape[1]), -1,
                                                     dtype=torch.int32, device=device)
                                   .index_copy(0, rows.long(), bits), rows)
        assert torch.equal(again.cpu(), want)


def test_mask_logits_errors(device):
    g = torch.Generator().manual_seed(0)
    table = _bank(4, 40, 0, g)["table"].to(device)
    logits = torch.randn(3, 40, device=device)
    state = torch.tensor([0, 3, 1], device=device)
    slots = torch.tensor([0, 2], device=device)
    rows = torch.tensor([1, 0], device=device)
    f = mk.ops.fsm_mask_logits
    with pytest.raises(TypeError, match="logits must have dtype"):
        f(logits.long(), state, slots, rows, table)
    with pytest.raises(ValueError, match="logits must be contiguous in its last dim"):
        f(torch.randn(40, 3, device=device).t(), state, slots, rows, table)
    with pytest.raises(TypeError, match="state must have dtype"):
        f(logits, state.int(), slots, rows, table)
    with pytest.raises(ValueError, match="rows must match"):
        f(logits, state, slots, rows[:1], table)
    with pytest.raises(ValueError, match="slots values must be in"):
        f(logits, state, torch.tensor([0, 3], device=device), rows, table)
    with pytest.raises(ValueError, match="rows values must be in"):
        f(logits, state, slots, torch.tensor([0, 3], device=device), table)
    with pytest.raises(ValueError, match="rows must be distinct"):
        f(logits, state, slots, torch.tensor([1, 1], device=device), table)
    with pytest.raises(ValueError, match=r"state\[slots\] values must be in"):
        f(logits, torch.tensor([0, 0, 9], device=device), slots, rows, table)
    with pytest.raises(ValueError, match="vocab_size must be"):
        f(logits, state, slots, rows, table, vocab_size=-1)
    with pytest.raises(TypeError, match="table must have dtype"):
        f(logits, state, slots, rows, table.long())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_logits_opcheck(backend, device):
    g = torch.Generator().manual_seed(2)
    table = _bank(6, 70, 0, g)["table"].to(device)
    args = (torch.randn(3, 75, device=device), torch.tensor([1, 4, 0], device=device),
            torch.tensor([2, 0], device=device), torch.tensor([0, 2], device=device), table,
            70)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.fsm_mask_logits, args)
