"""Incremental detokenizers: output token ids -> text, one step at a time, O(1) per token.

``make_detokenizer(tokenizer, prompt_ids, skip_special_tokens)`` picks the cheapest exact
one for the tokenizer:

- ``StreamDetokenizer``: the ``tokenizers`` library's ``DecodeStream`` (Rust) for HF fast
  tokenizers whose decode does no ``clean_up_tokenization_spaces`` pass (DecodeStream
  does not apply it). About 1 us per token.
- ``ByteDetokenizer``: the byte tokenizer of the built-in dummy models (ids 0..255 are
  UTF-8 bytes), through Python's incremental UTF-8 decoder.
- ``WindowDetokenizer``: any object with ``decode(ids, skip_special_tokens)``: decodes a
  short window of recent tokens twice per step (the classic vLLM algorithm).

All three hold back a token that ends in an incomplete UTF-8 character until the next
one completes it; ``flush()`` at the end emits what is held (as U+FFFD, like a one-shot
decode). Text is kept as a list of chunks (joined on demand), so appending is O(delta)
however long the output grows.
"""
from __future__ import annotations

import codecs
from typing import Any, Protocol


class Detokenizer(Protocol):
    """What the engine uses: ``append(ids) -> new text``, ``flush()``, ``text``, ``cut``."""

    def append(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class _TextBuffer:
    """Output text as chunks: O(1) append, joined lazily; a bounded tail for stop strings."""

    __slots__ = ("_chunks", "_joined", "num_chars")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._joined = ""
        self.num_chars = 0

    def add(self, s: str) -> None:
        if s:
            self._chunks.append(s)
            self.num_chars += len(s)

    @property
    def text(self) -> str:
        if self._chunks:
            self._joined += "".join(self._chunks)
            self._chunks.clear()
        return self._joined

    def tail(self, n: int) -> str:
        """The last n characters (joins only the chunks it needs)."""
        if not self._chunks or n <= 0:
            return self.text[-n:] if n > 0 else ""
        out, have = [], 0
        for c in reversed(self._chunks):
            out.append(c)
            have += len(c)
            if have >= n:
                return "".join(reversed(out))[-n:]
        return (self._joined[-(n - have):] if n > have else "") + "".join(reversed(out))

    def cut(self, num_chars: int) -> None:
        """Keep only the first num_chars characters (a stop string matched)."""
        self._joined = self.text[:num_chars]
        self.num_chars = len(self._joined)


class _BaseDetokenizer:
    """Text bookkeeping shared by the detokenizers (subclasses implement ``_step``)."""

    def __init__(self) -> None:
        self.buf = _TextBuffer()

    @property
    def text(self) -> str:
        return self.buf.text

    @property
    def num_chars(self) -> int:
        return self.buf.num_chars

    def tail(self, n: int) -> str:
        return self.buf.tail(n)

    def cut(self, num_chars: int) -> None:
        self.buf.cut(num_chars)

    def append(self, token_ids: list[int]) -> str:
        """Add new output tokens; return the text they complete (may be "")."""
        delta = self._step(token_ids)
        self.buf.add(delta)
        return delta

    def step(self, token_id: int) -> str:
        """Add one output token (the per-step hot path); return the text it completes."""
        return self.append([token_id])

    def flush(self) -> str:
        """At the end: emit held-back bytes too (an incomplete character -> U+FFFD)."""
        delta = self._flush()
        self.buf.add(delta)
        return delta

    def _step(self, token_ids: list[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _flush(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class WindowDetokenizer(_BaseDetokenizer):
    """Any tokenizer: decode ids[prefix:read] and ids[prefix:] each step, emit the
    difference unless it ends in U+FFFD. Starts on the last few prompt tokens so the first
    output token gets its leading space right (SentencePiece)."""

    PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-self.PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) \
            if ids else ""

    def _step(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Keep the id list short: only the window is ever decoded again.
            if self.prefix_offset > 64:
                del self.ids[:self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return full[len(prefix):]
        return ""

    def _flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StreamDetokenizer(_BaseDetokenizer):
    """``tokenizers.decoders.DecodeStream`` over a ``tokenizers.Tokenizer`` (Rust)."""

    PROMPT_CONTEXT = 4

    def __init__(self, rust_tokenizer: Any, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        from tokenizers.decoders import DecodeStream

        super().__init__()
        self.tok = rust_tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-self.PROMPT_CONTEXT:])
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.held: list[int] = []        # tokens whose text is not out yet
        self.context = context[-2:]      # tokens before ``held`` (for the flush decode)

    def step(self, token_id: int) -> str:
        s = self.stream.step(self.tok, token_id)
        if s is None:
            self.held.append(token_id)
            return ""
        if self.held:
            self.context = (self.held + [token_id])[-2:]
            self.held = []
        else:
            self.context = [self.context[-1], token_id] if self.context else [token_id]
        buf = self.buf
        buf._chunks.append(s)
        buf.num_chars += len(s)
        return s

    def _step(self, token_ids: list[int]) -> str:
        out = []
        for t in token_ids:
            s = self.stream.step(self.tok, t)
            if s is None:
                self.held.append(t)
            else:
                out.append(s)
                self.context = (self.held + [t])[-2:] if self.held else [t]
                self.held = []
        return "".join(out) if len(out) != 1 else out[0]

    def _flush(self) -> str:
        if not self.held:
            return ""
        decode = self.tok.decode
        skip = self.skip_special_tokens
        prefix = decode(self.context, skip_special_tokens=skip)
        full = decode(self.context + self.held, skip_special_tokens=skip)
        self.held = []
        return full[len(prefix):] if len(full) > len(prefix) else ""


class ByteDetokenizer(_BaseDetokenizer):
    """The dummy models' byte tokenizer: ids < 256 are UTF-8 bytes, the rest specials or
    ``<id>`` (see ``minikernels.models.tokenizer.ByteTokenizer``)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _step(self, token_ids: list[int]) -> str:
        if len(token_ids) == 1 and token_ids[0] < 256:
            return self.utf8.decode(bytes(token_ids))
        out = []
        for t in token_ids:
            if t < 256:
                out.append(self.utf8.decode(bytes((t,))))
            else:  # a special or out-of-byte id: its text ends any pending bytes
                s = self.tokenizer.decode([t], skip_special_tokens=self.skip_special_tokens)
                if s:
                    out.append(self.utf8.decode(b"", final=True))
                    out.append(s)
        return "".join(out)

    def _flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` when DecodeStream decodes exactly
    as its ``decode`` does (no clean-up pass), else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency of transformers
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    hf = getattr(tokenizer, "tokenizer", tokenizer)       # HFTokenizer wraps a transformers one
    backend = getattr(hf, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer) and not getattr(hf, "clean_up_tokenization_spaces", False):
        return backend
    return None


def make_detokenizer(tokenizer: Any, prompt_token_ids: list[int],
                     skip_special_tokens: bool = True) -> _BaseDetokenizer:
    """The cheapest exact incremental detokenizer for ``tokenizer`` (module docstring)."""
    from ..models.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return ByteDetokenizer(tokenizer, skip_special_tokens)
    rust = rust_tokenizer(tokenizer)
    if rust is not None:
        return StreamDetokenizer(rust, prompt_token_ids, skip_special_tokens)
    return WindowDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
