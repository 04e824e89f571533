"""Model names -> local checkpoint directories: a path, a built-in name, or a Hugging Face
hub id ("Qwen/Qwen2.5-0.5B-Instruct"), as vLLM and transformers accept them.

A hub id resolves through ``huggingface_hub.snapshot_download``, so everything users of
transformers know applies: the cache (``HF_HOME`` / ``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``, layout ``models--org--name/snapshots/<commit>/``),
``HF_HUB_OFFLINE=1`` (cache only, no network), ``revision`` (branch, tag or commit), the
token from ``HF_TOKEN`` or ``hf auth login``, and its progress bars. Only the files the
loader reads are downloaded: safetensors weights (+ index), config.json,
generation_config.json and the tokenizer files; never pickle ``*.bin`` / ``*.pt``.
"""
from __future__ import annotations

import os
import re
from typing import Any

#: what a snapshot download fetches (everything load_model and load_tokenizer read)
ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json",                     # weights
    "config.json", "generation_config.json", "quantize_config.json",  # configs (+ old GPTQ)
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",                                             # tokenizer
    "modules.json", "*Pooling/config.json",                           # embedding pooling
)

# org/name (or a bare name), HF's repo-id alphabet; no leading "." or "/" (paths).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def is_hub_id(model: str) -> bool:
    """Whether ``model`` looks like a hub repo id ("org/name") rather than a path."""
    return bool(_REPO_ID.match(model)) and "--" not in model and ".." not in model \
        and not model.endswith((".json", ".safetensors"))


def _hub_errors() -> dict[str, type]:
    import huggingface_hub

    mod: Any = getattr(huggingface_hub, "errors", None) or huggingface_hub.utils
    names = ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError",
             "LocalEntryNotFoundError", "HFValidationError")
    return {n: getattr(mod, n, None) or getattr(huggingface_hub.utils, n) for n in names}


def resolve_model(model: str, revision: str | None = None) -> str:
    """The local directory for ``model``: a directory or a built-in name is returned as is;
    a hub id is looked up in (and if needed downloaded into) the hub cache.

    Raises FileNotFoundError (not found, offline and not cached) or PermissionError (gated
    or private without a token), each with a one-line message saying what to do.
    """
    from .config import list_models

    if os.path.isdir(model) or model.lower() in list_models():
        return model
    if os.path.exists(model) or not is_hub_id(model):
        return model  # the loader says what is wrong with it
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise FileNotFoundError(f"{model!r} looks like a Hugging Face hub id, and resolving "
                                "it needs huggingface_hub: pip install huggingface_hub") from None
    err = _hub_errors()
    where = f"{model}" + (f" (revision {revision})" if revision else "")
    try:
        return snapshot_download(model, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    except err["GatedRepoError"]:
        raise PermissionError(f"{where} is gated on the Hugging Face hub: accept its terms on "
                              "huggingface.co and set HF_TOKEN (or run `hf auth login`)") \
            from None
    except err["RepositoryNotFoundError"]:
        raise FileNotFoundError(f"{where} is neither a local directory nor a model on the "
                                "Hugging Face hub (if it is private, set HF_TOKEN)") from None
    except err["RevisionNotFoundError"]:
        raise FileNotFoundError(f"{model}: no revision {revision!r} on the Hugging Face hub") \
            from None
    except err["LocalEntryNotFoundError"]:
        raise FileNotFoundError(_not_cached(where)) from None
    except err["HFValidationError"]:
        return model
    except OSError as exc:  # network errors (requests / httpx raise OSError subclasses)
        raise FileNotFoundError(f"cannot download {where} from the Hugging Face hub "
                                f"({type(exc).__name__}); check the network, or set "
                                "HF_HUB_OFFLINE=1 to use the local cache only") from None


def _not_cached(where: str) -> str:
    from huggingface_hub import constants

    from .config import list_models

    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else \
        " and the hub is not reachable"
    return (f"{where} is neither a local directory nor a built-in name "
            f"({', '.join(list_models())}), and as a hub id it is not in the Hugging Face "
            f"cache {constants.HF_HUB_CACHE}{offline}; download it (hf download MODEL) or "
            "pass a local directory")
