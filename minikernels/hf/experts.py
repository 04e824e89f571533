"""``experts_implementation="minikernels"``: transformers' mixture-of-experts layers on
:func:`minikernels.ops.fused_moe`.

transformers 5 routes every decorated experts module (``@use_experts_implementation``:
Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, ...) through ``ExpertsInterface``;
:func:`register` (run when ``minikernels.hf`` is imported) adds :func:`experts_forward`
under ``"minikernels"``, so

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="minikernels")
    model.set_experts_implementation("minikernels")      # or on a loaded model

run the experts as one fused op instead of a Python loop over experts. The module's
weights are used as they are: ``gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
``down_proj`` [E, H, I], SiLU- or GELU-gated (exact or tanh: Gemma 4's experts; the
module's ``act_fn`` is probed numerically), or non-gated (``has_gate=False``: ``up_proj``
[E, I, H] and ``down_proj``, Nemotron 3's squared-ReLU experts), no biases; any other
layout (transposed, interleaved, biased, another activation, a post-expert norm) raises
NotImplementedError naming it, so it is never computed wrongly. The router stays transformers'; its top-k weights are
applied in fp32 and the k experts summed in fp32 (transformers: in the model dtype).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

NAME = "minikernels"


def _activation(act: object, gated: bool = True) -> str | None:
    """"silu" / "gelu" / "gelu_tanh" (and, non-gated, "relu2") for the experts'
    ``act_fn``, else None."""
    if isinstance(act, nn.SiLU):
        return "silu"
    from .kernelize import _activation as probe
    name = probe(act)
    if name is None and not gated and callable(act):
        x = torch.linspace(-8.0, 8.0, 161)
        with torch.no_grad():
            try:
                got = act(x)
            except Exception:  # noqa: BLE001 - not an elementwise activation
                return None
        if isinstance(got, Tensor) and got.shape == x.shape and \
                torch.allclose(got.float(), torch.relu(x).square(), rtol=1e-5, atol=1e-6):
            name = "relu2"
    return name


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """The experts of ``self`` on ``hidden_states`` [T, H]: top_k_index [T, k] expert ids,
    top_k_weights [T, k] their router weights -> [T, H] in the hidden states' dtype."""
    gated = getattr(self, "has_gate", True)
    unsupported = [name for name, bad in (
        ("has_bias", getattr(self, "has_bias", False)),
        ("is_transposed", getattr(self, "is_transposed", False)),
        ("interleaved gate / up (is_concatenated=False)",
         not getattr(self, "is_concatenated", True)),
        ("has_post_expert_norm", getattr(self, "has_post_expert_norm", False)),
        ("activation other than SiLU / GELU (non-gated: or squared ReLU)",
         _activation(getattr(self, "act_fn", None), gated) is None),
    ) if bad]
    if unsupported:
        raise NotImplementedError(f"experts_implementation={NAME!r} does not support "
                                  f"{type(self).__name__}: {', '.join(unsupported)}; use "
                                  "'eager' or 'grouped_mm'")
    w13 = self.gate_up_proj if gated else self.up_proj
    w2 = self.down_proj
    x = hidden_states
    if w13.dtype != x.dtype:
        x = x.to(w13.dtype)
    out = ops.fused_moe(x, w13, w2, top_k_weights.float(), top_k_index,
                        activation=_activation(self.act_fn, gated), gated=gated)
    return out.to(hidden_states.dtype)


def register(name: str = NAME) -> bool:
    """Register :func:`experts_forward` with transformers' ``ExpertsInterface`` under
    ``name`` (idempotent). False when this transformers has no experts interface (before
    5.x): the experts then keep transformers' own forward."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(name, experts_forward)
    return True


__all__ = ["NAME", "experts_forward", "register"]
