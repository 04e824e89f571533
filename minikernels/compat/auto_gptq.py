"""AutoGPTQ's quantized linear (``auto_gptq.nn_modules.qlinear.*.QuantLinear``) on
minikernels, so code and tests written against AutoGPTQ swap one import:

    from minikernels.compat.auto_gptq import QuantLinear   # was: ...qlinear_cuda import QuantLinear
    layer = QuantLinear(4, 128, in_features, out_features, bias=True)
    layer.pack(linear, scales, zeros, g_idx)     # scales / zeros [out_features, groups]
    y = layer(x)                                 # x [..., in_features]

The interface AutoGPTQ's qlinear modules share (``qlinear_cuda``, ``qlinear_cuda_old``,
``qlinear_exllama``, ``qlinear_triton``): the constructor ``(bits, group_size,
infeatures, outfeatures, bias, ...)``, the checkpoint buffers in AutoGPTQ's shapes and
dtypes, ``pack``, ``post_init`` and ``forward``. Buffers (GPTQ v1, the format AutoGPTQ
writes and reads; K = infeatures, N = outfeatures, G = group_size, -1 -> K):

    qweight int32 [K * bits / 32, N]             value j of word (r, n) (bits j*bits..)
                                                 = q[r * 32/bits + j, n]
    qzeros  int32 [ceil(K / G), N * bits / 32]   value j of word (g, c)
                                                 = zero[g, c * 32/bits + j] - 1
    scales  [ceil(K / G), N] weight_dtype (fp16 by default)
    g_idx   int32 [K]        the group of each input row (i // G; act order permutes it)
    bias    [N] weight_dtype, or None
    W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n];  y = x @ W + bias

``forward`` runs ``ops.int4_matmul`` (bits=4) or ``ops.int8_matmul`` (bits=8) on the
weight converted once to minikernels' layout (rows sorted by group, act order as a gather
of x's columns; ``vllm_ops.GroupedWeight``), cached and rebuilt when a buffer is replaced
or changed in place (tracked by tensor identity and version counter; a write through
``.data`` bypasses the counter: call ``post_init()`` after one). x in fp16 / bf16 with
scales of the same dtype takes that path; other combinations (fp32 models, mixed dtypes,
groups that are not contiguous runs of G rows) an exact fp32 dequantize + matmul. The
output has x's dtype.

Differences from AutoGPTQ, by design:
    - bits 4 and 8 only; 2 and 3 raise :class:`~minikernels.compat.vllm_ops.
      UnsupportedBitsError` (a ValueError naming bits that is also AutoGPTQ's
      NotImplementedError). Forward only: ``trainable=True`` raises a ValueError.
    - K * bits and N * bits must be multiples of 32 (AutoGPTQ sizes its buffers with
      ``infeatures // 32 * bits``, which is only consistent when K is a multiple of 32;
      here K only needs to fill whole words: a multiple of 8 for 4 bits, 4 for 8 bits).
    - ``pack`` refuses (ValueError naming it) what AutoGPTQ would pack as garbage: a
      weight that rounds outside [0, 2^bits - 1] with the given scales and zeros (AutoGPTQ
      ORs the overflow into the neighbouring values), and a zero point of 0 (v1 stores
      zero - 1 = -1, which AutoGPTQ ORs into every higher value of the word; export such
      layers in GPTQ v2 with :func:`minikernels.quant.to_gptq`).
    - every forward honours g_idx (AutoGPTQ's ``qlinear_cuda_old`` and exllama kernels
      assume sequential groups unless post-initialised for act order), and
      :func:`dequantize_weight` does too (AutoGPTQ's ignores g_idx).
    - one rounding of x @ W + bias (AutoGPTQ rounds the product, then adds the bias).
    - ``use_cuda_fp16``, ``kernel_switch_threshold`` are accepted and have no effect (one
      path runs for every M); the Marlin / exllama / qigen kernel-specific buffers and
      helpers (``B``, ``s``, ``workspace``, ``q4``, ``exllama_set_max_input_length``) are
      not provided.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validation import FLOAT_DTYPES, check_tensor
from ..quant.packing import pack_bytes, pack_nibbles
from .vllm_ops import GroupedWeight, UnsupportedBitsError, _check_bits, decode_gptq

__all__ = ["QuantLinear", "autogptq_post_init", "dequantize_qzeros", "dequantize_weight",
           "dynamically_import_QuantLinear", "unpack_4bit_to_32bit_signed",
           "unpack_qzeros"]

_AUTOGPTQ_BITS = (2, 3, 4, 8)


def _check_feature(name: str, value: object, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or (value * bits) % 32:
        raise ValueError(f"{name} must be a positive multiple of {32 // bits} ({bits}-bit "
                         f"values fill whole int32 words), got {value}")
    return value


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:      # inference tensors have no version counter: never cached
        return None


class QuantLinear(nn.Module):
    """AutoGPTQ's ``QuantLinear`` (module docstring): y = x @ W + bias with W stored as
    GPTQ v1 ``bits``-bit integers, run on minikernels' weight-only ops."""

    QUANT_TYPE = "minikernels"

    def __init__(self, bits: int, group_size: int, infeatures: int, outfeatures: int,
                 bias: bool, use_cuda_fp16: bool = True, kernel_switch_threshold: int = 128,
                 trainable: bool = False, weight_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _AUTOGPTQ_BITS:
            raise UnsupportedBitsError(f"bits must be one of 2, 3, 4, 8 (AutoGPTQ: \"Only "
                                       f"2,3,4,8 bits are supported.\"), got {bits!r}")
        _check_bits("bits", bits)
        _check_feature("infeatures", infeatures, bits)
        _check_feature("outfeatures", outfeatures, bits)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or \
                (group_size != -1 and group_size <= 0):
            raise ValueError(f"group_size must be -1 (one group) or a positive int, got "
                             f"{group_size!r}")
        if trainable:
            raise ValueError("trainable=True is not supported: minikernels' QuantLinear is "
                             "forward only (no backward through the quantized weight)")
        if weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight_dtype must be float16, bfloat16 or float32, got "
                            f"{weight_dtype}")
        self.infeatures = infeatures
        self.outfeatures = outfeatures
        self.bits = bits
        self.group_size = group_size if group_size != -1 else infeatures
        self.maxq = 2 ** bits - 1
        self.trainable = False
        self.use_cuda_fp16 = use_cuda_fp16 if bits != 8 else False
        self.kernel_switch_threshold = kernel_switch_threshold
        groups = math.ceil(infeatures / self.group_size)
        self.register_buffer("qweight", torch.zeros(infeatures * bits // 32, outfeatures,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, outfeatures * bits // 32,
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, outfeatures, dtype=weight_dtype))
        self.register_buffer("g_idx", torch.arange(infeatures, dtype=torch.int32)
                             // self.group_size)
        if bias:
            self.register_buffer("bias", torch.zeros(outfeatures, dtype=weight_dtype))
        else:
            self.bias = None
        self._mk_cache: tuple | None = None

    # ------------------------------------------------------------------ the weight
    def _buffers_key(self) -> tuple | None:
        ts = (self.qweight, self.qzeros, self.scales, self.g_idx)
        versions = tuple(_version(t) for t in ts)
        return None if None in versions else (ts, versions)

    def grouped_weight(self) -> GroupedWeight:
        """The decoded weight (``vllm_ops.GroupedWeight``) of the current buffers,
        cached (module docstring)."""
        key = self._buffers_key()
        cache = self._mk_cache
        if key is not None and cache is not None and cache[1] == key[1] and \
                all(a is b for a, b in zip(cache[0], key[0])):
            return cache[2]
        w = decode_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, False, False,
                        self.bits, names=("qweight", "qzeros", "scales", "g_idx"))
        if w.shape != (self.infeatures, self.outfeatures):
            raise ValueError(f"qweight holds a {w.shape[0]} x {w.shape[1]} weight, but the "
                             f"layer is {self.infeatures} x {self.outfeatures}")
        self._mk_cache = None if key is None else (key[0], key[1], w)
        return w

    def post_init(self) -> None:
        """Decode the buffers now (AutoGPTQ prepares its kernels' buffers here); forward
        would otherwise do it on first use."""
        self._mk_cache = None
        if not self.qweight.is_meta:
            self.grouped_weight()

    # ------------------------------------------------------------------ packing
    @torch.no_grad()
    def pack(self, linear: nn.Module, scales: Tensor, zeros: Tensor,
             g_idx: Tensor | None = None) -> None:
        """Quantize ``linear``'s weight onto the given grid and store it (AutoGPTQ's
        ``pack``): q[n, k] = round((W[n, k] + zeros[n, g] * scales[n, g]) / scales[n, g])
        with g = g_idx[k], computed in the dtypes AutoGPTQ uses (scales cast to the
        weight's dtype for the division); then qweight / qzeros (zero - 1) packed, scales
        stored in the weight's dtype, bias copied.

        linear: nn.Linear (weight [N, K]), transformers' Conv1D (weight [K, N]) or
        nn.Conv2d (flattened to [N, K]). scales, zeros: [N, groups] (the GPTQ quantizer's
        per-group columns); zeros integer-valued in [1, 2^bits]. g_idx: int [K] or None
        (keep the layer's, sequential by default)."""
        w = _linear_weight(linear, self.infeatures, self.outfeatures)
        groups = self.scales.shape[0]
        check_tensor("scales", scales, dtypes=FLOAT_DTYPES, ndim=2, device=w.device)
        if list(scales.shape) != [self.outfeatures, groups]:
            raise ValueError(f"scales must have shape [outfeatures, groups] = "
                             f"[{self.outfeatures}, {groups}], got {list(scales.shape)}")
        check_tensor("zeros", zeros, ndim=2, device=w.device)
        if list(zeros.shape) != [self.outfeatures, groups]:
            raise ValueError(f"zeros must have shape [outfeatures, groups] = "
                             f"[{self.outfeatures}, {groups}], got {list(zeros.shape)}")
        if g_idx is not None:
            check_tensor("g_idx", g_idx, dtypes=(torch.int32, torch.int64), ndim=1)
            if list(g_idx.shape) != [self.infeatures]:
                raise ValueError(f"g_idx must have shape [infeatures = {self.infeatures}], "
                                 f"got {list(g_idx.shape)}")
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise ValueError(f"g_idx values must be in [0, {groups}) (the groups), got "
                                 f"min {int(g_idx.min())} and max {int(g_idx.max())}")
            gi = g_idx.to(device=w.device, dtype=torch.int32).clone()
        else:
            gi = self.g_idx.to(w.device)
        s_t = scales.t().contiguous()                             # [groups, N]
        z_t = zeros.t().contiguous()
        scale_zeros = z_t * s_t
        stored_scales = s_t.clone().to(w.dtype)
        rows = gi.long()
        q = torch.round((w + scale_zeros[rows].t()) / stored_scales[rows].t())   # [N, K]
        if not torch.isfinite(q).all() or int(q.min()) < 0 or int(q.max()) > self.maxq:
            raise ValueError(f"linear: its weight does not round onto [0, {self.maxq}] with "
                             "these scales and zeros (the weight must be the quantized one "
                             "these scales / zeros describe); AutoGPTQ would pack garbage")
        if z_t.is_floating_point() and not torch.equal(z_t, z_t.round()):
            raise ValueError("zeros must be integer-valued (zero points on the grid)")
        zq = (z_t - 1).to(torch.int64)                             # v1 stores zero - 1
        if int(zq.min()) < 0 or int(zq.max()) > self.maxq:
            raise ValueError(f"zeros must be integers in [1, {self.maxq + 1}] (GPTQ v1 stores "
                             f"zero - 1), got min {int(zq.min()) + 1} and max "
                             f"{int(zq.max()) + 1}; a zero of 0 needs GPTQ v2 "
                             "(minikernels.quant.to_gptq(..., 'gptq_v2'))")
        pack = pack_nibbles if self.bits == 4 else pack_bytes
        self.qweight = pack(q.to(torch.int64)).t().contiguous()   # [K * bits / 32, N]
        self.qzeros = pack(zq)
        self.scales = stored_scales
        self.g_idx = gi
        bias = getattr(linear, "bias", None)
        if bias is not None:
            self.bias = bias.detach().clone().to(w.dtype)
        self._mk_cache = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """x [..., infeatures] (fp16 / bf16 / fp32, any strides) -> [..., outfeatures] in
        x's dtype."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
        if x.shape[-1] != self.infeatures:
            raise ValueError(f"x must have last dim infeatures = {self.infeatures}, got "
                             f"shape {list(x.shape)}")
        return self.grouped_weight().matmul(x, self.bias, x_name="x")

    def extra_repr(self) -> str:
        return (f"infeatures={self.infeatures}, outfeatures={self.outfeatures}, "
                f"bias={self.bias is not None}, bits={self.bits}, "
                f"group_size={self.group_size}")


def _linear_weight(linear: nn.Module, k: int, n: int) -> Tensor:
    """linear's weight as [N, K] (AutoGPTQ's pack: Conv2d flattened, Conv1D transposed)."""
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Module) or not isinstance(weight, Tensor):
        raise TypeError(f"linear must be an nn.Linear (or Conv1D / Conv2d) with a weight, "
                        f"got {type(linear).__name__}")
    w = weight.detach()
    if isinstance(linear, nn.Conv2d):
        w = w.flatten(1)
    elif type(linear).__name__ == "Conv1D":          # transformers.pytorch_utils.Conv1D
        w = w.t()
    if not w.is_floating_point() or list(w.shape) != [n, k]:
        raise ValueError(f"linear's weight must be a float [outfeatures, infeatures] = "
                         f"[{n}, {k}] matrix, got {w.dtype} {list(w.shape)}")
    return w


# ------------------------------------------------------------------ AutoGPTQ's helpers


def unpack_qzeros(qzeros: Tensor) -> Tensor:
    """4-bit qzeros int32 [groups, N / 8] -> the stored values int8 [groups, N] (v1: zero
    - 1; AutoGPTQ's ``qlinear_marlin.unpack_qzeros``)."""
    check_tensor("qzeros", qzeros, dtypes=(torch.int32,), ndim=2)
    shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
    z = (qzeros.unsqueeze(-1) >> shifts) & 0xF
    return z.reshape(qzeros.shape[0], -1).to(torch.int8)


def unpack_4bit_to_32bit_signed(qweight: Tensor, qzeros: Tensor) -> tuple[Tensor, Tensor]:
    """AutoGPTQ's ``qlinear_marlin.unpack_4bit_to_32bit_signed``: (q int8 [K, N] from
    qweight int32 [K / 8, N], zeros int8 [groups, N] with v1's + 1 applied)."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF          # [K / 8, 8, N]
    return q.reshape(-1, qweight.shape[1]).to(torch.int8), unpack_qzeros(qzeros) + 1


def dequantize_weight(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """AutoGPTQ's ``qlinear_marlin.dequantize_weight``: (W^T [N, K] in the scales' dtype,
    (q - zero) * scale rounded once, and the zero points per input row [K, N], int8 for
    4 bits (int16 for 8)). Reads ``layer.qweight``, ``qzeros``, ``scales`` (v1) and, where
    the layer has one, ``g_idx`` (AutoGPTQ's assumes sequential groups; the same
    result for those)."""
    bits = int(getattr(layer, "bits", 4))
    g_idx = getattr(layer, "g_idx", None)
    w = decode_gptq(layer.qweight, layer.qzeros, layer.scales, g_idx, False, False,
                    _check_bits("bits", bits), names=("qweight", "qzeros", "scales", "g_idx"))
    weight = w.dequantize().to(layer.scales.dtype)
    zeros = w.zeros[w.row_group].to(torch.int8 if bits == 4 else torch.int16)
    return weight.t(), zeros


def dequantize_qzeros(layer: nn.Module) -> Tensor:
    """AutoGPTQ's ``qlinear_marlin.dequantize_qzeros``: the stored 4-bit zeros (v1:
    zero - 1) of each input row, int8 [groups * group_size, N]."""
    return unpack_qzeros(layer.qzeros).repeat_interleave(int(layer.group_size), dim=0)


def dynamically_import_QuantLinear(use_triton: bool, desc_act: bool, group_size: int,
                                   bits: int, disable_exllama: bool | None = None,
                                   disable_exllamav2: bool = False, use_qigen: bool = False,
                                   use_marlin: bool = False, use_tritonv2: bool = False
                                   ) -> type[QuantLinear]:
    """AutoGPTQ's kernel chooser (``auto_gptq.utils.import_utils``): every choice is
    :class:`QuantLinear` here (one implementation; the flags are accepted and ignored),
    ``bits`` checked as the constructor does."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _AUTOGPTQ_BITS:
        raise UnsupportedBitsError(f"bits must be one of 2, 3, 4, 8, got {bits!r}")
    _check_bits("bits", bits)
    return QuantLinear


def autogptq_post_init(model: nn.Module, use_act_order: bool,
                       max_input_length: int | None = None) -> nn.Module:
    """AutoGPTQ's ``autogptq_post_init``: ``post_init()`` on every :class:`QuantLinear`
    of ``model``; returns model."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_init()
    return model
