"""The mixture-of-experts MLP of Qwen2-MoE, Qwen3-MoE, Mixtral, Granite-MoE and OLMoE: a
softmax router picks each token's top-k experts, and :func:`minikernels.ops.fused_moe` runs them
(gated MLPs, weighted and summed). The experts' gate activation is the config's
(``DecoderConfig.activation``: "silu", or "gelu" / "gelu_tanh" for GELU-gated experts such
as Gemma 4's), passed to the ops as ``activation=``; Qwen2-MoE's shared expert uses it too.

    logits = x @ Wgate.T                     # [T, E], in the model dtype (as transformers)
    p = softmax(logits in fp32)              # these two lines: ops.topk_softmax
    w, ids = topk(p, k); [w /= sum(w)]       # norm_topk_prob; ties: the lower expert id
    w = w rounded to the model dtype         # transformers multiplies in the model dtype
    y = fused_moe(x, W13, W2, w, ids)        # Granite-MoE: * residual_multiplier
    [y += sigmoid(x @ Wsg.T) * shared(x)]    # Qwen2-MoE's shared expert (a dense MLP;
                                             # Granite 4.0-H: added without the gate)

GPT-OSS (``moe_router_bias``, ``moe_expert_biases``, ``moe_activation`` "swigluoai"): the
router linear has a bias (``gate.bias`` [E]) and softmax-renormalizes its top-k (the
softmax of the k chosen logits, as transformers' GptOssTopKRouter); the experts have
biases ``experts.w13_bias`` [E, 2I] (gate, then up: de-interleaved from the checkpoint's
``gate_up_proj_bias``) and ``experts.w2_bias`` [E, H], and the clamped SwiGLU with the
config's ``swiglu_alpha`` / ``swiglu_limit`` (the ops' ``activation="swigluoai"``,
``alpha``, ``limit``). Under tensor parallel each rank holds its I/P rows of the w13 bias
(its gate slice, then its up slice) and rank 0 alone the w2 bias (zeros elsewhere): the
ops add it before the router weight, so the all-reduce adds it once per chosen expert.

Weights: ``gate.weight`` [E, H]; ``experts.w13`` [E, 2I, H] (each expert's gate_proj rows,
then its up_proj rows); ``experts.w2`` [E, H, I] (down_proj). Non-gated experts
(``FusedExperts(gated=False)``: Nemotron 3's squared-ReLU experts, down(act(up(x)))) hold
``w13`` [E, I, H] (up_proj alone) and run the ops with ``gated=False``. With int4 (RTN on load) the
experts are int4 too: :class:`FusedExperts` and ``ops.fused_moe_int4``; with fp8 (RTN on
load, or an fp8 checkpoint) e4m3 with block scales and ``ops.fused_moe_fp8``; with int8
(RTN on load, or an int8 checkpoint) int8 with per-row scales, run W8A8 by
``ops.fused_moe_int8_w8a8`` (activations quantized per token, as the model's int8
linears do; ``FusedExperts.int8_activations``, which the loader sets) or W8A16 by
``ops.fused_moe_int8`` (a weight-only int8 checkpoint, or asymmetric activations); a GPT-OSS
MXFP4 checkpoint's experts stay MXFP4 (uint8 FP4 blocks and E8M0 scales as stored,
``FusedExperts.set_mxfp4_``, ``ops.fused_moe_mxfp4``).

Tensor parallel (``tp``, size P; Megatron-style as the dense MLP, see
:mod:`minikernels.models.parallel`): every rank holds every expert, but only the
intermediate slice [r*I/P, (r+1)*I/P) of each: ``w13`` [E, 2I/P, H] (those gate rows,
then those up rows), ``w2`` [E, H, I/P] (those columns). The router and
``shared_expert_gate`` are replicated (every rank routes alike); the shared expert is
column- / row-parallel over its own intermediate size. Each rank's ``y`` (before the
multiplier) is a partial sum: one all-reduce, then Granite-MoE's residual_multiplier.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .. import ops
from .config import DecoderConfig
from .gpt_oss import mxfp4_checkpoint
from .linear import FusedLinear
from .parallel import TensorParallel

logger = logging.getLogger("minikernels")

#: a checkpoint's per-expert projections -> the part of w13 / w2 they fill
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
#: those of non-gated experts (FusedExperts(gated=False): w13 holds up_proj alone)
NONGATED_EXPERT_PARTS = ("up_proj", "down_proj")


class FusedExperts(nn.Module):
    """All experts' weights stacked: w13 [E, 2I, H], w2 [E, H, I]; ``inter`` = I is the
    local intermediate size (a tensor-parallel rank's I/P slice of each expert).

    Dense (``dense=True``): the Parameters ``w13`` / ``w2`` in the model dtype. Int4
    (``dense=False``: RTN on load): nothing is allocated until :meth:`quantize_part_`
    receives the first expert projection; then the canonical int4 buffers (ops/int4.py)
    ``w13_qweight`` int32 [E, 2I, H/8] with ``w13_scales`` / ``w13_zeros`` [E, 2I, H/G] and
    ``w2_qweight`` [E, H, I/8] with ``w2_scales`` / ``w2_zeros`` [E, H, I/G], one group
    size G for both (-1: one group per row); the forward is ``ops.fused_moe_int4``.

    FP8 (``dense=False``, then :meth:`quantize_fp8_part_` or :meth:`set_fp8_part_`):
    ``w13_fp8`` float8_e4m3fn [E, 2I, H] with ``w13_scale`` fp32 [E, ceil(2I/bn), ceil(H/bk)]
    and ``w2_fp8`` [E, H, I] with ``w2_scale`` [E, ceil(H/bn), ceil(I/bk)], one
    ``fp8_block`` (bn, bk) for both (see :mod:`minikernels.quant.fp8`). bn is the parts'
    row block when it divides I (gate and up rows then stack block by block), else 1
    (each part's block scales repeated over their rows: lossless). Per-channel scales are
    block (1, max(H, I)): one K block in both matrices. The forward is
    ``ops.fused_moe_fp8``.

    INT8 (``dense=False``, then :meth:`quantize_int8_part_` or :meth:`set_int8_part_`):
    ``w13_int8`` int8 [E, 2I, H] with ``w13_int8_scale`` fp32 [E, 2I] and ``w2_int8``
    [E, H, I] with ``w2_int8_scale`` [E, H], one scale per output row (see
    :mod:`minikernels.quant.int8`); the forward is ``ops.fused_moe_int8_w8a8`` (W8A8:
    activations quantized per token, int8 tensor cores) when ``int8_activations`` is set
    (the loader sets it for quantization="int8" and symmetric int8 W8A8 checkpoints),
    else ``ops.fused_moe_int8`` (W8A16).

    MXFP4 (``dense=False``, then :meth:`set_mxfp4_`: a GPT-OSS MXFP4 checkpoint's experts
    kept as stored, ~4.25 bits per weight): ``w13_blocks`` uint8 [E, 2I, H/32, 16] (gate
    rows then up rows: de-interleaved on load) with ``w13_block_scales`` uint8
    [E, 2I, H/32] and ``w2_blocks`` [E, H, I/32, 16] with ``w2_block_scales``
    [E, H, I/32] (FP4 e2m1 codes, E8M0 scales; ops.fused_moe_mxfp4's layout); the forward
    is ``ops.fused_moe_mxfp4``. H and the local I must be multiples of 32.

    ``activation``: the experts' gate activation ("silu", "gelu", "gelu_tanh", or GPT-OSS's
    "swigluoai" with ``swiglu_alpha`` / ``swiglu_limit``), every forward's ``activation=``.

    ``bias=True`` (GPT-OSS): the Parameters ``w13_bias`` [E, 2I] (each expert's gate_proj
    biases, then its up_proj biases; I local) and ``w2_bias`` [E, H] in the model dtype,
    dense whatever the weights are, passed to the ops as ``w13_bias`` / ``w2_bias``.

    ``gated=False``: non-gated experts (Nemotron 3's: y = down(act(up(x))), activation
    "relu2" (squared ReLU), or "silu" / "gelu" / "gelu_tanh"); every "2I" above is I,
    ``w13`` [E, I, H] (and its quantized forms) holding up_proj alone; the parts are
    ``NONGATED_EXPERT_PARTS`` (up_proj, down_proj; ``parts``), gate_proj is refused by
    name; the forward passes ``gated=False``. An fp8 row block need not divide I then
    (one part per matrix).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool = True,
                 activation: str = "silu", gated: bool = True, bias: bool = False,
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> None:
        super().__init__()
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
        allowed = ops.reference.MOE_ACTIVATIONS if gated else \
            ops.reference.MOE_NONGATED_ACTIVATIONS
        if activation not in allowed:
            raise ValueError(f"activation must be one of {allowed} for "
                             f"{'gated' if gated else 'non-gated (gated=False)'} experts, got "
                             f"{activation!r}")
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.activation = activation
        self.gated = gated
        self.dtype, self.device = dtype, device
        self.group_size: int | None = None           # int4 only
        self.fp8_block: tuple[int, int] | None = None  # fp8 only
        self.int8 = False                               # int8 buffers allocated
        self.int8_activations = False                   # int8 experts run W8A8
        self.fp8_activations = False                    # fp8 experts run W8A8
        self.mxfp4 = False                              # MXFP4 buffers allocated
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        self.w13 = self.w2 = None
        self.w13_bias = self.w2_bias = None
        if bias:
            self.w13_bias = nn.Parameter(torch.zeros(num_experts, self.rows13, dtype=dtype,
                                                     device=device), requires_grad=False)
            self.w2_bias = nn.Parameter(torch.zeros(num_experts, hidden, dtype=dtype,
                                                    device=device), requires_grad=False)
        if dense:
            self.w13 = nn.Parameter(torch.empty(num_experts, self.rows13, hidden, dtype=dtype,
                                                device=device), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype,
                                               device=device), requires_grad=False)

    @property
    def parts(self) -> tuple[str, ...]:
        """The per-expert projections these experts hold: ``EXPERT_PARTS`` (gate_proj,
        up_proj, down_proj), or ``NONGATED_EXPERT_PARTS`` (up_proj, down_proj)."""
        return EXPERT_PARTS if self.gated else NONGATED_EXPERT_PARTS

    @property
    def rows13(self) -> int:
        """w13's rows per expert: 2I (gate rows then up rows), I when not gated."""
        return 2 * self.inter if self.gated else self.inter

    def _check_part(self, name: str) -> None:
        if name not in self.parts:
            kind = "gated" if self.gated else "non-gated (gated=False)"
            raise ValueError(f"{name!r} is not a projection of these {kind} experts "
                             f"(parts {self.parts})")

    @property
    def is_int4(self) -> bool:
        return self.w13 is None and self.fp8_block is None and not self.int8 and \
            not self.mxfp4

    @property
    def is_int8(self) -> bool:
        return self.int8

    @property
    def is_fp8(self) -> bool:
        return self.fp8_block is not None

    @property
    def is_mxfp4(self) -> bool:
        return self.mxfp4

    def set_mxfp4_(self, name: str, blocks: Tensor, scales: Tensor) -> None:
        """Keep one stacked MXFP4 matrix as it is (no dequantization): ``name`` "w13"
        (blocks uint8 [E, 2I, H/32, 16], gate rows then up rows of this rank's I; scales
        uint8 [E, 2I, H/32]) or "w2" ([E, H, I/32, 16], [E, H, I/32]). The first call
        allocates both matrices' buffers (zeros; a matrix never set stays zero)."""
        if self.w13 is not None or self.group_size is not None or self.fp8_block is not None \
                or self.int8:
            raise ValueError("these experts hold dense, int4, fp8 or int8 weights")
        e, i, h = self.num_experts, self.inter, self.hidden
        if h % 32 or i % 32:
            raise ValueError(f"MXFP4 experts need H and I multiples of 32 (one block), got "
                             f"H = {h}, I = {i} (this rank's)")
        shapes = {"w13": (e, self.rows13, h // 32), "w2": (e, h, i // 32)}
        if name not in shapes:
            raise ValueError(f"name must be 'w13' or 'w2', got {name!r}")
        want = shapes[name]
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or \
                tuple(blocks.shape) != (*want, 16) or tuple(scales.shape) != want:
            raise ValueError(f"{name}: expected MXFP4 blocks uint8 {[*want, 16]} and scales "
                             f"uint8 {list(want)}, got {blocks.dtype} "
                             f"{list(blocks.shape)} and {scales.dtype} {list(scales.shape)}")
        if not self.mxfp4:
            for prefix, shape in shapes.items():
                self.register_buffer(f"{prefix}_blocks", torch.zeros(
                    *shape, 16, dtype=torch.uint8, device=self.device))
                self.register_buffer(f"{prefix}_block_scales", torch.zeros(
                    *shape, dtype=torch.uint8, device=self.device))
            self.mxfp4 = True
        getattr(self, f"{name}_blocks").copy_(blocks)
        getattr(self, f"{name}_block_scales").copy_(scales)

    def make_dense_(self) -> None:
        """Allocate dense w13 / w2 in an int4-built module that has no int4 part yet (an
        int4 checkpoint whose experts were left dense, as modules_to_not_convert)."""
        if self.group_size is not None or self.fp8_block is not None or self.int8 or \
                self.mxfp4:
            raise ValueError("these experts already hold quantized parts")
        e, i, h = self.num_experts, self.inter, self.hidden
        self.w13 = nn.Parameter(torch.empty(e, self.rows13, h, dtype=self.dtype,
                                            device=self.device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=self.dtype, device=self.device),
                               requires_grad=False)

    def part(self, expert: int, name: str) -> Tensor:
        """The view of one dense expert's ``gate_proj`` [I, H], ``up_proj`` [I, H] or
        ``down_proj`` [H, I] weight (I local: this rank's slice under tensor parallel;
        non-gated experts: up_proj is all of w13[expert], no gate_proj)."""
        self._check_part(name)
        if not self.gated and name == "up_proj":
            return self.w13[expert]
        if name == "gate_proj":
            return self.w13[expert, :self.inter]
        if name == "up_proj":
            return self.w13[expert, self.inter:]
        return self.w2[expert]

    def part_shape(self, name: str) -> tuple[int, int]:
        """[N, K] of projection ``name`` (one of ``parts``)."""
        self._check_part(name)
        return (self.hidden, self.inter) if name == "down_proj" else (self.inter, self.hidden)

    def quantize_part_(self, expert: int, name: str, tensor: Tensor, group_size: int) -> None:
        """RTN-quantize one expert's dense projection (``part_shape(name)``) straight into
        the int4 buffers (allocated on the first call, with ``group_size`` for all parts)."""
        from .linear import rtn_int4

        if not self.is_int4:
            raise ValueError("these experts hold dense weights; copy into part() instead")
        if tuple(tensor.shape) != self.part_shape(name):
            raise ValueError(f"shape mismatch: expected {list(self.part_shape(name))}, got "
                             f"{list(tensor.shape)}")
        if self.group_size is None:
            self._allocate_int4(group_size)
        elif group_size != self.group_size:
            raise ValueError(f"group_size {group_size} differs from these experts' "
                             f"{self.group_size}")
        self._write(expert, name, rtn_int4(tensor.detach().to(self.device), group_size))

    def set_int4_part_(self, expert: int, name: str, w: object, group_size: int) -> None:
        """Write one expert's projection from an int4 checkpoint (a
        :class:`~minikernels.quant.Int4Weight` [part_shape(name)] without act-order
        ``perm``) quantized with the checkpoint's ``group_size`` (-1: one group per row),
        which must divide H and I (one group size for every projection)."""
        if not self.is_int4:
            raise ValueError("these experts hold dense weights")
        n, k = self.part_shape(name)
        if tuple(w.shape) != (n, k):
            raise ValueError(f"shape mismatch: expected {[n, k]}, got {list(w.shape)}")
        if self.group_size is None:
            for dim in (self.hidden, self.inter):
                if group_size != -1 and dim % group_size:
                    raise ValueError(f"group_size {group_size} does not divide the experts' "
                                     f"H = {self.hidden} and I = {self.inter}")
            self._allocate_int4(group_size, w.scales.dtype)
        want = k if self.group_size == -1 else self.group_size
        if w.effective_group_size != want:
            raise ValueError(f"quantized with groups of {w.effective_group_size}; expected "
                             f"{want} (group_size {self.group_size})")
        self._write(expert, name, w)

    def quantize_fp8_part_(self, expert: int, name: str, tensor: Tensor,
                           block_size: tuple[int, int] = (128, 128)) -> None:
        """Block-wise RTN fp8 of one expert's dense projection (``part_shape(name)``)
        straight into the fp8 buffers (allocated on the first call)."""
        from ..quant.fp8 import quantize_fp8

        if self.w13 is not None:
            raise ValueError("these experts hold dense weights; copy into part() instead")
        if tuple(tensor.shape) != self.part_shape(name):
            raise ValueError(f"shape mismatch: expected {list(self.part_shape(name))}, got "
                             f"{list(tensor.shape)}")
        self.set_fp8_part_(expert, name, quantize_fp8(tensor.detach().to(self.device),
                                                      block_size), block_size)

    def set_fp8_part_(self, expert: int, name: str, w: object,
                      block_size: tuple[int, int] | None = None) -> None:
        """Write one expert's projection as an fp8 weight
        (:class:`minikernels.quant.fp8.Fp8Weight` [part_shape(name)]). The first call fixes
        the block size of all: ``block_size`` (the checkpoint's or RTN's (bn, bk)), or None
        for per-channel / per-tensor scales (see the class docstring)."""
        if self.w13 is not None or self.group_size is not None or self.int8 or self.mxfp4:
            raise ValueError("these experts hold dense, int4, int8 or MXFP4 weights")
        n, k = self.part_shape(name)
        if tuple(w.shape) != (n, k):
            raise ValueError(f"shape mismatch: expected {[n, k]}, got {list(w.shape)}")
        bn, bk = w.block_size
        if self.fp8_block is None:
            if block_size is not None:
                bn, fbk = (int(b) for b in block_size)
            else:   # one K block per row (per channel): max(H, I) is one block in both
                bn, fbk = 1, max(self.hidden, self.inter)
            # (gated: gate and up rows stack block by block only when bn divides I)
            self._allocate_fp8((bn if not self.gated or self.inter % bn == 0 else 1, fbk))
            bn = w.block_size[0]
        fbn, fbk = self.fp8_block
        if bk != fbk and not (bk >= k and fbk >= k):    # the same K blocks
            raise ValueError(f"fp8 K block {bk} differs from these experts' {fbk}")
        if bn != fbn:
            if fbn != 1:
                raise ValueError(f"fp8 row block {bn} differs from these experts' {fbn}")
            w = w.with_row_blocks_of_one()
        prefix, wrows = self._rows(name)
        _, rows = self._rows(name, fbn)
        getattr(self, f"{prefix}_fp8")[expert, wrows].copy_(w.weight)
        getattr(self, f"{prefix}_scale")[expert, rows].copy_(w.scale)

    def quantize_int8_part_(self, expert: int, name: str, tensor: Tensor) -> None:
        """Per-row RTN int8 of one expert's dense projection (``part_shape(name)``)
        straight into the int8 buffers (allocated on the first call)."""
        from ..quant.int8 import quantize_int8

        if self.w13 is not None:
            raise ValueError("these experts hold dense weights; copy into part() instead")
        if tuple(tensor.shape) != self.part_shape(name):
            raise ValueError(f"shape mismatch: expected {list(self.part_shape(name))}, got "
                             f"{list(tensor.shape)}")
        self.set_int8_part_(expert, name, quantize_int8(tensor.detach().to(self.device)))

    def set_int8_part_(self, expert: int, name: str, w: object) -> None:
        """Write one expert's projection as an int8 weight
        (:class:`minikernels.quant.Int8Weight` [part_shape(name)], one scale per row)."""
        if self.w13 is not None or self.group_size is not None or \
                self.fp8_block is not None or self.mxfp4:
            raise ValueError("these experts hold dense, int4, fp8 or MXFP4 weights")
        n, k = self.part_shape(name)
        if tuple(w.shape) != (n, k):
            raise ValueError(f"shape mismatch: expected {[n, k]}, got {list(w.shape)}")
        if not self.int8:
            e, i, h = self.num_experts, self.inter, self.hidden
            for prefix, (rows, cols) in (("w13", (self.rows13, h)), ("w2", (h, i))):
                self.register_buffer(f"{prefix}_int8", torch.zeros(
                    e, rows, cols, dtype=torch.int8, device=self.device))
                self.register_buffer(f"{prefix}_int8_scale", torch.ones(
                    e, rows, dtype=torch.float32, device=self.device))
            self.int8 = True
        prefix, rows = self._rows(name)
        getattr(self, f"{prefix}_int8")[expert, rows].copy_(w.weight)
        getattr(self, f"{prefix}_int8_scale")[expert, rows].copy_(w.scale)

    def _allocate_fp8(self, block: tuple[int, int]) -> None:
        e, i, h = self.num_experts, self.inter, self.hidden
        bn, bk = block
        for prefix, (n, k) in (("w13", (self.rows13, h)), ("w2", (h, i))):
            self.register_buffer(f"{prefix}_fp8", torch.zeros(
                e, n, k, dtype=torch.float8_e4m3fn, device=self.device))
            self.register_buffer(f"{prefix}_scale", torch.ones(
                e, -(-n // bn), -(-k // bk), dtype=torch.float32, device=self.device))
        self.fp8_block = (int(bn), int(bk))

    def _rows(self, name: str, block: int = 1) -> tuple[str, slice]:
        """("w13" or "w2", the rows of projection ``name`` in it, counted in blocks of
        ``block`` rows): gate_proj the first I rows of w13, up_proj the next I, down_proj
        all of w2; non-gated experts: up_proj all of w13."""
        self._check_part(name)
        if not self.gated:
            return ("w2" if name == "down_proj" else "w13"), slice(None)
        i = self.inter // block
        if name == "gate_proj":
            return "w13", slice(0, i)
        if name == "up_proj":
            return "w13", slice(i, 2 * i)
        return "w2", slice(None)

    def _write(self, expert: int, name: str, w: object) -> None:
        prefix, rows = self._rows(name)
        for kind in ("qweight", "scales", "zeros"):
            getattr(self, f"{prefix}_{kind}")[expert, rows].copy_(getattr(w, kind))

    def _allocate_int4(self, group_size: int, scale_dtype: torch.dtype | None = None) -> None:
        sd = scale_dtype or (self.dtype if self.dtype in (torch.float16, torch.bfloat16)
                             else torch.float16)
        e, i, h = self.num_experts, self.inter, self.hidden
        for prefix, (n, k) in (("w13", (self.rows13, h)), ("w2", (h, i))):
            groups = 1 if group_size == -1 else k // group_size
            self.register_buffer(f"{prefix}_qweight", torch.zeros(
                e, n, k // 8, dtype=torch.int32, device=self.device))
            self.register_buffer(f"{prefix}_scales", torch.ones(
                e, n, groups, dtype=sd, device=self.device))
            self.register_buffer(f"{prefix}_zeros", torch.zeros(
                e, n, groups, dtype=sd, device=self.device))
        self.group_size = group_size

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """(w13, w2) fp32: the dense weights, or the int4 / fp8 / int8 / MXFP4 ones
        dequantized."""
        if self.mxfp4:
            deqmx = ops.reference.dequantize_mxfp4_experts
            return tuple(deqmx(getattr(self, f"{p}_blocks"), getattr(self, f"{p}_block_scales"))
                         for p in ("w13", "w2"))
        if self.int8:
            return tuple(getattr(self, f"{p}_int8").float() *
                         getattr(self, f"{p}_int8_scale")[:, :, None] for p in ("w13", "w2"))
        if self.fp8_block is not None:
            deq8 = ops.reference.dequantize_fp8
            return tuple(torch.stack([deq8(getattr(self, f"{p}_fp8")[e],
                                           getattr(self, f"{p}_scale")[e], self.fp8_block)
                                      for e in range(self.num_experts)]) for p in ("w13", "w2"))
        if self.w13 is not None:
            return self.w13.float(), self.w2.float()
        deq = ops.reference.dequantize_int4
        return tuple(torch.stack([deq(getattr(self, f"{p}_qweight")[e],
                                      getattr(self, f"{p}_scales")[e],
                                      getattr(self, f"{p}_zeros")[e], self.group_size)
                                  for e in range(self.num_experts)]) for p in ("w13", "w2"))

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """The experts of x [T, H] (``ops.fused_moe`` / ``fused_moe_int4`` /
        ``fused_moe_fp8`` / ``fused_moe_int8_w8a8`` / ``fused_moe_int8`` /
        ``fused_moe_mxfp4``, with ``activation`` and ``gated``)."""
        slots = self.__dict__.get("lora")    # LoRA on the experts (minikernels.models.lora)
        lora = slots.op_args() if slots is not None else None
        kw = {"activation": self.activation, "gated": self.gated, "w13_bias": self.w13_bias,
              "w2_bias": self.w2_bias, "alpha": self.swiglu_alpha,
              "limit": self.swiglu_limit}
        if self.w13 is not None:
            return ops.fused_moe(x, self.w13, self.w2, weights, ids, lora=lora, **kw)
        if self.mxfp4:
            return ops.fused_moe_mxfp4(x, self.w13_blocks, self.w13_block_scales,
                                       self.w2_blocks, self.w2_block_scales, weights, ids,
                                       lora=lora, **kw)
        if self.int8 and self.int8_activations:
            return ops.fused_moe_int8_w8a8(x, self.w13_int8, self.w13_int8_scale,
                                           self.w2_int8, self.w2_int8_scale, weights, ids,
                                           lora=lora, **kw)
        if self.int8:
            return ops.fused_moe_int8(x, self.w13_int8, self.w13_int8_scale, self.w2_int8,
                                      self.w2_int8_scale, weights, ids, lora=lora, **kw)
        if self.fp8_block is not None and self.fp8_activations:
            return ops.fused_moe_fp8_w8a8(x, self.w13_fp8, self.w13_scale, self.w2_fp8,
                                          self.w2_scale, weights, ids, self.fp8_block,
                                          lora=lora, **kw)
        if self.fp8_block is not None:
            return ops.fused_moe_fp8(x, self.w13_fp8, self.w13_scale, self.w2_fp8,
                                     self.w2_scale, weights, ids, self.fp8_block, lora=lora,
                                     **kw)
        if self.group_size is None:
            raise RuntimeError("int4 experts were never loaded")
        # fp16 / bf16 activations; an fp32 model rounds them to the scales' dtype
        sd = self.w13_scales.dtype
        xin = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(sd)
        if lora is not None and xin.dtype != x.dtype:
            lora = lora._replace(a13=lora.a13.to(sd), b13=lora.b13.to(sd),
                                 a2=lora.a2.to(sd), b2=lora.b2.to(sd))
        if xin.dtype != x.dtype and self.w13_bias is not None:   # (biases in xin's dtype)
            kw.update(w13_bias=self.w13_bias.to(sd), w2_bias=self.w2_bias.to(sd))
        y = ops.fused_moe_int4(xin, self.w13_qweight, self.w13_scales, self.w13_zeros,
                               self.w2_qweight, self.w2_scales, self.w2_zeros, weights, ids,
                               self.group_size, lora=lora, **kw)
        return y.to(x.dtype)



def set_fp8_expert_activations(model: nn.Module, on: bool = True) -> int:
    """Run the fp8 :class:`FusedExperts` of ``model`` W8A8 (``on``: activations quantized
    per token and group of bk, ``ops.fused_moe_fp8_w8a8``) or W8A16
    (``ops.fused_moe_fp8``). W8A8 needs a bk that is a multiple of 32 dividing H and
    this rank's I, or covering such a K whole (DeepSeek-V3 / Qwen3-FP8's 128 x 128
    blocks, RTN's); other fp8 experts stay W8A16, logged. Returns how many expert
    stacks run W8A8."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, FusedExperts) and mod.fp8_block is not None:
            bk = mod.fp8_block[1]
            ok = all(min(bk, k) % 32 == 0 and k % min(bk, k) == 0
                     for k in (mod.hidden, mod.w2_fp8.shape[2]))
            if on and not ok:
                logger.info("minikernels: fp8 experts with block %s (H %d, I %d) run W8A16: "
                            "W8A8 needs a bk that is a multiple of 32 dividing H and I",
                            mod.fp8_block, mod.hidden, mod.w2_fp8.shape[2])
            mod.fp8_activations = bool(on) and ok
            n += mod.fp8_activations
    return n


def set_int8_expert_activations(model: nn.Module, on: bool = True) -> int:
    """Run every int8 :class:`FusedExperts` of ``model`` W8A8 (``on``: activations
    quantized per token, ``ops.fused_moe_int8_w8a8``) or W8A16 (``ops.fused_moe_int8``);
    returns how many expert stacks are int8."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, FusedExperts) and mod.is_int8:
            mod.int8_activations = bool(on)
            n += 1
    return n


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a gated MLP (``gate_up_proj`` / ``down_proj``
    FusedLinears, so int4 on load covers it) with the experts' activation (SiLU unless
    the config's hidden_act is a GELU). ``inter``: local (I/P under tensor parallel);
    the caller all-reduces the row-parallel output."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 activation: str = "silu") -> None:
        super().__init__()
        self.activation = activation
        self.gate_up_proj = FusedLinear(hidden, [inter] * 2, dtype=dtype, device=device,
                                        dense=dense)
        self.down_proj = FusedLinear(inter, hidden, dtype=dtype, device=device, dense=dense)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(ops.silu_and_mul(gate_up))
        return self.down_proj(ops.gelu_and_mul(
            gate_up, "tanh" if self.activation == "gelu_tanh" else "none"))


class SparseMoE(nn.Module):
    """Router + experts of one layer (see the module docstring). ``tp``: build this rank's
    shard; forward all-reduces the partial sum."""

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool = True,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        p = tp.size if tp is not None else 1
        self.__dict__["tp"] = tp   # not a submodule
        self.top_k = c.num_experts_per_tok
        self.norm_topk_prob = bool(c.norm_topk_prob)
        self.residual_multiplier = c.residual_multiplier   # Granite-MoE
        # (GPT-OSS: a router bias)
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=c.moe_router_bias,
                              dtype=dtype, device=device)
        self.gate.requires_grad_(False)
        # LFM2-MoE: sigmoid scores, chosen with a learned per-expert bias, scaled
        self.router = c.moe_router
        self.routed_scaling = float(c.moe_routed_scaling)
        self.expert_bias = nn.Parameter(torch.zeros(c.num_experts, dtype=dtype, device=device),
                                        requires_grad=False) if c.moe_expert_bias else None
        # Gemma 4: the router reads its input RMS-normalized (no weight) times a learned
        # scale / sqrt(H); a learned scale per expert multiplies the chosen weights
        self.router_norm = self.router_scale = self.per_expert_scale = None
        if self.router == "gemma4":
            from ..nn.layers import RMSNorm
            self.router_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype,
                                       device=device, elementwise_affine=False)
            self.router_scale = nn.Parameter(torch.ones(c.hidden_size, dtype=dtype,
                                                        device=device), requires_grad=False)
            self.per_expert_scale = nn.Parameter(torch.ones(c.num_experts, dtype=dtype,
                                                            device=device),
                                                 requires_grad=False)
        # (a GPT-OSS MXFP4 checkpoint: nothing allocated until the loader sets the experts
        # - native MXFP4 by default, or dense / RTN-quantized from their dequantization)
        self.experts = FusedExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size // p,
                                    dtype, device, dense and not mxfp4_checkpoint(c),
                                    activation=c.expert_activation,
                                    bias=c.moe_expert_biases, swiglu_alpha=c.swiglu_alpha,
                                    swiglu_limit=c.swiglu_limit)
        self.shared_expert = self.shared_expert_gate = None
        if c.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(c.hidden_size,
                                              c.shared_expert_intermediate_size // p, dtype,
                                              device, dense, activation=c.activation)
            if c.shared_expert_gated:      # (Granite 4.0-H adds its shared MLP as is)
                self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False,
                                                    dtype=dtype, device=device)
                self.shared_expert_gate.weight.requires_grad_(False)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights fp32 [T, k] (rounded through the model dtype), expert ids int32 [T, k]):
        ``ops.topk_softmax`` on the router logits (softmax in fp32, top-k, renormalized
        when ``norm_topk_prob``; equal logits pick the lower expert id)."""
        if self.router == "sigmoid":
            return self._route_sigmoid(x)
        if self.router == "gemma4":
            return self._route_gemma4(x)
        weights, ids = ops.topk_softmax(self.gate(x), self.top_k, self.norm_topk_prob)
        return weights.to(x.dtype).float(), ids

    def _route_sigmoid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """LFM2-MoE's router (transformers' Lfm2MoeTopKRouter), ``ops.topk_sigmoid``: s =
        sigmoid(logits); the top-k experts of s (+ expert_bias: it only chooses); weights
        s of those, renormalized (sum + 1e-6) when norm_topk_prob, times routed_scaling;
        fp32 math, weights rounded through the model dtype."""
        weights, ids = ops.topk_sigmoid(self.gate(x), self.top_k, self.norm_topk_prob,
                                        self.expert_bias, renorm_eps=1e-6)
        if self.routed_scaling != 1.0:
            weights = weights * self.routed_scaling
        return weights.to(x.dtype).float(), ids

    def _route_gemma4(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gemma 4's router (transformers' Gemma4TextRouter): softmax (fp32) of
        gate(rms_norm(x) * scale / sqrt(H)), the top-k renormalized, each times its
        expert's scale; weights fp32, ids int32."""
        h = self.router_norm(x) * self.router_scale * (x.shape[-1] ** -0.5)
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids].float(), ids.to(torch.int32)

    def forward(self, x: Tensor, route_input: Tensor | None = None) -> Tensor:
        """The layer's MoE output for x [T, H]; route_input (Gemma 4: the stream, while
        the experts read its pre-norm) picks the experts when given, else x."""
        weights, ids = self.route(x if route_input is None else route_input)
        y = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            y = y + (shared if self.shared_expert_gate is None else
                     torch.sigmoid(self.shared_expert_gate(x)) * shared)
        if self.tp is not None:
            y = self.tp.all_reduce(y)   # row-parallel: experts' and shared expert's partials
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier
