"""EAGLE-1 / EAGLE-3 heads (models/eagle.py) and their proposer in the engine
(engine/eagle.py).

- Every draft the engine proposes equals a plain-PyTorch reference: the target's hidden
  states from transformers (final-normed for EAGLE-1, the residual streams entering the
  aux layers for EAGLE-3) over the known tokens, the head's math written out here
  (causal attention over all positions, no cache), greedy drafts one after another. This
  pins the position shift, the hidden-state capture, the head's K/V in the target's
  blocks, catch-up after acceptance / rejection, chunked prefill and prefix-cache hits.
- Greedy output is token-identical with and without the head (exactness), with chunked
  prefill, prefix caching, preemption, overlap and batches too large to draft; seeded
  sampling reproduces run to run; every block comes back.
- Checkpoint layouts (EAGLE-1 ``layers.0.``, EAGLE-3 ``midlayer.`` with draft vocab and
  d2t) and errors naming what does not fit.
CPU, fp32, tiny models.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import save_file
from test_engine import assert_all_free, tokens

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.eagle import HeadCatchUpGraphs, HeadDecodeGraphs
from minikernels.engine.spec_decode import SpeculativeConfig

VOCAB, H, HEADS, KV_HEADS, INTER = 300, 64, 4, 2, 128


def _target(path, layers: int, seed: int):
    """A random transformers Llama (V = 300, H = 64) saved at path; returns it."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name
                    else torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(path))
    return model


def _head_tensors(method: str, seed: int, own_embed: bool, draft_vocab: int | None
                  ) -> dict[str, torch.Tensor]:
    """Random head weights under their checkpoint names (unprefixed layer names)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return torch.rand(H, generator=g) + 0.5

    D = H // HEADS
    in_qkv = H if method == "eagle" else 2 * H
    t = {"self_attn.q_proj.weight": w(HEADS * D, in_qkv),
         "self_attn.k_proj.weight": w(KV_HEADS * D, in_qkv),
         "self_attn.v_proj.weight": w(KV_HEADS * D, in_qkv),
         "self_attn.o_proj.weight": w(H, HEADS * D),
         "mlp.gate_proj.weight": w(INTER, H), "mlp.up_proj.weight": w(INTER, H),
         "mlp.down_proj.weight": w(H, INTER),
         "post_attention_layernorm.weight": norm()}
    top = {}
    if method == "eagle":
        top["fc.weight"] = w(H, 2 * H)
        top["fc.bias"] = w(H, scale=0.05)
    else:
        top["fc.weight"] = w(H, 3 * H, scale=0.08)
        t["input_layernorm.weight"] = norm()
        t["hidden_norm.weight"] = norm()
        top["norm.weight"] = norm()
        if draft_vocab is not None:
            top["lm_head.weight"] = w(draft_vocab, H, scale=0.3)
            # draft id d -> target id d + d2t[d]: a sorted random subset of the vocab
            ids = sorted(random.Random(seed).sample(range(VOCAB), draft_vocab))
            top["d2t"] = torch.tensor(ids) - torch.arange(draft_vocab)
            t2d = torch.zeros(VOCAB, dtype=torch.bool)
            t2d[ids] = True
            top["t2d"] = t2d
    if own_embed:
        top["embed_tokens.weight"] = w(VOCAB, H, scale=0.5)
    return {**t, **top}


def _save_head(path, method: str, seed: int, own_embed: bool, draft_vocab: int | None = None,
               aux: list[int] | None = None, qwen2: bool = False,
               speculators: bool = False) -> dict[str, torch.Tensor]:
    """An EAGLE checkpoint in its published layout; returns the weights (bare names).
    qwen2: an EAGLE-1 head with Qwen2's architecture (q / k / v biases). speculators:
    an EAGLE-3 head in the speculators library's layout (``layers.0.``, the layer's
    config nested in ``transformer_layer_config``, norm_before_residual)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = _head_tensors(method, seed, own_embed, draft_vocab)
    if qwen2:
        g = torch.Generator().manual_seed(seed + 100)
        for part, n in (("q", H), ("k", KV_HEADS * H // HEADS), ("v", KV_HEADS * H // HEADS)):
            weights[f"self_attn.{part}_proj.bias"] = torch.randn(n, generator=g) * 0.3
    layer_prefix = "layers.0." if method == "eagle" or speculators else "midlayer."
    top = ("fc.weight", "fc.bias", "norm.weight", "lm_head.weight", "d2t", "t2d",
           "embed_tokens.weight")
    save_file({(k if k in top else layer_prefix + k): v.contiguous() for k, v in weights.items()},
              str(path / "model.safetensors"))
    cfg = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"
                             if method == "eagle" else "LlamaForCausalLMEagle3"],
           "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "num_hidden_layers": 1, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 128, "rope_theta": 10000.0}
    if method == "eagle3":
        cfg["draft_vocab_size"] = draft_vocab or VOCAB
        if aux is not None:
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux}
    if speculators:
        cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
               "transformer_layer_config": {k: v for k, v in cfg.items()
                                            if k not in ("architectures", "draft_vocab_size")},
               "draft_vocab_size": draft_vocab or VOCAB, "norm_before_residual": True}
        weights["__norm_before_residual"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    return weights


def _bigram_target(path, seed: int):
    """A 1-layer Llama whose attention adds nothing (o_proj = 0) and whose final norm
    weight is 1: its next token is a function of the current token alone."""
    model = _target(path, 1, seed)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(str(path))
    return model


def _save_oracle_head(path, target, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """An EAGLE-1 head that predicts a bigram target exactly (noise 0): fc passes the
    embedding of token p + 1 through, its layer is the target's MLP and norm, so g is the
    target's pre-norm state for token p + 1 and the target's lm_head ranks g as the
    target ranks g / rms(g). noise > 0 perturbs o_proj and the MLP: drafts then agree
    only part of the time (and attention matters)."""
    g = torch.Generator().manual_seed(seed)
    layer = target.model.layers[0]

    def w(t):
        return t.detach().clone() + noise * torch.randn(t.shape, generator=g)

    D = H // HEADS
    weights = {
        "fc.weight": torch.cat([torch.eye(H), torch.zeros(H, H)], 1),
        "self_attn.q_proj.weight": torch.randn(HEADS * D, H, generator=g) * 0.1,
        "self_attn.k_proj.weight": torch.randn(KV_HEADS * D, H, generator=g) * 0.1,
        "self_attn.v_proj.weight": torch.randn(KV_HEADS * D, H, generator=g) * 0.1,
        "self_attn.o_proj.weight": noise * torch.randn(H, HEADS * D, generator=g),
        "post_attention_layernorm.weight": layer.post_attention_layernorm.weight.detach().clone(),
        "mlp.gate_proj.weight": w(layer.mlp.gate_proj.weight),
        "mlp.up_proj.weight": w(layer.mlp.up_proj.weight),
        "mlp.down_proj.weight": w(layer.mlp.down_proj.weight),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({(k if k.startswith("fc.") else "layers.0." + k): v.contiguous()
               for k, v in weights.items()}, str(path / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": INTER, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    return weights


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    t2 = _target(root / "target2", 2, seed=0)
    t8 = _target(root / "target8", 8, seed=10)
    heads = {
        "eagle": _save_head(root / "eagle", "eagle", 1, own_embed=True),
        "eagle_shared": _save_head(root / "eagle_shared", "eagle", 2, own_embed=False),
        "eagle_qwen2": _save_head(root / "eagle_qwen2", "eagle", 5, own_embed=False,
                                  qwen2=True),
        "eagle3": _save_head(root / "eagle3", "eagle3", 3, own_embed=False, draft_vocab=200),
        "eagle3_full": _save_head(root / "eagle3_full", "eagle3", 4, own_embed=True,
                                  draft_vocab=None, aux=[0, 1, 1]),
        "eagle3_spec": _save_head(root / "eagle3_spec", "eagle3", 6, own_embed=True,
                                  draft_vocab=120, speculators=True),
    }
    bigram = _bigram_target(root / "bigram", seed=20)
    heads["oracle"] = _save_oracle_head(root / "oracle", bigram, 0.0, 21)
    heads["noisy"] = _save_oracle_head(root / "noisy", bigram, 0.03, 22)
    return {"root": root, "hf": {"target2": t2, "target8": t8, "bigram": bigram},
            "heads": heads,
            **{k: str(root / k) for k in ("target2", "target8", "bigram", *heads)}}


# ---------------------------------------------------------------- the reference
def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta=10000.0):
    """Llama's rotate-half rotary on [T, heads, D] at positions pos [T]."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


def _ref_head(W, method, target, toks, hid, pos, d2t=None):
    """The head over a whole draft sequence (inputs toks [T], hid [T, H], positions pos):
    -> (logits [T, V] over the target vocab, output states [T, H])."""
    embed = W["embed_tokens.weight"] if "embed_tokens.weight" in W else \
        target.model.embed_tokens.weight
    e = embed[toks]
    if method == "eagle":
        x = torch.cat([e, hid], -1) @ W["fc.weight"].T + W.get("fc.bias", 0)
        attn_in, residual = x, x
    else:
        hn = _rms(hid, W["hidden_norm.weight"])
        attn_in = torch.cat([_rms(e, W["input_layernorm.weight"]), hn], -1)
        residual = hn if W.get("__norm_before_residual") else hid
    T, D = toks.shape[0], H // HEADS
    q = _rope((attn_in @ W["self_attn.q_proj.weight"].T + W.get("self_attn.q_proj.bias", 0)
               ).view(T, HEADS, D), pos)
    k = _rope((attn_in @ W["self_attn.k_proj.weight"].T + W.get("self_attn.k_proj.bias", 0)
               ).view(T, KV_HEADS, D), pos)
    v = (attn_in @ W["self_attn.v_proj.weight"].T + W.get("self_attn.v_proj.bias", 0)
         ).view(T, KV_HEADS, D)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H) @ W[
        "self_attn.o_proj.weight"].T
    r = residual + a
    y = _rms(r, W["post_attention_layernorm.weight"])
    g = r + (torch.nn.functional.silu(y @ W["mlp.gate_proj.weight"].T) *
             (y @ W["mlp.up_proj.weight"].T)) @ W["mlp.down_proj.weight"].T
    if method == "eagle":
        return g @ target.lm_head.weight.T, g
    normed = _rms(g, W["norm.weight"])
    if "lm_head.weight" not in W:
        return normed @ target.lm_head.weight.T, g
    d = normed @ W["lm_head.weight"].T
    out = torch.full((T, VOCAB), float("-inf"))
    out[:, torch.arange(d.shape[1]) + W["d2t"]] = d
    return out, g


@torch.no_grad()
def _ref_drafts(W, method, target, known: list[int], k: int, aux=None) -> list[int]:
    """Greedy drafts for a sequence whose tokens are ``known``: the target's states at
    positions 0 .. n - 2 paired with tokens 1 .. n - 1, then k - 1 steps on the head's
    own states."""
    n = len(known)
    out = target(torch.tensor([known[:-1]]), output_hidden_states=True)
    if method == "eagle":
        hid = out.hidden_states[-1][0]          # after the final norm
    else:
        hid = torch.cat([out.hidden_states[i][0] for i in aux], -1) @ W["fc.weight"].T
    toks = torch.tensor(known[1:])
    pos = torch.arange(n - 1)
    drafts = []
    for _ in range(k):
        logits, g = _ref_head(W, method, target, toks, hid, pos)
        d = int(logits[-1].argmax())
        drafts.append(d)
        toks = torch.cat([toks, torch.tensor([d])])
        hid = torch.cat([hid, g[-1:]])
        pos = torch.arange(len(toks))
    return drafts


def make(path, head=None, method="eagle", k=3, **kw):
    kw.setdefault("block_size", 8)
    cfg = None if head is None else {"method": method, "model": head,
                                     "num_speculative_tokens": k}
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, speculative_config=cfg,
               **kw)


def _record_proposals(llm):
    """Wrap the proposer: log (known tokens, drafts) of every greedy proposal."""
    prop = llm.llm_engine.proposer
    log = []
    orig = prop.propose

    def propose(seqs, max_tokens):
        drafts, probs = orig(seqs, max_tokens)
        for s, d in zip(seqs, drafts):
            if d:
                log.append((list(s.token_ids), list(d)))
        return drafts, probs

    prop.propose = propose
    return log


def _prompts(n, seed=0, lo=1, hi=30):
    r = random.Random(seed)
    return [[r.randrange(3, VOCAB) for _ in range(r.randrange(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.mark.parametrize("head,target,aux", [
    ("eagle", "target2", None), ("eagle_shared", "target2", None),
    ("eagle_qwen2", "target2", None),
    ("eagle3", "target8", (2, 4, 5)), ("eagle3_full", "target2", (0, 1, 1)),
    ("eagle3_spec", "target8", (2, 4, 5)), ("noisy", "bigram", None)])
def test_drafts_equal_the_reference(ckpts, head, target, aux):
    """Every proposal equals the reference head over the target's states; shared
    prefixes (prefix-cache hits), chunked prefill and batched rows included; with the
    noisy oracle, after partly accepted drafts too."""
    method = "eagle3" if head.startswith("eagle3") else "eagle"
    llm = make(ckpts[target], ckpts[head], method, k=3, max_num_batched_tokens=24)
    log = _record_proposals(llm)
    shared = _prompts(1, seed=5, lo=16, hi=17)[0]   # two whole blocks
    prompts = _prompts(4, seed=1) + [shared + p for p in _prompts(3, seed=2, lo=1, hi=6)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert len(log) > 10
    W, hf = ckpts["heads"][head], ckpts["hf"][target]
    for known, drafts in log:
        assert drafts == _ref_drafts(W, method, hf, known, len(drafts), aux), known
    assert llm.llm_engine.block_manager.num_hit_tokens > 0       # prefix hits were drafted
    ref = make(ckpts[target])
    assert tokens(outs) == tokens(ref.generate(prompts,
                                               GREEDY, use_tqdm=False))
    assert_all_free(llm)
    assert not llm.llm_engine.proposer.states and llm.llm_engine.proposer.num_stale == 0


class EagerHeadGraphs(HeadDecodeGraphs):
    """CPU stand-in for the draft steps' CUDA graphs: replay = the head on the bucket's
    padded static buffers, eagerly."""

    def _capture(self, bs):
        return lambda: self._forward(bs)


class EagerHeadCatchUp(HeadCatchUpGraphs):
    """CPU stand-in for the steady catch-up's CUDA graphs (left-padded rows of k + 1)."""

    def _capture(self, bs):
        return lambda: self._forward(bs)


@pytest.mark.parametrize("head,target,aux", [("noisy", "bigram", None),
                                             ("eagle3", "target8", (2, 4, 5))])
def test_standin_draft_graphs_equal_the_reference(ckpts, head, target, aux):
    """Draft steps and the steady catch-up (rows of 1..k + 1 positions, left-padded)
    through the padded static buffers of the graph buckets: the same proposals as the
    reference."""
    method = "eagle3" if head.startswith("eagle3") else "eagle"
    llm = make(ckpts[target], ckpts[head], method, k=4)
    graphs = llm.llm_engine.proposer.capture_graphs(EagerHeadGraphs, EagerHeadCatchUp)
    catch_up = llm.llm_engine.proposer.catch_up_graphs
    assert graphs.sizes == catch_up.sizes == [1, 2, 4, 8, 16, 32] and catch_up.q == 5
    log = _record_proposals(llm)
    prompts = _prompts(7, seed=8)                      # bucket 8: one padding row
    # rows finish one after another: the buckets' padding rows held real rows before
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True)
              for i in range(7)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert graphs.num_replays > 0 and catch_up.num_replays > 0 and log
    W, hf = ckpts["heads"][head], ckpts["hf"][target]
    for known, drafts in log:
        assert drafts == _ref_drafts(W, method, hf, known, len(drafts), aux), known
    assert tokens(outs) == tokens(make(ckpts[target]).generate(prompts, params,
                                                               use_tqdm=False))
    assert_all_free(llm)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_kv_blocks=12, max_num_seqs=6),                   # preemption
    dict(async_scheduling=False, enable_prefix_caching=False),
    dict(max_num_batched_tokens=16),                          # chunked prefill
    dict(quantization="int4", kv_cache_dtype="fp8"),          # int4 target, fp8 KV
])
def test_greedy_is_exact(ckpts, kw):
    prompts = _prompts(8, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = tokens(make(ckpts["target2"], **kw).generate(prompts, params, use_tqdm=False))
    llm = make(ckpts["target2"], ckpts["eagle"], "eagle", k=4, **kw)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == ref
    eng = llm.llm_engine
    assert eng.spec_draft_tokens_total > 0
    assert_all_free(llm)
    assert not eng.proposer.states


def test_large_batches_catch_up_and_draft_later(ckpts):
    """Steps with more running sequences than disable_by_batch_size draft nothing but
    the head still consumes every state: when the batch shrinks, the survivors draft
    (no stale sequence) and the output stays exact."""
    prompts = _prompts(6, seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in (4, 4, 4, 4, 30, 30)]
    ref = tokens(make(ckpts["target2"]).generate(prompts, params, use_tqdm=False))
    llm = LLM(ckpts["target2"], dtype="float32", device="cpu", tokenizer=None, block_size=8,
              speculative_config={"method": "eagle", "model": ckpts["eagle"],
                                  "num_speculative_tokens": 3, "disable_by_batch_size": 2})
    log = _record_proposals(llm)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == ref
    assert log and llm.llm_engine.proposer.num_stale == 0
    W, hf = ckpts["heads"]["eagle"], ckpts["hf"]["target2"]
    for known, drafts in log:
        assert drafts == _ref_drafts(W, "eagle", hf, known, len(drafts)), known
    assert_all_free(llm)


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16, num_kv_blocks=14)])
def test_acceptance_with_an_oracle_head(ckpts, kw):
    """A head that predicts the (bigram) target exactly: (nearly) every draft accepted,
    k + 1 tokens per verification; a noisy one: part of them. Output exact both ways."""
    prompts = _prompts(6, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    ref = tokens(make(ckpts["bigram"], **kw).generate(prompts, params, use_tqdm=False))
    rates = {}
    for head in ("oracle", "noisy"):
        llm = make(ckpts["bigram"], ckpts[head], "eagle", k=4, **kw)
        assert tokens(llm.generate(prompts, params, use_tqdm=False)) == ref
        st = llm.stats()
        rates[head] = st["spec_num_accepted_tokens"] / st["spec_num_draft_tokens"]
        assert_all_free(llm)
        assert llm.llm_engine.proposer.num_stale == 0
    assert rates["oracle"] >= 0.95, rates
    assert 0.1 < rates["noisy"] < rates["oracle"], rates


def test_seeded_sampling_reproducible(ckpts):
    prompts = _prompts(4, seed=6)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=11, ignore_eos=True)
    runs = [tokens(make(ckpts["target8"], ckpts["eagle3"], "eagle3").generate(
        prompts, params, use_tqdm=False)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_config_and_checkpoint_errors(ckpts, tmp_path):
    with pytest.raises(ValueError, match="speculative_config.model is required"):
        SpeculativeConfig.from_dict({"method": "eagle"})
    with pytest.raises(ValueError, match="speculative_config.prompt_lookup_min"):
        SpeculativeConfig.from_dict({"method": "eagle3", "model": "x", "prompt_lookup_min": 1})
    with pytest.raises(ValueError, match="EAGLE-3 head"):
        make(ckpts["target2"], ckpts["eagle3"], "eagle")
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        make(ckpts["target2"], ckpts["eagle"], "eagle3")
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs the target as a "
                                         "checkpoint directory"):
        LLM("tiny", dtype="float32", device="cpu", tokenizer=None, tensor_parallel_size=2,
            speculative_config={"method": "eagle", "model": ckpts["eagle"]})
    from minikernels.models.loader import CheckpointError
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["eagle"], bad)
    from safetensors.torch import load_file
    w = load_file(str(bad / "model.safetensors"))
    del w["layers.0.mlp.down_proj.weight"]
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mlp.down_proj.weight"):
        make(ckpts["target2"], str(bad), "eagle")
    w["layers.0.extra.weight"] = torch.zeros(2)
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="extra"):
        make(ckpts["target2"], str(bad), "eagle")


def test_sampled_output_follows_the_target_distribution(tmp_path):
    """Temperature > 0 with an EAGLE-3 head drafting over 8 of 12 ids (d2t; the others
    have draft probability 0): tokens 2 and 3 of many samples come from verification,
    and their joint distribution is the target's (exact, by enumeration), not the
    head's proposals'."""
    from test_spec_decode_draft import _chi_square_p, _save_llama

    V, T, TOPK, h = 12, 0.9, 8, 32
    target = _save_llama(tmp_path / "t", V, 1, h, seed=11, scale=0.25)
    g = torch.Generator().manual_seed(5)

    def w(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    ids = [0, 1, 3, 4, 6, 7, 9, 11]
    weights = {"midlayer.self_attn.q_proj.weight": w(32, 2 * h),
               "midlayer.self_attn.k_proj.weight": w(16, 2 * h),
               "midlayer.self_attn.v_proj.weight": w(16, 2 * h),
               "midlayer.self_attn.o_proj.weight": w(h, 32),
               "midlayer.mlp.gate_proj.weight": w(64, h), "midlayer.mlp.up_proj.weight": w(64, h),
               "midlayer.mlp.down_proj.weight": w(h, 64),
               "midlayer.input_layernorm.weight": torch.ones(h),
               "midlayer.hidden_norm.weight": torch.ones(h),
               "midlayer.post_attention_layernorm.weight": torch.ones(h),
               "norm.weight": torch.ones(h), "fc.weight": w(h, 3 * h, scale=0.2),
               "lm_head.weight": w(len(ids), h, scale=1.0),
               "d2t": torch.tensor(ids) - torch.arange(len(ids))}
    (tmp_path / "head").mkdir()
    save_file(weights, str(tmp_path / "head" / "model.safetensors"))
    (tmp_path / "head" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": h,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "vocab_size": V, "draft_vocab_size": len(ids),
        "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 0, 0]}}))
    prompt = [3, 5, 7]

    @torch.no_grad()
    def dist(ctx):
        logits = target(torch.tensor([ctx])).logits[0, -1].double() / T
        kth = torch.topk(logits, TOPK).values[-1]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), 0)

    want = torch.zeros(V, V, dtype=torch.float64)     # P(t2, t3), t1 marginalized
    p1 = dist(prompt)
    for a in range(V):
        if p1[a] > 0:
            p2 = dist(prompt + [a])
            for b in range(V):
                if p2[b] > 0:
                    want[b] += p1[a] * p2[b] * dist(prompt + [a, b])
    N = 4000
    llm = LLM(str(tmp_path / "t"), dtype="float32", device="cpu", tokenizer=None,
              block_size=16, num_kv_blocks=N + 64, max_num_seqs=N,
              max_num_batched_tokens=4 * N,
              speculative_config={"method": "eagle3", "model": str(tmp_path / "head"),
                                  "num_speculative_tokens": 2, "disable_by_batch_size": N})
    out = llm.generate(prompt, SamplingParams(n=N, temperature=T, top_k=TOPK, max_tokens=3,
                                              ignore_eos=True), use_tqdm=False)[0]
    st = llm.stats()
    assert st["spec_num_draft_tokens"] >= N // 2
    assert 0.05 * st["spec_num_draft_tokens"] < st["spec_num_accepted_tokens"] < \
        0.95 * st["spec_num_draft_tokens"]
    counts = torch.zeros(V * V, dtype=torch.float64)
    for c in out.outputs:
        assert c.token_ids[1] in range(V)
        counts[c.token_ids[1] * V + c.token_ids[2]] += 1
    assert _chi_square_p(counts, want.reshape(-1)) > 1e-4
    # ids outside the draft vocabulary (never drafted) still come, from recovered and
    # bonus tokens; (claiming uniform draft probabilities instead fails the chi-square)
    outside = [i for i in range(V) if i not in ids]
    assert want[outside].sum() > 0.05 and counts.reshape(V, V)[outside].sum() > 0
    assert_all_free(llm)


def test_gather_states_across_steps():
    """Catch-up rows whose kept states come from several steps' copies (and several
    records per row) are gathered in plan order, as slicing each record would."""
    from types import SimpleNamespace

    from minikernels.engine.draft_model import DraftSampler, _Row
    from minikernels.engine.eagle import EagleProposer, _EagleSeq, _Record

    a, b, c = (torch.randn(n, 3) for n in (9, 7, 5))
    fake = SimpleNamespace(device=torch.device("cpu"))
    fake._upload = lambda parts: DraftSampler._upload(fake, parts)
    rows, want = [], []
    specs = [  # per row: records (tensor, row, pos, count), then (start, take)
        ([(a, 2, 10, 3)], (11, 2)),
        ([(b, 0, 4, 2), (a, 5, 6, 2), (c, 1, 8, 3)], (5, 6)),
        ([(c, 4, 0, 1)], (0, 1)),
        ([(a, 0, 3, 2), (b, 3, 5, 4)], (3, 6)),
    ]
    for i, (recs, (start, take)) in enumerate(specs):
        st = _EagleSeq(SimpleNamespace(seq_id=i), start)
        st.records = [_Record(*r) for r in recs]
        rows.append(_Row(i, st, start, take, 0, start + take + 1))
        pos = start
        for t, row, p0, n in recs:
            lo, hi = max(pos, p0), min(start + take, p0 + n)
            if lo < hi:
                want.append(t[row + lo - p0:row + hi - p0])
                pos = hi
    got = EagleProposer._gather_states(fake, rows)
    assert torch.equal(got, torch.cat(want))
    one = EagleProposer._gather_states(fake, rows[:1])      # a single source
    assert torch.equal(one, a[3:5])


def test_streaming_with_an_eagle_head(ckpts):
    """AsyncLLM (the server's path) with an EAGLE head: streams carry several tokens per
    step when drafts are accepted, deltas add up, tokens equal plain decoding, an abort
    mid-stream frees everything."""
    import asyncio

    from minikernels.engine import AsyncLLM

    prompts = _prompts(4, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = tokens(make(ckpts["bigram"]).generate(prompts, params, use_tqdm=False))
    llm = make(ckpts["bigram"], ckpts["oracle"], "eagle", k=4)

    async def collect(engine, prompt, rid, stop_after=None):
        outs = []
        async for out in engine.generate(prompt, params, rid):
            outs.append(out)
            if stop_after is not None and len(outs) == stop_after:
                await engine.abort(rid)
                break
        return outs

    async def main():
        engine = AsyncLLM(llm)
        try:
            runs = await asyncio.gather(*[collect(engine, p, f"r{i}") for i, p in
                                          enumerate(prompts)],
                                        collect(engine, prompts[0], "gone", stop_after=2))
            for _ in range(50):      # the aborted request's step drains
                if engine.stats()["num_running"] == 0:
                    break
                await asyncio.sleep(0.02)
            return runs
        finally:
            await engine.shutdown()

    runs = asyncio.run(main())
    for outs, ref in zip(runs[:4], want):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref
        assert sum((o.outputs[0].delta_token_ids for o in outs), []) == ref
        assert max(len(o.outputs[0].delta_token_ids) for o in outs) > 1   # drafts landed
    assert_all_free(llm)


def test_verify_graphs_hand_the_head_states_in_step_order(ckpts):
    """Verification steps through the (stand-in) CUDA graphs: rows with fewer drafts
    are left-padded in the graph's static layout, so the captured states must be put
    back in the step's order before the head reads them. Drafts equal the reference
    while rows draft 1..k tokens (max_tokens leaves some rows less room)."""
    from test_spec_graphs import EagerVerifyGraphs

    llm = make(ckpts["target2"], ckpts["eagle"], "eagle", k=4, max_num_seqs=8)
    runner = llm.llm_engine.runner
    runner.capture_verify_graphs(EagerVerifyGraphs)
    log = _record_proposals(llm)
    prompts = _prompts(6, seed=12)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in (5, 7, 9, 11, 14, 19)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert runner.verify_graphs.num_replays > 0
    assert any(len(d) < 4 for _, d in log) and any(len(d) == 4 for _, d in log)
    W, hf = ckpts["heads"]["eagle"], ckpts["hf"]["target2"]   # (a head that reads h)
    for known, drafts in log:
        assert drafts == _ref_drafts(W, "eagle", hf, known, len(drafts)), known
    assert tokens(outs) == tokens(make(ckpts["target2"]).generate(prompts, params,
                                                                  use_tqdm=False))
