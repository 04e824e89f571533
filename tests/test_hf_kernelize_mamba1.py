"""``kernelize(model)`` on transformers' Mamba-1 models (Mamba, FalconMamba, Jamba, Zamba):
their mixers' selective_scan_fn / selective_state_update / causal_conv1d_fn /
causal_conv1d_update are routed to minikernels.compat (ops.selective_scan and
ops.causal_conv1d really called); tiny random models give the same logits (fp32, 1e-4) and
the same greedy tokens (prefill, then decode steps through the cache's recurrent state);
unroute_recurrent restores transformers' own functions exactly."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk

transformers = pytest.importorskip("transformers")

ROUTED = ["causal_conv1d_fn", "causal_conv1d_update", "selective_scan_fn",
          "selective_state_update"]


def _tiny(kind: str):
    """A tiny random model and the names of its Mamba-1 mixers."""
    torch.manual_seed(0)
    small = dict(vocab_size=100, hidden_size=32)
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            **small, num_hidden_layers=2, state_size=4))
        return model.eval(), ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    if kind == "falcon_mamba":
        model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
            **small, num_hidden_layers=2, state_size=4))
        return model.eval(), ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    mamba = dict(mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)
    if kind == "jamba":     # layer 0 Mamba-1, layer 1 attention + experts
        model = transformers.JambaForCausalLM(transformers.JambaConfig(
            **small, **mamba, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
            num_experts_per_tok=1))
        return model.eval(), ["model.layers.0.mamba"]
    # zamba: per-head Mamba-1 scans (two heads), beside shared hybrid attention blocks
    model = transformers.ZambaForCausalLM(transformers.ZambaConfig(
        **small, **mamba, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, attention_head_dim=8, n_mamba_heads=2,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]))
    return model.eval(), ["model.layers.0.mamba", "model.layers.1.mamba_decoder.mamba",
                          "model.layers.2.mamba", "model.layers.3.mamba_decoder.mamba"]


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "jamba", "zamba"])
def test_kernelize_routes_mamba1(kind, monkeypatch) -> None:
    import minikernels.hf as mkhf
    from minikernels.hf.kernelize import unroute_recurrent

    model, mixers = _tiny(kind)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    calls = {"selective_scan": 0, "causal_conv1d": 0}
    for op in calls:
        orig = getattr(mk.ops, op)

        def counted(*a, _op=op, _orig=orig, **kw):
            calls[_op] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(mk.ops, op, counted)
    summary = mkhf.kernelize(model, rms_norm=False, mlp=False)
    assert summary.recurrent == {name: ROUTED for name in mixers}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
        assert all(calls.values()), calls                  # prefill ran on minikernels' ops
        prefill_calls = calls["selective_scan"]
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert calls["selective_scan"] > 2 * prefill_calls  # decode steps too
    assert torch.equal(tokens, ref_tokens)
    assert mkhf.kernelize(model, rms_norm=False, mlp=False).recurrent == summary.recurrent
    assert unroute_recurrent(model) == mixers
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    assert not any(calls.values())


def test_kernelize_mamba1_on_triton() -> None:
    """The routed Mamba mixer on the Triton kernels (interpreter on CPU, or the GPU):
    same logits and greedy tokens as transformers' fallbacks."""
    import minikernels.hf as mkhf

    model, _ = _tiny("mamba")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        mkhf.kernelize(model, rms_norm=False, mlp=False)
        with mk.use_backend("triton"):
            torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                               ref_tokens)
