"""A CUDA dry run without a GPU: the real code on fake H200 tensors.

torch's ``FakeTensorMode`` makes tensors on device "cuda" that carry shape, dtype and
strides but no data, even in a CPU-only torch build. Inside :func:`fake_h200`:

- minikernels' custom ops run their real Python bodies (not their fake kernels), so the
  backend choice, the routing rules (``q.is_cuda`` ...), the Triton launch parameters and
  every host-side decision follow the CUDA path exactly as on a GPU; Triton launches are
  recorded (:class:`Launch`: kernel, constexprs, warps, stages, pointer dtypes) instead
  of run;
- torch.cuda's device queries answer as an H200 (sm_90, 132 SMs, 141 GB), or as an A100
  with ``fake_gpu(A100)``;
  ``torch.Generator(device="cuda")`` gives a CPU generator (nothing is sampled here);
- the Python bindings that take a CUDA device guard (``copy_``, indexing, ...), which a
  CPU build cannot construct, go to their aten ops; ``"cuda"`` means ``"cuda:0"``;
- safetensors checkpoints load as fake tensors, so ``LLM(path, device="cuda")`` builds
  the whole engine: model, KV pool, sampler, and its CUDA graphs, whose capture runs the
  forward under :meth:`FakeH200.capturing`;
- inside ``capturing()`` (what ``torch.cuda.is_current_stream_capturing()`` then also
  reports), every host synchronisation raises :class:`HostSync` naming the minikernels
  line that did it: reading a value (``item``, ``tolist``, ``numpy``, ``bool`` / ``int``
  / ``float`` of a tensor), a copy between host and device (``.cpu()``, ``.to``, ``copy_``,
  ``torch.tensor(..., device="cuda")``), an op whose output shape depends on values
  (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``, tensor
  ``repeat_interleave``), ``torch.cuda.synchronize``. Under a real capture each of these
  fails or bakes the value seen at capture into every replay.

What it cannot see: anything about values (results are checked by the kernel tests), and
the CUDA C++ extension (not built here: ``auto`` takes Triton, as on a GPU without it).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException, FakeTensorMode)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

CUDA0 = torch.device("cuda", 0)
_GENERATOR = torch.Generator     # (the block replaces torch.Generator by a factory)
aten = torch.ops.aten
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "minikernels"
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))

#: what torch.cuda.get_device_properties answers (an H200's figures)
H200 = types.SimpleNamespace(name="NVIDIA H200 (fake)", major=9, minor=0,
                             multi_processor_count=132, total_memory=141 * 10**9,
                             shared_memory_per_block_optin=232448, L2_cache_size=60 << 20,
                             warp_size=32, regs_per_multiprocessor=65536)
#: an A100 80GB's (sm_80: no fp8, 163 KiB of shared memory per block): ``fake_gpu(A100)``
A100 = types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB (fake)", major=8, minor=0,
                             multi_processor_count=108, total_memory=80 * 10**9,
                             shared_memory_per_block_optin=166912, L2_cache_size=40 << 20,
                             warp_size=32, regs_per_multiprocessor=65536)


class HostSync(AssertionError):
    """A host synchronisation inside a (fake) CUDA graph capture."""


@dataclass
class Launch:
    """One recorded Triton launch."""

    kernel: str
    constexprs: dict[str, Any]
    pointers: dict[str, torch.dtype]
    num_warps: int | None
    num_stages: int | None
    module: str = ""
    #: every argument by name: a tensor as its dtype, scalars and constexprs as passed
    args: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """As JSON for ``aot.compile_launch`` (which compiles it exactly, for a GPU)."""
        args = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in self.args.items()}
        return {"name": f"{self.kernel}{sorted(self.constexprs.items())}", "module": self.module,
                "kernel": self.kernel, "args": args, "constexprs": sorted(self.constexprs),
                "num_warps": self.num_warps,
                "num_stages": self.num_stages}


def _where() -> str:
    """The innermost minikernels line on the stack (else the innermost caller's line
    outside torch and this module)."""
    frame, caller = sys._getframe(2), None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        line = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        if path.startswith(_PKG + os.sep):
            return os.path.relpath(path, os.path.dirname(_PKG)) + line[len(
                frame.f_code.co_filename):]
        if caller is None and path != os.path.abspath(__file__) and \
                not path.startswith(_TORCH + os.sep):
            caller = line
        frame = frame.f_back
    return caller or "?"


def _cuda0(v: Any) -> Any:
    if (isinstance(v, str) and v == "cuda") or (isinstance(v, torch.device)
                                                and v.type == "cuda" and v.index is None):
        return CUDA0
    return v


def _index_parts(t: torch.Tensor, idx: Any) -> tuple[torch.Tensor, list | None]:
    """Basic indexing (ints, slices, None, Ellipsis) as aten views -> (view, the tensor
    indices left for aten.index / index_put_, or None)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    rank = [i.ndim if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
            for i in idx]
    used = sum(r for i, r in zip(idx, rank) if i is not None and i is not Ellipsis)
    out, dim, seen, tensors = t, 0, 0, {}
    for i, r in zip(idx, rank):
        if i is Ellipsis:
            dim += t.ndim - used         # the dims the entries after it leave
        elif i is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
        elif isinstance(i, slice):
            out = aten.slice.Tensor(out, dim, 0 if i.start is None else int(i.start),
                                    (1 << 62) if i.stop is None else int(i.stop),
                                    1 if i.step is None else int(i.step))
            dim, seen = dim + 1, seen + 1
        elif isinstance(i, (torch.Tensor, list)):
            ti = i if isinstance(i, torch.Tensor) else _on(t, torch.tensor(i))
            tensors[dim] = _on(t, ti)
            dim, seen = dim + r, seen + r
        else:                                   # an int (or an object with __index__)
            out, seen = aten.select.int(out, dim, int(i)), seen + 1
    if not tensors:
        return out, None
    indices: list = [None] * (max(tensors) + 1)
    for d, ti in tensors.items():
        indices[d] = ti
    return out, indices


def _forget_constants(args: tuple, kwargs: dict) -> bool:
    """Fake tensors made by torch.tensor(...) keep their values and fake mode runs ops on
    them for real, which a CPU build cannot do on "cuda": drop those values."""
    found = False
    for a in [*args, *kwargs.values()]:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if getattr(t, "constant", None) is not None:
                t.constant, found = None, True
    return found


def _custom_op_body(func: Any) -> Callable | None:
    """The Python implementation of a minikernels custom op (its OpOverload or packet)."""
    from torch._library import custom_ops

    if isinstance(func, torch._ops.OpOverload):
        name = func._schema.name
    elif isinstance(func, torch._ops.OpOverloadPacket):
        name = func._qualified_op_name
    else:
        return None
    op = custom_ops.OPDEFS.get(name) if name.startswith("minikernels::") else None
    return None if op is None else op._init_fn


def _on(t: torch.Tensor, v: Any) -> Any:
    """``v`` on ``t``'s device (a copy into a fresh fake tensor: no constant folding)."""
    if not isinstance(v, torch.Tensor) or v.device == t.device:
        return v
    out = aten.empty_strided.default(v.shape, v.stride() if v.is_contiguous() else
                                     torch.empty(v.shape, device="meta").stride(),
                                     dtype=v.dtype, device=t.device)
    aten.copy_.default(out, v)
    return out


_VALUE_READS = {"item": "item()", "tolist": "tolist()", "numpy": "numpy()",
                "__bool__": "bool(tensor)", "__int__": "int(tensor)",
                "__float__": "float(tensor)", "__index__": "tensor as an index"}
#: Python operators whose aten op has another name
_ATEN_NAMES = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
               "__xor__": "bitwise_xor", "__neg__": "neg", "__abs__": "abs",
               "__lshift__": "bitwise_left_shift", "__rshift__": "bitwise_right_shift"}
_FROM_HOST_DATA = (torch.tensor, torch.as_tensor, torch.asarray)
_SHAPE_FROM_VALUES = {torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero",
                      torch.argwhere: "argwhere", torch.masked_select: "masked_select",
                      torch.Tensor.masked_select: "masked_select", torch.unique: "unique",
                      torch.Tensor.unique: "unique",
                      torch.unique_consecutive: "unique_consecutive"}


class _CudaCalls(TorchFunctionMode):
    """Routes device-guarded bindings to aten (see the module docstring) and, while
    ``capturing``, raises :class:`HostSync` on every host synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.capturing = False      # a graph capture: no sync, no upload
        self.streaming = False      # the overlap path: no sync; non_blocking uploads allowed

    @property
    def watching(self) -> bool:
        return self.capturing or self.streaming

    def _sync(self, what: str, upload: bool = False, non_blocking: bool = False) -> None:
        """Report ``what``; an upload (host -> device copy) is allowed on the overlap path
        when it is non_blocking (it waits for no device work)."""
        if upload and non_blocking and not self.capturing:
            return
        where = "inside a CUDA graph capture" if self.capturing else \
            "on the overlap path (the host would wait for the GPU)"
        raise HostSync(f"{what} {where}, at {_where()}")

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func is torch.device:             # torch.device("cuda", 0) as written
            return func(*args, **(kwargs or {}))
        kwargs = {k: _cuda0(v) for k, v in (kwargs or {}).items()}
        args = tuple(_cuda0(a) for a in args)
        if self.watching:
            self._check(func, args, kwargs)
        if isinstance(kwargs.get("generator"), _GENERATOR):
            kwargs.pop("generator")      # random draws on fake tensors: nothing to draw
        body = _custom_op_body(func)
        if body is not None:
            with self:       # a minikernels op's Python body runs under this mode too
                return body(*args, **kwargs)
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")  # no values to initialise
        if func is torch.Tensor.data_ptr:     # fake storage at a 256-byte aligned 0
            return args[0].storage_offset() * args[0].element_size()
        if func is torch.Tensor.copy_:
            aten.copy_.default(args[0], _on(args[0], args[1]), *args[2:], **kwargs)
            return args[0]
        if func is torch.Tensor.__getitem__ and args[0].is_cuda:
            view, indices = _index_parts(args[0], args[1])
            return view if indices is None else aten.index.Tensor(view, indices)
        if func is torch.Tensor.__setitem__ and args[0].is_cuda:
            t, value = args[0], args[2]
            view, indices = _index_parts(t, args[1])
            if indices is not None:
                value = value if isinstance(value, torch.Tensor) else \
                    aten.full.default([], value, dtype=t.dtype, device=t.device)
                aten.index_put_.default(view, indices, _on(t, value))
            elif isinstance(value, torch.Tensor):
                aten.copy_.default(view, _on(t, value))
            else:
                aten.fill_.Scalar(view, value)
            return None
        if func in _FROM_HOST_DATA and torch.device(kwargs.get("device") or "cpu").type == "cuda":
            if self.watching:
                self._sync(f"{func.__name__}(host data) copied to the device", upload=True)
            cpu = func(*args, **{k: v for k, v in kwargs.items() if k != "device"})
            return _on(aten.empty.memory_format([0], device=CUDA0), cpu)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            if self.watching:
                self._sync(f"{getattr(func, '__name__', func)} (output depends on values: "
                           f"{type(e).__name__})")
            raise
        except NotImplementedError as e:     # a constant (torch.tensor(...)) run for real
            if "'CUDA' backend" not in str(e) or not _forget_constants(args, kwargs):
                raise
            out = func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
            name = getattr(func, "__name__", "")
            packet = getattr(aten, _ATEN_NAMES.get(name, name.strip("_")), None)
            if packet is None:
                raise RuntimeError(f"fake_cuda: {getattr(func, '__name__', func)} needs a CUDA "
                                   f"device guard and has no aten op of its name") from e
            out = packet(*args, **kwargs)
        return out

    def _check(self, func: Callable, args: tuple, kwargs: dict) -> None:
        name = getattr(func, "__name__", "")
        if name in _VALUE_READS and args and isinstance(args[0], torch.Tensor):
            self._sync(_VALUE_READS[name])
        if func in _SHAPE_FROM_VALUES:
            self._sync(_SHAPE_FROM_VALUES[func])
        if func is torch.where and len(args) + len(kwargs) == 1:
            self._sync("torch.where(condition)")
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and \
                len(args) > 1 and isinstance(args[1], torch.Tensor) and \
                kwargs.get("output_size") is None:
            self._sync("repeat_interleave(tensor repeats) without output_size")
        if func is torch.Tensor.cpu:
            self._sync(".cpu()")
        if func in (torch.Tensor.to, torch.Tensor.cuda) and isinstance(args[0], torch.Tensor):
            dev = kwargs.get("device")
            for a in args[1:2]:
                if isinstance(a, (str, torch.device)):
                    dev = torch.device(a)
                elif isinstance(a, torch.Tensor):
                    dev = a.device
            dev = CUDA0 if func is torch.Tensor.cuda else dev
            if dev is not None and torch.device(dev).type != args[0].device.type:
                self._sync(f"copy {args[0].device.type} -> {torch.device(dev).type}",
                           upload=torch.device(dev).type == "cuda",
                           non_blocking=bool(kwargs.get("non_blocking")))
        if func is torch.Tensor.copy_ and isinstance(args[1], torch.Tensor) and \
                args[1].device.type != args[0].device.type:
            self._sync(f"copy_ {args[1].device.type} -> {args[0].device.type}",
                       upload=args[0].is_cuda, non_blocking=bool(
                           kwargs.get("non_blocking", args[2] if len(args) > 2 else False)))
        if func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.ndim > 0
                   for i in idx):
                self._sync("boolean-mask indexing")


@dataclass
class FakeH200:
    """The state of one :func:`fake_h200` block."""

    mode: FakeTensorMode
    calls: _CudaCalls
    launches: list[Launch] = field(default_factory=list)
    props: Any = field(default_factory=lambda: H200)   # what torch.cuda's queries answer

    @contextlib.contextmanager
    def _watch(self, flag: str) -> Iterator[None]:
        was = getattr(self.calls, flag)
        setattr(self.calls, flag, True)
        try:
            yield
        finally:
            setattr(self.calls, flag, was)

    def capturing(self) -> contextlib.AbstractContextManager:
        """A (fake) CUDA graph capture: host synchronisations raise :class:`HostSync`."""
        return self._watch("capturing")

    def overlapping(self) -> contextlib.AbstractContextManager:
        """Host work that must not wait for the GPU (async scheduling: the host prepares
        step N + 1 while step N runs): host syncs raise :class:`HostSync`, as in a
        capture, except uploads with ``non_blocking=True``."""
        return self._watch("streaming")

    def kernels(self) -> set[str]:
        return {launch.kernel for launch in self.launches}

    def fake(self, t: torch.Tensor, device: torch.device | str = CUDA0) -> torch.Tensor:
        """A real tensor's fake copy on ``device`` (data not kept)."""
        return aten._to_copy.default(self.mode.from_tensor(t), device=_cuda0(device))


def _record_launch(state: FakeH200) -> Callable:
    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args)) | kwargs
        state.launches.append(Launch(
            kernel=self.fn.__name__,
            constexprs={k: v for k, v in bound.items()
                        if k in params and "constexpr" in str(params[k].annotation)},
            pointers={k: v.dtype for k, v in bound.items() if isinstance(v, torch.Tensor)},
            num_warps=kwargs.get("num_warps"), num_stages=kwargs.get("num_stages"),
            module=self.fn.__module__,
            args={k: v.dtype if isinstance(v, torch.Tensor) else v
                  for k, v in bound.items() if k in params}))
    return run


def _patches(state: FakeH200) -> dict[tuple[Any, str], Any]:
    from triton.runtime import interpreter, jit

    import minikernels.backend as backend
    import minikernels.engine.eagle as eagle
    import minikernels.engine.model_runner as model_runner
    import minikernels.models.loader as loader

    iter_file = loader._iter_file

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other: Any) -> None:
            pass

    def generator(device: Any = "cpu") -> torch.Generator:
        return _GENERATOR()          # nothing is sampled on fake tensors

    def fake_iter_file(path: str, lazy: bool = False) -> Iterator[tuple[str, Any]]:
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            items = list(iter_file(path, lazy=False))
        for name, t in items:
            if isinstance(t, torch.Tensor):   # keeps its values: the loader's checks read them
                fake, fake.constant = state.mode.from_tensor(t), t
                t = fake
            yield name, t

    def capture(fn: Callable[[], Any], device: torch.device, pool: Any = None
                ) -> tuple[Callable[[], Any], Any]:
        with state.capturing():
            out = fn()
        return (lambda: out), pool

    def synchronize(device: Any = None) -> None:
        if state.calls.watching:
            state.calls._sync("torch.cuda.synchronize")

    launch = _record_launch(state)
    cuda = torch.cuda
    gpu = state.props
    return {
        (cuda, "is_available"): lambda: True, (cuda, "device_count"): lambda: 1,
        (cuda, "current_device"): lambda: 0, (cuda, "set_device"): lambda d: None,
        (cuda, "get_device_capability"): lambda d=None: (gpu.major, gpu.minor),
        (cuda, "get_device_properties"): lambda d=None: gpu,
        (cuda, "get_device_name"): lambda d=None: gpu.name,
        (cuda, "current_stream"): lambda d=None: Stream(),
        (cuda, "is_current_stream_capturing"): lambda: state.calls.capturing,
        (cuda, "synchronize"): synchronize, (cuda, "empty_cache"): lambda: None,
        (cuda, "device"): lambda d=None: contextlib.nullcontext(),     # one fake GPU
        (cuda, "mem_get_info"): lambda d=None: (gpu.total_memory, gpu.total_memory),
        (cuda, "memory_allocated"): lambda d=None: 0,
        (cuda, "max_memory_allocated"): lambda d=None: 0,
        (cuda, "reset_peak_memory_stats"): lambda d=None: None,
        (torch, "Generator"): generator,
        (interpreter.InterpretedFunction, "run"): launch, (jit.JITFunction, "run"): launch,
        (backend, "interpreter_enabled"): lambda: False,     # compiled kernels, as on a GPU
        (loader, "_iter_file"): fake_iter_file,
        (model_runner, "capture_cuda_graph"): capture, (eagle, "capture_cuda_graph"): capture,
    }


@contextlib.contextmanager
def _real_op_bodies() -> Iterator[None]:
    """minikernels' custom ops run their implementations on fake tensors."""
    import minikernels.ops  # noqa: F401  (registers every op)
    from torch._library import custom_ops

    swapped = {op: op._abstract_fn for name, op in custom_ops.OPDEFS.items()
               if name.startswith("minikernels::")}
    for op in swapped:
        op._abstract_fn = op._init_fn
    try:
        yield
    finally:
        for op, fn in swapped.items():
            op._abstract_fn = fn


def _clear_device_caches() -> None:
    """minikernels caches what it asks torch.cuda about a device (capability, SM count):
    forget it when the fake device comes and goes."""
    from minikernels.ops import fp8_w8a8, kv_cache
    from minikernels.ops.triton import fp8_w8a8 as triton_fp8_w8a8
    from minikernels.ops.triton import splitk

    for cached in (fp8_w8a8._capability, kv_cache._sm_count,
                   triton_fp8_w8a8._arch, splitk.arch_and_sms):
        cached.cache_clear()


@contextlib.contextmanager
def fake_gpu(props: Any = H200) -> Iterator[FakeH200]:
    """Run a block as if on the GPU ``props`` describes (H200 or A100; see the module
    docstring)."""
    state = FakeH200(mode=FakeTensorMode(allow_non_fake_inputs=True), calls=_CudaCalls(),
                     props=props)
    patches = _patches(state)
    saved = {key: getattr(*key) for key in patches}
    try:
        for (obj, name), value in patches.items():
            setattr(obj, name, value)
        _clear_device_caches()
        with state.mode, state.calls, _real_op_bodies():
            yield state
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
        _clear_device_caches()


def fake_h200() -> contextlib.AbstractContextManager[FakeH200]:
    """Run a block as if on an H200 (see the module docstring)."""
    return fake_gpu(H200)
