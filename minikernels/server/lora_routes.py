"""Loading and unloading LoRA adapters while serving: vLLM's ``POST /v1/load_lora_adapter``
and ``POST /v1/unload_lora_adapter``, on only with ``--allow-runtime-lora-updating``
(they make the server read a directory a client names; behind the API key).

A loaded adapter is read and checked against the model (PEFT format, target layers,
rank <= ``--max-lora-rank``) off the event loop before its name is accepted, so a bad
one is a 400 and never reaches the engine; it then serves as ``"model": <name>`` exactly
as a ``--lora-modules`` one, under a new ``lora_int_id`` (an id never names two
adapters). Unloading removes the name: new requests for it are 404s, requests already
running finish on it.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from ..engine.lora import LoRARequest
from ..models.lora import LoRAAdapter, LoRAError
from .errors import APIError
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .streaming import ClientGone

if TYPE_CHECKING:
    from .app import ServerState


def engine_lora_slots(engine: Any) -> list[Any]:
    """The EngineLoRA of the engine (or of each data-parallel replica); [] without
    ``enable_lora``."""
    engines = list(getattr(engine, "replicas", None) or [engine])
    slots = [getattr(getattr(e, "engine", None), "lora", None) for e in engines]
    return [] if any(s is None for s in slots) else slots


def register_lora_routes(app: FastAPI, state: "ServerState",
                         parse: Callable[[Request, type], Awaitable[tuple[Any, Any]]],
                         gone_response: Callable[[], Response]) -> None:
    """Add the two routes to ``app`` (``parse``: :func:`.routes.register_routes`' parser,
    auth included)."""
    lock = asyncio.Lock()   # one load / unload at a time: names and ids stay consistent

    def allowed() -> list[Any]:
        if not state.allow_runtime_lora_updating:
            raise APIError("loading LoRA adapters at runtime is off (start the server with "
                           "--allow-runtime-lora-updating)", status=404, code="not_found")
        slots = engine_lora_slots(state.engine)
        if not slots:
            raise APIError("this server's engine was built without LoRA (start it with "
                           "--enable-lora)", param="lora_name", code="model_not_supported")
        return slots

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        try:
            req, _ = await parse(request, LoadLoRAAdapterRequest)
        except ClientGone:
            return gone_response()
        slots = allowed()
        async with lock:
            name = req.lora_name
            if name in state.lora_modules:
                raise APIError(f"The lora adapter '{name}' has already been loaded.",
                               param="lora_name", code="invalid_value")
            if name in state.model_names or name in state.aliases:
                raise APIError(f"'{name}' is the served model's name", param="lora_name",
                               code="invalid_value")
            config, rank = slots[0].config, slots[0].manager.max_lora_rank

            def read() -> LoRAAdapter:
                adapter = LoRAAdapter.load(req.lora_path, config, name)
                if adapter.needed_rank() > rank:
                    raise LoRAError(f"adapter {name!r} needs max_lora_rank >= "
                                    f"{adapter.needed_rank()} (rank {adapter.rank}), above "
                                    f"max_lora_rank {rank}")
                return adapter
            try:
                await asyncio.get_running_loop().run_in_executor(None, read)
            except (LoRAError, ValueError, OSError) as exc:
                raise APIError(f"cannot load the LoRA adapter at {req.lora_path!r}: {exc}",
                               param="lora_path", code="invalid_value") from None
            state.lora_modules[name] = LoRARequest(name, state.lora_next_id, req.lora_path)
            state.lora_next_id += 1
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        try:
            req, _ = await parse(request, UnloadLoRAAdapterRequest)
        except ClientGone:
            return gone_response()
        allowed()
        async with lock:
            lora = state.lora_modules.get(req.lora_name)
            if lora is None or (req.lora_int_id is not None
                                and req.lora_int_id != lora.lora_int_id):
                raise APIError(f"The lora adapter '{req.lora_name}' cannot be found.",
                               status=404, param="lora_name", code="not_found")
            del state.lora_modules[req.lora_name]
        return PlainTextResponse(
            f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
