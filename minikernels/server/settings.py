"""Server settings that the command line needs before anything heavy is imported.

``minikernels serve --help`` shows these defaults; importing this module loads neither
fastapi nor torch (tests/test_first_hour.py checks that ``serve --help`` stays quick).
"""
from __future__ import annotations

from dataclasses import dataclass

#: environment variable holding the API key when --api-key is not given
API_KEY_ENV = "MINIKERNELS_API_KEY"

#: --reasoning-parser choices (:mod:`.reasoning`)
REASONING_PARSERS = ("deepseek_r1", "qwen3")

#: --tool-call-parser choices (the parsers of :mod:`.tool_parsers`, vLLM's names)
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic", "mistral", "granite",
                     "phi4_mini_json")


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one HTTP request.

    max_body_bytes:   largest request body accepted (413 beyond).
    body_timeout_s:   the whole body must arrive within this many seconds (408 after).
    header_timeout_s: the request line and headers must arrive within this many seconds of
                      the connection becoming ready for a request (closed after).
    max_prompts:      most prompts in one completions request (400 beyond).
    max_json_depth:   deepest JSON nesting accepted (400 beyond).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_prompts: int = 256
    max_json_depth: int = 32
