"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine.

    from minikernels.server import create_app
    app = create_app(async_llm, api_key=None, served_model_name="my-model")

``minikernels serve MODEL`` runs it from the command line (see :mod:`.cli`).
"""
from .app import create_app

__all__ = ["create_app"]
