"""rejection_sample (speculative decoding): the reference against a per-row Python loop
of the algorithm, the Triton kernel (interpreter on CPU) against the reference, greedy
semantics, and a chi-square test that the emitted tokens follow the target distribution
(with draft probabilities and with n-gram point masses)."""
from __future__ import annotations

import math

import pytest
import torch

import minikernels as mk
from minikernels.ops import reference


def _inputs(B, K, V, g, has_draft=True, greedy_frac=0.3, peaked=False):
    scale = 3.0 if peaked else 1.0
    target = torch.softmax(torch.randn(B, K + 1, V, generator=g) * scale, dim=-1)
    draft_p = torch.softmax(torch.randn(B, K, V, generator=g) * scale, dim=-1) \
        if has_draft else None
    if has_draft:
        draft = torch.multinomial(draft_p.reshape(-1, V), 1, generator=g).reshape(B, K)
    else:
        draft = torch.randint(0, V, (B, K), generator=g)
    n = torch.randint(0, K + 1, (B,), generator=g)
    u = torch.rand(B, K, generator=g)
    q = torch.empty(B, V).exponential_(generator=g)
    greedy = torch.rand(B, generator=g) < greedy_frac
    return draft, n, target, draft_p, u, q, greedy


def _loop(draft, n, target, draft_p, u, q, greedy):
    """Independent spec: the algorithm row by row."""
    B, K = draft.shape
    V = target.shape[-1]
    out = torch.full((B, K + 1), -1, dtype=torch.int64)
    for b in range(B):
        j = 0
        while j < int(n[b]):
            x = int(draft[b, j])
            p = target[b, j]
            qd = draft_p[b, j] if draft_p is not None else torch.nn.functional.one_hot(
                torch.tensor(x), V).float()
            ok = x == int(p.argmax()) if greedy[b] else float(u[b, j]) * float(qd[x]) < float(p[x])
            if not ok:
                if greedy[b]:
                    out[b, j] = int(p.argmax())
                else:
                    r = (p - qd).clamp_min(0)
                    r = r if r.max() > 0 else p
                    out[b, j] = int((r / q[b]).argmax())
                break
            out[b, j] = x
            j += 1
        else:
            p = target[b, int(n[b])]
            out[b, int(n[b])] = int(p.argmax()) if greedy[b] else int((p / q[b]).argmax())
    return out


@pytest.mark.parametrize("has_draft", [True, False])
def test_reference_matches_loop(has_draft):
    g = torch.Generator().manual_seed(1)
    for B, K, V in ((1, 1, 5), (6, 3, 17), (9, 5, 40), (4, 0, 8)):
        args = _inputs(B, K, V, g, has_draft, peaked=True)
        assert torch.equal(reference.rejection_sample(*args), _loop(*args))


@pytest.mark.parametrize("has_draft", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 5), (5, 3, 33), (3, 4, 1500), (2, 0, 7)])
def test_triton_matches_reference(has_draft, shape):
    g = torch.Generator().manual_seed(sum(shape) + has_draft)
    B, K, V = shape
    for peaked in (False, True):
        args = _inputs(B, K, V, g, has_draft, greedy_frac=0.4, peaked=peaked)
        want = reference.rejection_sample(*args)
        with mk.use_backend("triton"):
            got = mk.ops.rejection_sample(*args)
        assert torch.equal(got, want), (got, want)


def test_greedy_longest_matching_prefix_and_bonus():
    V = 6
    target = torch.full((2, 4, V), -5.0)
    am = [[1, 2, 3, 4], [0, 5, 5, 5]]
    for b in range(2):
        for j in range(4):
            target[b, j, am[b][j]] = 5.0          # raw logits are fine for greedy rows
    draft = torch.tensor([[1, 2, 3], [0, 4, 5]])
    args = (draft, torch.tensor([3, 3]), target, None, torch.zeros(2, 3),
            torch.ones(2, V), torch.tensor([True, True]))
    want = torch.tensor([[1, 2, 3, 4], [0, 5, -1, -1]])
    assert torch.equal(reference.rejection_sample(*args), want)
    with mk.use_backend("triton"):
        assert torch.equal(mk.ops.rejection_sample(*args), want)


def test_bad_inputs_name_the_argument():
    g = torch.Generator().manual_seed(0)
    draft, n, target, dp, u, q, greedy = _inputs(2, 3, 8, g)
    with pytest.raises(ValueError, match="target_probs"):
        mk.ops.rejection_sample(draft, n, target[:, :3], dp, u, q, greedy)
    with pytest.raises(ValueError, match="draft_probs"):
        mk.ops.rejection_sample(draft, n, target, dp[:, :, :4], u, q, greedy)
    with pytest.raises((TypeError, ValueError), match="uniform"):
        mk.ops.rejection_sample(draft, n, target, dp, u.double(), q, greedy)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square goodness of fit (bins with expected >= 5)."""
    from scipy.stats import chi2

    total = counts.sum().item()
    exp = probs * total
    keep = exp >= 5
    stat = (((counts - exp) ** 2) / exp)[keep].sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("has_draft", [True, False])
def test_emitted_tokens_follow_the_target_distribution(has_draft):
    """Many trials of one (target, draft) pair: the first emitted token is distributed as
    p_0, and the second one (given the first draft was accepted) as p_1."""
    pytest.importorskip("scipy")
    V, K, N = 8, 2, 40000
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, dim=-1)
    qd = torch.softmax(torch.randn(K, V, generator=g) * 1.5, dim=-1)
    target = p.expand(N, K + 1, V).contiguous()
    if has_draft:
        draft = torch.multinomial(qd, N, replacement=True, generator=g).T.contiguous()
        draft_p = qd.expand(N, K, V).contiguous()
    else:   # n-gram: a fixed draft sequence (point masses)
        draft = p[:K].argmax(dim=1)[None].expand(N, K).contiguous()
        draft_p = None
    n = torch.full((N,), K)
    u = torch.rand(N, K, generator=g)
    q = torch.empty(N, V).exponential_(generator=g)
    out = mk.ops.rejection_sample(draft, n, target, draft_p, u, q,
                                  torch.zeros(N, dtype=torch.bool))
    first = torch.bincount(out[:, 0], minlength=V).float()
    assert _chi_square_p(first, p[0]) > 1e-4
    # Given token 0 was the accepted draft (token 0 = draft 0), token 1 ~ p_1.
    acc = out[:, 0] == draft[:, 0]
    second = torch.bincount(out[acc, 1], minlength=V).float()
    assert second.sum() > 1000 and _chi_square_p(second, p[1]) > 1e-4
    # Sanity: the test has power (a wrong distribution fails it).
    assert _chi_square_p(first, torch.full((V,), 1.0 / V)) < 1e-6
    # Accepted-all rows carry a bonus token from p_2, rows end with -1 after the last token.
    lens = (out >= 0).sum(dim=1)
    assert ((lens >= 1) & (lens <= K + 1)).all()
    full = lens == K + 1
    bonus = torch.bincount(out[full, K], minlength=V).float()
    assert _chi_square_p(bonus, p[K]) > 1e-4
    if not has_draft:   # acceptance rate of a point mass x is p(x)
        assert math.isclose(acc.float().mean().item(), p[0, draft[0, 0]].item(), abs_tol=0.01)


def test_kernel_statistics_on_a_small_batch():
    """The Triton kernel under the same law (fewer samples: the interpreter is slow)."""
    pytest.importorskip("scipy")
    V, K, N = 4, 1, 600
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(K + 1, V, generator=g), dim=-1)
    qd = torch.softmax(torch.randn(K, V, generator=g), dim=-1)
    draft = torch.multinomial(qd, N, replacement=True, generator=g).T.contiguous()
    args = (draft, torch.full((N,), K), p.expand(N, K + 1, V).contiguous(),
            qd.expand(N, K, V).contiguous(), torch.rand(N, K, generator=g),
            torch.empty(N, V).exponential_(generator=g), torch.zeros(N, dtype=torch.bool))
    with mk.use_backend("triton"):
        out = mk.ops.rejection_sample(*args)
    assert torch.equal(out, reference.rejection_sample(*args))
    assert _chi_square_p(torch.bincount(out[:, 0], minlength=V).float(), p[0]) > 1e-4
