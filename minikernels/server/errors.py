"""Errors in OpenAI's JSON shape, and the mapping from engine exceptions to HTTP errors.

Every error the server sends looks like OpenAI's::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p",
               "code": "invalid_value"}}

Bodies are rendered with ASCII escapes, so a message quoting client input (say a lone
surrogate in ``model``) can always be encoded. Server-side failures (5xx) carry a fixed
message; the details go to the server log, never to the client.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineOverloaded
from ..engine.async_llm import EngineDeadError
from ..engine.llm_engine import EngineSleeping

logger = logging.getLogger("minikernels.server")


class APIError(Exception):
    """An error the client caused (or overload / shutdown); rendered as OpenAI's JSON."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def unsupported(param: str, message: Optional[str] = None) -> APIError:
    """400 for a parameter this server does not implement (it is never ignored)."""
    return APIError(message or f"{param} is not supported by this server", param=param,
                    code="unsupported_parameter")


class JSONBody(JSONResponse):
    """JSONResponse whose body is always encodable (non-ASCII escaped)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


def error_response(err: APIError) -> Response:
    headers = dict(err.headers)
    if err.status == 429:
        headers.setdefault("Retry-After", "1")
    return JSONBody(err.body(), status_code=err.status, headers=headers or None)


def engine_error_to_api(exc: BaseException) -> APIError:
    """Map an exception raised by the engine for one request to an HTTP error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return APIError("the server is overloaded, retry later", status=429,
                        type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(exc, EngineSleeping):
        return APIError("the engine is sleeping (POST /wake_up first)", status=503,
                        type="server_error", code="engine_sleeping")
    if isinstance(exc, EngineDeadError):
        logger.error("engine unavailable: %s", exc)
        return APIError("the engine is unavailable; see the server log", status=503,
                        type="server_error", code="engine_unavailable")
    if isinstance(exc, (ValueError, TypeError)):
        msg = str(exc) or type(exc).__name__
        low = msg.lower()
        param = ("max_tokens" if ("max_model_len" in low or "max_tokens" in low
                                  or "too long" in low) else
                 "prompt" if "prompt" in low else None)
        code = "context_length_exceeded" if "max_model_len" in low else "invalid_value"
        return APIError(msg, param=param, code=code)
    logger.error("engine error", exc_info=exc)
    return APIError("internal server error; see the server log", status=500,
                    type="server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: never a bare 422 page or a 500 with a repr."""

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> Response:
        return error_response(APIError("invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(exc.detail), status=exc.status_code, type=kind,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal_error(_req: Request, exc: Exception) -> Response:
        logger.error("unhandled error", exc_info=exc)
        return error_response(APIError("internal server error; see the server log",
                                       status=500, type="server_error",
                                       code="internal_error"))
