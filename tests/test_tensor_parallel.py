"""Tensor parallel on CPU (gloo): TP=2 logits equal TP=1 within fp32 tolerance for tiny
saved HF models of each family, dense and int4 (RTN on load), cache-less prefill and a
paged schedule (chunked prefill + decode); greedy LLM.generate token-identical.

The model check spawns the 2 ranks once and runs every case in them (spawn + import is
most of the cost)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_model_support import make_hf_model, random_tokens, rel_err, run_schedule, save_hf

from minikernels.models import AttentionMetadata, load_model
from minikernels.models.parallel import TensorParallel, attention_shard, shard_tensor

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# case -> (CASES kind, overrides): KV heads split (2 over 2 ranks) and replicated (1 kv
# head on 2 ranks), tied and untied heads, q/k norm, biases on row-parallel layers, a
# sliding window, a vocab that does not split evenly (301 -> 151 + 150 + 1 padding row),
# Gemma 2's final softcap on gathered logits, Gemma 3's two rope bases and q/k norms,
# Granite's residual multiplier after the all-reduce, Phi-3's fused tensors split per rank.
TP_CASES = {
    "llama": ("llama", {}),
    "llama-bias": ("llama-bias-linear-rope", {"vocab_size": 301}),
    "qwen2-tied-kv1": ("qwen2-tied", {"num_key_value_heads": 1}),
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral-window", {}),
    "gemma2-softcap": ("gemma2-window-softcap", {"vocab_size": 301}),
    "gemma3": ("gemma3", {}),
    "granite": ("granite", {}),
    "phi3": ("phi3-longrope-partial", {}),
    "glm4": ("glm4", {}),
}
QUANT = (None, "int4")
GROUP = 32       # divides every per-rank K here, so TP int4 == slices of TP=1 int4
SEQS = [random_tokens(13, 300, 1), random_tokens(9, 300, 2)]
PLAN = [[("p", 0, 7), ("p", 1, 6)], [("d", 1), ("p", 0, 4)], [("d", 0), ("d", 1)],
        [("d", 0), ("d", 1)]]


def _logits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ids = torch.tensor(SEQS[0] + SEQS[1])
        whole = model(ids, AttentionMetadata.for_prompts([len(s) for s in SEQS]))
        steps = run_schedule(model, SEQS, PLAN, block_size=4)
    return whole, torch.stack([row for _, _, row in steps])


def _rank_main(rank: int, world: int, port: int, dirs: dict[str, str], out: str,
               qdirs: dict[str, str], quants: tuple = QUANT, group: int = GROUP) -> None:
    """One rank of a ``world``-rank gloo group: every model of ``dirs`` in each of
    ``quants`` (RTN group ``group``) and the checkpoints of ``qdirs`` -> rank{r}.pt."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tp = TensorParallel.from_default_group()
        res = {}
        for name, path in dirs.items():
            for q in quants:
                m = load_model(path, dtype="float32", device="cpu", quantization=q,
                               group_size=group, tensor_parallel=tp)
                res[(name, q)] = _logits(m)
        for name, path in qdirs.items():   # GPTQ / AWQ checkpoints
            m = load_model(path, dtype="float32", device="cpu", tensor_parallel=tp)
            res[(name, "ckpt")] = _logits(m)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    from minikernels.distributed import free_port

    return free_port()


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dirs = {}
    for name, (kind, over) in TP_CASES.items():
        dirs[name] = save_hf(make_hf_model(kind, **over), str(tmp_path_factory.mktemp(name)))
    return dirs


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """GPTQ (act-order too: its column-parallel layers shard, row-parallel ones must not
    be act-order, so only q/k/v/gate/up get a shuffled g_idx) and AWQ, group 32."""
    from test_model_support import write_quantized_checkpoint

    dirs = {}
    for name, method, act in (("gptq", "gptq", False), ("awq", "awq", False)):
        d = str(tmp_path_factory.mktemp(name))
        write_quantized_checkpoint(make_hf_model("llama", seed=5), d, method, group=32,
                                   act_order=act)
        dirs[name] = d
    return dirs


def test_tp2_logits_equal_tp1(tp_dirs, quant_dirs, tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), tp_dirs, str(tmp_path), quant_dirs), nprocs=2,
             join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for name, path in quant_dirs.items():
        ref = _logits(load_model(path, dtype="float32", device="cpu"))
        for r, res in enumerate(ranks):
            for got, want in zip(res[(name, "ckpt")], ref):
                assert rel_err(got, want) < 3e-3, (name, r, rel_err(got, want))
    check_logits(ranks, tp_dirs, QUANT, GROUP)


def check_logits(ranks: list[dict], dirs: dict[str, str], quants: tuple, group: int) -> None:
    """Every rank's results (``_rank_main``) against TP=1 of the same models: fp32 within
    1e-4; int4 (RTN, group ``group``) within 3e-3 and 1/5 of what int4 itself changes."""
    for name, path in dirs.items():
        refs = {q: _logits(load_model(path, dtype="float32", device="cpu", quantization=q,
                                      group_size=group)) for q in (None,) + tuple(quants)}
        # what int4 itself changes: the TP error must be far below it
        int4_err = rel_err(refs["int4"][0], refs[None][0]) if "int4" in quants else 0.0
        for q in quants:
            ref = refs[q]
            for r, res in enumerate(ranks):
                for got, want in zip(res[(name, q)], ref):
                    assert got.shape == want.shape, (name, q, r)
                    if q is None:   # fp32 end to end: only the reduction order differs
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                                   msg=f"{name} rank {r}")
                    else:
                        # Same int4 weights (group divides each shard), but int4_matmul
                        # returns fp16: a row-parallel layer rounds each rank's partial
                        # sum to fp16 before the all-reduce (TP=1 rounds the whole sum).
                        err = rel_err(got, want)
                        assert err < min(3e-3, int4_err / 5), (name, q, r, err, int4_err)


def test_shard_math_without_processes():
    """Head assignment and checkpoint slicing, for sizes the process test does not run."""
    from minikernels.models.config import builtin_config

    c = builtin_config("qwen2.5-0.5b")    # 14 heads, 2 kv heads
    shards = [attention_shard(c, TensorParallel(r, 2)) for r in range(2)]
    assert [(s.q0, s.nq, s.kv0, s.nkv) for s in shards] == [(0, 7, 0, 1), (7, 7, 1, 1)]
    c = builtin_config("tiny")             # 4 heads, 2 kv heads; 4 ranks: kv replicated
    got = [attention_shard(c, TensorParallel(r, 4)) for r in range(4)]
    assert [(s.q0, s.kv0, s.nkv) for s in got] == [(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]
    w = torch.arange(512 * 64.).reshape(512, 64)
    tp = TensorParallel(1, 2)
    emb = shard_tensor(c, tp, "embed_tokens", None, "weight", w)
    assert torch.equal(emb, w[256:])
    o = torch.arange(64 * 64.).reshape(64, 64)
    assert torch.equal(shard_tensor(c, tp, "layers.0.self_attn.o_proj", 0, "weight", o),
                       o[:, 32:])
    b = torch.ones(64)
    assert not shard_tensor(c, tp, "layers.0.self_attn.o_proj", 0, "bias", b).any()
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        load_model("tiny", dtype="float32", device="cpu",
                   tensor_parallel=TensorParallel(0, 3))


def test_llm_generate_tp2_token_identical(tp_dirs):
    """LLM(tensor_parallel_size=2): the scheduler here (rank 0), one spawned worker; greedy
    tokens equal TP=1 through chunked prefill, prefix caching and batched decode."""
    import minikernels as mk
    from minikernels.distributed import TensorParallelModel

    path = tp_dirs["qwen2-tied-kv1"]
    prompts = [random_tokens(n, 300, 10 + n) for n in (5, 23, 12)]
    prompts.append(prompts[1][:17] + [7, 8])           # shares a cached prefix
    params = mk.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=64,
              max_num_batched_tokens=16, max_num_seqs=3)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(prompts, params)]
    llm = mk.LLM(path, tensor_parallel_size=2, **kw)
    try:
        model = llm.llm_engine.model
        assert isinstance(model, TensorParallelModel) and model.tensor_parallel_size == 2
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == want
    finally:
        llm.llm_engine.model.close()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="stopped"):
        model(torch.zeros(1, dtype=torch.int64), AttentionMetadata.for_prompts([1]))


def test_serve_flag_reaches_the_engine_kwargs():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny", "--tensor-parallel-size", "2"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    assert "tensor_parallel_size" not in engine_kwargs(parser.parse_args(["tiny"]))


def test_bench_serve_flag_reaches_the_llm(monkeypatch):
    """``bench serve --tensor-parallel-size 2`` builds its LLM with it (a real TP=2 bench
    run on CPU works too but takes ~20 s: see docs/parallel.md)."""
    import minikernels.engine.llm_engine as llm_engine
    from minikernels.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.update(kwargs, model=model)
        raise Stop

    monkeypatch.setattr(llm_engine, "LLM", fake_llm)
    with pytest.raises(Stop):
        main(["bench", "serve", "--model", "tiny", "-tp", "2", "--no-save"])
    assert seen["tensor_parallel_size"] == 2 and seen["model"] == "tiny"


def test_int4_checkpoint_shards_refuse_what_they_cannot_split():
    """GPTQ act-order on a row-parallel layer, and K slices off group boundaries."""
    from minikernels.models.config import builtin_config

    c = builtin_config("tiny")     # intermediate 128, q_size 64
    c.quantization_config = {"quant_method": "gptq", "group_size": 32, "bits": 4}
    tp = TensorParallel(1, 2)
    g_idx = torch.arange(128, dtype=torch.int32) // 32
    got = shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "g_idx", g_idx)
    assert torch.equal(got, torch.arange(64, dtype=torch.int32) // 32)
    with pytest.raises(ValueError, match="act-order"):
        shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "g_idx", g_idx.flip(0))
    c.quantization_config["group_size"] = 128
    with pytest.raises(ValueError, match="group boundaries"):
        shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "scales", torch.ones(1, 64))


@pytest.mark.parametrize("quant", [None, "int4"])
def test_builtin_tp_shards_are_the_tp1_model_sharded(quant):
    """A built-in (random-weight) model under TP: each rank holds its shard of the TP=1
    model of the same seed (so LLM("tiny", tensor_parallel_size=2) == LLM("tiny")); no
    processes, only the weights are built. int4 (RTN on load, group 16 divides every
    shard): each rank's dequantized layers are the shards of the TP=1 dequantized ones."""
    from minikernels.models.linear import FusedLinear
    from minikernels.models.parallel import shard_tensor

    def dense(mod: FusedLinear) -> torch.Tensor:
        if mod.weight is not None:
            return mod.weight.float()
        return torch.cat([p.dequantize() for p in mod.int4_parts])

    kw = dict(dtype="float32", device="cpu", quantization=quant, group_size=16)
    full = load_model("tiny-qwen3", **kw)
    full_mods = dict(full.named_modules())
    full_params = dict(full.named_parameters())
    checked = 0
    for r in range(2):
        tp = TensorParallel(r, 2)
        part = load_model("tiny-qwen3", tensor_parallel=tp, **kw)
        for name, mod in part.named_modules():
            ref = full_mods[name]
            if isinstance(mod, FusedLinear):
                if name == "lm_head" and full.config.tie_word_embeddings:
                    continue
                want = torch.cat([shard_tensor(full.config, tp, name, s, "weight", w)
                                  for s, w in enumerate(torch.split(dense(ref),
                                                                    ref.output_sizes))])
                assert torch.equal(dense(mod), want), name
                checked += 1
            else:
                for p_name, t in mod.named_parameters(recurse=False):
                    key = f"{name}.{p_name}" if name else p_name
                    assert torch.equal(t, shard_tensor(full.config, tp, name, None, p_name,
                                                       full_params[key])), key
                    checked += 1
    assert checked > 20
