"""Decode a request body into a JSON object, refusing what OpenAI refuses.

``parse_json_object(raw)`` returns the decoded dict or raises a 400 :class:`APIError`
naming the offending field for:

- bytes that are not UTF-8 JSON, or a top-level value that is not an object;
- ``NaN`` / ``Infinity`` literals and numbers that overflow a float (JSON has no NaN);
- nesting deeper than ``max_depth`` (a 1000-deep body used to hit Python's recursion
  limit and answer 500);
- strings holding a lone UTF-16 surrogate (``"\\ud800"``): they cannot be encoded, so
  neither the tokenizer nor an error message quoting them could handle them.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import APIError

MAX_JSON_DEPTH = 32


class _NonFinite:
    """Placeholder the decoder puts where the body had NaN, Infinity or 1e400."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if value - value == 0.0 else _NonFinite(text)


def format_path(path: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _check_string(s: str, path: tuple) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            param = format_path(path) or None
            raise APIError(f"{param or 'body'}: string holds a lone UTF-16 surrogate, which "
                           "is not valid Unicode", param=param, code="invalid_value") from None


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walk a decoded JSON value (iteratively): depth, finiteness, valid strings."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > max_depth:
            param = format_path(path) or None
            raise APIError(f"JSON nested more than {max_depth} levels deep", param=param,
                           code="invalid_json")
        if isinstance(v, str):
            _check_string(v, path)
        elif isinstance(v, _NonFinite):
            param = format_path(path) or None
            raise APIError(f"{param}: {v.text} is not allowed: JSON numbers must be finite "
                           "(NaN and Infinity are not allowed)", param=param,
                           code="invalid_value")
        elif isinstance(v, dict):
            for k, item in v.items():
                _check_string(k, path)
                if type(item) not in (int, bool):   # noqa: E721 - exact types
                    stack.append((item, path + (k,), depth + 1))
        elif isinstance(v, list):
            if all(type(x) is int for x in v):   # token ids: nothing to check
                continue
            for i, item in enumerate(v):
                stack.append((item, path + (i,), depth + 1))


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """Decode ``raw`` into a JSON object (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(f"the request body is not valid UTF-8 (byte {exc.start})",
                       code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)
    except RecursionError:
        raise APIError(f"JSON nested more than {max_depth} levels deep",
                       code="invalid_json") from None
    except ValueError as exc:   # JSONDecodeError, or an int with too many digits
        msg = str(exc).encode("ascii", "backslashreplace").decode("ascii")
        raise APIError(f"malformed JSON body: {msg}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    check_json_value(data, max_depth)
    return data
