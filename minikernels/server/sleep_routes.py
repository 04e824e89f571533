"""Sleep mode over HTTP, for RL loops that drive a running server (vLLM's dev-mode
routes): ``POST /sleep?level=1|2``, ``POST /wake_up[?tags=weights&tags=kv_cache]``,
``GET /is_sleeping`` and ``POST /reset_prefix_cache``, and SGLang's ``POST
/update_weights_from_disk {"model_path": dir}`` (the served model's weights replaced in
place from a safetensors checkpoint of the same architecture: a trainer saves, the
server reloads). Served only with ``--enable-sleep-mode`` (they let a client free the
server's GPU memory and name server directories); behind the API key like ``/v1/*``.
A weight reload is all or nothing: the whole checkpoint is first checked against the
served model (every replica; rank 0's shard under tensor parallel) from its safetensors
headers alone, off the event loop, and a bad tensor (unknown name, wrong shape or
dtype), a corrupt file or a wrong config is a 400 naming it, the weights untouched.

Each call waits until the engine is idle: requests already running finish first, requests
that arrive meanwhile wait and start after it (``AsyncLLM.call_when_idle``), so nothing
is cut off or lost. While the engine sleeps, a generation request is answered 503
``engine_sleeping`` (``POST /wake_up`` first). With data parallel every replica sleeps and
wakes; with tensor parallel every rank (engine/sleep.py).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .errors import APIError, JSONBody
from .protocol import UpdateWeightsFromDiskRequest
from .streaming import ClientGone

if TYPE_CHECKING:
    from .app import ServerState

WAKE_TAGS = ("weights", "kv_cache")


def _engines(engine: Any) -> list[Any]:
    """The AsyncLLM (or each data-parallel replica)."""
    return list(getattr(engine, "replicas", None) or [engine])


def _checkpoint_tensors(files: list[str]) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) of every text tensor of the safetensors ``files``."""
    from ..models.loader import _iter_file

    for f in files:
        for name, tensor in _iter_file(f):
            if tensor is not None:
                yield name, tensor


#: safetensors header dtypes -> torch dtype names
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                       "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                       "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
                       "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _checkpoint_headers(files: list[str]) -> list[tuple[str, Any]]:
    """(HF name, meta tensor of its shape and dtype) of every text tensor of the
    safetensors ``files``, from their headers: no tensor data is read, except fp8
    KV-cache scales (a few values each, checked to be finite and > 0). ValueError for a
    corrupt or truncated file or a dtype torch lacks."""
    import torch
    from safetensors import SafetensorError

    from ..models.loader import _iter_file

    out = []
    for path in files:
        try:
            for name, part in _iter_file(path, lazy=True):
                if part is None:
                    continue
                dtype = getattr(torch, _SAFETENSORS_DTYPES.get(part.get_dtype(), ""), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{name}: unsupported dtype {part.get_dtype()}")
                if name.endswith(("k_scale", "v_scale")):
                    out.append((name, part[...]))
                else:
                    out.append((name, torch.empty(part.get_shape(), dtype=dtype,
                                                  device="meta")))
        except SafetensorError as exc:
            raise ValueError(f"{os.path.basename(path)}: {exc}") from None
    return out


def _same_architecture(engine: Any, model_dir: str) -> None:
    """ValueError unless ``model_dir``'s config.json describes the served model's shapes."""
    from ..models.config import DecoderConfig

    with open(os.path.join(model_dir, "config.json")) as f:
        theirs = DecoderConfig.from_hf(json.load(f))
    ours = engine.engine.config
    fields = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim", "num_experts", "tie_word_embeddings")
    diff = [k for k in fields if getattr(theirs, k) != getattr(ours, k)]
    if diff:
        raise ValueError(f"its config differs from the served model's in {diff}")


def register_sleep_routes(app: FastAPI, state: "ServerState",
                          authenticate: Callable[[Request], Optional[str]],
                          parse: Callable[[Request, type], Awaitable[tuple[Any, Any]]],
                          gone_response: Callable[[], Response]) -> None:
    """Add the routes to ``app`` (``authenticate``: the API-key check; ``parse``: the
    JSON body parser of :func:`.routes.register_routes`)."""
    lock = asyncio.Lock()     # one sleep / wake / reset at a time

    def allowed(request: Request) -> list[Any]:
        authenticate(request)
        if not state.enable_sleep_mode:
            raise APIError("sleep mode is off (start the server with --enable-sleep-mode)",
                           status=404, code="not_found")
        engines = _engines(state.engine)
        if not all(hasattr(e, "call_when_idle") for e in engines):
            raise APIError("this server's engine has no sleep mode", code="not_supported")
        return engines

    async def on_every_engine(engines: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
        async with lock:
            return await each_engine(engines, fn)

    async def each_engine(engines: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
        """``fn(engine)`` on every engine once it is idle (the caller holds ``lock``)."""
        try:
            return await asyncio.gather(*(e.call_when_idle(fn) for e in engines))
        except ValueError as exc:
            raise APIError(str(exc) or type(exc).__name__, code="invalid_value") from None
        except RuntimeError as exc:       # e.g. weights asleep
            raise APIError(str(exc) or type(exc).__name__, code="invalid_state",
                           status=409) from None

    def one_query(request: Request, name: str) -> Optional[str]:
        values = request.query_params.getlist(name)
        if len(values) > 1:
            raise APIError(f"{name} is given {len(values)} times", param=name)
        return values[0] if values else None

    @app.post("/sleep")
    async def sleep(request: Request) -> Response:
        engines = allowed(request)
        raw = one_query(request, "level")
        if raw not in (None, "1", "2"):
            raise APIError(f"level must be 1 or 2, got {raw!r}", param="level",
                           code="invalid_value")
        level = int(raw or 1)
        await on_every_engine(engines, lambda eng: eng.sleep(level))
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(request: Request) -> Response:
        engines = allowed(request)
        tags = request.query_params.getlist("tags") or None
        if tags is not None:
            bad = [t for t in tags if t not in WAKE_TAGS]
            if bad:
                raise APIError(f"tags must be among {list(WAKE_TAGS)}, got {bad}",
                               param="tags", code="invalid_value")
        await on_every_engine(engines, lambda eng: eng.wake_up(tags))
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping(request: Request) -> Response:
        engines = allowed(request)
        return JSONBody({"is_sleeping": any(bool(getattr(e, "is_sleeping", False))
                                            for e in engines)})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        engines = allowed(request)
        await on_every_engine(engines, lambda eng: eng.reset_prefix_cache())
        return Response(status_code=200)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        try:
            req, _ = await parse(request, UpdateWeightsFromDiskRequest)
        except ClientGone:
            return gone_response()
        engines = allowed(request)
        path = req.model_path

        def check() -> list[str]:          # off the event loop: it reads the disk
            from ..models.loader import checkpoint_files

            if not os.path.isdir(path):
                raise ValueError("not a directory")
            for e in engines:
                _same_architecture(e, path)
            found = checkpoint_files(path)     # safetensors only (pickles are refused)
            headers = _checkpoint_headers(found)
            for e in engines:                  # every tensor, before any is copied
                e.engine.load_weights(headers, dry_run=True)
            return found
        async with lock:     # no sleep / wake between the check and the load
            try:
                found = await asyncio.get_running_loop().run_in_executor(None, check)
            except (ValueError, OSError) as exc:
                raise APIError(f"cannot load weights from {path!r}: {exc}",
                               param="model_path", code="invalid_value") from None
            except RuntimeError as exc:       # the weights are asleep
                raise APIError(str(exc) or type(exc).__name__, code="invalid_state",
                               status=409) from None
            counts = await each_engine(        # checked: streamed, never held at once
                engines, lambda eng: eng.load_weights(_checkpoint_tensors(found), stream=True))
        return JSONBody({"success": True, "num_tensors": int(counts[0]),
                         "message": f"loaded {counts[0]} tensors from {len(found)} file(s)"})
