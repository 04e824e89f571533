"""vLLM's Marlin int4 / int8 weight format and GEMM on minikernels, so code and kernel
tests written against vLLM's Marlin API swap their imports:

    from minikernels.compat import vllm_marlin as ops   # was: from vllm import _custom_ops
    from minikernels.compat.vllm_marlin import (         # was: ...utils.marlin_utils(_test)
        marlin_quantize, marlin_permute_scales, marlin_make_workspace_new, scalar_types)
    w_ref, q, s, g_idx, sort_idx, _ = marlin_quantize(w, scalar_types.uint4b8, 128, True)
    y = ops.gptq_marlin_gemm(a, None, q, None, s, None, None, None, g_idx, sort_idx,
                             workspace, scalar_types.uint4b8, m, n, k, is_k_full=True)

The layout (K = size_k input rows, N = size_n output columns, b = num_bits 4 or 8,
pack = 32 / b values per int32 word, q [K, N] the stored unsigned integers, W [K, N],
y = a @ W):

    weight  int32 [K / 16, N * 16 / pack], from q [K, N] (rows sorted by group for act
            order) in three steps (``marlin_weights``):
              1. 16 x 16 tiles row-major: q.reshape(K/16, 16, N/16, 16).permute(0, 2, 1, 3)
                 .reshape(K/16, N * 16) (is_a_8bit: 32 x 16 tiles, reshape(K/32, 32, N/16,
                 16), same permute, same final shape);
              2. every 1024 consecutive entries gathered by ``get_weight_perm(b)``:
                 out[j] = in[perm[j]] (the mma fragment order of 32 lanes, then the
                 dequantizer's interleave 0 2 4 6 1 3 5 7 (4-bit) / 0 2 1 3 (8-bit));
              3. packed along the row: slot i (bits b*i..) of word c = entry pack * c + i.
    scales  [groups, N] fp16 / bf16: row-major, every 64 consecutive entries gathered by
            ``scale_perm`` when groups > 1, every 32 by ``scale_perm_single`` for one group
            (channelwise) or is_a_8bit (``marlin_permute_scales``).
    zeros   int32 [groups, N / pack] (uint4 / uint8 only, AWQ-style): zp [groups, N]
            gathered per 64 by ``scale_perm`` (whatever the group count), then per 8 (4-bit)
            / 4 (8-bit) by the interleave above (not for is_a_8bit), packed like the weight
            (``marlin_zero_points``).
    bias    [N]: every 32 gathered by ``scale_perm_single`` (``marlin_permute_bias``).
    g_idx, perm  int32 [K] (act order) or empty: stored row k is input row perm[k]
            (argsort of the checkpoint's g_idx) and uses group g_idx[k] (the sorted g_idx).

    W_stored[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n];  y = a[:, perm] @ W_stored + bias
    z = the type's bias (uint4b8: 8, uint8b128: 128) or the unpacked zero point (uint4 /
    uint8); g(k) = g_idx[k] with act order, else k // (K / groups).

Provided (vLLM's names, argument order, defaults; errors are ValueError / TypeError naming
the argument, features minikernels lacks raise :class:`MarlinUnsupportedError`, a
ValueError that is also a NotImplementedError):
    ops (``vllm._custom_ops``): gptq_marlin_gemm / marlin_gemm (its current name),
        gptq_marlin_repack, awq_marlin_repack, gptq_marlin_moe_repack, awq_marlin_moe_repack
    marlin_utils: GPTQ_MARLIN_* constants, MARLIN_SUPPORTED_GROUP_SIZES, get_scale_perms,
        marlin_permute_scales, marlin_permute_bias, marlin_zero_points,
        awq_to_marlin_zero_points, marlin_make_workspace(_new), marlin_make_empty_g_idx,
        marlin_make_empty_zp, marlin_sort_g_idx, marlin_is_k_full,
        marlin_repeat_scales_on_all_ranks, query_marlin_supported_quant_types
    marlin_utils_test: MarlinWorkspace, get_weight_perm, marlin_permute_weights,
        marlin_weights, marlin_quantize, awq_marlin_quantize
    quant_utils: get_pack_factor, pack_rows, pack_cols, unpack_cols, gptq_pack, awq_pack,
        quantize_weights, gptq_quantize_weights, permute_rows, sort_weights
    scalar_type: ScalarType, scalar_types (a stand-in with vLLM's member names)
    inverses (minikernels'): unpack_marlin_weights, marlin_unpermute_weights,
        marlin_unpermute_scales, marlin_unpermute_bias, unpack_marlin_zero_points,
        decode_marlin (-> vllm_ops.GroupedWeight)

``gptq_marlin_gemm`` decodes the Marlin words back to integers, scales and zero points on
every call (a compat path: a gather of the K x N weight, about the cost of reading it a
few times; nothing is cached) and runs ``ops.int4_matmul`` / ``ops.int8_matmul`` through
``vllm_ops.GroupedWeight`` (an exact fp32 dequantize + matmul where minikernels' layout
cannot hold the weight, e.g. uneven act-order groups of a row-parallel shard).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_index_range, check_shape, check_tensor
from ..quant.checkpoints import AWQ_ORDER
from ..quant.packing import pack_bytes, pack_nibbles, unpack_bytes, unpack_nibbles
from .vllm_ops import (
    GroupedWeight,
    _check_bits,
    _check_bool,
    _check_int,
    _check_permutation,
    _optional_index,
)

__all__ = [
    "GPTQ_MARLIN_MAX_PARALLEL", "GPTQ_MARLIN_MIN_THREAD_K", "GPTQ_MARLIN_MIN_THREAD_N",
    "GPTQ_MARLIN_TILE", "MARLIN_SUPPORTED_GROUP_SIZES", "USE_FP32_REDUCE_DEFAULT",
    "MarlinUnsupportedError", "MarlinWorkspace", "ScalarType", "scalar_types",
    "awq_marlin_moe_repack", "awq_marlin_quantize", "awq_marlin_repack", "awq_pack",
    "awq_to_marlin_zero_points", "decode_marlin", "get_pack_factor", "get_scale_perms",
    "get_weight_perm", "gptq_marlin_gemm", "gptq_marlin_moe_repack", "gptq_marlin_repack",
    "gptq_pack", "gptq_quantize_weights", "marlin_gemm", "marlin_is_k_full",
    "marlin_make_empty_g_idx", "marlin_make_empty_zp", "marlin_make_workspace",
    "marlin_make_workspace_new", "marlin_permute_bias", "marlin_permute_scales",
    "marlin_permute_weights", "marlin_quantize", "marlin_repeat_scales_on_all_ranks",
    "marlin_sort_g_idx", "marlin_unpermute_bias", "marlin_unpermute_scales",
    "marlin_unpermute_weights", "marlin_weights", "marlin_zero_points", "pack_cols",
    "pack_rows", "permute_rows", "query_marlin_supported_quant_types", "quantize_weights",
    "sort_weights", "unpack_cols", "unpack_marlin_weights", "unpack_marlin_zero_points",
]

GPTQ_MARLIN_TILE = 16
GPTQ_MARLIN_MIN_THREAD_N = 64
GPTQ_MARLIN_MIN_THREAD_K = 128
GPTQ_MARLIN_MAX_PARALLEL = 16
MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]
USE_FP32_REDUCE_DEFAULT = True

#: The dequantizer's column interleave inside each word (``get_weight_perm``) and the
#: one AWQ checkpoints pack with (``awq_pack``), per bit width.
_INTERLEAVE = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
_AWQ_ORDER = {4: tuple(AWQ_ORDER), 8: (0, 2, 1, 3)}


class MarlinUnsupportedError(ValueError, NotImplementedError):
    """A Marlin feature minikernels does not run (fp8 / fp4 weights, int8 / fp8
    activations, float zero points, nvfp4's global scale): a ValueError naming the argument
    (minikernels' convention) and a NotImplementedError."""


# ----------------------------------------------------------------------- scalar types


@dataclass(frozen=True)
class ScalarType:
    """A stand-in for ``vllm.scalar_type.ScalarType``: the weight / activation types
    Marlin's API names. Integers store ``value + bias`` unsigned (uint4b8: -8..7 stored as
    0..15); equal when every field is equal (uint4 != uint4b8)."""

    name: str
    size_bits: int
    signed: bool = False
    bias: int = 0
    floating: bool = False

    def has_bias(self) -> bool:
        return self.bias != 0

    def is_floating_point(self) -> bool:
        return self.floating

    def is_integer(self) -> bool:
        return not self.floating

    def is_signed(self) -> bool:
        return self.signed

    def min(self) -> int:
        """Smallest value an integer type holds (bias applied: uint4b8 -> -8)."""
        self._integer_only("min")
        return (-(1 << (self.size_bits - 1)) if self.signed else 0) - self.bias

    def max(self) -> int:
        """Largest value an integer type holds (bias applied: uint4b8 -> 7)."""
        self._integer_only("max")
        top = (1 << (self.size_bits - 1)) - 1 if self.signed else (1 << self.size_bits) - 1
        return top - self.bias

    def _integer_only(self, what: str) -> None:
        if self.floating:
            raise MarlinUnsupportedError(f"{self.name}.{what}() is defined here for integer "
                                         "types only")

    def __str__(self) -> str:
        return self.name


class scalar_types:  # noqa: N801 (vLLM's name)
    """vLLM's ``scalar_types`` members used with Marlin (a namespace, as vLLM's)."""

    int4 = ScalarType("int4", 4, signed=True)
    uint4 = ScalarType("uint4", 4)
    int8 = ScalarType("int8", 8, signed=True)
    uint8 = ScalarType("uint8", 8)
    uint2b2 = ScalarType("uint2b2", 2, bias=2)
    uint3b4 = ScalarType("uint3b4", 3, bias=4)
    uint4b8 = ScalarType("uint4b8", 4, bias=8)
    uint8b128 = ScalarType("uint8b128", 8, bias=128)
    float8_e4m3fn = ScalarType("float8_e4m3fn", 8, signed=True, floating=True)
    float8_e5m2 = ScalarType("float8_e5m2", 8, signed=True, floating=True)
    float4_e2m1f = ScalarType("float4_e2m1f", 4, signed=True, floating=True)
    float16 = ScalarType("float16", 16, signed=True, floating=True)
    bfloat16 = ScalarType("bfloat16", 16, signed=True, floating=True)


_ALL_TYPES = tuple(v for v in vars(scalar_types).values() if isinstance(v, ScalarType))
#: b_q_type -> True when it takes runtime zero points (b_zeros), False when it has a bias.
_GEMM_TYPES = {scalar_types.uint4b8: False, scalar_types.uint8b128: False,
               scalar_types.uint4: True, scalar_types.uint8: True}


def _is_scalar_type(value: object) -> bool:
    return isinstance(value, ScalarType) or (
        not isinstance(value, Tensor) and hasattr(value, "size_bits")
        and hasattr(value, "bias") and hasattr(value, "is_floating_point"))


def _as_scalar_type(name: str, value: object) -> ScalarType:
    """Ours, or vLLM's own ScalarType mapped to ours by its fields."""
    if isinstance(value, ScalarType):
        return value
    if _is_scalar_type(value):
        for t in _ALL_TYPES:
            if (t.size_bits, t.bias, t.floating) == (
                    value.size_bits, value.bias, bool(value.is_floating_point())) and \
                    str(value) == t.name:
                return t
        raise ValueError(f"{name}={value} is not a Marlin type minikernels knows")
    raise TypeError(f"{name} must be a scalar_types member (e.g. scalar_types.uint4b8), "
                    f"got {type(value).__name__}")


def _gemm_type(name: str, value: object) -> ScalarType:
    t = _as_scalar_type(name, value)
    if t.floating:
        raise MarlinUnsupportedError(
            f"{name}={t} is not supported: minikernels runs Marlin's integer weights only "
            "(uint4b8, uint8b128, uint4 / uint8 with zero points); fp8 / fp4 Marlin "
            "weights have no minikernels op here")
    if t not in _GEMM_TYPES:
        raise ValueError(f"{name} must be one of {', '.join(map(str, _GEMM_TYPES))}, got {t}")
    return t


def _quant_type(name: str, value: object, zero_points: bool) -> ScalarType:
    """The quantize helpers' type: a ScalarType or (older vLLM) a bit count."""
    if isinstance(value, int) and not isinstance(value, bool):
        bits = _check_bits(name, value)
        if zero_points:
            return scalar_types.uint4 if bits == 4 else scalar_types.uint8
        return scalar_types.uint4b8 if bits == 4 else scalar_types.uint8b128
    t = _gemm_type(name, value)
    if _GEMM_TYPES[t] != zero_points:
        want = "uint4 or uint8 (zero points)" if zero_points else "uint4b8 or uint8b128"
        raise ValueError(f"{name} must be {want} here, got {t}")
    return t


# ----------------------------------------------------------------------- small checks


def _check_tile_shape(size_k: int, size_n: int, k_multiple: int = GPTQ_MARLIN_TILE) -> None:
    _check_int("size_k", size_k, 0)
    _check_int("size_n", size_n, 0)
    if size_k % k_multiple:
        raise ValueError(f"size_k must be a multiple of {k_multiple} (Marlin's tile), "
                         f"got {size_k}")
    if size_n % GPTQ_MARLIN_MIN_THREAD_N:
        raise ValueError(f"size_n must be a multiple of {GPTQ_MARLIN_MIN_THREAD_N} "
                         f"(Marlin's min_thread_n), got {size_n}")


def _k_multiple(is_a_8bit: bool) -> int:
    return 2 * GPTQ_MARLIN_TILE if is_a_8bit else GPTQ_MARLIN_TILE


def _check_values(name: str, q: Tensor, bits: int) -> None:
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"{name} values must be in [0, {1 << bits}) to pack {bits}-bit, "
                         f"got min {int(q.min())} and max {int(q.max())}")


def _is_empty(t: object) -> bool:
    """vLLM's "absent" optional tensor: None or an empty tensor."""
    return t is None or (isinstance(t, Tensor) and t.numel() == 0)


def _inverse(perm: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.argsort(torch.as_tensor(perm, device=device))


def get_pack_factor(num_bits: int) -> int:
    """Values per int32 word: 32 // num_bits."""
    _check_int("num_bits", num_bits, 1)
    if 32 % num_bits:
        raise ValueError(f"num_bits must divide 32, got {num_bits}")
    return 32 // num_bits


# ------------------------------------------------------------------ word packing


def pack_cols(q_w: Tensor, num_bits: int, size_k: int, size_n: int) -> Tensor:
    """vLLM's ``pack_cols``: int [size_k, size_n] (values 0 .. 2^bits - 1) -> int32
    [size_k, size_n / pack]; slot i (bits num_bits*i..) of word c = column pack*c + i."""
    bits = _check_bits("num_bits", num_bits)
    check_tensor("q_w", q_w, ndim=2)
    check_shape("q_w", q_w, [size_k, size_n])
    _check_values("q_w", q_w, bits)
    return pack_nibbles(q_w) if bits == 4 else pack_bytes(q_w)


def unpack_cols(packed_q_w: Tensor, num_bits: int, size_k: int, size_n: int) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 [size_k, size_n / pack] -> int32 [size_k,
    size_n]."""
    bits = _check_bits("num_bits", num_bits)
    check_tensor("packed_q_w", packed_q_w, dtypes=(torch.int32,), ndim=2)
    if size_n % (32 // bits):
        raise ValueError(f"size_n must be a multiple of {32 // bits}, got {size_n}")
    check_shape("packed_q_w", packed_q_w, [size_k, size_n // (32 // bits)])
    return unpack_nibbles(packed_q_w) if bits == 4 else unpack_bytes(packed_q_w)


def pack_rows(q_w: Tensor, num_bits: int, size_k: int, size_n: int) -> Tensor:
    """vLLM's ``pack_rows`` (GPTQ's qweight): int [size_k, size_n] -> int32 [size_k / pack,
    size_n]; slot i of word (r, n) = q_w[pack*r + i, n]."""
    return pack_cols(q_w.t(), num_bits, size_n, size_k).t().contiguous()


def gptq_pack(q_w: Tensor, num_bits: int, size_k: int, size_n: int) -> Tensor:
    """GPTQ's qweight int32 [size_k / pack, size_n] (:func:`pack_rows`)."""
    return pack_rows(q_w, num_bits, size_k, size_n)


def _reorder_cols(q: Tensor, order: Sequence[int]) -> Tensor:
    """Within each block of len(order) columns: out[..., j] = q[..., order[j]]."""
    blocks = q.reshape(*q.shape[:-1], -1, len(order))
    return blocks[..., list(order)].reshape(q.shape)


def awq_pack(q_w: Tensor, num_bits: int, size_k: int, size_n: int) -> Tensor:
    """AutoAWQ's GEMM qweight: int [size_k, size_n] -> int32 [size_k, size_n / pack];
    slot i of word c = column pack*c + order[i], order 0 2 4 6 1 3 5 7 (4-bit) / 0 2 1 3
    (8-bit)."""
    bits = _check_bits("num_bits", num_bits)
    check_tensor("q_w", q_w, ndim=2)
    check_shape("q_w", q_w, [size_k, size_n])
    return pack_cols(_reorder_cols(q_w, _AWQ_ORDER[bits]), bits, size_k, size_n)


def _unpack_awq(words: Tensor, bits: int) -> Tensor:
    q = unpack_nibbles(words) if bits == 4 else unpack_bytes(words)
    return _reorder_cols(q, _inverse(_AWQ_ORDER[bits], torch.device("cpu")).tolist())


# ----------------------------------------------------------------- permutations


def get_weight_perm(num_bits: int, is_a_8bit: bool = False) -> Tensor:
    """Marlin's 1024-entry weight permutation (int64, CPU), applied to each run of 1024
    tile-ordered values: out[j] = in[perm[j]].

    16-bit activations: lane i (0..31) of a warp takes column i // 4 (+ 8 for the second
    block) of rows 2(i%4), 2(i%4)+1, 2(i%4+4), 2(i%4+4)+1 of a 16 x 16 tile (16 * row +
    col), repeated for 4 tiles (+256 each); then each group of 8 (4-bit) / 4 (8-bit)
    entries is interleaved 0 2 4 6 1 3 5 7 / 0 2 1 3. is_a_8bit (int8 / fp8 activations):
    rows 4(i%4)..4(i%4)+3 and 4(i%4+4)..+3, 2 repeats (+512), interleave 0 4 1 5 2 6 3 7 /
    none."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    per_lane = 4 if is_a_8bit else 2
    repeats, stride = (2, 512) if is_a_8bit else (4, 256)
    order: list[int] = []
    for lane in range(32):
        col, quad = lane // 4, lane % 4
        rows = [per_lane * quad + r for r in range(per_lane)] + \
               [per_lane * (quad + 4) + r for r in range(per_lane)]
        lane_entries = [16 * row + col + 8 * block for block in (0, 1) for row in rows]
        for rep in range(repeats):
            order.extend(e + stride * rep for e in lane_entries)
    if is_a_8bit:
        interleave = (0, 4, 1, 5, 2, 6, 3, 7) if bits == 4 else (0, 1, 2, 3)
    else:
        interleave = _INTERLEAVE[bits]
    perm = torch.tensor(order, dtype=torch.int64).reshape(-1, len(interleave))
    return perm[:, list(interleave)].reshape(-1)


def get_scale_perms() -> tuple[list[int], list[int]]:
    """(scale_perm, 64 entries: i + 8j for i, j in 0..7 (a transpose of 8 x 8);
    scale_perm_single, 32 entries: 2i + {0, 1, 8, 9, 16, 17, 24, 25} for i in 0..3)."""
    scale_perm = [i + 8 * j for i in range(8) for j in range(8)]
    scale_perm_single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return scale_perm, scale_perm_single


def _gather_runs(t: Tensor, perm: Sequence[int] | Tensor) -> Tensor:
    """Row-major runs of len(perm) entries of t, each gathered: out[j] = in[perm[j]]."""
    p = torch.as_tensor(perm, device=t.device, dtype=torch.int64)
    n = p.numel()
    if t.numel() % n:
        raise ValueError(f"the tensor's {t.numel()} entries are not whole runs of {n}")
    return t.reshape(-1, n)[:, p].reshape(t.shape)


def _scatter_runs(t: Tensor, perm: Sequence[int] | Tensor) -> Tensor:
    """Inverse of :func:`_gather_runs`."""
    return _gather_runs(t, _inverse(perm, t.device))


def _tile_shape(size_k: int, size_n: int, tile: int, is_a_8bit: bool) -> tuple[int, ...]:
    tile_k = 2 * tile if is_a_8bit else tile
    return size_k // tile_k, tile_k, size_n // tile, tile


def _check_weight_perm(perm: object, size_n: int, tile: int) -> Tensor:
    check_tensor("perm", perm, dtypes=(torch.int32, torch.int64), ndim=1)
    if perm.numel() == 0 or (size_n * tile) % perm.numel():
        raise ValueError(f"perm must have a length dividing size_n * tile = "
                         f"{size_n * tile}, got {perm.numel()}")
    return perm


def marlin_permute_weights(q_w: Tensor, size_k: int, size_n: int, perm: Tensor,
                           tile: int = GPTQ_MARLIN_TILE, is_a_8bit: bool = False) -> Tensor:
    """Steps 1 and 2 of the weight layout (module docstring): q_w [size_k, size_n] (any
    dtype) -> [size_k / tile, size_n * tile], tile-ordered rows gathered in runs of
    perm.numel() (``get_weight_perm``)."""
    _check_int("tile", tile, 1)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_int("size_k", size_k, 0)
    _check_int("size_n", size_n, 0)
    check_tensor("q_w", q_w, ndim=2)
    check_shape("q_w", q_w, [size_k, size_n])
    tile_k = 2 * tile if is_a_8bit else tile
    if size_k % tile_k or size_n % tile:
        raise ValueError(f"size_k must be a multiple of {tile_k} and size_n of {tile}, got "
                         f"size_k={size_k}, size_n={size_n}")
    _check_weight_perm(perm, size_n, tile)
    tiles = q_w.reshape(_tile_shape(size_k, size_n, tile, is_a_8bit)).permute(0, 2, 1, 3)
    return _gather_runs(tiles.reshape(size_k // tile, size_n * tile), perm)


def marlin_unpermute_weights(q_w: Tensor, size_k: int, size_n: int, perm: Tensor,
                             tile: int = GPTQ_MARLIN_TILE, is_a_8bit: bool = False) -> Tensor:
    """Inverse of :func:`marlin_permute_weights`: [size_k / tile, size_n * tile] ->
    [size_k, size_n]."""
    _check_int("tile", tile, 1)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_int("size_k", size_k, 0)
    _check_int("size_n", size_n, 0)
    check_tensor("q_w", q_w, ndim=2)
    tile_k = 2 * tile if is_a_8bit else tile
    if size_k % tile_k or size_n % tile:
        raise ValueError(f"size_k must be a multiple of {tile_k} and size_n of {tile}, got "
                         f"size_k={size_k}, size_n={size_n}")
    check_shape("q_w", q_w, [size_k // tile, size_n * tile])
    _check_weight_perm(perm, size_n, tile)
    k_tiles, tile_k, n_tiles, tile_n = _tile_shape(size_k, size_n, tile, is_a_8bit)
    tiles = _scatter_runs(q_w, perm).reshape(k_tiles, n_tiles, tile_k, tile_n)
    return tiles.permute(0, 2, 1, 3).reshape(size_k, size_n)


def marlin_weights(q_w: Tensor, size_k: int, size_n: int, num_bits: int, perm: Tensor,
                   is_a_8bit: bool = False) -> Tensor:
    """The Marlin weight (module docstring): q_w [size_k, size_n] integers in [0,
    2^num_bits) (stored values, bias included) -> int32 [size_k / 16, size_n * 16 / pack],
    on q_w's device."""
    bits = _check_bits("num_bits", num_bits)
    check_tensor("q_w", q_w, ndim=2)
    _check_values("q_w", q_w, bits)
    return _marlin_pack(q_w, size_k, size_n, bits, perm, is_a_8bit)


def _marlin_pack(q_w: Tensor, size_k: int, size_n: int, bits: int, perm: Tensor,
                 is_a_8bit: bool) -> Tensor:
    """:func:`marlin_weights` without the value-range check (values known in range)."""
    permuted = marlin_permute_weights(q_w, size_k, size_n, perm.to(q_w.device),
                                      is_a_8bit=is_a_8bit)
    return pack_nibbles(permuted) if bits == 4 else pack_bytes(permuted)


def unpack_marlin_weights(marlin_q_w: Tensor, size_k: int, size_n: int, num_bits: int,
                          is_a_8bit: bool = False, name: str = "marlin_q_w") -> Tensor:
    """Inverse of :func:`marlin_weights` with ``get_weight_perm(num_bits, is_a_8bit)``:
    int32 [size_k / 16, size_n * 16 / pack] -> the stored integers int32 [size_k, size_n]
    (0 .. 2^num_bits - 1). Errors name ``name``."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_tile_shape(size_k, size_n, _k_multiple(is_a_8bit))
    pack = 32 // bits
    check_tensor(name, marlin_q_w, dtypes=(torch.int32,), ndim=2)
    check_shape(name, marlin_q_w, [size_k // GPTQ_MARLIN_TILE,
                                   size_n * GPTQ_MARLIN_TILE // pack])
    flat = unpack_nibbles(marlin_q_w) if bits == 4 else unpack_bytes(marlin_q_w)
    return marlin_unpermute_weights(flat, size_k, size_n,
                                    get_weight_perm(bits, is_a_8bit).to(flat.device),
                                    is_a_8bit=is_a_8bit)


def _scale_perm(grouped: bool) -> list[int]:
    scale_perm, scale_perm_single = get_scale_perms()
    return scale_perm if grouped else scale_perm_single


def _scales_grouped(size_k: int, group_size: int, is_a_8bit: bool) -> bool:
    return group_size != -1 and group_size < size_k and not is_a_8bit


def _check_scales(name: str, s: object, size_n: int) -> Tensor:
    check_tensor(name, s, ndim=2)
    if s.shape[1] != size_n or s.shape[0] == 0:
        raise ValueError(f"{name} must have shape [groups >= 1, size_n = {size_n}], got "
                         f"{list(s.shape)}")
    return s


def marlin_permute_scales(s: Tensor, size_k: int, size_n: int, group_size: int,
                          is_a_8bit: bool = False) -> Tensor:
    """Scales [groups, size_n] (any dtype) -> Marlin's order, same shape, contiguous:
    runs of 64 gathered by scale_perm when -1 < group_size < size_k (and not is_a_8bit),
    else runs of 32 by scale_perm_single."""
    _check_int("size_k", size_k, 0)
    _check_int("group_size", group_size, -1)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_scales("s", s, size_n)
    perm = _scale_perm(_scales_grouped(size_k, group_size, is_a_8bit))
    if size_n % len(perm):
        raise ValueError(f"size_n must be a multiple of {len(perm)}, got {size_n}")
    return _gather_runs(s.contiguous(), perm).contiguous()


def marlin_unpermute_scales(s: Tensor, size_k: int, size_n: int, group_size: int,
                            is_a_8bit: bool = False) -> Tensor:
    """Inverse of :func:`marlin_permute_scales`."""
    _check_int("size_k", size_k, 0)
    _check_int("group_size", group_size, -1)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_scales("s", s, size_n)
    perm = _scale_perm(_scales_grouped(size_k, group_size, is_a_8bit))
    if size_n % len(perm):
        raise ValueError(f"size_n must be a multiple of {len(perm)}, got {size_n}")
    return _scatter_runs(s.contiguous(), perm).contiguous()


def marlin_permute_bias(s: Tensor) -> Tensor:
    """A bias [..., N] (N a multiple of 32) in Marlin's order: runs of 32 gathered by
    scale_perm_single; same shape, contiguous."""
    check_tensor("s", s, min_ndim=1)
    if s.numel() % 32:
        raise ValueError(f"s must hold a multiple of 32 values, got shape {list(s.shape)}")
    return _gather_runs(s.contiguous(), _scale_perm(False)).contiguous()


def marlin_unpermute_bias(s: Tensor) -> Tensor:
    """Inverse of :func:`marlin_permute_bias`."""
    check_tensor("s", s, min_ndim=1)
    if s.numel() % 32:
        raise ValueError(f"s must hold a multiple of 32 values, got shape {list(s.shape)}")
    return _scatter_runs(s.contiguous(), _scale_perm(False)).contiguous()


def marlin_zero_points(zp: Tensor, size_k: int, size_n: int, num_bits: int,
                       is_a_8bit: bool = False) -> Tensor:
    """Zero points [size_k, size_n] (vLLM passes the group count as size_k; values 0 ..
    2^num_bits - 1) -> Marlin's int32 [size_k, size_n / pack]: runs of 64 gathered by
    scale_perm, then (not is_a_8bit) runs of 8 / 4 by the interleave, packed along the
    row (slot i of word c = column pack*c + i)."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    check_tensor("zp", zp, ndim=2)
    check_shape("zp", zp, [size_k, size_n])
    if size_n % 64:
        raise ValueError(f"size_n must be a multiple of 64, got {size_n}")
    z = _gather_runs(zp.contiguous(), _scale_perm(True))
    if not is_a_8bit:
        z = _gather_runs(z, _INTERLEAVE[bits])
    return pack_cols(z, bits, size_k, size_n)


def unpack_marlin_zero_points(marlin_zp: Tensor, size_k: int, size_n: int, num_bits: int,
                              is_a_8bit: bool = False, name: str = "marlin_zp") -> Tensor:
    """Inverse of :func:`marlin_zero_points`: int32 [size_k, size_n / pack] (size_k = the
    group count) -> int32 [size_k, size_n]. Errors name ``name``."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_int("size_k", size_k, 0)
    _check_int("size_n", size_n, 0)
    if size_n % 64:
        raise ValueError(f"size_n must be a multiple of 64, got {size_n}")
    check_tensor(name, marlin_zp, dtypes=(torch.int32,), ndim=2)
    check_shape(name, marlin_zp, [size_k, size_n // (32 // bits)])
    z = unpack_nibbles(marlin_zp) if bits == 4 else unpack_bytes(marlin_zp)
    if not is_a_8bit:
        z = _scatter_runs(z, _INTERLEAVE[bits])
    return _scatter_runs(z, _scale_perm(True))


def awq_to_marlin_zero_points(q_zp_packed: Tensor, size_k: int, size_n: int, num_bits: int,
                              is_a_8bit: bool = False) -> Tensor:
    """AutoAWQ's qzeros int32 [size_k, size_n / pack] (size_k = the group count; AWQ's
    column order, :func:`awq_pack`) -> Marlin's zero points (:func:`marlin_zero_points`)."""
    bits = _check_bits("num_bits", num_bits)
    check_tensor("q_zp_packed", q_zp_packed, dtypes=(torch.int32,), ndim=2)
    if size_n % (32 // bits):
        raise ValueError(f"size_n must be a multiple of {32 // bits}, got {size_n}")
    check_shape("q_zp_packed", q_zp_packed, [size_k, size_n // (32 // bits)])
    return marlin_zero_points(_unpack_awq(q_zp_packed, bits), size_k, size_n, bits, is_a_8bit)


# ------------------------------------------------------------ workspaces, g_idx helpers


def _device_or_cpu(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def marlin_make_workspace(output_size_per_partition: int,
                          device: torch.device | str) -> Tensor:
    """vLLM's lock buffer: int32 zeros [N / 64 * 16]. Never read here (accepted by
    :func:`gptq_marlin_gemm` for signature compatibility)."""
    _check_int("output_size_per_partition", output_size_per_partition, 0)
    size = output_size_per_partition // GPTQ_MARLIN_MIN_THREAD_N * GPTQ_MARLIN_MAX_PARALLEL
    return torch.zeros(size, dtype=torch.int32, device=device)


def marlin_make_workspace_new(device: torch.device | str, max_blocks_per_sm: int = 1
                              ) -> Tensor:
    """vLLM's newer lock buffer: int32 zeros [SMs * max_blocks_per_sm] (1 SM off CUDA)."""
    _check_int("max_blocks_per_sm", max_blocks_per_sm, 1)
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count \
        if dev.type == "cuda" else 1
    return torch.zeros(sms * max_blocks_per_sm, dtype=torch.int32, device=dev)


class MarlinWorkspace:
    """vLLM's test workspace: ``scratch`` int32 zeros [N / min_thread_n * max_parallel]
    on the GPU when there is one, else the CPU (vLLM: always "cuda")."""

    def __init__(self, out_features: int, min_thread_n: int, max_parallel: int,
                 device: torch.device | str | None = None) -> None:
        _check_int("min_thread_n", min_thread_n, 1)
        _check_int("max_parallel", max_parallel, 0)
        _check_int("out_features", out_features, 0)
        if out_features % min_thread_n:
            raise ValueError(f"out_features = {out_features} is not divisible by "
                             f"min_thread_n = {min_thread_n}")
        self.scratch = torch.zeros(out_features // min_thread_n * max_parallel,
                                   dtype=torch.int32, device=_device_or_cpu(device))


def marlin_make_empty_g_idx(device: torch.device | str) -> Tensor:
    """An empty int32 tensor: "no act order" for g_idx / perm (vLLM wraps it in a frozen
    Parameter; so does this)."""
    return torch.nn.Parameter(torch.empty(0, dtype=torch.int32, device=device),
                              requires_grad=False)


def marlin_make_empty_zp(device: torch.device | str) -> Tensor:
    """An empty int32 tensor: "no zero points" for b_zeros."""
    return marlin_make_empty_g_idx(device)


def marlin_sort_g_idx(g_idx: Tensor) -> tuple[Tensor, Tensor]:
    """(g_idx sorted, the int32 sort indices): what gptq_marlin_gemm takes as g_idx and
    perm for an act-order checkpoint's g_idx [K] (a stable sort)."""
    check_tensor("g_idx", g_idx, dtypes=(torch.int32, torch.int64), ndim=1)
    order = torch.argsort(g_idx, stable=True).to(torch.int32)
    return g_idx[order], order


def marlin_is_k_full(act_order: bool, is_row_parallel: bool) -> bool:
    """False only for an act-order weight split along K (row parallel)."""
    return (not act_order) or (act_order and not is_row_parallel)


def marlin_repeat_scales_on_all_ranks(act_order: bool, group_size: int,
                                      is_row_parallel: bool) -> bool:
    """True when every rank needs all the scales (act order, or channelwise and row
    parallel)."""
    return act_order or (group_size == -1 and is_row_parallel)


def query_marlin_supported_quant_types(has_zp: bool | None = None,
                                       include_fp_type: bool = True,
                                       device_capability: int | None = None
                                       ) -> list[ScalarType]:
    """The weight types :func:`gptq_marlin_gemm` runs here: has_zp=False uint4b8,
    uint8b128; True uint4 (vLLM's list; uint8 with zero points runs too); None both.
    vLLM's fp8 / fp4 types are never listed (not supported: include_fp_type has no
    effect) and device_capability is unused."""
    if has_zp is None:
        return query_marlin_supported_quant_types(False) + \
            query_marlin_supported_quant_types(True)
    if has_zp:
        return [scalar_types.uint4]
    return [scalar_types.uint4b8, scalar_types.uint8b128]


# --------------------------------------------------------------------- repack ops


def gptq_marlin_repack(b_q_weight: Tensor, perm: Tensor | None, size_k: int, size_n: int,
                       num_bits: int, is_a_8bit: bool = False) -> Tensor:
    """vLLM's ``gptq_marlin_repack``: GPTQ's qweight int32 [size_k / pack, size_n]
    (packed along K, lowest bits first) -> the Marlin weight int32 [size_k / 16, size_n *
    16 / pack], equal to :func:`marlin_weights` of the same integers with their rows
    taken in ``perm`` order (act order: perm = argsort(g_idx), int32 / int64 [size_k];
    empty or None: rows as stored). size_k a multiple of 16 (32 with is_a_8bit), size_n
    of 64; num_bits 4 or 8. Plain PyTorch, on b_q_weight's device."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_tile_shape(size_k, size_n, _k_multiple(is_a_8bit))
    pack = 32 // bits
    check_tensor("b_q_weight", b_q_weight, dtypes=(torch.int32,), ndim=2)
    check_shape("b_q_weight", b_q_weight, [size_k // pack, size_n])
    dev = b_q_weight.device
    order = _optional_index("perm", perm, size_k, dev)
    q = unpack_cols(b_q_weight.t(), bits, size_n, size_k).t()
    if order is not None:
        _check_permutation("perm", order, size_k, "argsort(g_idx)")
        q = q.index_select(0, order)
    return _marlin_pack(q, size_k, size_n, bits, get_weight_perm(bits, is_a_8bit), is_a_8bit)


def awq_marlin_repack(b_q_weight: Tensor, size_k: int, size_n: int, num_bits: int,
                      is_a_8bit: bool = False) -> Tensor:
    """vLLM's ``awq_marlin_repack``: AutoAWQ's GEMM qweight int32 [size_k, size_n / pack]
    (packed along N in AWQ's order, :func:`awq_pack`) -> the Marlin weight int32
    [size_k / 16, size_n * 16 / pack] (:func:`marlin_weights` of the same integers).
    Shapes as :func:`gptq_marlin_repack`. Plain PyTorch."""
    bits = _check_bits("num_bits", num_bits)
    _check_bool("is_a_8bit", is_a_8bit)
    _check_tile_shape(size_k, size_n, _k_multiple(is_a_8bit))
    check_tensor("b_q_weight", b_q_weight, dtypes=(torch.int32,), ndim=2)
    check_shape("b_q_weight", b_q_weight, [size_k, size_n // (32 // bits)])
    q = _unpack_awq(b_q_weight, bits)
    return _marlin_pack(q, size_k, size_n, bits, get_weight_perm(bits, is_a_8bit), is_a_8bit)


def _check_experts(name: str, t: object) -> Tensor:
    check_tensor(name, t, dtypes=(torch.int32,), ndim=3)
    return t


def gptq_marlin_moe_repack(b_q_weight: Tensor, perm: Tensor, size_k: int, size_n: int,
                           num_bits: int, is_a_8bit: bool = False) -> Tensor:
    """:func:`gptq_marlin_repack` per expert: b_q_weight int32 [E, size_k / pack, size_n],
    perm [E, size_k] (or an empty tensor: no act order) -> int32 [E, size_k / 16,
    size_n * 16 / pack]."""
    _check_experts("b_q_weight", b_q_weight)
    experts = b_q_weight.shape[0]
    no_perm = _is_empty(perm)
    if not no_perm:
        check_tensor("perm", perm, dtypes=(torch.int32, torch.int64), ndim=2)
        check_shape("perm", perm, [experts, size_k])
    return torch.stack([gptq_marlin_repack(b_q_weight[e], None if no_perm else perm[e],
                                           size_k, size_n, num_bits, is_a_8bit)
                        for e in range(experts)]) if experts else \
        torch.empty(0, size_k // 16, size_n * num_bits // 2, dtype=torch.int32,
                    device=b_q_weight.device)


def awq_marlin_moe_repack(b_q_weight: Tensor, perm: Tensor | None, size_k: int, size_n: int,
                          num_bits: int, is_a_8bit: bool = False) -> Tensor:
    """:func:`awq_marlin_repack` per expert: int32 [E, size_k, size_n / pack] -> int32
    [E, size_k / 16, size_n * 16 / pack]; perm is unused (as in vLLM)."""
    _check_experts("b_q_weight", b_q_weight)
    experts = b_q_weight.shape[0]
    return torch.stack([awq_marlin_repack(b_q_weight[e], size_k, size_n, num_bits,
                                          is_a_8bit) for e in range(experts)]) \
        if experts else torch.empty(0, size_k // 16, size_n * num_bits // 2,
                                    dtype=torch.int32, device=b_q_weight.device)


# ------------------------------------------------------------------------ the GEMM


def _optional_zeros(b_zeros: object) -> Tensor | None:
    if b_zeros is None:
        return None
    check_tensor("b_zeros", b_zeros)
    return None if b_zeros.numel() == 0 else b_zeros


def _zero_points(wtype: ScalarType, b_zeros: object, groups: int, size_n: int,
                 device: torch.device) -> Tensor:
    """int32 [groups, N]: the type's bias, or the unpacked b_zeros."""
    zp = _optional_zeros(b_zeros)
    takes_zp = _GEMM_TYPES[wtype]
    if not takes_zp:
        if zp is not None:
            raise ValueError(f"b_zeros must be empty or None for b_q_type={wtype} (zero "
                             "points go with uint4 / uint8), got shape "
                             f"{list(zp.shape)}")
        return torch.full((groups, size_n), wtype.bias, dtype=torch.int32, device=device)
    if zp is None:
        raise ValueError(f"b_zeros must be given for b_q_type={wtype}: its zero points, "
                         f"int32 [groups, size_n / {32 // wtype.size_bits}] "
                         "(marlin_zero_points)")
    check_tensor("b_zeros", zp, device=device)
    return unpack_marlin_zero_points(zp, groups, size_n, wtype.size_bits, name="b_zeros")


def _row_groups(g_idx: Tensor | None, groups: int, size_k: int, is_k_full: bool,
                device: torch.device) -> Tensor:
    """int64 [K]: the scale row of each stored weight row."""
    if g_idx is not None:
        if is_k_full and (groups < 2 or size_k % groups):
            raise ValueError(f"b_scales must have more than one group row dividing size_k "
                             f"= {size_k} for act order with is_k_full=True, got {groups}")
        check_index_range("g_idx", g_idx, 0, groups)
        return g_idx
    if size_k % groups:
        raise ValueError(f"b_scales must have a number of group rows dividing size_k = "
                         f"{size_k}, got {groups}")
    return torch.arange(size_k, device=device) // (size_k // groups)


def decode_marlin(b_q_weight: Tensor, b_scales: Tensor, b_zeros: Tensor | None,
                  g_idx: Tensor | None, perm: Tensor | None, b_q_type: ScalarType,
                  size_k: int, size_n: int, is_k_full: bool = True) -> GroupedWeight:
    """The Marlin tensors :func:`gptq_marlin_gemm` takes (module docstring) decoded to a
    :class:`~minikernels.compat.vllm_ops.GroupedWeight`: the stored integers int32
    [K, N] in stored row order, zero points int32 [groups, N] (the type's bias for
    uint4b8 / uint8b128), scales [groups, N] in b_scales' dtype, each row's group, and
    the act-order permutation (``GroupedWeight.dequantize()`` gives W [K, N] in input row
    order, exactly, in fp32). Errors name vLLM's arguments."""
    wtype = _gemm_type("b_q_type", b_q_type)
    _check_bool("is_k_full", is_k_full)
    bits = wtype.size_bits
    _check_tile_shape(size_k, size_n)
    q = unpack_marlin_weights(b_q_weight, size_k, size_n, bits, name="b_q_weight")
    dev = b_q_weight.device
    check_tensor("b_scales", b_scales, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    _check_scales("b_scales", b_scales, size_n)
    groups = int(b_scales.shape[0])
    gi = _optional_index("g_idx", g_idx, size_k, dev)
    order = _optional_index("perm", perm, size_k, dev)
    if (gi is None) != (order is None):
        raise ValueError("g_idx and perm must both be [size_k] (act order) or both empty, "
                         f"got g_idx {_shape_of(g_idx)} and perm {_shape_of(perm)}")
    if order is not None:
        _check_permutation("perm", order, size_k, "argsort of the checkpoint's g_idx")
    row_group = _row_groups(gi, groups, size_k, is_k_full, dev)
    zeros = _zero_points(wtype, b_zeros, groups, size_n, dev)
    scales = _scatter_runs(b_scales.contiguous(), _scale_perm(groups > 1))
    return GroupedWeight(q, zeros, scales, row_group, order, bits)


def _shape_of(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else repr(t)


def _refuse(name: str, value: object, why: str) -> None:
    if not _is_empty(value):
        raise MarlinUnsupportedError(f"{name} is not supported by minikernels ({why}); "
                                     "pass None")


def _check_activations(a: object, size_m: int, size_k: int) -> Tensor:
    check_tensor("a", a)
    if a.dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        raise MarlinUnsupportedError(f"a of dtype {a.dtype} (Marlin's W4A8 int8 / fp8 "
                                     "activations) is not supported: pass fp16 / bf16 a")
    check_tensor("a", a, dtypes=FLOAT_DTYPES, ndim=2)
    check_shape("a", a, [size_m, size_k])
    return a


def _marlin_gemm(a: Tensor, c: Tensor | None, b_q_weight: Tensor, b_bias: Tensor | None,
                 b_scales: Tensor, a_scales: Tensor | None, global_scale: Tensor | None,
                 b_zeros: Tensor | None, g_idx: Tensor | None, perm: Tensor | None,
                 workspace: Tensor, b_q_type: ScalarType, size_m: int, size_n: int,
                 size_k: int, is_k_full: bool = True, use_atomic_add: bool = False,
                 use_fp32_reduce: bool = False, is_zp_float: bool = False) -> Tensor:
    """vLLM's current ``gptq_marlin_gemm`` / ``marlin_gemm`` signature (see
    :func:`gptq_marlin_gemm`)."""
    _gemm_type("b_q_type", b_q_type)
    for name, flag in (("is_k_full", is_k_full), ("use_atomic_add", use_atomic_add),
                       ("use_fp32_reduce", use_fp32_reduce), ("is_zp_float", is_zp_float)):
        _check_bool(name, flag)
    if is_zp_float:
        raise MarlinUnsupportedError("is_zp_float=True (HQQ's fp16 zero points) is not "
                                     "supported by minikernels; integer zero points only")
    _refuse("a_scales", a_scales, "Marlin's int8 / fp8 activation scales (W4A8)")
    _refuse("global_scale", global_scale, "nvfp4's second-level scale; fp4 weights are "
            "not supported")
    for name, value in (("size_m", size_m), ("size_n", size_n), ("size_k", size_k)):
        _check_int(name, value, 0)
    _check_activations(a, size_m, size_k)
    check_tensor("workspace", workspace)
    w = decode_marlin(b_q_weight, b_scales, b_zeros, g_idx, perm, b_q_type, size_k,
                      size_n, is_k_full)
    check_tensor("a", a, device=b_q_weight.device)
    bias = None
    if b_bias is not None:
        check_tensor("b_bias", b_bias, dtypes=FLOAT_DTYPES, ndim=1, device=a.device)
        check_shape("b_bias", b_bias, [size_n])
        bias = marlin_unpermute_bias(b_bias)
    y = w.matmul(a, bias, x_name="a")
    if c is None:
        return y
    check_tensor("c", c, dtypes=(a.dtype,), device=a.device)
    check_shape("c", c, [size_m, size_n])
    c.copy_(y)
    return c


_CURRENT = tuple(inspect.signature(_marlin_gemm).parameters)
#: vLLM's signatures by the position of b_q_type: current (with a_scales), the one
#: before a_scales (b_bias), the one before b_bias, the one with has_zp.
_FORMS = {
    11: _CURRENT,
    10: tuple(n for n in _CURRENT if n != "a_scales"),
    9: tuple(n for n in _CURRENT if n not in ("a_scales", "b_bias")),
    7: ("a", "b_q_weight", "b_scales", "b_zeros", "g_idx", "perm", "workspace", "b_q_type",
        "size_m", "size_n", "size_k", "is_k_full", "has_zp", "use_fp32_reduce"),
}
_MARLIN_V1 = ("a", "b_q_weight", "b_scales", "workspace", "size_m", "size_n", "size_k")
_OPTIONAL = {"c": None, "b_bias": None, "a_scales": None, "global_scale": None,
             "b_zeros": None, "g_idx": None, "perm": None, "is_k_full": True,
             "use_atomic_add": False, "use_fp32_reduce": False, "is_zp_float": False,
             "has_zp": False}


def _gemm_form(args: tuple, kwargs: dict) -> tuple[str, ...]:
    pos = next((i for i, v in enumerate(args) if _is_scalar_type(v)), None)
    if pos is not None:
        if pos not in _FORMS:
            raise TypeError(f"b_q_type must be argument {11 + 1} of gptq_marlin_gemm (vLLM's "
                            f"signature: {', '.join(_CURRENT)}), found a scalar type at "
                            f"argument {pos + 1}")
        return _FORMS[pos]
    if "b_q_type" in kwargs:
        return _FORMS[7] if "has_zp" in kwargs else _CURRENT
    if len(args) == len(_MARLIN_V1) and not kwargs:
        return _MARLIN_V1
    raise TypeError("gptq_marlin_gemm() needs b_q_type, a scalar_types member (vLLM's "
                    f"signature: {', '.join(_CURRENT)})")


def _bind_gemm_args(args: tuple, kwargs: dict) -> dict:
    """vLLM's positional / keyword arguments of any supported form -> the current form's
    keywords."""
    names = _gemm_form(args, kwargs)
    if len(args) > len(names):
        raise TypeError(f"gptq_marlin_gemm() takes at most {len(names)} positional "
                        f"arguments in this form ({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"gptq_marlin_gemm() got an unexpected keyword argument {key!r}")
        if key in bound:
            raise TypeError(f"gptq_marlin_gemm() got multiple values for argument {key!r}")
        bound[key] = value
    missing = [n for n in names if n not in bound and n not in _OPTIONAL]
    if missing:
        raise TypeError(f"gptq_marlin_gemm() missing required argument(s): "
                        f"{', '.join(missing)}")
    if names is _MARLIN_V1:
        bound["b_q_type"] = scalar_types.uint4b8         # Marlin v1: 4-bit, value - 8
    if names is _FORMS[7] and not _check_bool("has_zp", bound.pop("has_zp", False)):
        bound["b_zeros"] = None                          # has_zp=False: b_zeros unused
    return {n: bound.get(n, _OPTIONAL.get(n)) for n in _CURRENT}


def gptq_marlin_gemm(*args: object, **kwargs: object) -> Tensor:
    """vLLM's Marlin GEMM (``ops.gptq_marlin_gemm``, renamed ``ops.marlin_gemm``):
    y = a @ W (+ bias) -> [size_m, size_n] in a's dtype, written into c when given.

    Current signature: (a, c, b_q_weight, b_bias, b_scales, a_scales, global_scale,
    b_zeros, g_idx, perm, workspace, b_q_type, size_m, size_n, size_k, is_k_full=True,
    use_atomic_add=False, use_fp32_reduce=False, is_zp_float=False). Also accepted,
    told apart by where b_q_type sits: the form without a_scales (b_q_type 11th), the one
    without b_bias either (10th), the older (a, b_q_weight, b_scales, b_zeros, g_idx,
    perm, workspace, b_q_type, size_m, size_n, size_k, is_k_full, has_zp=False,
    use_fp32_reduce=False) and Marlin v1's marlin_gemm(a, b_q_weight, b_scales,
    workspace, size_m, size_n, size_k) (uint4b8, the same layout).

    a            [size_m, size_k] fp16 / bf16 (fp32 too), any strides.
    c            None or [size_m, size_n] in a's dtype (any strides; written and returned).
    b_q_weight   int32 [size_k / 16, size_n * 16 / pack] (module docstring); size_k a
                 multiple of 16, size_n of 64.
    b_bias       None or [size_n] in Marlin's order (``marlin_permute_bias``).
    b_scales     [groups, size_n] in Marlin's order (``marlin_permute_scales``); fp16 /
                 bf16 (a's dtype in vLLM; another float dtype runs an fp32 fallback).
    b_zeros      None / empty, or for uint4 / uint8 int32 [groups, size_n / pack]
                 (``marlin_zero_points``).
    g_idx, perm  both empty / None, or both int32 [size_k] (act order: the sorted g_idx
                 and the sort indices, ``marlin_sort_g_idx``).
    workspace    any tensor (vLLM's locks; unused). is_k_full=False (a row-parallel
                 act-order shard; g_idx may then index more groups than K / group size),
                 use_atomic_add and use_fp32_reduce change only vLLM's reduction order.
    b_q_type     scalar_types.uint4b8 / uint8b128 (symmetric: value - 8 / - 128) or
                 uint4 / uint8 with b_zeros (value - zero point), times the group scale.

    Refused with :class:`MarlinUnsupportedError` (ValueError and NotImplementedError)
    naming the argument: fp8 / fp4 b_q_type, a non-empty a_scales (int8 / fp8 a) or
    global_scale (nvfp4), is_zp_float=True, int8 / fp8 a.

    A compat path: the weight is decoded from the Marlin words on every call (nothing
    cached; see :func:`decode_marlin`) and run on ``ops.int4_matmul`` /
    ``ops.int8_matmul`` (W dequantized in fp32, fp32 accumulation, one rounding) through
    ``vllm_ops.GroupedWeight``, act order gathering a's columns by perm."""
    return _marlin_gemm(**_bind_gemm_args(args, kwargs))


gptq_marlin_gemm.__signature__ = inspect.signature(_marlin_gemm)  # type: ignore[attr-defined]
#: vLLM's current name for :func:`gptq_marlin_gemm` (also Marlin v1's 7-argument form).
marlin_gemm = gptq_marlin_gemm


# ----------------------------------------------------------- quantization helpers


def _check_float_weight(w: object) -> Tensor:
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    return w


def _group_size(group_size: object, size_k: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    g = size_k if group_size == -1 else group_size
    if g <= 0 or g > size_k or size_k % g:
        raise ValueError(f"group_size must be -1 or a positive divisor of size_k = "
                         f"{size_k}, got {group_size}")
    return g


def _check_input_dtype(input_dtype: object) -> None:
    if input_dtype is None:
        return
    if not isinstance(input_dtype, torch.dtype):
        raise TypeError(f"input_dtype must be a torch.dtype or None, got "
                        f"{type(input_dtype).__name__}")
    if input_dtype.itemsize == 1:
        raise MarlinUnsupportedError(f"input_dtype={input_dtype} (Marlin's W4A8 layouts for "
                                     "int8 / fp8 activations) is not supported")


def quantize_weights(w: Tensor, quant_type: ScalarType, group_size: int,
                     zero_points: bool = False, ref_zero_points_after_scales: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """vLLM's round-to-nearest test quantizer, in w's dtype: w [K, N] float, groups of
    group_size rows (-1: all K) -> (w_ref [K, N] the dequantized weight in w's dtype,
    w_q int32 [K, N] stored values (bias added), w_s [K / G, N] in w's dtype, w_zp int32
    [K / G, N] or None).

    Symmetric (uint4b8, uint8b128): s = max(|max / type.max()|, |min / type.min()|) per
    group and column, q = clamp(round(w / s), min, max), w_ref = q * s. Zero points (uint4,
    uint8): s = max(max - min, 1e-5) / type.max(), zp = clamp(round(|min / s|)), q =
    clamp(round(w / s) + zp), w_ref = (q - zp) * s (ref_zero_points_after_scales: q * s -
    zp * s). A group of zeros gets scale 1 (vLLM divides by 0)."""
    _check_float_weight(w)
    _check_bool("zero_points", zero_points)
    _check_bool("ref_zero_points_after_scales", ref_zero_points_after_scales)
    qtype = _quant_type("quant_type", quant_type, zero_points)
    size_k, size_n = w.shape
    g = _group_size(group_size, size_k)
    wg = w.reshape(size_k // g, g, size_n)
    hi, lo = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
    qmin, qmax = qtype.min(), qtype.max()
    zp = None
    if zero_points:
        s = (hi - lo).clamp(min=1e-5) / qmax
        zp = torch.round(torch.abs(lo / s)).clamp(qmin, qmax).int()
    else:
        s = torch.maximum((hi / qmax).abs(), (lo / qmin).abs())
        s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(wg / s).int() + (zp if zp is not None else 0)
    q = q.clamp(qmin, qmax)
    if zp is None:
        w_ref = q.to(w.dtype) * s
    elif ref_zero_points_after_scales:
        w_ref = q.to(w.dtype) * s - zp.to(w.dtype) * s
    else:
        w_ref = (q - zp).to(w.dtype) * s
    q = q + qtype.bias
    return (w_ref.reshape(size_k, size_n), q.reshape(size_k, size_n).to(torch.int32),
            s.reshape(size_k // g, size_n).contiguous(),
            None if zp is None else zp.reshape(size_k // g, size_n).contiguous())


def permute_rows(q_w: Tensor, w_ref: Tensor, group_size: int,
                 test_perm: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """vLLM's act-order simulation: rows of q_w and w_ref [K, N] taken in a random order
    (``test_perm`` when given) -> (w_ref, q_w, g_idx int32 [K] = perm // group_size, the
    permutation)."""
    check_tensor("q_w", q_w, ndim=2)
    check_tensor("w_ref", w_ref, ndim=2)
    check_shape("w_ref", w_ref, list(q_w.shape))
    size_k = q_w.shape[0]
    g = _group_size(group_size, size_k)
    if test_perm is None:
        rand_perm = torch.randperm(size_k)
    else:
        check_tensor("test_perm", test_perm, dtypes=(torch.int32, torch.int64), ndim=1)
        check_shape("test_perm", test_perm, [size_k])
        _check_permutation("test_perm", test_perm.to(torch.int64), size_k, "rows of w")
        rand_perm = test_perm
    rows = rand_perm.to(device=q_w.device, dtype=torch.int64)
    g_idx = (rows // g).to(torch.int32)
    return (w_ref[rows].contiguous(), q_w[rows].contiguous(), g_idx,
            rand_perm.to(q_w.device))


def gptq_quantize_weights(w: Tensor, quant_type: ScalarType, group_size: int,
                          act_order: bool, test_perm: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """vLLM's GPTQ-style test quantizer (symmetric uint4b8 / uint8b128) -> (w_ref, q_w, s,
    g_idx, rand_perm); with act_order the rows are permuted (:func:`permute_rows`), else
    g_idx and rand_perm are empty int32."""
    _check_bool("act_order", act_order)
    w_ref, q_w, s, _ = quantize_weights(w, quant_type, group_size)
    g_idx = torch.empty(0, dtype=torch.int32, device=w.device)
    rand_perm = torch.empty(0, dtype=torch.int32, device=w.device)
    if act_order:
        if _group_size(group_size, w.shape[0]) >= w.shape[0]:
            raise ValueError(f"group_size must be less than size_k = {w.shape[0]} for "
                             f"act_order, got {group_size}")
        w_ref, q_w, g_idx, rand_perm = permute_rows(q_w, w_ref, group_size, test_perm)
    return w_ref, q_w, s, g_idx, rand_perm


def sort_weights(q_w: Tensor, g_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of q_w sorted by group (a stable sort) -> (q_w sorted, g_idx sorted, the
    int32 sort indices)."""
    check_tensor("q_w", q_w, ndim=2)
    check_tensor("g_idx", g_idx, dtypes=(torch.int32, torch.int64), ndim=1)
    check_shape("g_idx", g_idx, [q_w.shape[0]])
    sorted_g, order = marlin_sort_g_idx(g_idx)
    return q_w[order.long()].contiguous(), sorted_g.contiguous(), order


def marlin_quantize(w: Tensor, quant_type: ScalarType | int, group_size: int,
                    act_order: bool, test_perm: Tensor | None = None,
                    input_dtype: torch.dtype | None = None) -> list[Tensor]:
    """vLLM's ``marlin_quantize``: w [K, N] float (K a multiple of 16, N of 64) ->
    [w_ref [K, N] in w's dtype (input row order), marlin_q_w int32 [K / 16, N * 16 /
    pack], marlin_s [groups, N] in w's dtype (Marlin's order), g_idx int32 [K] (sorted;
    act order) or empty, sort_indices int32 [K] (the perm; act order) or empty,
    rand_perm [K] or empty].

    quant_type: scalar_types.uint4b8 / uint8b128 (or older vLLM's num_bits 4 / 8).
    input_dtype None / fp16 / bf16; int8 / fp8 (W4A8 layouts) are refused."""
    _check_input_dtype(input_dtype)
    qtype = _quant_type("quant_type", quant_type, zero_points=False)
    _check_float_weight(w)
    size_k, size_n = w.shape
    _check_tile_shape(size_k, size_n)
    g = _group_size(group_size, size_k)
    w_ref, q_w, s, g_idx, rand_perm = gptq_quantize_weights(w, qtype, group_size,
                                                            act_order, test_perm)
    sort_indices = torch.empty(0, dtype=torch.int32, device=w.device)
    if act_order:
        q_w, g_idx, sort_indices = sort_weights(q_w, g_idx)
    bits = qtype.size_bits
    marlin_q_w = marlin_weights(q_w, size_k, size_n, bits, get_weight_perm(bits))
    marlin_s = marlin_permute_scales(s, size_k, size_n, g)
    return [t.to(w.device) for t in (w_ref, marlin_q_w, marlin_s, g_idx, sort_indices,
                                     rand_perm)]


def awq_marlin_quantize(w: Tensor, quant_type: ScalarType | int, group_size: int,
                        input_dtype: torch.dtype | None = None) -> list[Tensor]:
    """vLLM's ``awq_marlin_quantize``: w [K, N] float -> [w_ref [K, N] in w's dtype,
    marlin_q_w int32 [K / 16, N * 16 / pack], marlin_s [groups, N] (Marlin's order),
    marlin_zp int32 [groups, N / pack] (``marlin_zero_points``)]. quant_type:
    scalar_types.uint4 / uint8 (or num_bits 4 / 8); input_dtype as :func:`marlin_quantize`."""
    _check_input_dtype(input_dtype)
    qtype = _quant_type("quant_type", quant_type, zero_points=True)
    _check_float_weight(w)
    size_k, size_n = w.shape
    _check_tile_shape(size_k, size_n)
    g = _group_size(group_size, size_k)
    w_ref, q_w, s, zp = quantize_weights(w, qtype, group_size, zero_points=True)
    bits = qtype.size_bits
    marlin_q_w = marlin_weights(q_w, size_k, size_n, bits, get_weight_perm(bits))
    marlin_s = marlin_permute_scales(s, size_k, size_n, g)
    marlin_zp = marlin_zero_points(zp, size_k // g, size_n, bits)
    return [t.to(w.device) for t in (w_ref, marlin_q_w, marlin_s, marlin_zp)]
