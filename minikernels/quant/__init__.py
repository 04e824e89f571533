"""int4 weight-only quantization: the format, an RTN quantizer, GPTQ/AWQ import.

    w4 = mk.quant.quantize_int4(linear.weight, group_size=128)   # -> Int4Weight
    w4 = mk.quant.from_gptq(qweight, qzeros, scales, g_idx)      # lossless import
    y = mk.ops.int4_matmul(x, w4.qweight, w4.scales, w4.zeros, w4.group_size)

Format: docs/int4_format.md (canonical layout in minikernels.ops.reference).
"""
from .checkpoints import (AWQ_ORDER, compressed_tensors_scheme, from_awq,
                          from_compressed_tensors, from_gptq, to_awq, to_gptq)
from .int4 import GROUP_SIZES, Int4Weight, pack_int4, quantize_int4
from .packing import pack_nibbles, unpack_nibbles

__all__ = ["AWQ_ORDER", "GROUP_SIZES", "Int4Weight", "compressed_tensors_scheme", "from_awq",
           "from_compressed_tensors", "from_gptq", "pack_int4",
           "pack_nibbles", "quantize_int4", "to_awq", "to_gptq", "unpack_nibbles"]
