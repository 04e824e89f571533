"""Non-gated experts in the model's expert module (``FusedExperts(gated=False)``: Nemotron
3's squared-ReLU experts, y = down(relu(up(x))^2)): w13 [E, I, H] holds up_proj alone, the
parts are up_proj / down_proj (gate_proj refused by name), and the forward passes
``gated=False`` and the activation to the fused MoE ops. Dense experts and RTN int4 / fp8
/ int8 ones (quantize_*_part_, and the checkpoint writers set_*_part_) against a
plain-torch computation written here (on the dequantized weights for the quantized
ones), both backends; gated experts keep their three parts; bad arguments by name."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.models.moe import EXPERT_PARTS, NONGATED_EXPERT_PARTS, FusedExperts

BACKENDS = ["reference", "triton"]
E, H, I, K = 4, 32, 24, 2            # I = 24: an fp8 row block of 16 does not divide it


def _weights(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert up_proj [E, I, H] and down_proj [E, H, I] (nn.Linear layouts)."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(E, I, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, I, generator=g) / I ** 0.5
    return up.to(dtype), down.to(dtype)


def _routing(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g) * 2
    weights = torch.rand(t, K, generator=g) + 0.1
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).int()
    return x, weights, ids


def _by_hand(x, weights, ids, up, down, act="relu2"):
    """The experts in fp32 torch, one (token, expert) at a time: sum_j w[t, j] *
    down[e] @ act(up[e] @ x[t]); act relu2 = relu(u)^2 (or SiLU)."""
    def f(u):
        return torch.relu(u) ** 2 if act == "relu2" else torch.nn.functional.silu(u)

    xf, up, down = x.float(), up.float(), down.float()
    out = torch.zeros_like(xf)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            out[t] += weights[t, j] * (down[e] @ f(up[e] @ xf[t]))
    return out


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_parts_and_shapes():
    """Non-gated: w13 [E, I, H], parts up_proj / down_proj (w13[e] / w2[e]); gate_proj is
    refused by name by every writer; gated experts keep gate / up / down."""
    ex = FusedExperts(E, H, I, torch.float32, "cpu", activation="relu2", gated=False)
    assert ex.gated is False and ex.activation == "relu2"
    assert ex.w13.shape == (E, I, H) and ex.w2.shape == (E, H, I)
    assert ex.parts == NONGATED_EXPERT_PARTS == ("up_proj", "down_proj")
    assert ex.part_shape("up_proj") == (I, H) and ex.part_shape("down_proj") == (H, I)
    assert ex.part(1, "up_proj").data_ptr() == ex.w13[1].data_ptr()
    assert ex.part(2, "down_proj").data_ptr() == ex.w2[2].data_ptr()
    match = r"'gate_proj' is not a projection of these non-gated \(gated=False\) experts"
    for call in (lambda: ex.part(0, "gate_proj"), lambda: ex.part_shape("gate_proj")):
        with pytest.raises(ValueError, match=match):
            call()
    q = FusedExperts(E, H, I, torch.float16, "cpu", dense=False, activation="relu2",
                     gated=False)
    w = torch.randn(I, H).half()
    for call in (lambda: q.quantize_part_(0, "gate_proj", w, 8),
                 lambda: q.quantize_fp8_part_(0, "gate_proj", w, (16, 16)),
                 lambda: q.quantize_int8_part_(0, "gate_proj", w)):
        with pytest.raises(ValueError, match=match):
            call()
    gated = FusedExperts(E, H, I, torch.float32, "cpu")
    assert gated.gated and gated.parts == EXPERT_PARTS and gated.w13.shape == (E, 2 * I, H)
    assert gated.part(1, "up_proj").data_ptr() == gated.w13[1, I:].data_ptr()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"activation must be one of .* for gated experts, "
                                         r"got 'relu2'"):
        FusedExperts(E, H, I, torch.float32, "cpu", activation="relu2")
    with pytest.raises(ValueError, match=r"non-gated \(gated=False\) experts, got 'relu'"):
        FusedExperts(E, H, I, torch.float32, "cpu", activation="relu", gated=False)
    with pytest.raises(TypeError, match="gated must be a bool"):
        FusedExperts(E, H, I, torch.float32, "cpu", activation="relu2", gated=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_dense_experts(act, backend):
    """Dense non-gated experts filled part by part: the forward equals the plain-torch
    experts (fp32: 1e-5), relu2 far from SiLU."""
    up, down = _weights(1, torch.float32)
    ex = FusedExperts(E, H, I, torch.float32, "cpu", activation=act, gated=False)
    with torch.no_grad():
        for e in range(E):
            ex.part(e, "up_proj").copy_(up[e])
            ex.part(e, "down_proj").copy_(down[e])
    x, weights, ids = _routing(9, 2)
    with mk.use_backend(backend):
        y = ex(x, weights, ids)
    assert _rel(y, _by_hand(x, weights, ids, up, down, act)) <= 1e-5
    other = "silu" if act == "relu2" else "relu2"
    assert _rel(y, _by_hand(x, weights, ids, up, down, other)) > 1e-2
    w13, w2 = ex.dequantized()
    assert torch.equal(w13, up) and torch.equal(w2, down)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int4", "fp8", "int8"])
def test_rtn_quantized_experts(kind, backend):
    """RTN int4 (groups of 8) / fp8 (16 x 16 blocks: 16 does not divide I = 24, kept for
    non-gated experts) / int8 non-gated experts: buffers of I up rows; the forward equals
    the plain-torch relu2 experts on their dequantized weights (fp16: 5e-3) and is near
    the dense experts' (the RTN error)."""
    up, down = _weights(3, torch.float16)
    ex = FusedExperts(E, H, I, torch.float16, "cpu", dense=False, activation="relu2",
                      gated=False)
    for e in range(E):
        for name, w in (("up_proj", up[e]), ("down_proj", down[e])):
            if kind == "int4":
                ex.quantize_part_(e, name, w, 8)
            elif kind == "fp8":
                ex.quantize_fp8_part_(e, name, w, (16, 16))
            else:
                ex.quantize_int8_part_(e, name, w)
    if kind == "int4":
        assert ex.is_int4 and ex.w13_qweight.shape == (E, I, H // 8)
        assert ex.w13_scales.shape == (E, I, H // 8)
    elif kind == "fp8":
        assert ex.fp8_block == (16, 16) and ex.w13_fp8.shape == (E, I, H)
        assert ex.w13_scale.shape == (E, 2, 2) and ex.w2_scale.shape == (E, 2, 2)
    else:
        assert ex.is_int8 and ex.w13_int8.shape == (E, I, H)
        assert ex.w13_int8_scale.shape == (E, I)
    w13, w2 = ex.dequantized()
    assert w13.shape == (E, I, H) and w2.shape == (E, H, I)
    assert _rel(w13, up) < 0.1 and _rel(w2, down) < 0.1
    x, weights, ids = _routing(7, 4)
    x = x.half()
    with mk.use_backend(backend):
        y = ex(x, weights, ids)
    assert y.dtype == torch.float16
    assert _rel(y, _by_hand(x, weights, ids, w13, w2)) <= 5e-3
    assert _rel(y, _by_hand(x, weights, ids, up, down)) <= 0.15
    assert _rel(y, _by_hand(x, weights, ids, w13, w2, "silu")) > 2e-2


def test_checkpoint_writers():
    """The checkpoint paths (set_int4_part_ / set_fp8_part_ / set_int8_part_) write the up
    rows to all of w13 and the down rows to w2: dequantized() gives each part's own
    dequantized weight back."""
    from minikernels.quant import quantize_int4
    from minikernels.quant.fp8 import quantize_fp8
    from minikernels.quant.int8 import quantize_int8

    up, down = _weights(5, torch.float16)
    writers = {
        "int4": (lambda ex, e, n, w: ex.set_int4_part_(e, n, quantize_int4(w, 8), 8),
                 lambda w: quantize_int4(w, 8).dequantize().float()),
        "fp8": (lambda ex, e, n, w: ex.set_fp8_part_(e, n, quantize_fp8(w, (16, 16)),
                                                     (16, 16)),
                lambda w: quantize_fp8(w, (16, 16)).dequantize().float()),
        "int8": (lambda ex, e, n, w: ex.set_int8_part_(e, n, quantize_int8(w)),
                 lambda w: quantize_int8(w).dequantize().float())}
    for kind, (write, deq) in writers.items():
        ex = FusedExperts(E, H, I, torch.float16, "cpu", dense=False, activation="relu2",
                          gated=False)
        for e in range(E):
            write(ex, e, "up_proj", up[e])
            write(ex, e, "down_proj", down[e])
        w13, w2 = ex.dequantized()
        for e in range(E):
            torch.testing.assert_close(w13[e], deq(up[e]), rtol=1e-3, atol=1e-3,
                                       msg=kind)
            torch.testing.assert_close(w2[e], deq(down[e]), rtol=1e-3, atol=1e-3, msg=kind)
        with pytest.raises(ValueError, match="'gate_proj' is not a projection"):
            write(ex, 0, "gate_proj", up[0])


def test_loader_expert_branch():
    """The loader's expert branch for non-gated experts: per-expert up_proj / down_proj
    (the hub's names) and transformers 5's stacked experts.up_proj [E, I, H]
    (NemotronHExperts) map to the experts module and load into w13 / w2; gate_proj /
    gate_up_proj, and a stacked up_proj of 2I rows, are CheckpointErrors naming them."""
    from minikernels.models.loader import CheckpointError, _load_experts, map_name

    assert map_name("layers.3.mlp.experts.up_proj") == ("layers.3.mlp.experts", None,
                                                        "up_proj")
    assert map_name("layers.3.mlp.experts.2.up_proj.weight") == ("layers.3.mlp.experts", 2,
                                                                  "up_proj")
    up, down = _weights(6, torch.float32)
    ex = FusedExperts(E, H, I, torch.float32, "cpu", activation="relu2", gated=False)
    keys = _load_experts(ex, "m", None, "up_proj", up, "w")
    assert keys == [("m", e, "up_proj") for e in range(E)]
    for e in range(E):
        assert _load_experts(ex, "m", e, "down_proj", down[e], "w") == [("m", e, "down_proj")]
    assert torch.equal(ex.w13, up) and torch.equal(ex.w2, down)
    for expert, kind, tensor in ((None, "gate_up_proj", torch.zeros(E, 2 * I, H)),
                                 (0, "gate_proj", up[0])):
        with pytest.raises(CheckpointError, match=rf"hold up_proj / down_proj \(non-gated\), "
                                                  rf"not {kind}"):
            _load_experts(ex, "m", expert, kind, tensor, "w")
    with pytest.raises(CheckpointError, match=r"shape mismatch: expected \[4, 24, 32\]"):
        _load_experts(ex, "m", None, "up_proj", torch.zeros(E, 2 * I, H), "w")
