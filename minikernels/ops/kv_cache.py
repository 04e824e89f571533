"""Op family: paged KV cache — the write op and decode attention.

Ops: ``minikernels::write_kv_cache`` (mutates the caches) and
``minikernels::paged_decode_attention``. Cache layout per layer: k_cache, v_cache
[num_blocks, block_size, Hkv, D], block_size any size in [1, 256], each cache with its own
strides (last dim contiguous: e.g. the k and v views of vLLM's [num_blocks, 2, block_size,
Hkv, D]); slot = block * block_size + offset (vLLM's slot_mapping), slot -1 skips a token
(padding rows of a captured CUDA graph).

FP8 KV cache: caches of dtype float8_e4m3fn (or float8_e5m2: vLLM's "fp8_e5m2", less
precise, wider range) with float32 ``k_scale`` / ``v_scale`` (1 element per tensor, or Hkv
per kv head), vLLM's convention: stored * scale ~= original. write_kv_cache stores
fp8(clamp(x / scale, +-max)) (max 448 / 57344; round to nearest even, saturating); the
attention kernels dequantize on the fly. Half the bytes of bf16: twice the tokens. The
CUDA C++ kernels take e4m3 only (e5m2 runs on Triton).

Backends:
    write_kv_cache          reference; triton (ops/triton/kv_cache.py); cuda
                            (csrc/kv_cache.cu, a row copy, or fp8 quantization; opt in
                            with use_backend("cuda") until validated on a GPU).
    paged_decode_attention  reference; triton (ops/triton/paged_attention.py, tensor cores,
                            fp16/bf16, any D up to 512; auto's choice on CUDA); cuda
                            (csrc/paged_attention.cu, fp16/bf16, GQA group <= 8,
                            D in {64, 128, 256}; opt in with use_backend("cuda"); other
                            inputs, e.g. D = 512, run on Triton even then).
                            fp32 runs on Triton too, with exact fp32 dots (ieee; FMA
                            units, one pipeline stage): an fp32 engine on a GPU
                            captures its decode steps in CUDA graphs, which the
                            reference's host loop over seq_lens could not be.

Split-KV: a sequence's tokens are cut into splits processed by separate programs and
merged by their LSE. ``num_splits=0`` picks the count from the SM count, batch, kv heads
and the block table's capacity (fast, but a sequence's result may change bitwise with the
batch). ``num_splits=N > 0`` or ``split_size=S > 0`` (tokens per split, rounded up to the
kernel tile; overrides num_splits) cut each sequence by its own length only, so its output
is bitwise the same in any batch, at any position, with any block-table width
(batch-invariant mode, per backend and device).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, HALF_DTYPES, check_index_range,
                           check_positive_float, check_shape, last_dim_contiguous,
                           check_tensor)
from . import _alloc, reference
from .attention import (apply_sinks, check_alibi_slopes, check_block_table, check_head_dim,
                        check_kv_scales, check_paged_cache, check_sinks)

#: Split-KV heuristic: aim for this many programs per SM, no split shorter than this.
_PROGRAMS_PER_SM = 8
_MIN_SPLIT_TOKENS = 512
_MAX_SPLITS = 128
#: Head dims and GQA group sizes the CUDA C++ decode kernel is built for.
_CUDA_HEAD_DIMS = (64, 128, 256)
_CUDA_MAX_GROUP = 8


def _rows_aligned(k_cache: Tensor, v_cache: Tensor) -> bool:
    """Every cache row starts 16-byte aligned (the CUDA kernel reads 16-byte vectors; the
    Triton kernel runs either way, with vector hints only when this holds)."""
    return all(c.data_ptr() % 16 == 0
               and all(s * c.element_size() % 16 == 0 for s in c.stride()[:3])
               for c in (k_cache, v_cache))


def _ext_has(name: str) -> bool:
    """The compiled extension exists and was built with this kernel (else: Triton)."""
    ext = _backend.cuda_extension()
    return ext is None or hasattr(ext, name)  # None: resolve() logs and picks Triton


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def tile_tokens(head_dim: int) -> int:
    """KV tokens per kernel tile (both backends); splits are multiples of it."""
    return 32 if head_dim > 128 else 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # CPU (Triton interpreter): plan as for an H100/H200


def plan_splits(batch: int, kv_heads: int, max_tokens: int, head_dim: int, num_splits: int,
                split_size: int, device: torch.device) -> tuple[int, int, int, bool]:
    """Decide the split-KV launch from host-side shapes only (no device sync, graph-safe).

    max_tokens: block-table capacity (max_blocks * block_size), an upper bound on seq_lens.
    Returns (grid_splits, num_splits, split_size, use_split): programs per (sequence, kv
    head); the per-sequence rule the kernels apply (split_size > 0: that many tokens per
    split, else cdiv(len, num_splits) rounded up to the tile); whether partials are merged.
    """
    tile = tile_tokens(head_dim)
    if split_size > 0:
        size = -(-split_size // tile) * tile
        return max(1, -(-max_tokens // size)), 1, size, True
    if num_splits > 0:
        return num_splits, num_splits, 0, num_splits > 1
    programs = max(1, batch * kv_heads)
    want = -(-(_PROGRAMS_PER_SM * _sm_count(device)) // programs)
    by_len = max(1, max_tokens // _MIN_SPLIT_TOKENS)
    n = max(1, min(want, by_len, _MAX_SPLITS))
    return n, n, 0, n > 1


@torch.library.custom_op("minikernels::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    slot_mapping: Tensor, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> None:
    # Triton is auto's choice until a GPU run validates the CUDA kernel (opt in: "cuda").
    which = _backend.resolve("write_kv_cache", k.device, prefer_cuda=False,
                             cuda_ok=lambda: k_cache.dtype != torch.float8_e5m2 and
                             _ext_has("write_kv_cache"))     # the kernel's fp8 is e4m3
    if which != "reference":
        slot_mapping = slot_mapping.contiguous()  # the kernels index slot_ptr + token
    if which == "cuda":
        if k.shape[0] > 0:
            _backend.cuda_extension().write_kv_cache(k, v, k_cache, v_cache, slot_mapping,
                                                     k_scale, v_scale, _stream(k.device))
    elif which == "triton":
        from .triton import kv_cache as triton_kv
        triton_kv.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_write_kv_cache.register_fake
def _(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
      k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    return None


def _cuda_decode_ok(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                    alibi_slopes: Tensor | None) -> bool:
    """The CUDA C++ decode kernel takes this call: fp16 / bf16, D in {64, 128, 256} (so
    Gemma 4's D = 512, and every D in (256, 512], run on Triton), GQA group <= 8, no ALiBi,
    a 16-bit or e4m3 cache, 16-byte aligned cache rows, and the extension was built with
    it."""
    return (q.dtype in HALF_DTYPES and q.shape[2] in _CUDA_HEAD_DIMS and alibi_slopes is None
            and k_cache.dtype != torch.float8_e5m2        # the kernel's fp8 is e4m3
            and q.shape[1] // k_cache.shape[2] <= _CUDA_MAX_GROUP
            and _rows_aligned(k_cache, v_cache)
            and _ext_has("paged_decode_attention"))


@torch.library.custom_op("minikernels::paged_decode_attention", mutates_args=())
def _paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                            seq_lens: Tensor, softmax_scale: float, window_left: int,
                            softcap: float, num_splits: int, split_size: int = 0,
                            k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                            alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    d, hkv = q.shape[2], k_cache.shape[2]
    which = _backend.resolve(
        "paged_decode_attention", q.device,
        cuda_ok=lambda: _cuda_decode_ok(q, k_cache, v_cache, alibi_slopes), prefer_cuda=False)
    if which == "cuda" and (alibi_slopes is not None or not _rows_aligned(k_cache, v_cache)):
        which = "triton"     # the CUDA kernel: no ALiBi, 16-byte vector loads (aligned rows)
    if which == "reference":
        out, lse = reference.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens,
                                                    softmax_scale, window_left, softcap,
                                                    k_scale, v_scale, alibi_slopes)
        return out.contiguous(), lse
    # The kernels read seq_lens[b] and block_table[b * stride(0) + i]: unit inner strides.
    seq_lens = seq_lens.contiguous()
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    grid_splits, n_rule, size_rule, use_split = plan_splits(
        q.shape[0], hkv, block_table.shape[1] * k_cache.shape[1], d, num_splits, split_size,
        q.device)
    if which == "cuda":
        return _paged_decode_cuda(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                  window_left, softcap, grid_splits, n_rule, size_rule,
                                  use_split, k_scale, v_scale)
    from .triton import paged_attention as triton_paged
    return triton_paged.paged_decode_attention(
        q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window_left, softcap,
        grid_splits, n_rule, size_rule, use_split, k_scale, v_scale, alibi_slopes)


def _paged_decode_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                       seq_lens: Tensor, scale: float, window_left: int, softcap: float,
                       grid_splits: int, num_splits: int, split_size: int, use_split: bool,
                       k_scale: Tensor | None, v_scale: Tensor | None
                       ) -> tuple[Tensor, Tensor]:
    bsz, hq, d = q.shape
    out = _alloc.empty((bsz, hq, d), q.dtype, q.device)
    lse = _alloc.empty((bsz, hq), torch.float32, q.device)
    if bsz == 0:
        return out, lse
    if use_split:
        opart = _alloc.empty((bsz, hq, grid_splits, d), torch.float32, q.device)
        lse_part = _alloc.empty((bsz, hq, grid_splits), torch.float32, q.device)
    else:
        opart = lse_part = None
    _backend.cuda_extension().paged_decode_attention(
        out, lse, q, k_cache, v_cache, block_table, seq_lens, opart, lse_part, k_scale,
        v_scale, float(scale), float(softcap), min(int(window_left), 2**31 - 1),
        int(num_splits), min(int(split_size), 2**30), int(grid_splits), _stream(q.device))
    return out, lse


@_paged_decode_attention.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
      softmax_scale: float, window_left: int, softcap: float, num_splits: int,
      split_size: int = 0, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
      alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device))


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor, k_scale: Tensor | float | None = None,
                   v_scale: Tensor | float | None = None) -> None:
    """Write each token's K/V into its cache slot, in place.

    k, v [T, Hkv, D] (any strides, any D >= 1; the attention ops read D <= 512); k_cache,
    v_cache [num_blocks, block_size, Hkv, D]
    (block_size 1..256, each with its own strides, last dim contiguous) of k's dtype, or
    float8_e4m3fn / float8_e5m2 with float32 k_scale / v_scale (1 or Hkv elements): the
    caches then hold fp8(clamp(k / k_scale, +-max)) (max 448 / 57344). slot_mapping int32/int64 [T] with
    slot = block * block_size + offset, -1 = skip.
    """
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("v", v, dtypes=(k.dtype,), ndim=3, device=k.device)
    check_shape("v", v, list(k.shape))
    check_paged_cache(("k_cache", "v_cache"), k_cache, v_cache, k.dtype, k.device, k.shape[2])
    if k_cache.shape[2] != k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but k_cache has {k_cache.shape[2]}")
    k_scale, v_scale = check_kv_scales(("k_cache", "v_cache"), k_cache, k_scale, v_scale)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=k.device)
    check_shape("slot_mapping", slot_mapping, [k.shape[0]])
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    check_index_range("slot_mapping", slot_mapping, -1, k_cache.shape[0] * k_cache.shape[1])
    torch.ops.minikernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale,
                                         v_scale)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                           seq_lens: Tensor, softmax_scale: float | None = None,
                           window_left: int = -1, softcap: float = 0.0,
                           num_splits: int = 0, *, split_size: int = 0,
                           return_lse: bool = False, k_scale: Tensor | float | None = None,
                           v_scale: Tensor | float | None = None,
                           alibi_slopes: Tensor | None = None,
                           sinks: Tensor | None = None
                           ) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention: one query per sequence over its paged KV cache.

    q [B, Hq, D] (D any head dim in [1, 512]: up to Gemma 4's 512); k_cache, v_cache
    [num_blocks, block_size, Hkv, D] (block_size 1..256,
    each with its own strides, last dim contiguous) of q's dtype, or float8_e4m3fn /
    float8_e5m2 with float32 k_scale / v_scale (1 or Hkv elements; keys are k_cache * k_scale);
    block_table int32 [B, max_blocks]; seq_lens int32 [B] (cached tokens, the new one
    included). num_splits: 0 = heuristic split-KV, > 0 = that many KV splits per sequence.
    split_size (keyword): > 0 = fixed tokens per split (rounded up to the kernel tile,
    overrides num_splits). With num_splits > 0 or split_size > 0 a sequence's output is
    bitwise independent of the batch it is in (batch-invariant mode). softcap > 0 applies
    softcap * tanh(s / softcap) to the scaled scores; window_left >= 0 keeps the last
    window_left + 1 tokens. Returns out [B, Hq, D] in q.dtype (contiguous); a sequence with
    seq_len 0 gets zeros. With return_lse also the natural-log LSE [B, Hq] fp32 of each
    row's scores (-inf for seq_len 0), so partial states merge (:func:`merge_attn_states`).
    ALiBi: ``alibi_slopes`` float32 [Hq] or [B, Hq] adds -slope * (seq_len - 1 - j) to the
    score of key j (vLLM's decode bias; the LSE includes it). Attention sinks: ``sinks``
    [Hq] as in :func:`flash_attention` (a seq_len 0 row: zeros, LSE the sink).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    d = q.shape[2]
    check_head_dim(d)
    check_paged_cache(("k_cache", "v_cache"), k_cache, v_cache, q.dtype, q.device, d)
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hkv})")
    k_scale, v_scale = check_kv_scales(("k_cache", "v_cache"), k_cache, k_scale, v_scale)
    q = last_dim_contiguous(q)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    check_shape("seq_lens", seq_lens, [q.shape[0]])
    check_index_range("seq_lens", seq_lens, 0, 2**31 - 1)
    check_block_table(block_table, q.shape[0], seq_lens, k_cache.shape[0], k_cache.shape[1],
                      q.device)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if not isinstance(split_size, int) or isinstance(split_size, bool) or split_size < 0:
        raise ValueError(f"split_size must be an int >= 0 (tokens per split), got "
                         f"{split_size!r}")
    if not isinstance(window_left, int) or isinstance(window_left, bool) or window_left < -1:
        raise ValueError(f"window_left must be -1 (no window) or >= 0, got {window_left!r}")
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    scale = (1.0 / math.sqrt(d) if softmax_scale is None
             else check_positive_float("softmax_scale", softmax_scale))
    alibi_slopes = check_alibi_slopes(alibi_slopes, q.shape[0], hq, q.device)
    sinks = check_sinks(sinks, hq, q.device)
    out, lse = torch.ops.minikernels.paged_decode_attention(
        q, k_cache, v_cache, block_table, seq_lens, scale, window_left, softcap, num_splits,
        split_size, k_scale, v_scale, alibi_slopes)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks, heads_dim=1)
    return (out, lse) if return_lse else out


def merge_attn_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                      lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attention states over disjoint key sets (cascade / split attention).

    out_* [..., H, D], lse_* [..., H] natural-log fp32 (as paged_decode_attention and,
    transposed, flash_attention return them). Returns (out, lse) of attention over both key
    sets; a state with lse -inf (no keys) contributes nothing. Plain PyTorch (fp32 math).
    """
    check_tensor("out_a", out_a, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("out_b", out_b, dtypes=(out_a.dtype,), device=out_a.device)
    check_shape("out_b", out_b, list(out_a.shape))
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(name, lse, dtypes=(torch.float32,), device=out_a.device)
        check_shape(name, lse, list(out_a.shape[:-1]))
    return reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
