"""LoRA adapters on mixture-of-experts layers against PEFT and against merged weights:
PEFT's own expert adapters (its target_parameters on transformers 5's stacked experts,
with the rank / alpha patterns it writes for gate_up_proj) on Qwen3-MoE and OLMoE, Qwen2-MoE's
shared expert, per-expert module adapters (transformers 4.x names, Mixtral's w1 / w3 / w2)
checked against the HF model with each expert's update merged into its weights; mixed
batches with the base model; both backends; the engine's greedy tokens; tensor-parallel
rank slots as slices of the whole adapter."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import ALL, _ref_logits, _run, make_adapter
from test_model_support import make_hf_model, random_tokens, rel_err, save_hf

import minikernels as mk
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.lora import LoRAAdapter, LoRAError, LoRAManager
from minikernels.models.parallel import TensorParallel


@pytest.fixture(scope="module")
def peft_moe(tmp_path_factory):
    """kind -> (hf, base dir, adapter dir, PEFT model): PEFT's adapter on every projection
    (it maps gate / up / down onto the experts' stacked parameters, or the shared expert)."""
    out = {}
    for kind in ("qwen3-moe", "olmoe", "qwen2-moe"):
        hf = make_hf_model(kind, seed=4)
        base = save_hf(hf, str(tmp_path_factory.mktemp(kind)))
        path = str(tmp_path_factory.mktemp(f"{kind}-lora"))
        ref = make_adapter(hf, path, r=4, alpha=8, targets=ALL, seed=6)
        out[kind] = (hf, base, path, ref)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["qwen3-moe", "olmoe", "qwen2-moe"])
def test_peft_expert_adapters_match_peft(peft_moe, kind, backend):
    hf, base, path, ref = peft_moe[kind]
    model = load_model(base, dtype="float32", device="cpu")
    adapter = LoRAAdapter.load(path, model.config)
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    if cfg.get("target_parameters"):        # PEFT put the experts' adapters on parameters
        assert {k for _, k in adapter.experts} == {"gate_up", "down"}
        assert adapter.needed_rank() == 4   # gate_up at rank 8 spans both bands of 4
    else:                                   # Qwen2-MoE: the shared expert's projections
        assert any(p.startswith("shared_expert.") for _, p in adapter.weights)
    manager = LoRAManager(model, max_loras=2, max_lora_rank=4)
    manager.activate(1, adapter)
    seqs = [random_tokens(n, 300, 30 + n) for n in (7, 5)]
    with mk.use_backend(backend):
        got = _run(model, seqs, [1, -1], manager)
    want = torch.cat([_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[1])])
    assert rel_err(got, want) <= 1e-4
    # the expert adapters matter: without the sparse layers' part, the logits differ
    assert rel_err(_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[0])) > 1e-2


def _per_expert_adapter(hf, path: str, names: dict[str, str], r: int = 3,
                        alpha: float = 5.0, seed: int = 0) -> dict:
    """A hand-made adapter on layer 0's experts with one (A, B) per projection of each
    expert (transformers 4.x module names, ``names``: gate / up / down -> the module's
    projection name); returns {(expert, kind): (A, B)}."""
    c = hf.config
    g = torch.Generator().manual_seed(seed)
    h, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    shapes = {"gate": (h, i), "up": (h, i), "down": (i, h)}
    block = "block_sparse_moe" if "w1" in names.values() else "mlp"
    tensors, factors = {}, {}
    for expert in range(e):
        for kind, (k_in, n_out) in shapes.items():
            a = torch.randn(r, k_in, generator=g) / k_in ** 0.5
            b = torch.randn(n_out, r, generator=g) / r
            pre = f"base_model.model.model.layers.0.{block}.experts.{expert}.{names[kind]}"
            tensors[f"{pre}.lora_A.weight"] = a
            tensors[f"{pre}.lora_B.weight"] = b
            factors[(expert, kind)] = (a, b)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none",
               "target_modules": sorted(set(names.values()))},
              open(os.path.join(path, "adapter_config.json"), "w"))
    return factors


@torch.no_grad()
def _merged(hf, factors: dict, scaling: float):
    """A copy of ``hf`` with each expert's update scaling * B A added to its weights."""
    import copy

    merged = copy.deepcopy(hf)
    experts = merged.model.layers[0].mlp.experts
    i = merged.config.moe_intermediate_size
    for (expert, kind), (a, b) in factors.items():
        delta = scaling * (b @ a)
        if kind == "down":
            experts.down_proj[expert] += delta
        else:
            rows = slice(0, i) if kind == "gate" else slice(i, 2 * i)
            experts.gate_up_proj[expert][rows] += delta
    return merged


@pytest.mark.parametrize("names", [{"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                                   {"gate": "w1", "up": "w3", "down": "w2"}],
                         ids=["gate_up_down", "mixtral_w1_w3_w2"])
def test_per_expert_module_adapters_match_merged_weights(tmp_path, names):
    """Adapters saved by PEFT on transformers 4.x (one Linear per expert): per expert and
    projection, its own A / B. The oracle: the HF model with every expert's update merged
    into its stacked weights."""
    hf = make_hf_model("qwen3-moe", seed=8)
    base = save_hf(hf, str(tmp_path / "base"))
    factors = _per_expert_adapter(hf, str(tmp_path / "lora"), names, seed=3)
    model = load_model(base, dtype="float32", device="cpu")
    adapter = LoRAAdapter.load(str(tmp_path / "lora"), model.config)
    assert {k for _, k in adapter.experts} == {"gate", "up", "down"}
    manager = LoRAManager(model, max_loras=1, max_lora_rank=3)
    manager.activate(0, adapter)
    seqs = [random_tokens(n, 300, 50 + n) for n in (6, 9)]
    with mk.use_backend("triton"):
        got = _run(model, seqs, [0, -1], manager)
    want = torch.cat([_ref_logits(_merged(hf, factors, 5 / 3), seqs[0]),
                      _ref_logits(hf, seqs[1])])
    assert rel_err(got, want) <= 1e-4
    # one slot emptied: the base model again
    manager.deactivate(0)
    assert rel_err(_run(model, seqs[:1], [0], manager), _ref_logits(hf, seqs[0])) <= 1e-4


def test_expert_adapter_errors_name_the_tensor(peft_moe, tmp_path):
    hf, base, path, _ = peft_moe["qwen3-moe"]
    model = load_model(base, dtype="float32", device="cpu")
    with pytest.raises(LoRAError, match="max_lora_rank >= 4"):
        LoRAManager(model, max_loras=1, max_lora_rank=3).activate(
            0, LoRAAdapter.load(path, model.config))
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    for what, edit, match in (
            ("no rank pattern", lambda c, t: c.pop("rank_pattern"), "shapes"),
            ("other param", lambda c, t: c.update(target_parameters=["mlp.gate.weight"]),
             "target_parameters entry"),
            ("dense layer", lambda c, t: t.update({
                k.replace("layers.0.", "layers.1."): v.clone() for k, v in t.items()
                if ".experts." in k}), "layer 1"),
            ("half", lambda c, t: t.pop(next(k for k in t if k.endswith(
                "experts.lora_B.weight"))), "without its other half")):
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        c, t = json.loads(json.dumps(cfg)), dict(tensors)
        edit(c, t)
        json.dump(c, open(d / "adapter_config.json", "w"))
        save_file(t, str(d / "adapter_model.safetensors"))
        with pytest.raises(LoRAError, match=match):
            LoRAAdapter.load(str(d), model.config)


def test_engine_greedy_with_expert_adapters(peft_moe):
    from minikernels.engine import LLM, LoRARequest, SamplingParams

    hf, base, path, ref = peft_moe["qwen3-moe"]
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=64,
              block_size=8, enable_lora=True, max_lora_rank=4)
    prompts = [random_tokens(n, 300, 90 + n) for n in (9, 5)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False,
                        lora_request=[LoRARequest("experts", 1, path), None])
    for prompt, out, want_model in zip(prompts, outs, (ref, hf)):
        want = want_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=5,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == want[0, len(prompt):].tolist()


def test_tp_rank_expert_slots_are_slices(peft_moe):
    """Without processes: each rank's expert slots are its intermediate slice of the TP=1
    slots (gate and up rows of B13, columns of A2), A13 / B2 whole."""
    hf, base, path, _ = peft_moe["qwen3-moe"]
    whole = load_model(base, dtype=torch.float32, device="cpu")
    adapter = LoRAAdapter.load(path, whole.config)
    full = LoRAManager(whole, max_loras=1, max_lora_rank=4)
    full.activate(0, adapter)
    ref = full._experts[0]
    i = whole.config.moe_intermediate_size
    for rank in range(2):
        shard = load_model(base, dtype=torch.float32, device="cpu",
                           tensor_parallel=TensorParallel(rank, 2))
        mgr = LoRAManager(shard, max_loras=1, max_lora_rank=4)
        mgr.activate(0, adapter)
        got = mgr._experts[0]
        half = slice(rank * i // 2, (rank + 1) * i // 2)
        up = slice(i + rank * i // 2, i + (rank + 1) * i // 2)
        assert torch.equal(got.a13, ref.a13) and torch.equal(got.b2, ref.b2)
        assert torch.equal(got.b13, torch.cat([ref.b13[:, :, half], ref.b13[:, :, up]], 2))
        assert torch.equal(got.a2, ref.a2[..., half])


@pytest.mark.parametrize("quantization", ["int4", "fp8", "int8"])
def test_expert_adapters_over_quantized_experts(peft_moe, quantization):
    """int4 / fp8 / int8 experts (RTN on load; int8 runs W8A8) take the same expert
    adapters: the Triton path equals the reference backend's (quantized experts +
    the same update), and the adapter moves the logits as much as it does on the dense
    model."""
    hf, base, path, ref = peft_moe["qwen3-moe"]
    model = load_model(base, dtype="float32", device="cpu", quantization=quantization)
    ex = model.layers[0].mlp.experts
    assert ex.w13 is None            # quantized experts
    assert ex.int8_activations == (quantization == "int8")
    manager = LoRAManager(model, max_loras=1, max_lora_rank=4)
    manager.activate(0, LoRAAdapter.load(path, model.config))
    seqs = [random_tokens(n, 300, 40 + n) for n in (6, 5)]
    with mk.use_backend("triton"):
        got = _run(model, seqs, [0, -1], manager)
    with mk.use_backend("reference"):
        want = _run(model, seqs, [0, -1], manager)
    assert rel_err(got, want) <= 2e-3
    # the adapted rows move as PEFT's do on the dense model (within what quantizing every
    # layer changes; an adapter not applied would give a relative error of 1)
    peft_shift = _ref_logits(ref, seqs[0]) - _ref_logits(hf, seqs[0])
    base_rows = model(torch.tensor(seqs[0]), AttentionMetadata.for_prompts([6]), None)
    assert rel_err(got[:6] - base_rows, peft_shift) <= {
        "fp8": 0.1, "int4": 0.3, "int8": 0.1}[quantization]


def test_tp_rank_shared_expert_slots_are_slices(peft_moe):
    """Qwen2-MoE's shared expert under tensor parallel: its gate_up slots keep A whole and
    take B's rows of the rank's shared-expert slice (gate rows, then up rows); its down
    slots take A's columns of that slice and keep B whole."""
    hf, base, path, _ = peft_moe["qwen2-moe"]
    whole = load_model(base, dtype=torch.float32, device="cpu")
    adapter = LoRAAdapter.load(path, whole.config)
    full = LoRAManager(whole, max_loras=1, max_lora_rank=4)
    full.activate(0, adapter)
    i = whole.config.shared_expert_intermediate_size
    name = "layers.0.mlp.shared_expert"
    ref_gu, ref_d = full._layers[f"{name}.gate_up_proj"], full._layers[f"{name}.down_proj"]
    assert bool(ref_gu.b[0].abs().sum() > 0) and bool(ref_d.a[0].abs().sum() > 0)
    for rank in range(2):
        shard = load_model(base, dtype=torch.float32, device="cpu",
                           tensor_parallel=TensorParallel(rank, 2))
        mgr = LoRAManager(shard, max_loras=1, max_lora_rank=4)
        mgr.activate(0, adapter)
        gu, d = mgr._layers[f"{name}.gate_up_proj"], mgr._layers[f"{name}.down_proj"]
        half = slice(rank * i // 2, (rank + 1) * i // 2)
        up = slice(i + rank * i // 2, i + (rank + 1) * i // 2)
        assert torch.equal(gu.a[0], ref_gu.a[0])
        assert torch.equal(gu.b[0], torch.cat([ref_gu.b[0][half], ref_gu.b[0][up]]))
        assert torch.equal(d.a[0], ref_d.a[0][:, half]) and torch.equal(d.b[0], ref_d.b[0])
