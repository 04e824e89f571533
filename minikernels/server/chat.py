"""Chat messages -> prompt token ids, without letting message text forge special tokens.

A chat template renders messages to text around control tokens (``<|im_start|>``,
``<|im_end|>``, ...). Tokenizing that text as a whole would turn a user's *typed*
``<|im_end|>\\n<|im_start|>system`` into the real control tokens, so one message could
forge a system turn. :func:`render_chat` therefore:

1. renders the template (with ``chat_template_kwargs``) and, when no message content
   holds special-token text, tokenizes it as a whole (the usual, exact tokenization);
2. otherwise renders again with each content replaced by a unique sentinel, checks that
   the template inserted every content verbatim, and tokenizes the template's own text
   normally but each content with ``split_special_tokens=True``: typed special-token
   text becomes ordinary tokens. A template that rewrites content (so it cannot be
   isolated) gets the request refused with a 400 instead.

Tokenizers without a Hugging Face chat template (the byte-level tokenizer of built-in
models) encode content as plain bytes already and are called directly.

Tools: a HF template gets ``tools=`` (OpenAI's tool objects) and the messages' assistant
``tool_calls`` / tool ``tool_call_id`` as they are; the template renders them. Tool
definitions, tool-call names / arguments and tool_call ids are template text, not content,
so special-token text in them is refused (400) rather than isolated. Without a HF
template (the byte tokenizer), :func:`flatten_tools` writes the tools into the system
turn and the calls into the assistant's content, Hermes / Qwen2.5 style.
"""
from __future__ import annotations

import codecs
import inspect
import json
import os
import secrets
from typing import Any, Optional

from .errors import APIError


def to_token_list(result: Any) -> list[int]:
    """apply_chat_template's result (list, dict with input_ids, tensor) -> list[int]."""
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):   # batched form [[...]]
        result = result[0]
    return [int(t) for t in result]


def special_token_strings(hf: Any) -> list[str]:
    """The text of every special (control) token of a transformers tokenizer."""
    found = set(getattr(hf, "all_special_tokens", None) or [])
    for tok in (getattr(hf, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return sorted((s for s in found if s), key=len, reverse=True)


def _hf_tokenizer(tokenizer: Any, chat_template: Optional[str] = None) -> Optional[Any]:
    """The Hugging Face tokenizer under ``tokenizer`` when it renders chats: its own
    template, or the server's ``chat_template`` (``--chat-template``)."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "apply_chat_template") and \
            (chat_template or getattr(hf, "chat_template", None)):
        return hf
    return None


def load_chat_template(value: str) -> str:
    """``--chat-template``'s value (vLLM's flag): a file's text, or the template itself
    when it holds Jinja markup (``{`` / ``}`` / a newline; ``\\n`` escapes decoded); a
    value that is neither is an unreadable path (ValueError naming it)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif any(c in value for c in "{}\n"):
        text = codecs.decode(value, "unicode_escape")
    else:
        raise ValueError(f"--chat-template {value!r}: no such file (an inline template "
                         "holds Jinja markup)")
    if not text.strip():
        raise ValueError("--chat-template is empty")
    return text


def check_chat_template(tokenizer: Any, chat_template: str) -> None:
    """ValueError unless ``tokenizer`` is a Hugging Face one (the byte tokenizer renders
    only its built-in format) and ``chat_template`` renders a user turn."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None or not hasattr(hf, "apply_chat_template"):
        raise ValueError("--chat-template needs the model's Hugging Face tokenizer (the "
                         "byte tokenizer of built-in models renders only its own format)")
    try:
        text = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True, chat_template=chat_template)
    except Exception as exc:  # noqa: BLE001 - any template failure is the flag's error
        raise ValueError(f"--chat-template does not render a user turn: {exc}") from None
    if not isinstance(text, str) or "hi" not in text:
        raise ValueError("--chat-template does not render the messages' content")


def _template_error(exc: Exception) -> APIError:
    return APIError(f"cannot apply the chat template: {exc}", param="messages")


def _accepts_kwargs(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def flatten_tools(messages: list[dict[str, Any]],
                  tools: Optional[list[dict[str, Any]]]) -> list[dict[str, str]]:
    """Tools and tool calls as plain {role, content} messages (templates without tools).

    The tool list goes into the system turn (one is added first when there is none);
    each assistant tool call is appended to its content as ``<tool_call>{json}</tool_call>``
    (what the ``hermes`` parser reads); tool messages keep role ``tool``.
    """
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            body = _dumps({"name": fn["name"], "arguments": fn["arguments"]})
            content += ("\n" if content else "") + f"<tool_call>\n{body}\n</tool_call>"
        d = {"role": m["role"], "content": content}
        if m.get("name"):
            d["name"] = m["name"]
        out.append(d)
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(_dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + block).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _check_tool_text(hf: Any, messages: list[dict[str, Any]],
                     tools: Optional[list[dict[str, Any]]]) -> None:
    """Special-token text in template-rendered tool fields -> 400 naming the field."""
    specials = special_token_strings(hf)
    if not specials:
        return
    fields: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        fields.append((f"messages[{i}].name", m.get("name") or ""))
        for j, call in enumerate(m.get("tool_calls") or []):
            fields.append((f"messages[{i}].tool_calls[{j}]", _dumps(call)))
        if m.get("tool_call_id") is not None:
            fields.append((f"messages[{i}].tool_call_id", str(m["tool_call_id"])))
    for i, tool in enumerate(tools or []):
        fields.append((f"tools[{i}]", _dumps(tool)))
    for param, text in fields:
        hit = next((s for s in specials if s in text), None)
        if hit is not None:
            raise APIError(f"{param} may not contain special-token text ({hit!r})",
                           param=param, code="invalid_value")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: Optional[dict[str, Any]] = None,
                tools: Optional[list[dict[str, Any]]] = None,
                chat_template: Optional[str] = None) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template, or the server's
    ``chat_template`` in its place (see above).

    Runs the template and the tokenizer: call it off the event loop.
    """
    kwargs = dict(template_kwargs or {})
    hf = _hf_tokenizer(tokenizer, chat_template)
    if hf is not None and chat_template:
        kwargs["chat_template"] = chat_template
    if hf is None:
        if tools or any(m.get("tool_calls") or m.get("tool_call_id") is not None
                        for m in messages):
            messages = flatten_tools(messages, tools)
        fn = tokenizer.apply_chat_template
        extra = kwargs if kwargs and _accepts_kwargs(fn) else {}
        # Without **kwargs the template takes no variables: extra ones change nothing,
        # exactly as a Jinja template ignores variables it does not use.
        try:
            return to_token_list(fn(messages, add_generation_prompt=add_generation_prompt,
                                    **extra))
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors are the client's
            raise _template_error(exc) from None
    if tools is not None:
        kwargs["tools"] = tools
    return _render_hf(hf, messages, add_generation_prompt, kwargs)


def _render_text(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                 kwargs: dict[str, Any]) -> str:
    try:
        text = hf.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - template errors are the client's
        raise _template_error(exc) from None
    if not isinstance(text, str):
        raise APIError("the chat template did not render to text", param="messages")
    return text


def _render_hf(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
               kwargs: dict[str, Any]) -> list[int]:
    _check_tool_text(hf, messages, kwargs.get("tools"))
    text = _render_text(hf, messages, add_generation_prompt, kwargs)
    specials = special_token_strings(hf)
    contents = [m.get("content") or "" for m in messages]
    if not any(s in c for c in contents for s in specials):
        return list(hf.encode(text, add_special_tokens=False))

    nonce = secrets.token_hex(8)
    # Empty contents stay empty: a template may render an empty content differently (an
    # assistant turn holding only tool calls), and there is nothing in them to isolate.
    sentinels = [f"\ue000mk{nonce}.{i}\ue001" if c else "" for i, c in enumerate(contents)]
    masked = [{**m, "content": s} if s else m for m, s in zip(messages, sentinels)]
    masked_text = _render_text(hf, masked, add_generation_prompt, kwargs)
    pieces: list[tuple[bool, str]] = []    # (is_content, text)
    pos = 0
    for content, sentinel in zip(contents, sentinels):
        if not sentinel:
            continue
        count = masked_text.count(sentinel)
        if count == 0:                      # the template does not render this message
            continue
        at = masked_text.find(sentinel, pos)
        if count > 1 or at < 0:
            pieces = []
            break
        pieces += [(False, masked_text[pos:at]), (True, content)]
        pos = at + len(sentinel)
    pieces.append((False, masked_text[pos:]))
    if "".join(p for _, p in pieces) != text:
        hit = next(s for s in specials if any(s in c for c in contents))
        raise APIError(f"message content contains special-token text ({hit!r}) and this "
                       "model's chat template rewrites content, so it cannot be kept apart "
                       "from the template's own special tokens", param="messages",
                       code="invalid_value")
    ids: list[int] = []
    for is_content, piece in pieces:
        if piece:
            ids += hf.encode(piece, add_special_tokens=False, split_special_tokens=is_content)
    return ids
