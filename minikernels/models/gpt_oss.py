"""GPT-OSS checkpoints (``GptOssForCausalLM``: openai/gpt-oss-20b / 120b) -> the decoder's
tensors. The model itself is the shared decoder (models/decoder.py: attention with biases
and a sink per head, sliding / full layers, YaRN) with models/moe.py's experts
(``moe_router_bias``, ``moe_expert_biases``, activation "swigluoai"); this module only
translates what GPT-OSS stores differently.

Dense tensors (transformers' GptOssExperts, bf16 checkpoints; :func:`convert_dense`):

    mlp.router.weight [E, H], .bias [E]   -> mlp.gate.weight / .bias (the renaming is the
                                             loader's ``_family_name``)
    mlp.experts.gate_up_proj  [E, H, 2I]  x @ W layout (transposed against nn.Linear), gate
                                          and up INTERLEAVED along the last dim (gate =
                                          [..., 0::2], up = [..., 1::2])
                              -> [E, 2I, H]: transposed, gate rows then up rows (the
                                 decoder's stacked ``gate_up_proj`` / w13 layout)
    mlp.experts.gate_up_proj_bias [E, 2I] interleaved -> mlp.experts.w13_bias [E, 2I]
                                          (gate biases, then up biases)
    mlp.experts.down_proj     [E, I, H]   -> [E, H, I] (w2's layout)
    mlp.experts.down_proj_bias [E, H]     -> mlp.experts.w2_bias
    self_attn.sinks [Hq]                  as Granite SWA's (the loader's sinks)

MXFP4 checkpoints (``quantization_config: {"quant_method": "mxfp4", ...}``, the official
releases; :class:`Mxfp4Experts`): the expert weights are stored as
``<proj>_blocks`` uint8 [E, N, K / 32, 16] and ``<proj>_scales`` uint8 [E, N, K / 32]
(proj gate_up_proj: N = 2I interleaved rows, K = H; down_proj: N = H, K = I). Each
32-value block along K is 16 bytes of packed FP4 (e2m1) codes, the even element k = 2b in
byte b's low nibble and the odd one k = 2b + 1 in its high nibble, and one shared E8M0
scale byte s: value = FP4_E2M1[code] * 2 ** (s - 127). Everything else in such a
checkpoint (attention, router, embeddings, lm_head: the config's
``modules_to_not_convert``) is stored dense.

By default (``load_model(quantization=None)`` or ``"mxfp4"``) the experts stay MXFP4
(:class:`Mxfp4Experts` with ``native=True``): the blocks / scales bytes are kept as
stored, only w13's rows permuted from the interleaved gate / up order to gate rows then
up rows (:func:`mxfp4_native`; no dequantization), and each layer runs
``ops.fused_moe_mxfp4`` (models/moe.py ``FusedExperts.set_mxfp4_``): ~4.25 bits per
expert weight (12.8 GB of gpt-oss-20b's experts instead of 42 GB in bf16). Under tensor
parallel each rank keeps its I/P rows of every w13 (gate and up) and its I/P columns
(I/P/32 blocks) of every w2 (:func:`shard_mxfp4`; I/P must be a multiple of 32).
``quantization="dense"`` dequantizes them on load to the model dtype instead (what
transformers does without its Triton kernels), one expert at a time in vectorised torch,
into the dense tensors above (then converted like them); ``quantization="int4"`` /
``"fp8"`` / ``"int8"`` dequantize and RTN-quantize them the same way.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

#: the 16 FP4 (e2m1) code points, by 4-bit code (bit 3 the sign): OCP MX's table
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: E8M0 scale bias: a scale byte s means 2 ** (s - 127)
MXFP4_SCALE_BIAS = 127
#: values per MXFP4 block (one scale each): 16 bytes of two codes
MXFP4_BLOCK = 32

def mxfp4_checkpoint(config: Any) -> bool:
    """Whether ``config`` (a DecoderConfig) is a GPT-OSS MXFP4 checkpoint's (the official
    releases: quantization_config quant_method "mxfp4"): its experts are built empty and
    filled by the loader (native MXFP4, or dense / RTN from their dequantization)."""
    qc = getattr(config, "quantization_config", None) or {}
    return getattr(config, "architecture", None) == "gpt_oss" and \
        str(qc.get("quant_method", "")).lower() == "mxfp4"


class Mxfp4Stack(NamedTuple):
    """One stored MXFP4 expert stack, blocks uint8 [E, N, K/32, 16] and scales uint8
    [E, N, K/32], as the checkpoint holds it (gate_up_proj's rows interleaved)."""
    blocks: Tensor
    scales: Tensor


def mxfp4_native(proj: str, stack: Mxfp4Stack) -> Mxfp4Stack:
    """A stored stack in ``ops.fused_moe_mxfp4``'s layout: gate_up_proj's rows
    de-interleaved (gate rows, then up rows; the uint8 rows permuted, nothing decoded),
    down_proj as it is. Checks the 4-D / 3-D shapes and the dtypes."""
    blocks, scales = stack
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != MXFP4_BLOCK // 2 or scales.dim() != 3 or \
            tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 experts must be blocks [E, N, K/32, 16] and scales "
                         f"[E, N, K/32], got {list(blocks.shape)} and {list(scales.shape)}")
    if proj == "gate_up_proj":
        return Mxfp4Stack(deinterleave(blocks, 1), deinterleave(scales, 1))
    return Mxfp4Stack(blocks, scales)


def shard_mxfp4(proj: str, stack: Mxfp4Stack, rank: int, size: int) -> Mxfp4Stack:
    """Tensor-parallel rank ``rank``'s slice of a native stack (:func:`mxfp4_native`'s
    layout): gate_up_proj [E, 2I, ...] -> its I/P gate rows then its I/P up rows;
    down_proj [E, H, I/32, 16] -> its I/P columns, (I/P)/32 whole blocks. ValueError
    unless I/P is a multiple of 32 (a block must not straddle ranks)."""
    blocks, scales = stack
    inter = blocks.shape[1] // 2 if proj == "gate_up_proj" else blocks.shape[2] * MXFP4_BLOCK
    if inter % size or (inter // size) % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 experts under tensor parallel need I / tp_size to be a "
                         f"multiple of {MXFP4_BLOCK} (whole blocks per rank): I = {inter}, "
                         f"tp_size = {size}")
    local = inter // size
    if proj == "gate_up_proj":
        rows = torch.cat([torch.arange(rank * local, (rank + 1) * local),
                          torch.arange(inter + rank * local, inter + (rank + 1) * local)])
        rows = rows.to(blocks.device)
        return Mxfp4Stack(blocks.index_select(1, rows), scales.index_select(1, rows))
    nb = local // MXFP4_BLOCK
    return Mxfp4Stack(blocks[:, :, rank * nb:(rank + 1) * nb].contiguous(),
                      scales[:, :, rank * nb:(rank + 1) * nb].contiguous())


#: a GPT-OSS expert tensor, dense (transformers' names) or MXFP4 (blocks / scales)
_EXPERTS_RE = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)"
                         r"(_bias|_blocks|_scales)?$")


def deinterleave(t: Tensor, dim: int = -1) -> Tensor:
    """GPT-OSS's interleaved gate / up along ``dim`` ([g0, u0, g1, u1, ...]) -> the gate
    half then the up half ([g0, g1, ..., u0, u1, ...]); a new tensor, any dtype / device
    (meta too)."""
    n = t.shape[dim]
    if n % 2:
        raise ValueError(f"interleaved gate / up must have an even size along dim {dim}, "
                         f"got {list(t.shape)}")
    return torch.cat([_every_other(t, dim, 0), _every_other(t, dim, 1)], dim=dim)


def _every_other(t: Tensor, dim: int, start: int) -> Tensor:
    """t's elements start, start + 2, ... along ``dim`` (a strided view)."""
    index = [slice(None)] * t.dim()
    index[dim] = slice(start, None, 2)
    return t[tuple(index)]


def convert_dense(name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
    """One dense GPT-OSS tensor under the decoder's name and layout (the module
    docstring's table): ``...mlp.experts.gate_up_proj`` [E, H, 2I] -> [E, 2I, H] (gate
    rows, then up rows), ``down_proj`` [E, I, H] -> [E, H, I], ``gate_up_proj_bias`` ->
    ``w13_bias`` (de-interleaved), ``down_proj_bias`` -> ``w2_bias``; anything else as it
    is. Shapes are checked against the stacked layout (3-D / 2-D) only; the loader checks
    the sizes. Meta tensors pass (shape checks without data)."""
    m = _EXPERTS_RE.match(name)
    if m is None:
        yield name, tensor
        return
    prefix, proj, suffix = m.groups()
    if suffix in ("_blocks", "_scales"):
        raise ValueError(f"{name}: an MXFP4 tensor outside an mxfp4 checkpoint (config.json "
                         "has no quantization_config with quant_method 'mxfp4')")
    if not isinstance(tensor, Tensor):
        tensor = tensor[...]              # (a safetensors slice: read it whole)
    if suffix == "_bias":
        if tensor.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [num_experts, N] bias, got "
                             f"{list(tensor.shape)}")
        if proj == "gate_up_proj":
            yield prefix + "w13_bias", deinterleave(tensor, 1)
        else:
            yield prefix + "w2_bias", tensor
        return
    if tensor.dim() != 3:
        raise ValueError(f"{name}: expected GPT-OSS's stacked [num_experts, in, out] "
                         f"experts, got {list(tensor.shape)}")
    weight = tensor.transpose(1, 2)       # [E, out, in]: nn.Linear rows
    if proj == "gate_up_proj":
        weight = deinterleave(weight, 1)
    yield prefix + proj, weight


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """MXFP4 -> dense: blocks uint8 [..., G, 16] (two FP4 codes per byte, the lower index
    in the low nibble), scales uint8 [..., G] (E8M0, bias 127) -> [..., G * 32] in
    ``dtype``: FP4_E2M1_VALUES[code] * 2 ** (scale - 127), computed in fp32 (exact: a code
    times a power of two) and rounded once to ``dtype`` (exact in bf16 / fp32 unless it
    under- / overflows the dtype's range). On blocks' device; vectorised."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.dim() < 1 or blocks.shape[-1] != MXFP4_BLOCK // 2 or \
            tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks [..., G, 16] and scales [..., G] do not match: "
                         f"blocks {list(blocks.shape)}, scales {list(scales.shape)}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1)        # [..., G, 16, 2]
    values = lut[codes.long()].flatten(-2)                            # [..., G, 32]
    exps = scales.to(torch.int32) - MXFP4_SCALE_BIAS
    values = torch.ldexp(values, exps.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def mxfp4_expert_weight(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """A stored MXFP4 expert stack (blocks [E, N, K/32, 16], scales [E, N, K/32]) as
    transformers' dense parameter: [E, K, N] in ``dtype`` (the x @ W layout of
    ``gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H]; transformers'
    ``convert_moe_packed_tensors``), dequantized one expert at a time (bounded
    temporaries) on blocks' device."""
    if blocks.dim() != 4 or scales.dim() != 3:
        raise ValueError(f"MXFP4 experts must be blocks [E, N, K/32, 16] and scales "
                         f"[E, N, K/32], got {list(blocks.shape)} and {list(scales.shape)}")
    e, n, g, _ = blocks.shape
    out = torch.empty(e, g * MXFP4_BLOCK, n, dtype=dtype, device=blocks.device)
    for i in range(e):
        out[i] = dequantize_mxfp4(blocks[i], scales[i], dtype).t()
    return out


class Mxfp4Experts:
    """Pairs an MXFP4 checkpoint's ``<proj>_blocks`` / ``<proj>_scales`` as the loader
    streams tensors (in any order, across shards) and hands back, once both are read,
    the dense tensor (``native=False``) or the pair itself as an :class:`Mxfp4Stack`
    (``native=True``: as stored, the loader keeps it MXFP4). ``device``: where to
    dequantize / keep them (the model's)."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str,
                 native: bool = False) -> None:
        self.dtype, self.device, self.native = dtype, device, native
        self.pending: dict[str, dict[str, Tensor]] = {}

    def add(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """(name, tensor) -> what the loader reads in its place: nothing yet (half of an
        MXFP4 pair), the dense ``...experts.<proj>`` [E, K, N] or (native) its
        :class:`Mxfp4Stack` (the pair complete), or the tensor itself (anything else)."""
        m = _EXPERTS_RE.match(name)
        if m is None or m.group(3) not in ("_blocks", "_scales"):
            return [(name, tensor)]
        base = m.group(1) + m.group(2)
        got = self.pending.setdefault(base, {})
        if not isinstance(tensor, Tensor):
            tensor = tensor[...]          # (a safetensors slice: read it whole)
        got[m.group(3)[1:]] = tensor.to(self.device)
        if len(got) < 2:
            return []
        del self.pending[base]
        if self.native:
            return [(base, Mxfp4Stack(got["blocks"], got["scales"]))]
        try:
            dense = mxfp4_expert_weight(got["blocks"], got["scales"], self.dtype)
        except ValueError as exc:
            raise ValueError(f"{base}_blocks / {base}_scales: {exc}") from None
        return [(base, dense)]

    def check_complete(self) -> None:
        """ValueError naming each MXFP4 tensor whose partner never arrived."""
        if self.pending:
            missing = [f"{base}_{'scales' if 'blocks' in got else 'blocks'}"
                       for base, got in sorted(self.pending.items())]
            raise ValueError(f"MXFP4 experts incomplete: missing {missing}")
