"""apply_token_bitmask (structured outputs): the Triton kernel against the reference, and
the reference against an independent per-token loop, over random shapes, dtypes, row
subsets, padded vocabularies and strided views; errors; opcheck."""
from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", *kernel_backends()]


def _random_bitmask(rows: int, vocab: int, density: float, g: torch.Generator) -> torch.Tensor:
    allowed = torch.rand(rows, vocab, generator=g) < density
    words = -(-vocab // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _loop_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows, vocab: int) -> torch.Tensor:
    """Independent spec: a Python loop over tokens."""
    out = logits.clone()
    for r in rows:
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def test_reference_matches_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=g)
    bm = _random_bitmask(3, 70, 0.5, g)
    for indices, vocab in ((None, None), (torch.tensor([2, 0]), None), (None, 65)):
        got = logits.clone()
        reference.apply_token_bitmask(got, bm, indices, vocab)
        rows = range(3) if indices is None else indices.tolist()
        assert torch.equal(got, _loop_mask(logits, bm, rows, vocab or 70))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference(backend, device, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    rows = data.draw(st.integers(0, 5))
    vocab = data.draw(st.sampled_from([1, 31, 32, 33, 100, 4096, 4097, 9000]))
    pad = data.draw(st.sampled_from([0, 0, 7, 64]))        # padded lm_head columns
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    strided = data.draw(st.booleans())
    big = torch.randn(rows, vocab + pad + (5 if strided else 0), generator=g).to(dtype)
    logits = big[:, :vocab + pad].to(device)
    bm = _random_bitmask(rows, vocab, density, g).to(device)
    if strided:   # a bitmask view with a row stride of its own
        wide = torch.zeros(rows, bm.shape[1] + 3, dtype=torch.int32, device=device)
        wide[:, :bm.shape[1]] = bm
        bm = wide[:, :bm.shape[1]]
    indices = None
    if rows and data.draw(st.booleans()):
        k = data.draw(st.integers(0, rows))
        idx_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
        indices = torch.randperm(rows, generator=g)[:k].to(idx_dtype).to(device)
    vocab_arg = vocab if pad else data.draw(st.sampled_from([None, vocab]))
    want = logits.clone()
    reference.apply_token_bitmask(want, bm, indices, vocab)
    got = logits.clone()
    with mk.use_backend(backend):
        mk.ops.apply_token_bitmask(got, bm, indices, vocab_size=vocab_arg)
    assert torch.equal(got, want)
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    if indices is not None:
        untouched[indices.long()] = False
        assert torch.equal(got[untouched], logits[untouched])
    assert torch.equal(got[:, vocab:], logits[:, vocab:])       # padded columns kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_rows(backend, device):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 200, generator=g).to(device)
    logits = big[:, :150]                                      # row stride 200
    bm = _random_bitmask(4, 150, 0.3, g).to(device)
    want = logits.clone()
    reference.apply_token_bitmask(want, bm)
    with mk.use_backend(backend):
        mk.ops.apply_token_bitmask(logits, bm)
    assert torch.equal(big[:, :150], want)


def test_errors(device):
    logits = torch.zeros(2, 64, device=device)
    bm = torch.zeros(2, 2, dtype=torch.int32, device=device)
    f = mk.ops.apply_token_bitmask
    with pytest.raises(TypeError, match="bitmask must have dtype"):
        f(logits, bm.long())
    with pytest.raises(ValueError, match="one row per logits row"):
        f(logits, bm[:1])
    with pytest.raises(ValueError, match="vocab_size .* exceeds"):
        f(logits, bm, vocab_size=65)
    with pytest.raises(ValueError, match="indices values must be in"):
        f(logits, bm, torch.tensor([0, 2], device=device))
    with pytest.raises(ValueError, match="logits must be contiguous in its last dim"):
        f(torch.zeros(64, 2, device=device).t(), bm)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        f(logits[0], bm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 100, generator=g).to(device)
    bm = _random_bitmask(3, 100, 0.5, g).to(device)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.apply_token_bitmask,
                              (logits, bm, torch.tensor([2, 0], device=device), 100))
        torch.library.opcheck(torch.ops.minikernels.apply_token_bitmask,
                              (logits, bm, None, 96))
