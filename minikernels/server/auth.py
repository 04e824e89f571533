"""API keys: ``Authorization: Bearer KEY`` against one or several accepted keys.

Keys come from ``--api-key`` (repeatable), ``--api-key-file`` (one key per line, ``#``
comments) or ``MINIKERNELS_API_KEY``. Every comparison is constant-time and every key is
compared, so the response time does not tell which key nearly matched. The matched key's
*id* (a short hash, never the key) is what the rest of the server sees, e.g. to keep each
key's prefix cache apart.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from typing import Iterable, Optional, Sequence, Union

from .errors import APIError
from .settings import API_KEY_ENV



def key_id(key: str) -> str:
    """A stable, non-reversible id of ``key`` (for cache salts and logs)."""
    return hashlib.sha256(b"minikernels-api-key\0" + key.encode()).hexdigest()[:16]


def read_key_file(path: str) -> list[str]:
    """Keys in ``path``: one per line; blank lines and ``#`` comments are skipped."""
    with open(path, encoding="utf-8") as f:
        keys = [ln.strip() for ln in f]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


def collect_keys(flags: Optional[Iterable[str]], key_file: Optional[str],
                 env: Optional[dict] = None) -> list[str]:
    """Keys from the flags and the file; else from ``$MINIKERNELS_API_KEY``; else none."""
    keys = [k for k in (flags or []) if k]
    if key_file:
        keys += read_key_file(key_file)
    if not keys:
        value = (env if env is not None else os.environ).get(API_KEY_ENV)
        if value:
            keys = [value]
    return list(dict.fromkeys(keys))


class APIKeys:
    """The accepted keys; ``check`` returns the caller's key id (``None``: auth is off)."""

    def __init__(self, keys: Union[None, str, Sequence[str]]) -> None:
        if keys is None:
            keys = []
        elif isinstance(keys, str):
            keys = [keys]
        for k in keys:
            if not isinstance(k, str) or not k or k != k.strip() or not k.isprintable():
                raise ValueError("API keys must be non-empty printable strings without "
                                 "surrounding whitespace")
        self._keys = [k.encode() for k in dict.fromkeys(keys)]
        self._ids = [key_id(k) for k in dict.fromkeys(keys)]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str) -> Optional[str]:
        """The id of the key in ``authorization`` ("Bearer KEY"), or 401."""
        if not self._keys:
            return None
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode("utf-8", "replace")
        match = None
        for key, kid in zip(self._keys, self._ids):
            if secrets.compare_digest(given, key) and scheme.lower() == "bearer":
                match = kid
        if match is None:
            raise APIError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                           status=401, type="invalid_request_error", code="invalid_api_key")
        return match
