"""The HTTP routes: models, completions, chat completions, responses, embeddings,
tokenize / detokenize, health, metrics, version.

Each generation route: authenticate, decode + validate the body (:mod:`.protocol`),
tokenize off the event loop with the length checks first (:mod:`.prompts`), build the
engine requests, then answer once or stream (:mod:`.streaming`). Response shapes follow
OpenAI's; usage carries ``prompt_tokens_details.cached_tokens`` (prompt tokens served
from the prefix cache).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..engine import SamplingParams
from ..engine.sampling_params import RequestOutputKind
from .errors import APIError, JSONBody, engine_error_to_api, unsupported
from .jsonbody import parse_json_object
from .logprobs import (chat_logprobs, completion_logprobs, join_completion_logprobs,
                       prompt_completion_logprobs, vllm_prompt_logprobs)
from .metrics import CONTENT_TYPE
from .lora_routes import register_lora_routes
from .sleep_routes import register_sleep_routes
from .pooling_routes import register_pooling_routes
from .protocol import (ChatCompletionRequest, CompletionRequest, Constraint,
                       DetokenizeRequest, EmbeddingRequest, TokenizeChatRequest,
                       TokenizeCompletionRequest,
                       constraint_error, validation_to_api_error)
from .streaming import (Choice, ClientGone, EngineRequest, Group, SSEResponse, stream_events,
                        until_disconnect)
from .reasoning import (ReasoningParser, constraint_start_marker, prompt_closes_thinking,
                        prompt_opens_thinking)
from .responses import (ResponseEvents, ResponsesRequest, as_responses_error,
                        assistant_message, created_now, error_of, new_id, output_items,
                        response_object, sse_event, status_of, usage_of)
from .structured import ConstraintCompiler, ConstraintError
from .tools import ToolMode

if TYPE_CHECKING:
    from .app import ServerState


def register_routes(app: FastAPI, state: "ServerState") -> None:
    """Add every route to ``app``; they share ``state``."""
    engine = state.engine
    tt = state.token_text
    compiler = ConstraintCompiler(engine)

    # ------------------------------------------------------------------ helpers
    def authenticate(request: Request) -> Optional[str]:
        return state.keys.check(request.headers.get("authorization", ""))

    def refuse_if_draining() -> None:
        if state.draining:
            raise APIError("the server is shutting down", status=503, type="server_error",
                           code="shutting_down", headers={"Connection": "close"})

    async def read_json(request: Request) -> tuple[dict, Optional[str]]:
        """(the body as a JSON object, caller's key id): authenticated first."""
        kid = authenticate(request)
        refuse_if_draining()
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientGone() from None
        return parse_json_object(raw, state.limits.max_json_depth), kid

    async def parse(request: Request, model_cls: type) -> tuple[Any, Optional[str]]:
        """(validated request, caller's key id) or an APIError / ClientGone."""
        data, kid = await read_json(request)
        return validate(data, model_cls), kid

    def validate(data: dict, model_cls: type) -> Any:
        """``data`` as a ``model_cls`` request (checked, model name served)."""
        if state.task != "generate" and model_cls in (CompletionRequest,
                                                      ChatCompletionRequest, ResponsesRequest):
            use = "/v1/embeddings" if state.task == "embed" else "/classify, /score, /rerank"
            raise APIError(f"the model '{state.served_name}' is a pooling model (served with "
                           f"--task {state.task}): it does not generate text; use {use}",
                           param="model", code="model_not_supported")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_to_api_error(exc) from None
        model = getattr(req, "model", None)
        if model is not None and model not in state.model_names \
                and model not in state.aliases and model not in state.lora_modules:
            raise APIError(f"the model '{model}' does not exist; this server serves "
                           f"'{state.served_name}'", param="model", code="model_not_found",
                           status=404, type="invalid_request_error")
        req.check()
        if getattr(req, "cache_salt", None) is not None and not state.cache_salt_supported:
            raise unsupported("cache_salt", "cache_salt is not supported by this server's "
                              "engine yet (no salted prefix cache)")
        return req

    async def precompile(constraint: Optional[Constraint]) -> None:
        """Compile the request's constraint before it is admitted (off the event loop;
        cached, so the engine's own compile is a hit): a bad one is a 400 naming it."""
        if constraint is None:
            return
        try:
            await compiler.compile(constraint.params, constraint.param)
        except ConstraintError as exc:
            raise constraint_error(exc) from None

    def make_params(req: Any, max_tokens: int, logprobs: Optional[int],
                    kid: Optional[str], prompt_logprobs: Optional[int] = None,
                    constraint: Optional[Constraint] = None) -> SamplingParams:
        """SamplingParams for one prompt; the engine samples ``n`` choices of it, choice
        ``i`` seeded with ``seed + i``.

        prompt_logprobs (completions ``echo`` + ``logprobs``): the engine also scores the
        prompt tokens; the output is taken when the request finishes (FINAL_ONLY: the
        snapshot that carries ``RequestOutput.prompt_logprobs``).
        """
        # The checkpoint's recommended sampling first; the request's own fields win.
        kwargs: dict[str, Any] = {k: v for k, v in state.sampling_defaults.items()
                                  if k != "max_tokens"}
        kwargs.update(
            max_tokens=max_tokens, n=req.n, ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
        if req.priority:
            kwargs["priority"] = req.priority
        if prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = prompt_logprobs
            kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                     "bad_words"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        biases = req.token_biases()
        if biases or req.allowed_token_ids:
            check_token_ids(biases, req.allowed_token_ids)
            kwargs["logit_bias"] = biases
            kwargs["allowed_token_ids"] = req.allowed_token_ids
        if constraint is not None:
            kwargs["structured_outputs"] = constraint.params
        lora = state.lora_modules.get(getattr(req, "model", None))
        if lora is not None:
            kwargs["lora_request"] = lora
        if state.cache_salt_supported:
            salt = prefix_cache_salt(kid, req.cache_salt)
            if salt is not None:
                kwargs["cache_salt"] = salt
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise APIError(f"invalid sampling parameters: {exc}") from None

    def check_token_ids(biases: Optional[dict[int, float]],
                        allowed: Optional[list[int]]) -> None:
        """400 naming the logit_bias key / allowed_token_ids entry outside the vocabulary."""
        size = vocab_size()
        if size is None:
            return
        for t in biases or {}:
            if t >= size:
                raise APIError(f"token id {t} is outside the vocabulary [0, {size})",
                               param=f"logit_bias.{t}", code="invalid_value")
        for i, t in enumerate(allowed or []):
            if not 0 <= t < size:
                raise APIError(f"token id {t} is outside the vocabulary [0, {size})",
                               param=f"allowed_token_ids[{i}]", code="invalid_value")

    def prefix_cache_salt(kid: Optional[str], client_salt: Optional[str]) -> Optional[str]:
        """The engine's cache salt: the caller's key id (several keys, unless the
        operator shares the cache) and the client's ``cache_salt``, each length-prefixed
        so no (key, salt) pair can spell another's."""
        parts = [] if (state.shared_prefix_cache or len(state.keys) < 2 or kid is None) \
            else [("key", kid)]
        if client_salt is not None:
            parts.append(("salt", client_salt))
        if not parts:
            return None
        return "".join(f"{name}:{len(value)}:{value};" for name, value in parts)

    def finish(group: Group) -> None:
        state.metrics.observe_e2e(time.monotonic() - group.t_start)
        for c in group.choices:
            state.metrics.count_finished(c.finish_reason)

    async def run_group(request: Request, group: Group, stream: bool) -> None:
        """Start the engine requests and wait for their first outputs (all of them for
        a non-streaming request); engine errors become HTTP errors here."""
        refuse_if_draining()
        state.track(group)
        group.start()
        try:
            await until_disconnect(request, group.wait_primed())
        except ClientGone:
            state.metrics.count_disconnect()
            await group.close_shielded()
            raise
        except BaseException as exc:
            await group.close_shielded()
            if isinstance(exc, Exception):
                raise engine_error_to_api(exc) from None
            raise
        if group.t_first is not None:
            state.metrics.observe_ttft(group.t_first - group.t_start)
        if stream:
            return
        try:
            await until_disconnect(request, group.wait_finished())
        except ClientGone:
            state.metrics.count_disconnect()
            raise
        except Exception as exc:
            raise engine_error_to_api(exc) from None
        finally:
            await group.close_shielded()
        finish(group)

    def gone_response() -> Response:
        return Response(status_code=499)

    def sse_response(group: Group, make_chunks: Any, base: dict, req: Any) -> Response:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(stream_events(group, make_chunks, base, include_usage, finish),
                           on_close=group.close_shielded,
                           on_disconnect=state.metrics.count_disconnect)

    def check_prompt_count(n_prompts: int) -> None:
        cap = state.limits.max_prompts
        queue = getattr(engine, "max_queue", None)
        if isinstance(queue, int) and queue < cap:
            cap = queue
        if n_prompts > cap:
            raise APIError(f"{n_prompts} prompts in one request; this server takes at most "
                           f"{cap} (a request the queue can never hold is not retried)",
                           param="prompt", code="too_many_prompts")

    # ------------------------------------------------------------------ tokenizer routes
    def vocab_size() -> Optional[int]:
        inner = getattr(engine, "engine", None)
        for src in (inner, getattr(engine, "tokenizer", None)):
            size = getattr(src, "vocab_size", None)
            if isinstance(size, int) and size > 0:
                return size
        return None

    def token_strs(ids: list[int]) -> list[str]:
        """Each id's vocabulary entry (vLLM's ``convert_ids_to_tokens``), or its decoded
        text where the tokenizer has no such table (the byte tokenizer)."""
        tok = state.prompts.tokenizer
        hf = getattr(tok, "tokenizer", None)
        convert = getattr(hf, "convert_ids_to_tokens", None)
        if callable(convert):
            return [str(t) for t in convert(ids)]
        return [tok.decode([t], skip_special_tokens=False) for t in ids]

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a ``prompt`` or chat ``messages`` -> count and token ids
        (the ids /v1/completions or /v1/chat/completions would run)."""
        try:
            data, _ = await read_json(request)
        except ClientGone:
            return gone_response()
        req = validate(data, TokenizeChatRequest if "messages" in data
                       else TokenizeCompletionRequest)
        if state.prompts.tokenizer is None:
            raise APIError("this model has no tokenizer", param="prompt")
        if isinstance(req, TokenizeChatRequest):
            chat = req.as_chat_request()
            ids = await state.prompts.chat_prompt(chat.template_messages(),
                                                  chat.add_generation_prompt,
                                                  chat.chat_template_kwargs, None,
                                                  chat.tools or None)
        else:
            ids = await state.prompts.tokenize(req.prompt, req.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len,
                               "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = token_strs(ids)
        return JSONBody(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: token ids -> ``prompt`` text (special tokens kept)."""
        try:
            req, _ = await parse(request, DetokenizeRequest)
        except ClientGone:
            return gone_response()
        if state.prompts.tokenizer is None:
            raise APIError("this model has no tokenizer", param="tokens")
        size = vocab_size()
        bad = next((i for i, t in enumerate(req.tokens)
                    if t < 0 or (size is not None and t >= size)), None)
        if bad is not None:
            raise APIError(f"tokens[{bad}] = {req.tokens[bad]} is not a token id of this "
                           f"model (0 <= id < {size})", param=f"tokens[{bad}]",
                           code="invalid_value")
        text = await state.prompts.detokenize(req.tokens)
        return JSONBody({"prompt": text})

    # ------------------------------------------------------------------ small routes
    @app.get("/health")
    async def health() -> Response:
        errored = getattr(engine, "errored", False)
        if callable(errored):
            errored = errored()
        if errored:
            return JSONBody({"status": "error"}, status_code=503)
        if state.draining:
            return JSONBody({"status": "draining"}, status_code=503)
        return JSONBody({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        from minikernels import __version__

        return JSONBody({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = dict(engine.stats())
        except Exception:  # noqa: BLE001 - metrics must not fail the scrape
            stats = {}
        return Response(state.metrics.render(state.served_name, stats),
                        media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        parent = state.served_name if name in state.lora_modules else None
        return {"id": name, "object": "model", "created": state.created,
                "owned_by": "minikernels", "root": name, "parent": parent,
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        authenticate(request)
        return JSONBody({"object": "list", "data": [model_card(n) for n in
                                                     [state.served_name, *state.lora_modules]]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        authenticate(request)
        if model_id not in state.model_names and model_id not in state.lora_modules:
            raise APIError(f"the model '{model_id}' does not exist", status=404,
                           type="invalid_request_error", param="model",
                           code="model_not_found")
        return JSONBody(model_card(model_id))

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            req, kid = await parse(request, CompletionRequest)
        except ClientGone:
            return gone_response()
        tt = state.token_text.as_token_ids() if req.return_tokens_as_token_ids else \
            state.token_text
        prompts = req.prompts()
        check_prompt_count(len(prompts))
        constraint = req.constraint()
        await precompile(constraint)
        keep = state.prompts.resolve_truncation(req.truncate_prompt_tokens)
        # Unset max_tokens: the checkpoint's max_new_tokens (capped by each prompt's
        # room in the context), else OpenAI's 16.
        default_max = state.sampling_defaults.get("max_tokens")
        max_tokens = req.max_tokens if req.max_tokens is not None else (default_max or 16)
        if req.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({req.min_tokens}) must be <= max_tokens "
                           f"({max_tokens})", param="min_tokens", code="invalid_value")
        engine_reqs = []
        rid = f"cmpl-{uuid.uuid4().hex}"
        params_for: dict[int, SamplingParams] = {}       # by max_tokens
        # echo + logprobs: the prompt tokens' logprobs too (lm-eval-harness loglikelihood).
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        if req.prompt_logprobs is not None:     # vLLM's field (the engine scores both)
            prompt_lp = max(prompt_lp or 0, req.prompt_logprobs)
        for i, prompt in enumerate(prompts):
            ids = await state.prompts.completion_prompt(prompt, keep)
            room = max_tokens
            if req.max_tokens is None and default_max:
                room = min(max_tokens, state.prompts.max_tokens_for(len(ids), None, "prompt"))
            state.prompts.max_tokens_for(len(ids), room, "prompt")
            params = params_for.get(room)
            if params is None:
                params = params_for[room] = make_params(req, room, req.logprobs, kid,
                                                        prompt_lp, constraint)
            text = prompt if isinstance(prompt, str) and keep is None else None
            engine_reqs.append(EngineRequest(f"{rid}-{i}", ids, params, prompt_text=text))
        group = Group(engine, engine_reqs)
        try:
            await run_group(request, group, req.stream)
        except ClientGone:
            return gone_response()
        model = req.model or state.served_name
        created = int(time.time())

        def echo_text(c: Choice) -> str:
            if not req.echo:
                return ""
            if c.req.prompt_text is not None:
                return c.req.prompt_text
            return tt.tokenizer.decode(c.req.prompt_ids)

        def vllm_prompt_lps(c: Choice, k: int) -> list:
            latest = c.req.latest
            ids = list(getattr(latest, "prompt_token_ids", None) or c.req.prompt_ids)
            return vllm_prompt_logprobs(tt, ids, getattr(latest, "prompt_logprobs", None), k)

        def prompt_lps(c: Choice) -> dict:
            """The echoed prompt's logprobs object (echo + logprobs)."""
            latest = c.req.latest
            ids = list(getattr(latest, "prompt_token_ids", None) or c.req.prompt_ids)
            return prompt_completion_logprobs(
                tt, ids, getattr(latest, "prompt_logprobs", None), req.logprobs)

        if not req.stream:
            out_choices = []
            for c in group.choices:
                lp = None
                echo = echo_text(c)
                if req.logprobs is not None:
                    lp = completion_logprobs(tt, c.output, 0, c.num_tokens, req.logprobs,
                                             len(echo))
                    if req.echo:
                        lp = join_completion_logprobs(prompt_lps(c), lp)
                choice = {"index": c.index, "text": echo + c.text, "logprobs": lp,
                          "finish_reason": c.finish_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = vllm_prompt_lps(c, req.prompt_logprobs)
                out_choices.append(choice)
            return JSONBody({"id": rid, "object": "text_completion", "created": created,
                             "model": model, "choices": out_choices, "usage": group.usage()})

        base = {"id": rid, "object": "text_completion", "created": created, "model": model}

        echo_lens: dict[int, int] = {}

        def make_chunks(c: Choice, final: bool) -> list[dict]:
            prefix = ""
            first = not c.started
            if first:
                c.started = True
                prefix = echo_text(c)
                echo_lens[c.index] = len(prefix)
            delta, t0, t1 = c.new_delta()
            # Tokens without new text (a partial UTF-8 character, a held-back stop-string
            # prefix) wait for the chunk that carries their text: no empty chunks.
            if not (prefix or delta or final):
                return []
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(tt, c.output, t0, t1, req.logprobs,
                                         echo_lens.get(c.index, 0) + c.sent_text)
                if first and req.echo:
                    lp = join_completion_logprobs(prompt_lps(c), lp)
            c.sent_text += len(delta)
            c.sent_tokens = t1
            return [{"index": c.index, "text": prefix + delta, "logprobs": lp,
                     "finish_reason": c.finish_reason if final else None}]

        return sse_response(group, make_chunks, base, req)

    # ------------------------------------------------------------------ chat
    async def start_chat(request: Request, req: ChatCompletionRequest, kid: Optional[str],
                         rid: str) -> tuple[Group, ToolMode, list[dict[str, Any]],
                                            Callable[[], Optional[ReasoningParser]]]:
        """Render and tokenize a checked chat request, start its engine request and wait
        for its first output (all of it unless streaming): (group, tool mode, the
        template messages, a factory of one reasoning parser per output, or of None
        without --reasoning-parser). Shared by /v1/chat/completions and /v1/responses."""
        messages = req.template_messages()
        tools = ToolMode.of(req, state.tool_call_parser)
        constraint = req.constraint()
        await precompile(constraint)
        keep = state.prompts.resolve_truncation(req.truncate_prompt_tokens)
        ids = await state.prompts.chat_prompt(messages, req.add_generation_prompt,
                                              req.chat_template_kwargs, keep,
                                              req.tools or None)
        wanted = state.prompts.max_tokens_for(len(ids), req.wanted_max_tokens(), "messages")
        if req.wanted_max_tokens() is None and state.sampling_defaults.get("max_tokens"):
            wanted = min(wanted, state.sampling_defaults["max_tokens"])
        if req.min_tokens > wanted:
            raise APIError(f"min_tokens ({req.min_tokens}) must be <= max_tokens ({wanted})",
                           param="min_tokens", code="invalid_value")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        name = state.reasoning_parser
        tail = (state.prompts.tokenizer.decode(ids[-12:], skip_special_tokens=False)
                if name is not None else "")
        if constraint is not None and name is not None and \
                not state.structured_outputs_in_reasoning and not prompt_closes_thinking(tail):
            # a reasoning model thinks freely: the constraint governs the answer after </think>
            constraint.params = dataclasses.replace(
                constraint.params,
                start_after=constraint_start_marker(state.prompts.tokenizer))
        group = Group(engine, [EngineRequest(f"{rid}-0", ids, make_params(
            req, wanted, top_k, kid, getattr(req, "prompt_logprobs", None),
            constraint=constraint))])
        await run_group(request, group, req.stream)
        opens = name is not None and prompt_opens_thinking(tail)

        def reasoning_parser() -> Optional[ReasoningParser]:
            return None if name is None else ReasoningParser(name, opens)
        return group, tools, messages, reasoning_parser

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            req, kid = await parse(request, ChatCompletionRequest)
            group, tools, messages, new_reasoning = await start_chat(request, req, kid, rid)
        except ClientGone:
            return gone_response()
        tt = state.token_text.as_token_ids() if req.return_tokens_as_token_ids else \
            state.token_text
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        model = req.model or state.served_name
        created = int(time.time())
        # vLLM's chat echo: the reply continues the last message when it is the
        # assistant's own (add_generation_prompt=false), so prefix it.
        echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" \
            else ""

        if not req.stream:
            out_choices = []
            for c in group.choices:
                lp = chat_logprobs(tt, c.output, 0, c.num_tokens, top_k or 0) \
                    if req.logprobs else None
                rp = new_reasoning()
                reasoning, answer = rp.split(c.text) if rp is not None else (None, c.text)
                content, calls = tools.split(answer) if answer is not None else (None, [])
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if rp is not None and req.include_reasoning:
                    message["reasoning_content"] = reasoning
                if content is not None and echo:
                    message["content"] = echo + content
                if calls:
                    message["tool_calls"] = [call.to_openai() for call in calls]
                out_choices.append({"index": c.index, "message": message, "logprobs": lp,
                                    "finish_reason": tools.finish_reason(c.finish_reason,
                                                                         bool(calls))})
            body = {"id": rid, "object": "chat.completion", "created": created,
                    "model": model, "choices": out_choices, "usage": group.usage()}
            if req.prompt_logprobs is not None:     # vLLM's: once, for the one prompt
                c0 = group.choices[0]
                latest = c0.req.latest
                body["prompt_logprobs"] = vllm_prompt_logprobs(
                    tt, list(getattr(latest, "prompt_token_ids", None) or c0.req.prompt_ids),
                    getattr(latest, "prompt_logprobs", None), req.prompt_logprobs)
            return JSONBody(body)

        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model}

        tool_streams = {c.index: tools.stream() for c in group.choices}
        thinking = {c.index: new_reasoning() for c in group.choices}

        def make_chunks(c: Choice, final: bool) -> list[dict]:
            chunks = []
            if not c.started:
                c.started = True
                chunks.append({"index": c.index, "delta": {"role": "assistant",
                                                           "content": echo},
                               "logprobs": None, "finish_reason": None})
            delta, t0, t1 = c.new_delta()
            c.sent_text += len(delta)
            # Text that may be a tool call is held back (its tokens' logprobs go with
            # the next chunk); tool calls go out as OpenAI's tool_calls deltas.
            ts = tool_streams[c.index]
            rp = thinking[c.index]
            reasoning, delta = rp.feed(delta, final) if rp is not None else ("", delta)
            content, calls = ts.feed(delta, final)
            out: list[dict] = []
            if reasoning and req.include_reasoning:
                out.append({"reasoning_content": reasoning})
            if content:
                out.append({"content": content})
            out += [{"tool_calls": [d]} for d in calls]
            if final and not out:
                out.append({})
            for k, d in enumerate(out):
                lp = None
                if k == 0 and req.logprobs:
                    lp = chat_logprobs(tt, c.output, t0, t1, top_k or 0)
                    c.sent_tokens = t1
                last = final and k == len(out) - 1
                chunks.append({"index": c.index, "delta": d, "logprobs": lp,
                               "finish_reason": ts.mode.finish_reason(
                                   c.finish_reason, ts.has_calls) if last else None})
            if not req.logprobs:
                c.sent_tokens = t1
            return chunks

        return sse_response(group, make_chunks, base, req)



    # ------------------------------------------------------------------ responses
    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        rid = new_id("resp")
        store = state.responses
        try:
            rreq, kid = await parse(request, ResponsesRequest)
            prior = previous_conversation(rreq, kid)
            req = rreq.to_chat(prior)
            try:
                group, tools, _, new_reasoning = await start_chat(request, req, kid, rid)
            except APIError as exc:
                raise as_responses_error(exc) from None
        except ClientGone:
            return gone_response()
        keep = store.enabled and rreq.store is not False
        model = rreq.model or state.served_name
        defaults = state.sampling_defaults
        echo = rreq.echo_fields(
            temperature=req.temperature if req.temperature is not None
            else float(defaults.get("temperature", 1.0)),
            top_p=req.top_p if req.top_p is not None else float(defaults.get("top_p", 1.0)),
            stored=keep)
        created = created_now()
        c = group.choices[0]

        def answer_of(text: str) -> tuple[Optional[str], Optional[str], list[Any]]:
            """(reasoning, content, calls) of a whole output."""
            rp = new_reasoning()
            reasoning, rest = rp.split(text) if rp is not None else (None, text)
            content, calls = tools.split(rest) if rest is not None else (None, [])
            return reasoning, content, calls

        def remember(response: dict[str, Any]) -> None:
            if keep:
                _, content, calls = answer_of(c.text)
                store.put(response, rreq.input_messages(prior)
                          + [assistant_message(content, calls)], kid)

        top_k = rreq.top_logprobs or 0
        if not req.stream:
            reasoning, content, calls = answer_of(c.text)
            status, incomplete = status_of(c.finish_reason)
            lps = chat_logprobs(tt, c.output, 0, c.num_tokens, top_k)["content"] \
                if rreq.wants_logprobs else None
            body = response_object(rid, created, model, echo, status,
                                   output_items(content, calls, status, lps, reasoning),
                                   usage_of(group.usage()), incomplete, error_of(status))
            remember(body)
            return JSONBody(body)

        async def events() -> AsyncIterator[str]:
            stream = ResponseEvents(rid, created, model, echo)
            ts = tools.stream()
            rp = new_reasoning()
            held: list[dict[str, Any]] = []    # logprobs of tokens whose text is held back
            try:
                for ev in stream.start():
                    yield sse_event(ev)
                while True:
                    final = c.ended
                    delta, t0, t1 = c.new_delta()
                    c.sent_text += len(delta)
                    c.sent_tokens = t1
                    if rreq.wants_logprobs and t1 > t0:
                        held += chat_logprobs(tt, c.output, t0, t1, top_k)["content"]
                    if rp is not None:
                        thought, delta = rp.feed(delta, final)
                        for ev in stream.feed_reasoning(thought):
                            yield sse_event(ev)
                    content, call_deltas = ts.feed(delta, final)
                    lps, held = (held, []) if content else (None, held)
                    for ev in stream.feed(content, call_deltas, lps):
                        yield sse_event(ev)
                    if final:
                        break
                    try:
                        await group.next_update()
                    except Exception as exc:  # noqa: BLE001 - headers are already sent
                        for ev in stream.fail(engine_error_to_api(exc).body()["error"]):
                            yield sse_event(ev)
                        return
                if group.error is not None:   # the engine request failed as it ended
                    for ev in stream.fail(engine_error_to_api(group.error).body()["error"]):
                        yield sse_event(ev)
                    return
                finish(group)
                done = stream.finish(c.finish_reason, group.usage())
                remember(done[-1]["response"])
                for ev in done:
                    yield sse_event(ev)
            finally:
                await group.close_shielded()

        return SSEResponse(events(), on_close=group.close_shielded,
                           on_disconnect=state.metrics.count_disconnect)

    def previous_conversation(rreq: ResponsesRequest, kid: Optional[str]
                              ) -> list[dict[str, Any]]:
        """The stored conversation ``previous_response_id`` names (this key's only)."""
        rid = rreq.previous_response_id
        if rid is None:
            return []
        if not state.responses.enabled:
            raise unsupported("previous_response_id", "previous_response_id needs stored "
                              "responses and this server keeps none (start it with "
                              "--responses-store-size N); send the conversation (earlier "
                              "output items included) as input")
        entry = state.responses.get(rid, kid)
        if entry is None:
            raise stored_not_found(rid, "previous_response_id")
        return entry.conversation

    def stored_not_found(rid: str, param: Optional[str] = None) -> APIError:
        return APIError(f"Response with id '{rid}' not found.", status=404, param=param,
                        code="not_found")

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        kid = authenticate(request)
        entry = state.responses.get(response_id, kid)
        if entry is None:
            raise stored_not_found(response_id)
        return JSONBody(entry.response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> Response:
        kid = authenticate(request)
        if not state.responses.delete(response_id, kid):
            raise stored_not_found(response_id)
        return JSONBody({"id": response_id, "object": "response.deleted", "deleted": True})

    register_pooling_routes(app, state, parse, gone_response)
    register_lora_routes(app, state, parse, gone_response)
    register_sleep_routes(app, state, authenticate, parse, gone_response)
