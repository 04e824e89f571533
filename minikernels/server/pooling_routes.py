"""The one-pass models' routes: OpenAI's ``/v1/embeddings`` (``--task embed``, an
:class:`~minikernels.engine.Embedder`) and vLLM's ``/classify``, ``/score`` (``/v1/score``)
and ``/rerank`` (``/v1/rerank``, ``/v2/rerank``) (``--task classify``, a
:class:`~minikernels.engine.Classifier`).

Every route tokenizes off the event loop, checks the inputs (a 400 naming the field:
``input[2]``, ``text_2``, ``documents[1]``) before they reach the worker, and shares the
model's forwards with concurrent callers. A route of the other task is a 400
(``model_not_supported``).
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..engine.pooling_model import PoolingInputError
from .errors import APIError, JSONBody
from .protocol import ClassificationRequest, EmbeddingRequest, RerankRequest, ScoreRequest
from .streaming import ClientGone, until_disconnect

if TYPE_CHECKING:
    from .app import ServerState

_TASK_ROUTES = {"embed": "/v1/embeddings", "classify": "/classify, /score and /rerank",
                "generate": "/v1/completions, /v1/chat/completions and /v1/responses"}


def register_pooling_routes(app: FastAPI, state: "ServerState",
                            parse: Callable[[Request, type], Awaitable[tuple[Any, Any]]],
                            gone_response: Callable[[], Response]) -> None:
    """Add the embedding and classification routes to ``app`` (``parse``: the request
    parser of :func:`.routes.register_routes`, auth and model name included)."""
    engine = state.engine

    def require(task: str, what: str) -> None:
        if state.task != task:
            raise APIError(f"the model '{state.served_name}' does not serve {what} (this "
                           f"server runs --task {state.task}: {_TASK_ROUTES[state.task]}); "
                           f"start one with --task {task}", param="model",
                           code="model_not_supported")

    async def run(request: Request, work: Awaitable[Any], params: Callable[[int], str]
                  ) -> Any:
        """Await the model's ``work``; an input error -> a 400 naming ``params(index)``."""
        try:
            return await until_disconnect(request, work)
        except PoolingInputError as exc:
            param = "dimensions" if exc.index is None else params(exc.index)
            raise APIError(str(exc), param=param, code="context_length_exceeded"
                           if "context length" in str(exc) else "invalid_value") from None

    def check_count(n: int, param: str) -> None:
        if n > state.limits.max_prompts:
            raise APIError(f"{n} inputs in one request; this server takes at most "
                           f"{state.limits.max_prompts}", param=param,
                           code="too_many_inputs")

    async def input_ids(req: EmbeddingRequest) -> tuple[list[list[int]], Callable[[int], str]]:
        """The ``input`` field's token ids and how to name input i in an error."""
        items = req.inputs()
        check_count(len(items), "input")
        single = not isinstance(req.input, list) or all(isinstance(t, int) for t in req.input)

        def where(i: int) -> str:
            return "input" if single else f"input[{i}]"
        ids = [await state.prompts.completion_prompt(x, None, param=where(i))
               for i, x in enumerate(items)]
        return ids, where

    async def pair_ids(text_1: list[str], text_2: list[str], name_2: Callable[[int], str]
                       ) -> list[list[int]]:
        """Each (text_1[i] or text_1[0], text_2[i]) pair's ids (``name_2(i)`` in errors)."""
        check_count(len(text_2), name_2(0).split("[")[0])
        firsts = text_1 * len(text_2) if len(text_1) == 1 else text_1
        ids = [await state.prompts.pair_prompt(a, b, name_2(i))
               for i, (a, b) in enumerate(zip(firsts, text_2))]
        return ids

    def usage(ids: list[list[int]]) -> dict[str, int]:
        n = sum(len(x) for x in ids)
        return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}

    def scorer() -> None:
        try:
            engine.check_scorer()
        except ValueError as exc:
            raise APIError(f"{exc}: /score and /rerank need a one-label model (a "
                           "cross-encoder or reward model)", param="model",
                           code="model_not_supported") from None

    # ------------------------------------------------------------------ embeddings
    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            req, _ = await parse(request, EmbeddingRequest)
            require("embed", "embeddings")
            ids, where = await input_ids(req)
            vectors = await run(request, _checked(lambda: engine.check(ids, req.dimensions),
                                                  lambda: engine.embed_async(ids,
                                                                             req.dimensions)),
                                where)
        except ClientGone:
            state.metrics.count_disconnect()
            return gone_response()
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_embedding(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        n = sum(len(x) for x in ids)
        return JSONBody({"object": "list", "data": data,
                         "model": req.model or state.served_name,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})

    # ------------------------------------------------------------------ classify
    @app.post("/classify")
    async def classify(request: Request) -> Response:
        try:
            req, _ = await parse(request, ClassificationRequest)
            require("classify", "classification")
            ids, where = await input_ids(req)
            probs = await run(request, _checked(lambda: engine.check(ids),
                                                lambda: engine.classify_async(ids)), where)
        except ClientGone:
            state.metrics.count_disconnect()
            return gone_response()
        labels = engine.labels
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": p.tolist(),
                 "num_classes": len(labels)} for i, p in enumerate(probs)]
        return JSONBody({"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                         "created": int(time.time()),
                         "model": req.model or state.served_name, "data": data,
                         "usage": usage(ids)})

    # ------------------------------------------------------------------ score
    async def score(request: Request) -> Response:
        try:
            req, _ = await parse(request, ScoreRequest)
            require("classify", "scores")
            scorer()
            text_1 = [req.text_1] if isinstance(req.text_1, str) else req.text_1
            text_2 = [req.text_2] if isinstance(req.text_2, str) else req.text_2
            one = isinstance(req.text_2, str)

            def where(i: int) -> str:
                return "text_2" if one else f"text_2[{i}]"
            ids = await pair_ids(text_1, text_2, where)
            probs = await run(request, _checked(lambda: engine.check(ids),
                                                lambda: engine.classify_async(ids)), where)
        except ClientGone:
            state.metrics.count_disconnect()
            return gone_response()
        data = [{"index": i, "object": "score", "score": float(p[0])}
                for i, p in enumerate(probs)]
        return JSONBody({"id": f"score-{uuid.uuid4().hex}", "object": "list",
                         "created": int(time.time()),
                         "model": req.model or state.served_name, "data": data,
                         "usage": usage(ids)})

    for path in ("/score", "/v1/score"):
        app.post(path)(score)

    # ------------------------------------------------------------------ rerank
    async def rerank(request: Request) -> Response:
        try:
            req, _ = await parse(request, RerankRequest)
            require("classify", "reranking")
            scorer()

            def where(i: int) -> str:
                return f"documents[{i}]"
            ids = await pair_ids([req.query], req.documents, where)
            probs = await run(request, _checked(lambda: engine.check(ids),
                                                lambda: engine.classify_async(ids)), where)
        except ClientGone:
            state.metrics.count_disconnect()
            return gone_response()
        scores = [float(p[0]) for p in probs]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])   # stable: ties by index
        if req.top_n:
            order = order[:req.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": req.documents[i]}}
                       if req.return_documents else {})} for i in order]
        n = sum(len(x) for x in ids)
        return JSONBody({"id": f"rerank-{uuid.uuid4().hex}",
                         "model": req.model or state.served_name, "results": results,
                         "usage": {"total_tokens": n}})

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)


async def _checked(check: Callable[[], None], work: Callable[[], Awaitable[Any]]) -> Any:
    """``check()`` then ``await work()``: input errors surface where ``run`` maps them."""
    check()
    return await work()


def encode_embedding(vector: Any, encoding_format: str) -> Any:
    """One embedding as OpenAI sends it: a list of floats, or base64 of its little-endian
    float32 bytes (what the openai client asks for by default)."""
    if encoding_format == "base64":
        import base64

        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
