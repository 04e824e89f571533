"""GPTQ / AWQ / compressed-tensors checkpoints of hybrid models (Qwen3.5 Gated DeltaNet and
its MoE, Granite 4.0-H Mamba-2, LFM2 short conv, Mamba-1), written by
``quantized_checkpoints.quantize_checkpoint`` from tiny random-weight HF checkpoints with a
per-module choice of what is quantized - as real quantizers leave Qwen3.5's narrow
``in_proj_b`` / ``in_proj_a``, a mixer's ``out_proj``, routers and lm_head dense:

- TP=1: every linear dequantizes exactly to the dense reference (the same model built from
  the dequantized weights), fused layers with quantized and dense parts included; logits
  equal the reference within the int4 checkpoint tests' 2e-3 (the int4 matmul rounds its
  activations to fp16) cache-less and over a paged schedule;
- TP=2 (gloo, 2 spawned ranks) equals TP=1 within the checkpoint TP tolerance 3e-3;
- mixed parts in either order, a part both dense and quantized, truncated checkpoints and
  configs that contradict the tensors give errors naming the tensor.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import spawn_ranks
from quantized_checkpoints import quantize_checkpoint
from safetensors.torch import load_file, save_file
from test_model_support import make_hf_model, rel_err, save_hf
from test_tensor_parallel import _free_port, _logits, _rank_main

from minikernels.models import CheckpointError, UnsupportedModelError, load_model
from minikernels.models.config import DecoderConfig
from minikernels.models.linear import DensePart, FusedLinear, Int4Part, Int8WoPart
from minikernels.models.loader import checkpoint_name

#: name -> (test_model_support CASES kind, overrides; quantize_checkpoint arguments).
#: Widths chosen so every rank's slice of a quantized tensor is whole int32 words and
#: whole groups (TP=2).
CASES = {
    # the reported bug: int4 in_proj_qkv / in_proj_z beside dense in_proj_b / in_proj_a
    # (one fused in_proj), the conv's out_proj dense, config silent about it; GPTQ v1
    # asymmetric, act-order on the column-parallel layers; in_proj_z and the MLP's
    # down_proj 8-bit through GPTQModel's per-module "dynamic" (int4 and int8 parts in one
    # fused layer)
    "qwen3_5-gptq": (("qwen3_5", {"linear_value_head_dim": 16}), dict(
        method="gptq", quantize=[r"in_proj_(qkv|z)$", r"self_attn\.", r"mlp\."],
        act_order=[r"in_proj_(qkv|z)$", r"self_attn\.[qkv]_proj$", r"(gate|up)_proj$"],
        overrides={r".*in_proj_z$": {"bits": 8}, r".*layers\.2\.mlp\.down_proj$":
                   {"bits": 8, "group_size": 16}})),
    # Qwen3.5-MoE: GPTQ v2 symmetric, int4 experts and shared expert; in_proj_b / a,
    # out_proj, router, shared-expert gate and lm_head dense, named in GPTQModel's
    # "dynamic" negative matches
    "qwen3_5_moe-gptq": (("qwen3_5_moe", {"linear_value_head_dim": 16,
                                          "moe_intermediate_size": 64,
                                          "shared_expert_intermediate_size": 64}), dict(
        method="gptq", sym=True, checkpoint_format="gptq_v2", dense_key="dynamic",
        quantize=[r"in_proj_(qkv|z)$", r"self_attn\.", r"experts\.", r"shared_expert\."])),
    # Granite 4.0-H: AWQ Mamba-2 in_proj ([z | x | B | C | dt], cut per section under TP),
    # attention and the fused shared MLP (input_linear: gate and up parts of one AWQ
    # tensor); the mixer's out_proj dense (modules_to_not_convert)
    "granite4-h-awq": (("granite4-h", {"shared_intermediate_size": 128, "mamba_d_state": 16,
                                       "mamba_n_heads": 16}), dict(
        method="awq", dense_key="modules_to_not_convert",
        quantize=[r"mamba\.in_proj$", r"self_attn\.", r"shared_mlp\."])),
    # LFM2: compressed-tensors W4A16 (group 16) short-conv in_proj (b | c | u), attention and
    # MLP; the conv's out_proj in "ignore"
    "lfm2-ct": (("lfm2", {}), dict(
        method="compressed-tensors", group=16, dense_key="ignore",
        quantize=[r"conv\.in_proj$", r"self_attn\.", r"feed_forward\."])),
    # Mamba-1: GPTQ v1 symmetric in_proj / out_proj (with biases); x_proj (N 29) and
    # dt_proj (K 5) dense, as no int4 format packs them
    "mamba-gptq": (("mamba", {}), dict(method="gptq", sym=True,
                                       quantize=[r"mixer\.(in|out)_proj$"])),
}


def _hf(kind: str, over: dict, seed: int = 3) -> torch.nn.Module:
    """The tiny model; Qwen3.5's (1 + w) norms near unit scale as released checkpoints
    store them (the fixtures' [0.5, 1.5) would scale every norm 1.5-2.5x, so fp16
    activation rounding alone would move these logits by ~6e-3)."""
    hf = make_hf_model(kind, seed=seed, **over)
    if kind.startswith("qwen3_5"):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) * 0.6 - 0.3)
    return hf


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """case -> (quantized checkpoint, dense checkpoint of its dequantized weights)."""
    out = {}
    for name, ((kind, over), kw) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        src = save_hf(_hf(kind, over), str(root / "src"))
        r = quantize_checkpoint(src, str(root / "q"), dense_path=str(root / "dense"), **kw)
        out[name] = (r.path, r.dense_path)
    return out


def _load(path: str, **kw) -> torch.nn.Module:
    return load_model(path, dtype="float32", device="cpu", **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_hybrid_equals_dequantized_dense(qdirs, case):
    path, dense_path = qdirs[case]
    mq, md = _load(path), _load(dense_path)
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert mq.quantization == qc["quant_method"]
    ref = dict(md.named_modules())
    kinds = set()
    for name, lin in mq.named_modules():
        if not isinstance(lin, FusedLinear):
            continue
        # losslessly: each part (quantized or left dense) is exactly the reference's rows
        assert torch.equal(lin.dense_weight(), ref[name].weight), name
        parts = list(lin.int4_parts) + list(lin.int8_wo_parts)
        kinds.add(tuple(sorted({type(p).__name__ for p in parts})) if parts else ("dense",))
    for got, want in zip(_logits(mq), _logits(md)):     # cache-less, then paged
        assert got.shape == want.shape
        assert rel_err(got, want) <= 2e-3, (case, rel_err(got, want))
    if case == "qwen3_5-gptq":
        in_proj = mq.layers[0].linear_attn.in_proj
        # [qkv: int4 act-order | z: int8 act-order | b, a: dense] in part order
        assert [type(p) for p in in_proj.int4_parts] == [Int4Part, Int8WoPart, DensePart]
        assert in_proj.int4_parts[0].perm is not None
        assert mq.layers[0].linear_attn.out_proj.weight is not None       # left dense
        assert isinstance(mq.layers[2].mlp.down_proj.int8_wo_parts[0], Int8WoPart)
    if case == "mamba-gptq":
        assert mq.layers[0].mamba.x_proj.weight is not None
        assert mq.layers[0].mamba.in_proj.is_int4
    assert ("dense",) in kinds and any("Int4Part" in k for k in kinds), kinds


def test_quantized_hybrid_tp2_equals_tp1(qdirs, tmp_path):
    dirs = {name: q for name, (q, _) in qdirs.items()}
    spawn_ranks(_rank_main, (2, _free_port(), {}, str(tmp_path), dirs), 2)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for name, path in dirs.items():
        ref = _logits(_load(path))
        for r, res in enumerate(ranks):
            for got, want in zip(res[(name, "ckpt")], ref):
                # int4 / int8 matmuls return fp16: a row-parallel layer rounds each rank's
                # partial sum before the all-reduce
                assert rel_err(got, want) < 3e-3, (name, r, rel_err(got, want))


# ------------------------------------------------------------------ mixed parts, errors
def _split(path: str, first: list[str]) -> None:
    """Rewrite ``path``'s one safetensors file as two shards, the tensors whose names end
    with one of ``first`` in the shard read first."""
    t = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    a = {k: v for k, v in t.items() if k.endswith(tuple(first))}
    b = {k: v for k, v in t.items() if k not in a}
    save_file(a, os.path.join(path, "a.safetensors"), metadata={"format": "pt"})
    save_file(b, os.path.join(path, "b.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {**{k: "a.safetensors" for k in a},
                                                  **{k: "b.safetensors" for k in b}}}, f)


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A Qwen3.5 GPTQ checkpoint with int4 in_proj_qkv / in_proj_z and dense in_proj_b /
    in_proj_a, its dense reference; the config silent about the dense ones."""
    root = tmp_path_factory.mktemp("qwen35")
    src = save_hf(_hf("qwen3_5", {"linear_value_head_dim": 16}, seed=4), str(root / "src"))
    r = quantize_checkpoint(src, str(root / "q"), "gptq", dense_path=str(root / "d"),
                            quantize=[r"in_proj_(qkv|z)$", r"mlp\."])
    return r.path, r.dense_path


def _edit(path: str, drop: tuple[str, ...] = (), add: dict | None = None) -> None:
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    for name in drop:
        del t[name]
    t.update(add or {})
    save_file(t, f, metadata={"format": "pt"})


def _copy(src: str, dst) -> str:
    import shutil

    return shutil.copytree(src, str(dst))


@pytest.mark.parametrize("order", ["quantized-first", "dense-first"])
def test_mixed_parts_in_either_order(qwen35, tmp_path, order):
    """The parts of one fused in_proj arrive in any order across shards: int4 qkv / z and
    dense b / a become [Int4Part, DensePart] whichever comes first."""
    path = _copy(qwen35[0], tmp_path / "q")
    first = ["qweight", "qzeros", "scales", "g_idx"] if order == "quantized-first" else \
        ["in_proj_a.weight", "in_proj_b.weight"]
    _split(path, first)
    m = _load(path)
    parts = m.layers[2].linear_attn.in_proj.int4_parts
    assert [type(p) for p in parts] == [Int4Part, DensePart]
    ref = _load(qwen35[1])
    assert torch.equal(m.layers[2].linear_attn.in_proj.dense_weight(),
                       ref.layers[2].linear_attn.in_proj.weight)
    assert rel_err(_logits(m)[0], _logits(ref)[0]) <= 2e-3


def test_truncated_checkpoints_name_the_missing_tensor(qwen35, tmp_path):
    q = qwen35[0]
    cases = [   # (tensor dropped, what the error must name)
        ("model.layers.2.linear_attn.in_proj_qkv.qweight",
         r"missing tensors: \['model\.layers\.2\.linear_attn\.in_proj_qkv\.qweight'\]"),
        ("model.layers.0.linear_attn.in_proj_z.scales",
         r"missing tensors: \['model\.layers\.0\.linear_attn\.in_proj_z\.scales'\]"),
        # a dense part: the config does not say it is dense, so either form is named
        ("model.layers.0.linear_attn.in_proj_a.weight",
         r"'model\.layers\.0\.linear_attn\.in_proj_a\.qweight'\].*or a dense \.weight"),
        ("model.layers.2.linear_attn.conv1d.weight",
         r"\['model\.layers\.2\.linear_attn\.conv1d\.weight'\]"),
    ]
    for i, (name, pattern) in enumerate(cases):
        path = _copy(q, tmp_path / f"t{i}")
        _edit(path, drop=(name,))
        with pytest.raises(CheckpointError, match=pattern):
            _load(path)
    # every quantized tensor of a part gone: the part is named, not the fused in_proj
    path = _copy(q, tmp_path / "gone")
    _edit(path, drop=tuple(f"model.layers.0.linear_attn.in_proj_z.{k}"
                           for k in ("qweight", "qzeros", "scales", "g_idx")))
    with pytest.raises(CheckpointError, match=r"\['model\.layers\.0\.linear_attn\."
                                              r"in_proj_z\.qweight'\]"):
        _load(path)


def test_truncated_family_checkpoints_use_the_checkpoint_names(qdirs, tmp_path):
    """Families that rename on load are named as their checkpoints spell them: Mamba's
    backbone.* / mixer, LFM2's compressed-tensors weight_packed, Granite's fused
    shared_mlp.input_linear, a module the config names dense as its .weight."""
    cases = [
        ("mamba-gptq", "backbone.layers.1.mixer.in_proj.qweight"),
        ("lfm2-ct", "model.layers.0.conv.in_proj.weight_packed"),
        ("lfm2-ct", "model.layers.1.feed_forward.w2.weight_packed"),
        ("granite4-h-awq", "model.layers.1.shared_mlp.input_linear.qweight"),
        ("granite4-h-awq", "model.layers.0.mamba.out_proj.weight"),
        ("qwen3_5_moe-gptq", "model.layers.0.linear_attn.in_proj_b.weight"),
        ("qwen3_5_moe-gptq", "model.layers.1.mlp.shared_expert.up_proj.qweight"),
        ("qwen3_5_moe-gptq", "model.layers.0.mlp.experts.3.down_proj.qweight"),
    ]
    for i, (case, name) in enumerate(cases):
        path = _copy(qdirs[case][0], tmp_path / f"t{i}")
        _edit(path, drop=(name,))
        with pytest.raises(CheckpointError, match=rf"missing tensors: \['{name}'\]"):
            _load(path)


def test_a_part_both_dense_and_quantized_is_refused(qwen35, tmp_path):
    path = _copy(qwen35[0], tmp_path / "both")
    _edit(path, add={"model.layers.0.linear_attn.in_proj_z.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match=r"in_proj_z\.weight.*in_proj_z\.(qweight|"
                                              r"qzeros|scales|g_idx).*both"):
        _load(path)


def test_config_that_contradicts_the_tensors_is_refused(qdirs, tmp_path):
    """modules_to_not_convert / dynamic "-:" / ignore name a module the checkpoint holds
    quantized: refused naming the tensor and the config entry; malformed entries too."""
    def edit_qc(case: str, i: int, **changes) -> str:
        path = _copy(qdirs[case][0], tmp_path / f"c{i}")
        f = os.path.join(path, "config.json")
        cfg = json.load(open(f))
        cfg["quantization_config"].update(changes)
        json.dump(cfg, open(f, "w"))
        return path

    path = edit_qc("granite4-h-awq", 0, modules_to_not_convert=["mamba.in_proj"])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mamba\.in_proj\.\w+ .*"
                                              r"modules_to_not_convert entry 'mamba\.in_proj'"):
        _load(path)
    path = edit_qc("qwen3_5_moe-gptq", 1, dynamic={r"-:.*shared_expert\.": {}})
    with pytest.raises(CheckpointError, match=r"shared_expert\.\w+\.\w+ .*dynamic entry"):
        _load(path)
    path = edit_qc("lfm2-ct", 2, ignore=["lm_head", "re:.*feed_forward\\.w1$"])
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.\w+ .*ignore entry"):
        _load(path)
    path = edit_qc("qwen3_5-gptq", 3, dynamic={r"+:.*in_proj_z$": {"bits": 3}})
    with pytest.raises(UnsupportedModelError, match=r"dynamic\['\+:\.\*in_proj_z\$'\]: bits"):
        _load(path)


def test_checkpoint_names_and_module_rules_without_loading(qdirs):
    """The inverse name mapping the errors use, and the config rules."""
    from minikernels.quant import module_quantization

    cfg = {name: DecoderConfig.from_hf(
        json.load(open(os.path.join(q, "config.json")))) for name, (q, _) in qdirs.items()}
    assert checkpoint_name("layers.0.linear_attn.in_proj", 3, "weight",
                           cfg["qwen3_5-gptq"]) == "model.layers.0.linear_attn.in_proj_a.weight"
    assert checkpoint_name("layers.2.mamba.in_proj", 0, "qweight", cfg["mamba-gptq"]) == \
        "backbone.layers.2.mixer.in_proj.qweight"
    assert checkpoint_name("layers.2.mamba", None, "dt_bias", cfg["mamba-gptq"]) == \
        "backbone.layers.2.mixer.dt_proj.bias"
    assert checkpoint_name("layers.1.mlp.gate_up_proj", 1, "qweight",
                           cfg["granite4-h-awq"]) == \
        "model.layers.1.shared_mlp.input_linear.qweight"
    assert checkpoint_name("layers.0.mlp.down_proj", 0, "weight", cfg["lfm2-ct"]) == \
        "model.layers.0.feed_forward.w2.weight"
    qc = {"quant_method": "gptq", "bits": 4, "dynamic": {
        r"-:.*in_proj_[ab]$": {}, r".*in_proj_z$": {"bits": 8, "group_size": 64}}}
    assert module_quantization(qc, "model.layers.0.linear_attn.in_proj_a") is None
    assert module_quantization(qc, "model.layers.0.linear_attn.in_proj_z") == \
        {"bits": 8, "group_size": 64}
    assert module_quantization(qc, "model.layers.0.linear_attn.in_proj_qkv") == {}
    ct = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*\\.gate$"],
          "config_groups": {"g": {"targets": ["re:.*self_attn.*"]}}}
    assert module_quantization(ct, "lm_head") is None
    assert module_quantization(ct, "model.layers.0.mlp.gate") is None
    assert module_quantization(ct, "model.layers.0.mlp.down_proj") is None    # untargeted
    assert module_quantization(ct, "model.layers.1.self_attn.q_proj") == {}
    awq = {"quant_method": "awq", "modules_to_not_convert": ["out_proj"]}
    assert module_quantization(awq, "model.layers.0.mamba.out_proj") is None
    with pytest.raises(ValueError, match="dynamic"):
        module_quantization({"quant_method": "gptq", "dynamic": ["x"]}, "m")


def test_fused_linear_mixes_dense_parts_with_every_quantized_kind():
    """FusedLinear.set_dense_shard beside int4, int8 W8A16, fp8 and int8 W8A8 parts, in any
    order: the parts run in their order, and dequantize to the quantized weights beside the
    dense rows; a layer whose parts all arrive dense is a plain dense layer."""
    from minikernels.quant import quantize_fp8, quantize_int4, quantize_int8
    from minikernels.quant.int8 import Int8WoWeight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.1
    x = torch.randn(5, 64, generator=g)
    sizes = [16, 8, 24]
    def int8_wo(t: torch.Tensor) -> Int8WoWeight:     # known integers, zero 128, group 32
        n, k = t.shape
        return Int8WoWeight(torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8),
                            (torch.rand(n, k // 32, generator=g) * 1e-3).half(),
                            torch.full((n, k // 32), 128.0).half(), 32)

    q = {"int4": lambda t: quantize_int4(t, group_size=32), "int8_wo": int8_wo,
         "fp8": lambda t: quantize_fp8(t, (8, 32)), "int8": quantize_int8}
    setters = {"int4": "set_int4_shard", "int8_wo": "set_int4_shard", "fp8": "set_fp8_shard",
               "int8": "set_int8_shard"}
    for kind, make in q.items():
        rows = list(torch.split(w, sizes))
        made = make(rows[0].half() if kind == "int4" else rows[0])
        for order in ([0, 1, 2], [1, 2, 0]):
            lin = FusedLinear(64, sizes, dense=False)
            for s in order:
                if s == 0:
                    getattr(lin, setters[kind])(0, made)
                else:                    # parts 1 and 2 left dense: one DensePart
                    lin.set_dense_shard(s, rows[s])
            assert lin.is_ready and lin.weight is None, (kind, order)
            parts = lin._quantized_parts()
            assert len(parts) == 2 and isinstance(parts[1], DensePart), (kind, parts)
            want = torch.cat([parts[0].dequantize(), w[16:]])
            assert torch.equal(lin.dense_weight(), want), kind
            y = lin(x)
            assert y.shape == (5, 48)
            assert torch.equal(y[:, 16:], x @ w[16:].t()), kind
            assert rel_err(y, x @ want.t()) < 1e-2, kind
    lin = FusedLinear(64, sizes, dense=False)
    for s, rows in enumerate(torch.split(w, sizes)):
        lin.set_dense_shard(s, rows)
    assert isinstance(lin.weight, torch.nn.Parameter) and torch.equal(lin.weight, w)
    with pytest.raises(ValueError, match="shape mismatch"):
        FusedLinear(64, sizes, dense=False).set_dense_shard(1, w[:9])
    with pytest.raises(ValueError, match="load_shard"):
        FusedLinear(64, sizes).set_dense_shard(1, w[16:24])


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_quantized_lm_head(tmp_path, method):
    """A quantized lm_head (GPTQ ``lm_head: true``, compressed-tensors without it in
    ``ignore``) loads onto the int4 kernels; each tensor-parallel rank takes its vocab rows
    of it (in-process shards: rank r's rows of the dense reference)."""
    from minikernels.models.parallel import TensorParallel

    src = save_hf(make_hf_model("lfm2", seed=3, tie_word_embeddings=False, vocab_size=304),
                  str(tmp_path / "src"))
    r = quantize_checkpoint(src, str(tmp_path / "q"), method, group=16,
                            quantize=[r"feed_forward\.", r"^lm_head$"],
                            dense_path=str(tmp_path / "d"))
    m, d = _load(r.path), _load(r.dense_path)
    assert m.lm_head.is_int4 and torch.equal(m.lm_head.dense_weight(), d.lm_head.weight)
    assert rel_err(_logits(m)[0], _logits(d)[0]) <= 2e-3
    for rank in range(2):
        part = _load(r.path, tensor_parallel=TensorParallel(rank, 2))
        assert torch.equal(part.lm_head.dense_weight(),
                           d.lm_head.weight[rank * 152:(rank + 1) * 152])


def test_quantized_lm_head_vocab_rows_are_padded_like_the_dense_one(tmp_path):
    """The last rank's short vocab slice is zero-padded to the ranks' common row count
    (136 rows over 9 ranks: 16 each, the last 8 + 8 zero rows); a slice off int32 words
    is refused by name."""
    import dataclasses

    from minikernels.models.parallel import TensorParallel, shard_tensor

    c = dataclasses.replace(DecoderConfig.from_hf(json.load(open(os.path.join(
        save_hf(make_hf_model("llama", vocab_size=136), str(tmp_path)),
        "config.json")))), quantization_config={"quant_method": "gptq", "bits": 4,
                                                 "group_size": 32})
    t = {"qweight": torch.randint(-2**31, 2**31 - 1, (8, 136), dtype=torch.int32),
         "qzeros": torch.randint(-2**31, 2**31 - 1, (2, 17), dtype=torch.int32),
         "scales": torch.rand(2, 136).half(), "g_idx": torch.arange(64, dtype=torch.int32)}
    last = {k: shard_tensor(c, TensorParallel(8, 9), "lm_head", 0, k, v) for k, v in t.items()}
    assert torch.equal(last["qweight"], torch.cat([t["qweight"][:, 128:],
                                                   torch.zeros(8, 8, dtype=torch.int32)], 1))
    assert torch.equal(last["qzeros"], torch.cat([t["qzeros"][:, 16:],
                                                  torch.zeros(2, 1, dtype=torch.int32)], 1))
    assert last["scales"].shape == (2, 16) and not last["scales"][:, 8:].any()
    assert torch.equal(last["g_idx"], t["g_idx"])
    with pytest.raises(ValueError, match="lm_head: the per-rank vocab rows"):
        shard_tensor(c, TensorParallel(0, 3), "lm_head", 0, "qweight", t["qweight"])
