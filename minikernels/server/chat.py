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
"""
from __future__ import annotations

import inspect
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


def _hf_tokenizer(tokenizer: Any) -> Optional[Any]:
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "apply_chat_template") and \
            getattr(hf, "chat_template", None):
        return hf
    return None


def _template_error(exc: Exception) -> APIError:
    return APIError(f"cannot apply the chat template: {exc}", param="messages")


def _accepts_kwargs(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
                template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (see above).

    Runs the template and the tokenizer: call it off the event loop.
    """
    kwargs = dict(template_kwargs or {})
    hf = _hf_tokenizer(tokenizer)
    if hf is None:
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
    return _render_hf(hf, messages, add_generation_prompt, kwargs)


def _render_text(hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
                 kwargs: dict[str, Any]) -> str:
    try:
        text = hf.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - template errors are the client's
        raise _template_error(exc) from None
    if not isinstance(text, str):
        raise APIError("the chat template did not render to text", param="messages")
    return text


def _render_hf(hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
               kwargs: dict[str, Any]) -> list[int]:
    text = _render_text(hf, messages, add_generation_prompt, kwargs)
    specials = special_token_strings(hf)
    for i, m in enumerate(messages):
        name = m.get("name") or ""
        hit = next((s for s in specials if s in name), None)
        if hit is not None:
            raise APIError(f"a message name may not contain special-token text ({hit!r})",
                           param=f"messages[{i}].name", code="invalid_value")
    contents = [m["content"] for m in messages]
    if not any(s in c for c in contents for s in specials):
        return list(hf.encode(text, add_special_tokens=False))

    nonce = secrets.token_hex(8)
    sentinels = [f"\ue000mk{nonce}.{i}\ue001" for i in range(len(messages))]
    masked = [{**m, "content": s} for m, s in zip(messages, sentinels)]
    masked_text = _render_text(hf, masked, add_generation_prompt, kwargs)
    pieces: list[tuple[bool, str]] = []    # (is_content, text)
    pos = 0
    for content, sentinel in zip(contents, sentinels):
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
