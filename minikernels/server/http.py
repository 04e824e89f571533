"""uvicorn glue: a header read timeout, and a shutdown that lets streams end cleanly.

- :class:`HeaderTimeoutH11Protocol`: uvicorn has no read timeout, so a client trickling
  its request line and headers (or connecting and sending nothing) held a connection and
  a file descriptor forever. Here a connection waiting for a request must deliver the
  whole header block within ``header_timeout_s`` or it is closed. (The body's read time
  is bounded by :class:`~.limits.RequestGuard`; idle keep-alive by uvicorn's
  ``timeout_keep_alive``.)
- :class:`GracefulServer`: on SIGTERM / SIGINT it stops accepting connections, gives
  in-flight requests ``drain_s`` seconds to finish, then aborts the rest in the engine:
  each stream still ends with a final chunk (``finish_reason: "abort"``) and
  ``data: [DONE]``, and a non-streaming request gets its partial answer, instead of the
  connection being cut (and a traceback logged) when uvicorn cancels the tasks.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable, Callable, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: Optional[asyncio.TimerHandle] = None
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                  self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def protocol_with_header_timeout(seconds: float) -> type:
    """A :class:`HeaderTimeoutH11Protocol` subclass with its timeout set."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout_s": float(seconds)})


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the app (see the module docstring)."""

    def __init__(self, config: uvicorn.Config,
                 drain: Optional[Callable[[float], Awaitable[None]]] = None,
                 drain_s: float = 5.0) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_s = drain_s

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        for server in self.servers:      # stop accepting first; super() repeats it
            server.close()
        if self._drain is not None and not self.force_exit:
            await self._drain(self._drain_s)
        await super().shutdown(sockets=sockets)


def build_server(app: Any, host: str, port: int, *, log_level: str = "info",
                 header_timeout_s: float = 10.0, drain_s: float = 5.0,
                 timeout_keep_alive: int = 5) -> GracefulServer:
    """A :class:`GracefulServer` for an app made by :func:`~.app.create_app`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=protocol_with_header_timeout(header_timeout_s),
                            timeout_keep_alive=timeout_keep_alive,
                            timeout_graceful_shutdown=max(1, int(drain_s) + 5),
                            access_log=False, server_header=False)
    state = getattr(getattr(app, "state", None), "server", None)
    return GracefulServer(config, drain=getattr(state, "drain", None), drain_s=drain_s)
