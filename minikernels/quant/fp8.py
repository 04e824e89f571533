"""FP8 (e4m3) weights with block-wise scales: the container, RTN quantization, checkpoints.

Layout (the one :func:`minikernels.ops.fp8_matmul` runs):

    weight  float8_e4m3fn [N, K]
    scale   float32 [ceil(N / bn), ceil(K / bk)],  block_size = (bn, bk)
    W[n, k] = float(weight[n, k]) * scale[n // bn, k // bk]

Per-output-channel scaling is block (1, K) with a [N, 1] scale; a per-tensor scale is
stored as that too (its value repeated: lossless, and parts with different per-tensor
scales then fuse into one matmul).

Checkpoint formats (config.json ``quantization_config``), read by :func:`fp8_scheme`:

- ``quant_method: "fp8"`` with ``weight_block_size: [bn, bk]`` (DeepSeek-V3,
  Qwen/Qwen3-*-FP8): ``weight`` + ``weight_scale_inv`` [ceil(N/bn), ceil(K/bk)] (it
  multiplies, despite its name);
- ``quant_method: "fp8"`` without a block size (vLLM's / transformers' serialized
  per-tensor fp8): ``weight`` + ``weight_scale`` (one value);
- compressed-tensors (llm-compressor's FP8, FP8_DYNAMIC, FP8_BLOCK schemes): 8-bit float
  weights with strategy ``tensor`` / ``channel`` / ``block`` (``block_structure``):
  ``weight`` + ``weight_scale`` ([1], [N, 1] or the block grid);
- ``quant_method: "fbgemm_fp8"`` (Meta's FP8 Llama 3.1 checkpoints): ``weight`` +
  ``weight_scale`` [N, 1] per output channel.

Activations stay in the model's dtype (W8A16): an ``input_scale`` (static activation
quantization) or ``input_scale_ub`` (fbgemm's bound on dynamic ones) is not needed and is
ignored, whatever the ``activation_scheme``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
# Rows per quantize call: bounds the fp32 temporaries for a 128k-row lm_head.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Fp8Weight:
    """An fp8 weight [N, K] with fp32 block scales (module docstring)."""

    weight: Tensor
    scale: Tensor
    block_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.block_size = (int(self.block_size[0]), int(self.block_size[1]))
        if self.weight.dtype != FP8_DTYPE or self.weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor, got "
                             f"{self.weight.dtype} {list(self.weight.shape)}")
        n, k = self.weight.shape
        bn, bk = self.block_size
        if bn <= 0 or bk <= 0:
            raise ValueError(f"block_size must be positive, got {list(self.block_size)}")
        grid = [-(-n // bn), -(-k // bk)]
        if list(self.scale.shape) != grid:
            raise ValueError(f"scale must have shape {grid} for weight {[n, k]} and block "
                             f"{list(self.block_size)}, got {list(self.scale.shape)}")
        if self.scale.dtype != torch.float32:
            self.scale = self.scale.float()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])

    def dequantize(self) -> Tensor:
        """W [N, K] fp32."""
        from ..ops import reference

        return reference.dequantize_fp8(self.weight, self.scale, self.block_size)

    def with_row_blocks_of_one(self) -> "Fp8Weight":
        """The same weight with bn = 1 (each block's scale repeated over its rows):
        lossless, and any N then concatenates with other parts."""
        bn, bk = self.block_size
        if bn == 1:
            return self
        scale = self.scale.repeat_interleave(bn, dim=0)[:self.shape[0]].contiguous()
        return Fp8Weight(self.weight, scale, (1, bk))


def quantize_fp8(w: Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK) -> Fp8Weight:
    """RTN fp8 of ``w`` [N, K] (any float dtype) with one scale per (bn, bk) block:
    scale = amax / 448, stored = clamp(w / scale, +-448) rounded to nearest even.

    Runs on ``w``'s device in row chunks (whole row blocks), bit-identical to one call.
    """
    from ..ops import reference

    bn, bk = int(block_size[0]), int(block_size[1])
    n, k = w.shape
    rows = max(bn, (_CHUNK_ELEMENTS // max(k, 1)) // bn * bn)
    if n <= rows:
        q, s = reference.quantize_fp8(w, (bn, bk))
        return Fp8Weight(q, s, (bn, bk))
    chunks = [reference.quantize_fp8(w[i:i + rows], (bn, bk)) for i in range(0, n, rows)]
    return Fp8Weight(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]),
                     (bn, bk))


def fp8_scheme(qc: dict[str, Any]) -> dict[str, Any] | None:
    """The fp8 weight scheme of a ``quantization_config``, or None when it is not fp8.

    Returns {"method": "fp8" | "fbgemm_fp8" | "compressed-tensors", "strategy": "block" |
    "channel" | "tensor", "block_size": (bn, bk) or None, "scale": the scale tensor's
    name}.
    ValueError naming what is not supported.
    """
    method = str(qc.get("quant_method", "")).lower()
    if method == "fbgemm_fp8":
        return {"method": method, "strategy": "channel", "block_size": None,
                "scale": "weight_scale"}
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"fp8 fmt {fmt!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        if block is None:
            return {"method": method, "strategy": "tensor", "block_size": None,
                    "scale": "weight_scale"}
        return {"method": method, "strategy": "block", "block_size": _block(block),
                "scale": "weight_scale_inv"}
    if method != "compressed-tensors":
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    schemes = set()
    for name, group in groups.items():
        w = (group or {}).get("weights") or {}
        if w.get("type") != "float":
            return None                       # an int scheme: the int4 importer's job
        if w.get("num_bits") != 8:
            raise ValueError(f"config_groups.{name}: {w.get('num_bits')}-bit float weights "
                             "are not supported (only 8-bit e4m3)")
        if not w.get("symmetric", True):
            raise ValueError(f"config_groups.{name}: asymmetric fp8 weights are not supported")
        strategy = w.get("strategy")
        if strategy == "block":
            schemes.add(("block", _block(w.get("block_structure"))))
        elif strategy in ("channel", "tensor"):
            schemes.add((strategy, None))
        else:
            raise ValueError(f"config_groups.{name}: fp8 strategy {strategy!r} is not "
                             "supported (tensor, channel, block)")
    if len(schemes) != 1:
        raise ValueError(f"config_groups use several fp8 schemes {sorted(map(str, schemes))}")
    strategy, block = schemes.pop()
    return {"method": method, "strategy": strategy, "block_size": block,
            "scale": "weight_scale"}


def _block(block: Any) -> tuple[int, int]:
    if not isinstance(block, (list, tuple)) or len(block) != 2 or \
            not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"fp8 weight block size must be two positive ints, got {block!r}")
    if block[1] % 16:
        raise ValueError(f"fp8 weight block size {list(block)}: the K block must be a "
                         "multiple of 16")
    return int(block[0]), int(block[1])


def fp8_from_checkpoint(weight: Tensor, scale: Tensor, scheme: dict[str, Any]) -> Fp8Weight:
    """One layer's checkpoint tensors (fp8 ``weight`` [N, K] and its scale, shaped as
    :func:`fp8_scheme` says) -> an :class:`Fp8Weight`, losslessly."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    n, k = weight.shape
    scale = scale.float()
    strategy = scheme["strategy"]
    if strategy == "block":
        return Fp8Weight(weight, scale.reshape(scale.shape[0], -1) if scale.dim() == 2
                         else scale, scheme["block_size"])
    if strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"a per-tensor scale has one value, got {list(scale.shape)}")
        return Fp8Weight(weight, scale.reshape(1, 1).expand(n, 1).contiguous(), (1, k))
    if scale.numel() != n:
        raise ValueError(f"a per-channel scale has N = {n} values, got {list(scale.shape)}")
    return Fp8Weight(weight, scale.reshape(n, 1).contiguous(), (1, k))


def merge_fp8(parts: list[Fp8Weight]) -> list[Fp8Weight]:
    """Fuse parts stacked along N (q / k / v, gate / up) into as few weights as possible.

    Parts fuse when they share the K block; their row blocks stay as they are when every
    part but the last fills whole row blocks of one size, else each goes to bn = 1.
    """
    groups: list[list[Fp8Weight]] = []
    for p in parts:
        if groups and groups[-1][0].block_size[1] == p.block_size[1]:
            groups[-1].append(p)
        else:
            groups.append([p])
    out = []
    for g in groups:
        bn = g[0].block_size[0]
        if any(p.block_size[0] != bn for p in g) or \
                any(p.shape[0] % bn for p in g[:-1]):
            g = [p.with_row_blocks_of_one() for p in g]
            bn = 1
        if len(g) == 1:
            out.append(g[0])
        else:
            out.append(Fp8Weight(torch.cat([p.weight for p in g]),
                                 torch.cat([p.scale for p in g]), (bn, g[0].block_size[1])))
    return out
