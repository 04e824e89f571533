"""``attn_implementation="minikernels"``: transformers' attention on minikernels' flash kernels.

Registered (by :func:`register`, run when ``minikernels.hf`` is imported) under the name
``"minikernels"`` in two transformers registries:

- ``AttentionInterface``: :func:`attention_forward`, called by every attention module with
  query [B, Hq, Sq, D], key / value [B, Hkv, Sk, D] (the cache already updated), the mask
  below, ``scaling``, ``dropout``, ``sliding_window``, ``softcap``, ``is_causal``. Returns
  (out [B, Sq, Hq, D], None), as transformers' FlashAttention integration does.
- ``AttentionMaskInterface``: :func:`attention_mask` builds FlashAttention's mask: ``None``
  when nothing is padded, else the 2-D key-validity mask [B, M] (M <= Sk; slots past M are
  unused static-cache slots), whose last Sq columns are the queries.

Paths (which kernel runs; everything else falls back, see below):

- no mask: ``flash_attention_bshd`` on the [B, S, H, D] views (causal aligned bottom-right,
  so a prefill over a cached prefix works; GQA; ``window_left = sliding_window - 1``;
  softcap). Static shapes: compiles with ``fullgraph=True``.
- 2-D mask, one query per row (decode): the row's valid keys are gathered to the front of a
  contiguous copy (a stable sort of the mask, static shapes) and ``paged_decode_attention``
  reads them as pages, ``seq_lens`` = valid keys per row. The causal bound and the sliding
  window are folded into the key mask first, so any padding pattern is exact. Compiles with
  ``fullgraph=True`` (the StaticCache decode step).
- 2-D mask, several queries (padded prefill): unpad to varlen (valid keys and valid queries
  packed per row) and ``flash_attention``. Every valid query is itself a valid key and order
  is kept, so bottom-right causal alignment holds in the packed space for any padding
  pattern; a sliding window (counted in slots, as transformers does) is kept only when each
  row's valid keys are contiguous (left / right padding). Padded query rows are 0.
  Data-dependent shapes: under ``torch.compile`` this case falls back to SDPA.
- ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs and no mask (padding-free batches):
  ``flash_attention`` varlen directly.

Fallbacks (a one-time ``UserWarning`` naming the reason; never a silent wrong answer):
torch SDPA (transformers' ``sdpa_attention_forward``) with an exact 4-D boolean mask built
here, or plain fp32 eager math when softcap or ``output_attentions=True`` is asked for (it
returns the weights). Reasons: output_attentions; dropout while training; inputs that need
gradients (the ops have no backward); a 4-D / float mask from the caller; a mask pattern the
2-D mask cannot express (packed sequences detected from position_ids, chunked / block /
custom mask functions: :func:`attention_mask` then returns the exact 4-D mask); a window
over a padded prefill with holes; a bidirectional sliding window; head dims the kernels do
not take (not a multiple of 8, > 512, or a value head dim unlike the query's); dtypes other
than fp16 / bf16 / fp32; a padded prefill while compiling. ``s_aux`` (GPT-OSS's attention
sinks, [Hq]) goes to the ops' ``sinks`` (one more logit per head in every softmax).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Module level, not inside the functions: torch.compile traces attention_mask /
# attention_forward, and torch 2.11's dynamo cannot trace an import of transformers' lazy
# submodules ("Bad import result"); 2.13's can.
from transformers import masking_utils as mu
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import ops
from ..ops.attention import MAX_HEAD_DIM

NAME = "minikernels"
_warned: set[str] = set()


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _warn_once(reason: str) -> None:
    """One UserWarning per reason per process (not while torch.compile traces)."""
    if _compiling() or reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"minikernels attention: falling back to torch SDPA / eager math: {reason}",
                  UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------ mask


def _noop(*args: Any) -> bool:
    return True


def _codes() -> tuple[Any, Any]:
    return mu.and_masks(_noop).__code__, mu.sliding_window_overlay(1).__code__


_AND_CODE, _SLIDING_CODE = _codes()


def mask_kind(mask_function: Callable) -> str | None:
    """'causal', 'bidirectional' or 'sliding' (causal + window) for transformers' own mask
    functions; None for anything else (packed sequences, chunked, block-wise, or / and
    overlays, custom), whose pattern the FlashAttention 2-D mask cannot carry."""
    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    # sliding_window_causal_mask_function(w) = and_masks(sliding_window_overlay(w), causal).
    # Code objects are compared (dynamo does not trace __qualname__ of closures faithfully);
    # while compiling, a closure made inside the traced region has no readable __closure__:
    # it is reported unknown (its exact 4-D mask is used).
    if getattr(mask_function, "__code__", None) is not _AND_CODE or _compiling():
        return None
    closure = mask_function.__closure__
    if closure is not None and len(closure) == 1:
        fns = closure[0].cell_contents
        if (isinstance(fns, tuple) and len(fns) == 2 and fns[1] is mu.causal_mask_function
                and getattr(fns[0], "__code__", None) is _SLIDING_CODE):
            return "sliding"
    return None


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                   kv_offset: int = 0, mask_function: Callable | None = None,
                   attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """The mask transformers hands to :func:`attention_forward` (FlashAttention's contract).

    Returns None when every key is valid and the keys are exactly the filled slots; else the
    2-D bool key mask [B, M] (M <= kv_length; the queries are its last q_length columns). A
    mask function the 2-D form cannot express gets transformers' exact 4-D boolean SDPA mask
    instead (the attention then falls back to SDPA).
    """
    mask_function = mask_function or mu.causal_mask_function
    if mask_kind(mask_function) is None:
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                            attention_mask=attention_mask, allow_is_causal_skip=False,
                            allow_is_bidirectional_skip=False, **kwargs)
    if attention_mask is None:
        # A static cache without a 2-D mask: slots past the filled ones hold zeros.
        if isinstance(q_offset, Tensor):
            if _compiling():  # cannot size a 2-D mask from a tensor while tracing
                kwargs.pop("allow_is_causal_skip", None)
                kwargs.pop("allow_is_bidirectional_skip", None)
                return mu.sdpa_mask(batch_size=batch_size, q_length=q_length,
                                    kv_length=kv_length, q_offset=q_offset,
                                    kv_offset=kv_offset, mask_function=mask_function,
                                    attention_mask=None, allow_is_causal_skip=False,
                                    allow_is_bidirectional_skip=False, **kwargs)
            q_offset = int(q_offset)
        filled = q_offset + q_length - kv_offset
        if filled < kv_length:
            return torch.ones(batch_size, filled, dtype=torch.bool,
                              device=kwargs.get("device", "cpu"))
        return None
    mask = attention_mask[:, -kv_length:].bool()
    if mask.shape[1] == kv_length and not _compiling() and bool(mask.all()):
        return None
    return mask


# ------------------------------------------------------------------------- attention


def _unsupported(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 mask: Any, dropout: float, causal: bool, sliding_window: int | None,
                 kwargs: dict[str, Any]) -> str | None:
    """Why the kernels cannot take this call (None when they can)."""
    if kwargs.get("output_attentions", False):
        return "output_attentions=True (the kernels do not form the weights)"
    if dropout and dropout > 0.0:
        return "attention dropout in training mode"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        return "inputs require grad (the ops are forward-only)"
    if mask is not None and not (isinstance(mask, Tensor) and
                                 (mask.ndim == 2 or _row_mask_4d(mask, query))):
        return "a 4-D (or non-tensor) attention mask: its pattern is used as given"
    d, dv = query.shape[-1], value.shape[-1]
    if d != dv or d > MAX_HEAD_DIM or key.shape[-1] != d:
        return f"head dims q/k {d} / {key.shape[-1]}, v {dv} (kernels: equal, <= {MAX_HEAD_DIM})"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or \
            key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes q {query.dtype}, k {key.dtype}, v {value.dtype}"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]} kv heads"
    if sliding_window is not None and not causal:
        return "a bidirectional sliding window"
    return None


def _row_mask_4d(mask: Tensor, query: Tensor) -> bool:
    """A 4-D boolean mask with one query row shared by all heads ([B or 1, 1, 1, Sk]): for a
    single query it is just the set of keys to read, so the decode kernel takes it exactly."""
    return (mask.ndim == 4 and mask.dtype == torch.bool and query.shape[2] == 1 and
            mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] in (1, query.shape[0]))


def _key_mask(mask: Tensor, sk: int) -> tuple[Tensor, int]:
    """2-D mask [B, M] -> (key validity [B, Sk] bool, M)."""
    valid = mask.bool()
    if valid.shape[1] > sk:
        valid = valid[:, -sk:]
    m = valid.shape[1]
    if m < sk:
        valid = F.pad(valid, (0, sk - m), value=False)
    return valid, m


def _allowed_4d(mask: Tensor | None, b: int, sq: int, sk: int, causal: bool,
                sliding_window: int | None, device: torch.device) -> Tensor | None:
    """The exact boolean [B, 1, Sq, Sk] pattern of a None / 2-D mask (None: no mask)."""
    if mask is None:
        valid, m = torch.ones(b, sk, dtype=torch.bool, device=device), sk
        if not causal or (sq == 1 and sliding_window is None):
            return None
    else:
        valid, m = _key_mask(mask, sk)
    allowed = valid[:, None, None, :].expand(b, 1, sq, sk)
    slots = torch.arange(sk, device=device)
    qpos = torch.arange(sq, device=device) + (m - sq)
    if causal:
        allowed = allowed & (slots[None, :] <= qpos[:, None])
        if sliding_window is not None:
            allowed = allowed & (slots[None, :] > qpos[:, None] - sliding_window)
    return allowed


def _fallback(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
              mask: Any, dropout: float, scaling: float | None, causal: bool,
              sliding_window: int | None, softcap: float | None,
              kwargs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    b, _, sq, _ = query.shape
    sk = key.shape[2]
    ours = mask is None or (isinstance(mask, Tensor) and mask.ndim == 2)
    # ours: the exact pattern of a None / 2-D mask; else the caller's 4-D mask, as given
    mask4 = _allowed_4d(mask, b, sq, sk, causal, sliding_window, query.device) if ours else mask
    want_weights = bool(kwargs.get("output_attentions", False))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    empty = None
    if ours and mask4 is not None:
        # rows that see no key (padding queries) would give NaN: let them see all, zero after
        empty = ~mask4.any(dim=-1, keepdim=True)                     # [B, 1, Sq, 1]
        mask4 = mask4 | empty
    sinks = kwargs.get("s_aux")
    if not want_weights and not softcap and sinks is None:
        out, weights = sdpa_attention_forward(module, query, key, value, mask4,
                                              dropout=dropout, scaling=scale,
                                              is_causal=causal if mask4 is None else False)
    else:
        out, weights = _eager(query, key, value, mask4, scale, dropout, softcap, want_weights,
                              sinks)
    if empty is not None:
        out = out.masked_fill(empty.view(b, sq, 1, 1), 0.0)
    return out, weights


def _eager(query: Tensor, key: Tensor, value: Tensor, mask4: Tensor | None, scale: float,
           dropout: float, softcap: float | None, want_weights: bool,
           sinks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Plain attention in fp32 math (softcap, attention weights, attention sinks: one more
    logit per head in each softmax, dropped after it)."""
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    s = torch.matmul(query.float(), k.transpose(2, 3)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask4 is not None:
        s = s.masked_fill(~mask4, float("-inf")) if mask4.dtype == torch.bool else s + mask4
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1].nan_to_num(0.0)
    else:
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout:
        p = F.dropout(p, p=dropout, training=True)
    out = torch.matmul(p, v).to(query.dtype).transpose(1, 2).contiguous()
    return out, (p.to(query.dtype) if want_weights else None)


def _decode_compacted(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float,
                      causal: bool, sliding_window: int | None, softcap: float,
                      sinks: Tensor | None = None) -> Tensor:
    """One query per row, any 2-D mask: valid keys gathered to the front, paged decode."""
    b, _, _, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    valid, m = _key_mask(mask, sk)
    slots = torch.arange(sk, device=query.device)
    if causal:
        valid = valid & (slots <= m - 1)
        if sliding_window is not None:
            valid = valid & (slots > m - 1 - sliding_window)
    # stable sort: valid slots first, in order; static shapes (compiles)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    bs = 16 if sk >= 16 else 8
    nb = -(-sk // bs)
    if nb * bs > sk:
        order = F.pad(order, (0, nb * bs - sk), value=0)   # never read: seq_lens <= Sk
    rows = torch.arange(b, device=query.device)[:, None]
    kc = key.transpose(1, 2)[rows, order].view(b * nb, bs, hkv, d)
    vc = value.transpose(1, 2)[rows, order].view(b * nb, bs, hkv, d)
    table = torch.arange(b * nb, device=query.device, dtype=torch.int32).view(b, nb)
    lens = valid.sum(dim=1, dtype=torch.int32)
    out = ops.paged_decode_attention(query[:, :, 0, :], kc, vc, table, lens,
                                     softmax_scale=scale, softcap=softcap, sinks=sinks)
    return out.unsqueeze(1)


def _contiguous_rows(valid: Tensor) -> bool:
    """Each row's True entries form one run (left / right padding, no holes)."""
    n = valid.sum(dim=1)
    idx = torch.arange(valid.shape[1], device=valid.device)
    first = torch.where(valid, idx, valid.shape[1]).amin(dim=1)
    last = torch.where(valid, idx, -1).amax(dim=1)
    return bool(((n == 0) | (last - first + 1 == n)).all())


def _cu(lengths: Tensor) -> Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _prefill_unpadded(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float,
                      causal: bool, window_left: int, softcap: float,
                      sinks: Tensor | None = None) -> Tensor:
    """Several queries per row, a 2-D mask: pack the valid keys (and, causal, the valid
    queries) per row into varlen and run flash_attention; scatter back (0 at padding)."""
    b, hq, sq, d = query.shape
    sk = key.shape[2]
    valid, m = _key_mask(mask, sk)
    kb, ks = valid.nonzero(as_tuple=True)
    kt, vt = key.transpose(1, 2), value.transpose(1, 2)
    k, v = kt[kb, ks], vt[kb, ks]
    klens = valid.sum(dim=1, dtype=torch.int32)
    qt = query.transpose(1, 2)
    if causal:
        q_valid = valid[:, m - sq:m]
        qb, qs = q_valid.nonzero(as_tuple=True)
        q = qt[qb, qs]
        qlens = q_valid.sum(dim=1, dtype=torch.int32)
    else:   # every query sees every valid key: keep all queries (also cross attention)
        q = qt.reshape(b * sq, hq, d)
        qlens = torch.full((b,), sq, dtype=torch.int32, device=query.device)
    lens = torch.stack([qlens, klens]).amax(dim=1).tolist()
    out = ops.flash_attention(q, k, v, _cu(qlens), _cu(klens), int(lens[0]), int(lens[1]),
                              causal=causal, softmax_scale=scale, window_left=window_left,
                              softcap=softcap, sinks=sinks)
    if not causal:
        return out.view(b, sq, hq, d)
    full = out.new_zeros(b, sq, hq, d)
    full[qb, qs] = out
    return full


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """transformers attention on minikernels (the ``"minikernels"`` attn_implementation).

    query [B, Hq, Sq, D]; key, value [B, Hkv, Sk, D]; attention_mask from
    :func:`attention_mask` (None or 2-D [B, M]) or a caller's 4-D mask (falls back).
    Returns (out [B, Sq, Hq, D] in query's dtype, None) (the weights only on the
    output_attentions fallback).
    """
    if isinstance(attention_mask, Tensor) and attention_mask.ndim == 2 and \
            attention_mask.dtype.is_floating_point:
        raise ValueError("a 2-D float attention mask is ambiguous (additive or 0/1?); pass a "
                         "bool / int 0-1 padding mask or a 4-D mask")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    reason = _unsupported(module, query, key, value, attention_mask, dropout, causal,
                          sliding_window, kwargs)
    b, hq, sq, d = query.shape
    sk = key.shape[2]
    if reason is None and isinstance(attention_mask, Tensor) and sq > 1 and _compiling():
        reason = "a padded multi-query step under torch.compile (data-dependent unpadding)"
    if reason is None and isinstance(attention_mask, Tensor) and sq > 1 and causal and \
            min(attention_mask.shape[1], sk) < sq:
        reason = f"a 2-D mask of {attention_mask.shape[1]} keys for {sq} causal queries"
    window_left = sliding_window - 1 if (sliding_window is not None and causal) else -1
    if reason is None and isinstance(attention_mask, Tensor) and sq > 1 and window_left >= 0 \
            and not _contiguous_rows(_key_mask(attention_mask, sk)[0]):
        reason = "a sliding window over a padded batch with holes in the mask"
    if reason is not None:
        _warn_once(reason)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal,
                         sliding_window, softcap, kwargs)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    cap = float(softcap) if softcap else 0.0
    sinks = kwargs.get("s_aux")                 # GPT-OSS's attention sinks [Hq]
    if attention_mask is None:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):   # padding-free batch
            out = ops.flash_attention(
                query.transpose(1, 2).reshape(b * sq, hq, d),
                key.transpose(1, 2).reshape(b * sk, key.shape[1], d),
                value.transpose(1, 2).reshape(b * sk, key.shape[1], d),
                cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                causal=causal, softmax_scale=scale, window_left=window_left, softcap=cap,
                sinks=sinks)
            return out.view(b, sq, hq, d), None
        out = ops.flash_attention_bshd(query.transpose(1, 2), key.transpose(1, 2),
                                       value.transpose(1, 2), causal=causal,
                                       softmax_scale=scale, window_left=window_left,
                                       softcap=cap, sinks=sinks)
        return out, None
    if attention_mask.ndim == 4:   # [B | 1, 1, 1, Sk] bool: the keys to read, exactly
        keys = attention_mask[:, 0, 0, :].expand(b, attention_mask.shape[-1])
        return _decode_compacted(query, key, value, keys, scale, False, None, cap,
                                 sinks), None
    if sq == 1:
        return _decode_compacted(query, key, value, attention_mask, scale, causal,
                                 sliding_window if causal else None, cap, sinks), None
    return _prefill_unpadded(query, key, value, attention_mask, scale, causal, window_left,
                             cap, sinks), None


def register(name: str = NAME) -> None:
    """Register :func:`attention_forward` and :func:`attention_mask` with transformers under
    ``name`` (idempotent), so ``attn_implementation=name`` works."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
