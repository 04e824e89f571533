"""Tensor parallelism for the decoder (Megatron-style) on torch.distributed.

A :class:`TensorParallel` (rank, world size, process group) given to ``CausalLM(tp=...)``
/ ``load_model(tensor_parallel=...)`` builds this rank's shard of the model:

    embed_tokens   vocab-parallel: rank r holds rows [r*Vp, (r+1)*Vp) (Vp = ceil(V/P),
                   zero rows past V); ids outside the range look up zeros; one all-reduce
    qkv_proj       column-parallel: this rank's q heads and kv heads (+ bias rows)
    o_proj         row-parallel: input columns of this rank's q heads; one all-reduce
    gate_up_proj   column-parallel: intermediate rows [r*I/P, (r+1)*I/P) of gate and of up
    down_proj      row-parallel: the same intermediate columns; one all-reduce
    experts        (MoE layers) every rank holds every expert, and of each only the
                   intermediate slice [r*I/P, (r+1)*I/P) (I = moe_intermediate_size):
                   w13 [E, 2I/P, H] (those gate rows, then those up rows), w2 [E, H, I/P]
                   (those columns); GPT-OSS's expert biases: w13_bias [E, 2I/P] (those
                   gate, then up entries), w2_bias [E, H] on rank 0 only (zeros
                   elsewhere: the ops add it before the all-reduce); router ``gate`` and ``shared_expert_gate`` replicated;
                   the shared expert's gate_up_proj / down_proj split like the dense MLP's
                   (over shared_expert_intermediate_size); one all-reduce of experts +
                   shared expert
    lm_head        vocab-parallel rows (a tied one shares the embedding shard); the local
                   logits are all-gathered once and cut back to V
    norms, q/k_norm, rotary   replicated; but OLMo 2 / OLMoE's q / k norms span every head:
                   each rank keeps its heads' slice of their weights and all-reduces one
                   [T, 2] fp32 sum of squares per layer (k's divided by the kv-head
                   replication), so every rank normalizes by the full-width rms

recurrent mixers (hybrid models: Gated DeltaNet, short conv, Mamba-2, Mamba-1)
                   column-parallel in, row-parallel out, each rank its heads / channels
                   and its slice of every state: models/parallel_recurrent.py

KV heads: with Hkv >= P each rank holds Hkv/P of them (its KV cache too); with Hkv < P
(P a multiple of Hkv) each kv head is replicated on P/Hkv ranks, whose q heads all belong
to it. A row-parallel bias is loaded on rank 0 only (zeros elsewhere), so the all-reduce
adds it once.

Int4 GPTQ / AWQ checkpoints: column-parallel parts slice their output columns (act-order
included); row-parallel layers slice K at group boundaries (GPTQ act-order refused there);
a quantized lm_head (GPTQ ``lm_head: true``) takes its vocab rows, zero-padded like the
dense one. Parts a quantizer left dense (Qwen3.5's in_proj_b / in_proj_a beside int4
in_proj_qkv / in_proj_z) are cut as dense tensors, each part by its own rows.

Int4 (RTN on load): column-parallel parts quantize their own rows (exactly the rows of
the unsharded quantization); row-parallel layers quantize their K slice with the group
size of the unsharded layer when it divides the slice (then bit-identical to slicing the
unsharded int4 weight), else the largest power-of-two divisor of the slice (logged).
MoE experts quantize their slices (one group size for H and the rank's I; the unsharded
experts' when it divides the slice); a shared expert quantizes as the dense MLP.

Checkpoint tensors are read as slices (safetensors ``get_slice``): each rank reads only
its rows / columns (an expert's too: per-expert gate_proj / up_proj rows, down_proj
columns; stacked gate_up_proj [E, 2I, H] the gate and up row slices, stacked down_proj
[E, H, I] the column slice). :func:`shard_tensor` says which.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import DecoderConfig
from .parallel_recurrent import check_mixers, mixer_shard

logger = logging.getLogger("minikernels")


@dataclass
class TensorParallel:
    """This process's place in a tensor-parallel group (torch.distributed).

    group None = the default process group. ``size == 1`` is a no-op (for tests).
    """

    rank: int
    size: int
    group: Any = None

    @classmethod
    def from_default_group(cls) -> "TensorParallel":
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized "
                               "(init_process_group first, or use LLM(tensor_parallel_size=N))")
        return cls(dist.get_rank(), dist.get_world_size(), None)

    # ---------------------------------------------------------------- collectives
    def all_reduce(self, x: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: Tensor) -> Tensor:
        """Concatenate every rank's ``x`` along the last dim (rank order)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    # ---------------------------------------------------------------- partitions
    def split(self, n: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of ``n`` (P must divide n)."""
        if n % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide {what} ({n})")
        k = n // self.size
        return self.rank * k, (self.rank + 1) * k

    def vocab_range(self, vocab: int) -> tuple[int, int, int]:
        """(start, stop, padded local size) of this rank's vocab rows."""
        per = -(-vocab // self.size)
        start = min(self.rank * per, vocab)
        return start, min(start + per, vocab), per


def check_config(config: DecoderConfig, tp: TensorParallel) -> None:
    """Refuse shapes this sharding cannot split, naming the numbers."""
    p = tp.size
    if getattr(config, "is_recurrent", False):
        check_mixers(config, p)
    if config.architecture == "gemma3n":
        raise ValueError(f"tensor_parallel_size {p}: Gemma 3n's layers (AltUp streams, "
                         "Gaussian top-k over the whole MLP width) are not sharded; run it "
                         "with tensor_parallel_size=1")
    attends = any(config.has_attention(i) for i in range(config.num_layers))
    if attends and config.num_heads % p:      # (attention-free Mamba: no heads to split)
        raise ValueError(f"tensor_parallel_size {p} must divide num_attention_heads "
                         f"({config.num_heads})")
    for kv in sorted({config.layer_kv_heads(i) for i in range(config.num_layers)
                      if config.has_attention(i)}):   # (Gemma 4: full layers' own)
        if (kv >= p and kv % p) or (kv < p and p % kv):
            raise ValueError(f"tensor_parallel_size {p} and num_key_value_heads ({kv}): "
                             "one must divide the other")
    sizes = []
    if any(config.has_mlp(i) and not config.is_moe(i)
           for i in range(config.num_layers)):   # a dense MLP
        sizes.append(("intermediate_size", config.intermediate_size))
    if config.num_experts:   # each expert's (and the shared expert's) intermediate dim
        sizes += [("moe_intermediate_size", config.moe_intermediate_size),
                  ("shared_expert_intermediate_size", config.shared_expert_intermediate_size)]
    for what, n in sizes:
        if n % p:
            raise ValueError(f"tensor_parallel_size {p} must divide {what} ({n})")


@dataclass(frozen=True)
class AttentionShard:
    """This rank's heads: q heads [q0, q0+nq), kv heads [kv0, kv0+nkv)."""

    q0: int
    nq: int
    kv0: int
    nkv: int


def attention_shard(config: DecoderConfig, tp: TensorParallel | None,
                    layer: int | None = None) -> AttentionShard:
    """This rank's q / kv heads (of ``layer``'s kv heads: Gemma 4's full layers have
    their own)."""
    c = config
    kv = c.num_kv_heads if layer is None else c.layer_kv_heads(layer)
    if tp is None or tp.size == 1:
        return AttentionShard(0, c.num_heads, 0, kv)
    nq = c.num_heads // tp.size
    if kv >= tp.size:
        nkv = kv // tp.size
        return AttentionShard(tp.rank * nq, nq, tp.rank * nkv, nkv)
    replicas = tp.size // kv                  # ranks sharing one kv head
    return AttentionShard(tp.rank * nq, nq, tp.rank // replicas, 1)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table; forward all-reduces over the group.

    ``weight`` [Vp, H] holds vocab rows [start, start + Vp) (zeros past the vocab).
    """

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.start, self.stop, per = tp.vocab_range(vocab)
        self.weight = nn.Parameter(torch.zeros(per, hidden, dtype=dtype, device=device),
                                   requires_grad=False)
        self.__dict__["tp"] = tp

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (ids < self.start) | (ids >= self.stop)
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(h)


# ------------------------------------------------------------------- checkpoint shards
_COLUMN = ("qkv_proj", "gate_up_proj")
_ROW = ("o_proj", "down_proj")


def _rows(obj: Any, start: int, stop: int) -> Tensor:
    return obj[start:stop]


def _shape(src: Any) -> list[int]:
    """A tensor's or a safetensors slice's shape."""
    return list(src.get_shape()) if hasattr(src, "get_shape") else list(src.shape)


def _read(src: Any) -> Tensor:
    """The whole tensor of a safetensors slice (or a tensor as is)."""
    return src if isinstance(src, Tensor) else src[...]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad])


def mlp_intermediate_size(config: DecoderConfig, module: str) -> tuple[int, str]:
    """(size, config field) of the intermediate dim a gate_up_proj / down_proj module
    splits: a Qwen2-MoE shared expert's, or the dense MLP's (its layer's: Gemma 4's
    KV-sharing layers have double-wide MLPs)."""
    if ".shared_expert." in module:
        return config.shared_expert_intermediate_size, "shared_expert_intermediate_size"
    layer = layer_of(module)
    if layer is not None and config.layer_intermediate_sizes is not None:
        return config.layer_intermediate_size(layer), f"layer {layer}'s intermediate_size"
    return config.intermediate_size, "intermediate_size"


def layer_of(module: str) -> int | None:
    """The decoder layer a module name ("layers.N. ...") belongs to, if any."""
    m = _LAYER_RE.match(module)
    return int(m.group(1)) if m else None


_LAYER_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")


def _mlp_split(config: DecoderConfig, tp: TensorParallel, module: str) -> tuple[int, int]:
    return tp.split(*mlp_intermediate_size(config, module))


def _expert_shard(config: DecoderConfig, tp: TensorParallel, module: str, shard: int | None,
                  kind: str, src: Any) -> Tensor:
    """This rank's intermediate slice [s0, s1) of an expert tensor (I = moe_intermediate_size).

    One expert (``shard`` = its index): gate_proj / up_proj [I, H] -> rows [s0, s1);
    down_proj [H, I] -> columns [s0, s1); an int4 checkpoint's tensors of one expert
    (kind "<proj>:<tensor>", GPTQ / AWQ / compressed-tensors) as the dense layers': gate /
    up output rows [s0, s1), down K [s0, s1) at group boundaries. Every expert stacked (``shard`` None; also the
    parameters ``w13`` / ``w2`` themselves): gate_up_proj / w13 [E, 2I, H] -> gate rows
    [s0, s1) then up rows [I+s0, I+s1), [E, 2I/P, H]; down_proj / w2 [E, H, I] ->
    [E, H, I/P].
    """
    i = config.moe_intermediate_size
    s0, s1 = tp.split(i, "moe_intermediate_size")
    one = shard is not None
    if one and ":" in kind:         # an fp8 scale / int4 tensor of one expert's projection
        proj, tkind = kind.split(":")
        if tkind in _FP8_KINDS:
            return _fp8_scale_shard(config, module, tkind, src, s0, s1,
                                    along_n=proj != "down_proj")
        if proj == "down_proj":     # row parallel: K = I cut at group boundaries
            return _int4_k_slice(config, module, tkind, src, s0, s1)
        return _int4_columns(config, module, tkind, src, s0, s1)   # gate / up rows
    if not one and kind in ("w13_bias", "w2_bias"):   # GPT-OSS's expert biases
        t = _read(src)
        if kind == "w2_bias":     # [E, H], added before the all-reduce: on rank 0 only
            return t if tp.rank == 0 else torch.zeros_like(t)
        rows = 2 * i if config.moe_gated_experts else i
        if t.dim() != 2 or t.shape[1] != rows:
            raise ValueError(f"{module}: w13_bias of shape {list(t.shape)} should have "
                             f"{rows} along dim 1 (moe_intermediate_size {i})")
        if not config.moe_gated_experts:
            return t[:, s0:s1]
        return torch.cat([t[:, s0:s1], t[:, i + s0:i + s1]], dim=1)   # gate, then up
    # kind -> the dim that holds the intermediate (and its full length there)
    if one and kind in ("gate_proj", "up_proj"):
        dim, full = 0, i
    elif one and kind == "down_proj":
        dim, full = 1, i
    elif not one and kind in ("gate_up_proj", "w13", "up_proj") and not config.moe_gated_experts:
        dim, full = 1, i                   # non-gated experts (Nemotron 3): up rows only
    elif not one and kind in ("gate_up_proj", "w13"):
        dim, full = 1, 2 * i
    elif not one and kind in ("down_proj", "w2"):
        dim, full = 2, i
    else:
        raise ValueError(f"{module}: expert tensor {kind!r} cannot be sharded")
    shape = _shape(src)
    if len(shape) != (2 if one else 3) or shape[dim] != full:
        raise ValueError(f"{module}: {kind} of shape {shape} should have {full} along dim "
                         f"{dim} (moe_intermediate_size {i})")
    if dim == 0:
        return src[s0:s1]
    if dim == 2:
        return src[:, :, s0:s1]
    if one or not config.moe_gated_experts:
        return src[:, s0:s1]
    return torch.cat([src[:, s0:s1], src[:, i + s0:i + s1]], dim=1)   # gate rows, up rows


def shard_tensor(config: DecoderConfig, tp: TensorParallel, module: str, shard: int | None,
                 kind: str, src: Any) -> Tensor:
    """This rank's piece of a checkpoint tensor, read from ``src``.

    src: a safetensors slice (``safe_open(...).get_slice(name)``: only the indexed rows /
    columns are read) or a tensor. module / shard / kind: as :func:`loader.map_name`
    returns them (also a parameter's own name as kind, for built-in weights: ``w13`` /
    ``w2`` of the experts). Expert tensors: :func:`_expert_shard`. Unknown or replicated
    tensors are read whole.
    """
    leaf = module.rsplit(".", 1)[-1]
    c = config
    layer = layer_of(module)
    head_dim = c.head_dim if layer is None else c.layer_head_dim(layer)
    if leaf == "experts" and c.num_experts:
        return _expert_shard(c, tp, module, shard, kind, src)
    if kind == "weight" and leaf in ("q_norm", "k_norm") and c.qk_norm_full:
        a = attention_shard(c, tp)         # OLMo 2's norms over all heads: this rank's heads
        first, n = (a.q0, a.nq) if leaf == "q_norm" else (a.kv0, a.nkv)
        return _rows(src, first * c.head_dim, (first + n) * c.head_dim)
    if kind in ("weight", "bias") and leaf in ("embed_tokens", "lm_head"):
        start, stop, per = tp.vocab_range(c.vocab_size)
        return _pad_rows(_rows(src, start, stop), per)
    if leaf == "lm_head" and kind in _QUANT_KINDS + ("weight_scale",) and \
            _int4_checkpoint(c):          # GPTQ lm_head=True, compressed-tensors' un-ignored
        return _vocab_int4_rows(c, tp, module, kind, src)
    if leaf == "act_fn":                 # Apertus's xIELU scalars: every rank's
        return _read(src)
    if leaf == "fc2_latent_proj" and kind == "bias":   # (Nemotron 3: maps partial sums)
        return _row_piece(c, tp, module, kind, src, 0, 0)
    if kind == "sinks":                  # one per q head: this rank's heads
        a = attention_shard(c, tp)
        return _read(src).reshape(-1)[a.q0:a.q0 + a.nq]
    if kind in ("k_scale", "v_scale"):
        t = _read(src)
        kv = c.num_kv_heads if layer is None else c.layer_kv_heads(layer)
        if t.numel() == kv and t.numel() > 1:
            a = attention_shard(c, tp, layer)
            return t.reshape(-1)[a.kv0:a.kv0 + a.nkv]
        return t
    cut = mixer_shard(c, tp.rank, tp.size, module, shard, kind) or \
        _zamba_adapter_cut(c, tp, module, kind)
    if cut is not None:                  # a recurrent mixer's (parallel_recurrent.py)
        return _cut(c, tp, module, kind, src, *cut)
    if leaf in _COLUMN or module.endswith("self_attn.g_proj"):
        if leaf == "qkv_proj":
            a = attention_shard(c, tp, layer)
            first, n = (a.q0, a.nq) if shard == 0 else (a.kv0, a.nkv)
            # (Qwen3.5's q part holds [q | gate] per head: 2 head_dim rows each)
            per = head_dim * (2 if shard == 0 and c.attn_output_gate else 1)
            start, stop = first * per, (first + n) * per
        elif leaf == "g_proj":           # LFM3's per-head gate: a row per q head
            a = attention_shard(c, tp)
            start, stop = a.q0, a.q0 + a.nq
        else:
            start, stop = _mlp_split(c, tp, module)
        return _column_piece(c, module, kind, src, start, stop)
    if leaf in _ROW:
        if leaf == "o_proj":
            a = attention_shard(c, tp)
            start, stop = a.q0 * head_dim, (a.q0 + a.nq) * head_dim
        else:
            start, stop = _mlp_split(c, tp, module)
        return _row_piece(c, tp, module, kind, src, start, stop)
    if kind in _QUANT_KINDS or kind in _FP8_KINDS:
        raise ValueError(f"{module}: quantized tensor {kind} of a replicated module cannot "
                         "be sharded")
    return _read(src)          # replicated (norms, routers and their biases, ...)


def _zamba_adapter_cut(config: DecoderConfig, tp: TensorParallel, module: str,
                       kind: str) -> tuple[str, list[tuple[int, int]]] | None:
    """Zamba2's per-layer adapters on its shared block: the B's rows follow the block's q
    / k / v heads and gate_up slice (the A's are replicated)."""
    if ".zamba_adapters." not in module or kind == "bias":
        return None
    leaf = module.rsplit(".", 1)[-1]
    a, d = attention_shard(config, tp), config.head_dim
    if leaf == "q_b":
        return "rows", [(a.q0 * d, (a.q0 + a.nq) * d)]
    if leaf in ("k_b", "v_b"):
        return "rows", [(a.kv0 * d, (a.kv0 + a.nkv) * d)]
    if leaf == "gate_up_b":
        i = config.intermediate_size
        s0, s1 = tp.split(i, "intermediate_size")
        return "rows", [(s0, s1), (i + s0, i + s1)]
    return "whole", []


def parallel_style(config: DecoderConfig, module: str) -> str | None:
    """"column" or "row" for a module's projection under tensor parallel (how LoRA's B
    rows or A columns are cut), None when it is replicated."""
    leaf = module.rsplit(".", 1)[-1]
    cut = mixer_shard(config, 0, 1, module, 0, "weight")
    if cut is not None:
        return {"rows": "column", "columns": "row"}.get(cut[0])
    if leaf in _COLUMN or module.endswith("self_attn.g_proj"):
        return "column"
    return "row" if leaf in _ROW else None


#: quantized checkpoints' tensors beside (or instead of) a dense ``weight``
_QUANT_KINDS = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_g_idx")


def _column_piece(config: DecoderConfig, module: str, kind: str, src: Any, start: int,
                  stop: int) -> Tensor:
    """Output rows [start, stop) of a column-parallel layer's tensor of ``kind``."""
    if kind in _FP8_KINDS:
        return _fp8_scale_shard(config, module, kind, src, start, stop, along_n=True)
    if kind not in ("weight", "bias"):
        return _int4_columns(config, module, kind, src, start, stop)
    return _rows(src, start, stop)


def _row_piece(config: DecoderConfig, tp: TensorParallel, module: str, kind: str, src: Any,
               start: int, stop: int) -> Tensor:
    """Input columns [start, stop) of a row-parallel layer's tensor of ``kind`` (its bias
    on rank 0 only: the all-reduce adds it once)."""
    if kind in _FP8_KINDS:
        return _fp8_scale_shard(config, module, kind, src, start, stop, along_n=False)
    if kind not in ("weight", "bias"):
        return _int4_k_slice(config, module, kind, src, start, stop)
    if kind == "bias":
        t = _read(src)
        return t if tp.rank == 0 else torch.zeros_like(t)
    return src[:, start:stop]


def _cut(config: DecoderConfig, tp: TensorParallel, module: str, kind: str, src: Any,
         how: str, ranges: list[tuple[int, int]]) -> Tensor:
    """A recurrent mixer's tensor cut as :func:`mixer_shard` says: rows in several ranges
    (each section of a fused projection) concatenated, quantized tensors' pieces joined
    along the axis their rows sit on; one range of columns."""
    if how == "whole":
        return _read(src)
    if how == "bias":
        return _row_piece(config, tp, module, "bias", src, 0, 0)
    if how == "columns":
        (start, stop), = ranges
        return _row_piece(config, tp, module, kind, src, start, stop)
    if kind not in _FP8_KINDS and kind not in _QUANT_KINDS:   # dense rows (and parameters)
        return torch.cat([_read(_rows(src, a, b)) for a, b in ranges])
    full = _shape(src)
    pieces = [_column_piece(config, module, kind, src, a, b) for a, b in ranges]
    differs = [d for d in range(len(full)) if pieces[0].shape[d] != full[d]]
    if not differs:                      # a tensor every rank keeps whole (g_idx, ...)
        return pieces[0]
    return torch.cat(pieces, dim=differs[0])


#: an fp8 (or int8 W8A8) checkpoint's scale tensors (the ``weight`` itself shards as a
#: dense one); input_zero_point: asymmetric int8 activations' static zero point
_FP8_KINDS = ("weight_scale_inv", "weight_scale", "input_scale", "input_scale_ub",
              "input_zero_point")


def _fp8_scale_shard(config: DecoderConfig, module: str, kind: str, src: Any, start: int,
                     stop: int, along_n: bool) -> Tensor:
    """This rank's scales of an fp8 (or int8 W8A8) layer whose weight keeps rows
    (``along_n``: column parallel) or columns (row parallel) [start, stop): block scales
    cut at block boundaries (refused by name when the shard does not fall on them),
    per-channel scales by rows, per-tensor and activation scales whole."""
    from ..quant.fp8 import fp8_scheme
    from ..quant.int8 import int8_scheme

    int8 = int8_scheme(config.quantization_config or {})
    if int8 is not None:
        # int8: weight_scale [N, 1] per channel (rows with the weight's rows; whole for a
        # row-parallel layer), [N, K / G] per group (weight-only: also this rank's K
        # groups), or one value; input_scale / input_zero_point one value
        t = _read(src)
        if kind != "weight_scale" or t.numel() == 1:
            return t
        if along_n:
            return t[start:stop]
        if int8["strategy"] == "group":
            g = int8["group_size"]
            if start % g or stop % g:
                raise ValueError(f"{module}: the per-rank K slice [{start}, {stop}) does not "
                                 f"fall on int8 group boundaries (group_size {g}); use a "
                                 "smaller tensor_parallel_size")
            return t[:, start // g:stop // g]
        return t
    scheme = fp8_scheme(config.quantization_config or {})
    if scheme is None or (kind == "weight_scale" and scheme["scale"] != kind):
        if kind == "weight_scale":      # compressed-tensors int4's weight_scale
            return (_int4_columns if along_n else _int4_k_slice)(config, module, kind, src,
                                                                 start, stop)
        raise ValueError(f"{module}: {kind} without an fp8 quantization_config")
    if kind in ("input_scale", "input_scale_ub", "input_zero_point") or \
            scheme["strategy"] == "tensor":
        return _read(src)
    if scheme["strategy"] == "channel":
        return _rows(src, start, stop) if along_n else _read(src)
    bn, bk = scheme["block_size"]
    b = bn if along_n else bk
    full = _shape(src)[0 if along_n else 1] * b         # the unsharded size, rounded up
    if start % b or (stop % b and stop < full - b + 1):
        raise ValueError(f"{module}: the per-rank {'rows' if along_n else 'columns'} "
                         f"[{start}, {stop}) do not fall on fp8 block boundaries (block "
                         f"{b}); use a smaller tensor_parallel_size")
    b0, b1 = start // b, -(-stop // b)
    return _rows(src, b0, b1) if along_n else src[:, b0:b1]


# GPTQ: qweight [K/8, N], qzeros [K/G, N/8], scales [K/G, N], g_idx [K]
# AWQ:  qweight [K, N/8],  qzeros [K/G, N/8], scales [K/G, N]
def _quant(config: DecoderConfig, module: str) -> tuple[str, int, int]:
    """(method, group size; -1 = one group per output channel, values per packed int32
    word: 8 for 4-bit, 4 for 8-bit) of an int4 / weight-only int8 checkpoint."""
    qc = config.quantization_config or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        from ..quant import compressed_tensors_scheme

        scheme = compressed_tensors_scheme(qc)
        return method, scheme["group_size"], 32 // scheme["bits"]
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method not in ("gptq", "awq") or (group <= 0 and group != -1):
        raise ValueError(f"{module}: int4 tensors with tensor parallel need a GPTQ / AWQ "
                         "quantization_config with a positive group_size (or -1)")
    return method, group, 32 // int(qc.get("bits", qc.get("w_bit", 4)))


def _int4_columns(config: DecoderConfig, module: str, kind: str, src: Any, n0: int,
                  n1: int) -> Tensor:
    """Output rows [n0, n1) of a column-parallel GPTQ / AWQ part (all of K)."""
    method, _, per = _quant(config, module)
    if n0 % per or n1 % per:
        raise ValueError(f"{module}: quantized shard [{n0}, {n1}) is not a multiple of "
                         f"{per} outputs")
    if kind in ("g_idx", "weight_g_idx"):
        return _read(src)
    if method == "compressed-tensors":   # [N, ...]: output rows first
        return src[n0:n1]
    packed_n = kind == "qzeros" or (kind == "qweight" and method == "awq")
    a, b = (n0 // per, n1 // per) if packed_n else (n0, n1)
    return src[:, a:b]


def _int4_checkpoint(config: DecoderConfig) -> bool:
    """Whether the checkpoint is GPTQ / AWQ / compressed-tensors pack-quantized (not fp8 /
    int8 W8A8, whose ``weight_scale`` is theirs)."""
    qc = config.quantization_config or {}
    method = str(qc.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return True
    return method == "compressed-tensors" and qc.get("format") == "pack-quantized"


def _vocab_int4_rows(config: DecoderConfig, tp: TensorParallel, module: str, kind: str,
                     src: Any) -> Tensor:
    """This rank's vocab rows [start, stop) of a quantized lm_head's tensor of ``kind``,
    padded with zero rows (qweight / zeros / scales 0: weight 0, logits cut off after the
    all-gather) to the rank's padded row count, as the dense vocab-parallel lm_head."""
    start, stop, per = tp.vocab_range(config.vocab_size)
    method, _, pack = _quant(config, module)
    if start % pack or stop % pack or per % pack:
        raise ValueError(f"{module}: the per-rank vocab rows [{start}, {stop}) (padded to "
                         f"{per}) are not whole int32 words of {pack} outputs; a quantized "
                         "lm_head needs vocab_size / tensor_parallel_size to be a multiple "
                         f"of {pack}")
    piece = _int4_columns(config, module, kind, src, start, stop)
    pad = per - (stop - start)
    if kind in ("g_idx", "weight_g_idx") or pad == 0:
        return piece
    if method == "compressed-tensors":          # [N, ...]: output rows first
        axis, n = 0, pad
    else:                                         # [.., N] or [.., N / pack]
        packed_n = kind == "qzeros" or (kind == "qweight" and method == "awq")
        axis, n = 1, (pad // pack if packed_n else pad)
    shape = list(piece.shape)
    shape[axis] = n
    return torch.cat([piece, piece.new_zeros(shape)], dim=axis)


def _int4_k_slice(config: DecoderConfig, module: str, kind: str, src: Any, k0: int,
                  k1: int) -> Tensor:
    """Input columns [k0, k1) of a row-parallel GPTQ / AWQ layer, cut at group boundaries
    (GPTQ act-order is refused: its groups are not contiguous in K)."""
    method, g, per = _quant(config, module)
    per_channel = g == -1
    if per_channel:               # one scale per output channel: every K slice is aligned
        g = k1 - k0
    if k0 % g or k1 % g or k0 % per:
        raise ValueError(f"{module}: the per-rank K slice [{k0}, {k1}) does not fall on "
                         f"int4 group boundaries (group_size {g}); use a smaller "
                         "tensor_parallel_size")
    if kind in ("g_idx", "weight_g_idx"):
        t = src[k0:k1]
        if per_channel:           # every column in group 0
            return t
        want = torch.arange(k0, k1, dtype=torch.int64) // g
        if not torch.equal(t.long(), want):
            raise ValueError(f"{module}: GPTQ act-order (desc_act) on a row-parallel layer "
                             "is not supported with tensor parallel")
        return t - k0 // g
    if method == "compressed-tensors":   # weight_packed [N, K / per], weight_scale [N, K / G]
        if kind == "weight_scale":
            return src[:, k0 // g:k1 // g] if _shape(src)[1] > 1 else _read(src)
        return src[:, k0 // per:k1 // per]
    if kind in ("qzeros", "scales"):
        return _read(src) if per_channel else src[k0 // g:k1 // g]
    if method == "gptq":          # qweight packed along K
        return src[k0 // per:k1 // per]
    return src[k0:k1]


def row_parallel_group_size(module: str, k_full: int, k_local: int, group_size: int) -> int:
    """RTN group size of a row-parallel shard: the unsharded layer's when it divides the
    shard's K (then the shard equals a slice of the unsharded int4 weight)."""
    from .linear import pick_group_size

    g = pick_group_size(k_full, group_size)
    if g == -1 or k_local % g:
        g2 = pick_group_size(k_local, g if g != -1 else group_size)
        logger.info("minikernels: %s: int4 group %d does not divide the per-rank K=%d; "
                    "using group_size %d", module, g, k_local, g2)
        return g2
    return g
