"""Decoder models on minikernels ops, and HF checkpoint loading."""
from .metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
