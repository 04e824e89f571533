"""The decoder's linear layer: a dense weight or int4 weights, fused along the output dim.

``FusedLinear(in_features, [n_q, n_k, n_v])`` holds one weight [sum(n), K] so q/k/v (and
gate/up) run as one matmul; checkpoints load each part (shard) into its rows.

Int4: :meth:`FusedLinear.quantize_int4_` (RTN of the dense weight in place; the hook
``mk.quantize_model`` calls), :meth:`quantize_shard_` (RTN of one checkpoint part as it is
read, so no dense weight is ever allocated) or :meth:`set_int4_shard` (GPTQ/AWQ imports)
replace the dense weight by int4 parts run through ``minikernels.ops.int4_matmul``.
RTN groups run along K within a row, so quantizing q, k and v apart and concatenating
them is bit-identical to quantizing the fused weight.
Parts with the same input permutation (GPTQ act-order) are merged into one matmul;
otherwise each part runs on its own and the outputs are concatenated.

FP8: :meth:`FusedLinear.quantize_fp8_shard_` (block-wise RTN of a checkpoint part as it
is read) or :meth:`set_fp8_shard` (fp8 checkpoints) replace the dense weight by fp8 parts
(:class:`minikernels.quant.fp8.Fp8Weight`: e4m3 weight + fp32 block scales) run through
``minikernels.ops.fp8_matmul`` (W8A16); parts fuse as :func:`minikernels.quant.fp8.merge_fp8`
says.

INT8 W8A8: :meth:`FusedLinear.quantize_int8_shard_` (per-channel RTN of a checkpoint part
as it is read) or :meth:`set_int8_shard` (compressed-tensors int8 checkpoints) replace the
dense weight by one :class:`Int8Part` (:class:`minikernels.quant.int8.Int8Weight`: int8
weight + one fp32 scale per output row; parts concatenate losslessly): activations are
quantized per token (``ops.scaled_int8_quant``) and multiplied with an exact int32 dot
product (``ops.scaled_mm``).

INT8 weight-only (W8A16): :meth:`set_int4_shard` also takes an
:class:`minikernels.quant.int8.Int8WoWeight` (GPTQ 8-bit, compressed-tensors W8A16);
parts with the same permutation and group size merge into :class:`Int8WoPart` matmuls
(``ops.int8_matmul``), as int4 parts do.

Mixed parts: a quantized checkpoint may leave some parts of a fused layer dense (e.g. a
GPTQ Qwen3.5 whose narrow ``in_proj_b`` / ``in_proj_a`` stay dense beside int4
``in_proj_qkv`` / ``in_proj_z``): :meth:`FusedLinear.set_dense_shard` gives such a part
its dense rows, which run as a :class:`DensePart` beside the quantized parts (outputs
concatenated in part order). Weight-only int4 and int8 parts may mix too (GPTQModel's
per-module ``dynamic`` bits). A layer whose parts all arrive dense becomes a plain dense
layer.

An int4 weight is anything with ``qweight [N, K/8] int32, scales/zeros [N, K/G],
group_size`` and optionally ``perm`` (int64 [K]: the stored column j multiplies input
column perm[j]) — :class:`minikernels.quant.Int4Weight` and plain namespaces alike.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..nn.layers import QuantizedActivation
from ..nn.quantize import pick_group_size  # noqa: F401 - also this module's public name

logger = logging.getLogger("minikernels")

# Rows per quantize_int4 call: bounds its fp32 temporaries (~20 bytes per element) to a few
# hundred MB even for a 128k-row lm_head. Rows are independent, so chunking is exact.
_RTN_CHUNK_ELEMENTS = 1 << 24




def rtn_int4(weight: Tensor, group_size: int, symmetric: bool = False) -> Any:
    """RTN int4 of ``weight`` [N, K] (``minikernels.quant.quantize_int4``) in row chunks,
    on the weight's device; bit-identical to one call on the whole weight."""
    from ..quant import Int4Weight, quantize_int4

    n, k = weight.shape
    rows = max(1, _RTN_CHUNK_ELEMENTS // max(k, 1))
    if n <= rows:
        return quantize_int4(weight, group_size=group_size, symmetric=symmetric)
    chunks = [quantize_int4(weight[i:i + rows], group_size=group_size, symmetric=symmetric)
              for i in range(0, n, rows)]
    return Int4Weight(torch.cat([c.qweight for c in chunks]),
                      torch.cat([c.scales for c in chunks]),
                      torch.cat([c.zeros for c in chunks]), chunks[0].group_size)


def _perm_of(w: Any) -> Tensor | None:
    for name in ("perm", "act_order_perm", "g_perm"):
        p = getattr(w, name, None)
        if p is not None:
            return p
    return None


class _WeightOnlyPart(nn.Module):
    """A weight-only quantized matmul's buffers (qweight, group scales / zeros, act-order
    perm) and its input: x[..., perm] in fp16 / bf16 (an fp32 model rounds the
    activations to the scales' dtype for the matmul; accumulation is fp32 either way)."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 perm: Tensor | None = None) -> None:
        super().__init__()
        self.group_size = int(group_size)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", zeros.contiguous())
        self.register_buffer("perm", None if perm is None else perm.long().contiguous())

    def _input(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(self.scales.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"act_order={self.perm is not None}")


class Int4Part(_WeightOnlyPart):
    """One int4 matmul: y = x[..., perm] @ W.T with W [N, K] as int4 (see ops.reference)."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 perm: Tensor | None = None) -> None:
        n_out = int(qweight.shape[0])
        pad = -n_out % 8
        if pad:  # int4_matmul wants N % 8 == 0 (e.g. a vocab of 300): zero rows, sliced off
            qweight = torch.cat([qweight, qweight.new_zeros(pad, qweight.shape[1])])
            scales = torch.cat([scales, scales.new_ones(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        super().__init__(qweight, scales, zeros, group_size, perm)
        self.n_out = n_out

    @property
    def out_features(self) -> int:
        return self.n_out

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1]) * 8

    def forward(self, x: Tensor) -> Tensor:
        y = ops.int4_matmul(self._input(x).contiguous(), self.qweight, self.scales,
                            self.zeros, self.group_size)
        if y.shape[-1] != self.n_out:
            y = y[..., :self.n_out]
        return y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """W [N, K] fp32 in the input's column order (perm undone)."""
        w = ops.reference.dequantize_int4(self.qweight, self.scales, self.zeros,
                                          self.group_size)[:self.n_out]
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


class _WeightRowsPart(nn.Module):
    """A linear part whose ``weight`` buffer is [N, K] (fp8 / int8 bytes)."""

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


class Fp8Part(_WeightRowsPart):
    """One fp8 matmul: y = x @ W.T, W [N, K] = weight (e4m3) * scale per (bn, bk) block.

    ``activations``: "none" (W8A16, the default: ``ops.fp8_matmul``) or "dynamic" (W8A8 as
    vLLM runs fp8 checkpoints: x quantized per token and K block with
    ``ops.per_token_group_quant_fp8``, then ``ops.w8a8_block_fp8_matmul``; fp8 tensor
    cores on sm_89+). A part whose K block is not a multiple of 16 or does not divide K
    stays W8A16.
    """

    def __init__(self, weight: Tensor, scale: Tensor, block_size: Sequence[int]) -> None:
        super().__init__()
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.activations = "none"

    @property
    def supports_w8a8(self) -> bool:
        bk, k = self.block_size[1], self.in_features
        bk = min(bk, k)
        return bk % 16 == 0 and k % bk == 0

    @property
    def input_group(self) -> int | None:
        """The K columns per activation scale when this part runs W8A8, else None."""
        if self.activations == "dynamic" and self.supports_w8a8:
            return min(self.block_size[1], self.in_features)
        return None

    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        """x [..., K] in the activation dtype, or already quantized per token and
        ``input_group`` columns (a :class:`QuantizedActivation` from the norm before)."""
        bn, bk = self.block_size[0], self.input_group
        if isinstance(x, QuantizedActivation):
            return ops.w8a8_block_fp8_matmul(x.q, self.weight, x.scales, self.scale,
                                             [bn, bk], output_dtype=x.dtype)
        if bk is not None:
            xq, xs = ops.per_token_group_quant_fp8(x, bk)
            return ops.w8a8_block_fp8_matmul(xq, self.weight, xs, self.scale, [bn, bk],
                                             output_dtype=x.dtype)
        return ops.fp8_matmul(x, self.weight, self.scale, self.block_size)

    def dequantize(self) -> Tensor:
        """W [N, K] fp32."""
        return ops.reference.dequantize_fp8(self.weight, self.scale, self.block_size)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"block_size={list(self.block_size)}, activations={self.activations}")


class Int8Part(_WeightRowsPart):
    """One INT8 W8A8 matmul: y = x @ W.T with W [N, K] = weight (int8) * scale[n].

    x [..., K] (fp16 / bf16 / fp32) is quantized per token, symmetric
    (``ops.scaled_int8_quant``: x ~ x_q * x_scale), then
    ``y[m, n] = x_scale[m] * (scale[n] * sum_k x_q[m, k] * weight[n, k])`` with an exact
    int32 accumulation (``ops.scaled_mm``), in x's dtype. ``symmetric = False``
    (checkpoints with asymmetric activations): x ~ (x_q - azp) * x_scale with a zero
    point per token, and the GEMM subtracts azp[m] * sum_k weight[n, k] in int32
    (``azp_adj``, vLLM's ``cutlass_scaled_mm_azp``).
    """

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("azp_adj", None, persistent=False)
        self.symmetric = True

    def set_symmetric(self, symmetric: bool) -> None:
        """Quantize the input symmetric (True) or with a zero point per token (False:
        keeps the weight's row sums, int32 [N], for the GEMM's correction)."""
        self.symmetric = bool(symmetric)
        self.azp_adj = None if symmetric else \
            self.weight.sum(dim=1, dtype=torch.int32).contiguous()

    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        """x [..., K] in the activation dtype, or already quantized per token (a
        :class:`QuantizedActivation` from the norm before; symmetric parts only)."""
        azp = None
        if isinstance(x, QuantizedActivation):
            x_q, x_s = x.q, x.scales
        elif self.symmetric:
            x_q, x_s, _ = ops.scaled_int8_quant(x)
        else:
            x_q, x_s, azp = ops.scaled_int8_quant(x, symmetric=False)
        y = ops.scaled_mm(x_q.reshape(-1, self.in_features), self.weight.t(),
                          x_s.reshape(-1, 1), self.scale, x.dtype, None,
                          self.azp_adj if azp is not None else None, azp)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        """W [N, K] fp32."""
        return self.weight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8=int8"


class Int8WoPart(_WeightOnlyPart):
    """One INT8 weight-only matmul: y = x[..., perm] @ W.T, W [N, K] = (q - zeros) *
    scales per group of G columns (q uint8; :class:`minikernels.quant.int8.Int8WoWeight`),
    run by ``ops.int8_matmul`` with fp16 / bf16 activations (an fp32 model rounds them to
    the scales' dtype for the matmul; accumulation is fp32 either way)."""

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        y = ops.int8_matmul(self._input(x), self.qweight, self.scales, self.zeros,
                            self.group_size)
        return y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """W [N, K] fp32 in the input's column order (perm undone)."""
        from ..quant.int8 import Int8WoWeight

        return Int8WoWeight(self.qweight, self.scales, self.zeros, self.group_size,
                            self.perm).dequantize()


class DensePart(_WeightRowsPart):
    """A part of a quantized fused linear that its checkpoint left dense: y = x @ W.T with
    ``weight`` [N, K] (a buffer in the model dtype; an input of another dtype is cast to
    it for the matmul and the output cast back)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return nn.functional.linear(x, self.weight)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    def dequantize(self) -> Tensor:
        """W [N, K] fp32."""
        return self.weight.float()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dense"


FP8_ACTIVATIONS = ("none", "dynamic")


def set_fp8_activations(model: nn.Module, activations: str) -> int:
    """Run every fp8 linear part of ``model`` W8A16 ("none") or W8A8 ("dynamic", see
    :class:`Fp8Part`); returns how many parts run W8A8."""
    if activations not in FP8_ACTIVATIONS:
        raise ValueError(f"fp8 activations must be one of {FP8_ACTIVATIONS}, got "
                         f"{activations!r}")
    n = 0
    for mod in model.modules():
        if isinstance(mod, Fp8Part):
            mod.activations = activations
            n += activations == "dynamic" and mod.supports_w8a8
    return n


def set_int8_activations(model: nn.Module, symmetric: bool) -> int:
    """Quantize the inputs of every INT8 W8A8 linear part of ``model`` symmetric, or with
    a zero point per token (``Int8Part.set_symmetric``); returns how many parts."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Int8Part):
            mod.set_symmetric(symmetric)
            n += 1
    return n


class FusedLinear(nn.Module):
    """y = x @ W.T (+ b), W [sum(output_sizes), in_features], dense, int4, fp8 or int8.

    output_sizes: the parts fused along N (one entry for an ordinary linear).
    """

    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 dense: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.output_sizes = [int(output_sizes)] if isinstance(output_sizes, int) \
            else [int(n) for n in output_sizes]
        self.out_features = sum(self.output_sizes)
        self.dtype = dtype
        self.weight: nn.Parameter | None = None
        if dense:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features,
                                                   dtype=dtype, device=device),
                                       requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.int4_parts = nn.ModuleList()
        self.fp8_parts = nn.ModuleList()
        self.int8_parts = nn.ModuleList()
        self.int8_wo_parts = nn.ModuleList()
        self._pending: dict[int, Any] = {}   # shard -> int4 / fp8 / int8 weight, until all arrive

    # ------------------------------------------------------------------ loading
    def shard_rows(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < len(self.output_sizes):
            raise IndexError(f"shard {shard} out of range for {len(self.output_sizes)} parts")
        start = sum(self.output_sizes[:shard])
        return start, start + self.output_sizes[shard]

    def load_shard(self, shard: int, name: str, tensor: Tensor) -> None:
        """Copy a checkpoint tensor ('weight' [n, K] or 'bias' [n]) into part ``shard``."""
        dst = self.check_shard(shard, name, tensor.shape)
        with torch.no_grad():
            dst.copy_(tensor)

    def check_shard(self, shard: int, name: str, shape: Sequence[int]) -> Tensor:
        """:meth:`load_shard`'s checks alone (ValueError), for a tensor of ``shape``; the
        view of part ``shard`` it would be copied into. Copies nothing."""
        start, stop = self.shard_rows(shard)
        if name == "weight":
            if self.weight is None:
                raise ValueError("this layer holds int4 weights; a dense weight cannot load")
            expected = (stop - start, self.in_features)
            dst = self.weight
        elif name == "bias":
            if self.bias is None:
                raise ValueError("this layer has no bias")
            expected = (stop - start,)
            dst = self.bias
        else:
            raise ValueError(f"unknown linear tensor {name!r}")
        if tuple(shape) != expected:
            raise ValueError(f"shape mismatch: expected {list(expected)}, got "
                             f"{list(shape)}")
        return dst[start:stop]

    def set_int4_shard(self, shard: int, w: Any) -> None:
        """Give part ``shard`` an int4 weight (GPTQ/AWQ import), or a weight-only int8 one
        (:class:`minikernels.quant.int8.Int8WoWeight`); merged once all parts have one."""
        from ..quant.int8 import Int8WoWeight

        if isinstance(w, Int8WoWeight):
            self._set_pending(shard, w, w.shape, "int8")
        else:
            self._set_pending(shard, w, (int(w.qweight.shape[0]),
                                         int(w.qweight.shape[1]) * 8), "int4")

    def set_fp8_shard(self, shard: int, w: Any) -> None:
        """Give part ``shard`` an fp8 weight (:class:`minikernels.quant.fp8.Fp8Weight`);
        the parts fuse once all have one."""
        self._set_pending(shard, w, w.shape, "fp8")

    def set_int8_shard(self, shard: int, w: Any) -> None:
        """Give part ``shard`` an int8 W8A8 weight (:class:`minikernels.quant.Int8Weight`);
        the parts fuse into one matmul once all have one."""
        self._set_pending(shard, w, w.shape, "int8")

    def set_dense_shard(self, shard: int, weight: Tensor) -> None:
        """Give part ``shard`` of a layer built without a dense weight (a quantized
        checkpoint's) the dense rows ``weight`` [n, K] its checkpoint left unquantized.
        Once every part has arrived, dense parts run as :class:`DensePart` beside the
        quantized ones; when every part is dense the layer becomes a plain dense one.
        ValueError when the layer holds a dense weight (use :meth:`load_shard`) or on a
        shape mismatch."""
        if self.weight is not None:
            raise ValueError("this layer holds a dense weight; load it with load_shard")
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [n, K], got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        self._set_pending(shard, weight.detach(), tuple(weight.shape), "dense")

    def _set_pending(self, shard: int, w: Any, shape: Sequence[int], kind: str) -> None:
        """Hold part ``shard``'s quantized (or dense) weight ``w`` (of dequantized ``shape``
        [n, K]) until every part has one, then merge them (:meth:`_merge_pending`)."""
        start, stop = self.shard_rows(shard)
        if tuple(shape) != (stop - start, self.in_features):
            raise ValueError(f"shape mismatch: {kind} weight is {list(shape)}, expected "
                             f"[{stop - start}, {self.in_features}]")
        self.weight = None
        self._pending[shard] = w
        if len(self._pending) == len(self.output_sizes):
            self._merge_pending()

    @staticmethod
    def _part_kind(w: Any) -> str:
        """"dense", "int8" (W8A8), "fp8" or "weight_only" (int4 / int8 W8A16) of a pending
        part."""
        from ..quant.fp8 import Fp8Weight
        from ..quant.int8 import Int8Weight

        if isinstance(w, Tensor):
            return "dense"
        if isinstance(w, Int8Weight):
            return "int8"
        if isinstance(w, Fp8Weight):
            return "fp8"
        return "weight_only"

    def _merge_pending(self) -> None:
        parts = [self._pending[i] for i in range(len(self.output_sizes))]
        self._pending = {}
        from ..quant.fp8 import merge_fp8
        from ..quant.int8 import Int8WoWeight

        kinds = [self._part_kind(w) for w in parts]
        if all(k == "dense" for k in kinds):     # every part left dense: a dense layer
            self.weight = nn.Parameter(torch.cat(parts), requires_grad=False)
            return
        quantized = set(kinds) - {"dense"}
        if len(quantized) > 1:
            if "int8" in quantized:
                raise ValueError("a fused linear cannot mix int8 and other quantized parts")
            raise ValueError("a fused linear cannot mix fp8 and int4 parts")
        kind = quantized.pop()
        modules: list[nn.Module] = []
        start = 0
        while start < len(parts):     # runs of neighbouring parts of one kind
            stop = start + 1
            while stop < len(parts) and kinds[stop] == kinds[start]:
                stop += 1
            run = parts[start:stop]
            if kinds[start] == "dense":
                modules.append(DensePart(torch.cat(run)))
            elif kind == "int8":
                modules.append(Int8Part(torch.cat([w.weight for w in run]),
                                        torch.cat([w.scale for w in run])))
            elif kind == "fp8":
                modules.extend(Fp8Part(w.weight, w.scale, w.block_size)
                               for w in merge_fp8(run))
            else:
                modules.extend(self._weight_only_modules(run))
            start = stop
        self.int4_parts = nn.ModuleList()
        self.int8_wo_parts = nn.ModuleList()
        if kind == "int8":
            self.int8_parts = nn.ModuleList(modules)
        elif kind == "fp8":
            self.fp8_parts = nn.ModuleList(modules)
        elif all(isinstance(w, Int8WoWeight) for w, k in zip(parts, kinds) if k != "dense"):
            self.int8_wo_parts = nn.ModuleList(modules)
        else:                                   # int4 (and any int8 W8A16 parts beside)
            self.int4_parts = nn.ModuleList(modules)

    @staticmethod
    def _weight_only_modules(parts: list[Any]) -> list[nn.Module]:
        """Int4 / weight-only int8 parts as matmul modules: neighbours with the same kind,
        permutation, group size and scales dtype merged into one."""
        from ..quant.int8 import Int8WoWeight

        groups: list[list[Any]] = []
        for w in parts:
            if groups:
                prev = groups[-1][-1]
                pa, pb = _perm_of(prev), _perm_of(w)
                same_perm = (pa is None and pb is None) or (
                    pa is not None and pb is not None and torch.equal(pa, pb))
                if same_perm and int(prev.group_size) == int(w.group_size) and \
                        prev.scales.dtype == w.scales.dtype and \
                        isinstance(prev, Int8WoWeight) == isinstance(w, Int8WoWeight):
                    groups[-1].append(w)
                    continue
            groups.append([w])
        return [(Int8WoPart if isinstance(g[0], Int8WoWeight) else Int4Part)(
                    torch.cat([w.qweight for w in g]), torch.cat([w.scales for w in g]),
                    torch.cat([w.zeros for w in g]), int(g[0].group_size), _perm_of(g[0]))
                for g in groups]

    @property
    def is_fp8(self) -> bool:
        if len(self.fp8_parts):
            return True
        from ..quant.fp8 import Fp8Weight

        return any(isinstance(w, Fp8Weight) for w in self._pending.values())

    @property
    def is_int8(self) -> bool:
        if len(self.int8_parts):
            return True
        from ..quant.int8 import Int8Weight

        return any(isinstance(w, Int8Weight) for w in self._pending.values())

    @property
    def is_int8_wo(self) -> bool:
        """Weight-only int8 (W8A16) parts."""
        if len(self.int8_wo_parts):
            return True
        from ..quant.int8 import Int8WoWeight

        return any(isinstance(w, Int8WoWeight) for w in self._pending.values())

    @property
    def is_int4(self) -> bool:
        return self.weight is None and not self.is_fp8 and not self.is_int8 and \
            not self.is_int8_wo

    @property
    def is_ready(self) -> bool:
        return self.weight is not None or (
            any(len(p) for p in (self.int4_parts, self.fp8_parts, self.int8_parts,
                                 self.int8_wo_parts)) and not self._pending)

    def quantize_(self, group_size: int = 128, symmetric: bool = False) -> None:
        """Replace the dense weight by RTN int4 with exactly ``group_size`` (it must divide K)."""
        if self.weight is None:
            return
        w = rtn_int4(self.weight.detach(), group_size, symmetric)
        self.weight = None  # a tied lm_head drops only its reference; the embedding keeps it
        self._pending = {}
        self.int4_parts = nn.ModuleList([Int4Part(w.qweight, w.scales, w.zeros,
                                                  int(w.group_size), _perm_of(w))])

    def quantize_int4_(self, group_size: int = 128, symmetric: bool = False) -> bool:
        """RTN-quantize the dense weight in place; the duck-typed hook of ``mk.quantize_model``.

        A K that ``group_size`` does not divide uses the largest power-of-two divisor >= 32,
        else per-channel groups (as ``load_model(quantization="int4")``). Returns True when
        the layer was quantized; False when it holds no dense weight or K % 8 != 0.
        """
        if self.weight is None:
            return False
        if self.in_features % 8:
            logger.info("minikernels: linear with K=%d left dense (int4 needs K %% 8 == 0)",
                        self.in_features)
            return False
        self.quantize_(pick_group_size(self.in_features, group_size), symmetric)
        return True

    def quantize_shard_(self, shard: int | None, tensor: Tensor, group_size: int = 128,
                        symmetric: bool = False) -> None:
        """RTN-quantize a dense checkpoint part ([n, K] of part ``shard``; None = the whole
        [out_features, K] weight) straight into int4, without a dense weight in the layer.

        Quantization runs on ``tensor``'s device; the caller drops ``tensor`` afterwards, so
        a streaming loader holds one dense tensor at a time. ``group_size`` is used as
        given (pick it with :func:`pick_group_size`). Parts may arrive in any order; the
        layer is ready once all have.
        """
        self._check_dense_part(shard, tensor)
        w = rtn_int4(tensor.detach(), group_size, symmetric)
        if shard is None:
            self._pending = {}
            self.int4_parts = nn.ModuleList([Int4Part(w.qweight, w.scales, w.zeros,
                                                      int(w.group_size), _perm_of(w))])
        else:
            self.set_int4_shard(shard, w)

    def _check_dense_part(self, shard: int | None, tensor: Tensor) -> None:
        """A dense part to quantize: this layer holds no dense weight, and ``tensor`` is
        part ``shard``'s [n, K] (None: the whole [out_features, K])."""
        if self.weight is not None:
            raise ValueError("this layer holds a dense weight; load it with load_shard")
        if shard is None:
            expected = (self.out_features, self.in_features)
        else:
            start, stop = self.shard_rows(shard)
            expected = (stop - start, self.in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch: expected {list(expected)}, got "
                             f"{list(tensor.shape)}")

    def quantize_fp8_shard_(self, shard: int | None, tensor: Tensor,
                            block_size: Sequence[int] = (128, 128)) -> None:
        """Block-wise RTN fp8 of a dense checkpoint part ([n, K] of part ``shard``; None =
        the whole [out_features, K] weight) straight into fp8, without a dense weight in
        the layer (as :meth:`quantize_shard_` does for int4). Each part is quantized on
        its own (a block never spans q and k), so both ways give the same bytes. Parts may
        arrive in any order; the layer is ready once all have."""
        from ..quant.fp8 import quantize_fp8

        self._check_dense_part(shard, tensor)
        if shard is None:   # part by part: blocks never straddle two parts (q | k | v)
            self._pending = {}
            for s, part in enumerate(torch.split(tensor.detach(), self.output_sizes)):
                self.set_fp8_shard(s, quantize_fp8(part, tuple(block_size)))
        else:
            self.set_fp8_shard(shard, quantize_fp8(tensor.detach(), tuple(block_size)))

    def quantize_fp8_(self, block_size: Sequence[int] = (128, 128)) -> bool:
        """Block-wise RTN fp8 of the dense weight in place; False when there is none."""
        if self.weight is None:
            return False
        w = self.weight.detach()
        self.weight = None  # a tied lm_head drops only its reference; the embedding keeps it
        self.quantize_fp8_shard_(None, w, block_size)
        return True

    def quantize_int8_shard_(self, shard: int | None, tensor: Tensor) -> None:
        """Per-channel RTN int8 (W8A8) of a dense checkpoint part ([n, K] of part
        ``shard``; None = the whole [out_features, K] weight) straight into int8, without
        a dense weight in the layer. Rows are quantized independently, so part by part
        and whole give the same bytes. Parts may arrive in any order."""
        from ..quant.int8 import quantize_int8

        self._check_dense_part(shard, tensor)
        w = quantize_int8(tensor.detach())
        if shard is None:
            self._pending = {}
            self.weight = None
            self.int8_parts = nn.ModuleList([Int8Part(w.weight, w.scale)])
        else:
            self.set_int8_shard(shard, w)

    def quantize_int8_(self) -> bool:
        """Per-channel RTN int8 (W8A8) of the dense weight in place; False when there is
        none."""
        if self.weight is None:
            return False
        w = self.weight.detach()
        self.weight = None  # a tied lm_head drops only its reference; the embedding keeps it
        self.quantize_int8_shard_(None, w)
        return True

    def input_quantization(self) -> tuple[torch.dtype, int | None] | None:
        """How every part of this linear quantizes its input, when they all agree:
        (torch.int8, None) for INT8 W8A8 (per token), (float8_e4m3fn, K block) for fp8
        W8A8; None for dense, weight-only, mixed or incomplete layers. A norm whose output
        only this linear reads can then quantize it itself (``RMSNorm.quantize_for``)."""
        if self.weight is not None or self._pending:
            return None
        parts = list(self._quantized_parts())
        if parts and all(isinstance(p, Int8Part) and p.symmetric for p in parts):
            return torch.int8, None
        groups = {p.input_group if isinstance(p, Fp8Part) else None for p in parts}
        if len(groups) == 1 and None not in groups:
            return torch.float8_e4m3fn, groups.pop()
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        """x [..., in_features]; a :class:`QuantizedActivation` only where
        :meth:`input_quantization` says so (its norm made it)."""
        y = self._base_forward(x)
        lora = self.__dict__.get("lora")     # LoRA slots (minikernels.models.lora)
        return y if lora is None else lora.add(x, y)

    def _base_forward(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            return nn.functional.linear(x, self.weight, self.bias)
        parts = self._quantized_parts()
        if self._pending or not len(parts):
            raise RuntimeError("quantized linear is missing parts (checkpoint incomplete)")
        if len(parts) == 1:
            y = parts[0](x)
        else:
            y = torch.cat([p(x) for p in parts], dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y

    def dense_weight(self) -> Tensor:
        """W [N, K] (dequantized fp32 for int4 / fp8): for tests and debugging."""
        if self.weight is not None:
            return self.weight.detach()
        return torch.cat([p.dequantize() for p in self._quantized_parts()])

    def _quantized_parts(self) -> nn.ModuleList:
        if len(self.int8_parts):
            return self.int8_parts
        if len(self.int8_wo_parts):
            return self.int8_wo_parts
        return self.fp8_parts if len(self.fp8_parts) else self.int4_parts

    def weight_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.buffers())
        total += sum(p.numel() * p.element_size() for p in self.parameters())
        return total

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}, "
                f"int4={self.is_int4}, fp8={self.is_fp8}, int8={self.is_int8}, "
                f"int8_wo={self.is_int8_wo}")
