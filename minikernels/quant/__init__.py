"""Weight quantization: int4 (the format, an RTN quantizer, GPTQ/AWQ import), fp8 and
int8 (W8A8).

    w4 = mk.quant.quantize_int4(linear.weight, group_size=128)   # -> Int4Weight
    w4 = mk.quant.from_gptq(qweight, qzeros, scales, g_idx)      # lossless import
    y = mk.ops.int4_matmul(x, w4.qweight, w4.scales, w4.zeros, w4.group_size)

    w8 = mk.quant.quantize_fp8(linear.weight, (128, 128))        # -> Fp8Weight
    y = mk.ops.fp8_matmul(x, w8.weight, w8.scale, w8.block_size)

    wi8 = mk.quant.quantize_int8(linear.weight)                  # -> Int8Weight (W8A8)
    x_q, x_s, _ = mk.ops.scaled_int8_quant(x)
    y = mk.ops.scaled_mm(x_q, wi8.weight.t(), x_s, wi8.scale, x.dtype)

Format: docs/int4_format.md (canonical layout in minikernels.ops.reference); fp8:
:mod:`minikernels.quant.fp8`; int8: :mod:`minikernels.quant.int8`.
"""
from .checkpoints import (AWQ_ORDER, compressed_tensors_scheme, from_awq,
                          from_compressed_tensors, from_gptq, module_quantization, to_awq,
                          to_gptq)
from .fp8 import Fp8Weight, quantize_fp8
from .int8 import Int8Weight, int8_scheme, quantize_int8
from .int4 import GROUP_SIZES, Int4Weight, pack_int4, quantize_int4
from .packing import pack_nibbles, unpack_nibbles

__all__ = ["AWQ_ORDER", "Fp8Weight", "GROUP_SIZES", "Int4Weight", "Int8Weight",
           "compressed_tensors_scheme", "from_awq", "from_compressed_tensors", "from_gptq",
           "int8_scheme", "module_quantization", "pack_int4", "pack_nibbles", "quantize_fp8", "quantize_int4",
           "quantize_int8", "to_awq", "to_gptq", "unpack_nibbles"]
