"""Tensor parallel under torchrun's environment (env:// rendezvous), on CPU / gloo.

Two plain processes get what ``torchrun --nproc-per-node 2`` would give them (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and both run the same script calling
``LLM(path, tensor_parallel_size=2)``: rank 0 gets the engine and generates, rank 1 serves
the steps inside the constructor and exits 0 when rank 0 closes the model. Greedy tokens
equal TP=1 here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_model_support import make_hf_model, random_tokens, save_hf

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import json, sys
import torch
import minikernels as mk

torch.set_num_threads(1)
path, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = mk.LLM(path, tensor_parallel_size=2, **json.loads(sys.argv[4]))
# only rank 0 gets here: the other rank served the steps and exited in the constructor
params = mk.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
outs = llm.generate(prompts, params)
with open(out, "w") as f:
    json.dump([list(o.outputs[0].token_ids) for o in outs], f)
llm.llm_engine.model.close()
"""
KW = {"dtype": "float32", "device": "cpu", "tokenizer": None, "block_size": 4,
      "num_kv_blocks": 32, "max_num_batched_tokens": 12}


@pytest.mark.slow   # spawns worker processes (small: run in CI)
def test_llm_under_torchrun_env_equals_tp1(tmp_path):
    import minikernels as mk
    from minikernels.distributed import free_port

    path = save_hf(make_hf_model("qwen3"), str(tmp_path / "model"))
    prompts = [random_tokens(n, 300, 70 + n) for n in (4, 15)]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "tokens.json"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), path, str(out), json.dumps(prompts), json.dumps(KW)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    params = mk.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [list(o.outputs[0].token_ids) for o in mk.LLM(path, **KW).generate(prompts, params)]
    assert json.loads(out.read_text()) == want


def test_in_torchrun_needs_the_env_and_a_world_above_one(monkeypatch):
    from minikernels.distributed.torchrun import in_torchrun

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not in_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert not in_torchrun()              # a world of one: spawn workers as usual
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert in_torchrun()
