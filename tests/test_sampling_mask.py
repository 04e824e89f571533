"""top_k_top_p_mask_logits: the Triton kernel against the reference and against vLLM's /
torch's own formulations of top-k, top-p and min-p.

Top-k is exact (integer counts), so kernel and reference must keep the same tokens. Min-p
and top-p compare fp32 sums and exps computed in different orders, so a token whose
margin to the threshold is within rounding may land on either side: ``check_mask`` allows
a difference only there, and the independent checks use inputs far from any threshold.
"""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPES
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference as ref

NEG_INF = float("-inf")


def _margins(logits: torch.Tensor, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, in float64: how far it is from the min-p and the top-p thresholds
    (relative), on the tokens the earlier filters keep (reference rules)."""
    x = logits.double()
    B, V = x.shape
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k >= V), V, top_k.long())
        keep &= x >= x.sort(1, descending=True).values.gather(1, (k - 1)[:, None])
    m = x.masked_fill(~keep, NEG_INF).amax(1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    e = torch.where(keep, torch.exp(x - m), 0.0)
    min_margin = torch.full_like(x, float("inf"))
    if min_p is not None:
        mp = min_p.double()[:, None]
        min_margin = (e - mp).abs() / mp.clamp_min(1e-30)
        keep &= e >= mp
        e = torch.where(keep, e, 0.0)
    p_margin = torch.full_like(x, float("inf"))
    if top_p is not None:
        larger = torch.stack([(e[b][None, :] * (x[b][None, :] > x[b][:, None])).sum(1)
                              for b in range(B)]) if B else e
        z = e.sum(1, keepdim=True)
        p_margin = (larger - top_p.double()[:, None] * z).abs() / z.clamp_min(1e-300)
    return min_margin, p_margin


def check_mask(got: torch.Tensor, logits: torch.Tensor, top_k=None, top_p=None,
               min_p=None, rel: float = 1e-4) -> None:
    """got is the masked logits: kept values exact, others -inf, and the kept set equal to
    the reference's up to tokens within ``rel`` of a min-p / top-p threshold."""
    want = ref.top_k_top_p_mask_logits(logits, top_k, top_p, min_p)
    assert got.shape == logits.shape and got.dtype == logits.dtype
    assert not torch.isnan(got).any(), "NaN in output (unwritten element?)"
    kept = got != NEG_INF
    assert torch.equal(got[kept], logits[kept]), "kept logits must be unchanged"
    differ = kept != (want != NEG_INF)
    differ &= logits != NEG_INF
    if differ.any():
        min_margin, p_margin = _margins(logits, top_k, top_p, min_p)
        near = (min_margin < rel) | (p_margin < rel)
        bad = differ & ~near
        assert not bad.any(), (f"{int(bad.sum())} tokens kept/dropped unlike the reference "
                               f"away from any threshold, rows "
                               f"{bad.any(1).nonzero().flatten().tolist()}")


def _params(draw, rows: int, vocab: int, g: torch.Generator):
    top_k = top_p = min_p = None
    if draw(st.booleans()):
        top_k = torch.randint(-1, vocab + 3, (rows,), generator=g)
        if rows:
            top_k[0] = draw(st.sampled_from([1, 2, max(1, vocab - 1)]))
        if draw(st.booleans()):
            top_k = top_k.int()
    if draw(st.booleans()):
        top_p = torch.rand(rows, generator=g)
        top_p[torch.rand(rows, generator=g) < 0.2] = 1.0
    if draw(st.booleans()):
        min_p = torch.rand(rows, generator=g) * 0.3
        min_p[torch.rand(rows, generator=g) < 0.3] = 0.0
    return top_k, top_p, min_p


@given(data=st.data(), rows=st.sampled_from([0, 1, 3, 6]),
       vocab=st.sampled_from([1, 2, 7, 100, 1024, 1500, 3001]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31), ties=st.booleans(),
       row_view=st.booleans())
def test_matches_reference(device, data, rows, vocab, dtype, seed, ties, row_view):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab + 5 if row_view else vocab, generator=g) * 3
    if ties:                      # many equal logits, -inf tokens
        x = (x * 2).round() / 2
        x[torch.rand(x.shape, generator=g) < 0.1] = NEG_INF
    x = x.to(device, dtype)
    logits = x[:, :vocab] if row_view else x
    top_k, top_p, min_p = (t.to(device) if t is not None else None
                           for t in _params(data.draw, rows, vocab, g))
    with mk.use_backend("triton"):
        got = mk.ops.top_k_top_p_mask_logits(logits, top_k, top_p, min_p)
    check_mask(got.cpu(), logits.cpu(), *(t.cpu() if t is not None else None
                                          for t in (top_k, top_p, min_p)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_top_k_is_torch_topk(device, backend):
    """Distinct logits: exactly torch.topk's indices survive (per-row k, k > V = all)."""
    g = torch.Generator().manual_seed(1)
    V = 2500
    x = torch.stack([torch.randperm(V, generator=g) for _ in range(5)]).float() * 0.01 - 7
    ks = [1, 7, 40, V, V + 9]
    with mk.use_backend(backend):
        got = mk.ops.top_k_top_p_mask_logits(x.to(device), torch.tensor(ks, device=device))
    for b, k in enumerate(ks):
        want = torch.zeros(V, dtype=torch.bool)
        want[torch.topk(x[b], min(k, V)).indices] = True
        assert torch.equal(got[b].cpu() != NEG_INF, want), (b, k)


def _vllm_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM's apply_top_k_top_p formulation (ascending sort, cumulative probabilities)."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    top_k_mask = logits_sort.size(1) - k.to(torch.long)
    top_k_mask = logits_sort.gather(1, top_k_mask.unsqueeze(dim=1))
    logits_sort.masked_fill_(logits_sort < top_k_mask, NEG_INF)
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, NEG_INF)
    return logits.scatter(dim=-1, index=logits_idx, src=logits_sort)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_top_k_top_p_matches_vllm_formulation(device, backend):
    """Distinct logits, top_p halfway between two cumulative masses: the same survivors
    as vLLM's sort-based top-k then top-p."""
    g = torch.Generator().manual_seed(2)
    B, V = 6, 2049
    x = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]).float() * 0.004
    k = torch.tensor([V, 50, 3, 700, V, 1])
    top_p = torch.ones(B)
    for b in range(B):   # midway between consecutive cumulative masses of the kept set
        kept = torch.topk(x[b], int(k[b])).values
        cum = torch.softmax(kept, 0).cumsum(0)
        j = int(torch.randint(0, len(cum), (1,), generator=g))
        if j + 1 < len(cum):
            top_p[b] = (cum[j] + cum[j + 1]) / 2
    want = _vllm_top_k_top_p(x.clone(), k, top_p)
    with mk.use_backend(backend):
        got = mk.ops.top_k_top_p_mask_logits(x.to(device), k.to(device), top_p.to(device))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_min_p_keeps_probability_ratio(device, backend):
    """min_p midway between two probability ratios (far from rounding): exactly the tokens
    with probability >= min_p * max probability stay."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1000, generator=g) * 2
    probs = torch.softmax(x, 1)
    ratio = probs / probs.amax(1, keepdim=True)
    srt = ratio.sort(1, descending=True).values
    min_p = torch.tensor([0.0, (srt[1, 10] + srt[1, 11]) / 2, (srt[2, 200] + srt[2, 201]) / 2,
                          1.0])
    with mk.use_backend(backend):
        got = mk.ops.top_k_top_p_mask_logits(x.to(device), min_p=min_p.to(device))
    assert torch.equal(got.cpu() != NEG_INF, ratio >= min_p[:, None])
    assert [int(n) for n in (got != NEG_INF).sum(1)] == [1000, 11, 201, 1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalars_ties_and_degenerate_rows(device, backend, dtype):
    """One number for every row; a tie at the k-th value keeps every tied token; a row of
    -inf stays -inf; top_p = 0 keeps only the largest logit (with its ties)."""
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, NEG_INF, 0.0],
                      [NEG_INF] * 7,
                      [5.0, 5.0, 1.0, 0.0, -1.0, -2.0, -3.0]], device=device, dtype=dtype)
    with mk.use_backend(backend):
        k2 = mk.ops.top_k_top_p_mask_logits(x, top_k=2)
        p0 = mk.ops.top_k_top_p_mask_logits(x, top_p=0.0)
        none = mk.ops.top_k_top_p_mask_logits(x, top_k=0, top_p=1.0, min_p=0.0)
        kt = mk.ops.top_k_top_p_mask_logits(x, top_k=torch.tensor([2, 2, 2], device=device),
                                            top_p=torch.full((3,), 0.99, device=device))
    keep = lambda t: (t.cpu() != NEG_INF).tolist()  # noqa: E731
    assert keep(k2) == [[False, True, True, True, True, False, False], [False] * 7,
                        [True, True] + [False] * 5]
    assert keep(p0) == [[False, True] + [False] * 5, [False] * 7, [True, True] + [False] * 5]
    assert torch.equal(none.cpu(), x.cpu())
    assert keep(kt)[2] == [True, True] + [False] * 5


def test_empty_and_strided_parameter_views(device):
    for shape in ((0, 10), (3, 0)):
        x = torch.randn(shape, device=device)
        with mk.use_backend("triton"):
            out = mk.ops.top_k_top_p_mask_logits(x, top_k=torch.ones(shape[0], dtype=torch.int64,
                                                                      device=device))
        assert out.shape == x.shape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2000, generator=g)
    k = torch.randint(1, 300, (8,), generator=g)[::2]
    p = torch.rand(3, 4, generator=g)[:, 1]                 # strided views
    p = torch.cat([p, torch.tensor([0.5])])[:4]
    mp = (torch.rand(8, generator=g) * 0.1)[1::2]
    with mk.use_backend("triton"):
        got = mk.ops.top_k_top_p_mask_logits(x.to(device), k.to(device), p.to(device),
                                             mp.to(device))
    check_mask(got.cpu(), x, k, p, mp)


def test_bad_inputs():
    x = torch.randn(3, 10)
    f = mk.ops.top_k_top_p_mask_logits
    with pytest.raises(TypeError, match="logits must have dtype"):
        f(x.int(), top_k=2)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        f(torch.randn(10), top_k=2)
    with pytest.raises(ValueError, match=r"top_k must have shape \[3\]"):
        f(x, top_k=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="top_k must have dtype"):
        f(x, top_k=torch.ones(3))
    with pytest.raises(TypeError, match="top_k must be None, an int or a tensor"):
        f(x, top_k=2.5)
    with pytest.raises(ValueError, match=r"top_p must be in \[0.0, 1.0\]"):
        f(x, top_p=1.5)
    with pytest.raises(ValueError, match=r"min_p must be in \[0.0, 1.0\]"):
        f(x, min_p=float("nan"))
    with pytest.raises(ValueError, match=r"top_p values must be in \[0.0, 1.0\]"):
        f(x, top_p=torch.tensor([0.5, 2.0, 0.1]))
    with pytest.raises(TypeError, match="min_p must be None, a number or a tensor"):
        f(x, min_p=True)


def test_opcheck_triton_and_compile_fullgraph(device):
    x = torch.randn(4, 300, device=device)
    args = (x, torch.tensor([3, 0, 300, 7], device=device), torch.rand(4, device=device),
            torch.rand(4, device=device) * 0.2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.top_k_top_p_mask_logits, args)

    def filt(logits: torch.Tensor) -> torch.Tensor:
        return mk.ops.top_k_top_p_mask_logits(logits / 0.7, top_k=20, top_p=0.9, min_p=0.01)
    compiled = torch.compile(filt, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    assert torch.equal(got, filt(x))
    assert ((got != NEG_INF).sum(1) <= 20).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_huge_top_k_means_all_tokens(device, backend):
    """A top_k beyond int32 (HTTP allows any int) is "all tokens", as a number or in an
    int64 tensor (never narrowed to a wrapped-around int32)."""
    x = torch.randn(2, 50, device=device)
    with mk.use_backend(backend):
        a = mk.ops.top_k_top_p_mask_logits(x, top_k=2**70)
        b = mk.ops.top_k_top_p_mask_logits(
            x, top_k=torch.tensor([2**40 + 3, 2**33], device=device))
    assert torch.equal(a, x) and torch.equal(b, x)
