"""Peers' Python APIs over minikernels' ops, so existing code swaps its import and keeps
its calls.

    from minikernels.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache
    from minikernels.compat import flashinfer          # BatchDecodeWithPagedKVCacheWrapper, ...
    from minikernels.compat import vllm_ops as ops     # vLLM's _custom_ops (out= / in place)
    from minikernels.compat import vllm_marlin         # vLLM's Marlin GEMM, repacks, utils
    from minikernels.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from minikernels.compat.fla import chunk_gated_delta_rule       # flash-linear-attention
    from minikernels.compat.mamba_ssm import mamba_chunk_scan_combined, selective_state_update
    from minikernels.compat.auto_gptq import QuantLinear            # AutoGPTQ's GPTQ layer
    from minikernels.compat.awq import WQLinear_GEMM                # AutoAWQ's GEMM layer

Each module keeps its peer's argument names, defaults, layouts and return shapes, and
states where it differs (forward only: no dropout, no backward). docs/compat.md has the
covered names and the differences. Errors name the
argument, as every minikernels op does. The math is minikernels' ops (reference on the
CPU, Triton / CUDA on the GPU).
"""
