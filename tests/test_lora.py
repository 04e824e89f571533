"""LoRA adapters on the decoder against PEFT itself: adapters made and saved by ``peft``
(random, non-zero B), loaded into slots, give PEFT's logits; one batch mixes two adapters
and the base model; the Triton path equals the reference; errors name the field."""
from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from test_model_support import make_hf_model, random_tokens, rel_err, save_hf

import minikernels as mk
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.lora import LoRAAdapter, LoRAError, LoRAManager

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(hf, path: str, r: int, alpha: float, targets: list[str],
                 rslora: bool = False, seed: int = 0):
    """A random PEFT LoRA adapter on a copy of ``hf``, saved to ``path``; returns the
    PEFT model (the reference)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          use_rslora=rslora, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = make_hf_model("llama", seed=3)
    base = save_hf(hf, str(tmp_path_factory.mktemp("base")))
    a1 = str(tmp_path_factory.mktemp("lora1"))
    a2 = str(tmp_path_factory.mktemp("lora2"))
    ref1 = make_adapter(hf, a1, r=4, alpha=8, targets=ALL, seed=1)
    ref2 = make_adapter(hf, a2, r=2, alpha=3, targets=["q_proj", "v_proj", "down_proj"],
                        rslora=True, seed=2)
    return hf, base, (a1, ref1), (a2, ref2)


@torch.no_grad()
def _ref_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def _run(model, seqs: list[list[int]], slots: list[int], manager: LoRAManager) -> torch.Tensor:
    ids = torch.tensor([t for s in seqs for t in s])
    token_slots = torch.tensor([slot for s, slot in zip(seqs, slots) for _ in s],
                               dtype=torch.int32)
    manager.set_token_slots(token_slots)
    try:
        return model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    finally:
        manager.set_token_slots(None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_batch_matches_peft(setup, backend):
    hf, base, (a1, ref1), (a2, ref2) = setup
    model = load_model(base, dtype="float32", device="cpu")
    manager = LoRAManager(model, max_loras=3, max_lora_rank=8)
    ad1 = LoRAAdapter.load(a1, model.config)
    ad2 = LoRAAdapter.load(a2, model.config, name="second")
    assert (ad1.rank, ad1.scaling) == (4, 2.0)
    assert ad2.rank == 2 and abs(ad2.scaling - 3 / 2 ** 0.5) < 1e-12   # rsLoRA
    manager.activate(2, ad1)
    manager.activate(0, ad2)
    assert manager.names == ["second", None, os.path.basename(a1)]
    seqs = [random_tokens(n, 300, 10 + n) for n in (7, 5, 9)]
    with mk.use_backend(backend):
        got = _run(model, seqs, [2, -1, 0], manager)
    want = torch.cat([_ref_logits(ref1, seqs[0]), _ref_logits(hf, seqs[1]),
                      _ref_logits(ref2, seqs[2])])
    assert rel_err(got, want) <= 1e-4
    # the adapters do change the output (B is not zero)
    assert rel_err(_ref_logits(ref1, seqs[0]), _ref_logits(hf, seqs[0])) > 1e-2
    # without token slots, or with a slot emptied, the model is the base model
    plain = model(torch.tensor(seqs[0]), AttentionMetadata.for_prompts([7]), None)
    assert rel_err(plain, _ref_logits(hf, seqs[0])) <= 1e-4
    manager.deactivate(2)
    again = _run(model, seqs[:1], [2], manager)
    assert rel_err(again, _ref_logits(hf, seqs[0])) <= 1e-4


def test_adapter_errors_name_the_field(setup, tmp_path):
    hf, base, (a1, _), _ = setup
    model = load_model(base, dtype="float32", device="cpu")
    with pytest.raises(LoRAError, match="max_lora_rank"):
        LoRAManager(model, max_loras=1, max_lora_rank=2).activate(
            0, LoRAAdapter.load(a1, model.config))
    cfg = json.load(open(os.path.join(a1, "adapter_config.json")))
    for key, value, match in (("use_dora", True, "use_dora"),
                              ("bias", "all", "bias"),
                              ("modules_to_save", ["lm_head"], "modules_to_save"),
                              ("rank_pattern", {"q_proj": 8}, "shapes"),  # rank 4 saved
                              ("alpha_pattern", {"q_proj": -1}, "alpha_pattern"),
                              ("peft_type", "IA3", "peft_type")):
        d = tmp_path / key
        d.mkdir()
        json.dump({**cfg, key: value}, open(d / "adapter_config.json", "w"))
        os.symlink(os.path.join(a1, "adapter_model.safetensors"),
                   d / "adapter_model.safetensors")
        with pytest.raises(LoRAError, match=match):
            LoRAAdapter.load(str(d), model.config)
    from minikernels.models.config import builtin_config

    with pytest.raises(LoRAError, match="shapes"):                   # another model's
        LoRAAdapter.load(a1, builtin_config("qwen2.5-0.5b"))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        LoRAAdapter.load(str(tmp_path), model.config)


def test_starcoder2_adapter_on_the_non_gated_mlp(tmp_path):
    """PEFT's adapter on StarCoder 2's c_fc / c_proj (its non-gated MLP: c_fc is the one
    part of gate_up_proj) and attention: logits equal PEFT's; a gate_proj target is
    refused by name."""
    hf = make_hf_model("starcoder2-window", seed=4)
    base = save_hf(hf, str(tmp_path / "base"))
    ref = make_adapter(hf, str(tmp_path / "lora"), r=4, alpha=8,
                       targets=["q_proj", "v_proj", "o_proj", "c_fc", "c_proj"], seed=5)
    model = load_model(base, dtype="float32", device="cpu")
    manager = LoRAManager(model, max_loras=2, max_lora_rank=4)
    manager.activate(1, LoRAAdapter.load(str(tmp_path / "lora"), model.config))
    seqs = [random_tokens(n, 300, 40 + n) for n in (9, 6)]
    got = _run(model, seqs, [1, -1], manager)
    want = torch.cat([_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[1])])
    assert rel_err(got, want) <= 1e-4
    assert rel_err(_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[0])) > 1e-2
    llama = make_hf_model("llama", seed=4)
    make_adapter(llama, str(tmp_path / "gated"), r=2, alpha=2, targets=["gate_proj"], seed=6)
    with pytest.raises(LoRAError, match="not gated"):
        LoRAAdapter.load(str(tmp_path / "gated"), model.config)


@pytest.mark.parametrize(("kind", "targets"), [
    ("phi2", ["q_proj", "v_proj", "dense", "fc1", "fc2"]),
    # OPT: out_proj, and fc1 / fc2 directly under the layer (no mlp. module)
    ("opt", ["q_proj", "k_proj", "out_proj", "fc1", "fc2"]),
    # GPT-J: transformer.h.{i}.attn.{q,k,v,out}_proj and mlp.fc_in / fc_out
    ("gptj", ["q_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
    # GPT-2: Conv1D layers (PEFT sets fan_in_fan_out), the fused c_attn, attn.c_proj (the
    # attention output) beside mlp.c_proj (the MLP's down projection)
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    # GPT-BigCode: multi-query c_attn [q; k; v] and per-head c_attn
    ("gpt_bigcode-mqa", ["c_attn", "c_proj", "c_fc"]),
    ("gpt_bigcode-mha", ["c_attn", "c_proj"]),
    # GPT-Neo: attn.attention.{q,k,v,out}_proj, mlp.c_fc / c_proj
    ("gpt_neo", ["q_proj", "v_proj", "out_proj", "c_fc", "c_proj"]),
    # MPT: attn.Wqkv blocks, attn.out_proj, ffn.up_proj / down_proj
    ("mpt", ["Wqkv", "out_proj", "up_proj", "down_proj"]),
    # Nemotron / Arcee: the non-gated MLP's one up_proj (squared ReLU)
    ("nemotron", ["q_proj", "o_proj", "up_proj", "down_proj"]),
    ("arcee", ["k_proj", "up_proj", "down_proj"]),
])
def test_non_gated_adapters(tmp_path, kind, targets):
    """PEFT adapters on the non-gated families under their own names (Phi-2, OPT, GPT-J,
    GPT-2's Conv1D, GPT-BigCode, GPT-Neo, MPT, Nemotron, Arcee): logits equal PEFT's."""
    hf = make_hf_model(kind, seed=4)
    base = save_hf(hf, str(tmp_path / "base"))
    ref = make_adapter(hf, str(tmp_path / "lora"), r=4, alpha=8, targets=targets, seed=5)
    model = load_model(base, dtype="float32", device="cpu")
    manager = LoRAManager(model, max_loras=1, max_lora_rank=4)
    manager.activate(0, LoRAAdapter.load(str(tmp_path / "lora"), model.config))
    seq = random_tokens(9, 300, 41)
    got = _run(model, [seq], [0], manager)
    assert rel_err(got, _ref_logits(ref, seq)) <= 1e-4
    assert rel_err(_ref_logits(ref, seq), _ref_logits(hf, seq)) > 1e-2


@pytest.mark.parametrize(("kind", "targets"), [
    # Phi-3: q / k / v and gate / up stored fused: one A, B's rows over the parts
    ("phi3-longrope-partial", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    # GPT-NeoX: query_key_value's B rows interleaved per head; dense / dense_h_to_4h /
    # dense_4h_to_h
    ("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    # BLOOM: the same per-head layout under transformer.h.{i}.self_attention
    ("bloom", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    # Falcon's new decoder architecture: kv-head groups [q, q, k, v] in B's rows
    ("falcon-new", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
])
def test_adapters_on_fused_projections(tmp_path, kind, targets):
    """PEFT adapters on fused projections (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's
    query_key_value) serve as their parts' adapters: logits equal PEFT's, with a
    rank_pattern / alpha_pattern on the fused module applying to each part."""
    import json

    hf = make_hf_model(kind, seed=4)
    base = save_hf(hf, str(tmp_path / "base"))
    fused = targets[0]
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, rank_pattern={fused: 2},
                          alpha_pattern={fused: 6})
    ref = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    ref.save_pretrained(str(tmp_path / "lora"))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["rank_pattern"]
    model = load_model(base, dtype="float32", device="cpu")
    manager = LoRAManager(model, max_loras=2, max_lora_rank=4)
    manager.activate(1, LoRAAdapter.load(str(tmp_path / "lora"), model.config))
    seqs = [random_tokens(9, 300, 41), random_tokens(5, 300, 42)]
    got = _run(model, seqs, [1, -1], manager)
    ref_rows = torch.cat([_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[1])])
    assert rel_err(got, ref_rows) <= 1e-4
    assert rel_err(_ref_logits(ref, seqs[0]), _ref_logits(hf, seqs[0])) > 1e-2


def test_attn_block_names_of_another_family_are_refused(tmp_path):
    """GPT-2's ``attn.c_attn`` names on a Llama model are not read as its attention."""
    import json

    from safetensors.torch import save_file

    hf = make_hf_model("llama", seed=4)
    base = save_hf(hf, str(tmp_path / "base"))
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                       "lora_alpha": 2}))
    save_file({"base_model.model.model.layers.0.attn.c_attn.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.0.attn.c_attn.lora_B.weight": torch.zeros(128, 2)},
              str(d / "adapter_model.safetensors"))
    model = load_model(base, dtype="float32", device="cpu")
    with pytest.raises(LoRAError, match="unexpected adapter tensor"):
        LoRAAdapter.load(str(d), model.config)
