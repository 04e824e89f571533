"""The decoder on a GPU (auto backend: Triton / CUDA kernels) against the fp32 CPU reference.
Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from test_model_support import hf_dirs, hf_logits, random_tokens, rel_err, run_schedule

from minikernels.models import AttentionMetadata, load_model
from minikernels.models.generate import generate_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
__all__ = ["hf_dirs"]

HALF_TOL = {torch.float16: 0.02, torch.bfloat16: 0.06}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama3-rope-tied", "qwen2-window", "qwen3", "mistral-window"])
def test_gpu_forward_paths_match_transformers(hf_dirs, kind, dtype):
    hf, path = hf_dirs[kind]
    model = load_model(path, dtype=dtype, device="cuda")
    seqs = [random_tokens(n, hf.config.vocab_size, 20 + n) for n in (14, 37, 9)]
    refs = [hf_logits(hf, s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], device="cuda")
    out = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs], device="cuda"), None)
    assert rel_err(out.cpu(), torch.cat(refs)) <= HALF_TOL[dtype]
    plan = [[("p", 0, 10), ("p", 1, 17)], [("d", 0), ("p", 1, 20), ("p", 2, 5)],
            [("d", 0), ("d", 2)], [("d", 0), ("d", 2)], [("d", 0), ("d", 2)], [("d", 2)]]
    rows = run_schedule(model, seqs, plan, block_size=16)
    got = torch.stack([r.cpu() for _, _, r in rows])
    ref = torch.stack([refs[i][p] for i, p, _ in rows])
    assert rel_err(got, ref) <= HALF_TOL[dtype]


def test_gpu_greedy_matches_cpu_reference_mostly(hf_dirs):
    hf, path = hf_dirs["qwen3"]
    cpu = load_model(path, dtype="float32", device="cpu")
    gpu = load_model(path, dtype="float32", device="cuda")
    prompts = [random_tokens(n, hf.config.vocab_size, n) for n in (5, 11)]
    a = generate_tokens(cpu, prompts, max_new_tokens=8)
    b = generate_tokens(gpu, prompts, max_new_tokens=8)
    assert a == b


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b"])
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_gpu_builtin_dummy_models_run(name, quantization):
    model = load_model(name, dtype="bfloat16", device="cuda", quantization=quantization)
    out = generate_tokens(model, [[1, 2, 3, 4, 5], list(range(100, 140))], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    ids = torch.arange(45, device="cuda")
    logits = model(ids, AttentionMetadata.for_prompts([5, 40], device="cuda", last_only=True),
                   None)
    assert logits.shape == (2, model.config.vocab_size) and torch.isfinite(logits).all()
