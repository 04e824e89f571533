"""minikernels inside Hugging Face transformers models.

    import minikernels.hf                      # registers attn_implementation="minikernels"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="minikernels",
                                                 experts_implementation="minikernels")
    model.set_attn_implementation("minikernels")            # or on a loaded model
    summary = minikernels.hf.kernelize(model, rms_norm=True, mlp=True, quantize=None)

Importing this module registers the attention (:mod:`minikernels.hf.attention`) with
transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, and the MoE experts
(:mod:`minikernels.hf.experts`, ``mk.ops.fused_moe``) with its ``ExpertsInterface``;
:func:`register` does it again under another name. :func:`kernelize` (:mod:`minikernels.hf.kernelize`) swaps
norms, residual adds and MLPs for the fused ops, optionally quantizing the Linears and
(:func:`quantize_experts`) the MoE experts to int4 / fp8 / int8. Inference only.
See docs/hf.md.
"""
from . import experts
from .attention import NAME, attention_forward, attention_mask
from .attention import register as _register_attention
from .experts import experts_forward, quantize_experts
from .kernelize import GateUpMLP, KernelizeSummary, RMSNorm, kernelize


def register(name: str = NAME) -> None:
    """Register the attention and the experts with transformers under ``name``
    (idempotent): ``attn_implementation=name`` and ``experts_implementation=name``."""
    _register_attention(name)
    experts.register(name)


register()

__all__ = ["NAME", "GateUpMLP", "KernelizeSummary", "RMSNorm", "attention_forward",
           "attention_mask", "experts_forward", "kernelize", "quantize_experts", "register"]
