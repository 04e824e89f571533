"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine.

    from minikernels.server import create_app
    app = create_app(async_llm, api_key=None, served_model_name="my-model")

``minikernels serve MODEL`` runs it from the command line (see :mod:`.cli`).
"""
from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # lazy: `minikernels serve --help` imports .cli without fastapi / torch
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
