"""Tensor parallelism for the recurrent token mixers (hybrid models), as vLLM shards them.

Each rank holds a slice of the mixer's channels / heads and its own slice of every
sequence's recurrent state; the projections into the mixer are column-parallel (this rank's
rows of each section of the fused in_proj), the projection out of it row-parallel (one
all-reduce per layer, like attention's o_proj):

    short_conv      LFM2: channels [h0, h1) of b, c and u (H / P each); the depthwise conv
                    and conv state over those channels; out_proj columns [h0, h1)
    gated_deltanet  Qwen3.5 / OLMo Hybrid: key heads [k0, k1) and value heads [v0, v1)
                    (Hk / P and Hv / P: value head j still reads key head j // (Hv / Hk)):
                    q, k, v, z, b, a rows of those heads; conv channels [q | k | v] of
                    them; dt_bias / A_log of the value heads; the per-head norm replicated;
                    out_proj columns of the value heads
    mamba2          Granite 4.0-H, Bamba, Nemotron-H, Falcon-H1, Zamba2, Mamba-2: heads [e0, e1)
                    (P | heads)
                    and their groups of B / C: groups [g0, g1) when P divides the groups,
                    else (P a multiple of the groups) the one group the rank's heads read,
                    replicated on P / G ranks; in_proj rows [z | x | B | C | dt] of those,
                    conv channels [x | B | C]; dt_bias / A_log / D of the heads; the gated
                    norm's weight over the rank's inner slice, its rms over a group that
                    spans ranks all-reduced ([T, G] fp32 sums of squares)
    mamba           Mamba-1 (Mamba, FalconMamba, Jamba): inner channels [i0, i1) of x and
                    z; the conv, dt_bias, A_log rows and D of those; x_proj row-parallel
                    (its [dt | B | C] output all-reduced, then the dt / B / C norms
                    replicated); dt_proj column-parallel (rows [i0, i1)); out_proj columns.
                    Zamba's multi-head Mamba-1 (per-head x_proj / dt_proj) is refused

:func:`mixer_shard` names a checkpoint tensor's rows (column-parallel) or columns
(row-parallel) as a list of [start, stop) ranges, which ``parallel.shard_tensor`` cuts and
concatenates; the mixer modules size themselves with the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DecoderConfig

#: the recurrent mixers this sharding covers (DecoderConfig.layer_mixers)
SHARDED_MIXERS = ("short_conv", "gated_deltanet", "mamba", "mamba2", "mamba2_attention",
                  "zamba_hybrid")
#: each mixer's block in a layer (the module names' second part)
MIXER_BLOCKS = {"conv": ("short_conv",), "linear_attn": ("gated_deltanet",),
                "mamba": ("mamba", "mamba2", "mamba2_attention", "zamba_hybrid")}

Ranges = list[tuple[int, int]]


def _split(n: int, rank: int, size: int) -> tuple[int, int]:
    k = n // size
    return rank * k, (rank + 1) * k


@dataclass(frozen=True)
class GatedDeltaShard:
    """This rank's key heads [k0, k0 + nk) and value heads [v0, v0 + nv)."""

    k0: int
    nk: int
    v0: int
    nv: int


def gated_delta_shard(c: DecoderConfig, rank: int, size: int) -> GatedDeltaShard:
    k0, k1 = _split(c.linear_num_key_heads, rank, size)
    v0, v1 = _split(c.linear_num_value_heads, rank, size)
    return GatedDeltaShard(k0, k1 - k0, v0, v1 - v0)


@dataclass(frozen=True)
class Mamba2Shard:
    """This rank's heads [h0, h0 + nh) and B / C groups [g0, g0 + ng); ``norm_span``
    ranks share each norm group (1: the rank's norm groups are whole)."""

    h0: int
    nh: int
    g0: int
    ng: int
    norm_span: int


def mamba2_shard(c: DecoderConfig, rank: int, size: int) -> Mamba2Shard:
    h0, h1 = _split(c.mamba_num_heads, rank, size)
    groups = c.mamba_num_groups
    if groups % size == 0:
        g0, g1 = _split(groups, rank, size)
        return Mamba2Shard(h0, h1 - h0, g0, g1 - g0, 1)
    span = size // groups               # ranks per group (P a multiple of G)
    return Mamba2Shard(h0, h1 - h0, rank // span, 1, span)


def check_mixers(c: DecoderConfig, size: int) -> None:
    """Refuse recurrent shapes ``size`` ranks cannot split, naming the numbers."""
    def need(n: int, what: str) -> None:
        if n % size:
            raise ValueError(f"tensor_parallel_size {size} must divide {what} ({n})")

    kinds = set(c.layer_mixers or ()) - {"attention", "none"}
    other = kinds - set(SHARDED_MIXERS)
    if other:
        raise ValueError(f"tensor_parallel_size {size}: {c.architecture}'s "
                         f"{sorted(other)} layers are not sharded; run it with "
                         "tensor_parallel_size=1")
    if c.mamba1_num_heads > 1:
        raise ValueError(f"tensor_parallel_size {size}: {c.architecture}'s multi-head Mamba-1 "
                         "layers (per-head x_proj / dt_proj) are not sharded; run it with "
                         "tensor_parallel_size=1")
    if "short_conv" in kinds:
        need(c.hidden_size, "hidden_size (LFM2's conv channels)")
    if "gated_deltanet" in kinds:
        need(c.linear_num_key_heads, "linear_num_key_heads")
        need(c.linear_num_value_heads, "linear_num_value_heads")
    if kinds & {"mamba2", "mamba2_attention", "zamba_hybrid"}:
        need(c.mamba_num_heads, "mamba_num_heads")
        g = c.mamba_num_groups
        if g % size and size % g:
            raise ValueError(f"tensor_parallel_size {size} and mamba_num_groups ({g}): one "
                             "must divide the other")
    if "mamba" in kinds:
        need(c.mamba_inner_size, "the Mamba inner size (intermediate_size / expand x "
             "hidden_size)")


def _block(module: str) -> tuple[int, str, str] | None:
    """(layer, block, rest) of ``layers.N.<block>[.rest]`` for a recurrent block."""
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "layers" or parts[2] not in MIXER_BLOCKS:
        return None
    return int(parts[1]), parts[2], ".".join(parts[3:])


def _offset(ranges: Ranges, base: int) -> Ranges:
    return [(a + base, b + base) for a, b in ranges]


def mixer_shard(c: DecoderConfig, rank: int, size: int, module: str, part: int | None,
                kind: str) -> tuple[str, Ranges] | None:
    """How a recurrent mixer's tensor is cut: ("rows", ranges) for column-parallel
    projections, conv kernels and per-channel / per-head parameters, ("columns", ranges)
    for row-parallel projections' weights, ("bias", []) for a row-parallel bias (rank 0
    keeps it), ("whole", []) for what every rank holds; None when ``module`` is not a
    recurrent mixer's. ``part``: the part of a fused in_proj (or OLMo Hybrid's q / k / v
    conv) the tensor is, as the loader maps it; None = the whole fused tensor."""
    where = _block(module)
    if where is None:
        return None
    layer, block, rest = where
    mixer = c.mixer(layer)
    if mixer not in MIXER_BLOCKS[block]:
        return None
    if mixer == "short_conv":
        h0, h1 = _split(c.hidden_size, rank, size)
        h = c.hidden_size
        if rest == "in_proj":
            return "rows", [(h0, h1), (h + h0, h + h1), (2 * h + h0, 2 * h + h1)]
        if rest == "conv":
            return "rows", [(h0, h1)]
        if rest == "out_proj":
            return ("bias", []) if kind == "bias" else ("columns", [(h0, h1)])
        return "whole", []
    if mixer == "gated_deltanet":
        return _gated_delta(c, gated_delta_shard(c, rank, size), rest, part, kind)
    if mixer == "mamba":
        return _mamba1(c, _split(c.mamba_inner_size, rank, size), rest, kind)
    return _mamba2(c, mamba2_shard(c, rank, size), rest, kind)


def _gated_delta(c: DecoderConfig, s: GatedDeltaShard, rest: str, part: int | None,
                 kind: str) -> tuple[str, Ranges]:
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    key = [(s.k0 * dk, (s.k0 + s.nk) * dk)]
    value = [(s.v0 * dv, (s.v0 + s.nv) * dv)]
    heads = [(s.v0, s.v0 + s.nv)]
    key_size = c.linear_num_key_heads * dk
    qkv = key + _offset(key, key_size) + _offset(value, 2 * key_size)
    if rest in ("in_proj", "conv1d"):
        # fused (Qwen3.5): in_proj parts [q k v | z | b | a], one conv over [q k v];
        # separate (OLMo Hybrid): in_proj parts q, k, v, z, b, a and three convs
        if part is None:                 # the whole conv (or a whole fused in_proj)
            return "rows", qkv
        if rest == "conv1d":             # OLMo Hybrid's q / k / v conv pieces, read whole:
            return "whole", []           # the loader cuts the kernel they join into
        if c.gdn_separate_projections:
            return "rows", (key, key, value, value, heads, heads)[part]
        return "rows", (qkv, value, heads, heads)[part]
    if rest == "out_proj":
        return ("bias", []) if kind == "bias" else ("columns", value)
    if rest == "" and kind in ("dt_bias", "A_log"):
        return "rows", heads
    return "whole", []                    # the per-head norm


def _mamba2(c: DecoderConfig, s: Mamba2Shard, rest: str, kind: str) -> tuple[str, Ranges]:
    p, n = c.mamba_head_dim, c.mamba_state_size
    inner = c.mamba_num_heads * p
    gn = c.mamba_num_groups * n
    x = [(s.h0 * p, (s.h0 + s.nh) * p)]
    bc = [(s.g0 * n, (s.g0 + s.ng) * n)]
    heads = [(s.h0, s.h0 + s.nh)]
    if rest == "in_proj":               # [z | x | B | C | dt]
        return "rows", x + _offset(x, inner) + _offset(bc, 2 * inner) + \
            _offset(bc, 2 * inner + gn) + _offset(heads, 2 * inner + 2 * gn)
    if rest == "conv1d":                # [x | B | C]
        return "rows", x + _offset(bc, inner) + _offset(bc, inner + gn)
    if rest == "norm":
        return "rows", x
    if rest == "out_proj":
        return ("bias", []) if kind == "bias" else ("columns", x)
    if rest == "" and kind in ("dt_bias", "A_log", "D"):
        return "rows", heads
    return "whole", []


def _mamba1(c: DecoderConfig, channels: tuple[int, int], rest: str,
            kind: str) -> tuple[str, Ranges]:
    i0, i1 = channels
    inner = c.mamba_inner_size
    if rest == "in_proj":               # [x | z]
        return "rows", [(i0, i1), (inner + i0, inner + i1)]
    if rest in ("conv1d", "dt_proj"):
        return "rows", [(i0, i1)]
    if rest in ("out_proj", "x_proj"):  # row parallel
        return ("bias", []) if kind == "bias" else ("columns", [(i0, i1)])
    if rest == "" and kind in ("dt_bias", "A_log", "D"):
        return "rows", [(i0, i1)]
    return "whole", []                  # Jamba's dt / B / C norms
