from .layers import PagedAttention, RMSNorm, RotaryEmbedding  # noqa: F401  (models helper)
