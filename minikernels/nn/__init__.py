"""Drop-in modules: Int4Linear, Fp8Linear, Int8Linear and quantize_model (int4 / fp8 /
int8), plus the model layers."""
from .fp8_linear import Fp8Linear
from .int4_linear import Int4Linear
from .int8_linear import Int8Linear
from .layers import (LayerNorm, PagedAttention, QuantizedActivation,  # noqa: F401
                     RMSNorm, RotaryEmbedding)
from .quantize import quantize_model

__all__ = ["Fp8Linear", "Int4Linear", "Int8Linear", "LayerNorm", "PagedAttention",
           "QuantizedActivation", "RMSNorm", "RotaryEmbedding", "quantize_model"]
