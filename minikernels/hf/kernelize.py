"""``kernelize(model)``: swap a transformers model's norms and MLPs for minikernels' fused ops.

In place, inference only:

- RMSNorm: every leaf module with a 1-D ``weight`` and an ``eps`` / ``variance_epsilon``
  whose output equals ``x / rms(x) * weight`` or Gemma's ``x / rms(x) * (1 + weight)``
  (checked numerically on a probe, so Llama / Qwen2 / Qwen3 / Mistral / Gemma 1-3 norms,
  q_norm / k_norm and any look-alike qualify) becomes :class:`RMSNorm` on
  ``mk.ops.rms_norm`` (``weight_offset`` 0 or 1), sharing the same weight Parameter.
- Residual add: a decoder layer whose forward is transformers' Llama-style pre-norm block
  (Llama, Qwen2, Qwen3, Mistral, Gemma; checked against the installed source, not the
  class name)
  gets a forward where ``post_attention_layernorm`` takes the residual:
  ``rms_norm(attn, w, eps, residual=h)`` returns (norm(attn + h), attn + h) in one kernel.
  Other layer classes keep their forward (listed in the summary).
- MLP: a module with ``gate_proj`` / ``up_proj`` / ``down_proj`` Linears, a SiLU or GELU
  ``act_fn`` (SwiGLU: Llama, Qwen, Mistral; GeGLU: Gemma's ``gelu_pytorch_tanh``, exact
  ``gelu``) and the forward ``down(act(gate(x)) * up(x))`` becomes :class:`GateUpMLP`: one
  ``gate_up_proj`` Linear [2I, H] (gate rows, then up rows) and ``mk.ops.silu_and_mul`` /
  ``mk.ops.gelu_and_mul``.
- Recurrent kernels (``recurrent=True``): the mixers of transformers' hybrid models
  (Qwen3.5 / Qwen3-Next Gated DeltaNet, LFM2 short convs, Granite 4.0-H / Bamba / Falcon-H1 /
  Nemotron-H / Zamba2 / Mamba-2 Mamba-2 layers, Mamba / FalconMamba / Jamba / Zamba Mamba-1
  layers) call module-level functions that
  transformers binds once, at import, to the ``causal_conv1d`` / ``fla`` / ``mamba_ssm``
  package or its PyTorch fallback (``use_kernel_func_from_hub_with_fallback``). Each such
  mixer gets an instance-level ``forward``: a copy of its class's forward (decorators
  included) whose globals resolve those names to :mod:`minikernels.compat.causal_conv1d`,
  :mod:`minikernels.compat.fla` and :mod:`minikernels.compat.mamba_ssm` (extra keyword
  arguments filtered to each function's signature, as transformers does). Per model and
  reversible: nothing global is touched; :func:`unroute_recurrent` deletes the instance
  forwards. Mamba-1 mixers get ``selective_scan_fn`` / ``selective_state_update`` on
  ``ops.selective_scan`` (per-channel A); their training-only ``mamba_inner_fn`` is not
  routed (kernelize is for inference; transformers' fallback returns None there).
- ``quantize="int4"``: ``minikernels.quantize_model`` afterwards (the fused gate_up Linear
  quantizes row by row, so its int4 weights are exactly those of gate and up apart);
  ``quantize="fp8"``: ``quantize_model(method="fp8")`` (128 x 128 blocks; the fused
  gate_up's blocks equal gate's and up's apart when 128 divides the intermediate size);
  ``quantize="int8"``: ``quantize_model(method="int8")`` (INT8 W8A8, per-channel scales:
  the fused gate_up's rows equal gate's and up's apart). A mixture-of-experts model's
  experts (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) are quantized too
  (``experts=True``; :func:`minikernels.hf.experts.quantize_experts`) and run on the fused
  MoE ops (``experts_implementation="minikernels"``).
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops

logger = logging.getLogger("minikernels")


class RMSNorm(nn.Module):
    """Drop-in for transformers' RMSNorm modules on ``mk.ops.rms_norm``.

    forward(x) -> y; forward(x, residual) -> (rms_norm(x + residual), x + residual).
    ``weight_offset`` 0.0: Llama's ``x_normed * weight``, output dtype promoted with the
    weight's (as transformers does); 1.0: Gemma's ``x_normed * (1 + weight)``, output in
    x's dtype (``GemmaRMSNorm``'s ``type_as(x)``). ``weight`` is the replaced module's
    Parameter (shared, not copied).
    """

    def __init__(self, weight: nn.Parameter, eps: float, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        self.weight_offset = float(weight_offset)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        off = self.weight_offset
        out_dtype = x.dtype if off else torch.promote_types(x.dtype, self.weight.dtype)
        if residual is None:
            y = ops.rms_norm(x, self.weight, self.variance_epsilon, weight_offset=off)
            return y if y.dtype == out_dtype else y.to(out_dtype)
        y, h = ops.rms_norm(x, self.weight, self.variance_epsilon, residual=residual,
                            weight_offset=off)
        return (y if y.dtype == out_dtype else y.to(out_dtype)), h

    def extra_repr(self) -> str:
        off = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{off}"


class GateUpMLP(nn.Module):
    """down_proj(act(gate(x)) * up(x)) with gate and up fused into one Linear; act is
    "silu" (SwiGLU), "gelu" (exact, erf) or "gelu_tanh" (GeGLU's tanh approximation)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Module,
                 act: str = "silu") -> None:
        super().__init__()
        if act not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"act must be 'silu', 'gelu' or 'gelu_tanh', got {act!r}")
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act = act

    @classmethod
    @torch.no_grad()
    def from_mlp(cls, mlp: nn.Module) -> GateUpMLP:
        gate, up = mlp.gate_proj, mlp.up_proj
        fused = nn.Linear(gate.in_features, gate.out_features + up.out_features,
                          bias=gate.bias is not None, device=gate.weight.device,
                          dtype=gate.weight.dtype)
        fused.weight.copy_(torch.cat([gate.weight, up.weight], dim=0))
        if gate.bias is not None:
            fused.bias.copy_(torch.cat([gate.bias, up.bias], dim=0))
        fused.requires_grad_(False)
        return cls(fused, mlp.down_proj, _activation(getattr(mlp, "act_fn", None)) or "silu")

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act == "silu":
            return self.down_proj(ops.silu_and_mul(gate_up))
        return self.down_proj(ops.gelu_and_mul(
            gate_up, approximate="tanh" if self.act == "gelu_tanh" else "none"))

    def extra_repr(self) -> str:
        return f"act={self.act}"


# ------------------------------------------------------------------ source contracts


def _body(fn: Any) -> str:
    """A function's body with comments, blank space and the signature removed."""
    try:
        src = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return ""
    src = re.sub(r"#[^\n]*", "", src)
    m = re.search(r"\)\s*(->[^:]*)?:\s*\n", src)   # end of the signature
    body = src[m.end():] if m else src
    body = re.sub(r'"""(.|\n)*?"""', "", body)
    return re.sub(r"\s+", "", body)


_LAYER_BODY = re.sub(r"\s+", "", """
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
""")
_LAYER_PARAMS = ["self", "hidden_states", "attention_mask", "position_ids", "cache",
                 "use_cache", "position_embeddings", "kwargs"]
_MLP_BODY = re.sub(r"\s+", "", """
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
""")


def _layer_contract(layer: nn.Module) -> str | None:
    """None when ``layer``'s forward is the Llama-style block we mirror, else why not."""
    fwd = type(layer).forward
    try:
        params = list(inspect.signature(inspect.unwrap(fwd)).parameters)
    except (TypeError, ValueError):
        params = []
    if params != _LAYER_PARAMS or _body(fwd) != _LAYER_BODY:
        return (f"{type(layer).__name__}.forward is not the Llama-style pre-norm block "
                "(residual add left unfused)")
    return None


def _fused_layer_forward(self: nn.Module, hidden_states: Tensor,
                         attention_mask: Tensor | None = None,
                         position_ids: Tensor | None = None, cache: Any = None,
                         use_cache: bool | None = False,
                         position_embeddings: tuple[Tensor, Tensor] | None = None,
                         **kwargs: Any) -> Tensor:
    """The Llama-style decoder layer with the post-attention residual add fused into the
    post_attention_layernorm (same arguments and return as transformers' forward)."""
    if cache is None and "past_key_values" in kwargs:   # the deprecated name
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


# ----------------------------------------------------------------------- detection


def _eps_of(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        val = getattr(module, name, None)
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
    return None


def _extra_inputs(fwd: Any) -> bool:
    """Whether a forward takes inputs besides the one tensor (``gate``, ``residual``...)."""
    try:
        params = list(inspect.signature(inspect.unwrap(fwd)).parameters.values())
    except (TypeError, ValueError):
        return False
    named = [p for p in params[1:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return len(named) > 1


@torch.no_grad()
def _rms_norm_offset(module: nn.Module) -> float | None:
    """The weight offset of an RMSNorm: 0.0 for a leaf with weight [H] and eps computing
    x / rms(x) * weight, 1.0 for x / rms(x) * (1 + weight) (Gemma's), None for anything
    else (numerical probe)."""
    if isinstance(module, RMSNorm) or any(True for _ in module.children()):
        return None
    w = getattr(module, "weight", None)
    eps = _eps_of(module)
    if not isinstance(w, nn.Parameter) or w.ndim != 1 or eps is None or w.is_meta:
        return None
    if getattr(module, "bias", None) is not None:
        return None
    if _extra_inputs(type(module).forward):
        return None          # a gated norm (gate=None optional): the swap would drop it
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, w.shape[0], generator=g) * 3 + 0.5).to(w.device)
    try:
        got = module(x)
    except Exception:  # noqa: BLE001 - a module that does not take [N, H]: not a norm
        return None
    if not isinstance(got, Tensor) or got.shape != x.shape:
        return None
    for offset in (0.0, 1.0):
        want = ops.reference.rms_norm(x, w.float(), eps, offset)
        if torch.allclose(got.float(), want, rtol=1e-3, atol=1e-4):
            return offset
    return None


_GATED_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
}


@torch.no_grad()
def _activation(act: Any) -> str | None:
    """The gated activation an MLP's ``act_fn`` computes, checked numerically on a probe
    (like the norms): "silu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation:
    transformers' gelu_pytorch_tanh / gelu_new), or None for anything else."""
    if not callable(act):
        return None
    probe = torch.linspace(-8.0, 8.0, 161)
    try:
        got = act(probe)
    except Exception:  # noqa: BLE001 - not an elementwise activation on a CPU tensor
        return None
    if not isinstance(got, Tensor) or got.shape != probe.shape:
        return None
    for name, fn in _GATED_ACTIVATIONS.items():
        if torch.allclose(got.float(), fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None


def _mlp_contract(mlp: nn.Module) -> str | None:
    if not all(isinstance(getattr(mlp, n, None), nn.Linear)
               for n in ("gate_proj", "up_proj", "down_proj")):
        return "no gate_proj / up_proj / down_proj Linears"
    if _activation(getattr(mlp, "act_fn", None)) is None:
        return (f"activation {type(getattr(mlp, 'act_fn', None)).__name__} is not SiLU or "
                "GELU")
    if _body(type(mlp).forward) != _MLP_BODY:
        return f"{type(mlp).__name__}.forward is not down(act(gate(x)) * up(x))"
    g, u = mlp.gate_proj, mlp.up_proj
    if g.in_features != u.in_features or g.out_features != u.out_features or \
            (g.bias is None) != (u.bias is None) or g.weight.dtype != u.weight.dtype:
        return "gate_proj and up_proj differ in shape, bias or dtype"
    return None


# ---------------------------------------------------------------- recurrent kernels


def _recurrent_impls() -> dict[str, Callable[..., Any]]:
    """Package function name (transformers' hub / fallback name) -> minikernels' drop-in."""
    from ..compat import causal_conv1d, fla, mamba_ssm

    return {
        "causal_conv1d_fn": causal_conv1d.causal_conv1d_fn,
        "causal_conv1d_update": causal_conv1d.causal_conv1d_update,
        "chunk_gated_delta_rule": fla.chunk_gated_delta_rule,
        "fused_recurrent_gated_delta_rule": fla.fused_recurrent_gated_delta_rule,
        "mamba_chunk_scan_combined": mamba_ssm.mamba_chunk_scan_combined,
        "selective_scan_fn": mamba_ssm.selective_scan_fn,
        "selective_state_update": mamba_ssm.selective_state_update,
    }


#: the module-level names transformers' modeling files give those functions, for wrappers
#: whose closure does not say (e.g. when the ``kernels`` package re-wraps them)
_RECURRENT_GLOBALS = {
    "causal_conv1d_fn": "causal_conv1d_fn",
    "causal_conv1d_update": "causal_conv1d_update",
    "torch_chunk_gated_delta_rule": "chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule": "fused_recurrent_gated_delta_rule",
    "mamba2_chunk_scan": "mamba_chunk_scan_combined",
    "mamba2_selective_state_update": "selective_state_update",
    "mamba_selective_scan": "selective_scan_fn",
    "mamba_selective_state_update": "selective_state_update",
}
_ROUTED = "_minikernels_recurrent"


def _code_names(code: types.CodeType) -> set[str]:
    """The global / attribute names a code object (and the ones nested in it) loads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _package_name(global_name: str, obj: Any, module: str) -> str | None:
    """Which package function a modeling file's module-level callable stands for: the
    ``func_name`` that transformers' ``use_kernel_func_from_hub_with_fallback`` wrapper
    closes over (next to ``torch_function``), else, in transformers' own modeling files,
    the file's usual name for it."""
    if not callable(obj):
        return None
    name = None
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        free = dict(zip(obj.__code__.co_freevars, obj.__closure__))
        if "torch_function" in free and "func_name" in free:
            try:
                name = free["func_name"].cell_contents
            except ValueError:          # an empty cell
                name = None
    if not isinstance(name, str) and module.startswith("transformers."):
        name = _RECURRENT_GLOBALS.get(global_name)
    return name if isinstance(name, str) else None


def _filtered(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` dropping keyword arguments its signature does not name (the model passes its
    ``**kwargs`` along; transformers' wrapper filters them the same way)."""
    accepted = frozenset(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def routed(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    return routed


def _copy_function(fn: types.FunctionType, globals_: dict[str, Any],
                   closure: tuple | None) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    return new


def _rebound(fn: Any, overrides: dict[str, Any]) -> types.FunctionType:
    """A copy of ``fn`` whose innermost function (reached through ``__wrapped__``) looks
    ``overrides``' names up there instead of in its module's globals. The decorators in
    between (transformers' ``force_accelerate_hooks``, ``deprecate_kwarg``: functools.wraps
    closures) are copied with the new inner function in the cell that held the old one, so
    they keep working. TypeError when a layer is not such a plain function."""
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"{fn!r} is not a plain function")
    inner = fn.__dict__.get("__wrapped__")
    if inner is None:
        globals_ = dict(fn.__globals__)
        globals_.update(overrides)
        return _copy_function(fn, globals_, fn.__closure__)
    cells = fn.__closure__ or ()
    hits = []
    for i, cell in enumerate(cells):
        try:
            if cell.cell_contents is inner:
                hits.append(i)
        except ValueError:              # an empty cell
            pass
    if len(hits) != 1:
        raise TypeError(f"the decorator {fn.__qualname__} does not keep the function it "
                        "wraps in one closure cell")
    new_inner = _rebound(inner, overrides)
    closure = tuple(types.CellType(new_inner) if i == hits[0] else c
                    for i, c in enumerate(cells))
    new = _copy_function(fn, fn.__globals__, closure)
    new.__wrapped__ = new_inner
    return new


def _route_recurrent(model: nn.Module, summary: KernelizeSummary) -> None:
    """Give each mixer whose forward calls a package function an instance forward calling
    minikernels' drop-in instead (see the module docstring)."""
    impls = _recurrent_impls()
    for name, module in model.named_modules():
        own = module.__dict__.get("forward")
        earlier = getattr(getattr(own, "__func__", own), _ROUTED, None)
        if earlier:                     # routed by an earlier kernelize
            summary.recurrent[name] = sorted(set(earlier.values()))
            continue
        cls_forward = type(module).forward
        base = inspect.unwrap(cls_forward)
        if not isinstance(base, types.FunctionType):
            continue
        routes = {}
        for gname in _code_names(base.__code__):
            pkg = _package_name(gname, base.__globals__.get(gname),
                                base.__globals__.get("__name__", ""))
            if pkg in impls:
                routes[gname] = pkg
        if not routes:
            continue
        if own is not None:
            summary.skipped[name] = ("has an instance-level forward (a hook or another "
                                     "patch): recurrent kernels not routed")
            continue
        try:
            forward = _rebound(cls_forward,
                               {g: _filtered(impls[p]) for g, p in routes.items()})
        except TypeError as exc:
            summary.skipped[name] = f"recurrent kernels not routed: {exc}"
            continue
        setattr(forward, _ROUTED, dict(routes))
        module.forward = types.MethodType(forward, module)
        summary.recurrent[name] = sorted(set(routes.values()))


def unroute_recurrent(model: nn.Module) -> list[str]:
    """Undo :func:`kernelize`'s recurrent routing on ``model``: the mixers get their
    class's forward back (transformers' own functions). Returns the module names restored."""
    restored = []
    for name, module in model.named_modules():
        own = module.__dict__.get("forward")
        if own is not None and getattr(getattr(own, "__func__", own), _ROUTED, None):
            del module.forward
            restored.append(name)
    summary = getattr(model, "kernelize_summary", None)
    if isinstance(summary, KernelizeSummary):
        for name in restored:
            summary.recurrent.pop(name, None)
    return restored


# ------------------------------------------------------------------------- summary


@dataclass
class KernelizeSummary:
    """What :func:`kernelize` did. ``rms_norm`` / ``fused_residual`` / ``mlp``: module
    names replaced or patched; ``recurrent``: mixer name -> the package functions
    (``causal_conv1d_fn``, ``chunk_gated_delta_rule``, ...) its forward now calls from
    minikernels.compat; ``skipped``: module name -> why it was left alone;
    ``quantization``: quantize_model's summary when quantize is set; ``experts``: experts
    module name -> its quantization method, or why it stayed dense."""

    rms_norm: list[str] = field(default_factory=list)
    fused_residual: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    recurrent: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    quantization: Any = None
    experts: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = (f"kernelize: {len(self.rms_norm)} RMSNorm -> mk.ops.rms_norm, "
                f"{len(self.fused_residual)} decoder layers with the residual add fused, "
                f"{len(self.mlp)} MLPs -> gate_up + silu_and_mul / gelu_and_mul")
        if self.recurrent:
            funcs = sorted({f for names in self.recurrent.values() for f in names})
            text += (f", {len(self.recurrent)} recurrent mixers -> minikernels.compat "
                     f"({', '.join(funcs)})")
        if self.quantization is not None:
            text += f"; {self.quantization}"
        if self.experts:
            quantized = sum(v in ("int4", "fp8", "int8") for v in self.experts.values())
            text += f"; {quantized} of {len(self.experts)} experts modules quantized"
        if self.skipped:
            items = [f"{k}: {v}" for k, v in self.skipped.items()]
            text += "; skipped " + "; ".join(items[:6]) + (
                f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        return text


def _check_inference(model: nn.Module) -> None:
    training = [n for n, m in model.named_modules() if m.training]
    grads = any(p.requires_grad for p in model.parameters())
    if training and grads:
        raise RuntimeError(
            "minikernels.hf.kernelize is for inference only: the model is in training mode "
            f"({training[0] or type(model).__name__!r} has training=True) and has parameters "
            "that require grad, and the fused ops have no backward. Call model.eval() first "
            "(and model.requires_grad_(False) if you do not train it).")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def kernelize(model: nn.Module, rms_norm: bool = True, mlp: bool = True,
              quantize: str | None = None, group_size: int = 128,
              recurrent: bool = True, experts: bool = True) -> KernelizeSummary:
    """Swap ``model``'s RMSNorms, residual adds and SiLU MLPs for minikernels' fused ops, in
    place; route its recurrent mixers' conv / gated delta rule / Mamba-2 scan functions to
    minikernels.compat (``recurrent``; :func:`unroute_recurrent` undoes it); optionally
    quantize its Linears to int4, fp8 or int8. Returns (and sets as
    ``model.kernelize_summary``) a :class:`KernelizeSummary`.

    Inference only: raises RuntimeError on a model in training mode with parameters that
    require grad. Attention is chosen separately (``attn_implementation="minikernels"``).
    quantize: None, "int4" (RTN, ``minikernels.quantize_model(model, group_size)``) or
    "fp8" (block-wise RTN, ``quantize_model(model, method="fp8")``) or "int8" (per-channel
    RTN run W8A8, ``quantize_model(model, method="int8")``); lm_head kept dense. With
    ``experts`` (default), a mixture-of-experts model's experts are quantized the same
    way (:func:`minikernels.hf.experts.quantize_experts`: int8 run W8A8 by
    ``fused_moe_int8_w8a8``, fp8 by ``fused_moe_fp8``, int4 by ``fused_moe_int4``), and
    its experts implementation becomes "minikernels".
    """
    if quantize not in (None, "int4", "fp8", "int8"):
        raise ValueError(f"quantize must be None, 'int4', 'fp8' or 'int8', got {quantize!r}")
    _check_inference(model)
    summary = KernelizeSummary()
    if rms_norm:
        for name, module in list(model.named_modules()):
            offset = _rms_norm_offset(module)
            if offset is not None:
                _set(model, name, RMSNorm(module.weight, _eps_of(module), offset))
                summary.rms_norm.append(name)
        for name, module in list(model.named_modules()):
            if not isinstance(getattr(module, "post_attention_layernorm", None), nn.Module) \
                    or not hasattr(module, "self_attn"):
                continue
            if not isinstance(module.post_attention_layernorm, RMSNorm):
                summary.skipped[name] = "post_attention_layernorm is not an RMSNorm"
                continue
            why = _layer_contract(module)
            if why:
                summary.skipped[name] = why
                continue
            module.forward = types.MethodType(_fused_layer_forward, module)
            summary.fused_residual.append(name)
    if mlp:
        for name, module in list(model.named_modules()):
            if not hasattr(module, "gate_proj") or not hasattr(module, "up_proj"):
                continue
            why = _mlp_contract(module)
            if why:
                summary.skipped[name] = why
                continue
            _set(model, name, GateUpMLP.from_mlp(module))
            summary.mlp.append(name)
    if recurrent:
        _route_recurrent(model, summary)
    if quantize is not None:
        from ..nn import quantize_model
        from .experts import quantize_experts

        if experts:       # first, so that quantize_model finds no dense experts left
            summary.experts = quantize_experts(model, quantize, group_size)
        quantize_model(model, group_size=group_size, method=quantize)
        summary.quantization = getattr(model, "quantization_summary", None)
    logger.info("%s", summary)
    try:
        model.kernelize_summary = summary
    except AttributeError:  # pragma: no cover
        pass
    return summary
