"""Drop-in modules: Int4Linear and quantize_model (int4), plus the model layers."""
from .int4_linear import Int4Linear
from .layers import PagedAttention, RMSNorm, RotaryEmbedding  # noqa: F401  (models helper)
from .quantize import quantize_model

__all__ = ["Int4Linear", "PagedAttention", "RMSNorm", "RotaryEmbedding", "quantize_model"]
