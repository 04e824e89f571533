"""`minikernels bench ops`: time every op on each backend of the present device.

On a GPU: backends triton and cuda (where an op has a CUDA kernel) beside a plain-PyTorch
peer, each as a fraction of the run's measured copy bandwidth (memory-bound ops) or bf16
matmul ceiling (attention prefill, int4 GEMM). On the CPU: the reference backend on
downsized shapes (a smoke run; CPU timings say nothing about GPU speed). Each row has the
spread of its repeated runs ((p90 - p10) / median). Prints a table and writes
ops.{json,md,png} (see --result-dir). The same cases run under pytest-benchmark:
``pytest bench/ --benchmark-only``.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

from . import plumbing as B

if TYPE_CHECKING:  # torch and the ops load when the benchmark runs, not for --help
    import torch


@dataclass
class Case:
    op: str
    shape: str
    run: Callable[[], object]
    nbytes: float
    flops: float
    backends: tuple[str, ...]
    peer: Callable[[], object] | None = None
    extra_peers: tuple[tuple[str, Callable[[], object]], ...] = ()   # (name, fn), GPU only


def op_cases(device: str, dtype: torch.dtype, small: bool) -> list[Case]:
    """Every op's benchmark case on ``device`` (``small``: shapes / 16, for the CPU)."""
    import torch

    from .. import ops
    s = 16 if small else 1
    t, h, inter = 4096 // s, 4096 // s, 14336 // s
    es = torch.finfo(dtype).bits // 8
    x = torch.randn(t, h, device=device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.rand(h, device=device, dtype=dtype) + 0.5
    gu = torch.randn(t, 2 * inter, device=device, dtype=dtype)
    hq, hkv, d = 32 // (2 if small else 1), 8 // (2 if small else 1), 128
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, device=device, dtype=dtype)
    pos = torch.arange(t, device=device)
    cache = ops.build_rope_cache(d, t).to(device)
    cases = [
        Case("rms_norm+residual", f"{t}x{h}", lambda: ops.rms_norm(x, w, residual=res),
             4 * t * h * es, 0, ("triton", "cuda"),
             lambda: torch.nn.functional.rms_norm(x + res, (h,), w, 1e-6)),
        Case("layer_norm+residual", f"{t}x{h}",
             lambda: ops.layer_norm(x, w, w, residual=res), 4 * t * h * es, 0, ("triton",),
             lambda: torch.nn.functional.layer_norm(x + res, (h,), w, w, 1e-5)),
        Case("silu_and_mul", f"{t}x{2 * inter}", lambda: ops.silu_and_mul(gu),
             3 * t * inter * es, 0, ("triton",),
             lambda: torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]),
        Case("gelu_tanh_and_mul", f"{t}x{2 * inter}", lambda: ops.gelu_tanh_and_mul(gu),
             3 * t * inter * es, 0, ("triton",),
             lambda: torch.nn.functional.gelu(gu[:, :inter], approximate="tanh")
             * gu[:, inter:]),
        Case("rotary_embedding", f"{t}tok {hq}/{hkv}h d{d}",
             lambda: ops.rotary_embedding(q, k, pos, cache), 2 * t * (hq + hkv) * d * es, 0,
             ("triton",)),
    ]
    n = k_dim = 4096 // s
    from ..ops.reference import dequantize_int4  # noqa: F401  (layout documented there)
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k_dim // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(n, k_dim // 128, device=device) / 50).to(dtype)
    zeros = torch.full((n, k_dim // 128), 8.0, device=device, dtype=dtype)
    wdense = torch.randn(n, k_dim, device=device, dtype=dtype)
    for m in (1, 256 // s):
        xm = torch.randn(m, k_dim, device=device, dtype=dtype)
        cases.append(Case("int4_matmul g128", f"M={m} {n}x{k_dim}",
                          lambda xm=xm: ops.int4_matmul(xm, qweight, scales, zeros, 128),
                          n * k_dim / 2 + n * k_dim / 128 * 4 + m * (n + k_dim) * es,
                          2 * m * n * k_dim, ("triton", "cuda"), lambda xm=xm: xm @ wdense.t()))
    cases += int8_matmul_cases(device, dtype, s)
    cases += fp8_matmul_cases(device, dtype, s)
    seq = 2048 // s
    qa = torch.randn(seq, hq, d, device=device, dtype=dtype)
    ka = torch.randn(seq, hkv, d, device=device, dtype=dtype)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=device)
    cases.append(Case("flash_attention causal", f"1x{seq} {hq}/{hkv}h d{d}",
                      lambda: ops.flash_attention(qa, ka, ka, cu, cu, seq, seq),
                      3 * seq * (hq + 2 * hkv) * d * es, 2 * seq * seq * hq * d, ("triton",)))
    bsz, ctx, bs = 64 // s, 2048 // s, 16
    nblk = bsz * ctx // bs
    kc = torch.randn(nblk, bs, hkv, d, device=device, dtype=dtype)
    bt = torch.randperm(nblk, device=device).to(torch.int32).view(bsz, ctx // bs)
    sl = torch.full((bsz,), ctx, dtype=torch.int32, device=device)
    qd = torch.randn(bsz, hq, d, device=device, dtype=dtype)
    cases.append(Case("paged_decode_attention", f"{bsz}x{ctx} {hq}/{hkv}h d{d}",
                      lambda: ops.paged_decode_attention(qd, kc, kc, bt, sl),
                      2 * bsz * ctx * hkv * d * es, 4 * bsz * ctx * hq * d, ("triton", "cuda")))
    rows, vocab = 256 // s, 151936 // s              # a batch of Qwen2.5-vocab logits
    logits = torch.randn(rows, vocab, device=device) * 3
    k_rows = torch.full((rows,), 50, dtype=torch.int32, device=device)
    p_rows = torch.full((rows,), 0.9, device=device)
    for label, kk, pp in (("top_k_top_p_mask_logits k50 p0.9", k_rows, p_rows),
                          ("top_k_top_p_mask_logits p0.9", None, p_rows)):
        cases.append(Case(label, f"{rows}x{vocab} fp32",
                          lambda kk=kk, pp=pp: ops.top_k_top_p_mask_logits(logits, kk, pp),
                          2 * rows * vocab * 4, 0, ("triton",),
                          lambda kk=kk, pp=pp: sort_top_k_top_p(logits, kk, pp)))
    # LoRA over 4 adapters of rank 16 on a 4096 -> 4096 projection: a decode batch (one
    # token per sequence, slots mixed) and a prefill batch (4 prompts of 512 tokens, one
    # adapter each: segments). bytes: each used adapter once + x and y (the floor; BGMV
    # reads a token's adapter per token, the grouped path per tile).
    kl, nl, rank, nslots = 4096 // s, 4096 // s, 16, 4
    la = torch.randn(nslots, rank, kl, device=device, dtype=dtype) / kl ** 0.5
    lb = torch.randn(nslots, nl, rank, device=device, dtype=dtype) / rank ** 0.5
    lscale = torch.full((nslots,), 2.0, device=device)
    for label, nt, make_slots in (
            ("lora_delta r16 4 adapters", 256 // s,
             lambda n: torch.randint(-1, nslots, (n,), device=device, dtype=torch.int32)),
            ("lora_delta prefill r16 4 adapters", 2048 // s,
             lambda n: torch.arange(n, device=device, dtype=torch.int32) * nslots // n)):
        xl = torch.randn(nt, kl, device=device, dtype=dtype)
        tslots = make_slots(nt)
        peer = gather_lora if nt <= 256 // s else per_adapter_lora
        cases.append(Case(label, f"{nt}tok {kl}->{nl}",
                          lambda xl=xl, tslots=tslots: ops.lora_delta(xl, la, lb, tslots,
                                                                      lscale),
                          (min(nslots, nt) * rank * (kl + nl) + nt * (kl + nl)) * es,
                          4 * nt * rank * (kl + nl), ("triton",),
                          lambda xl=xl, tslots=tslots, peer=peer: peer(xl, la, lb, tslots,
                                                                       lscale)))
    # MoE router: softmax top-8 of 128 experts (Qwen3-MoE) over a prefill chunk's router
    # logits, renormalized; bytes: the logits + fp32 weights and int32 ids
    nr, nre, rk = 4096 // s, 128, 8
    router_logits = torch.randn(nr, nre, device=device, dtype=dtype)
    cases.append(Case("topk_softmax top8 renorm", f"{nr}tok E{nre} k{rk}",
                      lambda: ops.topk_softmax(router_logits, rk, True),
                      nr * nre * es + nr * rk * 8, 0, ("triton",),
                      lambda: softmax_topk(router_logits, rk)))
    # MoE alignment: a decode batch's and a prefill chunk's top-8 of 128 experts sorted
    # into 16-row tiles, beside the ~12 torch ops that did it before (no host sync either);
    # bytes: the ids in + sorted ids and tile experts out
    for label, na in (("moe_align_block_size decode", 256 // s),
                      ("moe_align_block_size prefill", 4096 // s)):
        aids = torch.randint(0, 128, (na, 8), device=device, dtype=torch.int32)
        cases.append(Case(label, f"{na}tok E128 k8 bs16",
                          lambda aids=aids: ops.moe_align_block_size(aids, 16, 128),
                          na * 8 * 4 * 2 + 128 * 15 * 4, 0, ("triton",),
                          lambda aids=aids: torch_moe_align(aids, 16, 128)))
    # MoE: a decode batch through 64 SiLU-gated experts, top-8 (OLMoE / Qwen3-MoE sized
    # experts); bytes: every routed expert's w13 and w2 once + x and out.
    nm, ne, topk = 256 // s, 64 // (4 if small else 1), 8
    hm, im = 1024 // s, 768 // s
    xm = torch.randn(nm, hm, device=device, dtype=dtype)
    w13 = torch.randn(ne, 2 * im, hm, device=device, dtype=dtype) / hm ** 0.5
    w2 = torch.randn(ne, hm, im, device=device, dtype=dtype) / im ** 0.5
    mids = torch.rand(nm, ne, device=device).topk(topk, dim=1).indices.to(torch.int32)
    mw = torch.softmax(torch.randn(nm, topk, device=device), dim=1)
    routed = int(torch.unique(mids).numel())
    cases.append(Case("fused_moe top8", f"{nm}tok {hm}x{im} E{ne} k{topk}",
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids),
                      routed * 3 * hm * im * es + 2 * nm * hm * es,
                      6 * nm * topk * hm * im, ("triton",),
                      lambda: loop_moe(xm, w13, w2, mw, mids)))
    # the same MoE with LoRA on the experts (4 adapters of rank 16, every token on one of
    # them), beside the plain fused_moe: the adapters' cost; bytes: the base case's + the
    # routed experts' adapter weights of every slot
    ns, rl = 4, 16
    mlora = ops.MoELoRA(
        torch.randn(ns, ne, 2 * rl, hm, device=device, dtype=dtype) / hm ** 0.5,
        torch.randn(ns, ne, 2 * im, 2 * rl, device=device, dtype=dtype) / rl,
        torch.randn(ns, ne, rl, im, device=device, dtype=dtype) / im ** 0.5,
        torch.randn(ns, ne, hm, rl, device=device, dtype=dtype) / rl,
        torch.arange(nm, device=device, dtype=torch.int32) % ns,
        torch.full((ns,), 2.0, device=device))
    cases.append(Case("fused_moe top8 + expert LoRA r16",
                      f"{nm}tok {hm}x{im} E{ne} k{topk} S{ns}",
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids, lora=mlora),
                      routed * 3 * hm * im * es + 2 * nm * hm * es
                      + ns * routed * rl * (3 * hm + 5 * im) * es,
                      6 * nm * topk * hm * im + 4 * nm * topk * rl * (3 * hm + 5 * im),
                      ("triton",), lambda: ops.fused_moe(xm, w13, w2, mw, mids)))
    # the same MoE with int4 experts (W4A16, g128; g16 on the CPU's downsized shapes), the
    # peer: fused_moe on dense experts; bytes: routed experts' nibbles + fp16/bf16 scales
    # and zeros + x and out
    gm = 128 if hm % 128 == 0 and im % 128 == 0 else 16

    def int4_experts(n_rows: int, k_cols: int) -> tuple[torch.Tensor, ...]:
        qw = torch.randint(-2**31, 2**31 - 1, (ne, n_rows, k_cols // 8), dtype=torch.int32,
                           device=device)
        sc = (torch.rand(ne, n_rows, k_cols // gm, device=device) / (4 * k_cols ** 0.5)
              ).to(dtype)
        return qw, sc, torch.full_like(sc, 8.0)

    q13, q2 = int4_experts(2 * im, hm), int4_experts(hm, im)
    cases.append(Case("fused_moe_int4 top8 g128", f"{nm}tok {hm}x{im} E{ne} k{topk} g{gm}",
                      lambda: ops.fused_moe_int4(xm, *q13, *q2, mw, mids, gm),
                      routed * 3 * hm * im * (0.5 + 2 * es / gm) + 2 * nm * hm * es,
                      6 * nm * topk * hm * im, ("triton",),
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids)))
    # the same MoE with fp8 experts (W8A16, 128 x 128 block scales: DeepSeek-V3 /
    # Qwen3-FP8), the same peer; bytes: routed experts' fp8 bytes + fp32 block scales + x
    # and out
    f13 = ((torch.randn(ne, 2 * im, hm, device=device) * 64).to(torch.float8_e4m3fn),
           torch.rand(ne, -(-2 * im // 128), -(-hm // 128), device=device) / (64 * hm ** 0.5))
    f2 = ((torch.randn(ne, hm, im, device=device) * 64).to(torch.float8_e4m3fn),
          torch.rand(ne, -(-hm // 128), -(-im // 128), device=device) / (64 * im ** 0.5))
    cases.append(Case("fused_moe_fp8 top8 128x128", f"{nm}tok {hm}x{im} E{ne} k{topk}",
                      lambda: ops.fused_moe_fp8(xm, *f13, *f2, mw, mids, (128, 128)),
                      routed * 3 * hm * im * (1 + 4 / 128 ** 2) + 2 * nm * hm * es,
                      6 * nm * topk * hm * im, ("triton",),
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids)))
    # the same MoE with int8 experts (W8A16, one fp32 scale per output row: vLLM's
    # use_int8_w8a16), the same peer; bytes: routed experts' int8 bytes + fp32 row
    # scales + x and out
    i13 = (torch.randint(-128, 128, (ne, 2 * im, hm), dtype=torch.int8, device=device),
           torch.rand(ne, 2 * im, device=device) / (64 * hm ** 0.5))
    i2 = (torch.randint(-128, 128, (ne, hm, im), dtype=torch.int8, device=device),
          torch.rand(ne, hm, device=device) / (64 * im ** 0.5))
    cases.append(Case("fused_moe_int8 top8 per-row", f"{nm}tok {hm}x{im} E{ne} k{topk}",
                      lambda: ops.fused_moe_int8(xm, *i13, *i2, mw, mids),
                      routed * 3 * hm * im + routed * 4 * (2 * im + hm) + 2 * nm * hm * es,
                      6 * nm * topk * hm * im, ("triton",),
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids)))
    cases += w8a8_block_fp8_cases(device, dtype, s)
    cases += int8_w8a8_cases(device, dtype, s)
    return cases


def w8a8_block_fp8_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """Block FP8 W8A8 (DeepSeek-V3's 128 x 128 blocks) at M = 16 and 4096 on an 8192^2
    weight: the matmul on pre-quantized activations beside cuBLAS bf16 and
    torch._scaled_mm (fp8 rowwise / per-tensor scales: the coarser-scaled fp8 ceiling);
    the activation quantization (per_token_group_quant_fp8, g128) as its own rows, so a
    full bf16 -> fp8 linear costs the sum. frac_mma is against the bf16 ceiling (H100 /
    H200 fp8 peak is 2x)."""
    import torch

    from .. import ops
    n = k = 8192 // s
    es = torch.finfo(dtype).bits // 8
    fp8 = torch.float8_e4m3fn
    wq = (torch.randn(n, k, device=device) * 64).clamp(-448, 448).to(fp8)
    ws = torch.rand(n // 128, k // 128, device=device) / 500
    wdense = torch.randn(n, k, device=device, dtype=dtype)
    cases = []
    for m in (16, 4096 // s):
        x = torch.randn(m, k, device=device, dtype=dtype)
        xq, xs = ops.per_token_group_quant_fp8(x, 128)
        peers: list[tuple[str, Callable[[], object]]] = []
        if device.startswith("cuda"):
            sa_row = xs.amax(dim=1, keepdim=True)
            sb_row = ws.amax(dim=1).repeat_interleave(128)[None, :].contiguous()
            one = torch.ones((), device=device)
            for name, fn in (
                    ("_scaled_mm rowwise", lambda xq=xq, sa=sa_row: torch._scaled_mm(
                        xq, wq.t(), scale_a=sa, scale_b=sb_row, out_dtype=dtype)),
                    ("_scaled_mm per-tensor", lambda xq=xq: torch._scaled_mm(
                        xq, wq.t(), scale_a=one, scale_b=one, out_dtype=dtype))):
                try:        # a peer this torch / GPU cannot run is left out, not fatal
                    fn()
                    peers.append((name, fn))
                except Exception as exc:  # noqa: BLE001
                    print(f"peer {name} skipped at M={m}: {type(exc).__name__}: {exc}")
        cases.append(Case(
            "w8a8_block_fp8_matmul 128x128", f"M={m} {n}x{k}",
            lambda xq=xq, xs=xs: ops.w8a8_block_fp8_matmul(xq, wq, xs, ws, [128, 128],
                                                           output_dtype=dtype),
            n * k + m * k + (m + n // 128) * (k // 128) * 4 + m * n * es, 2 * m * n * k,
            ("triton",), lambda x=x: x @ wdense.t(), extra_peers=tuple(peers)))
        cases.append(Case(
            "per_token_group_quant_fp8 g128", f"{m}x{k}",
            lambda x=x: ops.per_token_group_quant_fp8(x, 128),
            m * k * (es + 1) + m * (k // 128) * 4, 0, ("triton",),
            lambda x=x: ops.reference.per_token_group_quant_fp8(x, 128)))
    return cases


def int8_w8a8_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """INT8 W8A8 (vLLM's compressed-tensors int8: per-token activation scales, per-channel
    weight scales) at M = 1, 16, 4096 on 4096^2 and 8192^2 weights: scaled_mm on
    pre-quantized activations (b = weight.t(), column-major) beside cuBLAS bf16 (x @ W.T)
    and torch._int_mm with the same scale epilogue in torch (where this torch / GPU runs
    it: cuBLASLt int8 wants M > 16 and N, K multiples of 8); scaled_int8_quant (dynamic,
    symmetric) on a [4096, 4096] activation as its own row, so a full bf16 -> int8 linear
    costs the sum. frac_mma is against the bf16 ceiling (int8 tensor-core peak is 2x).
    Bytes: int8 weight + int8 a + fp32 scales + out."""
    import torch

    from .. import ops
    es = torch.finfo(dtype).bits // 8
    cases = []
    for size in (4096 // s, 8192 // s):
        n = k = size
        wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        ws = torch.rand(n, 1, device=device) / 500
        wdense = torch.randn(n, k, device=device, dtype=dtype)
        for m in (1, 16, 4096 // s):
            xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
            xs = torch.rand(m, 1, device=device) / 500
            x = torch.randn(m, k, device=device, dtype=dtype)
            peers: list[tuple[str, Callable[[], object]]] = []
            if device.startswith("cuda"):
                def int_mm(xq=xq, xs=xs, wq=wq, ws=ws):
                    return (xs * (ws.t() * torch._int_mm(xq, wq.t()).float())).to(dtype)
                try:        # a peer this torch / GPU cannot run is left out, not fatal
                    int_mm()
                    peers.append(("_int_mm+scales", int_mm))
                except Exception as exc:  # noqa: BLE001
                    print(f"peer _int_mm skipped at M={m}: {type(exc).__name__}: {exc}")
            cases.append(Case(
                "scaled_mm int8", f"M={m} {n}x{k}",
                lambda xq=xq, xs=xs, wq=wq, ws=ws: ops.scaled_mm(xq, wq.t(), xs, ws, dtype),
                n * k + m * k + (m + n) * 4 + m * n * es, 2 * m * n * k, ("triton",),
                lambda x=x, wdense=wdense: x @ wdense.t(), extra_peers=tuple(peers)))
    m = k = 4096 // s
    x = torch.randn(m, k, device=device, dtype=dtype)
    cases.append(Case(
        "scaled_int8_quant dynamic", f"{m}x{k}", lambda: ops.scaled_int8_quant(x),
        m * k * (es + 1) + m * 4, 0, ("triton",),
        lambda: ops.reference.scaled_int8_quant(x)))
    return cases


def int8_matmul_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """int8 W8A16 (uint8 weight, g128 scales and zero points: GPTQ 8-bit / compressed-
    tensors W8A16's layout after conversion; x stays in dtype) at M = 1, 16, 4096 on an
    8192^2 weight, beside cuBLAS bf16 (x @ W.T; the peer runs on the GPU only). Bytes: the
    int8 weight + the scales and zeros + x + y."""
    import torch

    from .. import ops
    n = k = 8192 // s
    es = torch.finfo(dtype).bits // 8
    qweight = torch.randint(0, 256, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // 128, device=device) / 500).to(dtype)
    zeros = torch.full((n, k // 128), 128.0, device=device, dtype=dtype)
    wdense = torch.randn(n, k, device=device, dtype=dtype)
    cases = []
    for m in (1, 16, 4096 // s):
        xm = torch.randn(m, k, device=device, dtype=dtype)
        cases.append(Case(
            "int8_matmul g128", f"M={m} {n}x{k}",
            lambda xm=xm: ops.int8_matmul(xm, qweight, scales, zeros, 128),
            n * k + 2 * scales.numel() * es + m * (n + k) * es, 2 * m * n * k, ("triton",),
            lambda xm=xm: xm @ wdense.t()))
    return cases


def fp8_matmul_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """fp8 W8A16 (e4m3 weight, DeepSeek-V3 / Qwen3-FP8's 128 x 128 block scales; x stays
    in dtype) at M = 1, 16, 4096 on an 8192^2 weight, beside cuBLAS bf16 (x @ W.T) and,
    where this torch / GPU runs it, torch._scaled_mm per-tensor fp8 (W8A8 on an x
    quantized beforehand, untimed). Bytes: the fp8 weight + fp32 scales + x + y."""
    import torch

    from .. import ops
    n = k = 8192 // s
    es = torch.finfo(dtype).bits // 8
    fp8 = torch.float8_e4m3fn
    w8 = (torch.randn(n, k, device=device) * 64).clamp(-448, 448).to(fp8)
    w8_scale = torch.rand(-(-n // 128), -(-k // 128), device=device) / 500
    wdense = torch.randn(n, k, device=device, dtype=dtype)
    one = torch.ones((), device=device)
    cases = []
    for m in (1, 16, 4096 // s):
        xm = torch.randn(m, k, device=device, dtype=dtype)
        peers: list[tuple[str, Callable[[], object]]] = []
        if device.startswith("cuda"):
            x8 = (xm.float() * 64).clamp(-448, 448).to(fp8)

            def scaled_mm(x8=x8):
                return torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=dtype)
            try:            # a peer this torch / GPU cannot run is left out, not fatal
                scaled_mm()
                peers.append(("_scaled_mm per-tensor", scaled_mm))
            except Exception as exc:  # noqa: BLE001
                print(f"peer _scaled_mm skipped at M={m}: {type(exc).__name__}: {exc}")
        cases.append(Case(
            "fp8_matmul 128x128", f"M={m} {n}x{k}",
            lambda xm=xm: ops.fp8_matmul(xm, w8, w8_scale, (128, 128)),
            n * k + w8_scale.numel() * 4 + m * (n + k) * es, 2 * m * n * k, ("triton",),
            lambda xm=xm: xm @ wdense.t(), extra_peers=tuple(peers)))
    return cases


def loop_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor) -> torch.Tensor:
    """The torch peer of fused_moe: a loop over experts, each gathering its tokens with
    index_select and running two matmuls (transformers' Mixtral / Qwen-MoE block)."""
    import torch

    t, k = topk_ids.shape
    inter = w2.shape[2]
    out = torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32)
    flat = topk_ids.flatten()
    weights = topk_weights.flatten()
    for e in range(w13.shape[0]):
        pairs = (flat == e).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        tok = pairs // k
        gu = x.index_select(0, tok) @ w13[e].t()
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = act @ w2[e].t()
        out.index_add_(0, tok, y.float() * weights[pairs].unsqueeze(1))
    return out.to(x.dtype)


def torch_moe_align(topk_ids: torch.Tensor, block_size: int, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch peer of moe_align_block_size (what fused_moe sorted with before): a stable
    sort, a scatter-add histogram, cumsums, a scatter and a searchsorted; no host sync."""
    import torch

    ids = topk_ids.reshape(-1).to(torch.int64)
    n, dev = ids.numel(), ids.device
    sorted_e, order = torch.sort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, ids, torch.ones_like(ids))
    padded = (counts + block_size - 1) // block_size * block_size
    pad_end = torch.cumsum(padded, 0)
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = pad_end[sorted_e] - padded[sorted_e] + rank
    blocks = (n + min(num_experts, n) * (block_size - 1)) // block_size
    sorted_ids = torch.full((blocks * block_size,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tile_expert = torch.searchsorted(pad_end // block_size,
                                     torch.arange(blocks, device=dev), right=True)
    return sorted_ids, tile_expert


def softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch peer of topk_softmax: softmax in fp32, torch.topk, renormalization (what
    transformers' MoE routers run)."""
    import torch

    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def gather_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
    """The torch peer of lora_delta: gather each token's adapter and run two batched
    matmuls (what a PyTorch LoRA server without punica kernels does)."""
    import torch

    idx = slots.clamp_min(0).long()
    h = torch.bmm(a[idx], x.unsqueeze(-1))                         # [T, R, 1]
    y = torch.bmm(b[idx], h).squeeze(-1) * scaling[idx].unsqueeze(-1).to(x.dtype)
    return y * (slots >= 0).unsqueeze(-1).to(x.dtype)


def per_adapter_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     slots: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """The torch peer of lora_delta for prefill batches: PEFT's mixed-batch forward, one
    pair of matmuls per adapter over the rows that use it."""
    import torch

    y = torch.zeros(x.shape[0], b.shape[1], device=x.device, dtype=x.dtype)
    for s in range(a.shape[0]):
        rows = (slots == s).nonzero().flatten()
        y[rows] = (x[rows] @ a[s].t()) @ b[s].t() * scaling[s].to(x.dtype)
    return y


def sort_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None,
                     p: torch.Tensor) -> torch.Tensor:
    """The torch peer of top_k_top_p_mask_logits: sort the vocabulary, mask top-k, then
    top-p on the cumulative softmax (the formulation vLLM's sampler falls back to)."""
    import torch

    srt, idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = srt.gather(1, (srt.shape[1] - k.long()).unsqueeze(1))
        srt = srt.masked_fill(srt < kth, float("-inf"))
    cum = srt.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - p.unsqueeze(1)
    drop[:, -1] = False
    srt = srt.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, srt)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backend import cuda_extension, use_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    on_gpu = device.startswith("cuda")
    rep = args.rep or (50 if on_gpu else 10)
    ceil = B.ceilings(device)
    rows = []
    for case in op_cases(device, dtype, small=not on_gpu):
        if on_gpu:
            have_cuda = cuda_extension() is not None
            backends = [b for b in case.backends if b != "cuda" or have_cuda]
        else:
            backends = ["reference"]
        runs = [(b, case.run) for b in backends]
        if case.peer is not None and on_gpu:
            runs.append(("torch", case.peer))
        if on_gpu:
            runs.extend(case.extra_peers)
        for name, fn in runs:
            with use_backend(name if name in ("reference", "triton", "cuda") else "auto"):
                t = B.time_stats(fn, warmup=2, rep=rep, device=device)
            sec = t.median
            row = {"op": case.op, "shape": case.shape, "backend": name, "us": sec * 1e6,
                   "spread": t.spread, "p10_us": t.p10 * 1e6, "p90_us": t.p90 * 1e6,
                   "runs": t.runs, "GB/s": case.nbytes / sec / 1e9,
                   "TFLOP/s": case.flops / sec / 1e12 if case.flops else None}
            if ceil["copy_bytes_per_s"]:
                row["frac_bw"] = case.nbytes / sec / ceil["copy_bytes_per_s"]
                row["frac_mma"] = (case.flops / sec / ceil["bf16_matmul_flops"]
                                   if case.flops else None)
            rows.append(row)
    cols = ["op", "shape", "backend", "us", "spread", "GB/s", "TFLOP/s", "frac_bw",
            "frac_mma"]
    print(B.markdown_table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(f"spread = (p90 - p10) / median over {rep} runs per row.")
    if not on_gpu:
        print(f"note: {B.CPU_NOTE}.")
    meta = {"ceilings": ceil, "dtype": args.dtype, "downsized": not on_gpu, "runs": rep}
    if not args.no_save:
        paths = B.write_results("ops", rows, meta, title="minikernels op benchmark",
                                columns=[c for c in cols if any(c in r for r in rows)],
                                plot=lambda path: plot_ops(rows, path), out_dir=args.result_dir)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.output_json:
        B.write_json(args.output_json, rows, meta)
        print(f"wrote {args.output_json}")
    if not math.isfinite(sum(r["us"] for r in rows)):
        return 1
    return 0


def plot_ops(rows: list[dict], path) -> None:
    """Microseconds per op and backend (log scale), p10..p90 as error bars."""
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} [{r['shape']}] {r['backend']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
    y = list(range(len(rows)))
    err = [[r["us"] - r["p10_us"] for r in rows], [r["p90_us"] - r["us"] for r in rows]]
    colors = {"reference": "tab:gray", "triton": "tab:blue", "cuda": "tab:green",
              "torch": "tab:orange"}
    ax.barh(y, [r["us"] for r in rows], xerr=err, capsize=2,
            color=[colors.get(r["backend"], "tab:purple") for r in rows])
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("microseconds per call (median; bars p10..p90)")
    ax.set_title("minikernels ops on " + B.device_name())
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rep", type=int, default=None,
                        help="timed repetitions per case (default: 50 on a GPU, 10 on CPU)")
    B.add_result_arguments(parser, "ops")
