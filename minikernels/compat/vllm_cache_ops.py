"""vLLM's block-level KV-cache utilities (``vllm._custom_ops``: ``swap_blocks``,
``copy_blocks``, ``copy_blocks_mla``, ``concat_and_cache_mla``, ``cp_gather_cache``,
``gather_and_maybe_dequant_cache``), re-exported by :mod:`minikernels.compat.vllm_ops`.

Plain PyTorch (index_select / index_copy_ and a quantizing cast): these move whole blocks
or rows of a cache, memory-bound copies that torch's own indexing kernels already run at
bandwidth; no minikernels kernel is involved. vLLM's names, argument order and semantics:

    swap_blocks(src, dst, block_mapping)                        (vLLM <= 0.11)
    swap_blocks(src, dst, block_size_in_bytes, block_mapping)   (later vLLM)
        dst[d] = src[s] for each row (s, d) of block_mapping (int64 [n, 2], on the CPU,
        as vLLM requires); src and dst may sit on different devices (GPU <-> CPU
        offload); block_size_in_bytes must be src's bytes per block (element_size *
        stride(0)), the span vLLM's memcpy moves.
    copy_blocks(key_caches, value_caches, block_mapping)
    copy_blocks_mla(kv_caches, block_mapping)
        cache[d] = cache[s] for each layer's cache and each (s, d) row of block_mapping
        (int64 [n, 2], on the caches' device); every copy reads the blocks as they were
        before the call (a source may feed several destinations).
    concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
        MLA's latent cache: token t's row [kv_c[t], k_pe[t]] (kv_lora_rank + rope dims)
        into kv_cache [num_blocks, block_size, entry] at slot_mapping[t] (-1: skip; rows
        of kv_c past slot_mapping's length are ignored, as vLLM's kernel runs
        slot_mapping.size(0) tokens). kv_cache_dtype "auto": kv_cache in kv_c's dtype;
        "fp8" / "fp8_e4m3" / "fp8_e5m2": kv_cache uint8 or that float8 format holding
        fp8(clamp(x / scale, +-max)), scale a float32 tensor of one element.
    cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None)
        dst[cu_seq_lens[b] + i] = src_cache row i of sequence b (its blocks in
        block_table[b], starting seq_starts[b] // block_size blocks in when given), a
        byte copy (dst has src_cache's dtype).
    gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens,
                                   token_to_seq, num_tokens, kv_cache_dtype, scale,
                                   seq_starts=None)
        the same gather into dst of the model's dtype, dequantized (x * scale) from an
        fp8 cache; the older form (..., cu_seq_lens, batch_size, kv_cache_dtype, scale,
        seq_starts=None) is accepted too.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_index_range, check_shape, check_tensor

#: kv_cache_dtype strings of an fp8 cache -> its format (vLLM stores it as uint8 or as
#: that float8 dtype; "fp8" is e4m3 on CUDA)
FP8_KV_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                  "fp8_e5m2": torch.float8_e5m2}
_INDEX_DTYPES = (torch.int32, torch.int64)

__all__ = ["FP8_KV_FORMATS", "concat_and_cache_mla", "copy_blocks", "copy_blocks_mla",
           "cp_gather_cache", "gather_and_maybe_dequant_cache", "swap_blocks"]


def _fp8_format(name: str, kv_cache_dtype: object) -> torch.dtype | None:
    """kv_cache_dtype -> None ("auto") or the fp8 format; else a ValueError naming it."""
    if kv_cache_dtype == "auto":
        return None
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in FP8_KV_FORMATS:
        return FP8_KV_FORMATS[kv_cache_dtype]
    raise ValueError(f"{name} must be 'auto', 'fp8', 'fp8_e4m3' or 'fp8_e5m2' (minikernels "
                     f"has no {kv_cache_dtype!r} cache, e.g. vLLM's fp8_ds_mla), got "
                     f"{kv_cache_dtype!r}")


def _scale(name: str, scale: object, device: torch.device) -> Tensor:
    """A float32 tensor with one element on ``device``, finite and > 0 (when readable)."""
    check_tensor(name, scale, dtypes=(torch.float32,), device=device)
    if scale.numel() != 1:
        raise ValueError(f"{name} must have one element (a per-tensor scale), got shape "
                         f"{list(scale.shape)}")
    if not torch.compiler.is_compiling() and not (
            scale.is_cuda and torch.cuda.is_current_stream_capturing()):
        if not bool(torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError(f"{name} must be finite and > 0, got {scale.reshape(-1)}")
    return scale.reshape(1)


def _pairs(name: str, block_mapping: object, device: torch.device | None,
           num_src: int, num_dst: int) -> tuple[Tensor, Tensor]:
    """block_mapping int64 [n, 2] (on ``device``; None: any) -> (src ids, dst ids), each in
    range of its cache."""
    check_tensor(name, block_mapping, dtypes=(torch.int64,), ndim=2, device=device)
    check_shape(name, block_mapping, [None, 2])
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    check_index_range(f"{name}[:, 0] (source blocks)", src, 0, num_src)
    check_index_range(f"{name}[:, 1] (destination blocks)", dst, 0, num_dst)
    return src, dst


def swap_blocks(src: Tensor, dst: Tensor, *args: object) -> None:
    """Copy whole blocks from ``src`` to ``dst`` (see the module doc for both forms)."""
    if len(args) == 1:
        block_size_in_bytes, block_mapping = None, args[0]
    elif len(args) == 2:
        block_size_in_bytes, block_mapping = args
    else:
        raise TypeError(f"swap_blocks takes (src, dst, block_mapping) or (src, dst, "
                        f"block_size_in_bytes, block_mapping), got {2 + len(args)} arguments")
    check_tensor("src", src, min_ndim=1)
    check_tensor("dst", dst, dtypes=(src.dtype,), min_ndim=1)
    check_shape("dst", dst, [None, *src.shape[1:]])
    if block_size_in_bytes is not None:
        want = src.element_size() * src.stride(0)
        if not isinstance(block_size_in_bytes, int) or isinstance(block_size_in_bytes, bool) \
                or block_size_in_bytes != want:
            raise ValueError(f"block_size_in_bytes must be src's bytes per block "
                             f"(element_size * stride(0) = {want}), got "
                             f"{block_size_in_bytes!r}")
    s, d = _pairs("block_mapping", block_mapping, torch.device("cpu"), src.shape[0],
                  dst.shape[0])
    if s.numel() == 0:
        return
    rows = src.index_select(0, s.to(src.device))
    dst.index_copy_(0, d.to(dst.device), rows.to(dst.device))


def _copy_within(caches: Sequence[Tensor], names: str, block_mapping: object) -> None:
    if not isinstance(caches, (list, tuple)):
        raise TypeError(f"{names} must be a list of tensors, got {type(caches).__name__}")
    if not caches:
        return
    first = check_tensor(f"{names}[0]", caches[0], min_ndim=1)
    for i, c in enumerate(caches):
        check_tensor(f"{names}[{i}]", c, dtypes=(first.dtype,), min_ndim=1,
                     device=first.device)
        check_shape(f"{names}[{i}]", c, list(first.shape))
    s, d = _pairs("block_mapping", block_mapping, first.device, first.shape[0],
                  first.shape[0])
    if s.numel() == 0:
        return
    for c in caches:
        c.index_copy_(0, d, c.index_select(0, s))     # gathered first: reads the old blocks


def copy_blocks(key_caches: Sequence[Tensor], value_caches: Sequence[Tensor],
                block_mapping: Tensor) -> None:
    """For every layer's key and value cache: cache[d] = cache[s] for each (s, d) row of
    block_mapping (int64 [n, 2] on the caches' device); caches of any layout whose dim 0
    is the block."""
    if not isinstance(key_caches, (list, tuple)) or not isinstance(value_caches,
                                                                   (list, tuple)):
        raise TypeError("key_caches and value_caches must be lists of tensors")
    if len(key_caches) != len(value_caches):
        raise ValueError(f"key_caches and value_caches must have one cache per layer each, "
                         f"got {len(key_caches)} and {len(value_caches)}")
    _copy_within(key_caches, "key_caches", block_mapping)
    _copy_within(value_caches, "value_caches", block_mapping)


def copy_blocks_mla(kv_caches: Sequence[Tensor], block_mapping: Tensor) -> None:
    """copy_blocks for MLA's one latent cache per layer."""
    _copy_within(kv_caches, "kv_caches", block_mapping)


def concat_and_cache_mla(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                         kv_cache_dtype: str, scale: Tensor) -> None:
    """Write [kv_c[t], k_pe[t]] into MLA's cache at slot_mapping[t] (module doc)."""
    check_tensor("kv_c", kv_c, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("k_pe", k_pe, dtypes=(kv_c.dtype,), ndim=2, device=kv_c.device)
    if k_pe.shape[0] != kv_c.shape[0]:
        raise ValueError(f"k_pe must have kv_c's {kv_c.shape[0]} tokens, got shape "
                         f"{list(k_pe.shape)}")
    fmt = _fp8_format("kv_cache_dtype", kv_cache_dtype)
    allowed = (kv_c.dtype,) if fmt is None else (torch.uint8, fmt)
    check_tensor("kv_cache", kv_cache, dtypes=allowed, ndim=3, device=kv_c.device)
    entry = kv_c.shape[1] + k_pe.shape[1]
    check_shape("kv_cache", kv_cache, [None, None, entry])
    check_tensor("slot_mapping", slot_mapping, dtypes=_INDEX_DTYPES, ndim=1,
                 device=kv_c.device)
    n = slot_mapping.shape[0]
    if n > kv_c.shape[0]:
        raise ValueError(f"slot_mapping has {n} slots but kv_c only {kv_c.shape[0]} tokens")
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    check_index_range("slot_mapping", slot_mapping, -1, num_blocks * block_size)
    s = _scale("scale", scale, kv_c.device) if fmt is not None else None
    rows = torch.cat([kv_c[:n], k_pe[:n]], dim=1)
    if fmt is not None:
        top = torch.finfo(fmt).max
        rows = (rows.float() / s).clamp(-top, top).to(fmt).view(torch.uint8)
    keep = slot_mapping[:n] >= 0                          # (a host sync: a compat path)
    slots = slot_mapping[keep].long()
    target = kv_cache.view(torch.uint8) if fmt is not None else kv_cache   # any strides
    target[slots // block_size, slots % block_size] = rows[keep]


def _gather_rows(src_cache: Tensor, block_table: Tensor, cu_seq_lens: Tensor,
                 batch_size: int, seq_starts: Tensor | None, total: int | None,
                 name_total: str) -> Tensor:
    """The gathered rows [total, entry] of src_cache (its dtype), sequence by sequence."""
    check_tensor("src_cache", src_cache, min_ndim=3)
    dev = src_cache.device
    num_blocks, block_size = src_cache.shape[0], src_cache.shape[1]
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=dev)
    check_tensor("cu_seq_lens", cu_seq_lens, dtypes=(torch.int32,), ndim=1, device=dev)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    if block_table.shape[0] < batch_size or cu_seq_lens.shape[0] < batch_size + 1:
        raise ValueError(f"block_table needs >= batch_size ({batch_size}) rows and "
                         f"cu_seq_lens >= batch_size + 1 entries, got "
                         f"{list(block_table.shape)} and {list(cu_seq_lens.shape)}")
    starts = torch.zeros(batch_size, dtype=torch.int64, device=dev)
    if seq_starts is not None:
        check_tensor("seq_starts", seq_starts, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
        check_shape("seq_starts", seq_starts, [batch_size])
        check_index_range("seq_starts", seq_starts, 0, 2**31 - 1)
        starts = seq_starts.long() // block_size          # whole blocks skipped, as vLLM
    cu = cu_seq_lens[:batch_size + 1].long()
    lens = cu[1:] - cu[:-1]
    n = int(cu[-1]) if batch_size else 0                  # (a host read: a compat path)
    if bool((lens < 0).any()) or (batch_size and int(cu[0]) != 0):
        raise ValueError("cu_seq_lens must start at 0 and not decrease")
    if total is not None and n != total:
        raise ValueError(f"{name_total} ({total}) must equal cu_seq_lens[batch_size] ({n})")
    seq = torch.repeat_interleave(torch.arange(batch_size, device=dev), lens)
    pos = torch.arange(n, device=dev) - cu[seq]
    col = starts[seq] + pos // block_size
    check_index_range("block_table columns the sequences use (seq_starts + length)", col, 0,
                      block_table.shape[1])
    blocks = block_table[seq, col].long()
    check_index_range("block_table (the entries the sequences use)", blocks, 0, num_blocks)
    return src_cache[blocks, pos % block_size]


def cp_gather_cache(src_cache: Tensor, dst: Tensor, block_table: Tensor,
                    cu_seq_lens: Tensor, batch_size: int,
                    seq_starts: Tensor | None = None) -> None:
    """Gather each sequence's cached rows into dst [>= total tokens, entry...] (a copy in
    src_cache's dtype; module doc)."""
    rows = _gather_rows(src_cache, block_table, cu_seq_lens, batch_size, seq_starts, None,
                        "")
    check_tensor("dst", dst, dtypes=(src_cache.dtype,), device=src_cache.device)
    check_shape("dst", dst, [None, *src_cache.shape[2:]])
    if dst.shape[0] < rows.shape[0]:
        raise ValueError(f"dst has {dst.shape[0]} rows but the sequences hold "
                         f"{rows.shape[0]} tokens")
    dst[:rows.shape[0]] = rows


def gather_and_maybe_dequant_cache(src_cache: Tensor, dst: Tensor, block_table: Tensor,
                                   cu_seq_lens: Tensor, *args: object) -> None:
    """Gather each sequence's cached rows into dst, dequantizing an fp8 cache (module doc:
    vLLM's (token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts=None) form and
    the older (batch_size, kv_cache_dtype, scale, seq_starts=None) one)."""
    if args and isinstance(args[0], Tensor):             # token_to_seq, num_tokens, ...
        if len(args) not in (4, 5):
            raise TypeError("gather_and_maybe_dequant_cache(src_cache, dst, block_table, "
                            "cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, "
                            "seq_starts=None)")
        token_to_seq, num_tokens, kv_cache_dtype, scale = args[:4]
        seq_starts = args[4] if len(args) == 5 else None
        check_tensor("token_to_seq", token_to_seq, dtypes=_INDEX_DTYPES, ndim=1,
                     device=src_cache.device)
        if isinstance(num_tokens, Tensor):                # vLLM's tests pass a 0-d sum
            num_tokens = int(num_tokens)
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        check_tensor("cu_seq_lens", cu_seq_lens, dtypes=(torch.int32,), ndim=1,
                     device=src_cache.device)
        batch_size = cu_seq_lens.shape[0] - 1
        if token_to_seq.shape[0] < num_tokens:
            raise ValueError(f"token_to_seq must have >= num_tokens ({num_tokens}) "
                             f"entries, got {token_to_seq.shape[0]}")
        total: int | None = num_tokens
    else:
        if len(args) not in (3, 4):
            raise TypeError("gather_and_maybe_dequant_cache(src_cache, dst, block_table, "
                            "cu_seq_lens, batch_size, kv_cache_dtype, scale, seq_starts="
                            "None)")
        batch_size, kv_cache_dtype, scale = args[:3]
        seq_starts = args[3] if len(args) == 4 else None
        total = None
    fmt = _fp8_format("kv_cache_dtype", kv_cache_dtype)
    rows = _gather_rows(src_cache, block_table, cu_seq_lens, batch_size, seq_starts, total,
                        "num_tokens")
    check_tensor("dst", dst, dtypes=FLOAT_DTYPES, device=src_cache.device)
    check_shape("dst", dst, [None, *src_cache.shape[2:]])
    if dst.shape[0] < rows.shape[0]:
        raise ValueError(f"dst has {dst.shape[0]} rows but the sequences hold "
                         f"{rows.shape[0]} tokens")
    if fmt is None:
        if src_cache.dtype != dst.dtype:
            raise TypeError(f"kv_cache_dtype 'auto': src_cache must have dst's dtype "
                            f"({dst.dtype}), got {src_cache.dtype}")
        dst[:rows.shape[0]] = rows
        return
    if src_cache.dtype not in (torch.uint8, fmt):
        raise TypeError(f"kv_cache_dtype {kv_cache_dtype!r}: src_cache must be uint8 or "
                        f"{fmt}, got {src_cache.dtype}")
    s = _scale("scale", scale, src_cache.device)
    dst[:rows.shape[0]] = (rows.view(fmt).float() * s).to(dst.dtype)
