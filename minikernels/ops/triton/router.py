"""The MoE routers (softmax or sigmoid + top-k + optional renormalization) in Triton.

Algorithm: one program per BLOCK_T rows, each row's E logits in registers as one
[BLOCK_T, BLOCK_E] tile (BLOCK_E = next power of two >= E; the padding lanes never win).
  1. x = the logits in fp32; m = max(x); s = sum(exp(x - m)): the softmax denominator.
  2. Each lane packs into one int64 sort key: the fp32 bits of x mapped to an int32 that
     orders like the float (negative floats: the magnitude bits flipped), in the high word,
     and BLOCK_E - 1 - lane in the low word. The largest key is the largest logit and,
     among equal logits, the lowest expert id.
  3. topk rounds, each one max-reduction over the row: the winning key decodes to its
     expert id (low word) and its logit (high word), its weight is exp(logit - m) / s, and
     its lane drops out (key -> the smallest int64).
  4. renormalize: the k weights divided by their sum; one store of the [BLOCK_T, BLOCK_K]
     weights and ids.
The experts are chosen on the logits, not on the rounded probabilities: softmax is
monotone, so it is the same top-k, and the choice is exact (no two kernels that round exp
differently can disagree on it). A row whose softmax is not finite (a NaN or +inf logit,
or all logits -inf) gets all keys equal (x := 0) and weights 0: experts 0..k-1, weight 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

#: the largest expert count one program holds in registers (BLOCK_E)
MAX_EXPERTS = 4096
_NO_KEY = tl.constexpr(-(2 ** 63))   # a lane already chosen, or padding: never the max


@triton.jit
def _load_rows(logits_ptr, num_tokens, num_experts, stride_t, stride_e,
               BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's [BLOCK_T, BLOCK_E] logits in fp32 (padding lanes -inf) -> (rows int64,
    row_ok, lanes, lane_ok, x, nonfinite: a row with a NaN or +inf logit)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    lane_ok = lanes < num_experts
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_t + lanes.to(tl.int64)[None, :] * stride_e,
                mask=row_ok[:, None] & lane_ok[None, :], other=float("-inf")).to(tl.float32)
    nan_or_inf = (x != x) | (x == float("inf"))         # noqa: PLR0124 (x != x: NaN)
    nonfinite = tl.max(nan_or_inf.to(tl.int32), axis=1) > 0
    return rows64, row_ok, lanes, lane_ok, x, nonfinite


@triton.jit
def _store_routes(weights_ptr, ids_ptr, rows64, row_ok, topk, w_acc, id_acc,
                  BLOCK_K: tl.constexpr):
    """The [BLOCK_T, BLOCK_K] weights and ids into the contiguous [T, topk] outputs (ids
    cast to the output's int32 / int64 by the store)."""
    kcols = tl.arange(0, BLOCK_K)
    out = rows64[:, None] * topk + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < topk)
    tl.store(weights_ptr + out, w_acc, mask=out_ok)
    tl.store(ids_ptr + out, id_acc, mask=out_ok)


@triton.jit
def _sort_keys(v, lanes, lane_ok, BLOCK_E: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_E] -> int64 keys: float order in the high word (negative floats'
    magnitude bits flipped), BLOCK_E - 1 - lane in the low word (ties: lowest lane first);
    padding lanes never win."""
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - lanes).to(tl.int64)[None, :]
    return tl.where(lane_ok[None, :], key, _NO_KEY)


@triton.jit
def _pop_best(key, BLOCK_E: tl.constexpr):
    """One argmax round: (keys with the winner removed, its lane [BLOCK_T] int32, its
    value [BLOCK_T] fp32)."""
    best = tl.max(key, axis=1)
    key = tl.where(key == best[:, None], _NO_KEY, key)
    expert = (BLOCK_E - 1) - (best & (BLOCK_E - 1)).to(tl.int32)
    high = (best >> 32).to(tl.int32)
    value = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)
    return key, expert, value


@triton.jit
def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, topk,
                        stride_t, stride_e, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows64, row_ok, lanes, lane_ok, x, nonfinite = _load_rows(
        logits_ptr, num_tokens, num_experts, stride_t, stride_e, BLOCK_T, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)

    # 1. softmax statistics; non-finite rows become all-equal logits with weight 0
    x = tl.where(nonfinite[:, None], 0.0, x)           # no NaN reaches a max below
    m = tl.max(x, axis=1)
    bad = nonfinite | (m == float("-inf"))
    x = tl.where(bad[:, None] | (x == 0.0), 0.0, x)     # also -0.0 -> +0.0 (equal keys)
    m = tl.where(bad, 0.0, m)
    inv_s = 1.0 / tl.sum(tl.where(lane_ok[None, :], tl.exp(x - m[:, None]), 0.0), axis=1)

    # 2. sort keys: float order in the high word, lowest lane first in the low word
    key = _sort_keys(x, lanes, lane_ok, BLOCK_E)

    # 3. topk rounds of argmax
    w_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    id_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in range(topk):
        key, expert, logit = _pop_best(key, BLOCK_E)
        w = tl.where(bad, 0.0, tl.exp(logit - m) * inv_s)
        here = kcols[None, :] == j
        w_acc = tl.where(here, w[:, None], w_acc)
        id_acc = tl.where(here, expert[:, None], id_acc)

    # 4. renormalize, store
    if RENORMALIZE:
        total = tl.sum(w_acc, axis=1)                     # 0 only in non-finite rows
        w_acc = w_acc * (1.0 / tl.where(total > 0, total, 1.0))[:, None]
    _store_routes(weights_ptr, ids_ptr, rows64, row_ok, topk, w_acc, id_acc, BLOCK_K)


@triton.jit
def _group_mask(choice, lanes, lane_ok, num_experts, num_groups, topk_groups,
                HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                G_PAD: tl.constexpr):
    """Group-limited routing (DeepSeek-V3 / Nemotron 3): the E lanes form num_groups equal
    groups; a group's score is the sum of its two largest choices with a bias (its only
    one when a group has one lane), its largest without; the topk_groups best groups
    (ties: the lower group) keep their lanes, the others' choices become -inf."""
    gsize = num_experts // num_groups
    grp = lanes // gsize
    gcols = tl.arange(0, G_PAD)
    gscore = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
    for g in range(num_groups):
        v = tl.where(((grp == g) & lane_ok)[None, :], choice, float("-inf"))
        m1 = tl.max(v, axis=1)
        sc = m1
        if HAS_BIAS:      # + the second largest (one occurrence of the max removed)
            first = tl.min(tl.where(v == m1[:, None], lanes[None, :], BLOCK_E), axis=1)
            m2 = tl.max(tl.where(lanes[None, :] == first[:, None], float("-inf"), v), axis=1)
            sc = tl.where(m2 > float("-inf"), m1 + m2, m1)
        gscore = tl.where(gcols[None, :] == g, sc[:, None], gscore)
    gkey = _sort_keys(gscore, gcols, gcols < num_groups, G_PAD)
    keep = tl.zeros([BLOCK_T, G_PAD], dtype=tl.int32)
    for _ in range(topk_groups):
        gkey, gbest, _unused = _pop_best(gkey, G_PAD)
        keep = tl.where(gcols[None, :] == gbest[:, None], 1, keep)
    lane_keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for g in range(num_groups):
        kept = tl.max(tl.where(gcols[None, :] == g, keep, 0), axis=1)       # [BLOCK_T]
        lane_keep = tl.where((grp == g)[None, :], kept[:, None], lane_keep)
    return tl.where(lane_keep > 0, choice, float("-inf"))


@triton.jit
def topk_sigmoid_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts,
                        topk, stride_t, stride_e, renorm_eps, num_groups, topk_groups,
                        RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GROUPED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, G_PAD: tl.constexpr):
    """The sigmoid router: s = sigmoid(x); the experts are chosen on x (monotone: exact)
    or, with a correction bias, on s + bias (GROUPED: within the best groups, _group_mask),
    each weight the chosen expert's s (read back from the row, the bias only chooses);
    renormalize: w / (sum w + renorm_eps). A row with a NaN or +inf logit: experts 0..k-1,
    weight 0 (as topk_softmax_kernel)."""
    rows64, row_ok, lanes, lane_ok, x, bad = _load_rows(
        logits_ptr, num_tokens, num_experts, stride_t, stride_e, BLOCK_T, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    x = tl.where(bad[:, None] | (x == 0.0), 0.0, x)     # equal keys in bad rows; -0 -> +0
    s = 1.0 / (1.0 + tl.exp(-x))
    if HAS_BIAS:
        b = tl.load(bias_ptr + lanes, mask=lane_ok, other=0.0).to(tl.float32)
        choice = tl.where(bad[:, None], 0.0, s + b[None, :])
    else:
        choice = x
    if GROUPED:
        choice = _group_mask(choice, lanes, lane_ok, num_experts, num_groups, topk_groups,
                             HAS_BIAS, BLOCK_T, BLOCK_E, G_PAD)
    key = _sort_keys(choice, lanes, lane_ok, BLOCK_E)
    w_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    id_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in range(topk):
        key, expert, value = _pop_best(key, BLOCK_E)
        if HAS_BIAS:      # the chosen lane's unbiased score
            w = tl.sum(tl.where(lanes[None, :] == expert[:, None], s, 0.0), axis=1)
        else:
            w = 1.0 / (1.0 + tl.exp(-value))
        w = tl.where(bad, 0.0, w)
        here = kcols[None, :] == j
        w_acc = tl.where(here, w[:, None], w_acc)
        id_acc = tl.where(here, expert[:, None], id_acc)
    if RENORMALIZE:
        total = tl.sum(w_acc, axis=1) + renorm_eps
        w_acc = w_acc * (1.0 / tl.where(total > 0, total, 1.0))[:, None]
    _store_routes(weights_ptr, ids_ptr, rows64, row_ok, topk, w_acc, id_acc, BLOCK_K)


def launch_config(num_experts: int, topk: int) -> dict[str, int]:
    """BLOCK_E / BLOCK_T / BLOCK_K / num_warps for E experts: a tile of 2048 logits (up to
    16 rows) while BLOCK_E <= 256, else 1024 (one or two rows), one warp per 256 logits
    (1..8). Every power of two 1..4096 compiles for sm_80 / sm_90a without a stack frame
    (BLOCK_T = 4 at 8 logits per thread gets an 8-byte one from ptxas on sm_90a)."""
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, (2048 if block_e <= 256 else 1024) // block_e))
    warps = max(1, min(8, block_t * block_e // 256))
    return {"BLOCK_E": block_e, "BLOCK_T": block_t, "BLOCK_K": triton.next_power_of_2(topk),
            "num_warps": warps}


def sigmoid_launch_config(num_experts: int, topk: int) -> dict[str, int]:
    """The sigmoid router's tiles: half topk_softmax's, 4 logits a thread (up to 8 rows of
    1024 logits; one warp per 128 logits). At 8 a thread (topk_softmax's tiles) ptxas
    gave the bias / group variants an 8-byte stack frame on sm_80 and sm_90a (E 128 and
    256); at 4 none has one."""
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(8, 1024 // block_e))
    warps = max(1, min(8, block_t * block_e // 128))
    return {"BLOCK_E": block_e, "BLOCK_T": block_t, "BLOCK_K": triton.next_power_of_2(topk),
            "num_warps": warps}


def topk_softmax(weights: torch.Tensor, ids: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool) -> None:
    """gating_output [T, E] fp16/bf16/fp32 (any strides, E <= MAX_EXPERTS) -> weights fp32
    [T, k] and ids int32/int64 [T, k], both contiguous, written in place."""
    num_tokens, num_experts = gating_output.shape
    topk = weights.shape[1]
    if num_tokens == 0:
        return
    cfg = launch_config(num_experts, topk)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_T"]),)
    topk_softmax_kernel[grid](
        gating_output, weights, ids, num_tokens, num_experts, topk,
        gating_output.stride(0), gating_output.stride(1), RENORMALIZE=renormalize,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"])


def topk_sigmoid(weights: torch.Tensor, ids: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool, correction_bias: torch.Tensor | None,
                 renorm_eps: float, num_groups: int = 1, topk_groups: int = 1) -> None:
    """gating_output [T, E] fp16/bf16/fp32 (any strides), correction_bias [E] contiguous or
    None, num_groups dividing E (grouped when topk_groups < num_groups) -> weights fp32
    [T, k] and ids int32/int64 [T, k], contiguous, written in place."""
    num_tokens, num_experts = gating_output.shape
    if num_tokens == 0:
        return
    cfg = sigmoid_launch_config(num_experts, weights.shape[1])
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_T"]),)
    has_bias = correction_bias is not None
    topk_sigmoid_kernel[grid](
        gating_output, correction_bias if has_bias else weights, weights, ids, num_tokens,
        num_experts, weights.shape[1], gating_output.stride(0), gating_output.stride(1),
        float(renorm_eps), num_groups, topk_groups, RENORMALIZE=renormalize,
        HAS_BIAS=has_bias, GROUPED=topk_groups < num_groups, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_E=cfg["BLOCK_E"], BLOCK_K=cfg["BLOCK_K"],
        G_PAD=triton.next_power_of_2(num_groups), num_warps=cfg["num_warps"])


# Mixtral (E 8, k 2), Qwen2-MoE (60 -> 64, k 4) / OLMoE (64, k 8), Qwen3-MoE (128, k 8),
# DeepSeek-V3-sized (256, k 8), Qwen3-Next-sized (512, k 10 -> 16), the largest (4096, k 8)
_SHAPES = ((8, 2), (64, 4), (128, 8), (256, 8), (512, 16), (MAX_EXPERTS, 8))
for _dt in ("fp32", "fp16", "bf16"):
    for _i, (_e, _k) in enumerate(_SHAPES):
        _cfg = launch_config(_e, _k)
        _renorm = _i % 2 == 0
        # int64 ids, and a strided expert dim (a transposed view), on one shape
        for _ids, _unit in (("i32", True), ("i64", False)) if _e == 128 else (("i32", True),):
            register(KernelSpec(
                name=f"router_topk_softmax[{_dt},E={_cfg['BLOCK_E']},k={_cfg['BLOCK_K']},"
                     f"ids={_ids},renorm={int(_renorm)},stride_e={1 if _unit else 'n'}]",
                fn=topk_softmax_kernel,
                signature={"logits_ptr": f"*{_dt}", "weights_ptr": "*fp32",
                           "ids_ptr": f"*{_ids}", "num_tokens": "i32", "num_experts": "i32",
                           "topk": "i32", "stride_t": "i64",
                           "stride_e": "constexpr" if _unit else "i64",
                           "RENORMALIZE": "constexpr", "BLOCK_T": "constexpr",
                           "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"},
                constexprs={"RENORMALIZE": _renorm, "BLOCK_T": _cfg["BLOCK_T"],
                            "BLOCK_E": _cfg["BLOCK_E"], "BLOCK_K": _cfg["BLOCK_K"],
                            **({"stride_e": 1} if _unit else {})},
                num_warps=_cfg["num_warps"], num_stages=1))

# the sigmoid router, each (bias, renormalize) pair: LFM2-MoE (E 32, k 4, bf16 bias,
# renormalized), DeepSeek-V3-sized (256, k 8, fp32 bias, renormalized; and grouped: 8
# groups, the best 4), Nemotron 3 (fp32 bias; 128, k 6 -> 8, not renormalized), no bias
# (128, k 8; 64, k 4 renormalized, and grouped: 4 groups, the best 2)
for _dt in ("fp32", "fp16", "bf16"):
    for _e, _k, _bias, _renorm, _groups in ((32, 4, "bf16", True, 1), (256, 8, "fp32", True, 1),
                                            (256, 8, "fp32", True, 8),
                                            (128, 6, "fp32", False, 1),
                                            (128, 8, None, False, 1), (64, 4, None, True, 1),
                                            (64, 4, None, True, 4)):
        _cfg = sigmoid_launch_config(_e, _k)
        _g = f",groups={_groups}" if _groups > 1 else ""
        register(KernelSpec(
            name=f"router_topk_sigmoid[{_dt},E={_cfg['BLOCK_E']},k={_cfg['BLOCK_K']},"
                 f"bias={_bias},renorm={int(_renorm)}{_g}]",
            fn=topk_sigmoid_kernel,
            signature={"logits_ptr": f"*{_dt}", "bias_ptr": f"*{_bias or 'fp32'}",
                       "weights_ptr": "*fp32", "ids_ptr": "*i32", "num_tokens": "i32",
                       "num_experts": "i32", "topk": "i32", "stride_t": "i64",
                       "stride_e": "constexpr", "renorm_eps": "fp32", "num_groups": "i32",
                       "topk_groups": "i32", "RENORMALIZE": "constexpr",
                       "HAS_BIAS": "constexpr", "GROUPED": "constexpr",
                       "BLOCK_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_K": "constexpr",
                       "G_PAD": "constexpr"},
            constexprs={"stride_e": 1, "RENORMALIZE": _renorm, "HAS_BIAS": _bias is not None,
                        "GROUPED": _groups > 1, "BLOCK_T": _cfg["BLOCK_T"],
                        "BLOCK_E": _cfg["BLOCK_E"], "BLOCK_K": _cfg["BLOCK_K"],
                        "G_PAD": triton.next_power_of_2(_groups)},
            num_warps=_cfg["num_warps"], num_stages=1))
