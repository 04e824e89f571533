"""topk_softmax (the MoE router): the Triton kernel against the reference over random
shapes, dtypes, id dtypes and strided views; the reference against torch.softmax +
torch.topk (vLLM's own test formula) and a per-row argmax loop; ties to the lower expert
id; non-finite rows; poisoned outputs; fused_topk's vLLM tuple; errors; opcheck.

Expert ids are chosen on the exact logits, so kernel and reference must agree on them
exactly; weights are fp32 sums / exps in different orders, so they agree to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import _alloc, reference

NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")
WEIGHT_TOL = {"atol": 1e-6, "rtol": 1e-5}
LAYOUTS = ("contiguous", "column_slice", "transposed", "strided")


def run(backend: str, logits: torch.Tensor, topk: int, renormalize: bool = False,
        indices_type: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    with mk.use_backend(backend):
        return mk.ops.topk_softmax(logits, topk, renormalize, indices_type)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values as a view with strides of its own: a column slice of a wider tensor
    (row stride > E), a transposed [E, T] storage, or every other row and column."""
    t, e = x.shape
    if layout == "column_slice":
        wide = torch.randn(t, e + 5, device=x.device).to(x.dtype)
        view = wide[:, 2:2 + e]
    elif layout == "transposed":
        view = torch.empty(e, t, dtype=x.dtype, device=x.device).t()
    elif layout == "strided":
        view = torch.empty(2 * t, 2 * e, dtype=x.dtype, device=x.device)[::2, ::2]
    else:
        return x
    view.copy_(x)
    return view


def greedy_ids(choice: list[float], topk: int) -> list[int]:
    """k rounds of "the largest choice, lowest id first", in Python."""
    left = list(range(len(choice)))
    chosen = []
    for _ in range(topk):
        best = max(left, key=lambda i: (choice[i], -i))
        chosen.append(best)
        left.remove(best)
    return chosen


def argmax_loop(logits: torch.Tensor, topk: int, renormalize: bool) -> tuple[list, list]:
    """Independent spec for finite rows: the greedy choice on the logits, weights from a
    float64 softmax."""
    ids, weights = [], []
    for row in logits.double().tolist():
        p = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
        chosen = greedy_ids(row, topk)
        w = [p[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        weights.append(w)
    return ids, weights


def check_routes(weights: torch.Tensor, ids: torch.Tensor, rows: int, topk: int,
                 ids_dtype: torch.dtype = torch.int32) -> None:
    assert weights.shape == ids.shape == (rows, topk)
    assert weights.dtype == torch.float32 and ids.dtype == ids_dtype
    assert weights.is_contiguous() and ids.is_contiguous()
    assert torch.isfinite(weights).all(), "non-finite weight (unwritten element?)"
    assert not (ids == -1515870811).any(), "poison sentinel in ids (unwritten element?)"


# ------------------------------------------------------------------ the reference itself

def test_reference_matches_torch_topk_and_argmax_loop():
    g = torch.Generator().manual_seed(0)
    for t, e, k in ((7, 8, 2), (5, 60, 4), (4, 128, 8), (3, 300, 8)):
        x = torch.randperm(t * e, generator=g).view(t, e).float() / (t * e) * 12 - 6  # no ties
        for renorm in (False, True):
            w, ids = reference.topk_softmax(x, k, renorm)
            # vLLM's tests/kernels/moe/test_fused_topk.py formula
            tw, tids = torch.topk(torch.softmax(x.float(), dim=-1), k, dim=-1)
            if renorm:
                tw = tw / tw.sum(dim=-1, keepdim=True)
            assert torch.equal(ids, tids.to(torch.int32))
            torch.testing.assert_close(w, tw, **WEIGHT_TOL)
            loop_ids, loop_w = argmax_loop(x, k, renorm)
            assert ids.tolist() == loop_ids
            torch.testing.assert_close(w.double(), torch.tensor(loop_w, dtype=torch.float64),
                                       **WEIGHT_TOL)


def test_reference_ties_follow_the_argmax_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (20, 13), generator=g).float()      # many equal logits
    for k in (1, 4, 13):
        w, ids = reference.topk_softmax(x, k, True)
        loop_ids, loop_w = argmax_loop(x, k, True)
        assert ids.tolist() == loop_ids
        torch.testing.assert_close(w.double(), torch.tensor(loop_w, dtype=torch.float64),
                                   **WEIGHT_TOL)


# ------------------------------------------------------------------ kernel vs reference

@given(data=st.data())
def test_triton_matches_reference(device, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    t = data.draw(st.sampled_from([0, 1, 3, 16, 17, 64, 200]))
    e = data.draw(st.sampled_from([1, 2, 7, 8, 60, 64, 100, 128, 257, 300]))
    k = data.draw(st.integers(1, min(e, 8)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    renorm = data.draw(st.booleans())
    ids_type = data.draw(st.sampled_from([None, torch.int32, torch.int64]))
    layout = data.draw(st.sampled_from(LAYOUTS))
    values = data.draw(st.sampled_from(["randn", "ties", "neg_inf"]))
    if values == "ties":      # few distinct values: ties decided by the expert id
        x = torch.randint(-3, 3, (t, e), generator=g).float()
    else:
        x = torch.randn(t, e, generator=g) * 4
        if values == "neg_inf":   # masked experts (probability 0), never a whole row
            x[torch.rand(t, e, generator=g) < 0.3] = NEG_INF
            x[:, 0] = 0.5
    x = laid_out(x.to(dtype).to(device), layout)
    w, ids = run("triton", x, k, renorm, ids_type)
    want_w, want_ids = reference.topk_softmax(x, k, renorm, ids_type or torch.int32)
    check_routes(w, ids, t, k, ids_type or torch.int32)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, **WEIGHT_TOL)


@pytest.mark.parametrize(("e", "k"), [(8, 2), (60, 4), (64, 8), (128, 8), (512, 10),
                                      (4096, 8)])
@pytest.mark.parametrize("renorm", [False, True])
def test_triton_matches_torch_softmax_topk(device, e, k, renorm):
    """Tie-free logits of the router sizes of Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE and
    beyond, against torch.softmax + torch.topk (+ renormalization)."""
    g = torch.Generator().manual_seed(e + k)
    t = 5 if e > 512 else 19
    x = (torch.randperm(t * e, generator=g).view(t, e).float() / (t * e) * 16 - 8).to(device)
    w, ids = run("triton", x, k, renorm)
    tw, tids = torch.topk(torch.softmax(x, dim=-1), k, dim=-1)
    if renorm:
        tw = tw / tw.sum(dim=-1, keepdim=True)
    check_routes(w, ids, t, k)
    assert torch.equal(ids, tids.to(torch.int32))
    torch.testing.assert_close(w, tw, **WEIGHT_TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ties_go_to_the_lower_expert_id(backend, device):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0],
                      [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                      [-0.0, 0.0, -1.0, 0.0, -0.0, -2.0],     # -0.0 == 0.0
                      [NEG_INF, 1.0, NEG_INF, 1.0, NEG_INF, 0.0]], device=device)
    w, ids = run(backend, x, 4)
    assert ids.tolist() == [[1, 2, 4, 5], [0, 1, 2, 3], [0, 1, 3, 4], [1, 3, 5, 0]]
    assert w[3, 3].item() == 0.0                               # a -inf expert: weight 0
    for dtype in (torch.float16, torch.bfloat16):
        _, ids_h = run(backend, x.to(dtype), 4)
        assert torch.equal(ids_h, ids)
    # bf16 logits that differ in fp32 but round to the same bf16 value tie as well
    close = torch.tensor([[1.0, 1.001, 1.002, 0.0]], device=device).to(torch.bfloat16)
    assert run(backend, close, 2)[1].tolist() == [[0, 1]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("renorm", [False, True])
def test_non_finite_rows_route_to_the_first_experts_with_weight_zero(backend, device, renorm):
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)).to(device)
    x[1, 5] = NAN
    x[2] = NAN
    x[3, 7] = POS_INF
    x[4] = NEG_INF
    w, ids = run(backend, x, 3, renorm)
    check_routes(w, ids, 6, 3)
    for row in (1, 2, 3, 4):
        assert ids[row].tolist() == [0, 1, 2] and w[row].tolist() == [0.0, 0.0, 0.0]
    for row in (0, 5):                        # finite rows are routed as usual
        want_w, want_ids = reference.topk_softmax(x[row:row + 1], 3, renorm)
        assert torch.equal(ids[row:row + 1], want_ids)
        torch.testing.assert_close(w[row:row + 1], want_w, **WEIGHT_TOL)


def test_outputs_are_poisoned_then_fully_written(device):
    """conftest poisons kernel outputs (NaN weights, 0xA5A5A5A5 ids): a row block or a
    k slot the kernel skipped would show here (17 rows: a partial row block; k = 3: not a
    power of two)."""
    assert _alloc.poison_enabled()
    x = torch.randn(17, 60, generator=torch.Generator().manual_seed(4)).to(device)
    for ids_type in (torch.int32, torch.int64):
        w, ids = run("triton", x, 3, True, ids_type)
        check_routes(w, ids, 17, 3, ids_type)
        assert ((ids >= 0) & (ids < 60)).all()
        torch.testing.assert_close(w.sum(1), torch.ones(17, device=device), **WEIGHT_TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_and_single_expert(backend, device):
    w, ids = run(backend, torch.empty(0, 8, device=device), 2, True)
    check_routes(w, ids, 0, 2)
    w, ids = run(backend, torch.randn(3, 1, device=device).half(), 1)
    assert ids.tolist() == [[0]] * 3 and w.tolist() == [[1.0]] * 3


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_topk_returns_vllms_tuple(backend, device):
    t, e, k = 5, 16, 3
    hidden = torch.randn(t, 32, device=device)
    x = torch.randn(t, e, device=device)
    with mk.use_backend(backend):
        w, ids, token_expert = mk.ops.fused_topk(hidden, x, k, True, torch.int64)
    want_w, want_ids = reference.topk_softmax(x, k, True, torch.int64)
    assert torch.equal(ids, want_ids) and ids.dtype == torch.int64
    torch.testing.assert_close(w, want_w, **WEIGHT_TOL)
    assert token_expert.dtype == torch.int32
    assert token_expert.tolist() == [[j * t + i for j in range(k)] for i in range(t)]


# ------------------------------------------------------------------ errors and opcheck

def test_errors(device):
    x = torch.randn(4, 8, device=device)
    f = mk.ops.topk_softmax
    with pytest.raises(ValueError, match=r"topk must be in \[1, num_experts = 8\], got 9"):
        f(x, 9)
    with pytest.raises(ValueError, match="topk must be in"):
        f(x, 0)
    with pytest.raises(TypeError, match="topk must be an int"):
        f(x, True)
    with pytest.raises(TypeError, match="topk must be an int"):
        f(x, 2.0)
    with pytest.raises(TypeError, match="gating_output must have dtype"):
        f(x.double(), 2)
    with pytest.raises(TypeError, match="gating_output must have dtype"):
        f(x.long(), 2)
    with pytest.raises(ValueError, match="gating_output must be 2-D"):
        f(x[0], 2)
    with pytest.raises(ValueError, match="gating_output must be 2-D"):
        f(x[None], 2)
    with pytest.raises(ValueError, match="gating_output must have 1..4096 experts"):
        f(x[:, :0], 1)
    with pytest.raises(ValueError, match="gating_output must have 1..4096 experts"):
        f(torch.zeros(1, 4097, device=device), 1)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        f(x, 2, 1)
    with pytest.raises(TypeError, match="indices_type must be None, torch.int32 or"):
        f(x, 2, False, torch.int16)
    with pytest.raises(TypeError, match="gating_output must be a torch.Tensor"):
        f(x.tolist(), 2)
    with pytest.raises(ValueError, match="hidden_states has 3 tokens but gating_output"):
        mk.ops.fused_topk(torch.zeros(3, 2, device=device), x, 2, False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, device):
    x = torch.randn(5, 12, device=device).to(torch.bfloat16)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.topk_softmax, (x, 3, True, torch.int32))
        torch.library.opcheck(torch.ops.minikernels.topk_softmax,
                              (x.float().t().contiguous().t(), 2, False, torch.int64))


# ------------------------------------------------------------------ the sigmoid router

def sigmoid_loop(logits: torch.Tensor, topk: int, renormalize: bool, bias, eps: float):
    """Independent spec: k rounds of "the largest choice, lowest id first" in Python, the
    choice float64 sigmoid + bias (or the logit), weights the float64 sigmoid."""
    ids, weights = [], []
    b = bias.double().tolist() if bias is not None else None
    for row in logits.double().tolist():
        s = torch.sigmoid(torch.tensor(row, dtype=torch.float64)).tolist()
        choice = row if b is None else [si + bi for si, bi in zip(s, b)]
        chosen = greedy_ids(choice, topk)
        w = [s[i] for i in chosen]
        if renormalize:
            w = [v / (sum(w) + eps) for v in w]
        ids.append(chosen)
        weights.append(w)
    return ids, weights


@given(data=st.data())
def test_sigmoid_router_matches_reference_and_a_loop(device, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    t = data.draw(st.sampled_from([0, 1, 3, 17, 64]))
    e = data.draw(st.sampled_from([1, 7, 32, 64, 100, 256]))
    k = data.draw(st.integers(1, min(e, 8)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    renorm = data.draw(st.booleans())
    eps = data.draw(st.sampled_from([0.0, 1e-6]))
    bias_dtype = data.draw(st.sampled_from([None, torch.float32, torch.bfloat16]))
    layout = data.draw(st.sampled_from(LAYOUTS))
    x = laid_out((torch.randn(t, e, generator=g) * 3).to(dtype).to(device), layout)
    bias = None if bias_dtype is None else \
        (torch.randn(e, generator=g) * 0.5).to(bias_dtype).to(device)
    with mk.use_backend("triton"):
        w, ids = mk.ops.topk_sigmoid(x, k, renorm, bias, eps)
    check_routes(w, ids, t, k)
    want_w, want_ids = reference.topk_sigmoid(x, k, renorm, bias, eps)
    assert torch.equal(ids, want_ids)          # random logits: no near-ties
    torch.testing.assert_close(w, want_w, **WEIGHT_TOL)
    loop_ids, loop_w = sigmoid_loop(x.cpu(), k, renorm, None if bias is None else bias.cpu(),
                                    eps)
    assert ids.tolist() == loop_ids
    torch.testing.assert_close(w.cpu().double(), torch.tensor(loop_w, dtype=torch.float64
                                                              ).reshape(t, k), **WEIGHT_TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sigmoid_router_bias_only_chooses_ties_and_bad_rows(backend, device):
    """The bias picks experts whose sigmoid is lower, but their weights stay unbiased;
    equal logits go to the lower expert id; a NaN / +inf row routes to 0..k-1 at 0."""
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0],            # bias flips the order
                      [0.5, 0.5, 0.5, 0.5],             # ties
                      [NAN, 1.0, 2.0, 3.0],
                      [0.0, POS_INF, 1.0, 2.0],
                      [NEG_INF, NEG_INF, 1.0, NEG_INF]], device=device)
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0], device=device)
    with mk.use_backend(backend):
        w, ids = mk.ops.topk_sigmoid(x, 2, False, bias)
        w0, ids0 = mk.ops.topk_sigmoid(x[1:2], 3, True)
    assert ids.tolist() == [[3, 0], [3, 0], [0, 1], [0, 1], [3, 2]]
    s = torch.sigmoid(torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(w[0].cpu(), s, **WEIGHT_TOL)        # unbiased weights
    assert (w[2:4] == 0).all() and w[4, 1] > 0.7
    assert ids0.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(w0.cpu(), torch.full((1, 3), 1 / 3), **WEIGHT_TOL)


def test_sigmoid_router_errors_and_opcheck(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="correction_bias must have one value per expert"):
        mk.ops.topk_sigmoid(x, 2, correction_bias=torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="renorm_eps must be a finite number >= 0"):
        mk.ops.topk_sigmoid(x, 2, True, renorm_eps=-1.0)
    with pytest.raises(ValueError, match="topk must be in"):
        mk.ops.topk_sigmoid(x, 9)
    for backend in ("reference", "triton"):
        with mk.use_backend(backend):
            torch.library.opcheck(torch.ops.minikernels.topk_sigmoid,
                                  (x, 3, True, torch.randn(8, device=device), 1e-6, 4, 2,
                                   torch.int32))


def nemotron_formula(logits, bias, topk, groups, topk_groups, renorm, eps):
    """Group-limited sigmoid routing as transformers' NemotronH / DeepSeek-V3 routers write
    it (torch.topk throughout; random inputs have no ties)."""
    scores = torch.sigmoid(logits.double())
    choice = scores + bias.double()
    t, e = choice.shape
    per = choice.view(t, groups, e // groups)
    group_scores = per.topk(min(2, e // groups), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(e // groups, dim=1), float("-inf"))
    ids = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights, ids


@given(data=st.data())
def test_grouped_sigmoid_router(device, data):
    """Group-limited routing (num_groups / topk_groups): kernel == reference, and with a
    bias both == the NemotronH / DeepSeek-V3 formula; without a bias a group's score is
    its best expert (vLLM's grouped_topk)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    groups, topk_groups, per_group = data.draw(st.sampled_from(
        [(2, 1, 2), (4, 2, 16), (8, 4, 32), (8, 3, 5), (3, 1, 1)]))
    e = groups * per_group
    k = data.draw(st.integers(1, min(8, topk_groups * per_group)))
    t = data.draw(st.sampled_from([1, 5, 33]))
    renorm = data.draw(st.booleans())
    use_bias = data.draw(st.booleans())
    x = (torch.randn(t, e, generator=g) * 2).to(device)
    bias = (torch.randn(e, generator=g) * 0.3).to(device) if use_bias else None
    with mk.use_backend("triton"):
        w, ids = mk.ops.topk_sigmoid(x, k, renorm, bias, 1e-20, num_groups=groups,
                                     topk_groups=topk_groups)
    check_routes(w, ids, t, k)
    want_w, want_ids = reference.topk_sigmoid(x, k, renorm, bias, 1e-20, groups, topk_groups)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, **WEIGHT_TOL)
    if use_bias:
        f_w, f_ids = nemotron_formula(x.cpu(), bias.cpu(), k, groups, topk_groups, renorm,
                                      1e-20)
        assert torch.equal(ids.cpu().long(), f_ids)
        torch.testing.assert_close(w.cpu().double(), f_w, **WEIGHT_TOL)
    else:   # the chosen experts all sit in the topk_groups groups of the best maxima
        best = x.cpu().view(t, groups, per_group).amax(-1).topk(topk_groups, -1).indices
        assert all(set((ids.cpu()[r] // per_group).tolist()) <= set(best[r].tolist())
                   for r in range(t))


def test_grouped_routing_errors(device):
    x = torch.randn(2, 12, device=device)
    with pytest.raises(ValueError, match="num_groups must be an int in"):
        mk.ops.topk_sigmoid(x, 2, num_groups=5)
    with pytest.raises(ValueError, match="topk_groups must be an int in"):
        mk.ops.topk_sigmoid(x, 2, num_groups=4, topk_groups=5)
    with pytest.raises(ValueError, match="topk .7. must be at most topk_groups"):
        mk.ops.topk_sigmoid(x, 7, num_groups=4, topk_groups=2)
