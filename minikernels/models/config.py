"""DecoderConfig: the one config the decoder reads, from a HF config.json or a built-in name.

Covers the Llama family (Llama 2/3/3.1/3.2, Mistral) and Qwen2/2.5/Qwen3: pre-norm decoder,
GQA attention with neox rotary, SiLU-gated MLP. Differences are flags:

    qkv_bias        Qwen2 (q/k/v biases); Llama's ``attention_bias`` also sets o_bias
    qk_norm         Qwen3 (RMSNorm over each q/k head before rotary)
    rope_scaling    Llama 3.1/3.2 ("llama3"), "linear"
    sliding_window  Mistral v0.1 (all layers), Qwen2 with use_sliding_window (layers >=
                    max_window_layers); ``layer_types`` in a config says it per layer
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# HF ``architectures`` entry -> our architecture family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config feature is not implemented."""


@dataclass
class DecoderConfig:
    """Shape and flavour of a decoder (fields follow HF names where one exists)."""

    architecture: str                      # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    sliding_window: int | None = None
    # Layers that use the sliding window (None = all layers when sliding_window is set).
    sliding_window_layers: list[int] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # HF quantization_config (GPTQ/AWQ checkpoints), None for dense checkpoints.
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str | None = None         # the checkpoint's stored dtype, informational
    hf_architecture: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported "
                                        "(only silu-gated MLPs)")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_left(self, layer: int) -> int:
        """Keys a token may look back on in ``layer`` (flash_attention's window_left), -1 = all."""
        if self.sliding_window is None:
            return -1
        if self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return -1
        # HF: key j is visible to query i when i - j < sliding_window.
        return self.sliding_window - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ from HF
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
                ) -> "DecoderConfig":
        """Build from a HF config.json dict (transformers 4.x or 5.x spelling)."""
        archs = list(hf.get("architectures") or [])
        family = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[a]
                break
        if family is None and not archs:
            family = _MODEL_TYPES.get(str(hf.get("model_type", "")))
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        text = hf.get("text_config")
        if isinstance(text, Mapping):  # nested configs are not decoder-only checkpoints
            raise UnsupportedModelError("multimodal configs (text_config) are not supported")

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ValueError(f"config.json is missing {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)

        # Rope: transformers 5 writes rope_parameters; 4.x and most hub checkpoints
        # write rope_theta + rope_scaling.
        params = hf.get("rope_parameters")
        if isinstance(params, Mapping) and params:
            rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        else:
            rope_theta = float(hf.get("rope_theta", 10000.0))
            scaling = dict(hf.get("rope_scaling") or {})
        kind = str(scaling.get("rope_type", scaling.get("type", "default"))) if scaling else \
            "default"
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported "
                                        "(supported: default, linear, llama3)")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        rope_scaling = None if kind == "default" else {**scaling, "rope_type": kind}

        # Sliding window.
        window = hf.get("sliding_window")
        window_layers: list[int] | None = None
        layer_types = hf.get("layer_types")
        num_layers = int(need("num_hidden_layers"))
        if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        if window is not None:
            if isinstance(layer_types, list) and layer_types:
                window_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            elif family in ("qwen2", "qwen3"):
                start = int(hf.get("max_window_layers", num_layers))
                window_layers = list(range(start, num_layers))
            if window_layers is not None and not window_layers:
                window = None
                window_layers = None

        eos: list[int] = []
        for src in (generation_config or {}, hf):
            e = src.get("eos_token_id")
            for v in (e if isinstance(e, list) else [e]):
                if v is not None and int(v) not in eos:
                    eos.append(int(v))
        bos = hf.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")

        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=eos,
            bos_token_id=None if bos is None else int(bos),
            sliding_window=None if window is None else int(window),
            sliding_window_layers=window_layers,
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family in ("llama", "mistral", "qwen3") and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            hidden_act=str(hf.get("hidden_act", "silu")),
            quantization_config=dict(hf["quantization_config"])
            if hf.get("quantization_config") else None,
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            hf_architecture=archs[0] if archs else None,
        )


# ----------------------------------------------------------------- built-in names
# Shapes from the published config.json of each model (weights are random: dummy models
# for benchmarks, memory planning and engine tests without a download).

_LLAMA3_EOS = [128001, 128008, 128009]
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, eos_token_ids=[257], bos_token_id=256),
    "tiny-qwen3": dict(architecture="qwen3", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=2048, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[257],
                       bos_token_id=256, qk_norm=True),
    "qwen2.5-0.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_ids=[151645, 151643], bos_token_id=151643, qkv_bias=True),
    "qwen2.5-1.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_ids=[151645, 151643], bos_token_id=151643, qkv_bias=True),
    "qwen3-0.6b": dict(architecture="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True,
                       eos_token_ids=[151645, 151643], bos_token_id=151643, qk_norm=True),
    "llama-3.2-1b": dict(architecture="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         eos_token_ids=list(_LLAMA3_EOS), bos_token_id=128000),
    "llama-3.1-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         eos_token_ids=list(_LLAMA3_EOS), bos_token_id=128000),
    "llama-3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False,
                       eos_token_ids=[128001, 128009], bos_token_id=128000),
    "mistral-7b": dict(architecture="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_ids=[2],
                       bos_token_id=1),
}
# The tiny configs use the byte tokenizer (ids 0..255 bytes, 256 <bos>, 257 <eos>, ...);
# the others use their real vocab sizes, and dummy generations decode only byte ids.


def list_models() -> list[str]:
    """Built-in model names (random weights; see :func:`minikernels.models.load_model`)."""
    return list(BUILTIN_CONFIGS)


def builtin_config(name: str) -> DecoderConfig:
    key = name.lower()
    if key not in BUILTIN_CONFIGS:
        raise KeyError(f"unknown built-in model {name!r}; built-in names: {list_models()}")
    return DecoderConfig(**{k: (list(v) if isinstance(v, list) else
                               dict(v) if isinstance(v, dict) else v)
                            for k, v in BUILTIN_CONFIGS[key].items()})
