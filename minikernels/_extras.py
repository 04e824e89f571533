"""Optional extras: which ``pip install`` brings a missing module, said in one line.

    [hf]     transformers, tokenizers          (a HF checkpoint's tokenizer)
    [serve]  fastapi, starlette, pydantic, uvicorn, h11 (+ [hf])    (minikernels serve)
    [bench]  matplotlib, pytest-benchmark (+ transformers)           (plots, bench/)
    [structured]  xgrammar                    (structured outputs; also in [serve])
"""
from __future__ import annotations

#: importable module -> the extra that installs it
EXTRA_OF = {
    "transformers": "hf", "tokenizers": "hf", "sentencepiece": "hf", "jinja2": "hf",
    "fastapi": "serve", "starlette": "serve", "pydantic": "serve", "uvicorn": "serve",
    "h11": "serve", "matplotlib": "bench", "pytest_benchmark": "bench",
    "xgrammar": "structured",
}


def install_hint(extra: str) -> str:
    return (f"pip install 'minikernels[{extra}]' (in a checkout: "
            f"pip install -e '.[{extra}]')")


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str | None = None, what: str | None = None) -> None:
        extra = extra or EXTRA_OF.get(module.split(".")[0])
        need = f"{what} needs" if what else "needs"
        hint = install_hint(extra) if extra else f"pip install {module}"
        super().__init__(f"{need} {module}, which is not installed: {hint}".strip(),
                         name=module)
        self.extra = extra


def missing_extra_message(exc: ImportError, what: str | None = None) -> str | None:
    """The one-line message for an ImportError of a module an extra provides, else None."""
    if isinstance(exc, MissingExtraError):
        return str(exc)
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name in EXTRA_OF:
        return str(MissingExtraError(name, what=what))
    return None
