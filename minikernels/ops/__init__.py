"""minikernels ops: the public op contract (one module per op family).

Each op is a torch.library custom op in namespace ``minikernels`` with a fake
implementation (torch.compile, CUDA graphs and opcheck work). The plain-PyTorch spec of
every op lives in :mod:`minikernels.ops.reference`.
"""
from . import reference
from .act_quant import act_and_mul_quant
from .activation import (
    fatrelu_and_mul,
    gelu_and_mul,
    gelu_fast,
    gelu_new,
    gelu_quick,
    gelu_tanh_and_mul,
    gelu_variant,
    silu_and_mul,
    swigluoai_and_mul,
)
from .bitmask import apply_token_bitmask
from .fsm import fsm_advance, fsm_mask_logits
from .conv import causal_conv1d
from .fp8 import fp8_matmul
from .gated_delta import gated_delta_rule
from .attention import flash_attention, flash_attention_bshd
from .fp8_w8a8 import per_token_group_quant_fp8, w8a8_block_fp8_matmul
from .int4 import int4_matmul
from .int8 import int8_matmul
from .int8_w8a8 import scaled_int8_quant, scaled_mm
from .kv_cache import merge_attn_states, paged_decode_attention, write_kv_cache
from .lora import lora_delta
from .mamba import mamba2_scan
from .moe import (
    MoELoRA,
    fused_moe,
    fused_moe_fp8,
    fused_moe_fp8_w8a8,
    fused_moe_int4,
    fused_moe_int8,
    fused_moe_int8_w8a8,
    fused_moe_mxfp4,
    moe_align_block_size,
)
from .norm import gemma_rms_norm, layer_norm, rms_norm
from .norm_quant import rms_norm_quant
from .qk_norm_rope import qk_norm_rope
from .rejection_sampler import rejection_sample
from .rotary import build_rope_cache, rotary_embedding
from .router import fused_topk, topk_sigmoid, topk_softmax
from .sampling import top_k_top_p_mask_logits
from .selective_scan import selective_scan

__all__ = [
    "MoELoRA",
    "act_and_mul_quant",
    "apply_token_bitmask",
    "build_rope_cache",
    "causal_conv1d",
    "fatrelu_and_mul",
    "flash_attention",
    "fp8_matmul",
    "fsm_advance",
    "fsm_mask_logits",
    "fused_moe",
    "fused_moe_fp8",
    "fused_moe_fp8_w8a8",
    "fused_moe_int4",
    "fused_moe_int8",
    "fused_moe_int8_w8a8",
    "fused_moe_mxfp4",
    "fused_topk",
    "gated_delta_rule",
    "gelu_and_mul",
    "gelu_fast",
    "gelu_new",
    "gelu_quick",
    "gelu_tanh_and_mul",
    "gelu_variant",
    "gemma_rms_norm",
    "int4_matmul",
    "int8_matmul",
    "layer_norm",
    "lora_delta",
    "mamba2_scan",
    "merge_attn_states",
    "moe_align_block_size",
    "paged_decode_attention",
    "qk_norm_rope",
    "per_token_group_quant_fp8",
    "reference",
    "rejection_sample",
    "rms_norm",
    "rms_norm_quant",
    "rotary_embedding",
    "scaled_int8_quant",
    "scaled_mm",
    "selective_scan",
    "silu_and_mul",
    "swigluoai_and_mul",
    "top_k_top_p_mask_logits",
    "topk_sigmoid",
    "topk_softmax",
    "w8a8_block_fp8_matmul",
    "write_kv_cache",
]
