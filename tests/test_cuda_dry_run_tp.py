"""Tensor parallel on a fake H200: both ranks' decode graphs capture, their steps never
wait for the GPU, and every Triton launch is compiled ahead of time.

The single-GPU dry run (tests/test_cuda_dry_run.py) cannot reach the tensor-parallel
code: its engine needs a process group whose collectives CUDA graphs can capture (NCCL).
Here torch's fake process group (``torch.testing._internal.distributed.fake_pg``: every
collective a no-op) stands in for NCCL, as rank 0 of a two-rank torchrun world:

- rank 0 builds the whole engine, ``LLM(path, tensor_parallel_size=2, device="cuda")``,
  through the torchrun path (``attach_tensor_parallel``), so its ModelRunner captures the
  decode graphs with ``TensorParallelDecodeGraphs`` and every all-reduce / logits
  all-gather sits inside the captures; then a prefill, a mixed and a decode step run
  eagerly through its ``TensorParallelModel``, which sends each step to the workers;
- rank 1 then runs the worker loop (``serve_steps``) on its own shard over exactly the
  commands rank 0 sent (alloc, graphs, forward), so its captures and steps are checked
  too - a worker's forward that waited for the GPU would stall its launches.

Values are not computed (fake tensors); tests/test_tensor_parallel*.py check the logits
of TP=2 against TP=1 on the CPU (gloo).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from fake_cuda import fake_h200  # noqa: E402
from test_cuda_dry_run import (GRAPH_SIZES, assert_compiled_ahead,  # noqa: E402
                               build_on_fake_h200, check_engine, run_eager_steps)
from test_model_support import make_hf_model, save_hf  # noqa: E402
from test_tensor_parallel import TP_CASES  # noqa: E402
from test_tensor_parallel_hybrid import HYBRID_CASES  # noqa: E402

from minikernels.distributed import torchrun  # noqa: E402
from minikernels.distributed.tensor_parallel import (CollectiveLink,  # noqa: E402
                                                     TensorParallelModel, serve_steps)
from minikernels.models.loader import load_model  # noqa: E402
from minikernels.models.parallel import TensorParallel  # noqa: E402

#: a sample of the tensor-parallel cases: KV heads split and replicated (tied head), a
#: vocab that does not split evenly with Gemma 2's softcap on the gathered logits, ALiBi
#: slopes per rank, experts (one all-reduce), and hybrids (Gated DeltaNet, Mamba-2 with
#: one group over two ranks and experts, Gemma 4)
CASES = {name: TP_CASES[name] for name in
         ("llama", "qwen2-tied-kv1", "gemma2-softcap", "bloom", "qwen3-moe")}
CASES |= {name: HYBRID_CASES[name] for name in ("qwen3_5_moe", "granite4-h-moe", "gemma4")}
CASES["llama-int4"] = TP_CASES["llama"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dry_run_tp")

    class Dirs(dict):
        def __missing__(self, name: str) -> str:
            kind, over = CASES[name]
            path = str(root / name)
            save_hf(make_hf_model(kind, **over), path)
            self[name] = path
            return path
    return Dirs()


@pytest.fixture
def fake_world(monkeypatch):
    """Rank 0 of a two-rank torchrun world whose collectives are no-ops; yields the list
    of commands rank 0 sends to its workers."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    sent: list[tuple] = []
    # The control group (gloo, for headers) is the fake default group; its headers are
    # recorded instead of broadcast, and no rank reports a load error.
    monkeypatch.setattr(dist, "new_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(torchrun, "gather_errors", lambda *args, **kwargs: [])
    monkeypatch.setattr(CollectiveLink, "send", lambda self, cmd: sent.append(cmd))
    # The fake group stands in for NCCL, whose collectives CUDA graphs capture.
    monkeypatch.setattr(TensorParallelModel, "supports_cuda_graphs",
                        property(lambda self: self.device.type == "cuda"))
    try:
        yield sent
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_worker(path: str, kw: dict, commands: list[tuple]) -> list:
    """Rank 1's shard on a fake H200 serving rank 0's commands -> its Triton launches.
    Its captures must not sync; its eager steps neither (index checks off, as it runs
    them)."""
    cmds = iter(commands)
    with fake_h200() as gpu:
        tp = TensorParallel(1, 2, None)
        shard = load_model(path, dtype="bfloat16", device="cuda", tensor_parallel=tp,
                           **kw)
        off = [n for n, t in [*shard.named_parameters(), *shard.named_buffers()]
               if not t.is_cuda]
        assert not off, f"rank 1: not on the GPU: {off[:5]}"
        with gpu.overlapping():
            serve_steps(shard, tp, torch.device("cuda", 0), lambda: next(cmds, None))
    return gpu.launches


@pytest.mark.parametrize("name", sorted(CASES))
def test_tensor_parallel_engine_runs_on_gpus(checkpoints, fake_world, name):
    """Both ranks: decode graphs capture sync-free, eager steps never wait for the GPU,
    every Triton launch is AOT-compiled, and the workers see the commands in order."""
    kw = {"quantization": "int4"} if name.endswith("-int4") else {}
    llm, launches = build_on_fake_h200(checkpoints[name], tensor_parallel_size=2, **kw)
    model = llm.llm_engine.runner.model
    assert isinstance(model, TensorParallelModel) and model.tp.size == 2
    check_engine(llm, launches)
    assert_compiled_ahead(run_eager_steps(model))
    kinds = [cmd[0] for cmd in fake_world]
    assert kinds[0] == "alloc" and "graphs" in kinds and kinds.count("forward") >= 3, kinds
    graphs = next(cmd for cmd in fake_world if cmd[0] == "graphs")
    assert graphs[2] == GRAPH_SIZES
    worker_launches = run_worker(checkpoints[name], kw, fake_world)
    assert worker_launches, "rank 1 launched no Triton kernel"
    assert_compiled_ahead(worker_launches)
    model.close()
