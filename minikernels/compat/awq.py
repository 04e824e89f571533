"""AutoAWQ's GEMM linear (``awq.modules.linear.gemm.WQLinear_GEMM``) and its packing
helpers (``awq.utils.packing_utils``) on minikernels, so code and tests written against
AutoAWQ swap one import:

    from minikernels.compat.awq import WQLinear_GEMM, dequantize_gemm
    q = WQLinear_GEMM.from_linear(linear, 4, 128, scales=scales, zeros=zeros)
    y = q(x)                                     # x [..., in_features]

Buffers (AutoAWQ's GEMM layout; K = in_features, N = out_features, G = group_size,
-1 -> K):

    qweight int32 [K, N / 8]      nibble i (bits 4i..) of word (k, c) = q[k, 8c + AWQ_ORDER[i]]
    qzeros  int32 [K / G, N / 8]  the same order; the zero point as is
    scales  fp16  [K / G, N]
    bias    fp16  [N], or None
    AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7
    W[k, n] = (q[k, n] - zero[k // G, n]) * scales[k // G, n];  y = x @ W + bias

``forward`` follows AutoAWQ: x is cast to fp16, y = x @ W + bias computed in fp16, then
cast back to x's dtype; the product runs ``ops.int4_matmul`` on the weight converted once
to minikernels' layout (``vllm_ops.GroupedWeight``), cached and rebuilt when a buffer is
replaced or changed in place (tensor identity and version counter; after a write through
``.data`` call ``post_init()``). Scales loaded in another dtype than fp16 take an exact
fp32 dequantize + matmul instead.

Differences from AutoAWQ, by design:
    - forward only (no autograd through the layer: AutoAWQ's ``training=True`` backward
      needs its CUDA kernels); ``training`` is accepted and only sets the module flag.
    - one rounding of x @ W + bias (AutoAWQ rounds the product, then adds the bias).
    - ``from_linear`` refuses (ValueError naming it) a weight that rounds outside
      [0, 15] with the given scales / zeros and zeros outside [0, 15], which AutoAWQ
      would pack as garbage; it honours group_size=-1 (AutoAWQ's indexes groups with
      ``idx // group_size`` and breaks there).
    - w_bit 4 only, as AutoAWQ (others: :class:`~minikernels.compat.vllm_ops.
      UnsupportedBitsError`, a ValueError that is also AutoAWQ's NotImplementedError).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import FLOAT_DTYPES, check_tensor
from ..quant.packing import pack_nibbles
from .auto_gptq import _version
from .vllm_ops import GroupedWeight, UnsupportedBitsError, decode_awq

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "WQLinear_GEMM", "dequantize_gemm",
           "pack_exllama", "reverse_awq_order", "unpack_awq", "unpack_reorder_pack"]

#: Slot i of an AWQ word holds column 8c + AWQ_ORDER[i] of its 8-column block.
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
#: Column j of a block sits in slot AWQ_REVERSE_ORDER[j] (the inverse permutation).
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _check_w_bit(name: str, bits: object) -> int:
    if bits != 4 or isinstance(bits, bool):
        raise UnsupportedBitsError(f"{name} must be 4 (AutoAWQ's GEMM format: \"Only 4-bit "
                                   f"are supported for now.\"), got {bits!r}")
    return 4


class WQLinear_GEMM(nn.Module):
    """AutoAWQ's ``WQLinear_GEMM`` (module docstring): y = x @ W + bias with W stored as
    4-bit AWQ GEMM integers, run on ``ops.int4_matmul``."""

    def __init__(self, w_bit: int, group_size: int, in_features: int, out_features: int,
                 bias: bool, dev: torch.device | str | None, training: bool = False) -> None:
        super().__init__()
        _check_w_bit("w_bit", w_bit)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or \
                (group_size != -1 and (group_size <= 0 or in_features % group_size)):
            raise ValueError(f"group_size must be -1 or a positive divisor of in_features "
                             f"({in_features}), got {group_size!r}")
        if out_features % 8:
            raise ValueError(f"out_features must be a multiple of 8 (8 nibbles per int32 "
                             f"word), got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.w_bit = w_bit
        self.group_size = group_size if group_size != -1 else in_features
        self.training = bool(training)
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8,
                                                    dtype=torch.int32, device=dev))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8,
                                                   dtype=torch.int32, device=dev))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16,
                                                   device=dev))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16,
                                                     device=dev))
        else:
            self.bias = None
        self._mk_cache: tuple | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, w_bit: int, group_size: int,
                    init_only: bool = False, scales: Tensor | None = None,
                    zeros: Tensor | None = None) -> WQLinear_GEMM:
        """AutoAWQ's ``from_linear``: a layer shaped like ``linear`` (on its device);
        init_only=True returns it empty (to load a state dict). Otherwise ``scales`` and
        ``zeros`` [K / G, N] (AutoAWQ's quantizer transposes its per-group values to this)
        describe the grid ``linear.weight`` lies on: q[n, k] = round((W[n, k] + zeros[g, n]
        * scales[g, n]) / fp16(scales)[g, n]), g = k // G, computed in AutoAWQ's dtypes;
        scales stored as fp16, zeros truncated to int, bias copied as fp16."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(w_bit, group_size, linear.in_features, linear.out_features,
                    linear.bias is not None, linear.weight.device)
        if init_only:
            return layer
        if scales is None or zeros is None:
            raise ValueError("scales and zeros are required unless init_only=True (AutoAWQ "
                             "asserts they are given)")
        w = linear.weight.detach()
        groups, k, n = layer.scales.shape[0], layer.in_features, layer.out_features
        check_tensor("scales", scales, dtypes=FLOAT_DTYPES, ndim=2, device=w.device)
        check_tensor("zeros", zeros, ndim=2, device=w.device)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if list(t.shape) != [groups, n]:
                raise ValueError(f"{name} must have shape [in_features / group_size, "
                                 f"out_features] = [{groups}, {n}], got {list(t.shape)}")
        scale_zeros = zeros * scales
        stored = scales.clone().half()
        rows = torch.arange(k, device=w.device) // layer.group_size
        q = torch.round((w + scale_zeros[rows].t()) / stored[rows].t())          # [N, K]
        if not torch.isfinite(q).all() or int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError("linear: its weight does not round onto [0, 15] with these "
                             "scales and zeros (it must be the quantized weight they "
                             "describe); AutoAWQ would pack garbage")
        if zeros.is_floating_point() and not torch.equal(zeros, zeros.round()):
            raise ValueError("zeros must be integer-valued (zero points on the grid)")
        zq = zeros.to(torch.int32)
        if int(zq.min()) < 0 or int(zq.max()) > 15:
            raise ValueError(f"zeros must be in [0, 15] (4-bit zero points), got min "
                             f"{int(zq.min())} and max {int(zq.max())}")
        layer.qweight = pack_nibbles(q.t().to(torch.int64), tuple(AWQ_ORDER))   # [K, N / 8]
        layer.qzeros = pack_nibbles(zq, tuple(AWQ_ORDER))
        layer.scales = stored
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone().half()
        return layer

    def grouped_weight(self) -> GroupedWeight:
        """The decoded weight of the current buffers, cached (module docstring)."""
        ts = (self.qweight, self.qzeros, self.scales)
        versions = tuple(_version(t) for t in ts)
        cache = self._mk_cache
        if None not in versions and cache is not None and cache[1] == versions and \
                all(a is b for a, b in zip(cache[0], ts)):
            return cache[2]
        w = decode_awq(self.qweight, self.scales, self.qzeros)
        if w.shape != (self.in_features, self.out_features):
            raise ValueError(f"qweight holds a {w.shape[0]} x {w.shape[1]} weight, but the "
                             f"layer is {self.in_features} x {self.out_features}")
        self._mk_cache = None if None in versions else (ts, versions, w)
        return w

    def post_init(self) -> None:
        """Decode the buffers now (forward would otherwise do it on first use)."""
        self._mk_cache = None
        if not self.qweight.is_meta:
            self.grouped_weight()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] (any float dtype, any strides) -> [..., out_features] in
        x's dtype, computed in fp16 as AutoAWQ does."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim in_features = {self.in_features}, got "
                             f"shape {list(x.shape)}")
        y = self.grouped_weight().matmul(x.half(), self.bias, x_name="x")
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, w_bit={self.w_bit}, "
                f"group_size={self.group_size}")


# ------------------------------------------------------------ awq.utils.packing_utils


def unpack_awq(qweight: Tensor, qzeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """AutoAWQ's ``unpack_awq``: split each int32 word into its 32 / bits values, in slot
    order (not yet reordered), as int8 [rows, cols * 32 / bits]. Like AutoAWQ's it does not
    mask: value i is (word >> (bits * i)) truncated to int8 (its low 8 bits), so the
    higher bits hold the next value; mask with ``& (2**bits - 1)``."""
    _check_w_bit("bits", bits)
    out = []
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        check_tensor(name, t, dtypes=(torch.int32,), ndim=2)
        shifts = torch.arange(0, 32, bits, device=t.device, dtype=torch.int32)
        out.append((t.unsqueeze(-1) >> shifts).to(torch.int8).reshape(t.shape[0], -1))
    return out[0], out[1]


def reverse_awq_order(iweights: Tensor, izeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """AutoAWQ's ``reverse_awq_order``: reorder the columns of unpacked values from AWQ's
    slot order to the natural order (column 8c + j <- slot AWQ_REVERSE_ORDER[j]), both
    tensors with izeros' column count."""
    _check_w_bit("bits", bits)
    per = 32 // bits
    cols = izeros.shape[-1]
    if cols % per or iweights.shape[-1] != cols:
        raise ValueError(f"iweights and izeros must have the same column count, a multiple "
                         f"of {per}, got {list(iweights.shape)} and {list(izeros.shape)}")
    order = (torch.arange(cols, device=izeros.device).view(-1, per)
             [:, AWQ_REVERSE_ORDER].reshape(-1))
    return iweights[:, order], izeros[:, order]


def pack_exllama(iweights: Tensor, izeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """AutoAWQ's ``pack_exllama``: natural-order values to GPTQ's layout, iweights [K, N]
    packed along K (qweight int32 [K * bits / 32, N]) and izeros [groups, N] along N
    (qzeros int32 [groups, N * bits / 32]), value j at bits j*bits (values taken as
    given: a negative one sets the higher bits, as AutoAWQ's sum of shifts does)."""
    _check_w_bit("bits", bits)
    per = 32 // bits
    if iweights.shape[0] % per or izeros.shape[1] % per:
        raise ValueError(f"iweights rows and izeros columns must be multiples of {per}, got "
                         f"{list(iweights.shape)} and {list(izeros.shape)}")
    shifts = torch.arange(0, 32, bits, device=iweights.device, dtype=torch.int64)
    w = iweights.to(torch.int64).view(iweights.shape[0] // per, per, -1)
    qweight = (w << shifts.view(1, per, 1)).sum(1)
    z = izeros.to(torch.int64).view(izeros.shape[0], -1, per)
    qzeros = (z << shifts).sum(-1)
    wrap = (lambda t: (((t + 2**31) % 2**32) - 2**31).to(torch.int32))   # int32 two's complement
    return wrap(qweight), wrap(qzeros)


def unpack_reorder_pack(qweight: Tensor, qzeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """AutoAWQ's ``unpack_reorder_pack``: AWQ GEMM qweight / qzeros -> GPTQ v1 qweight
    [K / 8, N] / qzeros [groups, N / 8] (zero - 1: what exllama and GPTQ v1 readers add
    back; a zero of 0 becomes -1, which sets every higher bit of its word, as AutoAWQ)."""
    iw, iz = reverse_awq_order(*unpack_awq(qweight, qzeros, bits), bits)
    mask = 2**bits - 1
    return pack_exllama(iw & mask, (iz & mask) - 1, bits)


def dequantize_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int,
                    group_size: int) -> Tensor:
    """AutoAWQ's ``dequantize_gemm``: W [K, N] = (q - zero) * scales in scales' dtype
    (one rounding) from AWQ GEMM qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8],
    scales [K / G, N]; group_size G (-1: K)."""
    _check_w_bit("bits", bits)
    check_tensor("scales", scales, dtypes=FLOAT_DTYPES, ndim=2)
    k = qweight.shape[0] if isinstance(qweight, Tensor) and qweight.dim() == 2 else 0
    g = k if group_size == -1 else group_size
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or \
            scales.shape[0] * g != k:
        raise ValueError(f"group_size must be K / groups = {k} / {scales.shape[0]} (or -1 "
                         f"with one group), got {group_size!r}")
    iw, iz = reverse_awq_order(*unpack_awq(qweight, qzeros, bits), bits)
    mask = 2**bits - 1
    iw, iz = iw & mask, iz & mask
    if list(scales.shape) != [iz.shape[0], iw.shape[1]] or iw.shape[0] != k:
        raise ValueError(f"scales must have shape [groups, N] = [{iz.shape[0]}, "
                         f"{iw.shape[1]}] (qzeros' rows, qweight's columns * 8), got "
                         f"{list(scales.shape)}")
    diff = iw - iz.repeat_interleave(g, dim=0)
    return diff.to(scales.dtype) * scales.repeat_interleave(g, dim=0)
