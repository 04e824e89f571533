"""minikernels inside Hugging Face transformers models.

    import minikernels.hf                      # registers attn_implementation="minikernels"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="minikernels")
    model.set_attn_implementation("minikernels")            # or on a loaded model
    summary = minikernels.hf.kernelize(model, rms_norm=True, mlp=True, quantize=None)

Importing this module registers the attention (:mod:`minikernels.hf.attention`) with
transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; :func:`register` does
it again under another name. :func:`kernelize` (:mod:`minikernels.hf.kernelize`) swaps
norms, residual adds and MLPs for the fused ops, optionally int4. Inference only.
See docs/hf.md.
"""
from .attention import NAME, attention_forward, attention_mask, register
from .kernelize import GateUpMLP, KernelizeSummary, RMSNorm, kernelize

register()

__all__ = ["NAME", "GateUpMLP", "KernelizeSummary", "RMSNorm", "attention_forward",
           "attention_mask", "kernelize", "register"]
