"""Mixture-of-experts MLP in Triton (vLLM's fused_moe idea: expert-sorted tiles, grouped GEMMs).

Algorithm. The T*k (token, slot) pairs are numbered p = t * k + j. moe_align_block_size's
Triton kernels (ops/triton/moe_align.py; no host sync, so it runs under CUDA graphs) sort
the pairs by expert (stable) and pad each expert's run to a multiple of BLOCK_M with the
sentinel T*k; ``block_expert[b]`` is the expert of tile b, -1 past the last real tile. The
grid's tile count is the static bound ceil(min(T*k + E * (BLOCK_M - 1), T*k * BLOCK_M) /
BLOCK_M): at most one tile more than the real worst case, T*k tiles when T*k < E.
  1. ``moe_gate_up_kernel``: program (b, n) gathers the x rows of tile b's pairs
     (token = p // k) and computes gate = x @ w13[e, n-block].T and up = x @ w13[e, I +
     n-block].T with fp32 accumulation, then stores act(gate) * up rounded to x.dtype
     into act[p, n-block] ([T*k, I], one row per pair); act is the constexpr ``ACT``
     (silu, gelu, gelu_tanh: ops/triton/activation.py's ``gate_activation``, the op's
     ``activation``). Non-gated experts (the constexpr ``GATED`` False: Nemotron 3's,
     w13 [E, I, H] the up rows only) load the up tile alone into one accumulator and
     store act(up) (ACT also relu2: relu(u)^2); the other kernels are unchanged.
  2. ``moe_down_kernel``: program (b, n) computes act[p] @ w2[e, n-block].T in fp32, times
     topk_weights[t, j], into an fp32 buffer [T*k, H] at row p.
  3. out = buffer.view(T, k, H).sum(1) in fp32, rounded once to x.dtype.
Expert biases (GPT-OSS; optional, each kernel's constexpr ``HAS_BIAS``): step 1 adds
w13_bias[e]'s gate / up entries to its fp32 accumulators before the activation, step 2
w2_bias[e] before the router weight; ``ACT`` "swigluoai" (GPT-OSS's clamped SwiGLU) reads
the runtime scalars alpha / limit (_moe_common.py's ``swigluoai``).
Each tile reads its expert's weight block once for BLOCK_M pairs, so decode batches are
memory bound on the routed experts' weights; sentinel rows load zeros and store nothing.
The four MoE kernel pairs (here, moe_int4.py, moe_fp8.py, moe_int8.py) differ only in
their K loops: the tile setup (``tile_expert``, ``tile_pairs``, ``up_rows``) and the
epilogues after the K loop (``gate_up_epilogue``: LoRA delta, activation, store;
``down_epilogue``: LoRA delta, router weight, store) are ops/triton/_moe_common.py's.

LoRA on the experts (optional; ``pair_lora``). The S adapter slots' per-expert matrices
are S*E virtual lora_delta slots v = s * E + e, and pair p = (t, j) takes v_p =
token_slots[t] * E + topk_ids[t, j] (-1: no adapter), computed with torch ops (no sync).
ops/triton/lora.py's kernels compute d13 = lora_delta(x, A13, B13, v) [T*k, 2I] (row p
reads x[p // k]: ``x_rep``) before step 1 and d2 = lora_delta(act, A2, B2, v) [T*k, H]
after it, each rounded to x.dtype; step 1 adds d13's rows to its gate / up accumulators
before the epilogue, step 2 adds d2's rows before the router weight. The adds sit behind
the constexpr ``HAS_DELTA``: without LoRA the kernels compile exactly as before (a runtime
flag cost the base path registers: gate-up BM 64 fp16 151 -> 194 on sm_90a), and the
LoRA variants are registered for the aligned fp16 / bf16 tiles.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._moe_common import down_epilogue, gate_up_epilogue, tile_expert, tile_pairs, up_rows
from .moe_align import moe_align_block_size as align_pairs
from .registry import KernelSpec, register
from .tiling import acc_dot

# the grouped (SGMV) LoRA path sorts pairs into S*E + 1 groups with moe_align's kernels:
# up to this many (the alignment op's expert limit); more take the per-pair (BGMV) path
LORA_GROUPED_MAX_GROUPS = 1024


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def moe_config(n_pairs: int, num_experts: int, dtype: torch.dtype,
               aligned: bool = True, even_k: bool = True) -> MoeConfig:
    """Tile sizes from the average number of pairs per expert (known on the host without
    a sync). BLOCK_M 16 / 32 for decode-sized groups (mma.sync), 64 for prefill (wgmma on
    sm_90a). fp32 runs its tl.dot on FMAs ("ieee"), so its tiles are smaller. Rows that
    are not 16-byte aligned load element by element (an address per element), so they get
    small tiles too. Aligned rows whose K (H or I) is not a multiple of BLOCK_K take masked
    loads (``even_k`` False); at BLOCK_M 32 those need a narrower N tile (the 64-wide one
    spills on both archs). Every size here compiles without spills for sm_80 and
    sm_90a (the registered specs)."""
    avg = n_pairs / max(num_experts, 1)
    bm = 16 if avg <= 16 else 32 if avg <= 48 else 64
    if dtype == torch.float32:
        if not aligned:
            return MoeConfig(min(bm, 32), 32, 16, num_warps=4, num_stages=2)
        return MoeConfig(bm, 64 if bm == 32 else 32, 16, num_warps=4, num_stages=2)
    if not aligned:
        return MoeConfig(bm, 32, 16, num_warps=4, num_stages=2)
    return MoeConfig(bm, 32 if bm == 32 and not even_k else 64, 64 if bm == 64 else 128,
                     num_warps=4, num_stages=3)


@triton.jit
def moe_gate_up_kernel(x_ptr, w13_ptr, act_ptr, delta_ptr, sorted_ids_ptr, block_expert_ptr,
                       n_pairs, top_k, H, I, HAS_DELTA: tl.constexpr,
                       sx_t, sx_h, sw_e, sw_n, sw_h, bias_ptr, sb_e, sb_n, alpha, limit,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                       RNE_BF16: tl.constexpr = False, ACT: tl.constexpr = "silu",
                       GATED: tl.constexpr = True, HAS_BIAS: tl.constexpr = False):
    """act[p, n-block] = act(x[t] @ w13[e, n].T) * (x[t] @ w13[e, I + n].T) for the pairs p
    of tile pid_m (token t = p // k, expert e): x [T, H] and w13 [E, 2I, H] (non-gated:
    [E, I, H], act(up) stored) in x.dtype, fp32 accumulators, masked loads; HAS_BIAS:
    + w13_bias[e] (bias_ptr [E, 2I], strides sb_e / sb_n) before the activation."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_h            # [BM, BK]
    # w13[e] rows n (gate) and I + n (up), read as [BK, BN] tiles (the transposed weight);
    # non-gated experts (GATED False): w13[e] holds the I up rows only, rows n
    w_base = w13_ptr + e * sw_e + offs_k[:, None] * sw_h
    g_ptrs = w_base + offs_n[None, :].to(tl.int64) * sw_n        # read only when GATED
    u_ptrs = w_base + up_rows(offs_n, I, GATED)[None, :].to(tl.int64) * sw_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # read only when GATED
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if ALIGNED:  # 16-byte aligned rows, unit inner strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            if GATED:
                g_ptrs = tl.multiple_of(g_ptrs, [16, 1])
            u_ptrs = tl.multiple_of(u_ptrs, [16, 1])
        if EVEN_K:   # H % BLOCK_K == 0: no mask along K, so the loads vectorize
            a = tl.load(x_ptrs, mask=live[:, None], other=0.0)
            if GATED:
                wg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < H
            a = tl.load(x_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
            if GATED:
                wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # DOT_F32: fp32 inputs; and the interpreter's bf16 tl.dot (wrong there)
        if GATED:
            acc_g = acc_dot(a, wg, acc_g, DOT_F32)
        acc_u = acc_dot(a, wu, acc_u, DOT_F32)
        x_ptrs += BLOCK_K * sx_h
        if GATED:
            g_ptrs += BLOCK_K * sw_h
        u_ptrs += BLOCK_K * sw_h
    gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, offs_n, n_pairs,
                     I, HAS_DELTA, CLAMPED=False, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sb_e, sb_n=sb_n,
                     alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_down_kernel(act_ptr, w2_ptr, tw_ptr, out_ptr, delta_ptr, sorted_ids_ptr,
                    block_expert_ptr, n_pairs, top_k, H, I, HAS_DELTA: tl.constexpr,
                    sw_e, sw_h, sw_i, stw_t, stw_j, bias_ptr, sb_e, sb_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                    HAS_BIAS: tl.constexpr = False):
    """buf[p, n-block] = (act[p] @ w2[e, n].T (+ w2_bias[e, n] with HAS_BIAS: bias_ptr
    [E, H], strides sb_e / sb_n)) * topk_weights[t, j] for the pairs p = t * k + j of tile
    pid_m: act [T*k, I] and w2 [E, H, I] in x.dtype, buf fp32 [T*k, H]."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair64[:, None] * I + offs_k[None, :]                 # [BM, BK]
    w_ptrs = w2_ptr + e * sw_e + offs_n[None, :].to(tl.int64) * sw_h + offs_k[:, None] * sw_i
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if ALIGNED:
            a_ptrs = tl.multiple_of(a_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [16, 1])
        if EVEN_K:   # I % BLOCK_K == 0
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < I
            a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = acc_dot(a, w, acc, DOT_F32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_i
    down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, pair64, live, offs_n, offs_n, top_k, H,
                  stw_t, stw_j, HAS_DELTA, CLAMPED=False, bias_ptr=bias_ptr, e=e,
                  sb_e=sb_e, sb_n=sb_n, HAS_BIAS=HAS_BIAS)


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [max_blocks * block_m], block_expert int32 [max_blocks]): the pair
    ids p = t * k + j grouped by expert (stable), each expert's run padded to a multiple of
    block_m with the sentinel T*k; block_expert[b] the expert of tile b, -1 past the end.
    moe_align_block_size's Triton kernels (pad_sorted_ids, so whole tiles are readable), no
    host sync; max_blocks = ceil(min(T*k + E * (block_m - 1), T*k * block_m) / block_m)
    (one pair per tile when T*k < E: small decode grids)."""
    sorted_ids, block_expert, _ = align_pairs(topk_ids, block_m, num_experts,
                                              pad_sorted_ids=True)
    return sorted_ids, block_expert


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    """Unit inner strides and every row starting 16-byte aligned (pointer and outer
    strides): what the kernels' vector-load hints (ALIGNED) promise."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def moe_rows_aligned(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """One ALIGNED flag for both kernels of a fused MoE call: x, w13 and w2 [E, H, I]
    (``_rows_aligned``) and the rows of the [T*k, I] intermediate in x.dtype."""
    return _rows_aligned(x, w13, w2) and w2.shape[2] * x.element_size() % 16 == 0


@dataclass(frozen=True)
class PairLoRA:
    """A fused MoE call's expert adapters as S*E virtual lora_delta slots v = s * E + e.

    a13 [S*E, R13, H], b13 [S*E, 2I, R13] (non-gated: [S*E, I, R13]), a2 [S*E, R2, I],
    b2 [S*E, H, R2] (views of the
    [S, E, ...] stacks, or copies where S and E do not merge into one stride); slots int64
    [T*k]: pair p = t * k + j's v_p = token_slots[t] * E + topk_ids[t, j], or -1;
    scaling fp32 [S*E] (scaling[s] repeated E times); grouped: lora_delta's SGMV path."""
    a13: torch.Tensor
    b13: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    slots: torch.Tensor
    scaling: torch.Tensor
    grouped: bool


def pair_lora(lora: Sequence[torch.Tensor] | None, topk_ids: torch.Tensor
              ) -> PairLoRA | None:
    """lora = (a13 [S, E, R13, H], b13 [S, E, 2I, R13] (non-gated experts: [S, E, I, R13]),
    a2 [S, E, R2, I], b2 [S, E, H, R2], token_slots int32/int64 [T] in [-1, S), scaling
    fp32 [S]) (minikernels.ops.MoELoRA's fields, checked there), or None. None when no
    update can be nonzero (no LoRA, S = 0, or both ranks 0): the kernels then take their
    base path. No host sync."""
    if lora is None:
        return None
    from . import lora as triton_lora  # lora.py imports this module (the expert sort)

    a13, b13, a2, b2, token_slots, scaling = lora
    num_slots, num_experts, r13, h = a13.shape
    r2, inter = a2.shape[2], a2.shape[3]
    if num_slots == 0 or r13 == r2 == 0:
        return None
    virt = num_slots * num_experts
    # v_p = s * E + e for the pair's token slot s >= 0, else -1 (pair order t * k + j)
    tok_slot = token_slots.to(torch.int64)[:, None]
    slots = torch.where(tok_slot >= 0, tok_slot * num_experts + topk_ids.to(torch.int64),
                        -1).reshape(-1)
    # SGMV (pairs sorted by virtual slot) from lora_delta's token threshold while the
    # S*E + 1 groups fit the alignment kernels; else BGMV (one pair at a time)
    grouped = (slots.shape[0] >= triton_lora.GROUPED_MIN_TOKENS
               and virt + 1 <= LORA_GROUPED_MAX_GROUPS)
    return PairLoRA(a13.reshape(virt, r13, h), b13.reshape(virt, b13.shape[2], r13),
                    a2.reshape(virt, r2, inter), b2.reshape(virt, h, r2), slots,
                    scaling.repeat_interleave(num_experts), grouped)


def gate_up_delta(x: torch.Tensor, lora: PairLoRA, top_k: int) -> torch.Tensor:
    """Each pair's LoRA update of its gate / up pre-activations: [T*k, 2I] in x.dtype
    (non-gated experts: of up, [T*k, I]), row p = scaling[s] * B13[s, e] @
    (A13[s, e] @ x[p // k]) rounded (0 where v_p = -1)."""
    from . import lora as triton_lora

    return triton_lora.lora_delta(x, lora.a13, lora.b13, lora.slots, lora.scaling,
                                  grouped=lora.grouped, x_rep=top_k)


def down_delta(act: torch.Tensor, lora: PairLoRA) -> torch.Tensor:
    """Each pair's LoRA update of its down projection: [T*k, H] in act's dtype, row p =
    scaling[s] * B2[s, e] @ (A2[s, e] @ act[p]) rounded (0 where v_p = -1)."""
    from . import lora as triton_lora

    return triton_lora.lora_delta(act, lora.a2, lora.b2, lora.slots, lora.scaling,
                                  grouped=lora.grouped)


@dataclass(frozen=True)
class MoeLaunch:
    """The host-side state of one fused MoE call that every launcher (dense, int4, fp8,
    int8 experts) shares: the expert-sorted pairs, the LoRA slots, the scratch buffers
    act [T*k, I] (x.dtype) and buf [T*k, H] (fp32), and the interpreter work-arounds.
    ``gate_up_args`` / ``down_args`` are the kernels' common arguments after their
    weight pointers (act, delta, sorted_ids, block_expert, n_pairs, top_k, H, I and, for
    down, topk_weights and buf first); each computes its LoRA delta when called, so call
    them in launch order. ``gate_up_bias`` / ``down_bias``: the kernels' bias arguments
    (keywords: bias_ptr, sb_e, sb_n, HAS_BIAS; gate-up also alpha, limit)."""
    x: torch.Tensor
    top_k: int
    inter: int
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    plora: PairLoRA | None
    act: torch.Tensor
    buf: torch.Tensor
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    alpha: float = 1.702
    limit: float = 7.0

    def _bias(self, bias: torch.Tensor | None) -> dict:
        # without a bias the pointer is x itself, never read (HAS_BIAS off)
        if bias is None:
            return {"bias_ptr": self.x, "sb_e": 0, "sb_n": 0, "HAS_BIAS": False}
        return {"bias_ptr": bias, "sb_e": bias.stride(0), "sb_n": bias.stride(1),
                "HAS_BIAS": True}

    def gate_up_bias(self) -> dict:
        """The gate-up kernel's keywords: w13_bias [E, 2I] (pointer, strides, HAS_BIAS)
        and swigluoai's alpha / limit."""
        return {**self._bias(self.w13_bias), "alpha": self.alpha, "limit": self.limit}

    def down_bias(self) -> dict:
        """The down kernel's keywords: w2_bias [E, H] (pointer, strides, HAS_BIAS)."""
        return self._bias(self.w2_bias)

    @property
    def n_pairs(self) -> int:
        return self.act.shape[0]

    @property
    def h(self) -> int:
        return self.x.shape[1]

    @property
    def has_delta(self) -> bool:
        return self.plora is not None

    @property
    def interp_bf16(self) -> bool:
        """bf16 under the interpreter (CPU tensors): its tl.dot multiplies raw bits and
        its bf16 cast truncates, so both are worked around; never set on a GPU."""
        return self.x.device.type != "cuda" and self.x.dtype == torch.bfloat16

    @property
    def dot_f32(self) -> bool:
        """fp32 x: exact fp32 ("ieee") dots; and the interpreter's bf16 (above)."""
        return self.x.dtype == torch.float32 or self.interp_bf16

    def grid(self, n: int, block_n: int) -> tuple[int, int]:
        """(tiles, N blocks): the static tile bound times the output columns' blocks."""
        return self.block_expert.shape[0], triton.cdiv(n, block_n)

    def gate_up_args(self) -> tuple:
        # without LoRA the delta pointers are x / act themselves, never read (HAS_DELTA
        # off)
        d13 = self.x if self.plora is None else gate_up_delta(self.x, self.plora,
                                                              self.top_k)
        return (self.act, d13, self.sorted_ids, self.block_expert, self.n_pairs,
                self.top_k, self.h, self.inter)

    def down_args(self, topk_weights: torch.Tensor) -> tuple:
        d2 = self.act if self.plora is None else down_delta(self.act, self.plora)
        return (topk_weights, self.buf, d2, self.sorted_ids, self.block_expert,
                self.n_pairs, self.top_k, self.h, self.inter)

    def result(self) -> torch.Tensor:
        """out = buf.view(T, k, H).sum(1) in fp32, rounded once to x.dtype."""
        return self.buf.view(-1, self.top_k, self.h).sum(dim=1).to(self.x.dtype)


def moe_launch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, inter: int,
               block_m: int, plora: PairLoRA | None, w13_bias: torch.Tensor | None = None,
               w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
               limit: float = 7.0) -> MoeLaunch:
    """Sort the T*k pairs into BLOCK_M tiles (no host sync) and allocate the scratch
    buffers of a fused MoE call (T > 0); the experts' biases and swigluoai's alpha /
    limit ride along for the kernels."""
    top_k = topk_ids.shape[1]
    n_pairs = x.shape[0] * top_k
    sorted_ids, block_expert = sort_pairs_by_expert(topk_ids, num_experts, block_m)
    return MoeLaunch(x, top_k, inter, sorted_ids, block_expert, plora,
                     _alloc.empty((n_pairs, inter), x.dtype, x.device),
                     _alloc.empty((n_pairs, x.shape[1]), torch.float32, x.device),
                     w13_bias, w2_bias, float(alpha), float(limit))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              lora: Sequence[torch.Tensor] | None = None,
              activation: str = "silu", gated: bool = True,
              w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
              alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe (inputs checked there; any strides). lora: the six
    tensors of minikernels.ops.MoELoRA, or None; activation: the gate-up epilogue's
    ``ACT`` (silu / gelu / gelu_tanh / swigluoai; non-gated also relu2); gated: its
    ``GATED`` (False: w13 [E, I, H], the up rows only); w13_bias [E, 2I] / w2_bias [E, H]
    or None: the kernels' ``HAS_BIAS``; alpha / limit: swigluoai's."""
    t, h = x.shape
    num_experts = w13.shape[0]
    inter = w2.shape[2]
    if t == 0 or h == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    # one flag for both kernels: x, w13, w2 and the [T*k, I] intermediate's rows
    aligned = moe_rows_aligned(x, w13, w2)
    n_pairs = t * topk_ids.shape[1]
    cfg = moe_config(n_pairs, num_experts, x.dtype, aligned)
    # one EVEN_K for both kernels (H for gate-up, I for down), so every dispatched
    # combination is a registered spec
    even_k = h % cfg.block_k == 0 and inter % cfg.block_k == 0
    if not even_k:
        cfg = moe_config(n_pairs, num_experts, x.dtype, aligned, even_k=False)
    run = moe_launch(x, topk_ids, num_experts, inter, cfg.block_m, pair_lora(lora, topk_ids),
                     w13_bias, w2_bias, alpha, limit)
    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "EVEN_K": even_k, "ALIGNED": aligned, "DOT_F32": run.dot_f32,
             "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    moe_gate_up_kernel[run.grid(inter, cfg.block_n)](
        x, w13, *run.gate_up_args(), run.has_delta,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        RNE_BF16=run.interp_bf16, ACT=activation, GATED=gated, **run.gate_up_bias(),
        **tiles)
    moe_down_kernel[run.grid(h, cfg.block_n)](
        run.act, w2, *run.down_args(topk_weights), run.has_delta,
        w2.stride(0), w2.stride(1), w2.stride(2), topk_weights.stride(0),
        topk_weights.stride(1), **run.down_bias(), **tiles)
    return run.result()


# ------------------------------------------------------- one-byte (W8A16) expert weights
# moe_int8.py (int8, per-row scales) and moe_fp8.py (e4m3, block scales) share their
# tiles, launch and AOT specs: their kernels differ only in how a byte tile becomes a
# dot operand and where the scales apply.

@dataclass(frozen=True)
class MoeW8A16Config:
    block_m: int
    block_n: int
    block_k: int
    even_k: bool
    num_warps: int = 4
    num_stages: int = 3


def moe_w8a16_config(n_pairs: int, num_experts: int, dtype: torch.dtype, k_dim: int,
                     aligned: bool, gate_up: bool,
                     fit_block_k: Callable[[int], int] | None = None) -> MoeW8A16Config:
    """One kernel's tiles for one-byte expert weights (K = H for gate-up, I for down).
    BLOCK_M from ``moe_config`` (16 / 32 / 64 by the average pairs per expert; 64 ->
    wgmma on sm_90a). 16-byte aligned rows: a 64-wide N tile (32 for gate-up at BLOCK_M
    64: it holds two accumulators) and K tiles of up to 128 bytes (64 at BLOCK_M 64):
    vector loads. ``fit_block_k`` (fp8: no tile straddles two scale blocks) may shrink
    that BLOCK_K first; then BLOCK_K is halved down to 16 while it does not divide K (so
    K needs no mask); a K that 16 does not divide either is masked (EVEN_K False).
    Unaligned rows (byte loads, a pointer per element) and fp32 x ("ieee" dots on FMAs)
    take small tiles and a masked K. Every size here compiles without spills for sm_80
    and sm_90a (the registered specs; a smaller BLOCK_K than the registered one holds
    fewer registers)."""
    bm = moe_config(n_pairs, num_experts, torch.float16).block_m
    if dtype == torch.float32:
        bm, bn, block_k, stages = min(bm, 32), 32, 16, 2
    elif aligned:
        bn = 32 if gate_up and bm == 64 else 64
        block_k, stages = (128 if bm <= 32 else 64), 3
    else:
        bn, block_k, stages = 32, 32, 2
    if fit_block_k is not None:
        block_k = fit_block_k(block_k)
    if aligned:
        while k_dim % block_k and block_k > 16:
            block_k //= 2
    return MoeW8A16Config(bm, bn, block_k, aligned and k_dim % block_k == 0, 4, stages)


def fused_moe_w8a16(gate_up_kernel, down_kernel, x: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    lora: Sequence[torch.Tensor] | None,
                    config: Callable[[int, bool, bool], MoeW8A16Config],
                    args13: tuple = (), args2: tuple = (),
                    activation: str = "silu", gated: bool = True,
                    w13_bias: torch.Tensor | None = None,
                    w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
                    limit: float = 7.0) -> torch.Tensor:
    """The launcher of moe_int8.py's and moe_fp8.py's kernel pairs (T > 0; any strides):
    ``config(k_dim, aligned, gate_up)`` picks each kernel's tiles, ``args13`` / ``args2``
    are each kernel's scalars between I and HAS_DELTA (fp8: its scale block sizes);
    ``activation`` the gate-up epilogue's ``ACT``, ``gated`` its ``GATED`` (False: w13
    [E, I, H], the up rows only); the experts' biases (``HAS_BIAS``) and swigluoai's
    alpha / limit as :func:`fused_moe`."""
    # one flag for both kernels: x, the weights and the [T*k, I] intermediate's rows
    aligned = moe_rows_aligned(x, w13, w2)
    h, inter = w2.shape[1], w2.shape[2]
    cfg13 = config(h, aligned, True)
    cfg2 = config(inter, aligned, False)
    run = moe_launch(x, topk_ids, w13.shape[0], inter, cfg13.block_m,
                     pair_lora(lora, topk_ids), w13_bias, w2_bias, alpha, limit)

    def tiles(cfg: MoeW8A16Config) -> dict:
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                "EVEN_K": cfg.even_k, "ALIGNED": aligned, "DOT_F32": run.dot_f32,
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    gate_up_kernel[run.grid(inter, cfg13.block_n)](
        x, w13, w13_scale, *run.gate_up_args(), *args13, run.has_delta,
        x.stride(0), x.stride(1), *w13.stride(), *w13_scale.stride(),
        RNE_BF16=run.interp_bf16, ACT=activation, GATED=gated, **run.gate_up_bias(),
        **tiles(cfg13))
    down_kernel[run.grid(h, cfg2.block_n)](
        run.act, w2, w2_scale, *run.down_args(topk_weights), *args2, run.has_delta,
        *w2.stride(), *w2_scale.stride(), topk_weights.stride(0), topk_weights.stride(1),
        **run.down_bias(), **tiles(cfg2))
    return run.result()


def register_w8a16_moe(prefix: str, gate_up_fn, down_fn, w_type: str,
                       ints: dict[str, str], scale_strides: tuple[str, ...],
                       config: Callable[[int, torch.dtype, int, bool, bool],
                                        MoeW8A16Config]) -> None:
    """Register ``{prefix}_gate_up[...]`` / ``{prefix}_down[...]`` AOT specs as
    dispatched: fp16 / bf16 x BLOCK_M 16 / 32 / 64 (fp32: 16 / 32) x three row kinds,
    each at its widest BLOCK_K (``config(n_pairs, dtype, K, aligned, gate_up)``):
      aligned   16-byte aligned rows, K a multiple of BLOCK_K: unit inner strides as
                constants (Triton's JIT specializes a stride of 1), pointers and outer
                strides as multiples of 16 as the JIT sees them for aligned tensors, so
                the byte tiles load 16 at a time;
      ragged_k  aligned rows, K not a multiple of 16 (a padded view): BLOCK_K 16, masked;
      unaligned every stride a runtime value, byte loads, K masked.
    A K that the widest tile does not divide gives a smaller BLOCK_K of the same kind:
    fewer registers. The aligned fp16 / bf16 specs get a LoRA (HAS_DELTA) twin and an
    expert-bias one (HAS_BIAS; gate-up with swigluoai: ``bias_variants``); each gate-up
    spec one per (ACT, GATED) of ``gate_up_variants`` (gated silu's names unchanged).
    ``ints``: the i32 scalars; ``scale_strides``: the scale tensor's stride names."""
    def one(dt: str, kind: str, cfg: MoeW8A16Config, gate_up: bool, lora: bool,
            act: str = "silu", gated: bool = True, bias: bool = False) -> None:
        aligned = kind != "unaligned"
        const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                 "EVEN_K": cfg.even_k, "ALIGNED": aligned, "DOT_F32": dt == "fp32",
                 "HAS_DELTA": lora}
        const["HAS_BIAS"] = bias
        if gate_up:
            fn, name = gate_up_fn, f"{prefix}_gate_up"
            unit = {"sx_h": 1, "sw_k": 1} if aligned else {}
            sig = {"x_ptr": f"*{dt}", "act_ptr": f"*{dt}", "sx_t": "i64", "sx_h": "i64"}
            div = ("x_ptr", "act_ptr", "sx_t")
            const["RNE_BF16"] = False                                 # interpreter only
            const["ACT"] = act
            const["GATED"] = gated
        else:
            fn, name = down_fn, f"{prefix}_down"
            unit = {"sw_k": 1} if aligned else {}
            sig = {"act_ptr": f"*{dt}", "tw_ptr": "*fp32", "out_ptr": "*fp32",
                   "stw_t": "i64", "stw_j": "i64"}
            div = ("act_ptr", "out_ptr")
        sig.update(_bias_sig(dt, gate_up))
        sig.update({"w_ptr": w_type, "s_ptr": "*fp32", "delta_ptr": f"*{dt}",
                    "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **ints,
                    **{n: "i64" for n in ("sw_e", "sw_n", "sw_k", *scale_strides)},
                    **{c: "constexpr" for c in (*const, *unit)}})
        div += ("w_ptr", "s_ptr", "delta_ptr", "sorted_ids_ptr", "sw_e", "sw_n")
        register(KernelSpec(
            name=f"{name}[{dt},BM={cfg.block_m},{kind}" + (",lora" if lora else "")
            + _act_tag(act, gated) + (",bias" if bias else "") + "]",
            fn=fn, signature=_in_order(fn, sig), constexprs={**const, **unit},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_core=dt != "fp32",
            wgmma_expected=cfg.block_m >= 64, divisible_by_16=div if aligned else ()))

    for dt, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16),
                    ("fp32", torch.float32)):
        for kind, k in (("aligned", 4096), ("ragged_k", 4104), ("unaligned", 4104)):
            for avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
                if dt == "fp32" and avg == 256:
                    continue                                  # fp32: BLOCK_M <= 32
                for gate_up in (True, False):
                    cfg = config(avg * 64, tdt, k, kind != "unaligned", gate_up)
                    assert cfg.even_k == (kind == "aligned")
                    # gate-up: one spec per registered (ACT, GATED); down has neither
                    variants = gate_up_variants(dt, cfg.block_m) if gate_up else \
                        (("silu", True),)
                    for act, gated in variants:
                        one(dt, kind, cfg, gate_up, lora=False, act=act, gated=gated)
                        if kind == "aligned" and dt != "fp32":    # + LoRA (HAS_DELTA)
                            one(dt, kind, cfg, gate_up, lora=True, act=act, gated=gated)
                    if kind == "aligned":    # + expert biases (HAS_BIAS: GPT-OSS's)
                        for act, gated, _ in (bias_variants(dt) if gate_up else
                                              (("silu", True, True),) if bias_variants(dt)
                                              else ()):
                            one(dt, kind, cfg, gate_up, lora=False, act=act, gated=gated,
                                bias=True)


# --------------------------------------------------------------------------- registry
# Aligned configs compile as dispatched for contiguous last dims: Triton's JIT specializes
# a stride of 1 to a constant (x's, w13's and w2's inner strides here), which with the
# ALIGNED hints lets the tile loads vectorize. Unaligned configs (odd sizes, or a view
# whose last dim is strided) compile with every stride a runtime value.

def gate_up_activations(dt: str, block_m: int) -> tuple[str, ...]:
    """The ``ACT`` values (the gate-up epilogue's activation) registered for a gate-up
    spec of x dtype ``dt`` and BLOCK_M: silu everywhere; gelu_tanh (Gemma 4's experts)
    for every fp16 / bf16 tile; gelu (erf) for the BLOCK_M 64 ones (the most registers).
    The epilogue runs after the K loop, on the two fp32 accumulators; the rest (fp32 x,
    erf at BLOCK_M 16 / 32) dispatch at the same tiles: compiled once for sm_80 / sm_90a
    (every gate-up spec x the three activations) without spills, not in every test run."""
    if dt == "fp32":
        return ("silu",)
    return ("silu", "gelu_tanh", "gelu") if block_m >= 64 else ("silu", "gelu_tanh")


def gate_up_variants(dt: str, block_m: int) -> tuple[tuple[str, bool], ...]:
    """The (ACT, GATED) pairs registered for a gate-up spec of x dtype ``dt`` and
    BLOCK_M: gated experts with every ACT of ``gate_up_activations``; non-gated ones
    (GATED False: one accumulator, w13 the up rows only) with relu2 (Nemotron 3's
    squared-ReLU experts) for every fp16 / bf16 tile. Non-gated silu / gelu / gelu_tanh
    and fp32 x dispatch at the same tiles (fewer registers than the gated ones): compiled
    once for sm_80 / sm_90a without spills, not in every test run."""
    gated = tuple((act, True) for act in gate_up_activations(dt, block_m))
    return gated + ((("relu2", False),) if dt != "fp32" else ())


def bias_variants(dt: str) -> tuple[tuple[str, bool, bool], ...]:
    """The (ACT, GATED, HAS_BIAS) gate-up variants with expert biases registered for the
    aligned tiles of x dtype ``dt`` (each down spec of those tiles gets a HAS_BIAS twin):
    GPT-OSS's experts, swigluoai with biases, for fp16 / bf16. Other combinations (a bias
    with another activation, fp32 x, unaligned rows, LoRA with biases) dispatch at the same
    tiles and compile when first used; their epilogue adds one bias row load per
    accumulator."""
    return (("swigluoai", True, True),) if dt != "fp32" else ()


def _bias_sig(dt: str, gate_up: bool) -> dict[str, str]:
    """The bias arguments of a fused MoE kernel's AOT signature (x dtype ``dt``): the
    bias pointer, its two strides, HAS_BIAS; gate-up also swigluoai's fp32 alpha / limit."""
    sig = {"bias_ptr": f"*{dt}", "sb_e": "i64", "sb_n": "i64"}
    if gate_up:
        sig.update(alpha="fp32", limit="fp32")
    return {**sig, "HAS_BIAS": "constexpr"}


def _act_tag(act: str, gated: bool = True) -> str:
    """A spec name's suffix for its ACT and GATED: none for gated silu (the names before
    ACT existed), ",<act>" for other gated ones, ",nongated,<act>" for non-gated ones."""
    if not gated:
        return f",nongated,{act}"
    return "" if act == "silu" else f",{act}"


def _in_order(fn, sig: dict[str, str]) -> dict[str, str]:
    """A spec's signature in the kernel's argument order (every argument named once)."""
    assert set(sig) == set(fn.arg_names), set(sig) ^ set(fn.arg_names)
    return {a: sig[a] for a in fn.arg_names}


_INTS = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32",
         "HAS_DELTA": "constexpr"}
for _dt, _tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16),
                  ("fp32", torch.float32)):
    # aligned rows with K a multiple of BLOCK_K (the common case), aligned rows with a
    # ragged K (masked loads), unaligned rows (masked, every stride a runtime value)
    for _aligned, _even in ((True, True), (True, False), (False, False)):
        for _avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
            _cfg = moe_config(_avg * 64, 64, _tdt, _aligned, _even)
            _tag = f"{_dt},BM={_cfg.block_m}" + ("" if _aligned else ",unaligned") + \
                ("" if _even or not _aligned else ",ragged_k")
            if _avg == 256 and _cfg.block_m < 64:
                continue                   # fp32 unaligned: BLOCK_M <= 32
            _const = {"BLOCK_M": _cfg.block_m, "BLOCK_N": _cfg.block_n,
                      "BLOCK_K": _cfg.block_k, "EVEN_K": _even, "ALIGNED": _aligned,
                      "DOT_F32": _dt == "fp32"}
            _unit = ({"sx_h": 1, "sw_h": 1}, {"sw_i": 1}) if _aligned else ({}, {})
            _opts = {"num_warps": _cfg.num_warps, "num_stages": _cfg.num_stages,
                     "tensor_core": _dt != "fp32",           # fp32 "ieee" dots: FMAs
                     "wgmma_expected": _cfg.block_m >= 64}
            _sig = {"x_ptr": f"*{_dt}", "w13_ptr": f"*{_dt}", "act_ptr": f"*{_dt}",
                    "delta_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                    "block_expert_ptr": "*i32", **_INTS,
                    "sx_t": "i64", "sx_h": "i64", "sw_e": "i64", "sw_n": "i64",
                    "sw_h": "i64", **_bias_sig(_dt, gate_up=True),
                    **{c: "constexpr" for c in (*_const, *_unit[0])}}
            _sig["RNE_BF16"] = _sig["ACT"] = _sig["GATED"] = "constexpr"   # RNE: interp.
            _sig_down = {"act_ptr": f"*{_dt}", "w2_ptr": f"*{_dt}", "tw_ptr": "*fp32",
                         "out_ptr": "*fp32", "delta_ptr": f"*{_dt}",
                         "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **_INTS,
                         "sw_e": "i64", "sw_h": "i64", "sw_i": "i64", "stw_t": "i64",
                         "stw_j": "i64", **_bias_sig(_dt, gate_up=False),
                         **{c: "constexpr" for c in (*_const, *_unit[1])}}
            # the LoRA variants (HAS_DELTA) of the common aligned tiles
            for _lora in (False, True) if _aligned and _even and _dt != "fp32" else (False,):
                _ltag = _tag + (",lora" if _lora else "")
                for _act, _gated, _bias in (*((a, g, False) for a, g in
                                              gate_up_variants(_dt, _cfg.block_m)),
                                            *(bias_variants(_dt) if _aligned and not _lora
                                              else ())):
                    register(KernelSpec(name=f"moe_gate_up[{_ltag}{_act_tag(_act, _gated)}"
                                        + (",bias]" if _bias else "]"),
                                        fn=moe_gate_up_kernel,
                                        signature=_in_order(moe_gate_up_kernel, _sig),
                                        constexprs={**_const, **_unit[0], "RNE_BF16": False,
                                                    "HAS_DELTA": _lora, "ACT": _act,
                                                    "GATED": _gated, "HAS_BIAS": _bias},
                                        **_opts))
                for _bias in (False, True) if bias_variants(_dt) and _aligned and not _lora \
                        else (False,):
                    register(KernelSpec(name=f"moe_down[{_ltag}" + (",bias]" if _bias else "]"),
                                        fn=moe_down_kernel,
                                        signature=_in_order(moe_down_kernel, _sig_down),
                                        constexprs={**_const, **_unit[1], "HAS_DELTA": _lora,
                                                    "HAS_BIAS": _bias},
                                        **_opts))
