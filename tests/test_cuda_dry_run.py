"""The CUDA paths, dry-run on the CPU: engines built on a fake H200 (tests/fake_cuda.py).

Every model family of test_model_support (bf16; fp32 for a sample) is built with
``LLM(..., device="cuda")`` on fake CUDA tensors: the loader, the KV pool and the capture
of the decode CUDA graphs run the real code down to the Triton launches, which are
recorded; then a prefill, a mixed and a decode step run eagerly through the model.
Checked:

- no host synchronisation inside a capture (a ``.tolist()`` of seq_lens, a host tensor
  copied in, a boolean mask, ...): on a GPU these fail the capture or freeze a value
  into every replay;
- no host synchronisation in an eager step's forward either (index checks off, as the
  engine runs it): with async scheduling the host prepares the next step meanwhile;
- every parameter and buffer of the model is on the GPU;
- every Triton launch (kernel and its flag constexprs, the switches that change the
  compiled code) is among the configurations compiled ahead of time for sm_80 / sm_90a
  (registry; tests/test_aot_compile.py), so the GPU runs only kernels the suite has
  compiled (no spills, wgmma where expected);
- with ``MK_AOT=all`` (before a GPU run): every distinct launch, with its exact tiles,
  dtypes and integer specializations, compiles for sm_90a as its first launch on the GPU
  would (``aot --launches``), without spills and within the shared memory per block.

The harness itself is checked first: each kind of host sync is caught, named with its
line, and the ops' real bodies run (their CUDA routing and launches, not fake kernels).
The engine's variants (quantized, MoE, fp8 KV, LoRA, speculation), real-sized built-in
models and the sampler: tests/test_cuda_dry_run_variants.py. Values are not computed
here (fake tensors carry none): the kernel tests check results.
"""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

pytest.importorskip("triton")

from conftest import AOT_SUBSET  # noqa: E402
from fake_cuda import H200, HostSync, Launch, fake_gpu, fake_h200  # noqa: E402
from test_model_support import CASES, make_hf_model, run_schedule, save_hf  # noqa: E402

from minikernels import ops  # noqa: E402
from minikernels.engine import LLM  # noqa: E402
from minikernels.engine.model_runner import index_checks_off  # noqa: E402
from minikernels.nn import PagedAttention  # noqa: E402
from minikernels.ops.triton.registry import all_kernels  # noqa: E402

GRAPH_SIZES = [1, 2, 4, 8, 16]
#: fp32 engines on a GPU (the model tests' dtype) for a sample of the families: dense,
#: MoE, sliding windows + softcaps, recurrent (Mamba 2, Gated DeltaNet, short conv)
FP32_CASES = ("llama", "qwen3", "gemma2-window-softcap", "gemma3", "qwen3-moe", "mamba2",
              "qwen3_5", "lfm2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """kind -> a saved tiny transformers checkpoint, made on first use."""
    root = tmp_path_factory.mktemp("dry_run")

    class Dirs(dict):
        def __missing__(self, kind: str) -> str:
            path = str(root / kind)
            save_hf(make_hf_model(kind), path)
            self[kind] = path
            return path
    return Dirs()


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_on_fake_h200(path: str, dtype: str = "bfloat16", gpu_props: object = H200,
                       **kw) -> tuple[LLM, list[Launch]]:
    """LLM(path) on a fake H200 (or the GPU ``gpu_props`` describes: A100) with graphs for
    batch 1..16 -> (llm, Triton launches). The engine falls back to eager steps (with a
    warning) when a capture raises: here that fails the build."""
    warnings, log = _Warnings(), logging.getLogger("minikernels")
    log.addHandler(warnings)
    try:
        with fake_gpu(gpu_props) as gpu:
            llm = LLM(path, dtype=dtype, device="cuda", tokenizer=None, num_kv_blocks=64,
                      block_size=16, max_num_seqs=16, **kw)
    finally:
        log.removeHandler(warnings)
    failed = [m for m in warnings.messages if "not captured" in m]
    assert not failed, failed
    return llm, gpu.launches


# ------------------------------------------------------------------ AOT coverage
def _constexpr_defaults(fn) -> dict:
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    return {k: p.default for k, p in params.items()
            if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}


def _flags(constexprs: dict, fn) -> tuple:
    """The switches of a configuration: its bool / str constexprs (defaults filled in)."""
    full = _constexpr_defaults(fn) | constexprs
    return tuple(sorted((k, v) for k, v in full.items() if isinstance(v, (bool, str))))


_AOT: dict[int, dict[str, tuple[object, set[tuple]]]] = {}


def aot_flag_sets(arch: int = 90) -> dict[str, tuple[object, set[tuple]]]:
    """kernel name -> (its jit function, the flag combinations compiled ahead of time for
    ``arch``: 90 = sm_90a, 80 = sm_80)."""
    if arch not in _AOT:
        table = _AOT[arch] = {}
        for spec in all_kernels():
            if arch not in spec.archs:
                continue
            name = getattr(spec.fn, "fn", spec.fn).__name__
            fn, flags = table.setdefault(name, (spec.fn, set()))
            flags.add(_flags(spec.constexprs, spec.fn))
    return _AOT[arch]


def assert_compiled_ahead(launches: list[Launch], arch: int = 90) -> None:
    """Each launch's kernel and flag combination is a registered AOT configuration of
    ``arch`` (the fake GPU's: 90 for the H200, 80 for the A100)."""
    aot = aot_flag_sets(arch)
    missing = set()
    for launch in launches:
        if launch.kernel not in aot:
            missing.add((launch.kernel, "no AOT spec at all"))
            continue
        fn, compiled = aot[launch.kernel]
        flags = _flags(launch.constexprs, fn)
        if flags not in compiled:
            missing.add((launch.kernel, flags))
    assert not missing, "launched on the GPU path but never compiled ahead of time: " + \
        "; ".join(f"{k} {dict(f) if isinstance(f, tuple) else f}" for k, f in sorted(
            missing, key=str))


def compile_exactly(records: list[dict], tmp_path, archs: tuple[int, ...] = (90,)
                    ) -> list[dict]:
    """Compile recorded launches (``Launch.record()``) exactly, as their first launch on
    a GPU of each arch would (``python -m minikernels.ops.triton.aot --launches``, in a
    process without the Triton interpreter); fails on any compile error, register spill
    or shared memory over the arch's limit. -> the compile results."""
    import json
    import os
    import subprocess
    import sys

    path, out = tmp_path / "launches.json", tmp_path / "compiled.json"
    path.write_text(json.dumps(records, default=str))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "minikernels.ops.triton.aot", "--launches", str(path),
           "--json", str(out)]
    for arch in archs:
        cmd += ["--arch", str(arch)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    bad = [ln for ln in res.stdout.splitlines() if not ln.startswith("ok")]
    assert res.returncode == 0 and out.exists(), "\n".join(bad)[-6000:] or res.stderr[-3000:]
    return json.loads(out.read_text())


def check_engine(llm: LLM, launches: list[Launch], arch: int = 90) -> None:
    runner = llm.llm_engine.runner
    assert runner.graphs is not None and runner.graphs.sizes == GRAPH_SIZES
    model = runner.model
    off = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_cuda]
    assert not off, f"not on the GPU: {off[:5]}"
    assert launches, "the captures launched no Triton kernel"
    assert_compiled_ahead(launches, arch)


# ------------------------------------------------------------------ the harness
SYNCS = {
    "item": lambda x: x.sum().item(),
    "tolist": lambda x: x.tolist(),
    "bool": lambda x: bool((x > 0).any()),
    "int": lambda x: int(x[0, 0]),
    "cpu": lambda x: x.cpu(),
    "to-host": lambda x: x.to("cpu"),
    "host-to-device": lambda x: torch.ones(3).to(x.device),
    "copy_-from-host": lambda x: x[0].copy_(torch.zeros(x.shape[1])),
    "torch.tensor": lambda x: torch.tensor([1, 2], device=x.device),
    "nonzero": lambda x: x.nonzero(),
    "where": lambda x: torch.where(x > 0),
    "mask-index": lambda x: x[x > 0],
    "mask-assign": lambda x: x.__setitem__(x > 0, 0.0),
    "unique": lambda x: torch.unique(x),
    "synchronize": lambda x: torch.cuda.synchronize(),
}


@pytest.mark.parametrize("kind", sorted(SYNCS))
def test_each_host_sync_inside_a_capture_is_caught(kind):
    with fake_h200() as gpu:
        x = torch.randn(4, 6, device="cuda")
        with gpu.capturing(), pytest.raises(HostSync, match="test_cuda_dry_run.py"):
            SYNCS[kind](x)
        with gpu.capturing():      # device work alone is fine
            y = (x * 2).softmax(-1)[:, 1:3]
            y[0] = 1.0
            x.index_fill_(0, torch.zeros(1, dtype=torch.long, device=x.device), 0.0)
        assert y.is_cuda and y.shape == (4, 2)


def test_overlap_mode_allows_only_non_blocking_uploads():
    """overlapping() (async scheduling's host work): as a capture, but a non_blocking
    upload waits for no device work and is allowed; a blocking one syncs the stream."""
    with fake_h200() as gpu:
        x = torch.zeros(4, device="cuda")
        with gpu.overlapping():
            x.copy_(torch.ones(4), non_blocking=True)
            y = torch.arange(4).to(x.device, non_blocking=True)
            for sync in (lambda: torch.ones(4).to(x.device), lambda: x.copy_(torch.ones(4)),
                         lambda: torch.tensor([1.0], device=x.device), lambda: x.tolist(),
                         lambda: x.to("cpu", non_blocking=True), lambda: x[x > 0]):
                with pytest.raises(HostSync, match="overlap path"):
                    sync()
        assert y.is_cuda and not torch.cuda.is_current_stream_capturing()


def test_ops_run_their_cuda_path():
    """Custom ops run their bodies (routing, launch parameters), not fake kernels: a
    bf16 RMSNorm launches the Triton kernel on bf16 pointers; the reference backend
    launches nothing."""
    import minikernels as mk

    with fake_h200() as gpu:
        x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
        with gpu.capturing():
            y = ops.rms_norm(x, w, 1e-6)
        assert y.is_cuda and y.dtype == torch.bfloat16 and y.shape == x.shape
        assert [launch.kernel for launch in gpu.launches] == ["rms_norm_kernel"]
        assert gpu.launches[0].pointers["x_ptr"] == torch.bfloat16
        assert gpu.launches[0].constexprs["RNE_BF16"] is False   # compiled, not interpreted
        with mk.use_backend("reference"):
            ops.rms_norm(x, w, 1e-6)
        assert len(gpu.launches) == 1


def test_fp32_paged_decode_runs_triton_inside_a_capture():
    """fp32 decode on a GPU used to route to the reference, whose seq_lens.tolist()
    breaks the capture of every fp32 engine's decode graphs: now the Triton kernel, with
    exact dots and one pipeline stage (the AOT-compiled fp32 configuration)."""
    with fake_h200() as gpu:
        q = torch.randn(4, 8, 128, device="cuda")
        cache = torch.zeros(32, 16, 2, 128, device="cuda")
        table = torch.zeros(4, 8, dtype=torch.int32, device="cuda")
        lens = torch.full((4,), 100, dtype=torch.int32, device="cuda")
        with gpu.capturing():
            out = ops.paged_decode_attention(q, cache, cache, table, lens, softmax_scale=0.1)
        assert out.is_cuda and out.shape == q.shape and out.dtype == torch.float32
        decode = [x for x in gpu.launches if x.kernel == "paged_decode_kernel"]
        assert decode and all(x.constexprs["DOT_PRECISION"] == "ieee" and x.num_stages == 1
                              for x in decode)
        assert_compiled_ahead(gpu.launches)


def test_attention_buffers_are_made_on_the_layer_device():
    """k_scale / v_scale (fp8 KV), sinks and ALiBi slopes live where the layer does: they
    were made on the CPU whatever the device (sinks followed k_scale), so fp8-KV engines
    and Granite SWA / GPT-OSS would fail their device checks on a GPU."""
    with fake_h200():
        attn = PagedAttention(8, 2, 64, sinks=True, alibi_slopes=torch.ones(8),
                              device="cuda")
        for name in ("k_scale", "v_scale", "sinks", "alibi_slopes"):
            assert getattr(attn, name).is_cuda, name
    cpu = PagedAttention(8, 2, 64, sinks=True)
    assert cpu.k_scale.device.type == cpu.sinks.device.type == "cpu"


# ------------------------------------------------------------------ engines
def run_eager_steps(model, gpu_props: object = H200) -> list[Launch]:
    """A prefill step (two chunks), a mixed step (a decode row and a chunk over its cached
    prefix) and a decode step through the model on a fake H200, each forward as the
    engine runs an eager step (index checks off) under ``overlapping()``: with async
    scheduling the host prepares the next step meanwhile, so a forward that waited for
    the GPU would serialise them. -> the Triton launches."""
    with fake_gpu(gpu_props) as gpu:
        forward = model.forward

        def eager_step(*args, **kwargs):
            with index_checks_off(), gpu.overlapping():
                return forward(*args, **kwargs)
        model.forward = eager_step
        try:
            run_schedule(model, [list(range(3, 17)), list(range(5, 26))],
                         [[("p", 0, 5), ("p", 1, 9)], [("d", 0), ("p", 1, 11)],
                          [("d", 0), ("d", 1)]])
        finally:
            del model.forward
    return gpu.launches


@pytest.mark.parametrize("kind,dtype", [(k, "bfloat16") for k in CASES] +
                         [(k, "float32") for k in FP32_CASES])
def test_engine_runs_on_a_gpu(checkpoints, kind, dtype):
    """The engine's CUDA graphs capture; its eager steps never wait for the GPU."""
    llm, launches = build_on_fake_h200(checkpoints[kind], dtype)
    check_engine(llm, launches)
    assert_compiled_ahead(run_eager_steps(llm.llm_engine.runner.model))


class _UnvalidatedExtension:
    """Stands in for a built minikernels._C whose kernels no GPU run has validated: any
    kernel looked up on it is recorded (hasattr checks included)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.used.append(name)
        raise AssertionError(f"auto called the unvalidated CUDA kernel {name}")


def test_auto_keeps_unvalidated_cuda_kernels_out_of_an_engine(checkpoints, monkeypatch):
    """With the extension built but none of its kernels in backend.CUDA_VALIDATED, an int4
    engine on a GPU (its decode GEMVs, RMSNorms, KV writes and paged decode: the ops with
    CUDA C++ kernels) runs only Triton under auto, graphs and eager steps alike."""
    from minikernels import backend

    ext = _UnvalidatedExtension()
    monkeypatch.setattr(backend, "_cuda_ext", ext)
    monkeypatch.setattr(backend, "CUDA_VALIDATED", frozenset())
    llm, launches = build_on_fake_h200(checkpoints["llama"], quantization="int4")
    launches += run_eager_steps(llm.llm_engine.runner.model)
    kernels = {x.kernel for x in launches}
    assert {"rms_norm_kernel", "paged_decode_kernel"} <= kernels, kernels
    assert any("int4" in k for k in kernels), kernels
    assert ext.used == []


@pytest.mark.skipif(AOT_SUBSET != "all", reason="compiles ~190 distinct launches (~7 "
                    "CPU-minutes): with MK_AOT=all, before a GPU run")
def test_model_families_launch_kernels_that_compile(checkpoints, tmp_path):
    """Every distinct kernel launch of every family's engine (graph captures and eager
    steps; the GPU's model tests run these tiny shapes: head dims of 8-32, odd widths)
    compiles for sm_90a exactly as its first launch on the H200 would, with no register
    spills and within its shared memory per block."""
    records = []
    for kind, dtype in [(k, "bfloat16") for k in CASES] + [(k, "float32")
                                                           for k in FP32_CASES]:
        llm, launches = build_on_fake_h200(checkpoints[kind], dtype)
        launches += run_eager_steps(llm.llm_engine.runner.model)
        records += [launch.record() for launch in launches]
    compiled = compile_exactly(records, tmp_path)
    assert len(compiled) >= 150


@pytest.mark.skipif(AOT_SUBSET != "all", reason="compiles ~150 distinct launches (~3 "
                    "CPU-minutes): with MK_AOT=all, before a GPU run")
def test_model_families_on_an_a100(checkpoints, tmp_path):
    """The same on a fake A100: every family's engine (bf16) captures sync-free, launches
    only sm_80 AOT configurations, and its exact launches (tiles and split counts as an
    A100 picks them) compile for sm_80 with no spills, within 163 KiB of shared memory."""
    from fake_cuda import A100

    records = []
    for kind in CASES:
        llm, launches = build_on_fake_h200(checkpoints[kind], "bfloat16", gpu_props=A100)
        check_engine(llm, launches, arch=80)
        eager = run_eager_steps(llm.llm_engine.runner.model, A100)
        assert_compiled_ahead(eager, arch=80)
        records += [launch.record() for launch in launches + eager]
    compiled = compile_exactly(records, tmp_path, archs=(80,))
    assert len(compiled) >= 140       # 149 distinct launches (2026-12-03)
