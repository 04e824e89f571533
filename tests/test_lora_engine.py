"""LoRA requests through the engine (``LLM(enable_lora=True)``, vLLM's ``lora_request``):
greedy tokens equal PEFT's own generation for each adapter and transformers' for the base
model in one ``generate`` call; with one slot for two adapters the scheduler runs them
in turn (a request waiting for a slot does not block the others); adapters never share
prefix-cache entries; errors before anything is queued."""
from __future__ import annotations

import asyncio

import pytest
import torch
from test_lora import ALL, make_adapter
from test_model_support import make_hf_model, random_tokens, save_hf

from minikernels.engine import LLM, AsyncLLM, LoRARequest, SamplingParams
from minikernels.models.lora import LoRAError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = make_hf_model("llama", seed=3)
    base = save_hf(hf, str(tmp_path_factory.mktemp("base")))
    paths, refs = [], []
    for i, (r, targets) in enumerate([(4, ALL), (2, ["q_proj", "v_proj", "down_proj"])]):
        path = str(tmp_path_factory.mktemp(f"lora{i}"))
        refs.append(make_adapter(hf, path, r=r, alpha=2 * r, targets=targets, seed=i + 1))
        paths.append(path)
    return hf, base, paths, refs


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], n: int = 6) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("max_loras", [2, 1])
def test_mixed_requests_match_peft_and_base(setup, max_loras):
    hf, base, paths, refs = setup
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=128,
              block_size=8, enable_lora=True, max_loras=max_loras, max_lora_rank=8)
    lora = [LoRARequest("first", 1, paths[0]), LoRARequest("second", 2, paths[1])]
    prompts = [random_tokens(n, 300, 40 + n) for n in (9, 6, 11, 7)]
    which = [lora[0], None, lora[1], lora[0]]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=which)
    models = {None: hf, 1: refs[0], 2: refs[1]}
    for prompt, lr, out in zip(prompts, which, outs):
        want = _hf_greedy(models[None if lr is None else lr.lora_int_id], prompt)
        assert out.outputs[0].token_ids == want, (lr, max_loras)
    # at most max_loras adapters held slots at once; with one slot, the second adapter
    # waited for the first's requests to finish and then took its slot
    assert len(llm.llm_engine.lora.slot_of) <= max_loras
    if max_loras == 1:
        assert llm.llm_engine.lora.in_slot == [2]
    assert llm.llm_engine.block_manager.num_free_blocks == \
        llm.llm_engine.block_manager.num_blocks


def test_adapters_never_share_prefix_cache(setup):
    hf, base, paths, refs = setup
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=128,
              block_size=8, enable_lora=True, max_loras=2, max_lora_rank=8)
    first = LoRARequest("first", 1, paths[0])
    prompt = random_tokens(25, 300, 7)
    a = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=first)[0]
    again = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=first)[0]
    plain = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    other = llm.generate([prompt], GREEDY, use_tqdm=False,
                         lora_request=LoRARequest("second", 2, paths[1]))[0]
    assert again.num_cached_tokens >= 16          # the same adapter reuses its blocks
    assert plain.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert a.outputs[0].token_ids == again.outputs[0].token_ids == _hf_greedy(refs[0], prompt)
    assert plain.outputs[0].token_ids == _hf_greedy(hf, prompt)
    assert other.outputs[0].token_ids == _hf_greedy(refs[1], prompt)


def test_async_engine_lora_request(setup):
    hf, base, paths, refs = setup
    engine = AsyncLLM.from_args(base, dtype="float32", device="cpu", tokenizer=None,
                                num_kv_blocks=64, block_size=8, enable_lora=True,
                                max_loras=1, max_lora_rank=8)
    prompt = random_tokens(8, 300, 3)

    async def run(lr):
        last = None
        async for out in engine.generate(prompt, GREEDY, f"r{id(lr)}", lora_request=lr):
            last = out
        return last.outputs[0].token_ids

    async def both():
        return await asyncio.gather(run(LoRARequest("first", 1, paths[0])), run(None),
                                    run(LoRARequest("second", 2, paths[1])))

    try:
        got = asyncio.run(both())
    finally:
        asyncio.run(engine.shutdown())
    assert got == [_hf_greedy(refs[0], prompt), _hf_greedy(hf, prompt),
                   _hf_greedy(refs[1], prompt)]


def test_errors_before_anything_is_queued(setup, tmp_path):
    hf, base, paths, _ = setup
    plain = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([[1, 2]], GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("x", 1, paths[0]))
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32,
              enable_lora=True, max_loras=1, max_lora_rank=2)
    with pytest.raises(LoRAError, match="max_lora_rank"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("big", 1, paths[0]))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("none", 3, str(tmp_path)))
    llm.generate([[1, 2]], GREEDY, use_tqdm=False, lora_request=LoRARequest("s", 2, paths[1]))
    with pytest.raises(ValueError, match="already names"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("s", 2, paths[0]))
    assert not llm.llm_engine.requests
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, paths[0])


def test_server_routes_lora_modules_by_model_name(tmp_path):
    """--lora-modules through the OpenAI server: "model": <adapter name> runs the adapter
    (PEFT's tokens), the served name runs the base model, /v1/models lists both, an
    unknown name is a 404; a bad adapter stops create_app at startup, naming it."""
    import openai
    from test_server_engine import make_tiny_model
    from transformers import LlamaForCausalLM

    from minikernels.server import create_app
    from minikernels.server.testing import LiveServer

    base = make_tiny_model(str(tmp_path / "base"))
    hf = LlamaForCausalLM.from_pretrained(base).float().eval()
    paths = [str(tmp_path / "a1"), str(tmp_path / "a2")]
    refs = [make_adapter(hf, paths[0], r=4, alpha=8, targets=ALL, seed=1),
            make_adapter(hf, paths[1], r=2, alpha=4, targets=["q_proj", "down_proj"], seed=2)]
    engine = AsyncLLM.from_args(base, dtype="float32", device="cpu", num_kv_blocks=64,
                                block_size=8, enable_lora=True, max_loras=2, max_lora_rank=8)
    tok = engine.tokenizer
    prompt = "hello world, the"
    ids = tok.encode(prompt)
    try:
        app = create_app(engine, api_key="k", served_model_name="base",
                         lora_modules={"first": paths[0], "second": paths[1]})
        with LiveServer(app) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="k",
                                   max_retries=0)
            listed = {m.id: m.model_extra.get("parent") for m in client.models.list()}
            assert listed == {"base": None, "first": "base", "second": "base"}
            for name, want in (("first", refs[0]), ("base", hf), ("second", refs[1])):
                r = client.completions.create(model=name, prompt=prompt, max_tokens=6,
                                              temperature=0, extra_body={"ignore_eos": True})
                assert r.choices[0].text == tok.decode(_hf_greedy(want, ids)), name
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="third", prompt=prompt, max_tokens=2)
    finally:
        asyncio.run(engine.shutdown())
    fresh = AsyncLLM.from_args(base, dtype="float32", device="cpu", num_kv_blocks=16,
                               enable_lora=True, max_lora_rank=8)
    plain = AsyncLLM.from_args(base, dtype="float32", device="cpu", num_kv_blocks=16)
    try:
        with pytest.raises(LoRAError, match="adapter_config.json"):
            create_app(fresh, lora_modules={"bad": base})
        with pytest.raises(ValueError, match="enable_lora"):
            create_app(plain, lora_modules={"first": paths[0]})
    finally:
        asyncio.run(fresh.shutdown())
        asyncio.run(plain.shutdown())


def test_cli_lora_flags():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m", "--lora-modules", "sql=/a/b", "chat=/c", "--max-loras",
                              "2", "--max-lora-rank", "32"])
    assert args.lora_modules == [("sql", "/a/b"), ("chat", "/c")]
    kw = engine_kwargs(args)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"]) == (True, 2, 32)
    assert "enable_lora" not in engine_kwargs(parser.parse_args(["m"]))
    runtime = parser.parse_args(["m", "--allow-runtime-lora-updating"])
    assert runtime.allow_runtime_lora_updating and engine_kwargs(runtime)["enable_lora"]
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--lora-modules", "no-path"])


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_with_adapters(setup, method):
    """Speculation with LoRA requests: the verification rows carry their adapter's slot
    (drafts from the base draft model or n-grams are only proposals), so greedy tokens
    equal PEFT's per adapter and transformers' for the base model."""
    hf, base, paths, refs = setup
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
            if method == "ngram" else
            {"method": "draft_model", "model": base, "num_speculative_tokens": 3})
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=128,
              block_size=8, enable_lora=True, max_loras=2, max_lora_rank=8,
              speculative_config=spec)
    loras = [LoRARequest("first", 1, paths[0]), None, LoRARequest("second", 2, paths[1])]
    prompts = [([5 + i, 40 + 3 * i, 77, 9 + i] * 6)[:13 + 4 * i] for i in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False, lora_request=loras)
    for prompt, lr, out in zip(prompts, loras, outs):
        model = hf if lr is None else refs[lr.lora_int_id - 1]
        assert out.outputs[0].token_ids == _hf_greedy(model, prompt, 10), (method, lr)
    assert llm.stats()["spec_num_draft_tokens"] > 0


def test_runtime_lora_loading(tmp_path):
    """--allow-runtime-lora-updating: /v1/load_lora_adapter checks an adapter off the event
    loop (a bad one is a 400 naming lora_path), then "model": <name> runs it (PEFT's
    tokens); /v1/unload_lora_adapter makes the name a 404 again; a reloaded name gets a
    new lora_int_id. Off by default (404), and refused without --enable-lora."""
    import httpx
    from test_server_engine import make_tiny_model
    from transformers import LlamaForCausalLM

    from minikernels.server import create_app
    from minikernels.server.testing import LiveServer

    base = make_tiny_model(str(tmp_path / "base"))
    hf = LlamaForCausalLM.from_pretrained(base).float().eval()
    path = str(tmp_path / "a1")
    ref = make_adapter(hf, path, r=4, alpha=8, targets=ALL, seed=1)
    big = str(tmp_path / "big")
    make_adapter(hf, big, r=16, alpha=16, targets=["q_proj"], seed=2)
    engine = AsyncLLM.from_args(base, dtype="float32", device="cpu", num_kv_blocks=64,
                                block_size=8, enable_lora=True, max_loras=2, max_lora_rank=8)
    plain = AsyncLLM.from_args(base, dtype="float32", device="cpu", num_kv_blocks=16)
    tok = engine.tokenizer
    prompt = "hello world, the"
    want = tok.decode(_hf_greedy(ref, tok.encode(prompt)))
    headers = {"Authorization": "Bearer k"}

    def post(srv, route, body):
        return httpx.post(srv.base_url + route, json=body, headers=headers, timeout=60)

    def complete(srv, model):
        return post(srv, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True})
    try:
        app = create_app(engine, api_key="k", served_model_name="base",
                         allow_runtime_lora_updating=True)
        with LiveServer(app) as srv:
            assert complete(srv, "mine").status_code == 404
            r = post(srv, "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": path})
            assert r.status_code == 200 and "added successfully" in r.text
            first = app.state.server.lora_modules["mine"].lora_int_id
            assert complete(srv, "mine").json()["choices"][0]["text"] == want
            models = httpx.get(srv.base_url + "/v1/models", headers=headers).json()["data"]
            assert {m["id"] for m in models} == {"base", "mine"}
            for body, param in (({"lora_name": "mine", "lora_path": path}, "lora_name"),
                                ({"lora_name": "x", "lora_path": base}, "lora_path"),
                                ({"lora_name": "x", "lora_path": big}, "lora_path"),
                                ({"lora_name": "base", "lora_path": path}, "lora_name"),
                                ({"lora_name": "", "lora_path": path}, "lora_name")):
                r = post(srv, "/v1/load_lora_adapter", body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "max_lora_rank" in post(srv, "/v1/load_lora_adapter", {
                "lora_name": "x", "lora_path": big}).json()["error"]["message"]
            r = post(srv, "/v1/unload_lora_adapter", {"lora_name": "mine"})
            assert r.status_code == 200 and "removed" in r.text
            assert complete(srv, "mine").status_code == 404
            assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 404
            assert post(srv, "/v1/load_lora_adapter", {"lora_name": "mine",
                                                       "lora_path": path}).status_code == 200
            assert app.state.server.lora_modules["mine"].lora_int_id > first
            assert complete(srv, "mine").json()["choices"][0]["text"] == want
            assert httpx.post(srv.base_url + "/v1/load_lora_adapter", timeout=60, json={
                "lora_name": "y", "lora_path": path}).status_code == 401
        with LiveServer(create_app(engine, api_key="k", served_model_name="base")) as srv:
            assert post(srv, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": path
                                                       }).status_code == 404
        with LiveServer(create_app(plain, api_key="k", served_model_name="base",
                                   allow_runtime_lora_updating=True)) as srv:
            r = post(srv, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": path})
            assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
    finally:
        asyncio.run(engine.shutdown())
        asyncio.run(plain.shutdown())


def test_adapters_on_an_fp8_base(setup):
    """LoRA over fp8 base weights (quantization='fp8'): greedy tokens equal PEFT's on the
    transformers model holding those fp8 weights dequantized."""
    import copy

    import peft

    from minikernels.models import load_model

    hf, base, paths, _ = setup
    fp8 = load_model(base, dtype="float32", device="cpu", quantization="fp8")
    deq = copy.deepcopy(hf)
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj",
                                                                          "up_proj")}
    with torch.no_grad():
        for name, lin in fp8.linear_layers():
            if not lin.is_fp8:
                continue
            prefix, fused = name.rsplit(".", 1)
            rows = torch.split(lin.dense_weight(), lin.output_sizes)
            for sub, w in zip(parts.get(fused, (fused,)), rows):
                deq.get_submodule(f"model.{prefix}.{sub}").weight.copy_(w)
    ref = peft.PeftModel.from_pretrained(deq, paths[0]).eval()
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=64,
              block_size=8, enable_lora=True, max_lora_rank=8, quantization="fp8")
    prompts = [random_tokens(n, 300, 60 + n) for n in (9, 5)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("first", 1, paths[0]))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(ref, prompt)


def test_adapters_on_a_mixture_of_experts_model(tmp_path):
    """Qwen3-MoE (layer 0 sparse, layer 1 dense): an adapter on every attention projection,
    and one on every projection (PEFT puts the experts' part on their stacked parameters):
    greedy tokens equal PEFT's. A dense-MLP target on a sparse layer is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf = make_hf_model("qwen3-moe", seed=4)
    base = save_hf(hf, str(tmp_path / "base"))
    path = str(tmp_path / "lora")
    ref = make_adapter(hf, path, r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj",
                                                        "o_proj"], seed=5)
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=64,
              block_size=8, enable_lora=True, max_lora_rank=8)
    prompts = [random_tokens(n, 300, 70 + n) for n in (9, 5)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("moe", 1, path))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(ref, prompt)
    experts = str(tmp_path / "experts")
    ref2 = make_adapter(hf, experts, r=4, alpha=8, targets=ALL, seed=6)  # + the experts
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("experts", 2, experts))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(ref2, prompt)
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    t = load_file(f"{bad}/adapter_model.safetensors")
    for half, shape in (("A", (4, 64)), ("B", (128, 4))):
        t[f"base_model.model.model.layers.0.mlp.gate_proj.lora_{half}.weight"] = \
            torch.zeros(shape)
    save_file(t, f"{bad}/adapter_model.safetensors")
    with pytest.raises(LoRAError, match="mixture-of-experts layer"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("bad", 3, bad))
