"""The checkpoint's generation_config.json as default sampling (vLLM's --generation-config):
reading it, LLM.get_default_sampling_params / generate, and the server's request defaults.
"""
from __future__ import annotations

import json
import os

import openai
import pytest
from test_server_fake import MODEL, FakeEngine

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.generation_config import sampling_defaults
from minikernels.server import create_app
from minikernels.server.testing import LiveServer

QWEN_LIKE = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
             "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7,
             "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}


def _write(folder: str, content: object) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(content, f)
    return folder


def test_reads_the_sampling_fields_only(tmp_path):
    d = _write(str(tmp_path / "m"), {**QWEN_LIKE, "max_new_tokens": 512, "min_p": 0.05,
                                     "num_beams": 4, "typical_p": 0.9})
    assert sampling_defaults(d) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                    "min_p": 0.05, "repetition_penalty": 1.05,
                                    "max_tokens": 512}
    assert sampling_defaults(d, "vllm") == {} and sampling_defaults(d, "none") == {}
    other = _write(str(tmp_path / "other"), {"temperature": 0.3})
    assert sampling_defaults(d, other) == {"temperature": 0.3}     # an explicit folder
    assert sampling_defaults(None) == {}                          # built-in model
    assert sampling_defaults(str(tmp_path / "empty")) == {}       # no such file: none
    # transformers' top_k = 0 ("no top-k") and nulls
    zero = _write(str(tmp_path / "zero"), {"top_k": 0, "temperature": None})
    assert sampling_defaults(zero) == {"top_k": -1}


def test_bad_generation_config_names_file_and_field(tmp_path):
    bad = _write(str(tmp_path / "bad"), {"temperature": -1.0})
    with pytest.raises(ValueError, match=r"generation_config.json: temperature = -1.0"):
        sampling_defaults(bad)
    with pytest.raises(ValueError, match="must hold a JSON object"):
        sampling_defaults(_write(str(tmp_path / "list"), [1, 2]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        sampling_defaults(str(broken))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sampling_defaults(str(tmp_path / "m"), str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="generation_config must be"):
        sampling_defaults(str(tmp_path), generation_config=1)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_model_support import make_hf_model, save_hf

    path = str(tmp_path_factory.mktemp("gen_cfg_llama"))
    save_hf(make_hf_model("llama"), path)
    # top_k 1: sampling with these defaults is greedy decoding, whatever the seed
    _write(path, {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.9, "top_k": 1,
                  "top_p": 0.95, "max_new_tokens": 7})
    return path


KW = dict(dtype="float32", device="cpu", enforce_eager=True, num_kv_blocks=64,
          block_size=16, tokenizer=None)


def test_llm_defaults_come_from_the_checkpoint(model_dir):
    llm = LLM(model_dir, **KW)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.9, 1, 0.95, 7)
    assert llm.sampling_defaults == {"temperature": 0.9, "top_k": 1, "top_p": 0.95,
                                     "max_tokens": 7}
    prompt = [5, 9, 3, 17, 4]
    out = llm.generate([prompt], use_tqdm=False)[0].outputs[0]          # defaults
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7,
                                                   ignore_eos=True), use_tqdm=False)
    assert len(out.token_ids) <= 7
    assert out.token_ids == greedy[0].outputs[0].token_ids[:len(out.token_ids)]
    plain = LLM(model_dir, generation_config="vllm", **KW)
    assert plain.sampling_defaults == {}
    assert plain.get_default_sampling_params().max_tokens == SamplingParams().max_tokens


class DefaultsEngine(FakeEngine):
    """The fake engine with a checkpoint's sampling defaults."""

    sampling_defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                         "repetition_penalty": 1.05, "max_tokens": 9}


@pytest.fixture(scope="module")
def defaults_server():
    engine = DefaultsEngine(max_model_len=64)
    with LiveServer(create_app(engine, served_model_name=MODEL)) as srv:
        yield srv, engine


def test_server_fills_unset_fields_from_the_defaults(defaults_server):
    srv, engine = defaults_server
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                "content": "hi"}])
    p = engine.seen_params[r.id + "-0"]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert p.max_tokens == 9                      # max_new_tokens, not the whole context
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                "content": "hi"}],
                                       temperature=0, top_p=1.0, max_tokens=3,
                                       extra_body={"top_k": -1})
    p = engine.seen_params[r.id + "-0"]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0, 1.0, -1, 3)
    assert p.repetition_penalty == 1.05           # still the default: not in the request
    r = client.completions.create(model=MODEL, prompt="Hello")
    p = engine.seen_params[r.id + "-0"]
    assert (p.temperature, p.max_tokens) == (0.7, 9)      # not OpenAI's 16
    # a prompt with less room than max_new_tokens: capped to the context, not refused
    r = client.completions.create(model=MODEL, prompt=["x" * 60, "short"])
    assert engine.seen_params[r.id + "-0"].max_tokens == 4
    assert engine.seen_params[r.id + "-1"].max_tokens == 9
    with pytest.raises(openai.BadRequestError, match="context"):   # explicit: refused
        client.completions.create(model=MODEL, prompt="x" * 60, max_tokens=9)


def test_engine_without_defaults_keeps_openai_defaults(tmp_path):
    engine = FakeEngine()
    app = create_app(engine, served_model_name=MODEL)
    assert app.state.server.sampling_defaults == {}
