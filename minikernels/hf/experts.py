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


def _check_layout(self: nn.Module) -> None:
    """Raise NotImplementedError naming what of an experts module's layout the fused ops
    do not compute (biases, transposed / interleaved weights, a post-expert norm, another
    activation)."""
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


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """The experts of ``self`` on ``hidden_states`` [T, H]: top_k_index [T, k] expert ids,
    top_k_weights [T, k] their router weights -> [T, H] in the hidden states' dtype."""
    gated = getattr(self, "has_gate", True)
    _check_layout(self)
    kw = {"activation": _activation(self.act_fn, gated), "gated": gated}
    tw = top_k_weights.float()
    method = getattr(self, QUANTIZED_ATTR, None)
    if method is not None:
        return _quantized_forward(self, method, hidden_states, top_k_index, tw, kw)
    w13 = self.gate_up_proj if gated else self.up_proj
    w2 = self.down_proj
    x = hidden_states
    if w13.dtype != x.dtype:
        x = x.to(w13.dtype)
    out = ops.fused_moe(x, w13, w2, tw, top_k_index, **kw)
    return out.to(hidden_states.dtype)


# --------------------------------------------------------------- quantized experts
# quantize_experts stores each experts module's two weight stacks as buffers (w13 = its
# gate_up_proj, or up_proj when not gated; w2 = its down_proj) in one format and removes
# the dense Parameters; experts_forward then runs the matching fused op:
#   "int8"  w13_int8 / w2_int8 int8 [E, N, K] + w13_scale / w2_scale fp32 [E, N]
#           (per-row RTN), run W8A8: ops.fused_moe_int8_w8a8 (as Int8Linear runs the
#           linears of quantize_model(method="int8"))
#   "fp8"   w13_fp8 / w2_fp8 [E, N, K] (the e4m3 bytes, uint8) + block scales fp32
#           [E, ceil(N / bn), ceil(K / bk)] (RTN per expert), run W8A16:
#           ops.fused_moe_fp8 (as Fp8Linear)
#   "int4"  w13_qweight / w2_qweight int32 [E, N, K / 8] + scales / zeros [E, N, K / G]
#           (the canonical int4 layout, asymmetric RTN), run W4A16: ops.fused_moe_int4
QUANTIZED_ATTR = "minikernels_quantized"
EXPERT_METHODS = ("int4", "fp8", "int8")


def _weights(module: nn.Module) -> tuple[str, str]:
    """The names of an experts module's two dense weight stacks (w13, w2)."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def _int4_group(group_size: int, h: int, inter: int) -> int:
    """The int4 group: ``group_size``, halved (down to 8) until it divides H and I."""
    g = group_size
    while g > 8 and (h % g or inter % g):
        g //= 2
    if h % g or inter % g or g % 8:
        raise ValueError(f"no int4 group (a multiple of 8 <= {group_size}) divides both "
                         f"H ({h}) and I ({inter})")
    return g


@torch.no_grad()
def _quantize_module(module: nn.Module, method: str, group_size: int,
                     block_size: tuple[int, int]) -> None:
    from ..quant.fp8 import quantize_fp8
    from ..quant.int4 import quantize_int4
    from ..quant.int8 import quantize_int8

    names = _weights(module)
    dense = [getattr(module, n) for n in names]
    e = dense[0].shape[0]
    if method == "int4":
        group = _int4_group(group_size, dense[0].shape[2], dense[1].shape[2])
        module.minikernels_group_size = group
    for prefix, w in zip(("w13", "w2"), dense):
        n, k = w.shape[1], w.shape[2]
        if method == "int8":
            q = quantize_int8(w.reshape(e * n, k))
            bufs = {"int8": q.weight.reshape(e, n, k), "scale": q.scale.reshape(e, n)}
        elif method == "fp8":
            parts = [quantize_fp8(w[i], block_size) for i in range(e)]
            # the e4m3 bytes as uint8: model.to(dtype) converts every floating buffer,
            # float8 included, and would turn them into plain values
            bufs = {"fp8": torch.stack([p.weight for p in parts]).view(torch.uint8),
                    "scale": torch.stack([p.scale for p in parts])}
        else:
            q = quantize_int4(w.reshape(e * n, k), group)
            bufs = {"qweight": q.qweight.reshape(e, n, -1),
                    "scales": q.scales.reshape(e, n, -1), "zeros": q.zeros.reshape(e, n, -1)}
        for key, value in bufs.items():
            module.register_buffer(f"{prefix}_{key}", value.contiguous())
    for name in names:
        delattr(module, name)
    if method == "fp8":
        module.minikernels_block_size = tuple(int(b) for b in block_size)
    setattr(module, QUANTIZED_ATTR, method)


def _quantized_forward(module: nn.Module, method: str, hidden_states: Tensor,
                       top_k_index: Tensor, tw: Tensor, kw: dict) -> Tensor:
    m, x = module, hidden_states
    # (.float(): a model.to(bf16) also converts the fp32 scale buffers)
    if method == "int8":
        out = ops.fused_moe_int8_w8a8(x, m.w13_int8, m.w13_scale.float(), m.w2_int8,
                                      m.w2_scale.float(), tw, top_k_index, **kw)
    elif method == "fp8":
        fp8 = torch.float8_e4m3fn
        out = ops.fused_moe_fp8(x, m.w13_fp8.view(fp8), m.w13_scale.float(),
                                m.w2_fp8.view(fp8), m.w2_scale.float(), tw, top_k_index,
                                m.minikernels_block_size, **kw)
    else:   # int4: fp16 / bf16 activations (an fp32 model's round to the scales' dtype)
        sd = m.w13_scales.dtype
        xin = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(sd)
        out = ops.fused_moe_int4(xin, m.w13_qweight, m.w13_scales, m.w13_zeros,
                                 m.w2_qweight, m.w2_scales, m.w2_zeros, tw, top_k_index,
                                 m.minikernels_group_size, **kw)
    return out.to(hidden_states.dtype)


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers' experts modules of ``model`` (3-D gate_up_proj / up_proj and
    down_proj Parameters, routed through ExpertsInterface), not yet quantized."""
    found = []
    for name, module in model.named_modules():
        if getattr(module, QUANTIZED_ATTR, None) is not None:
            continue
        w13, w2 = (getattr(module, n, None) for n in _weights(module))
        if isinstance(w13, nn.Parameter) and isinstance(w2, nn.Parameter) and \
                w13.dim() == 3 and w2.dim() == 3 and hasattr(module, "act_fn"):
            found.append((name, module))
    return found


def quantize_experts(model: nn.Module, method: str = "int8", group_size: int = 128,
                     block_size: tuple[int, int] = (128, 128)) -> dict[str, str]:
    """Quantize the experts of a transformers mixture-of-experts model in place (RTN, as
    :func:`minikernels.quantize_model` does its Linears): ``method`` "int8" (per-row
    scales, run W8A8: ``ops.fused_moe_int8_w8a8``), "fp8" (``block_size`` blocks per
    expert, run W8A16: ``ops.fused_moe_fp8``) or "int4" (asymmetric, groups of
    ``group_size`` halved until they divide H and I: ``ops.fused_moe_int4``). Each
    experts module's dense ``gate_up_proj`` (``up_proj``) / ``down_proj`` Parameters are
    replaced by buffers (state_dict keys ``w13_*`` / ``w2_*``), and the model's experts
    implementation is set to "minikernels" (transformers' eager experts cannot read
    them). Returns {module name: method, or why it stayed dense} (a layout
    :func:`experts_forward` refuses stays dense). Needs transformers' experts interface
    (5.x): raises RuntimeError without it."""
    if method not in EXPERT_METHODS:
        raise ValueError(f"method must be one of {EXPERT_METHODS}, got {method!r}")
    found = _experts_modules(model)
    if not found:
        return {}
    if not register() or not hasattr(model, "set_experts_implementation"):
        raise RuntimeError("quantize_experts needs transformers' experts interface "
                           "(transformers 5.x: model.set_experts_implementation)")
    done: dict[str, str] = {}
    for name, module in found:
        try:
            _check_layout(module)
            _quantize_module(module, method, group_size, tuple(block_size))
            done[name] = method
        except (NotImplementedError, ValueError) as exc:
            done[name] = f"kept dense: {exc}"
    model.set_experts_implementation(NAME)
    return done


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


__all__ = ["EXPERT_METHODS", "NAME", "experts_forward", "quantize_experts", "register"]
