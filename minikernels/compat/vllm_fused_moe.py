"""vLLM's fused-MoE Python API (``vllm.model_executor.layers.fused_moe``: ``fused_topk``,
``fused_experts``, ``fused_moe``) on minikernels' MoE ops, re-exported by
:mod:`minikernels.compat.vllm_ops`.

vLLM's layouts, which minikernels' ops share: hidden_states [T, K]; w1 [E, 2N, K] (each
expert's gate rows, then its up rows), w2 [E, K, N]; topk_weights fp32 [T, k], topk_ids
int32 / int64 [T, k]. Weight formats:

    dense (fp16 / bf16 / fp32 w1, w2)       ops.fused_moe
    use_int8_w8a16 (int8 w, fp32 scales [E, 2N] / [E, 2N, 1] and [E, K] / [E, K, 1])
                                             ops.fused_moe_int8
    use_int8_w8a16 / use_int4_w4a16 with uint8 w and block_shape [0, G] (vLLM's "wn16"
        group-quantized experts: w1 [E, 2N, K / pack] with two 4-bit values a byte, the
        low nibble first; scales [E, 2N, K / G] in the activations' dtype; zero points
        [E, 2N / pack, K / G] packed along N, or None: 8 / 128)
                                             dequantized per call to the activations'
                                             dtype ((q - zero) * scale, as vLLM's kernel
                                             converts them), then ops.fused_moe: a compat
                                             path, not a serving one
    use_fp8_w8a8 with block_shape [bn, bk] (float8_e4m3fn w, scales [E, 2N / bn,
        K / bk]; bk a multiple of 32 dividing K and N: DeepSeek-V3 / Qwen3-FP8's
        [128, 128])                          ops.fused_moe_fp8_w8a8: W8A8 as vLLM runs
                                             it (activations quantized per token and
                                             group of bk, fp8 tensor-core GEMMs)
    use_fp8_w8a8 with per_channel_quant (per-channel weight scales [E, 2N(, 1)] or
        per-tensor [E]; activations quantized per token; K and N multiples of 32)
                                             ops.fused_moe_fp8_w8a8 with one block per
                                             row: W8A8 as vLLM runs compressed-tensors
                                             "FP8-dynamic" MoE checkpoints
    use_fp8_w8a8 otherwise (per-tensor activations, or a bk that does not divide K and
        N)                                   ops.fused_moe_fp8, run W8A16
    use_int8_w8a8 with per_channel_quant (int8 w, fp32 per-channel scales [E, 2N(, 1)]
        and [E, K(, 1)] or per-tensor [E]; activations quantized per token)
                                             ops.fused_moe_int8_w8a8 (int8 x int8
                                             tensor-core GEMMs, exact int32 sums; x and
                                             the intermediate quantized per token; gate /
                                             up kept in fp32 through the activation,
                                             where vLLM rounds them to x's dtype first)
    use_int8_w8a8 with block_shape [bn, bk] (scales [E, 2N / bn, K / bk] and
        [E, K / bn, N / bk]; activations quantized per token and group of bk: vllm_ops'
        per_token_group_quant_int8 and w8a8_block_int8_matmul)
                                             W8A8 as vLLM computes it, per expert
                                             present (one host sync): a compat path

Differences, by design: fp8 experts without block or per-token activation quantization
(vLLM: one dynamic or static scale for the whole activation tensor) run W8A16 (the
activations stay 16-bit), so results differ from vLLM's W8A8 by its activation rounding
(they are closer to the unquantized product); ``a1_scale`` / ``a2_scale`` (static
activation scales) are accepted and unused. Per-token fp8 activation scales floor a
row's max |x| at 1e-10 (vLLM: the scale at 1 / (448 * 512)): only near-zero rows differ. int8 W8A8 rounds x / scale half to
even (vLLM's per-token quantizer rounds half away from zero: a tie moves one step). Not
covered: static ``a1_scale`` / ``a2_scale`` with int8 W8A8 (vLLM supports only per-token
or block activations there too: a ValueError without ``per_channel_quant`` or
``block_shape``); a NotImplementedError naming the argument: ``use_mxfp4_w4a4``, zero
points outside the wn16 format.

Routing extras: ``expert_map`` (expert parallelism: global expert -> local index, -1 for
experts on another rank, whose choices contribute nothing), ``apply_router_weight_on_input``
(top-1: the router weight scales the input, not the output), ``inplace`` (the result is
written into hidden_states).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import ops
from .._validation import FLOAT_DTYPES, check_tensor

__all__ = ["fused_experts", "fused_moe", "fused_topk"]

FP8 = torch.float8_e4m3fn
fused_topk = ops.fused_topk


def _not_covered(name: str, value: object, why: str) -> None:
    if value:
        raise NotImplementedError(f"{name} is not supported by minikernels' fused MoE ({why})")


def _route(topk_weights: Tensor, topk_ids: Tensor, expert_map: Tensor | None,
           global_num_experts: int) -> tuple[Tensor, Tensor]:
    """(weights, local ids): with an expert_map, choices of experts on another rank
    (map -1) get weight 0 and a valid id (0), so they add nothing."""
    if expert_map is None:
        return topk_weights, topk_ids
    check_tensor("expert_map", expert_map, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=topk_ids.device)
    if global_num_experts not in (-1, expert_map.shape[0]):
        raise ValueError(f"global_num_experts ({global_num_experts}) must equal "
                         f"expert_map's length ({expert_map.shape[0]})")
    local = expert_map.long()[topk_ids.long()]
    here = local >= 0
    return (torch.where(here, topk_weights.float(), 0.0),
            torch.where(here, local, 0).to(topk_ids.dtype))


def _fp8_scales(w1_scale: Tensor, w2_scale: Tensor, w1: Tensor, w2: Tensor,
                block_shape: list[int] | None) -> tuple[Tensor, Tensor, list[int]]:
    """vLLM's fp8 expert scales -> minikernels' block scales and one block shape:
    block_shape as given (scales [E, ceil(rows / bn), ceil(cols / bk)]); otherwise
    per-channel scales [E, rows(, 1)] and per-tensor ones [E] (expanded to every row) as
    (1, K) blocks."""
    e = w1.shape[0]
    for name, t in (("w1_scale", w1_scale), ("w2_scale", w2_scale)):
        check_tensor(name, t, dtypes=(torch.float32,), device=w1.device)
    if block_shape is not None:
        bn, bk = (int(b) for b in block_shape)
        return (w1_scale.reshape(e, -(-w1.shape[1] // bn), -(-w1.shape[2] // bk)),
                w2_scale.reshape(e, -(-w2.shape[1] // bn), -(-w2.shape[2] // bk)), [bn, bk])

    def per_channel(name: str, scale: Tensor, rows: int) -> Tensor:
        if scale.numel() == e:
            return scale.reshape(e, 1, 1).expand(e, rows, 1)
        if scale.numel() == e * rows:
            return scale.reshape(e, rows, 1)
        raise ValueError(f"{name} must be per tensor ([{e}]), per channel ([{e}, {rows}, 1])"
                         f" or block-wise (pass block_shape), got {list(scale.shape)}")

    return (per_channel("w1_scale", w1_scale, w1.shape[1]),
            per_channel("w2_scale", w2_scale, w2.shape[1]),
            [1, max(w1.shape[2], w2.shape[2])])


def _wn16_dense(name: str, qweight: Tensor, scale: Tensor | None, zp: Tensor | None,
                bits: int, group: int, dtype: torch.dtype) -> Tensor:
    """vLLM's wn16 expert weights [E, rows, K / pack] -> dense [E, rows, K] in dtype:
    (q - zero) * scale, each group of ``group`` columns with its scale / zero point."""
    check_tensor(name, qweight, dtypes=(torch.uint8,), ndim=3)
    if scale is None:
        raise ValueError(f"{name}'s scales (w1_scale / w2_scale) are required")
    e, rows, packed = qweight.shape
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(e, rows, 2 * packed) \
        if bits == 4 else qweight
    k = q.shape[-1]
    if zp is None:
        zero = torch.tensor(8 if bits == 4 else 128, dtype=dtype, device=q.device)
    else:
        check_tensor(f"{name} zero points", zp, dtypes=(torch.uint8,), ndim=3,
                     device=q.device)
        z = torch.stack((zp & 0xF, zp >> 4), dim=2).reshape(e, -1, zp.shape[-1]) \
            if bits == 4 else zp
        if z.shape[1] != rows:
            raise ValueError(f"{name} zero points must have {rows // (8 // bits)} packed "
                             f"rows, got {list(zp.shape)}")
        zero = z.repeat_interleave(group, dim=-1)[..., :k].to(dtype)
    s = scale.to(dtype).repeat_interleave(group, dim=-1)[..., :k]
    if s.shape != q.shape:
        raise ValueError(f"{name}'s scales must be [{e}, {rows}, {-(-k // group)}] for "
                         f"group_size {group}, got {list(scale.shape)}")
    return (q.to(dtype) - zero) * s


_GATED_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": ops.silu_and_mul,
    "gelu": lambda t: ops.gelu_and_mul(t, "none"),
    "gelu_tanh": lambda t: ops.gelu_and_mul(t, "tanh"),
}


def _per_expert_scales(name: str, scale: Tensor | None, e: int, rows: int) -> Tensor:
    """int8 W8A8 weight scales: per channel [E, rows] / [E, rows, 1] or per tensor [E]
    -> fp32 [E, rows]."""
    if scale is None:
        raise ValueError(f"use_int8_w8a8 needs {name}")
    check_tensor(name, scale, dtypes=FLOAT_DTYPES)
    if scale.numel() == e:
        return scale.float().reshape(e, 1).expand(e, rows)
    if scale.numel() != e * rows or scale.shape[0] != e:
        raise ValueError(f"{name} must be per channel [{e}, {rows}] (or [{e}, {rows}, 1]) or "
                         f"per tensor [{e}], got {list(scale.shape)}")
    return scale.float().reshape(e, rows)


def _int8_w8a8_block_experts(x: Tensor, w1: Tensor, w2: Tensor, s1: Tensor, s2: Tensor,
                             weights: Tensor, ids: Tensor, activation: str,
                             b1: Tensor | None, b2: Tensor | None,
                             block: list[int]) -> Tensor:
    """vLLM's block-quantized int8 W8A8 experts: x and h quantized per token and group of
    bk columns (per_token_group_quant_int8), s1 [E, 2I / bn, H / bk] and s2
    [E, H / bn, I / bk] per weight block (w8a8_block_int8_matmul), block = [bn, bk]:
    h = act(gemm(q(x), w1[e]) + b1[e]) in x's dtype, y = gemm(q(h), w2[e]) + b2[e] in
    x's dtype, out = sum_j weight_j * y_j in fp32, rounded once. w1 [E, 2I, H], w2
    [E, H, I] int8. A loop over the experts present (one host sync): a compat path."""
    from .vllm_ops import per_token_group_quant_int8, w8a8_block_int8_matmul

    if w1.dtype != torch.int8 or w2.dtype != torch.int8:
        raise TypeError(f"use_int8_w8a8 needs int8 w1 / w2, got {w1.dtype} / {w2.dtype}")
    act = _GATED_ACTS.get(activation)
    if act is None:
        raise NotImplementedError(f"activation {activation!r} is not supported with "
                                  f"block-quantized use_int8_w8a8 (supported: "
                                  f"{', '.join(_GATED_ACTS)})")
    t, h = x.shape
    if w1.shape[2] != h or w2.shape[1] != h or w2.shape[2] * 2 != w1.shape[1]:
        raise ValueError(f"w1 must be [E, 2I, {h}] and w2 [E, {h}, I], got "
                         f"{list(w1.shape)} and {list(w2.shape)}")
    k = ids.shape[1]

    def quant(t: Tensor) -> tuple[Tensor, Tensor]:
        return per_token_group_quant_int8(t, block[1])

    def gemm(q: Tensor, qs: Tensor, w: Tensor, ws: Tensor, bias: Tensor | None) -> Tensor:
        y = w8a8_block_int8_matmul(q, w, qs, ws, list(block), torch.float32)
        return (y if bias is None else y + bias.float()).to(x.dtype)

    xq, xs = quant(x)
    flat_ids = ids.reshape(-1).long()
    token = torch.arange(t, device=x.device).repeat_interleave(k)
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    for e in flat_ids.unique().tolist():      # (one host sync: the experts present)
        pairs = torch.nonzero(flat_ids == e).squeeze(1)
        rows = token[pairs]
        gate_up = gemm(xq[rows], xs[rows], w1[e], s1[e], None if b1 is None else b1[e])
        hq, hs = quant(act(gate_up))
        y = gemm(hq, hs, w2[e], s2[e], None if b2 is None else b2[e])
        out.index_add_(0, rows, y.float() * weights.reshape(-1)[pairs, None].float())
    return out.to(x.dtype)


def fused_experts(hidden_states: Tensor, w1: Tensor, w2: Tensor, topk_weights: Tensor,
                  topk_ids: Tensor, inplace: bool = False, activation: str = "silu",
                  apply_router_weight_on_input: bool = False, use_fp8_w8a8: bool = False,
                  use_int8_w8a8: bool = False, use_int8_w8a16: bool = False,
                  use_int4_w4a16: bool = False, use_mxfp4_w4a4: bool = False,
                  per_channel_quant: bool = False, global_num_experts: int = -1,
                  expert_map: Tensor | None = None, w1_scale: Tensor | None = None,
                  w2_scale: Tensor | None = None, w1_zp: Tensor | None = None,
                  w2_zp: Tensor | None = None, a1_scale: Tensor | None = None,
                  a2_scale: Tensor | None = None, block_shape: list[int] | None = None,
                  w1_bias: Tensor | None = None, w2_bias: Tensor | None = None) -> Tensor:
    """out[t] = sum_j topk_weights[t, j] * w2[e] @ act(w1[e] @ x[t]) with e =
    topk_ids[t, j] (vLLM's ``fused_experts``; module doc for formats and differences).
    Returns [T, K] in hidden_states' dtype (written into hidden_states with inplace)."""
    check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES, ndim=2)
    if use_int8_w8a8 and not per_channel_quant and block_shape is None:
        raise ValueError("use_int8_w8a8 needs per_channel_quant=True (per-token activations) "
                         "or a block_shape (vLLM's int8 W8A8 experts support only these)")
    _not_covered("use_mxfp4_w4a4", use_mxfp4_w4a4, "fp4 activations")
    x = hidden_states
    wn16 = (use_int4_w4a16 or use_int8_w8a16) and w1.dtype == torch.uint8
    if use_int4_w4a16 and not wn16:
        raise TypeError(f"use_int4_w4a16 needs uint8 w1 / w2 (two 4-bit values a byte), "
                        f"got {w1.dtype}")
    if wn16:
        if block_shape is None or len(block_shape) != 2 or int(block_shape[1]) <= 0:
            raise ValueError("vLLM's group-quantized (wn16) experts need block_shape "
                             f"[0, group_size], got {block_shape!r}")
        bits, group = (4 if use_int4_w4a16 else 8), int(block_shape[1])
        w1 = _wn16_dense("w1", w1, w1_scale, w1_zp, bits, group, x.dtype)
        w2 = _wn16_dense("w2", w2, w2_scale, w2_zp, bits, group, x.dtype)
        use_int8_w8a16 = False
    _not_covered("w1_zp", w1_zp is not None and not wn16, "zero points")
    _not_covered("w2_zp", w2_zp is not None and not wn16, "zero points")
    weights, ids = _route(topk_weights, topk_ids, expert_map, global_num_experts)
    if apply_router_weight_on_input:
        if weights.shape[1] != 1:
            raise ValueError("apply_router_weight_on_input needs topk == 1, got topk = "
                             f"{weights.shape[1]}")
        x = (x.float() * weights.float()).to(x.dtype)
        weights = torch.ones_like(weights, dtype=torch.float32)
    kw = dict(activation=activation, w13_bias=w1_bias, w2_bias=w2_bias)
    e = w1.shape[0]
    if use_int8_w8a8 and block_shape is not None:
        if w1_scale is None or w2_scale is None:
            raise ValueError("use_int8_w8a8 needs w1_scale and w2_scale")
        out = _int8_w8a8_block_experts(x, w1, w2, w1_scale.float(), w2_scale.float(),
                                       weights, ids, activation, w1_bias, w2_bias,
                                       list(block_shape))
    elif use_int8_w8a8:
        if w1.dtype != torch.int8 or w2.dtype != torch.int8:
            raise TypeError(f"use_int8_w8a8 needs int8 w1 / w2, got {w1.dtype} / {w2.dtype}")
        out = ops.fused_moe_int8_w8a8(
            x, w1, _per_expert_scales("w1_scale", w1_scale, e, w1.shape[1]), w2,
            _per_expert_scales("w2_scale", w2_scale, e, w2.shape[1]), weights.float(), ids,
            **kw)
    elif use_fp8_w8a8:
        if w1_scale is None or w2_scale is None:
            raise ValueError("use_fp8_w8a8 needs w1_scale and w2_scale")
        if w1.dtype != FP8 or w2.dtype != FP8:
            raise TypeError(f"use_fp8_w8a8 needs float8_e4m3fn w1 / w2, got {w1.dtype} / "
                            f"{w2.dtype}")
        s1, s2, block = _fp8_scales(w1_scale, w2_scale, w1, w2, block_shape)
        h, inter = w1.shape[2], w2.shape[2]
        if block_shape is not None and block[1] % 32 == 0 and h % block[1] == 0 \
                and inter % block[1] == 0:
            # vLLM's block fp8 W8A8: activations quantized per token and group of bk
            out = ops.fused_moe_fp8_w8a8(x, w1, s1, w2, s2, weights.float(), ids, block,
                                         **kw)
        elif block_shape is None and per_channel_quant and h % 32 == 0 and inter % 32 == 0:
            # per-channel (or per-tensor) weights with per-token fp8 activations: the
            # block op with one block per row, whose activation group is the whole row
            out = ops.fused_moe_fp8_w8a8(x, w1, s1, w2, s2, weights.float(), ids, block,
                                         **kw)
        else:
            out = ops.fused_moe_fp8(x, w1, s1, w2, s2, weights.float(), ids, block, **kw)
    elif use_int8_w8a16:
        if w1_scale is None or w2_scale is None:
            raise ValueError("use_int8_w8a16 needs w1_scale and w2_scale")
        out = ops.fused_moe_int8(x, w1, w1_scale.reshape(e, -1).float(), w2,
                                 w2_scale.reshape(e, -1).float(), weights.float(), ids, **kw)
    else:
        out = ops.fused_moe(x, w1, w2, weights.float(), ids, **kw)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out


def fused_moe(hidden_states: Tensor, w1: Tensor, w2: Tensor, gating_output: Tensor,
              topk: int, renormalize: bool, inplace: bool = False, activation: str = "silu",
              use_grouped_topk: bool = False, num_expert_group: int | None = None,
              topk_group: int | None = None,
              custom_routing_function: Callable[..., tuple[Tensor, Tensor]] | None = None,
              scoring_func: str = "softmax", e_score_correction_bias: Tensor | None = None,
              global_num_experts: int = -1, expert_map: Tensor | None = None,
              **quant: object) -> Tensor:
    """Route (softmax top-k: :func:`fused_topk`; ``use_grouped_topk``: vLLM's grouped
    router, sigmoid scoring; or ``custom_routing_function(hidden_states, gating_output,
    topk, renormalize)``), then :func:`fused_experts` with the remaining keyword
    arguments (``use_fp8_w8a8``, ``w1_scale``, ``block_shape``, ...). gating_output
    [T, E_global]."""
    if custom_routing_function is not None:
        weights, ids = custom_routing_function(hidden_states, gating_output, topk,
                                               renormalize)
    elif use_grouped_topk:
        from .vllm_ops import grouped_topk
        weights, ids = grouped_topk(hidden_states, gating_output, topk, renormalize,
                                    num_expert_group or 0, topk_group or 0, scoring_func,
                                    e_score_correction_bias=e_score_correction_bias)
    elif scoring_func == "sigmoid":
        weights, ids = ops.topk_sigmoid(gating_output, topk, renormalize,
                                        e_score_correction_bias)
    elif scoring_func == "softmax":
        if e_score_correction_bias is not None:
            raise ValueError("e_score_correction_bias needs scoring_func='sigmoid'")
        weights, ids, _ = fused_topk(hidden_states, gating_output, topk, renormalize)
    else:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    return fused_experts(hidden_states, w1, w2, weights, ids, inplace=inplace,
                         activation=activation, global_num_experts=global_num_experts,
                         expert_map=expert_map, **quant)  # type: ignore[arg-type]
