"""Pooling a decoder's hidden states into one embedding per input (embedding models such as
Qwen3-Embedding, and any decoder checkpoint served with ``--task embed``).

The pooling is read from the checkpoint's sentence-transformers files when it has them
(``modules.json`` naming a ``Pooling`` module whose ``config.json`` sets
``pooling_mode_lasttoken`` / ``pooling_mode_mean_tokens`` / ``pooling_mode_cls_token``, and
a ``Normalize`` module for L2 normalization); without them it is vLLM's default for
decoder models: the last token, normalized.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

POOLING_MODES = ("last", "mean", "cls")
# sentence-transformers Pooling config key -> our mode
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class PoolingConfig:
    """How hidden states [T, H] of a varlen batch become one vector per input."""

    mode: str = "last"        # "last" | "mean" | "cls" (the first token)
    normalize: bool = True    # L2-normalize the pooled vector

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")

    @property
    def last_only(self) -> bool:
        """Whether the forward needs only each input's last row."""
        return self.mode == "last"

    @classmethod
    def from_checkpoint(cls, model_dir: str | None) -> "PoolingConfig":
        """The checkpoint's sentence-transformers pooling, else (last, normalized)."""
        modules_path = os.path.join(model_dir, "modules.json") if model_dir else None
        if not modules_path or not os.path.isfile(modules_path):
            return cls()
        with open(modules_path, encoding="utf-8") as f:
            modules = json.load(f)
        if not isinstance(modules, list):
            raise ValueError(f"{modules_path}: expected a list of modules")
        mode, normalize = "last", False
        for m in modules:
            kind = str(m.get("type", "")) if isinstance(m, dict) else ""
            if kind.endswith("Normalize"):
                normalize = True
            elif kind.endswith("Pooling"):
                mode = _read_pooling_mode(os.path.join(model_dir or "", m.get("path", "")))
        return cls(mode, normalize)


def _read_pooling_mode(pooling_dir: str) -> str:
    path = os.path.join(pooling_dir, "config.json")
    if not os.path.isfile(path):
        return "last"
    with open(path, encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    chosen = [mode for key, mode in _ST_MODES.items() if cfg.get(key)]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
              and k not in _ST_MODES]
    if others or len(chosen) > 1:
        raise ValueError(f"{path}: pooling {sorted(others) + chosen} is not supported "
                         f"(one of {sorted(_ST_MODES)})")
    return chosen[0] if chosen else "last"


def pool(hidden: Tensor, lengths: Sequence[int], config: PoolingConfig) -> Tensor:
    """One fp32 vector per input.

    hidden: [B, H] (each input's last row, when ``config.last_only``) or [T, H] (all rows
    of the inputs, packed back to back with ``lengths``). Returns [B, H] fp32, L2-normalized
    when ``config.normalize`` (mean pooling averages in fp32)."""
    h = hidden.float()
    if config.mode == "last":
        out = h if h.shape[0] == len(lengths) else \
            h[torch.tensor(lengths, device=h.device).cumsum(0) - 1]
    else:
        starts = torch.tensor([0, *lengths[:-1]], device=h.device).cumsum(0)
        if config.mode == "cls":
            out = h[starts]
        else:
            seg = torch.repeat_interleave(torch.arange(len(lengths), device=h.device),
                                          torch.tensor(list(lengths), device=h.device))
            out = torch.zeros(len(lengths), h.shape[1], device=h.device).index_add_(0, seg, h)
            out = out / torch.tensor(list(lengths), device=h.device,
                                     dtype=torch.float32).unsqueeze(1)
    return torch.nn.functional.normalize(out, dim=-1) if config.normalize else out
