"""The decoder: one implementation for Llama 2/3/3.x, Mistral, Granite 3.x, Phi-3 / 3.5 /
4-mini, SmolLM3, OLMo 2, GLM-4, Qwen2/2.5, Qwen3, Qwen3-MoE, Gemma 1/2/3 (text), the
other families of models/config.py, and the hybrid recurrent ones (below).

    h = embed(ids) (* embed_scale)       # Gemma: sqrt(hidden), in the model dtype; Granite:
                                         # embedding_multiplier
    for each layer:                      # pre-norm, residual fused into rms_norm
        x, res = rms_norm(h, res)        # first layer: res = h
        qkv = x @ Wqkv.T (+ b)           # fused q/k/v
        q, k = [rms_norm per head]       # Qwen3, Gemma 3
        q, k = rotary(q, k, positions)   # Gemma 3: sliding layers have their own base;
                                         # none in SmolLM3's NoPE layers
        o = attention(q, k, v, meta, kv_cache) @ Wo.T     # scale / window / softcap per layer
        [o = rms_norm(o)]                # sandwich norm (Gemma 2/3); Granite: o * residual_m
        x, res = rms_norm(o, res)
        h = act_and_mul(x @ Wgate_up.T) @ Wdown.T         # silu, or gelu (tanh) for Gemma;
                                         # MoE layers: top-k experts (models/moe.py)
        [h = rms_norm(h)]                # sandwich norm (Gemma 2/3); Granite: h * residual_m
    logits = rms_norm(h, res)[logits_indices] @ Wlm.T     (fp32; Gemma 2: softcapped;
                                                           Granite: / logits_scaling)

Gemma's norms scale by (1 + weight) (``norm_weight_offset``); with sandwich norms the
layer's post_attention_layernorm normalizes the attention output, and
pre_feedforward_layernorm / post_feedforward_layernorm wrap the MLP. OLMo 2 (post_norm)
has no norm before attention or the MLP: each output is normalized, then added.

Hybrid recurrent decoders (``config.layer_mixers``) replace attention in some layers by a
recurrent token mixer that keeps a fixed-size state per sequence instead of a KV cache:
:class:`ShortConv` (LFM2), :class:`GatedDeltaNet` (Qwen3.5), :class:`Mamba2Mixer`
(Granite 4.0-H, Bamba, Nemotron-H, Mamba-2, Zamba2; beside attention in every Falcon-H1
layer), :class:`MambaMixer` (Mamba-1: Mamba, FalconMamba, Jamba, Zamba). A layer's
``kv_caches`` entry is then its state tuple (after the (k, v) pair when it also attends),
each state [num_state_slots, ...], one slot per running sequence
(``meta.state_indices``; docs/engine.md, "Recurrent state slots").

Forward contract: :class:`minikernels.models.AttentionMetadata`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn.layers import (XIELU, LayerNorm, PagedAttention, QuantizedActivation, RMSNorm,
                         RotaryEmbedding, alibi_slopes, mpt_alibi_slopes)
from ..ops.attention import FP8_KV_DTYPES
from .config import DecoderConfig
from .kv_layout import KVCacheLayout
from .linear import FusedLinear
from .metadata import AttentionMetadata, RecurrentPart
from .moe import SparseMoE
from .parallel import TensorParallel, VocabParallelEmbedding, attention_shard, check_config
from .parallel_recurrent import Mamba2Shard, mamba2_shard

KVCache = tuple[Tensor, Tensor]


def finish_logits(logits: Tensor, config: DecoderConfig) -> Tensor:
    """lm_head output -> fp32 logits: Granite's logits scaling, Gemma 2's softcap."""
    logits = logits.float()
    if config.logits_scaling != 1.0:
        logits = logits / config.logits_scaling
    cap = config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap).mul_(cap)


class HiddenCapture:
    """Where a forward copies hidden states for an EAGLE-style draft head
    (engine/eagle.py), for every input token (not only the logits rows).

    layers: None = the final-normed hidden states (what the lm_head reads; EAGLE-1),
    [T, hidden]; or layer indices i (EAGLE-3's auxiliary layers): the residual stream
    entering layer i (``h + residual``, the embeddings for i = 0), concatenated in the
    given order, [T, len(layers) * hidden]. Written into ``buffer[:T]`` (model dtype,
    ``[max_tokens, width]``): a fixed buffer, so CUDA-graph replays write it too; valid
    until the next forward.
    """

    def __init__(self, layers: "list[int] | tuple[int, ...] | None", hidden_size: int,
                 max_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = tuple(int(i) for i in layers) if layers else None
        self.hidden_size = int(hidden_size)
        width = self.hidden_size * (len(self.layers) if self.layers else 1)
        self.buffer = torch.zeros(int(max_tokens), width, dtype=dtype, device=device)

    def write(self, slot: int, x: Tensor) -> None:
        t = x.shape[0]
        if t > self.buffer.shape[0]:
            raise RuntimeError(f"hidden-state capture holds {self.buffer.shape[0]} tokens, "
                               f"the forward has {t}")
        h = self.hidden_size
        self.buffer[:t, slot * h:(slot + 1) * h].copy_(x)


def make_norm(c: DecoderConfig, dtype: torch.dtype, device: torch.device | str | None
              ) -> RMSNorm | LayerNorm:
    """The decoder's norm of ``c.hidden_size``: RMSNorm (with Gemma's offset) or
    LayerNorm (StableLM, StarCoder 2, ...; with a bias when ``c.norm_bias``, Nemotron's
    offset, OLMo 1's without parameters; NanoChat's RMSNorms without parameters)."""
    if c.norm_type == "layer":
        return LayerNorm(c.hidden_size, c.rms_norm_eps, bias=c.norm_bias, dtype=dtype,
                         device=device, weight_offset=c.norm_weight_offset,
                         elementwise_affine=c.norm_affine)
    return RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, device=device,
                   weight_offset=c.norm_weight_offset, elementwise_affine=c.norm_affine)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int, rotary: RotaryEmbedding | None,
                 dtype: torch.dtype, device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None, in_features: int | None = None) -> None:
        super().__init__()
        c = config
        shard = attention_shard(c, tp, layer)   # all heads unless tensor-parallel
        head_dim = c.layer_head_dim(layer)
        nkv = shard.nkv
        self.num_heads, self.num_kv_heads, self.head_dim = shard.nq, nkv, head_dim
        self.q_size, self.kv_size = shard.nq * head_dim, nkv * head_dim
        self.__dict__["tp"] = tp
        # Gemma 4: a layer reading an earlier layer's K / V (no k / v projections), one
        # whose v is its k projection (k_eq_v), and the one-forward K / V store the
        # readers use when there is no cache (CausalLM sets kv_share)
        self.layer = layer
        self.kv_source = c.kv_source(layer)
        self.k_eq_v = c.k_eq_v_layers is not None and layer in c.k_eq_v_layers
        self.kv_stored = c.kv_shared_from is not None and layer in c.kv_shared_from
        self.__dict__["kv_share"] = None
        # Qwen3.5: q_proj rows hold [q | gate] per head (attn_output_gate)
        self.output_gate = c.attn_output_gate
        q_rows = self.q_size * (2 if self.output_gate else 1)
        parts = [q_rows] if self.kv_source is not None else \
            [q_rows, self.kv_size] if self.k_eq_v else [q_rows, self.kv_size, self.kv_size]
        # (in_features: Zamba2's shared blocks read cat(stream, embeddings), 2 H wide)
        self.qkv_proj = FusedLinear(in_features or c.hidden_size, parts,
                                    bias=c.qkv_bias, dtype=dtype, device=device, dense=dense)
        self.o_proj = FusedLinear(self.q_size, c.hidden_size, bias=c.o_bias, dtype=dtype,
                                  device=device, dense=dense)
        # LFM3: a sigmoid gate per head from the layer's input
        self.g_proj = FusedLinear(c.hidden_size, self.num_heads, bias=False, dtype=dtype,
                                  device=device, dense=dense) if c.attn_head_gate else None
        self.q_norm = self.k_norm = None
        self.qk_norm_full = c.qk_norm_full
        # the unsharded widths of OLMo 2's full q / k norms, and how many ranks hold each
        # kv head (its sum of squares arrives that many times in the all-reduce)
        replicas = tp.size // c.num_kv_heads if tp is not None and c.num_kv_heads < tp.size \
            else 1
        self.full_norm_dims = {"q_size": c.num_heads * c.head_dim,
                            "kv_size": c.num_kv_heads * c.head_dim, "kv_replicas": replicas}
        if c.qk_norm:   # per head, or (OLMo 2) over all heads of q / k
            q_dim, k_dim = (self.q_size, self.kv_size) if c.qk_norm_full else \
                (head_dim, head_dim)
            self.q_norm = RMSNorm(q_dim, c.rms_norm_eps, dtype=dtype, device=device,
                                  weight_offset=c.norm_weight_offset,
                                  elementwise_affine=c.norm_affine)
            self.k_norm = RMSNorm(k_dim, c.rms_norm_eps, dtype=dtype, device=device,
                                  weight_offset=c.norm_weight_offset,
                                  elementwise_affine=c.norm_affine) \
                if self.kv_source is None else None
        # Gemma 4: v RMS-normalized per head, no weight
        self.v_norm = RMSNorm(head_dim, c.rms_norm_eps, dtype=dtype, device=device,
                              elementwise_affine=False) \
            if c.v_norm and self.kv_source is None else None
        # Shared across layers; a plain attribute (not a submodule) so it is stored once.
        self.__dict__["rotary"] = rotary
        self.qk_norm_after_rope = c.qk_norm_after_rope
        # Granite (with sandwich norms, HyperCLOVA X, the layer applies it after its norm)
        self.residual_multiplier = 1.0 if c.sandwich_norm else c.residual_multiplier
        self.clip_qkv = c.clip_qkv
        self.key_multiplier = c.attention_key_multiplier      # Falcon-H1
        self.q_scale_beta = c.llama4_scaling_beta           # Llama 4 / Ministral 3
        self.q_scale_length = c.llama4_scaling_length
        slopes = None
        if c.position_embedding == "alibi":    # BLOOM / MPT: this rank's heads' slopes
            slopes = alibi_slopes(c.num_heads) if c.alibi_max_bias is None else \
                mpt_alibi_slopes(c.num_heads, c.alibi_max_bias)
            slopes = slopes[shard.q0:shard.q0 + shard.nq].to(device)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim,
                                   softmax_scale=c.softmax_scale,
                                   window_left=c.window_left(layer),
                                   softcap=c.attn_logit_softcapping or 0.0,
                                   alibi_slopes=slopes, sinks=c.attention_sinks,
                                   device=device)

    def forward(self, x: Tensor, meta: AttentionMetadata, kv_cache: KVCache | None,
                qkv_extra: Tensor | None = None) -> Tensor:
        """x [T, in_features] -> [T, hidden]. qkv_extra [T, q + 2 kv] (Zamba2's per-call
        adapters) is added to the q / k / v projections."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if qkv_extra is not None:
            qkv = qkv + qkv_extra
        if self.clip_qkv is not None:     # OLMo 1: q, k, v clamped to [-clip, clip]
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        gate = None
        if self.kv_source is not None or self.k_eq_v:      # (Gemma 4)
            return self._gemma4_forward(x, qkv, meta, kv_cache)
        if self.output_gate:    # [q | gate] per head
            qg, k, v = qkv.split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
            qg = qg.reshape(t, self.num_heads, 2 * self.head_dim)
            q, gate = qg[..., :self.head_dim], qg[..., self.head_dim:]
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_full:
            q, k = self._full_qk_norm(q, k)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        if self.v_norm is not None:
            v = self.v_norm(v)
        per_head_norm = self.q_norm is not None and not self.qk_norm_full
        if per_head_norm and not self.qk_norm_after_rope and self.rotary is not None:
            # Qwen3 / Gemma 3: each head's norm and the rotation in one launch
            q, k = self.rotary.norm_and_rotate(q, k, meta.positions, self.q_norm,
                                               self.k_norm)
        else:
            if per_head_norm and not self.qk_norm_after_rope:
                q = self.q_norm(q.contiguous())
                k = self.k_norm(k.contiguous())
            if self.rotary is not None:     # None: a NoPE layer (SmolLM3)
                q, k = self.rotary(q, k, meta.positions)
        if per_head_norm and self.qk_norm_after_rope:      # HunYuan
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.q_scale_beta is not None:
            # attention temperature: queries past each original context grow by beta * log
            far = torch.floor(meta.positions.float() / self.q_scale_length)
            q = q * (1 + self.q_scale_beta * torch.log1p(far)).to(q.dtype)[:, None, None]
        if self.kv_stored and kv_cache is None and self.kv_share is not None:
            self.kv_share[self.layer] = (k, v)        # (Gemma 4: read by later layers)
        o = self.attn(q, k, v, meta, kv_cache)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).unsqueeze(-1)
        o = self.o_proj(o.reshape(t, self.q_size))
        if self.tp is not None:
            o = self.tp.all_reduce(o)   # row-parallel o_proj
        return o if self.residual_multiplier == 1.0 else o * self.residual_multiplier


    def _gemma4_forward(self, x: Tensor, qkv: Tensor, meta: AttentionMetadata,
                        kv_cache: KVCache | None) -> Tensor:
        """Gemma 4's K = V and K / V-sharing layers: v is the k projection (k_eq_v, before
        k's norm); a reading layer has q only and attends over its source layer's K / V
        (the source's cache pair, already written this step, or without a cache the K /
        V the source left in ``kv_share``)."""
        t = x.shape[0]
        q_raw = qkv[:, :self.q_size].reshape(t, self.num_heads, self.head_dim)
        if self.kv_source is not None:
            q = self.q_norm(q_raw.contiguous())
            if self.rotary is not None:     # (rotates q twice over: the op takes a k)
                q = self.rotary(q, q, meta.positions)[0]
            if kv_cache is None:
                k, v = self.kv_share[self.kv_source]
                o = self.attn(q, k, v, meta, None)
            else:
                o = self.attn(q, None, None, meta, kv_cache, write=False)
            return _all_reduce(self.tp, self.o_proj(o.reshape(t, self.q_size)))
        raw = qkv[:, self.q_size:].reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_norm(raw.contiguous()) if self.v_norm is not None else raw.contiguous()
        if self.rotary is not None:     # q / k norms and the rotation in one launch
            q, k = self.rotary.norm_and_rotate(q_raw, raw, meta.positions, self.q_norm,
                                               self.k_norm)
        else:
            q, k = self.q_norm(q_raw.contiguous()), self.k_norm(raw.contiguous())
        return self._attend_and_store(q, k, v, meta, kv_cache, t)

    def _attend_and_store(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata,
                          kv_cache: KVCache | None, t: int) -> Tensor:
        """Attention, o_proj; without a cache a source layer leaves its K / V for the
        layers reading them (Gemma 4)."""
        if self.kv_stored and kv_cache is None and self.kv_share is not None:
            self.kv_share[self.layer] = (k, v)
        o = self.attn(q, k, v, meta, kv_cache)
        return _all_reduce(self.tp, self.o_proj(o.reshape(t, self.q_size)))   # row-parallel

    def _full_qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """OLMo 2's RMSNorms over all heads of q [T, q_size] and k [T, kv_size]. Under
        tensor parallel a rank holds some heads: its fp32 sums of squares are all-reduced
        (k's divided by the number of ranks holding each kv head) and each rank
        normalizes its slice by the full-width rms (ops.rms_norm's math: fp32, one
        rounding)."""
        tp = self.tp
        if tp is None or tp.size == 1:
            return self.q_norm(q), self.k_norm(k)
        dims = self.full_norm_dims
        qf, kf = q.float(), k.float()
        sums = tp.all_reduce(torch.cat([qf.square().sum(-1, keepdim=True),
                                        kf.square().sum(-1, keepdim=True)], dim=-1))
        mean_q = sums[:, :1] / dims["q_size"]
        mean_k = sums[:, 1:] / (dims["kv_size"] * dims["kv_replicas"])
        qn, kn = self.q_norm, self.k_norm
        q_out = qf * torch.rsqrt(mean_q + qn.eps) * (qn.weight.float() + qn.weight_offset)
        k_out = kf * torch.rsqrt(mean_k + kn.eps) * (kn.weight.float() + kn.weight_offset)
        return q_out.to(q.dtype), k_out.to(k.dtype)


def _all_reduce(tp: TensorParallel | None, x: Tensor) -> Tensor:
    """x summed over the tensor-parallel group (a row-parallel projection's partial
    outputs), or x as is without one."""
    return x if tp is None else tp.all_reduce(x)


def by_parts(meta: AttentionMetadata, with_state: bool, fn: Callable[[RecurrentPart], Tensor],
             like: Tensor, trailing: tuple[int, ...]) -> Tensor:
    """``fn`` over the step's recurrent launches (decode rows, then prefill chunks: each
    on its own kernels), concatenated in token order; an empty [0, *trailing] tensor like
    ``like`` when the step has no tokens."""
    parts = meta.recurrent_parts(with_state)
    if not parts:
        return like.new_empty(0, *trailing)
    outs = [fn(p) for p in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class ShortConv(nn.Module):
    """LFM2's gated short convolution (a recurrent token mixer):

        b, c, u = in_proj(x).split(H)            # [T, H] each
        y = c * causal_conv1d(b * u)             # depthwise, width W, per sequence
        out = out_proj(y)

    Its cache (from :meth:`CausalLM.allocate_kv_caches`) is ``(conv_state,)``,
    [num_state_slots, H, W - 1] in the model dtype: each sequence's last W - 1 inputs of
    the convolution, in the slot ``meta.state_indices`` names (see
    :class:`~minikernels.models.AttentionMetadata`). Without a cache (a cache-less
    forward over whole prompts) every sequence starts from zeros.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        # tensor parallel: this rank's H / P channels of b, c, u (models/parallel_recurrent.py)
        self.hidden_size = h = c.hidden_size // (tp.size if tp is not None else 1)
        self.width = c.conv_kernel
        self.__dict__["tp"] = tp
        self.in_proj = FusedLinear(c.hidden_size, 3 * h, bias=c.conv_bias,
                                   dtype=dtype, device=device, dense=dense)
        # the depthwise kernel as transformers stores it, [H, 1, W] (never called: its
        # weight feeds ops.causal_conv1d)
        self.conv = nn.Conv1d(h, h, c.conv_kernel, groups=h, bias=c.conv_bias, dtype=dtype,
                              device=device)
        self.conv.requires_grad_(False)
        self.out_proj = FusedLinear(h, c.hidden_size, bias=c.conv_bias,
                                    dtype=dtype, device=device, dense=dense)

    def forward(self, x: Tensor, meta: AttentionMetadata,
                cache: tuple[Tensor] | None) -> Tensor:
        h = self.hidden_size
        b, c, u = self.in_proj(x).split(h, dim=-1)
        state = cache[0] if cache is not None else None
        bu = b * u

        def conv(p: RecurrentPart) -> Tensor:
            return ops.causal_conv1d(bu[p.tokens], self.conv.weight.view(h, self.width),
                                     self.conv.bias, cu_seqlens=p.cu_seqlens,
                                     conv_state=state, state_indices=p.state_indices,
                                     has_initial_state=p.has_initial_state,
                                     max_seqlen=p.max_seqlen)
        return _all_reduce(self.tp, self.out_proj(c * by_parts(meta, state is not None,
                                                               conv, bu, (h,))))

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-slot state tensors: (shape without the slot dim, dtype; None = model's)."""
        return [((self.hidden_size, self.width - 1), None)]


class GatedDeltaNet(nn.Module):
    """Qwen3.5's Gated DeltaNet (linear attention; a recurrent token mixer):

        qkv, z, b, a = in_proj(x)                        # one GEMM, four parts
        q, k, v = silu(causal_conv1d(qkv)).split(...)    # per sequence, width W
        beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)      # fp32
        o = gated_delta_rule(q, k, v, g, beta, l2-normalized q / k)      # [T, Hv, dv]
        out = out_proj(rms_norm(o) * silu(z))            # the norm per value head

    Its cache (from :meth:`CausalLM.allocate_kv_caches`) is ``(conv_state,
    recurrent_state)``: [slots, 2 * Hk * dk + Hv * dv, W - 1] in the model dtype and
    [slots, Hv, dk, dv] fp32, each sequence in the slot ``meta.state_indices`` names.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        # tensor parallel: this rank's key and value heads (models/parallel_recurrent.py)
        p = tp.size if tp is not None else 1
        self.__dict__["tp"] = tp
        self.num_k_heads = c.linear_num_key_heads // p
        self.num_v_heads = c.linear_num_value_heads // p
        self.k_dim, self.v_dim = c.linear_key_head_dim, c.linear_value_head_dim
        self.key_size = self.num_k_heads * self.k_dim
        self.value_size = self.num_v_heads * self.v_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.width = c.conv_kernel
        hv = self.num_v_heads
        # parts in transformers' order: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (OLMo
        # Hybrid: q, k, v, g, b, a projections; the same output layout)
        parts = [self.key_size, self.key_size, self.value_size] \
            if c.gdn_separate_projections else [self.conv_dim]
        self.in_proj = FusedLinear(c.hidden_size, parts + [self.value_size, hv, hv],
                                   bias=False, dtype=dtype, device=device, dense=dense)
        self.beta_scale = c.gdn_beta_scale
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.width,
                                groups=self.conv_dim, bias=False, dtype=dtype, device=device)
        self.conv1d.requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.ones(hv, dtype=dtype, device=device),
                                    requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(hv, dtype=dtype, device=device),
                                  requires_grad=False)
        self.norm = RMSNorm(self.v_dim, c.rms_norm_eps if c.gdn_norm_eps is None else
                            c.gdn_norm_eps, dtype=dtype, device=device)
        self.out_proj = FusedLinear(self.value_size, c.hidden_size, bias=False, dtype=dtype,
                                    device=device, dense=dense)

    def forward(self, x: Tensor, meta: AttentionMetadata,
                cache: tuple[Tensor, Tensor] | None) -> Tensor:
        t, hv = x.shape[0], self.num_v_heads
        qkv, z, b, a = self.in_proj(x).split([self.conv_dim, self.value_size, hv, hv],
                                             dim=-1)
        conv_state, state = cache if cache is not None else (None, None)
        beta = torch.sigmoid(b)
        if self.beta_scale != 1.0:          # (OLMo Hybrid: beta in [0, 2])
            beta = beta * self.beta_scale
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        def mix(p: RecurrentPart) -> Tensor:
            """The conv and the gated delta rule over one launch's tokens -> [n, Hv, dv]."""
            conv = ops.causal_conv1d(qkv[p.tokens],
                                     self.conv1d.weight.view(self.conv_dim, self.width), None,
                                     cu_seqlens=p.cu_seqlens, conv_state=conv_state,
                                     state_indices=p.state_indices,
                                     has_initial_state=p.has_initial_state, activation="silu",
                                     max_seqlen=p.max_seqlen)
            n = conv.shape[0]
            q, k, v = conv.split([self.key_size, self.key_size, self.value_size], dim=-1)
            return ops.gated_delta_rule(
                q.reshape(n, self.num_k_heads, self.k_dim),
                k.reshape(n, self.num_k_heads, self.k_dim), v.reshape(n, hv, self.v_dim),
                g[p.tokens], beta[p.tokens], cu_seqlens=p.cu_seqlens, state=state,
                state_indices=p.state_indices, has_initial_state=p.has_initial_state,
                use_qk_l2norm=True, max_seqlen=p.max_seqlen)
        o = by_parts(meta, cache is not None, mix, x, (hv, self.v_dim))
        y = self.norm(o.reshape(t * hv, self.v_dim)).float() * F.silu(
            z.reshape(t * hv, self.v_dim).float())
        return _all_reduce(self.tp, self.out_proj(y.to(x.dtype).reshape(t, self.value_size)))

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-slot state tensors: the conv's inputs (model dtype), the fp32 state."""
        return [((self.conv_dim, self.width - 1), None),
                ((self.num_v_heads, self.k_dim, self.v_dim), torch.float32)]


class Mamba2Mixer(nn.Module):
    """Mamba-2 (Granite 4.0-H; a recurrent token mixer):

        z, xbc, dt = in_proj(x).split([inner, inner + 2 G N, heads])
        xs, b, c = silu(causal_conv1d(xbc)).split([inner, G N, G N])   # per sequence
        y = mamba2_scan(xs, dt, -exp(A_log), b, c, D, dt_bias)       # [T, heads, P]
        out = out_proj(rms_norm_per_group(y * silu(z)))   (* Granite's residual multiplier)

    Its cache (from :meth:`CausalLM.allocate_kv_caches`) is ``(conv_state, ssm_state)``:
    [slots, inner + 2 G N, W - 1] in the model dtype and [slots, heads, P, N] fp32.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        # tensor parallel: this rank's heads and their B / C groups; a norm group spread
        # over norm_span ranks has its sum of squares all-reduced
        shard = mamba2_shard(c, tp.rank, tp.size) if tp is not None else \
            Mamba2Shard(0, c.mamba_num_heads, 0, c.mamba_num_groups, 1)
        self.__dict__["tp"] = tp
        self.shard = shard
        self.num_heads, self.head_dim = shard.nh, c.mamba_head_dim
        self.num_groups, self.state_size = shard.ng, c.mamba_state_size
        self.all_groups = c.mamba_num_groups
        self.norm_group_size = c.mamba_num_heads * c.mamba_head_dim // c.mamba_num_groups
        self.inner = self.num_heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.num_groups * self.state_size
        self.width = c.conv_kernel
        self.dt_limit = tuple(c.mamba_dt_limit)
        self.eps = c.rms_norm_eps if c.mamba_norm_eps is None else c.mamba_norm_eps
        width = self.inner + self.conv_dim + self.num_heads
        self.in_proj = FusedLinear(c.hidden_size, width, bias=c.mamba_proj_bias, dtype=dtype,
                                   device=device, dense=dense)
        # Falcon-H1's muP: the input scaled, each in_proj section ([z, x, B, C, dt]) scaled
        self.in_multiplier = c.mamba_in_multiplier
        self.register_buffer("section_scale", None, persistent=False)
        if c.mamba_ssm_multipliers is not None and any(m != 1.0 for m in
                                                       c.mamba_ssm_multipliers):
            gn = self.num_groups * self.state_size
            sizes = [self.inner, self.inner, gn, gn, self.num_heads]
            scale = torch.cat([torch.full((n,), float(m)) for n, m in
                               zip(sizes, c.mamba_ssm_multipliers)])
            self.section_scale = scale.to(dtype=dtype, device=device)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.width, groups=self.conv_dim,
                                bias=c.conv_bias, dtype=dtype, device=device)
        self.conv1d.requires_grad_(False)
        h = self.num_heads
        self.dt_bias = nn.Parameter(torch.ones(h, dtype=dtype, device=device),
                                    requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(h, dtype=dtype, device=device),
                                  requires_grad=False)
        self.D = nn.Parameter(torch.ones(h, dtype=dtype, device=device), requires_grad=False)
        # the gated norm's weight over the inner width (normalized per group of heads);
        # none without mamba_rms_norm (Falcon-H1: y * silu(z))
        self.norm_before_gate = c.mamba_norm_before_gate
        self.norm = RMSNorm(self.inner, c.rms_norm_eps, dtype=dtype, device=device) \
            if c.mamba_rms_norm else None
        self.out_proj = FusedLinear(self.inner, c.hidden_size, bias=c.mamba_out_bias,
                                    dtype=dtype, device=device, dense=dense)
        self.residual_multiplier = 1.0 if c.sandwich_norm else c.residual_multiplier

    def forward(self, x: Tensor, meta: AttentionMetadata,
                cache: tuple[Tensor, Tensor] | None) -> Tensor:
        t, h, g, n = x.shape[0], self.num_heads, self.num_groups, self.state_size
        proj = self.in_proj(x if self.in_multiplier == 1.0 else x * self.in_multiplier)
        if self.section_scale is not None:
            proj = proj * self.section_scale
        z, xbc, dt = proj.split([self.inner, self.conv_dim, h], dim=-1)
        conv_state, state = cache if cache is not None else (None, None)
        a_neg = -torch.exp(self.A_log.float())

        def mix(p: RecurrentPart) -> Tensor:
            """The conv and the SSM scan over one launch's tokens -> [n, heads, P]."""
            conv = ops.causal_conv1d(xbc[p.tokens],
                                     self.conv1d.weight.view(self.conv_dim, self.width),
                                     self.conv1d.bias, cu_seqlens=p.cu_seqlens,
                                     conv_state=conv_state, state_indices=p.state_indices,
                                     has_initial_state=p.has_initial_state,
                                     activation="silu", max_seqlen=p.max_seqlen)
            m = conv.shape[0]
            xs, b, c = conv.split([self.inner, g * n, g * n], dim=-1)
            return ops.mamba2_scan(xs.reshape(m, h, self.head_dim), dt[p.tokens], a_neg,
                                   b.reshape(m, g, n), c.reshape(m, g, n),
                                   cu_seqlens=p.cu_seqlens, D=self.D, dt_bias=self.dt_bias,
                                   dt_softplus=True, dt_limit=self.dt_limit, state=state,
                                   state_indices=p.state_indices,
                                   has_initial_state=p.has_initial_state,
                                   max_seqlen=p.max_seqlen)
        y = by_parts(meta, cache is not None, mix, x, (h, self.head_dim))
        y = self._gate_and_norm(y.reshape(t, self.inner).float(), z.float()).to(x.dtype)
        out = _all_reduce(self.tp, self.out_proj(y))
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def _gate_and_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """y * silu(z) with an RMSNorm per group of heads after the gate (Granite), before
        it (norm_before_gate), or none (fp32 in and out)."""
        if self.norm is None:
            return y * F.silu(z)
        if not self.norm_before_gate:
            y = y * F.silu(z)
        t, g = y.shape[0], self.num_groups
        grouped = y.reshape(t, g, self.inner // g)
        if self.shard.norm_span == 1:
            mean_square = grouped.square().mean(-1, keepdim=True)
        else:   # the rank holds part of one norm group: the group's sum over its ranks
            sums = y.new_zeros(t, self.all_groups)
            sums[:, self.shard.g0] = grouped.square().sum((-2, -1))
            sums = self.tp.all_reduce(sums)
            mean_square = (sums[:, self.shard.g0] / self.norm_group_size).view(t, 1, 1)
        normed = grouped * torch.rsqrt(mean_square + self.eps)
        y = self.norm.weight.float() * normed.reshape(t, self.inner)
        return y * F.silu(z) if self.norm_before_gate else y

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-slot state tensors: the conv's inputs (model dtype), the fp32 SSM state."""
        return [((self.conv_dim, self.width - 1), None),
                ((self.num_heads, self.head_dim, self.state_size), torch.float32)]


class MambaMixer(nn.Module):
    """Mamba-1 (Mamba, FalconMamba, Jamba, Zamba; a recurrent token mixer):

        xs, z = in_proj(x).split(inner)                       # [T, inner] each
        xs = silu(causal_conv1d(xs))                          # per sequence
        dt, b, c = x_proj(xs).split([R, N, N])                # (norms: FalconMamba, Jamba)
        y = selective_scan(xs, dt_proj(dt), -exp(A_log), b, c, D, z, dt_bias, softplus)
        out = out_proj(y)                                     # y gated by silu(z) inside

    Its cache (from :meth:`CausalLM.allocate_kv_caches`) is ``(conv_state, ssm_state)``:
    [slots, inner, W - 1] in the model dtype and [slots, inner, N] fp32. ``dt_bias`` is
    the checkpoint's dt_proj bias, added in fp32 inside the scan (mamba_ssm's delta_bias).

    Zamba's multi-head form (``config.mamba1_num_heads`` = Hm > 1, P = inner / Hm
    channels per head): in_proj's rows interleave x and z ([x_0, z_0, x_1, z_1, ...], as
    the checkpoint stores them), and each head has its own projections, held in the
    checkpoint's shapes: ``x_proj_weight`` [Hm, R + 2N, P] (head h's dt / B / C from its
    own P channels), ``dt_proj_weight`` [Hm, P, R], ``dt_bias`` [Hm, P] (the checkpoint's
    dt_proj_bias), ``A_log`` [Hm, P, N], ``D`` [Hm, P]; the scan runs all heads at once,
    head h's channels reading B / C group h. Not tensor-parallel.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        # tensor parallel: this rank's inner channels; x_proj row-parallel (all-reduced)
        self.__dict__["tp"] = tp
        self.inner = c.mamba_inner_size // (tp.size if tp is not None else 1)
        self.dt_rank = c.mamba_dt_rank
        self.state_size, self.width = c.mamba_state_size, c.conv_kernel
        self.num_heads = heads = c.mamba1_num_heads
        if heads > 1 and tp is not None:
            raise ValueError("multi-head Mamba-1 layers (Zamba) are not tensor-parallel")
        inner, n = self.inner, self.state_size
        self.in_proj = FusedLinear(c.hidden_size, 2 * inner, bias=c.mamba_proj_bias,
                                   dtype=dtype, device=device, dense=dense)
        self.conv1d = nn.Conv1d(inner, inner, self.width, groups=inner, bias=c.conv_bias,
                                dtype=dtype, device=device)
        self.conv1d.requires_grad_(False)

        def param(*shape: int, fill: float = 0.0) -> nn.Parameter:
            return nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device),
                                requires_grad=False)
        # per channel: [inner]-shaped as one head, [Hm, P]-shaped per head (Zamba)
        per_channel = (inner,) if heads == 1 else (heads, inner // heads)
        self.x_proj = self.dt_proj = None
        self.x_proj_weight = self.dt_proj_weight = None
        if heads == 1:
            self.x_proj = FusedLinear(inner, self.dt_rank + 2 * n, bias=False, dtype=dtype,
                                      device=device, dense=dense)
            self.dt_proj = FusedLinear(self.dt_rank, inner, bias=False, dtype=dtype,
                                       device=device, dense=dense)
        else:
            self.x_proj_weight = param(heads, self.dt_rank + 2 * n, inner // heads)
            self.dt_proj_weight = param(heads, inner // heads, self.dt_rank)
        self.dt_bias = param(*per_channel)
        self.A_log = param(*per_channel, n)
        self.D = param(*per_channel, fill=1.0)
        # FalconMamba: RMS norms without weights; Jamba: with weights (dt_layernorm, ...)
        self.dt_layernorm = self.b_layernorm = self.c_layernorm = None
        if c.mamba_bcdt_norm:
            affine = c.mamba_bcdt_norm == "weighted"
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = (
                RMSNorm(size, c.mamba_bcdt_eps, dtype=dtype, device=device,
                        elementwise_affine=affine) for size in (self.dt_rank, n, n))
        self.out_proj = FusedLinear(inner, c.hidden_size, bias=c.mamba_out_bias, dtype=dtype,
                                    device=device, dense=dense)

    def forward(self, x: Tensor, meta: AttentionMetadata,
                cache: tuple[Tensor, Tensor] | None) -> Tensor:
        inner, n, heads = self.inner, self.state_size, self.num_heads
        if heads == 1:
            xs, z = self.in_proj(x).split(inner, dim=-1)
        else:               # (Zamba: x and z rows interleaved)
            pair = self.in_proj(x).view(x.shape[0], inner, 2)
            xs, z = pair[..., 0].contiguous(), pair[..., 1].contiguous()
        conv_state, state = cache if cache is not None else (None, None)
        with_state = cache is not None

        def conv(p: RecurrentPart) -> Tensor:
            return ops.causal_conv1d(xs[p.tokens], self.conv1d.weight.view(inner, self.width),
                                     self.conv1d.bias, cu_seqlens=p.cu_seqlens,
                                     conv_state=conv_state, state_indices=p.state_indices,
                                     has_initial_state=p.has_initial_state,
                                     activation="silu", max_seqlen=p.max_seqlen)
        u = by_parts(meta, with_state, conv, x, (inner,))
        t = u.shape[0]
        if heads == 1:
            dt, b, c = _all_reduce(self.tp, self.x_proj(u)).split([self.dt_rank, n, n], dim=-1)
            if self.dt_layernorm is not None:
                dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
            dt = self.dt_proj(dt)
            b, c = b.reshape(t, 1, n), c.reshape(t, 1, n)
        else:
            dt, b, c = self._head_projections(u)
        a_neg = -torch.exp(self.A_log.float()).reshape(inner, n)
        d, dt_bias = self.D.reshape(inner), self.dt_bias.reshape(inner)

        def scan(p: RecurrentPart) -> Tensor:
            return ops.selective_scan(u[p.tokens], dt[p.tokens], a_neg, b[p.tokens],
                                      c[p.tokens], cu_seqlens=p.cu_seqlens,
                                      D=d, z=z[p.tokens], dt_bias=dt_bias,
                                      dt_softplus=True, state=state,
                                      state_indices=p.state_indices,
                                      has_initial_state=p.has_initial_state,
                                      max_seqlen=p.max_seqlen)
        return _all_reduce(self.tp, self.out_proj(by_parts(meta, with_state, scan, x,
                                                            (inner,))))

    def _head_projections(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Zamba's per-head projections of the conv output u [T, inner] (head h: channels
        [h P, (h + 1) P)) -> dt [T, inner] (before dt_bias), B and C [T, Hm, N]."""
        t, heads, n = u.shape[0], self.num_heads, self.state_size
        uh = u.view(t, heads, self.inner // heads).transpose(0, 1)        # [Hm, T, P]
        params = torch.bmm(uh, self.x_proj_weight.transpose(1, 2))      # [Hm, T, R + 2N]
        dt, b, c = params.split([self.dt_rank, n, n], dim=-1)
        dt = torch.bmm(dt, self.dt_proj_weight.transpose(1, 2))          # [Hm, T, P]
        return (dt.transpose(0, 1).reshape(t, self.inner),
                b.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous())

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-slot state tensors: the conv's inputs (model dtype), the fp32 SSM state."""
        return [((self.inner, self.width - 1), None),
                ((self.inner, self.state_size), torch.float32)]


#: the non-gated MLP's activation by DecoderConfig.activation
_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "relu2": lambda x: F.relu(x).square()}     # Nemotron / Arcee: squared ReLU


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None, intermediate_size: int | None = None
                 ) -> None:
        super().__init__()
        c = config
        inter = (intermediate_size or c.intermediate_size) // (tp.size if tp is not None else 1)
        self.__dict__["tp"] = tp
        # gated: [gate; up] rows; not gated (StarCoder 2): the one up projection (c_fc)
        self.gated = c.mlp_gated
        self.gate_up_proj = FusedLinear(c.hidden_size, [inter] * (2 if c.mlp_gated else 1),
                                        bias=c.mlp_bias, dtype=dtype, device=device,
                                        dense=dense)
        self.down_proj = FusedLinear(inter, c.hidden_size, bias=c.mlp_bias,
                                     dtype=dtype, device=device, dense=dense)
        self.activation = c.activation
        # Apertus: xIELU with learned parameters per layer (nn.layers.XIELU)
        self.act_fn = XIELU(dtype, device) if c.activation == "xielu" else None
        self.qk_norm_after_rope = c.qk_norm_after_rope
        self.residual_multiplier = 1.0 if c.sandwich_norm else c.residual_multiplier
        # Falcon-H1: the gate scaled before the activation, the output after down_proj
        self.register_buffer("gate_scale", None, persistent=False)
        if c.mlp_gate_multiplier != 1.0 and c.mlp_gated:
            scale = torch.ones(2 * inter)
            scale[:inter] = c.mlp_gate_multiplier
            self.gate_scale = scale.to(dtype=dtype, device=device)
        self.down_multiplier = c.mlp_down_multiplier

    def forward(self, x: Tensor, gate_up_extra: Tensor | None = None) -> Tensor:
        """x [T, hidden] -> [T, hidden]; gate_up_extra [T, 2 I] (Zamba2's per-call adapter)
        is added to the gate / up projection."""
        gate_up = self.gate_up_proj(x)
        if gate_up_extra is not None:
            gate_up = gate_up + gate_up_extra
        if self.gate_scale is not None:
            gate_up = gate_up * self.gate_scale
        quant = self.__dict__.get("_quantize_down")
        if not self.gated:
            h = self.act_fn(gate_up) if self.act_fn is not None else \
                _ACTIVATIONS[self.activation](gate_up)
        elif quant is not None and "lora" not in self.down_proj.__dict__:
            # a W8A8 down_proj: the activation quantizes its own output (fuse_w8a8_inputs)
            act = self.activation if self.activation in ("silu", "gelu_tanh") else "gelu"
            h = QuantizedActivation(*ops.act_and_mul_quant(gate_up, quant[0], act,
                                                           group_size=quant[1]),
                                    gate_up.dtype)
        elif self.activation == "silu":
            h = ops.silu_and_mul(gate_up)
        else:
            h = ops.gelu_and_mul(gate_up, "tanh" if self.activation == "gelu_tanh" else "none")
        y = self.down_proj(h)
        if self.down_multiplier != 1.0:
            y = y * self.down_multiplier
        if self.tp is not None:
            y = self.tp.all_reduce(y)   # row-parallel down_proj
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier


class ZambaSharedBlock(nn.Module):
    """One of Zamba2's shared transformer blocks, or Zamba's one (called by several
    hybrid layers):

        a = self_attn(rms_norm(cat(stream, embeddings)))     # 2 H wide q / k / v input
        out = mlp(rms_norm(a))                               # no residual inside

    Each caller brings its own adapters' q / k / v and gate_up deltas
    (:class:`ZambaAdapters`; Zamba: none) and its own KV cache."""

    def __init__(self, config: DecoderConfig, rotary: RotaryEmbedding | None,
                 dtype: torch.dtype, device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config
        wide = 2 * c.hidden_size
        self.input_layernorm = RMSNorm(wide, c.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(c, 0, rotary, dtype, device, dense, tp, in_features=wide)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype,
                                        device=device)
        self.mlp = MLP(c, dtype, device, dense, tp)

    def forward(self, stream: Tensor, embeds: Tensor, meta: AttentionMetadata,
                kv_cache: KVCache | None, adapters: "ZambaAdapters | None") -> Tensor:
        """stream, embeds [T, H] -> [T, H]; adapters None: Zamba (v1), which has none."""
        x = self.input_layernorm(torch.cat([stream, embeds], dim=-1))
        a = self.self_attn(x, meta, kv_cache,
                           qkv_extra=None if adapters is None else adapters.qkv(x))
        m = self.pre_ff_layernorm(a)
        return self.mlp(m, gate_up_extra=None if adapters is None else adapters.gate_up(m))


class ZambaAdapters(nn.Module):
    """A Zamba2 hybrid layer's own low-rank adapters on its shared block: x -> B (A x) on
    the MLP's gate_up (always) and on q / k / v (``zamba_attention_adapters``); A's of q /
    k / v fused in one [3 r, 2 H] projection. Tensor parallel: the A's replicated, the B's
    rows cut like the block's q / k / v and gate_up rows (this rank's heads and slice)."""

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, tp: TensorParallel | None = None
                 ) -> None:
        super().__init__()
        c, r = config, config.zamba_adapter_rank
        self.rank = r
        shard = attention_shard(c, tp)
        inter = c.intermediate_size // (tp.size if tp is not None else 1)
        self.qkv_a = self.q_b = self.k_b = self.v_b = None
        if c.zamba_attention_adapters:
            self.qkv_a = FusedLinear(2 * c.hidden_size, [r, r, r], dtype=dtype, device=device)
            self.q_b = FusedLinear(r, shard.nq * c.head_dim, dtype=dtype, device=device)
            self.k_b = FusedLinear(r, shard.nkv * c.head_dim, dtype=dtype, device=device)
            self.v_b = FusedLinear(r, shard.nkv * c.head_dim, dtype=dtype, device=device)
        self.gate_up_a = FusedLinear(c.hidden_size, r, dtype=dtype, device=device)
        self.gate_up_b = FusedLinear(r, 2 * inter, dtype=dtype, device=device)

    def qkv(self, x: Tensor) -> Tensor | None:
        """[T, 2 H] -> the q / k / v deltas [T, q + 2 kv], or None without them."""
        if self.qkv_a is None:
            return None
        aq, ak, av = self.qkv_a(x).split(self.rank, dim=-1)
        return torch.cat([self.q_b(aq), self.k_b(ak), self.v_b(av)], dim=-1)

    def gate_up(self, x: Tensor) -> Tensor:
        """[T, H] -> the gate / up delta [T, 2 I]."""
        return self.gate_up_b(self.gate_up_a(x))


def _nemotron_moe(config: DecoderConfig, dtype: torch.dtype,
                  device: torch.device | str | None, dense: bool,
                  tp: TensorParallel | None) -> nn.Module:
    """Nemotron 3's mixture-of-experts block (models/nemotron_moe.py)."""
    from .nemotron_moe import NemotronMoE
    return NemotronMoE(config, dtype, device, dense, tp)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int, rotary: RotaryEmbedding | None,
                 dtype: torch.dtype, device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        c = config

        def norm() -> RMSNorm | LayerNorm:
            return make_norm(c, dtype, device)

        # OLMo 2 / 3 post-norm layers (OLMo Hybrid: only its attention layers)
        self.post_norm = c.post_norm and (c.post_norm_layers is None or
                                          layer in c.post_norm_layers)
        self.parallel_residual = c.parallel_residual
        # HyperCLOVA X: sandwich norms and Granite's multiplier after each output norm
        self.sandwich_multiplier = c.residual_multiplier if c.sandwich_norm else 1.0
        self.input_layernorm = None if self.post_norm else norm()
        # the token mixer: attention (self_attn), or a recurrent one (LFM2's conv,
        # Qwen3.5's linear_attn, Granite 4.0-H's mamba)
        self.self_attn = self.conv = self.linear_attn = self.mamba = None
        kind = c.mixer(layer)
        if kind == "short_conv":
            self.conv = ShortConv(config, dtype, device, dense, tp)
        elif kind == "gated_deltanet":
            self.linear_attn = GatedDeltaNet(config, dtype, device, dense, tp)
        elif kind == "mamba2":        # Granite 4.0-H
            self.mamba = Mamba2Mixer(config, dtype, device, dense, tp)
        elif kind == "mamba":         # Mamba-1: Mamba, FalconMamba, Jamba, Zamba
            self.mamba = MambaMixer(config, dtype, device, dense, tp)
        elif kind == "zamba_hybrid":  # Zamba2 / Zamba: a shared block (set by CausalLM),
            # then Mamba-2 / Zamba's multi-head Mamba-1; adapters: Zamba2's only
            mixer = MambaMixer if c.zamba_mamba == "mamba" else Mamba2Mixer
            self.mamba = mixer(config, dtype, device, dense, tp)
            self.zamba_adapters = ZambaAdapters(config, dtype, device, tp) \
                if c.zamba_adapter_rank else None
            self.linear = FusedLinear(c.hidden_size, c.hidden_size, dtype=dtype, device=device,
                                      dense=dense)
            self.__dict__["shared_block"] = None
        elif kind == "none":          # Nemotron-H's MLP-only blocks
            pass
        else:
            self.self_attn = Attention(config, layer, rotary, dtype, device, dense, tp)
        if kind == "mamba2_attention":     # Falcon-H1: both, in parallel
            self.mamba = Mamba2Mixer(config, dtype, device, dense, tp)
            self.attn_in, self.attn_out = c.attention_in_multiplier, c.attention_out_multiplier
            self.ssm_out = c.mamba_out_multiplier
        # the layer's recurrent part (None: attention only); its cache entry holds the
        # attention's (k, v) pair, then the recurrent part's state tensors
        self.__dict__["recurrent"] = next((m for m in (self.conv, self.linear_attn,
                                                       self.mamba) if m is not None), None)
        self.zamba = kind == "zamba_hybrid"
        self.__dict__["mixer"] = self._parallel_mix if kind == "mamba2_attention" else \
            next((m for m in (self.self_attn, self.recurrent) if m is not None), None)
        self.post_attention_layernorm = None if (c.parallel_residual and
                                                 not c.parallel_mlp_norm) or \
            not c.has_mlp(layer) or kind == "none" else norm()
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
        if c.sandwich_norm or self.post_norm:
            self.post_feedforward_layernorm = norm()
        nemotron_moe = c.is_moe(layer) and c.moe_router == "group_sigmoid"
        self.mlp = None if not c.has_mlp(layer) else \
            _nemotron_moe(config, dtype, device, dense, tp) if nemotron_moe else \
            SparseMoE(config, dtype, device, dense, tp) if c.is_moe(layer) else \
            MLP(config, dtype, device, dense, tp, c.layer_intermediate_size(layer))
        # Gemma 4 (26B-A4B): experts beside the MLP, each output normed, both summed
        self.moe = self.post_feedforward_layernorm_1 = None
        self.post_feedforward_layernorm_2 = self.pre_feedforward_layernorm_2 = None
        if c.moe_beside_mlp:
            self.moe = SparseMoE(config, dtype, device, dense, tp)
            (self.post_feedforward_layernorm_1, self.post_feedforward_layernorm_2,
             self.pre_feedforward_layernorm_2) = (norm() for _ in range(3))
        # Gemma 4: the per-layer input (PLE) joins the stream after the MLP, and a learned
        # scalar scales the whole stream
        self.per_layer_input_gate = self.per_layer_projection = None
        self.post_per_layer_input_norm = None
        if c.per_layer_input_size:
            self.per_layer_input_gate = FusedLinear(c.hidden_size, c.per_layer_input_size,
                                                    dtype=dtype, device=device, dense=dense)
            self.per_layer_projection = FusedLinear(c.per_layer_input_size, c.hidden_size,
                                                    dtype=dtype, device=device, dense=dense)
            self.post_per_layer_input_norm = norm()
            self.__dict__["ple_act"] = _ACTIVATIONS[c.activation]
        self.layer_scalar = nn.Parameter(torch.ones(1, dtype=dtype, device=device),
                                         requires_grad=False) if c.layer_scalars else None

    def norm_consumers(self) -> list[tuple[RMSNorm, FusedLinear]]:
        """The (RMSNorm, linear) pairs of this layer where that linear is the only reader
        of the norm's output, so the norm may hand it a quantized activation: the
        pre-attention norm and the attention's qkv projection (an attention reading its
        input nowhere else: no Gemma 4 K / V sharing, no LFM3 head gate), the MLP's norm
        and a dense MLP's gate / up projection. Post-norm, parallel and Zamba layers have
        none."""
        if self.zamba or self.post_norm or self.parallel_residual:
            return []
        pairs = []
        attn = self.self_attn
        if attn is not None and self.mixer is attn and attn.kv_source is None and \
                not attn.k_eq_v and attn.g_proj is None:
            pairs.append((self.input_layernorm, attn.qkv_proj))
        mlp_norm = self.input_layernorm if self.mixer is None else \
            self.pre_feedforward_layernorm if self.pre_feedforward_layernorm is not None \
            else self.post_attention_layernorm
        if type(self.mlp) is MLP:
            pairs.append((mlp_norm, self.mlp.gate_up_proj))
        return [(n, lin) for n, lin in pairs if isinstance(n, RMSNorm)]

    def _parallel_mix(self, x: Tensor, meta: AttentionMetadata, cache: tuple | None) -> Tensor:
        """Falcon-H1's token mixer: Mamba-2 and attention on the same normed input, their
        outputs scaled and summed. cache: (k_cache, v_cache, conv_state, ssm_state)."""
        a = self.self_attn(x if self.attn_in == 1.0 else x * self.attn_in, meta,
                           None if cache is None else cache[:2])
        m = self.mamba(x, meta, None if cache is None else cache[2:])
        return m * self.ssm_out + a * self.attn_out

    def _zamba_forward(self, h: Tensor, residual: Tensor | None, meta: AttentionMetadata,
                       cache: tuple | None, embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Zamba2's (Zamba's) hybrid layer: t = linear(shared_block(stream, embeddings));
        the Mamba-2 (Mamba-1) mixer reads norm(stream + t) and its output joins the stream
        (t does not).
        cache: (k_cache, v_cache, conv_state, ssm_state)."""
        s = h if residual is None else h + residual
        t = self.linear(self.shared_block(s, embeds, meta, None if cache is None else
                                          cache[:2], self.zamba_adapters))
        x = self.input_layernorm(s + t)
        return self.mamba(x, meta, None if cache is None else cache[2:]), s

    def _stream_tail(self, s: Tensor, per_layer_input: Tensor | None) -> Tensor:
        """Gemma 4's end of a layer on the stream s: s + norm(proj(act(gate(s)) *
        per_layer_input)), then times the layer's scalar."""
        if self.per_layer_input_gate is not None:
            g = self.ple_act(self.per_layer_input_gate(s)) * per_layer_input
            s = s + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return s if self.layer_scalar is None else s * self.layer_scalar

    def forward(self, h: Tensor, residual: Tensor | None, meta: AttentionMetadata,
                kv_cache: KVCache | None, embeds: Tensor | None = None,
                per_layer_input: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(h, residual) -> the next pair (the residual add left pending; None: h is the
        whole stream). embeds: the token embeddings (Zamba2's hybrid layers read them);
        per_layer_input [T, P]: Gemma 4's per-layer input of this layer."""
        if self.zamba:
            return self._zamba_forward(h, residual, meta, kv_cache, embeds)
        if self.post_norm:
            # OLMo 2: s = stream; s += norm(attn(s)); s += norm(mlp(s)). The last add is
            # left pending, as every layer's (h, residual) output is.
            s = h if residual is None else h + residual
            s = s + self.post_attention_layernorm(self.mixer(s, meta, kv_cache))
            return self.post_feedforward_layernorm(self.mlp(s)), s
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        if self.mixer is None:          # Nemotron-H: an MLP block
            return self.mlp(x), residual
        if self.mlp is None:            # Nemotron-H: a mixer block
            return self.mixer(x, meta, kv_cache), residual
        if self.parallel_residual:
            # Cohere: attention and MLP both read the one norm; GPT-NeoX: the MLP reads
            # its own norm of the same stream. Both outputs join the stream (the add is
            # left pending, as every layer's).
            mlp_in = x if self.post_attention_layernorm is None else \
                self.post_attention_layernorm(residual)
            return self.mixer(x, meta, kv_cache) + self.mlp(mlp_in), residual
        x = self.mixer(x, meta, kv_cache)
        if self.pre_feedforward_layernorm is None:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        # Sandwich: normalize the attention output, add it to the residual stream,
        # normalize again for the MLP, and normalize the MLP's output (each normalized
        # output times the residual multiplier, HyperCLOVA X's; 1 elsewhere).
        m = self.sandwich_multiplier
        a = self.post_attention_layernorm(x)
        x, residual = self.pre_feedforward_layernorm(a if m == 1.0 else a * m, residual)
        y = self.mlp(x)
        if self.moe is not None:     # (Gemma 4: routed on the stream, the pre-MLP residual)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(
                self.moe(self.pre_feedforward_layernorm_2(residual), route_input=residual))
        y = self.post_feedforward_layernorm(y)
        y = y if m == 1.0 else y * m
        if self.per_layer_input_gate is None and self.layer_scalar is None:
            return y, residual
        return self._stream_tail(y + residual, per_layer_input), None


def fuse_w8a8_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Let what computes a W8A8 linear's input quantize it for that linear
    (``FusedLinear.input_quantization``), with the same values as the linear's own
    quantizer: each decoder layer's RMSNorm whose output only that linear reads
    (``DecoderLayer.norm_consumers``: one ``ops.rms_norm_quant`` launch instead of the
    norm and the quantizer) and each gated MLP's activation before a W8A8 down_proj (one
    ``ops.act_and_mul_quant``). ``enabled=False`` undoes it. Returns how many norms and
    activations now quantize. ``load_model`` runs it (int8 and fp8 W8A8 models)."""
    n = 0
    for layer in getattr(model, "layers", ()):
        if not isinstance(layer, DecoderLayer):
            continue
        for norm, linear in layer.norm_consumers():
            quant = linear.input_quantization() if enabled else None
            norm.quantize_for(*((linear, *quant) if quant is not None else (None,)))
            n += quant is not None
    for mlp in model.modules():
        if isinstance(mlp, MLP):
            quant = mlp.down_proj.input_quantization() if enabled and mlp.gated else None
            mlp.__dict__["_quantize_down"] = quant
            n += quant is not None
    return n


class CausalLM(nn.Module):
    """Decoder-only LM on minikernels ops.

    forward(input_ids int64 [T], meta: AttentionMetadata, kv_caches) -> logits fp32 [R, vocab]
    for the rows meta.logits_indices (all T rows when None). kv_caches: one (k, v) cache
    pair per layer from :meth:`allocate_kv_caches`, or None for a cache-less varlen prefill.

    ``dense=False`` builds the decoder's linear layers without dense weights (GPTQ/AWQ
    loading or RTN int4 on load fills them with int4 parts). An untied lm_head is dense
    unless ``dense_lm_head=False`` (a tied one shares the embedding table).

    ``tp``: a :class:`~minikernels.models.parallel.TensorParallel` builds this rank's
    shard (Megatron-style; see :mod:`minikernels.models.parallel`); logits are still the
    full vocab on every rank.
    """

    def __init__(self, config: DecoderConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, dense: bool = True,
                 *, dense_lm_head: bool = True, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        device = torch.device(device) if device is not None else torch.device("cpu")
        c = config
        if tp is not None and tp.size == 1:
            tp = None
        if tp is not None:
            check_config(c, tp)
        self.tp = tp
        self.num_local_kv_heads = attention_shard(c, tp).nkv
        # (Gemma 4: the full layers' own head dim)
        full_dim = next((c.layer_head_dim(i) for i in range(c.num_layers)
                         if not c.is_sliding(i)), c.head_dim)
        self.rotary = RotaryEmbedding(int(full_dim * c.partial_rotary_factor),
                                      c.max_position_embeddings, c.rope_theta,
                                      c.rope_scaling, device=device,
                                      is_neox_style=not c.rope_interleaved,
                                      reverse=c.rope_reversed)
        # Gemma 3's sliding-window layers rotate with their own base (no scaling).
        self.sliding_rotary = self.rotary if c.sliding_rope_theta is None else \
            RotaryEmbedding(c.rotary_dim, c.max_position_embeddings, c.sliding_rope_theta,
                            None, device=device, is_neox_style=not c.rope_interleaved,
                            reverse=c.rope_reversed)
        if tp is None:
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype,
                                             device=device)
        else:
            self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp, dtype,
                                                       device)
        self.embed_tokens.weight.requires_grad_(False)
        # GPT-2 / OPT / GPT-BigCode: learned absolute positions (replicated under TP)
        self.embed_positions = None
        if c.position_embedding == "learned":
            self.embed_positions = nn.Embedding(c.max_position_embeddings + c.position_offset,
                                                c.hidden_size, dtype=dtype, device=device)
            self.embed_positions.weight.requires_grad_(False)
        self.embed_norm = make_norm(c, dtype, device) if c.embed_norm else None   # BLOOM
        if c.altup_num_inputs:      # Gemma 3n: its own layer over AltUp's streams
            from .gemma3n import Gemma3nLayer
            self.layers = nn.ModuleList(
                Gemma3nLayer(c, i, self._layer_rotary(i), dtype, device, dense)
                for i in range(c.num_layers))
        else:
            self.layers = nn.ModuleList(
                DecoderLayer(c, i, self._layer_rotary(i), dtype, device, dense, tp)
                for i in range(c.num_layers))
        self.altup_projections = self.altup_unembed_projections = None
        if c.altup_num_inputs:
            self.altup_projections, self.altup_unembed_projections = (
                nn.ModuleList(FusedLinear(c.hidden_size, c.hidden_size, dtype=dtype,
                                          device=device) for _ in range(c.altup_num_inputs - 1))
                for _ in range(2))
        # Gemma 4: the K / V a source layer leaves for the layers reading it (cache-less
        # forwards; with a cache they read its cache pair)
        self._kv_share: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in self.layers:
            if layer.self_attn is not None:
                layer.self_attn.__dict__["kv_share"] = self._kv_share
                src = c.kv_source(layer.self_attn.layer)
                if src is not None:     # fp8 caches: read with the writer's scales
                    writer = self.layers[src].self_attn.attn
                    layer.self_attn.attn.k_scale = writer.k_scale
                    layer.self_attn.attn.v_scale = writer.v_scale
        # Gemma 4's per-layer inputs (PLE): a table of P dims per layer and token, and a
        # projection of the (scaled) embeddings, normalized per layer
        self.embed_tokens_per_layer = self.per_layer_model_projection = None
        self.per_layer_projection_norm = None
        if c.per_layer_input_size:
            width = c.num_layers * c.per_layer_input_size
            self.embed_tokens_per_layer = nn.Embedding(c.per_layer_vocab_size, width,
                                                       dtype=dtype, device=device)
            self.embed_tokens_per_layer.weight.requires_grad_(False)
            self.per_layer_model_projection = FusedLinear(c.hidden_size, width, dtype=dtype,
                                                          device=device, dense=dense)
            self.per_layer_projection_norm = RMSNorm(c.per_layer_input_size, c.rms_norm_eps,
                                                     dtype=dtype, device=device,
                                                     weight_offset=c.norm_weight_offset)
            self._ple_scale = float(torch.tensor(c.per_layer_input_size ** 0.5, dtype=dtype))
        # Zamba2: the shared transformer blocks, called in turn by the hybrid layers
        self.shared_blocks = None
        if c.zamba_shared_blocks:
            self.shared_blocks = nn.ModuleList(
                ZambaSharedBlock(c, None if c.nope_layers is not None else self.rotary,
                                 dtype, device, dense, tp)
                for _ in range(c.zamba_shared_blocks))
            hybrid = [layer for layer in self.layers if layer.zamba]
            for j, layer in enumerate(hybrid):
                layer.__dict__["shared_block"] = self.shared_blocks[j % c.zamba_shared_blocks]
        self.norm = make_norm(c, dtype, device)
        # lm_head stays dense unless quantized explicitly (lm_head opt-in).
        vocab = c.vocab_size if tp is None else tp.vocab_range(c.vocab_size)[2]
        self.lm_head = FusedLinear(c.hidden_size, vocab, bias=c.lm_head_bias, dtype=dtype,
                                   device=device,
                                   dense=dense_lm_head and not c.tie_word_embeddings)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._dtype = dtype
        self.hidden_capture: HiddenCapture | None = None   # set for an EAGLE draft head
        # Gemma's sqrt(hidden), rounded to the model dtype first, as transformers does.
        self._embed_scale = float(torch.tensor(c.embed_scale, dtype=dtype))

    def _layer_rotary(self, layer: int) -> RotaryEmbedding | None:
        c = self.config
        if c.nope_layers is not None and layer in c.nope_layers:
            return None
        return self.sliding_rotary if c.is_sliding(layer) else self.rotary

    # --------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache] | None = None) -> Tensor:
        return self.compute_logits(self.hidden_states(input_ids, meta, kv_caches))

    def compute_logits(self, h: Tensor) -> Tensor:
        """Final-normed hidden states [R, hidden] -> fp32 logits [R, vocab] (the lm_head,
        then Granite's scaling / Gemma 2's softcap)."""
        if self.tp is not None:   # vocab-parallel lm_head: gather the logits once
            logits = self.tp.all_gather_last(self.lm_head(h))[..., :self.config.vocab_size]
        else:
            logits = self.lm_head(h)
        return finish_logits(logits, self.config)

    def hidden_states(self, input_ids: Tensor, meta: AttentionMetadata,
                      kv_caches: list[KVCache] | None = None) -> Tensor:
        """The final-normed hidden states [R, hidden] (model dtype) of the rows
        ``meta.logits_indices`` (all T when None): what the lm_head reads, and what an
        embedding model pools."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D [T] (flattened tokens), got shape "
                             f"{list(input_ids.shape)}")
        if meta.positions.shape != input_ids.shape:
            raise ValueError(f"meta.positions must have shape {list(input_ids.shape)}, got "
                             f"{list(meta.positions.shape)}")
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches must hold one (k, v) pair per layer "
                             f"({len(self.layers)}), got {len(kv_caches)}")
        h = self.embed_tokens(input_ids)
        if self._embed_scale != 1.0:
            h = h * self._embed_scale
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        if self.embed_positions is not None:
            h = h + self.embed_positions(meta.positions + self.config.position_offset)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        embeds = h if self.shared_blocks is not None else None     # (Zamba2)
        per_layer = self._per_layer_inputs(input_ids, h) \
            if self.embed_tokens_per_layer is not None else None     # (Gemma 3n / 4)
        self._kv_share.clear()
        if self.altup_projections is not None:                      # (Gemma 3n: streams)
            from .gemma3n import streams_in
            h = streams_in(h, self.altup_projections)
        residual: Tensor | None = None
        capture = self.hidden_capture
        aux = capture.layers if capture is not None and capture.layers else ()
        for i, layer in enumerate(self.layers):
            if i in aux:
                stream = h if residual is None else h + residual
                for slot in (j for j, a in enumerate(aux) if a == i):
                    capture.write(slot, stream)
            h, residual = layer(h, residual, meta.for_layer(i),
                                None if kv_caches is None else kv_caches[i], embeds,
                                None if per_layer is None else per_layer[:, i])
        if self.altup_unembed_projections is not None:
            from .gemma3n import streams_out
            h = streams_out(h, self.altup_unembed_projections)
        if capture is not None and not aux:   # final-normed states of every token
            h = self.norm(h) if residual is None else self.norm(h, residual)[0]
            capture.write(0, h)
            return h if meta.logits_indices is None else h.index_select(0, meta.logits_indices)
        if meta.logits_indices is not None:
            h = h.index_select(0, meta.logits_indices)
            residual = residual.index_select(0, meta.logits_indices) \
                if residual is not None else None
        return self.norm(h) if residual is None else self.norm(h, residual)[0]

    def _per_layer_inputs(self, input_ids: Tensor, embeds: Tensor) -> Tensor:
        """Gemma 4's per-layer inputs [T, L, P]: (norm(project(embeds) / sqrt(H)) +
        table(ids) * sqrt(P)) / sqrt(2) (model dtype)."""
        c = self.config
        t, p = input_ids.shape[0], c.per_layer_input_size
        ids = torch.where(input_ids < c.per_layer_vocab_size, input_ids, 0)  # (3n: audio /
        table = self.embed_tokens_per_layer(ids) * self._ple_scale          # image ids)
        proj = self.per_layer_model_projection(embeds) * c.hidden_size ** -0.5
        proj = self.per_layer_projection_norm(proj.reshape(t, c.num_layers, p))
        return (proj + table.reshape(t, c.num_layers, p)) * 2.0 ** -0.5

    # ----------------------------------------------------------------- KV cache
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) cache: [num_blocks, block_size, Hkv, head_dim]."""
        return (int(num_blocks), int(block_size), self.num_local_kv_heads,
                self.config.head_dim)

    def allocate_kv_caches(self, num_blocks: int, block_size: int,
                           dtype: torch.dtype | None = None,
                           layout: KVCacheLayout | None = None,
                           num_state_slots: int = 0) -> list:
        """Zeroed (k_cache, v_cache) per layer on the model's device, in the model's dtype
        or ``dtype`` (torch.float8_e4m3fn / float8_e5m2: an fp8 cache, dequantized with
        each attention layer's k_scale / v_scale). With a hybrid ``layout``
        (models/kv_layout.py) layers of different KV groups share pairs:
        ``layout.num_slots`` pairs in all.

        A recurrent layer (``config.is_recurrent``: LFM2's short conv, Qwen3.5's Gated
        DeltaNet) gets its state tensors instead of a pair (``(conv_state,)``,
        ``(conv_state, recurrent_state)``), each [num_state_slots, ...] (see the mixers'
        ``state_shapes`` and :meth:`state_bytes_per_slot`); ``num_state_slots`` (>= 1 for such a model) is one
        per sequence the engine runs at once (its block-table rows, one spare for
        padding rows)."""
        if not 1 <= block_size <= 256:
            raise ValueError(f"block_size must be in [1, 256], got {block_size}")
        dt = dtype or self.dtype
        if dt != self.dtype and dt not in FP8_KV_DTYPES:
            raise ValueError(f"KV cache dtype must be the model's ({self.dtype}) or "
                             f"float8_e4m3fn / float8_e5m2, got {dt}")
        c = self.config
        if c.is_recurrent and (not isinstance(num_state_slots, int) or num_state_slots < 1):
            raise ValueError(f"num_state_slots must be an int >= 1 for a recurrent model "
                             f"({c.architecture}), got {num_state_slots!r}")
        shape = self.kv_cache_shape(num_blocks, block_size)
        layout = layout or KVCacheLayout.uniform(c.num_layers)
        if len(layout.layer_slot) != c.num_layers:
            raise ValueError(f"layout has {len(layout.layer_slot)} layers, the model "
                             f"{c.num_layers}")
        if c.uniform_attention_shapes:
            used = sorted({s for i, s in enumerate(layout.layer_slot) if c.has_attention(i)})
            pairs = {s: (torch.zeros(shape, dtype=dt, device=self.device),
                         torch.zeros(shape, dtype=dt, device=self.device)) for s in used}
            layer_pair = {i: pairs[layout.layer_slot[i]] for i in range(c.num_layers)
                          if c.has_attention(i)}
        else:
            layer_pair = self._shaped_kv_pairs(num_blocks, block_size, dt, layout)
        caches: list = []
        for i, layer in enumerate(self.layers):
            pair = layer_pair[i] if c.has_attention(i) else ()
            states = () if layer.recurrent is None else tuple(
                torch.zeros((num_state_slots, *shape_i), dtype=dt_i or self.dtype,
                            device=self.device)
                for shape_i, dt_i in layer.recurrent.state_shapes())
            caches.append(pair + states)
        return caches

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None,
                           layout: KVCacheLayout | None = None) -> int:
        """Bytes of K and V cache one token of one block takes over all cache tensors
        (all attention layers, or a hybrid layout's shared pairs)."""
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        c = self.config
        if not c.uniform_attention_shapes:
            layout = layout or KVCacheLayout.uniform(c.num_layers)
            return 2 * elem * sum(self._slot_elems_per_token(layout).values())
        if layout is None:
            slots = sum(c.has_attention(i) for i in range(c.num_layers))
        else:
            slots = len({s for i, s in enumerate(layout.layer_slot) if c.has_attention(i)})
        return 2 * slots * self.num_local_kv_heads * c.head_dim * elem

    def _slot_elems_per_token(self, layout: KVCacheLayout) -> dict[int, int]:
        """Per cache slot, the elements one token takes in K (or V): the largest of the
        layers writing that slot (Gemma 4's layers differ in kv heads / head dim; the
        layers reading another's K / V write none)."""
        c = self.config
        out: dict[int, int] = {}
        for i in range(c.num_layers):
            if c.has_attention(i) and c.kv_source(i) is None:
                s = layout.layer_slot[i]
                out[s] = max(out.get(s, 0), self._local_kv_heads(i) * c.layer_head_dim(i))
        return out

    def _local_kv_heads(self, layer: int) -> int:
        """``layer``'s kv heads on this rank (all of them without tensor parallel)."""
        return attention_shard(self.config, self.tp, layer).nkv

    def _shaped_kv_pairs(self, num_blocks: int, block_size: int, dt: torch.dtype,
                         layout: KVCacheLayout) -> dict[int, tuple[Tensor, Tensor]]:
        """Each attention layer's (k_cache, v_cache) when layers differ in shape: one
        buffer pair per slot, [num_blocks, block_size * the slot's widest per-token
        elements], and each layer's [num_blocks, block_size, its kv heads, its head dim]
        view of the start of every block's row (block b serves whichever layer holds it);
        a layer reading another layer's K / V gets that layer's views."""
        c = self.config
        widest = self._slot_elems_per_token(layout)
        buffers = {s: tuple(torch.zeros(num_blocks, block_size * e, dtype=dt,
                                         device=self.device) for _ in range(2))
                   for s, e in widest.items()}
        pairs: dict[int, tuple[Tensor, Tensor]] = {}
        for i in range(c.num_layers):
            if not c.has_attention(i) or c.kv_source(i) is not None:
                continue
            kv, d = self._local_kv_heads(i), c.layer_head_dim(i)
            pairs[i] = tuple(b[:, :block_size * kv * d].view(num_blocks, block_size, kv, d)
                             for b in buffers[layout.layer_slot[i]])    # type: ignore[misc]
        for i in range(c.num_layers):
            src = c.kv_source(i)
            if src is not None and c.has_attention(i):
                pairs[i] = pairs[src]
        return pairs

    def state_tensors(self, kv_caches: list) -> list[Tensor]:
        """The recurrent state tensors of ``kv_caches`` (from :meth:`allocate_kv_caches`),
        each [num_state_slots, ...]: what a state slot is made of."""
        out: list[Tensor] = []
        for i, (layer, entry) in enumerate(zip(self.layers, kv_caches)):
            if layer.recurrent is not None:
                out.extend(entry[2 if self.config.has_attention(i) else 0:])
        return out

    def copy_state_slots(self, kv_caches: list, src: list[int], dst: list[int]) -> None:
        """Copy each recurrent state slot ``src[i]`` to ``dst[i]`` in every state tensor
        (state checkpoints for prefix caching, speculative rows' snapshots / restores)."""
        if not src:
            return
        si = torch.tensor(src, dtype=torch.int64, device=self.device)
        di = torch.tensor(dst, dtype=torch.int64, device=self.device)
        for t in self.state_tensors(kv_caches):
            t.index_copy_(0, di, t.index_select(0, si))

    def state_bytes_per_slot(self) -> int:
        """Bytes of recurrent state one sequence holds over all recurrent layers (0 for a
        pure attention model)."""
        total = 0
        for layer in self.layers:
            if layer.recurrent is None:
                continue
            for shape, dt in layer.recurrent.state_shapes():
                n = 1
                for d in shape:
                    n *= d
                total += n * torch.empty((), dtype=dt or self.dtype).element_size()
        return total

    def weight_bytes(self) -> int:
        """Bytes of all weights (tied embeddings counted once; the rope cache and the fp8
        KV-cache scales excluded)."""
        seen: set[int] = set()
        total = 0
        for t in list(self.parameters()) + [b for n, b in self.named_buffers()
                                            if not n.endswith(("cos_sin_cache", "k_scale",
                                                               "v_scale"))]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    def linear_layers(self) -> list[tuple[str, FusedLinear]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, FusedLinear)]
