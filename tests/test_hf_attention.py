"""attn_implementation="minikernels" against transformers' own SDPA on tiny random models
(Llama, Qwen2 / 3, Mistral, and GPT-2 / GPT-NeoX: biases, partial rope, learned positions).

Logits at every valid position equal SDPA's within fp32 tolerance for prefill and each
decode step (dynamic and static caches, left / right padded and holey batches, GQA, sliding
window layers); greedy generate is token-identical; fallbacks warn once and stay exact.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_model_support import make_hf_model

import minikernels.hf as mkhf
from minikernels.hf import attention as mk_attn

KINDS = ["llama", "qwen2-window", "qwen3", "mistral-window", "gpt2", "gpt_neox"]
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {k: make_hf_model(k) for k in KINDS}


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (b, s), generator=g)


def _masks(b: int, s: int) -> dict[str, torch.Tensor]:
    left = torch.ones(b, s, dtype=torch.long)
    left[0, :4] = 0
    left[1, :1] = 0
    right = torch.ones(b, s, dtype=torch.long)
    right[0, -3:] = 0
    holes = torch.ones(b, s, dtype=torch.long)
    holes[0, 2:4] = 0
    holes[1, 0] = 0
    holes[1, 5] = 0
    return dict(left=left, right=right, holes=holes)


@torch.no_grad()
def _logits(model: torch.nn.Module, impl: str, ids: torch.Tensor, mask: torch.Tensor | None,
            cache: object = None, steps: int = 0) -> list[torch.Tensor]:
    """Prefill, then ``steps`` greedy decode steps (one token each); logits of every step."""
    model.set_attn_implementation(impl)
    out = model(ids, attention_mask=mask, cache=cache, use_cache=cache is not None)
    res = [out.logits]
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(tok, attention_mask=mask, cache=cache, position_ids=pos, use_cache=True)
        res.append(out.logits)
        tok = out.logits[:, -1:].argmax(-1)
    return res


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor],
                 valid: torch.Tensor | None) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if i == 0 and valid is not None:
            a, b = a[valid.bool()], b[valid.bool()]
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL)


def test_registered() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["minikernels"] is mkhf.attention_forward
    assert AttentionMaskInterface._global_mapping["minikernels"] is mkhf.attention_mask


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_match_sdpa(models, kind: str) -> None:
    """Unpadded, left-padded (dynamic cache, 3 decode steps), right-padded and holey batches."""
    from transformers import DynamicCache

    model = models[kind]
    ids = _ids(3, 10)
    masks = _masks(3, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no fallback on these paths
        # no padding: the flash_attention_bshd path
        _assert_same(_logits(model, "minikernels", ids, None),
                     _logits(model, "sdpa", ids, None), None)
        # left padding with a dynamic cache: unpadded prefill + compacted decode
        want = _logits(model, "sdpa", ids, masks["left"], DynamicCache(config=model.config), 3)
        got = _logits(model, "minikernels", ids, masks["left"],
                      DynamicCache(config=model.config), 3)
        _assert_same(got, want, masks["left"])
        if kind == "llama":   # patterns without a sliding window: right padding and holes
            for name in ("right", "holes"):
                _assert_same(_logits(model, "minikernels", ids, masks[name]),
                             _logits(model, "sdpa", ids, masks[name]), masks[name])


@pytest.mark.parametrize("kind", ["llama", "qwen2-window"])
def test_static_cache_decode_matches_sdpa(models, kind: str) -> None:
    """A StaticCache (keys past the filled slots are zeros), left-padded, past the window."""
    from transformers import StaticCache

    model = models[kind]
    ids = _ids(2, 7, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    want = _logits(model, "sdpa", ids, mask, StaticCache(config=model.config, max_cache_len=16), 4)
    got = _logits(model, "minikernels", ids, mask,
                  StaticCache(config=model.config, max_cache_len=16), 4)
    _assert_same(got, want, mask)


def test_sliding_window_is_applied(models) -> None:
    """The window changes the answer here, so matching SDPA above proves it is applied."""
    model = models["mistral-window"]
    ids = _ids(1, 14, seed=2)
    with_window = _logits(model, "minikernels", ids, None)[0]
    model.config.sliding_window = None
    try:
        no_window = _logits(model, "sdpa", ids, None)[0]
    finally:
        model.config.sliding_window = 6
    assert (with_window - no_window)[:, 6:].abs().max() > 1e-3
    torch.testing.assert_close(with_window[:, :6], no_window[:, :6], **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_token_identical(models, kind: str) -> None:
    model = models[kind]
    ids = _ids(3, 9, seed=3)
    mask = _masks(3, 9)["left"]
    out = {}
    for impl in ("sdpa", "minikernels"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["sdpa"], out["minikernels"])
    if kind == "qwen2-window":   # and with a static cache
        static = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=0, cache_implementation="static")
        assert torch.equal(static, out["sdpa"])


def test_bf16_within_dtype_tolerance() -> None:
    """bf16 weights and activations: logits within bf16 tolerance of SDPA's (padded prefill
    and a decode step), greedy next tokens equal."""
    from transformers import DynamicCache

    model = make_hf_model("qwen2-window").to(torch.bfloat16)
    ids, mask = _ids(2, 10, seed=6), _masks(2, 10)["left"]
    want = _logits(model, "sdpa", ids, mask, DynamicCache(config=model.config), 1)
    got = _logits(model, "minikernels", ids, mask, DynamicCache(config=model.config), 1)
    for i, (a, b) in enumerate(zip(got, want)):
        if i == 0:
            a, b = a[mask.bool()], b[mask.bool()]
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 3e-2 * scale


def test_from_pretrained_attn_implementation(tmp_path) -> None:
    import transformers

    model = make_hf_model("qwen3")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="minikernels", dtype=torch.float32)
    assert loaded.config._attn_implementation == "minikernels"
    ids = _ids(2, 6)
    with torch.no_grad():
        got = loaded(ids).logits
        model.set_attn_implementation("sdpa")
        want = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)


def test_triton_backend_small_case(models) -> None:
    """One small left-padded prefill + decode with the Triton kernels (interpreter on CPU)."""
    from transformers import DynamicCache

    import minikernels as mk

    model = models["llama"]
    ids = _ids(2, 5, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    want = _logits(model, "sdpa", ids, mask, DynamicCache(config=model.config), 1)
    with mk.use_backend("triton"):
        got = _logits(model, "minikernels", ids, mask, DynamicCache(config=model.config), 1)
    _assert_same(got, want, mask)


# ------------------------------------------------------------------------ fallbacks


def _module(causal: bool = True) -> torch.nn.Module:
    m = torch.nn.Module()
    m.is_causal = causal
    m.num_key_value_groups = 2
    m.training = False
    return m


def _qkv(b=2, hq=4, hkv=2, sq=5, sk=5, d=16, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, dv or d, generator=g)
    return q, k, v


def _reference(q, k, v, allowed, scale, softcap=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(2, 3) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v).transpose(1, 2)


def test_fallbacks_warn_once_and_stay_exact(recwarn) -> None:
    mk_attn._warned.clear()
    q, k, v = _qkv()
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    want = _reference(q, k, v, causal, 0.25)
    # output_attentions: eager math, weights returned
    out, w = mkhf.attention_forward(_module(), q, k, v, None, scaling=0.25,
                                    output_attentions=True)
    torch.testing.assert_close(out, want, **TOL)
    assert w is not None and w.shape == (2, 4, 5, 5)
    mkhf.attention_forward(_module(), q, k, v, None, scaling=0.25, output_attentions=True)
    msgs = [str(r.message) for r in recwarn if "minikernels attention" in str(r.message)]
    assert len(msgs) == 1 and "output_attentions" in msgs[0]
    # a caller's 4-D float mask is used as given
    add = torch.zeros(2, 1, 5, 5).masked_fill(~causal, float("-inf"))
    out, _ = mkhf.attention_forward(_module(), q, k, v, add, scaling=0.25)
    torch.testing.assert_close(out, want, **TOL)
    # a value head dim unlike the query's (MLA-like)
    q2, k2, v2 = _qkv(dv=8)
    out, _ = mkhf.attention_forward(_module(), q2, k2, v2, None, scaling=0.25)
    torch.testing.assert_close(out, _reference(q2, k2, v2, causal, 0.25), **TOL)
    # inputs that need grad (no backward in the ops)
    qg = q.clone().requires_grad_(True)
    out, _ = mkhf.attention_forward(_module(), qg, k, v, None, scaling=0.25)
    out.sum().backward()
    assert qg.grad is not None
    # a sliding window over a padded prefill with holes
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False
    out, _ = mkhf.attention_forward(_module(), q, k, v, mask, scaling=0.25, sliding_window=2)
    pos = torch.arange(5)
    allowed = causal & mask[:, None, None, :] & (pos[None, :] > pos[:, None] - 2)
    torch.testing.assert_close(out[1], _reference(q, k, v, allowed, 0.25)[1], **TOL)
    torch.testing.assert_close(out[0, [0, 2, 3, 4]],
                               _reference(q, k, v, allowed, 0.25)[0, [0, 2, 3, 4]], **TOL)
    reasons = " | ".join(str(r.message) for r in recwarn)
    for word in ("output_attentions", "4-D", "head dims", "require grad", "holes"):
        assert word in reasons, word


def test_kernel_paths_match_reference_math() -> None:
    """Direct calls: softcap, GQA, bidirectional with padding, decode with holes + window."""
    q, k, v = _qkv(sq=6, sk=6)
    pos = torch.arange(6)
    causal = (pos[None, :] <= pos[:, None])[None, None].expand(2, 1, 6, 6)
    out, _ = mkhf.attention_forward(_module(), q, k, v, None, scaling=0.3, softcap=5.0)
    torch.testing.assert_close(out, _reference(q, k, v, causal, 0.3, softcap=5.0), **TOL)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    out, _ = mkhf.attention_forward(_module(False), q, k, v, mask, scaling=0.3)
    allowed = mask[:, None, None, :].expand(2, 1, 6, 6)
    torch.testing.assert_close(out, _reference(q, k, v, allowed, 0.3), **TOL)
    # decode: one query, a static-cache-like key row (M = 7 of Sk = 9 slots), holes, window 3
    q1, k1, v1 = _qkv(sq=1, sk=9, seed=1)
    m = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, _ = mkhf.attention_forward(_module(), q1, k1, v1, m, scaling=0.3, sliding_window=3)
    slots = torch.arange(9)
    keys = torch.nn.functional.pad(m, (0, 2)) & (slots > 6 - 3) & (slots <= 6)
    torch.testing.assert_close(out, _reference(q1, k1, v1, keys[:, None, None, :], 0.3), **TOL)


def test_float_2d_mask_refused() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="2-D float"):
        mkhf.attention_forward(_module(), q, k, v, torch.zeros(2, 5))


def _reference_sinks(q, k, v, allowed, scale, sinks):
    """GPT-OSS's eager attention: the sink logit concatenated to each row, dropped after
    the softmax."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(2, 3) * scale).masked_fill(~allowed, float("-inf"))
    s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return (torch.softmax(s, -1)[..., :-1] @ v).transpose(1, 2)


def test_s_aux_attention_sinks_on_every_path(recwarn) -> None:
    """GPT-OSS's s_aux (a sink logit per head) on every path: no mask (bshd), a padded
    prefill, a padded decode step, and the fp32 fallback (output_attentions)."""
    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    causal = torch.ones(5, 5).tril().bool()
    out, _ = mkhf.attention_forward(_module(), q, k, v, None, scaling=0.3, s_aux=sinks)
    torch.testing.assert_close(out, _reference_sinks(q, k, v, causal, 0.3, sinks), **TOL)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0                                  # left padding
    allowed = causal & mask.bool()[:, None, None, :]
    out, _ = mkhf.attention_forward(_module(), q, k, v, mask, scaling=0.3, s_aux=sinks)
    ref = _reference_sinks(q, k, v, allowed, 0.3, sinks)
    torch.testing.assert_close(out[1], ref[1], **TOL)
    torch.testing.assert_close(out[0, 2:], ref[0, 2:], **TOL)      # (padding rows: any)
    step, _ = mkhf.attention_forward(_module(), q[:, :, -1:], k, v, mask, scaling=0.3,
                                     s_aux=sinks)
    torch.testing.assert_close(step, ref[:, -1:], **TOL)
    out, weights = mkhf.attention_forward(_module(), q, k, v, None, scaling=0.3, s_aux=sinks,
                                          output_attentions=True)
    assert weights is not None
    torch.testing.assert_close(out, _reference_sinks(q, k, v, causal, 0.3, sinks), **TOL)


def test_packed_sequences_use_the_exact_mask(models) -> None:
    """position_ids restarting inside one row (packing, no cache): transformers wraps the
    mask function; ours returns the exact 4-D mask and the result equals SDPA's."""
    model = models["llama"]
    ids = _ids(1, 8, seed=5)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(ids, position_ids=pos).logits
        model.set_attn_implementation("minikernels")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = model(ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, **TOL)


def test_gpt_oss_attention_sinks_match_eager() -> None:
    """transformers' GPT-OSS (attention sinks, a sliding layer) with
    attn_implementation="minikernels": logits equal its eager attention's."""
    import transformers
    from test_model_support import randomize_

    config = transformers.GptOssConfig(
        vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"])
    model = randomize_(transformers.GptOssForCausalLM(config).float().eval(), 1)
    ids = _ids(2, 11)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids).logits
        model.set_attn_implementation("minikernels")
        got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
