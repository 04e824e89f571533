"""Run an app on a free local port in a background thread (tests, notebooks).

    with LiveServer(create_app(engine)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Optional


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on ``host:port`` in a daemon thread; a context manager.

    It runs the same server as ``minikernels serve`` (header timeout, graceful drain on
    :meth:`stop`)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: Optional[int] = None,
                 log_level: str = "warning", header_timeout_s: float = 10.0,
                 drain_s: float = 2.0) -> None:
        from .http import build_server

        self.host = host
        self.port = port or free_port(host)
        self.server = build_server(app, host, self.port, log_level=log_level,
                                   header_timeout_s=header_timeout_s, drain_s=drain_s)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
