"""Gemma 3n's decoder layer (the text decoder of E2B / E4B): AltUp, LAuReL and the
MLP's Gaussian top-k sparsity, around the decoder's own attention (per-head q / k / v
norms, K / V sharing) and per-layer inputs.

The residual stream is ``altup_num_inputs`` parallel streams, [n, T, H] (model dtype).
Each layer:

    pred = altup.predict(streams)               # each stream a mix of all, + itself
    x = input_layernorm(pred[a])                # a = altup_active_idx
    h = pred[a] + post_attention_layernorm(attn(x))
    h = (h + laurel(x)) / sqrt(2)               # laurel(x) = x + norm(right(left(x)))
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    streams = altup.correct(pred, h)            # every stream moves by its coef x (h - pred[a])
    p = post_per_layer_input_norm(proj(gelu(gate(scale(streams[a]))) * per_layer_input))
    streams[1:] += p

The model builds the streams from the embeddings (stream 0 the embeddings, the others
their projections rescaled to the embeddings' RMS) and folds them back at the end
(projections back, rescaled to stream 0's RMS, averaged): :func:`streams_in`,
:func:`streams_out`. Matches transformers' ``Gemma3nTextDecoderLayer`` /
``Gemma3nTextModel`` (tests/test_model_hf.py, cases "gemma3n*").
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn.layers import RMSNorm
from .config import DecoderConfig
from .linear import FusedLinear


def _norm(c: DecoderConfig, size: int, dtype: torch.dtype,
          device: torch.device | str | None) -> RMSNorm:
    return RMSNorm(size, c.rms_norm_eps, dtype=dtype, device=device,
                   weight_offset=c.norm_weight_offset)


class AltUp(nn.Module):
    """Alternating updates over n streams [n, T, H]: ``predict`` mixes the streams with
    coefficients routed from the active stream; ``correct`` moves every prediction by its
    own coefficient times the active stream's innovation (the layer's output minus its
    prediction). Coefficients come from tanh(router(norm(x) / H)) [T, n]."""

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        c, n = config, config.altup_num_inputs
        self.n, self.active, self.hidden = n, c.altup_active_idx, c.hidden_size
        self.correct_output_scale = nn.Parameter(torch.zeros(c.hidden_size, dtype=dtype,
                                                             device=device),
                                                 requires_grad=False)
        self.correction_coefs = FusedLinear(n, n, dtype=dtype, device=device)
        self.prediction_coefs = FusedLinear(n, n * n, dtype=dtype, device=device)
        self.modality_router = FusedLinear(c.hidden_size, n, dtype=dtype, device=device)
        self.router_norm = _norm(c, c.hidden_size, dtype, device)

    def _modalities(self, x: Tensor) -> Tensor:
        routed = self.modality_router(self.router_norm(x) * (1.0 / self.hidden))
        return torch.tanh(routed.float()).to(x.dtype)                        # [T, n]

    def predict(self, streams: Tensor) -> Tensor:
        """[n, T, H] -> predictions [n, T, H]: pred[j] = streams[j] + sum_i c[t, j, i] *
        streams[i] (c from the active stream, [T, n, n])."""
        n, t = self.n, streams.shape[1]
        coefs = self.prediction_coefs(self._modalities(streams[self.active]))
        coefs = coefs.reshape(t, n, n)                                     # [T, j, i]
        mixed = torch.einsum("tji,ith->jth", coefs, streams)
        return (mixed + streams).to(streams.dtype)

    def correct(self, predictions: Tensor, activated: Tensor) -> Tensor:
        """predictions [n, T, H], the layer's output for the active stream [T, H] -> the
        corrected streams: pred[j] + (correction(c) + 1)[t, j] * (out - pred[active])."""
        coefs = self.correction_coefs(self._modalities(activated)) + 1.0      # [T, n]
        innovation = activated - predictions[self.active]
        return (coefs.t()[:, :, None] * innovation[None] + predictions).to(activated.dtype)


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), rank ``laurel_rank``."""

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool) -> None:
        super().__init__()
        c = config
        self.linear_left = FusedLinear(c.hidden_size, c.laurel_rank, dtype=dtype,
                                       device=device, dense=dense)
        self.linear_right = FusedLinear(c.laurel_rank, c.hidden_size, dtype=dtype,
                                        device=device, dense=dense)
        self.post_laurel_norm = _norm(c, c.hidden_size, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


@functools.lru_cache(maxsize=None)
def _normal_quantile(sparsity: float, dtype: torch.dtype) -> float:
    """Phi^-1(sparsity) computed in fp32 and rounded to ``dtype``, as transformers does,
    as a Python float (exact in fp64): host math, done once per (sparsity, dtype)."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity, dtype=torch.float32))
    return float(q.to(dtype))


def gaussian_topk(gate: Tensor, sparsity: float) -> Tensor:
    """Gemma 3n's activation sparsity: relu(gate - (mean + std * Phi^-1(sparsity))) per
    row (population std; the quantile rounded to gate's dtype, as transformers does).
    The quantile is a Python scalar: no host tensor is copied to the device, so the
    forward can be captured in a CUDA graph."""
    cut = _normal_quantile(float(sparsity), gate.dtype)
    mean = gate.mean(-1, keepdim=True)
    std = gate.std(-1, keepdim=True, unbiased=False)
    return F.relu(gate - (mean + std * cut))


class SparseGateMLP(nn.Module):
    """Gemma 3n's gated MLP: down(act(topk?(gate(x))) * up(x)); the Gaussian top-k on the
    gate where the layer's sparsity is > 0. gate_up_proj holds [gate; up] rows."""

    def __init__(self, config: DecoderConfig, layer: int, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool) -> None:
        super().__init__()
        c = config
        inter = c.layer_intermediate_size(layer)
        self.inter = inter
        self.gate_up_proj = FusedLinear(c.hidden_size, [inter, inter], dtype=dtype,
                                        device=device, dense=dense)
        self.down_proj = FusedLinear(inter, c.hidden_size, dtype=dtype, device=device,
                                     dense=dense)
        self.sparsity = 0.0 if c.activation_sparsity is None else c.activation_sparsity[layer]
        if self.sparsity > 0.0:     # the quantile for the weights' dtype, before any capture
            _normal_quantile(float(self.sparsity), dtype)
        self.approximate = "tanh" if c.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if self.sparsity > 0.0:
            gate = gaussian_topk(gate_up[:, :self.inter], self.sparsity)
            gate_up = torch.cat([gate, gate_up[:, self.inter:]], dim=-1)
        return self.down_proj(ops.gelu_and_mul(gate_up, self.approximate))


class Gemma3nLayer(nn.Module):
    """One Gemma 3n decoder layer over the streams (module docstring). ``forward(streams,
    None, meta, kv_cache, embeds, per_layer_input)`` -> (streams, None): the layer
    protocol of :class:`minikernels.models.decoder.DecoderLayer` with the stream tensor
    [n, T, H] in place of the hidden states."""

    recurrent = None       # (no recurrent state; the KV-cache allocation reads this)

    def __init__(self, config: DecoderConfig, layer: int, rotary, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool) -> None:
        super().__init__()
        from .decoder import Attention

        c = config
        self.active = c.altup_active_idx
        self.correct_scale = c.altup_correct_scale
        self.self_attn = Attention(c, layer, rotary, dtype, device, dense)
        self.mlp = SparseGateMLP(c, layer, dtype, device, dense)
        (self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
         self.post_feedforward_layernorm, self.post_per_layer_input_norm) = (
            _norm(c, c.hidden_size, dtype, device) for _ in range(5))
        self.altup = AltUp(c, dtype, device)
        self.laurel = Laurel(c, dtype, device, dense)
        self.per_layer_input_gate = FusedLinear(c.hidden_size, c.per_layer_input_size,
                                                dtype=dtype, device=device, dense=dense)
        self.per_layer_projection = FusedLinear(c.per_layer_input_size, c.hidden_size,
                                                dtype=dtype, device=device, dense=dense)
        self.approximate = "tanh" if c.activation == "gelu_tanh" else "none"

    def forward(self, streams: Tensor, residual: None, meta, kv_cache,
                embeds: Tensor | None = None, per_layer_input: Tensor | None = None
                ) -> tuple[Tensor, None]:
        pred = self.altup.predict(streams)
        active = pred[self.active]
        x = self.input_layernorm(active)
        h = active + self.post_attention_layernorm(self.self_attn(x, meta, kv_cache))
        h = (h + self.laurel(x)) * (1.0 / math.sqrt(2.0))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(pred, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        g = F.gelu(self.per_layer_input_gate(first), approximate=self.approximate)
        p = self.post_per_layer_input_norm(self.per_layer_projection(g * per_layer_input))
        out = corrected.clone()
        out[1:] += p
        return out, None


def _rms(x: Tensor) -> Tensor:
    return torch.mean(x * x, dim=-1, keepdim=True)


def streams_in(embeds: Tensor, projections: nn.ModuleList) -> Tensor:
    """[T, H] embeddings -> [n, T, H] streams: the embeddings, then each projection of
    them rescaled to the embeddings' RMS."""
    target = _rms(embeds) ** 0.5
    out = [embeds]
    for proj in projections:
        s = proj(embeds)
        out.append(s * target / torch.sqrt(_rms(s).clamp(min=1e-5)))
    return torch.stack(out)


def streams_out(streams: Tensor, projections: nn.ModuleList) -> Tensor:
    """[n, T, H] -> [T, H]: stream 0 and each other stream projected back and rescaled
    to stream 0's RMS, averaged."""
    target = _rms(streams[0]) ** 0.5
    out = [streams[0]]
    for j, proj in enumerate(projections, start=1):
        s = proj(streams[j])
        out.append(s * target / torch.sqrt(_rms(s).clamp(min=1e-5)))
    return torch.stack(out).mean(dim=0)
