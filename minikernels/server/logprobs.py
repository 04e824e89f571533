"""Per-token logprobs in OpenAI's two shapes (completions and chat), with real bytes.

A token may hold part of a UTF-8 character (byte-level BPE splits "é" into two tokens).
Its text then decodes to U+FFFD, but OpenAI's ``bytes`` field must carry the token's own
bytes so a client can join them back; :class:`TokenText` finds them from the vocabulary
(byte-level BPE, SentencePiece ``<0xNN>`` byte fallback, or the byte tokenizer's ids).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from ..engine.detokenizer import gpt2_char_to_byte
from ..models.tokenizer import ByteTokenizer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (character -> byte)."""
    return gpt2_char_to_byte()


def _is_byte_level(hf: Any) -> bool:
    backend = getattr(hf, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and ("ByteLevel" in type(decoder).__name__
                                    or "ByteLevel" in repr(decoder))


class TokenText:
    """Text and bytes of single token ids for one tokenizer (cached)."""

    #: logprob entries' own ``decoded_token`` may stand for the token's text
    uses_decoded = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "tokenizer", None)
        self._hf = hf if hf is not None and hasattr(hf, "convert_ids_to_tokens") else None
        self._byte_level = self._hf is not None and _is_byte_level(self._hf)
        self._cache: dict[int, bytes] = {}

    def text(self, tid: int) -> str:
        try:
            return self.tokenizer.decode([tid])
        except Exception:  # noqa: BLE001 - a token without text is shown as ""
            return ""

    def bytes_of(self, tid: int, text: Optional[str] = None) -> bytes:
        """The token's own bytes (not those of its U+FFFD rendering)."""
        cached = self._cache.get(tid)
        if cached is not None:
            return cached
        out = self._lookup(tid)
        if out is None:
            out = (text if text is not None else self.text(tid)).encode("utf-8")
        if len(self._cache) < 1 << 18:
            self._cache[tid] = out
        return out

    def as_token_ids(self) -> "TokenIdText":
        """The view that names tokens ``"token_id:<id>"`` (vLLM's
        ``return_tokens_as_token_ids``); ``bytes`` stay the tokens' own."""
        return TokenIdText(self)

    def _lookup(self, tid: int) -> Optional[bytes]:
        if isinstance(self.tokenizer, ByteTokenizer):
            if 0 <= tid < 256:
                return bytes([tid])
            return None
        if self._hf is None:
            return None
        try:
            piece = self._hf.convert_ids_to_tokens(tid)
        except Exception:  # noqa: BLE001
            return None
        if not isinstance(piece, str):
            return None
        if getattr(self._hf, "added_tokens_decoder", {}).get(tid) is not None:
            return piece.encode("utf-8")
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return piece.replace("\u2581", " ").encode("utf-8")


class TokenIdText:
    """:class:`TokenText` with every token's text ``"token_id:<id>"``: a client gets the
    exact ids of the tokens and of their alternatives (tokens that are not valid UTF-8
    on their own included)."""

    uses_decoded = False

    def __init__(self, inner: TokenText) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer

    def text(self, tid: int) -> str:
        return f"token_id:{int(tid)}"

    def bytes_of(self, tid: int, text: Optional[str] = None) -> bytes:
        return self.inner.bytes_of(tid)


def finite(x: float) -> float:
    """OpenAI sends -9999.0 for a probability that underflows to zero."""
    return x if math.isfinite(x) else -9999.0


def token_rows(tt: TokenText, out: Any, start: int, end: int,
               k: int) -> list[tuple[int, str, float, list[tuple[int, str, float]]]]:
    """Generated tokens [start, end) as (id, text, logprob, top k [(id, text, logprob)]).

    ``out.logprobs[i]`` is ``{token_id: Logprob}`` holding the sampled token and the
    engine's top alternatives; k = 0 lists the sampled token alone, like vLLM.
    """
    entries = getattr(out, "logprobs", None) or []
    ids = list(out.token_ids or [])
    rows = []
    for i in range(start, min(end, len(ids), len(entries))):
        tid, entry = ids[i], entries[i]
        items = []
        for key, v in (entry.items() if isinstance(entry, dict) else ()):
            text = getattr(v, "decoded_token", None) if tt.uses_decoded else None
            items.append((int(key), float(getattr(v, "logprob", v)),
                          text if text is not None else tt.text(int(key))))
        by_id = {t: (lp, text) for t, lp, text in items}
        lp, text = by_id.get(tid, (-math.inf, tt.text(tid)))
        top = sorted(items, key=lambda x: -x[1])[:k] if k > 0 else [(tid, lp, text)]
        rows.append((tid, text, finite(lp), [(t, t_text, finite(t_lp))
                                             for t, t_lp, t_text in top]))
    return rows


def completion_logprobs(tt: TokenText, out: Any, start: int, end: int, k: int,
                        text_offset: int) -> dict:
    """Completions' ``logprobs`` object for generated tokens [start, end)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = text_offset
    for _, text, lp, top in token_rows(tt, out, start, end, k):
        tokens.append(text)
        lps.append(lp)
        tops.append({t_text: t_lp for _, t_text, t_lp in top})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tt: TokenText, out: Any, start: int, end: int, k: int) -> dict:
    """Chat's ``logprobs`` object (``content`` list) for generated tokens [start, end)."""
    content = []
    for tid, text, lp, top in token_rows(tt, out, start, end, k):
        content.append({
            "token": text, "logprob": lp, "bytes": list(tt.bytes_of(tid, text)),
            "top_logprobs": [{"token": t_text, "logprob": t_lp,
                              "bytes": list(tt.bytes_of(t, t_text))}
                             for t, t_text, t_lp in top] if k > 0 else [],
        })
    return {"content": content}


def prompt_completion_logprobs(tt: TokenText, prompt_ids: list[int],
                               prompt_logprobs: Optional[list], k: int) -> dict:
    """Completions' ``logprobs`` object for the echoed prompt tokens (``echo`` + ``logprobs``).

    ``prompt_logprobs`` is the engine's (vLLM's shape): None for the first prompt token,
    then ``{token_id: Logprob}`` holding the prompt token and the top alternatives. The
    first token has ``null`` logprob and top logprobs (nothing precedes it), as in
    OpenAI's legacy completions and vLLM; ``text_offset`` counts from the prompt start.
    """
    tokens: list[str] = []
    lps: list[Optional[float]] = []
    tops: list[Optional[dict]] = []
    offsets: list[int] = []
    entries = prompt_logprobs or []
    pos = 0
    for i, tid in enumerate(prompt_ids):
        text = tt.text(int(tid))
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        entry = entries[i] if i < len(entries) else None
        if not isinstance(entry, dict):
            lps.append(None)
            tops.append(None)
            continue
        items = []
        for key, v in entry.items():
            t_text = getattr(v, "decoded_token", None) if tt.uses_decoded else None
            items.append((int(key), float(getattr(v, "logprob", v)),
                          t_text if t_text is not None else tt.text(int(key))))
        by_id = {t: lp for t, lp, _ in items}
        lp = by_id.get(int(tid), -math.inf)
        lps.append(finite(lp))
        top = sorted(items, key=lambda x: -x[1])[:k] if k > 0 else [(int(tid), lp, text)]
        tops.append({t_text: finite(t_lp) for _, t_lp, t_text in top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def vllm_prompt_logprobs(tt: TokenText, prompt_ids: list[int],
                         prompt_logprobs: Optional[list], k: int) -> list[Optional[dict]]:
    """vLLM's ``prompt_logprobs`` response field: per prompt token, None for the first,
    then ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the prompt token
    and its ``k`` most likely alternatives (rank 1 = most likely)."""
    entries = prompt_logprobs or []
    out: list[Optional[dict]] = []
    for i, tid in enumerate(prompt_ids):
        entry = entries[i] if i < len(entries) else None
        if not isinstance(entry, dict):
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: int(getattr(kv[1], "rank", 1)))
        keep = [(t, v) for t, v in ranked if int(t) == int(tid)]
        keep += [(t, v) for t, v in ranked if int(t) != int(tid)][:k]
        row = {}
        for t, v in keep:
            text = getattr(v, "decoded_token", None) if tt.uses_decoded else None
            row[str(int(t))] = {"logprob": finite(float(v.logprob)), "rank": int(v.rank),
                                "decoded_token": text if text is not None else tt.text(int(t))}
        out.append(row)
    return out


def join_completion_logprobs(first: dict, second: dict) -> dict:
    """Two completions ``logprobs`` objects, one after the other (prompt, then output)."""
    return {key: list(first[key]) + list(second[key])
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
