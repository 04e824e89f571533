"""NVIDIA Nemotron 3's mixture-of-experts block (transformers' ``NemotronHMoE``), a
Nemotron-H block of its own (layer_mixers "none", its MLP this module):

    w, ids = route(x)                                 # fp32, DeepSeek-V3's grouped sigmoid
    y = fc2(experts(fc1(x), w, ids)) + shared(x)      # fc1 / fc2: the latent projections

Routing (``group_sigmoid``): s = sigmoid(x @ router^T) in fp32; the choice adds a learned
per-expert bias (``e_score_correction_bias``); the experts are split into
``moe_num_groups`` groups, each scored by the sum of its top two choices; only the best
``moe_topk_groups`` groups stay; the top-k experts among them are chosen and weighted by
their s (renormalized, + 1e-20, with ``norm_topk_prob``) times ``moe_routed_scaling``.
The experts and the shared expert are non-gated: down(act(up(x))) with the model's
activation (squared ReLU).

Tensor parallel (``tp``): each rank holds every expert's intermediate slice I/P (as
models/parallel.py cuts experts) and the shared expert's; the router and the latent
projections are replicated. fc2_latent_proj maps each rank's partial latent sum (its bias
on rank 0 only), so the experts' and the shared expert's partials meet in one all-reduce.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .config import DecoderConfig
from .linear import FusedLinear
from .moe import FusedExperts
from .parallel import TensorParallel


class GroupSigmoidRouter(nn.Module):
    """The router: ``weight`` fp32 [E, H] and ``e_score_correction_bias`` fp32 [E]
    (checkpoint names ``gate.weight`` / ``gate.e_score_correction_bias``)."""

    def __init__(self, config: DecoderConfig, device: torch.device | str | None) -> None:
        super().__init__()
        c = config
        self.top_k, self.groups, self.topk_groups = (c.num_experts_per_tok, c.moe_num_groups,
                                                     c.moe_topk_groups)
        self.norm_topk_prob, self.scaling = c.norm_topk_prob, float(c.moe_routed_scaling)
        self.weight = nn.Parameter(torch.zeros(c.num_experts, c.hidden_size,
                                               dtype=torch.float32, device=device),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(c.num_experts, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (weights fp32 [T, k], expert ids int32 [T, k]): ``ops.topk_sigmoid``
        (one kernel): sigmoid scores chosen with the correction bias within the best
        ``topk_groups`` of ``groups`` groups (a group's score: its two best biased scores),
        renormalized (+ 1e-20) when norm_topk_prob, times the routed scaling."""
        weights, ids = ops.topk_sigmoid(x.float() @ self.weight.t(), self.top_k,
                                        self.norm_topk_prob, self.e_score_correction_bias,
                                        renorm_eps=1e-20, num_groups=self.groups,
                                        topk_groups=self.topk_groups)
        return weights * self.scaling, ids


class NemotronMoE(nn.Module):
    """Router, non-gated experts (in a latent space of ``moe_latent_size`` when set) and
    the non-gated shared expert of one Nemotron 3 block (module docstring)."""

    def __init__(self, config: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str | None, dense: bool,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        from .decoder import MLP

        c = config
        p = tp.size if tp is not None else 1
        self.__dict__["tp"] = tp
        width = c.moe_latent_size or c.hidden_size
        self.gate = GroupSigmoidRouter(c, device)
        self.experts = FusedExperts(c.num_experts, width, c.moe_intermediate_size // p, dtype,
                                    device, dense, gated=False, activation=c.activation)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if c.moe_latent_size:
            self.fc1_latent_proj = FusedLinear(c.hidden_size, width, bias=c.mlp_bias,
                                               dtype=dtype, device=device, dense=dense)
            self.fc2_latent_proj = FusedLinear(width, c.hidden_size, bias=c.mlp_bias,
                                               dtype=dtype, device=device, dense=dense)
        # (its local slice, no all-reduce of its own: the block's one sums it)
        self.shared_expert = MLP(c, dtype, device, dense,
                                 intermediate_size=c.shared_expert_intermediate_size // p) \
            if c.shared_expert_intermediate_size else None

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.gate(x)
        h = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)
        y = self.experts(h, weights, ids)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y if self.tp is None else self.tp.all_reduce(y)
