"""Default sampling parameters from a checkpoint's ``generation_config.json``.

Model authors ship their recommended sampling there (Qwen2.5-Instruct: temperature 0.7,
top_p 0.8, top_k 20, repetition_penalty 1.05). Like vLLM's ``--generation-config``:

- ``"auto"`` (default): the model directory's generation_config.json;
- ``"vllm"`` / ``"none"``: ignore it (SamplingParams' own defaults);
- a directory path: that directory's generation_config.json.

Only the sampling fields vLLM takes are read: temperature, top_p, top_k, min_p,
repetition_penalty and max_new_tokens (as ``max_tokens``); ``do_sample`` is ignored, as
vLLM does. The defaults fill only what a request leaves unset (``LLM.generate`` without
sampling params; a server request without the field).
"""
from __future__ import annotations

import json
import os
from typing import Any

from .sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                   "max_new_tokens": "max_tokens"}
IGNORE = ("vllm", "none")


def sampling_defaults(model_dir: str | None, generation_config: str = "auto"
                      ) -> dict[str, Any]:
    """The SamplingParams fields that ``generation_config`` sets (see the module doc).

    model_dir: the model's directory, or None for a built-in / in-memory model (then
    "auto" gives no defaults). Raises ValueError naming the file and field when a value
    is one SamplingParams refuses, FileNotFoundError for a missing explicit directory.
    """
    if not isinstance(generation_config, str):
        raise TypeError(f"generation_config must be 'auto', 'vllm' or a directory, got "
                        f"{type(generation_config).__name__}")
    if generation_config.lower() in IGNORE:
        return {}
    if generation_config == "auto":
        if model_dir is None or not os.path.isdir(model_dir):
            return {}
        folder = model_dir
    elif os.path.isdir(generation_config):
        folder = generation_config
    else:
        raise FileNotFoundError(f"generation_config must be 'auto', 'vllm' or a directory "
                                f"holding generation_config.json; {generation_config!r} is "
                                f"not a directory")
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    out = {field: raw[key] for key, field in SAMPLING_FIELDS.items()
           if raw.get(key) is not None}
    if out.get("top_k") == 0:          # transformers' "no top-k"
        out["top_k"] = -1
    for field, value in out.items():    # each value as SamplingParams validates it
        try:
            SamplingParams(**{field: value})
        except (TypeError, ValueError) as exc:
            key = next(k for k, f in SAMPLING_FIELDS.items() if f == field)
            raise ValueError(f"{path}: {key} = {value!r} is not usable: {exc}") from None
    return out
