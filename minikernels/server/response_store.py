"""Stored responses for the Responses API: ``previous_response_id``, ``GET`` and ``DELETE
/v1/responses/{id}``.

Off unless the server is started with ``--responses-store-size N`` (vLLM keeps its store
off by default too: a server that stores conversations holds users' text in memory). On,
it keeps the latest ``N`` responses whose request did not say ``"store": false`` (least
recently used dropped first), each with the conversation that produced it (the input
messages, without ``instructions``, and the output as chat messages), so a request with
``previous_response_id`` continues it as OpenAI does (the earlier ``instructions`` and
``tools`` are not carried over).

Each entry belongs to the API key that created it: another key gets a 404, as for an id
that never existed, so users never see each other's responses. Ids are 96 random bits.
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class StoredResponse:
    key_id: Optional[str]
    response: dict[str, Any]               # the response object as returned
    conversation: list[dict[str, Any]]     # chat messages: input + output, no instructions


class ResponseStore:
    """A bounded, per-key store of responses (thread-safe; O(1) per operation)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]],
            key_id: Optional[str]) -> None:
        if not self.enabled:
            return
        entry = StoredResponse(key_id, copy.deepcopy(response), copy.deepcopy(conversation))
        with self._lock:
            self._items[response["id"]] = entry
            self._items.move_to_end(response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str, key_id: Optional[str]) -> Optional[StoredResponse]:
        """The entry, if it exists and belongs to ``key_id`` (a copy: callers may edit)."""
        with self._lock:
            entry = self._items.get(response_id)
            if entry is None or entry.key_id != key_id:
                return None
            self._items.move_to_end(response_id)
            return StoredResponse(entry.key_id, copy.deepcopy(entry.response),
                                  copy.deepcopy(entry.conversation))

    def delete(self, response_id: str, key_id: Optional[str]) -> bool:
        with self._lock:
            entry = self._items.get(response_id)
            if entry is None or entry.key_id != key_id:
                return False
            del self._items[response_id]
            return True
