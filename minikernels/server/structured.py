"""OpenAI request fields -> output constraints (StructuredOutputsParams), and back.

- ``response_format``: {"type": "text"} (none), {"type": "json_object"}, or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}.
- vLLM's ``structured_outputs`` field: {"json" | "json_object" | "regex" | "choice" |
  "grammar": ..., "disable_any_whitespace"?}.
- Forced tool calls (``tool_choice`` "required" or a named function), vLLM's approach: the
  output is constrained to JSON built from the functions' parameter schemas, so arguments
  always parse; :func:`calls_from_forced_output` turns that JSON into ``tool_calls``. A named
  function's output is its arguments object; "required" gives a JSON array of
  {"name", "parameters"} objects (one item unless parallel tool calls are allowed).

Every problem raises :class:`ConstraintError` naming the offending field (a 400).

:class:`ConstraintCompiler` compiles a request's constraint on the engine's grammar
compiler (its worker thread, cached by constraint) before the request is admitted: a bad
schema is a 400 naming the field, and a new schema never stalls the event loop or the
engine step (the engine's own compile in ``add_request`` is then a cache hit).
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any, Optional

from ..engine.structured_outputs import StructuredOutputsParams
from .tool_parsers import ToolCall


class ConstraintError(ValueError):
    """A bad constraint field: ``param`` names it for the OpenAI error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_SO_KEYS = ("json", "json_object", "regex", "choice", "grammar", "disable_any_whitespace")


def from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise ConstraintError("response_format", "response_format must be an object with a "
                              "'type' of 'text', 'json_object' or 'json_schema'")
    kind = rf["type"]
    extra = set(rf) - {"type", "json_schema"}
    if extra:
        raise ConstraintError("response_format", f"response_format has unknown fields "
                              f"{sorted(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ConstraintError("response_format.type", f"response_format.type {kind!r} is not "
                              "supported (text, json_object, json_schema)")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConstraintError("response_format.json_schema", "response_format.json_schema "
                              "must be an object with a 'name' and a 'schema'")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise ConstraintError("response_format.json_schema", f"response_format.json_schema "
                              f"has unknown fields {sorted(unknown)}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ConstraintError("response_format.json_schema.schema",
                              "response_format.json_schema.schema must be an object")
    return _params("response_format.json_schema.schema", json=schema or {"type": "object"})


def from_structured_outputs(field: Any) -> StructuredOutputsParams | None:
    if field is None:
        return None
    if not isinstance(field, dict):
        raise ConstraintError("structured_outputs", "structured_outputs must be an object")
    unknown = set(field) - set(_SO_KEYS)
    if unknown:
        raise ConstraintError("structured_outputs", f"structured_outputs has unknown fields "
                              f"{sorted(unknown)} (allowed: {', '.join(_SO_KEYS)})")
    return _params("structured_outputs", **field)


def _params(param: str, **kw: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(param, str(exc)) from None


def function_specs(tools: Any) -> dict[str, dict[str, Any]]:
    """OpenAI ``tools`` -> {name: parameters schema}; ConstraintError naming ``tools``."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError("tools", "tools must be a non-empty array")
    specs: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not fn["name"]:
            raise ConstraintError(f"tools[{i}]", f"tools[{i}] must be "
                                  '{"type": "function", "function": {"name": ..., ...}}')
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ConstraintError(f"tools[{i}].function.parameters",
                                  "function parameters must be a JSON schema object")
        if fn["name"] in specs:
            raise ConstraintError(f"tools[{i}]", f"duplicate function name {fn['name']!r}")
        specs[fn["name"]] = params or {"type": "object", "properties": {}}
    return specs


def forced_tool_constraint(tools: Any, tool_choice: Any, parallel_tool_calls: bool = True
                           ) -> tuple[StructuredOutputsParams, str | None] | None:
    """Constraint for tool_choice "required" / a named function; None otherwise.

    Returns (params, name): name is the forced function's, or None for "required".
    """
    if tool_choice in (None, "none", "auto"):
        return None
    specs = function_specs(tools)
    if tool_choice == "required":
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [name]},
                                 "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in specs.items()]
        schema = {"type": "array", "minItems": 1,
                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        return _params("tools", json=schema), None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in specs:
            raise ConstraintError("tool_choice", f"tool_choice names function {name!r}, "
                                  f"which is not in tools ({sorted(specs)})")
        return _params(f"tools.{name}.parameters", json=specs[name]), name
    raise ConstraintError("tool_choice", 'tool_choice must be "none", "auto", "required" '
                          'or {"type": "function", "function": {"name": ...}}')


def calls_from_forced_output(text: str, name: str | None) -> list[ToolCall]:
    """The constrained output of :func:`forced_tool_constraint` -> tool calls.

    (A length-truncated output may not parse: then no calls, and the caller keeps the text.)
    """
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if name is not None:
        return [ToolCall(name, json.dumps(value, ensure_ascii=False))] \
            if isinstance(value, dict) else []
    calls = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(ToolCall(item["name"],
                                  json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


class ConstraintCompiler:
    """Precompiles constraints on an :class:`~minikernels.engine.AsyncLLM`'s engine.

    ``engine.engine`` (the LLMEngine) must have ``_structured_manager()``; an engine
    without it (a test double) does not support constraints: :meth:`compile` raises
    ConstraintError naming the field.
    """

    _PREFIX = re.compile(r"^structured_outputs\.\w+ is not supported: "
                         r"(\[[\d:]+\] \S+:\d+: )?")    # xgrammar's log-line prefix

    def __init__(self, engine: Any) -> None:
        self._inner = getattr(engine, "engine", None)
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        return callable(getattr(self._inner, "_structured_manager", None))

    def _submit(self, params: StructuredOutputsParams) -> Any:
        manager = getattr(self._inner, "structured", None)
        if manager is None:
            with self._lock:            # built once
                manager = self._inner._structured_manager()
        return manager.submit(params)

    async def compile(self, params: StructuredOutputsParams, param: str,
                      executor: Optional[Any] = None) -> None:
        """Compile ``params`` (cached); ConstraintError(param, why) when it cannot be."""
        if not self.supported:
            raise ConstraintError(param, f"{param}: structured outputs are not supported by "
                                  "this server's engine")
        loop = asyncio.get_running_loop()
        try:
            # submit canonicalizes the schema (its cache key): off the loop too, like the
            # manager's first construction (it reads the whole vocabulary).
            future = await loop.run_in_executor(executor, self._submit, params)
            await asyncio.wrap_future(future)
        except ValueError as exc:
            detail = self._PREFIX.sub("", str(exc))
            raise ConstraintError(param, f"{param} is not supported: {detail}") from None
