"""Tokenizers: the checkpoint's own (transformers AutoTokenizer) or a byte-level one.

Both expose the same small interface the engine and CLI use:
    encode(text, add_special_tokens=True) -> list[int]
    encode_pair(text, text_pair) -> list[int]   (a cross-encoder's input)
    decode(ids, skip_special_tokens=True) -> str
    apply_chat_template(messages, add_generation_prompt=True) -> list[int]
    eos_token_ids: list[int];  bos_token_id: int | None;  vocab_size: int
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .._extras import MissingExtraError
from .config import BUILTIN_CONFIGS, list_models
from .hub import resolve_model


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255 (UTF-8); specials follow: 256 <bos>, 257 <eos>,
    258 <|im_start|>, 259 <|im_end|>. Ids past 259 (a dummy model's larger vocab) decode to
    ``<id>`` so a dummy model's output stays visible. Chat template, per message:
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""

    BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
    SPECIALS = {"<bos>": 256, "<eos>": 257, "<|im_start|>": 258, "<|im_end|>": 259}

    def __init__(self, vocab_size: int = 260, eos_token_ids: Sequence[int] | None = None,
                 add_bos: bool = True) -> None:
        if vocab_size < 260:
            raise ValueError(f"the byte tokenizer needs vocab_size >= 260, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.bos_token_id: int | None = self.BOS
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else [self.EOS]
        if self.IM_END not in self.eos_token_ids:
            self.eos_token_ids.append(self.IM_END)
        self.add_bos = add_bos
        self.chat_template = "byte-level <|im_start|>role\\ncontent<|im_end|>"

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if add_special_tokens and self.add_bos else []) + ids

    def encode_pair(self, text: str, text_pair: str) -> list[int]:
        """``<bos>`` text ``<eos>`` text_pair: a cross-encoder's (query, document) input."""
        return self.encode(text) + [self.EOS] + self.encode(text_pair, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        names = {v: k for k, v in self.SPECIALS.items()}
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.extend(bytes([i]))
            elif i in names:
                if not skip_special_tokens:
                    out.extend(names[i].encode())
            else:
                out.extend(f"<{i}>".encode())
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> list[int]:
        """``<|im_start|>role``, newline, content, ``<|im_end|>``, newline per message
        (ChatML in bytes); with ``continue_final_message=True`` the last message is left
        open. It renders no tools (the server flattens them into the messages first) and
        ignores other template variables; a ``chat_template`` of the caller's needs an HF
        tokenizer (ValueError)."""
        if tools:
            raise ValueError("the byte tokenizer's chat template renders no tools")
        if template_kwargs.get("chat_template"):
            raise ValueError("chat_template: the byte tokenizer renders only its built-in "
                             "ChatML (a Jinja template needs an HF tokenizer)")
        ids = [self.BOS] if self.add_bos else []
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError("each chat message needs 'role' and 'content'")
            ids += [self.IM_START] + list(f"{m['role']}\n".encode()) + \
                list(str(m["content"]).encode())
            if not (template_kwargs.get("continue_final_message") and i == len(messages) - 1):
                ids += [self.IM_END] + list(b"\n")
        if add_generation_prompt:
            ids += [self.IM_START] + list(b"assistant\n")
        return ids


class HFTokenizer:
    """A transformers tokenizer with the interface above (chat template from the checkpoint)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        eos: list[int] = []
        for e in list(eos_token_ids) + [tokenizer.eos_token_id]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
        self.eos_token_ids = eos
        self.bos_token_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)
        self.chat_template = getattr(tokenizer, "chat_template", None)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_pair(self, text: str, text_pair: str) -> list[int]:
        """The checkpoint's pair encoding (its post-processor's special tokens around and
        between): a cross-encoder's (query, document) input, as vLLM's score API."""
        return list(self.tokenizer(text, text_pair)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> list[int]:
        """Token ids of ``messages`` rendered by the checkpoint's chat template (or a
        ``chat_template`` Jinja string of the caller's, as transformers takes it), with
        ``tools`` (OpenAI function specs) and template variables (``enable_thinking``,
        ``continue_final_message``, ...) passed to it."""
        if not self.chat_template and not template_kwargs.get("chat_template"):
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json "
                             "chat_template); pass a plain prompt instead")
        # Render to text, then encode without adding specials again (the template has them).
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  tools=tools or None, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _eos_from_dir(model_dir: str) -> list[int]:
    eos: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, fname)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                e = json.load(f).get("eos_token_id")
            for v in (e if isinstance(e, list) else [e]):
                if v is not None and int(v) not in eos:
                    eos.append(int(v))
    return eos


def _processor_chat_template(model_dir: str) -> str | None:
    """A multimodal checkpoint's chat template kept beside the processor
    (``chat_template.jinja``, or ``chat_template.json``'s "chat_template"), which the
    tokenizer alone may not load (Qwen2.5-VL); None when there is none."""
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            return fh.read()
    path = os.path.join(model_dir, "chat_template.json")
    if os.path.isfile(path):
        import json

        with open(path, encoding="utf-8") as fh:
            template = json.load(fh).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def load_tokenizer(model: str, revision: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer for ``model``: a HF directory's (or hub id's, see :mod:`.hub`) own, or
    the byte-level one for a built-in name (its eos ids included when they are
    byte-tokenizer ids). A HF tokenizer needs the ``[hf]`` extra (transformers)."""
    model = resolve_model(model, revision)
    if os.path.isdir(model):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise MissingExtraError("transformers", "hf",
                                    f"the tokenizer of {model}") from None

        try:
            tok = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {model}: {exc}") from exc
        if not getattr(tok, "chat_template", None):
            tok.chat_template = _processor_chat_template(model)
        return HFTokenizer(tok, _eos_from_dir(model))
    key = model.lower()
    if key in list_models():
        cfg = BUILTIN_CONFIGS[key]
        eos = [e for e in cfg.get("eos_token_ids", []) if 256 <= e < 260]
        return ByteTokenizer(vocab_size=max(260, int(cfg["vocab_size"])), eos_token_ids=eos)
    raise FileNotFoundError(f"{model!r} is not a local HF model directory, a hub id (org/name) "
                            f"or a built-in model name ({', '.join(list_models())})")
