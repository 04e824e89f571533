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

from typing import TYPE_CHECKING, Any

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
    # the same fp8 experts run W8A8 (vLLM's use_fp8_w8a8 + block_shape [128, 128]): fp8
    # tensor-core GEMMs; bytes add the two per-token-group quantizations (x and the
    # [T*k, I] intermediate read in x.dtype, written as fp8 + scales)
    if hm % 128 == 0 and im % 128 == 0:
        cases.append(Case("fused_moe_fp8_w8a8 top8 128x128",
                          f"{nm}tok {hm}x{im} E{ne} k{topk}",
                          lambda: ops.fused_moe_fp8_w8a8(xm, *f13, *f2, mw, mids, (128, 128)),
                          routed * 3 * hm * im * (1 + 4 / 128 ** 2) + 2 * nm * hm * es
                          + nm * hm * (es + 1) + nm * topk * im * (2 * es + 1),
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
    # the same int8 experts run W8A8 (vLLM's use_int8_w8a8 + per_channel_quant): both
    # GEMMs on int8 tensor cores; bytes add the two per-token quantizations (x and the
    # [T*k, I] intermediate read in x.dtype, written as int8)
    cases.append(Case("fused_moe_int8_w8a8 top8 per-row", f"{nm}tok {hm}x{im} E{ne} k{topk}",
                      lambda: ops.fused_moe_int8_w8a8(xm, *i13, *i2, mw, mids),
                      routed * 3 * hm * im + routed * 4 * (2 * im + hm) + 2 * nm * hm * es
                      + nm * hm * (es + 1) + nm * topk * im * (2 * es + 1),
                      6 * nm * topk * hm * im, ("triton",),
                      lambda: ops.fused_moe(xm, w13, w2, mw, mids)))
    cases += w8a8_block_fp8_cases(device, dtype, s)
    cases += int8_w8a8_cases(device, dtype, s)
    cases += recurrent_cases(device, dtype, s)
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
    cases += norm_quant_cases(device, dtype, s)
    cases += qk_norm_rope_cases(device, dtype, s)
    return cases


def _torch_group_quant(y: torch.Tensor, qd: torch.dtype, group: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch's per-token (group None) or per-group quantization of y [T, n]."""
    import torch

    g = y.float().view(y.shape[0], -1, group or y.shape[1])
    qmax = 127.0 if qd == torch.int8 else 448.0
    sc = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / qmax
    v = (g / sc).clamp(-qmax, qmax)
    return (v.round() if qd == torch.int8 else v).to(qd), sc


def norm_quant_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """The fused quantizing producers of a W8A8 model's linear inputs, at 4096 and 64
    tokens, int8 per token and fp8 per 128 columns (fp8 where this device has it),
    beside plain PyTorch and, on a GPU, the unfused minikernels pair each replaces:
    rms_norm_quant (RMSNorm + residual add: qkv / gate_up inputs of a 4096-wide stream;
    bytes x, residual in, the new residual, q, scales out) and act_and_mul_quant
    (SwiGLU of a 14336-wide MLP: the down_proj input; bytes gate / up in, q, scales
    out)."""
    import torch

    from .. import ops
    from ..ops.fp8_w8a8 import fp8_tensor_cores
    es = torch.finfo(dtype).bits // 8
    h = 4096 // s
    w = torch.rand(h, device=device, dtype=dtype) + 0.5
    quants = [(torch.int8, None, "int8/token")]
    if not device.startswith("cuda") or fp8_tensor_cores(torch.device(device)):
        quants.append((torch.float8_e4m3fn, 128 // s, f"fp8/{128 // s}"))
    cases = []
    for t in (4096 // s, 64):
        x = torch.randn(t, h, device=device, dtype=dtype)
        res = torch.randn_like(x)
        for qd, group, label in quants:
            def fused(x=x, res=res, qd=qd, group=group):
                return ops.rms_norm_quant(x, w, 1e-6, qd, residual=res, group_size=group)

            def unfused(x=x, res=res, qd=qd, group=group):
                y, hsum = ops.rms_norm(x, w, 1e-6, residual=res)
                if qd == torch.int8:
                    return ops.scaled_int8_quant(y)
                return ops.per_token_group_quant_fp8(y, group)

            def torch_peer(x=x, res=res, qd=qd, group=group):
                y = torch.nn.functional.rms_norm(x + res, (h,), w, 1e-6)
                return _torch_group_quant(y, qd, group)

            cases.append(Case(
                f"rms_norm_quant {label}+residual", f"{t}x{h}", fused,
                t * h * (3 * es + 1) + t * (h // (group or h)) * 4, 0, ("triton",),
                torch_peer, extra_peers=(("rms_norm+quant (unfused)", unfused),)
                if device.startswith("cuda") else ()))
    inter = 14336 // s
    for t in (4096 // s, 64):
        gu = torch.randn(t, 2 * inter, device=device, dtype=dtype)
        for qd, group, label in quants:
            def fused_act(gu=gu, qd=qd, group=group):
                return ops.act_and_mul_quant(gu, qd, "silu", group_size=group)

            def unfused_act(gu=gu, qd=qd, group=group):
                y = ops.silu_and_mul(gu)
                if qd == torch.int8:
                    return ops.scaled_int8_quant(y)
                return ops.per_token_group_quant_fp8(y, group)

            def torch_act(gu=gu, qd=qd, group=group):
                y = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
                return _torch_group_quant(y, qd, group)

            cases.append(Case(
                f"silu_and_mul_quant {label}", f"{t}x{2 * inter}", fused_act,
                t * inter * (2 * es + 1) + t * (inter // (group or inter)) * 4, 0,
                ("triton",), torch_act,
                extra_peers=(("silu_and_mul+quant (unfused)", unfused_act),)
                if device.startswith("cuda") else ()))
    return cases


def qk_norm_rope_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """Qwen3-8B's attention prologue (32 q heads, 8 kv heads, head dim 128): per-head q / k
    RMSNorm then RoPE on the q / k columns of the fused qkv projection, a decode batch
    (256 tokens) and a prefill (4096 // s tokens). ops.qk_norm_rope beside plain PyTorch
    and, on a GPU, the unfused minikernels path it replaces in the decoder (contiguous
    copies, rms_norm twice, rotary_embedding). Bytes: q and k read once, written once."""
    import torch

    from .. import ops
    hq, hkv, d = 32, 8, 128
    es = torch.finfo(dtype).bits // 8
    qw = torch.rand(d, device=device, dtype=dtype) + 0.5
    kw = torch.rand(d, device=device, dtype=dtype) + 0.5
    cache = ops.build_rope_cache(d, 8192, 1e6, device=device)
    cases = []
    for t in sorted({256, 4096 // s}):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, dtype=dtype)
        q = qkv[:, :hq * d].view(t, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
        pos = torch.randint(0, 8192, (t,), device=device)

        def fused(q=q, k=k, pos=pos):
            return ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6)

        def unfused(q=q, k=k, pos=pos):
            return ops.rotary_embedding(ops.rms_norm(q.contiguous(), qw, 1e-6),
                                        ops.rms_norm(k.contiguous(), kw, 1e-6), pos, cache)

        def torch_peer(q=q, k=k, pos=pos):
            cs = cache[pos]
            cos, sin = cs[:, None, :d // 2], cs[:, None, d // 2:]

            def rope(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                y = torch.nn.functional.rms_norm(x, (d,), w, 1e-6).float()
                x1, x2 = y[..., :d // 2], y[..., d // 2:]
                return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
            return rope(q, qw), rope(k, kw)

        cases.append(Case(
            "qk_norm_rope", f"{t}x({hq}+{hkv})x{d}", fused, 2 * t * (hq + hkv) * d * es, 0,
            ("triton",), torch_peer,
            extra_peers=(("q/k rms_norm + rotary (unfused)", unfused),)
            if device.startswith("cuda") else ()))
    return cases


def recurrent_cases(device: str, dtype: torch.dtype, s: int) -> list[Case]:
    """The hybrid models' recurrent mixers as the engine calls them: a decode step (256
    sequences of one token) and a prefill batch (4 prompts of 1024 tokens), each sequence's
    state in a shuffled slot of a pool, index checks off and max_seqlen given (no host
    syncs, as the engine's forward runs).

    - causal_conv1d: Qwen3.5-0.8B's q/k/v conv (D = 2 x 16 x 128 + 16 x 128 = 6144, W 4,
      SiLU) and LFM2-1.2B's short conv (D = hidden 2048, W 3 (conv_L_cache), no
      activation, no bias); conv state in the model dtype. Peer: transformers'
      causal_conv1d_update (decode) / cat + depthwise F.conv1d (prefill), written out below,
      on a per-batch state (transformers' cache layout: no slot indirection). Bytes: x +
      out + the state read and written + the weights.
    - gated_delta_rule: Qwen3.5-0.8B's Gated DeltaNet (Hk = Hv = 16, dk = dv = 128, l2norm
      on q / k, fp32 state [Hv, dk, dv] = 1 MiB per sequence), q / k / v views of the conv
      output. Peer (GPU only, where transformers has Qwen3.5 / Qwen3-Next):
      torch_recurrent_gated_delta_rule (decode) / torch_chunk_gated_delta_rule (prefill),
      the pure-torch functions under transformers' hub-kernel wrappers (never fla), on a
      per-batch state, the final state copied back as transformers' cache does. Bytes:
      the state read and written + q, k, v, g, beta, o. FLOPs: the recurrence's
      7 x dk x dv per token and head.
    - mamba2_scan: Granite-4.0-H-micro's Mamba-2 (H = 64 heads of P = 64, N = 128, one
      group; transformers' GraniteMoeHybridConfig defaults are H-Small's 128 heads and
      N 256), x / B / C views of the conv output, fp32 state [H, P, N] = 2 MiB per
      sequence. Peer (GPU only): transformers' granitemoehybrid
      mamba2_selective_state_update (decode, per-head values expanded to [H, P(, N)] as
      the layer does) / mamba2_chunk_scan (prefill, chunk 256), pure-torch paths. Bytes:
      the state read and written + x, y, B, C, dt. FLOPs: 5 x P x N per token and head.
    - selective_scan: Mamba-1.4B's Mamba-1 (Dm = 2 x 2048 = 4096 channels, N = 16, one
      B / C group; Mamba 2.8B / FalconMamba-7B have Dm 5120 / 8192), x / z halves of the
      in_proj output, B / C views of the x_proj output, dt in the model dtype, A / D /
      dt_bias fp32 (-exp(A_log), dt_proj's bias, softplus), z gate; fp32 state [Dm, N] =
      256 KiB per sequence. Peer (GPU only): transformers' mamba selective_state_update
      (decode) / mamba_selective_scan (prefill: its sequential torch loop over
      [b, Dm, l, N] fp32 discretized tensors, from zeros), unwrapped. Bytes: the state read
      and written + x, z, dt, y, B, C. FLOPs: 6 x N per token and channel (plus an exp per
      state: the SFU, not the FMA pipes, bounds it).
    The prefill rows are the recurrent kernels (one token per step, no tensor cores)
    against chunked torch (Mamba-1: a torch loop): see bench/NOTES.md."""
    import torch

    from .. import ops
    from .._validation import index_checks
    es = torch.finfo(dtype).bits // 8
    on_gpu = device.startswith("cuda")

    def batch(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cu_seqlens of n sequences of ``length`` tokens and their shuffled pool slots."""
        cu = torch.arange(n + 1, device=device, dtype=torch.int32) * length
        return cu, torch.randperm(n, device=device).to(torch.int32)

    def unsynced(fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with index_checks(False):
                return fn()
        return call

    def try_peer(name: str, fn: Callable[[], object]) -> Callable[[], object] | None:
        try:        # a peer this transformers cannot run is left out, not fatal
            fn()
            return fn
        except Exception as exc:  # noqa: BLE001
            print(f"peer {name} skipped: {type(exc).__name__}: {exc}")
            return None

    shapes = ((256 // s, 1), (4, 1024 // s))             # decode, prefill
    cases = []
    for model, dim, width, silu in (("Qwen3.5-0.8B", 6144 // s, 4, True),
                                    ("LFM2-1.2B", 2048 // s, 3, False)):
        wconv = torch.randn(dim, width, device=device, dtype=dtype) / width ** 0.5
        for n, length in shapes:
            t = n * length
            cu, slots = batch(n, length)
            x = torch.randn(t, dim, device=device, dtype=dtype)
            pool = torch.randn(n, dim, width - 1, device=device, dtype=dtype)
            hf_state = pool.clone()
            act = "silu" if silu else None
            peer = torch_conv_update if length == 1 else torch_conv_prefill
            cases.append(Case(
                f"causal_conv1d {'decode' if length == 1 else 'prefill'} ({model})",
                f"{n}x{length} D{dim} W{width}{' silu' if silu else ''}",
                unsynced(lambda x=x, w=wconv, cu=cu, pool=pool, slots=slots, act=act,
                         length=length: ops.causal_conv1d(
                             x, w, None, cu_seqlens=cu, conv_state=pool, state_indices=slots,
                             activation=act, max_seqlen=length)),
                2 * t * dim * es + 2 * n * dim * (width - 1) * es + dim * width * es, 0,
                ("triton",),
                lambda peer=peer, x=x, w=wconv, st=hf_state, silu=silu: peer(x, w, None, st,
                                                                             silu)))

    hk = hv = 16 // (4 if s > 1 else 1)
    dk = dv = 128 // (4 if s > 1 else 1)
    hf_gdn = hf_gated_delta_fns() if on_gpu else None
    for n, length in shapes:
        t = n * length
        cu, slots = batch(n, length)
        qkv = torch.randn(t, 2 * hk * dk + hv * dv, device=device, dtype=dtype)
        q, k, v = (part.view(t, -1, d) for part, d in
                   zip(qkv.split([hk * dk, hk * dk, hv * dv], dim=-1), (dk, dk, dv)))
        g = torch.nn.functional.logsigmoid(torch.randn(t, hv, device=device) + 3)   # < 0
        beta = torch.sigmoid(torch.randn(t, hv, device=device)).to(dtype)
        state = torch.randn(n, hv, dk, dv, device=device) / dk
        hf_state = state.clone()
        phase = "decode" if length == 1 else "prefill"
        peer = None
        if hf_gdn is not None:
            fn = hf_gdn[0] if length == 1 else hf_gdn[1]
            peer = try_peer(f"{fn.__name__} ({phase})",
                            lambda fn=fn, q=q, k=k, v=v, g=g, beta=beta, st=hf_state, n=n:
                            hf_gated_delta(fn, q, k, v, g, beta, st, n))
        cases.append(Case(
            f"gated_delta_rule {phase} (Qwen3.5-0.8B)",
            f"{n}x{length} Hk{hk} Hv{hv} d{dk} l2norm fp32-state",
            unsynced(lambda q=q, k=k, v=v, g=g, beta=beta, cu=cu, st=state, slots=slots,
                     length=length: ops.gated_delta_rule(
                         q, k, v, g, beta, cu_seqlens=cu, state=st, state_indices=slots,
                         use_qk_l2norm=True, max_seqlen=length)),
            2 * n * hv * dk * dv * 4 + t * (2 * hk * dk + 2 * hv * dv) * es
            + t * hv * (4 + es), 7 * t * hv * dk * dv, ("triton",), peer))

    heads, hdim = 64 // (8 if s > 1 else 1), 64 // (4 if s > 1 else 1)
    groups, nstate, chunk = 1, 128 // (4 if s > 1 else 1), 256
    hf_mamba = hf_mamba2_fns() if on_gpu else None
    a_neg = -torch.exp(torch.rand(heads, device=device) * 2)              # -exp(A_log), fp32
    d_skip = torch.ones(heads, device=device, dtype=dtype)
    dt_bias = torch.rand(heads, device=device, dtype=dtype) - 2
    for n, length in shapes:
        t = n * length
        cu, slots = batch(n, length)
        xbc = torch.randn(t, heads * hdim + 2 * groups * nstate, device=device, dtype=dtype)
        xs, bm, cm = xbc.split([heads * hdim, groups * nstate, groups * nstate], dim=-1)
        xs, bm, cm = xs.view(t, heads, hdim), bm.view(t, groups, nstate), cm.view(t, groups,
                                                                                  nstate)
        dt = torch.randn(t, heads, device=device, dtype=dtype)
        state = torch.randn(n, heads, hdim, nstate, device=device) / nstate
        hf_state = state.clone()
        phase = "decode" if length == 1 else "prefill"
        peer = None
        if hf_mamba is not None:
            fn = hf_mamba[0] if length == 1 else hf_mamba[1]
            peer = try_peer(f"{fn.__name__} ({phase})",
                            lambda fn=fn, xs=xs, dt=dt, bm=bm, cm=cm, st=hf_state, n=n:
                            hf_mamba2(fn, xs, dt, a_neg, bm, cm, d_skip, dt_bias, st, n,
                                      chunk))
        cases.append(Case(
            f"mamba2_scan {phase} (Granite-4.0-H-micro)",
            f"{n}x{length} H{heads} P{hdim} N{nstate} G{groups} fp32-state",
            unsynced(lambda xs=xs, dt=dt, bm=bm, cm=cm, cu=cu, st=state, slots=slots,
                     length=length: ops.mamba2_scan(
                         xs, dt, a_neg, bm, cm, cu_seqlens=cu, D=d_skip, dt_bias=dt_bias,
                         dt_softplus=True, state=st, state_indices=slots,
                         max_seqlen=length)),
            2 * n * heads * hdim * nstate * 4
            + t * (2 * heads * hdim + 2 * groups * nstate + heads) * es,
            5 * t * heads * hdim * nstate, ("triton",), peer))
    cases += _selective_scan_cases(device, dtype, s, shapes, batch, unsynced, try_peer)
    return cases


def _selective_scan_cases(device: str, dtype: torch.dtype, s: int,
                          shapes: tuple[tuple[int, int], ...], batch: Callable,
                          unsynced: Callable, try_peer: Callable) -> list[Case]:
    """recurrent_cases' selective_scan rows (Mamba-1.4B's Mamba-1; see its docstring)."""
    import torch

    from .. import ops
    es = torch.finfo(dtype).bits // 8
    dm, nstate, rank = 4096 // s, 16, 128 // s
    hf_fns = hf_mamba1_fns() if device.startswith("cuda") else None
    a_neg = -torch.arange(1, nstate + 1, device=device, dtype=torch.float32).repeat(dm, 1)
    d_skip = torch.ones(dm, device=device)
    dt_bias = torch.rand(dm, device=device) - 4.0                        # softplus ~ 0.02
    cases = []
    for n, length in shapes:
        t = n * length
        cu, slots = batch(n, length)
        xz = torch.randn(t, 2 * dm, device=device, dtype=dtype)
        xs, zs = xz[:, :dm], xz[:, dm:]
        proj = torch.randn(t, rank + 2 * nstate, device=device, dtype=dtype)
        bm, cm = (part.view(t, 1, nstate) for part in
                  proj[:, rank:].split([nstate, nstate], dim=-1))
        dt = torch.randn(t, dm, device=device, dtype=dtype)
        state = torch.randn(n, dm, nstate, device=device) / nstate
        hf_state = state.clone()
        phase = "decode" if length == 1 else "prefill"
        peer = None
        if hf_fns is not None:
            fn = hf_fns[0] if length == 1 else hf_fns[1]
            peer = try_peer(f"{fn.__name__} ({phase})",
                            lambda fn=fn, xs=xs, zs=zs, dt=dt, bm=bm, cm=cm, st=hf_state, n=n:
                            hf_mamba1(fn, xs, zs, dt, a_neg, bm, cm, d_skip, dt_bias, st, n))
        cases.append(Case(
            f"selective_scan {phase} (Mamba-1.4B)",
            f"{n}x{length} Dm{dm} N{nstate} G1 z fp32-state",
            unsynced(lambda xs=xs, zs=zs, dt=dt, bm=bm, cm=cm, cu=cu, st=state, slots=slots,
                     length=length: ops.selective_scan(
                         xs, dt, a_neg, bm, cm, cu_seqlens=cu, D=d_skip, z=zs,
                         dt_bias=dt_bias, dt_softplus=True, state=st, state_indices=slots,
                         max_seqlen=length)),
            2 * n * dm * nstate * 4 + t * (4 * dm + 2 * nstate) * es,
            6 * t * dm * nstate, ("triton",), peer))
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


def torch_conv_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      conv_state: torch.Tensor, silu: bool) -> torch.Tensor:
    """The torch peer of causal_conv1d for decode: transformers' causal_conv1d_update on
    one token per sequence (x [B, D]; conv_state [B, D, W - 1], row b = sequence b): the
    state and the token concatenated, the last W - 1 columns copied back into the state,
    a depthwise F.conv1d over the W columns."""
    import torch

    xx = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)                   # [B, D, W]
    conv_state.copy_(xx[:, :, 1:])
    out = torch.nn.functional.conv1d(xx, weight.unsqueeze(1), bias, groups=x.shape[1])
    out = out.squeeze(-1)
    return torch.nn.functional.silu(out) if silu else out


def torch_conv_prefill(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       conv_state: torch.Tensor, silu: bool) -> torch.Tensor:
    """The torch peer of causal_conv1d for prefill: B sequences of equal length L
    (x [B * L, D], token-major; conv_state [B, D, W - 1], row b = sequence b), batched: each
    sequence's state ++ its inputs, one depthwise F.conv1d without padding, the last W - 1
    columns copied back into the state, the output back to token-major [B * L, D]."""
    import torch

    n, d = conv_state.shape[0], x.shape[1]
    xx = torch.cat([conv_state, x.view(n, -1, d).transpose(1, 2)], dim=-1)  # [B, D, W-1+L]
    conv_state.copy_(xx[:, :, xx.shape[2] - conv_state.shape[2]:])
    out = torch.nn.functional.conv1d(xx, weight.unsqueeze(1), bias, groups=d)  # [B, D, L]
    if silu:
        out = torch.nn.functional.silu(out)
    return out.transpose(1, 2).reshape(-1, d)


def _transformers_fns(modules: tuple[str, ...], names: tuple[str, str],
                      peer: str) -> tuple[Callable, Callable] | None:
    """The functions ``names`` of the first of ``modules`` (under transformers.models)
    that has them, unwrapped from the hub-kernel decorators so an installed kernel package
    (fla, mamba_ssm) never stands in for them; None, said once as "peer transformers
    <peer> skipped: ...", where transformers lacks them."""
    import inspect

    for mod in modules:
        try:
            m = __import__(f"transformers.models.{mod}", fromlist=["_"])
            first, second = (inspect.unwrap(getattr(m, name)) for name in names)
            return first, second
        except Exception as exc:  # noqa: BLE001
            err = exc
    print(f"peer transformers {peer} skipped: {type(err).__name__}: {err}")
    return None


def hf_gated_delta_fns() -> tuple[Callable, Callable] | None:
    """transformers' torch_recurrent_gated_delta_rule and torch_chunk_gated_delta_rule
    (Qwen3.5's, else Qwen3-Next's), unwrapped from the hub-kernel decorators so an installed
    fla never stands in for them; None (said once) where transformers lacks them."""
    return _transformers_fns(("qwen3_5.modeling_qwen3_5", "qwen3_next.modeling_qwen3_next"),
                             ("torch_recurrent_gated_delta_rule",
                              "torch_chunk_gated_delta_rule"), "gated delta rule")


def hf_gated_delta(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                   n: int) -> torch.Tensor:
    """One of transformers' gated delta rules on n equal-length sequences of the op's
    varlen layout ([T, H, d] -> [n, L, H, d]), starting from the per-batch fp32 state
    [n, Hv, dk, dv] and copying the final state back into it (transformers' cache copies
    in place); the output back to [T, Hv, dv]."""
    o, final = fn(*(t.reshape(n, -1, *t.shape[1:]) for t in (q, k, v, g, beta)),
                  initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(final)
    return o.reshape(-1, *o.shape[2:])


def hf_mamba2_fns() -> tuple[Callable, Callable] | None:
    """transformers' granitemoehybrid mamba2_selective_state_update and mamba2_chunk_scan,
    unwrapped from the hub-kernel decorators so an installed mamba_ssm never stands in for
    them; None (said once) where transformers lacks them."""
    return _transformers_fns(("granitemoehybrid.modeling_granitemoehybrid",),
                             ("mamba2_selective_state_update", "mamba2_chunk_scan"), "mamba2")


def hf_mamba2(fn: Callable, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
              state: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """transformers' Mamba-2 torch path as GraniteMoeHybridMambaLayer calls it, on n
    equal-length sequences of the op's varlen layout and the per-batch fp32 state
    [n, H, P, N]: decode (one token each) through mamba2_selective_state_update with the
    per-head values expanded to [H, P(, N)] (it updates the state in place); prefill
    through mamba2_chunk_scan (chunk tokens per chunk), the final state copied back."""
    import math

    t, h, p = x.shape
    nst = B.shape[2]
    if t == n:
        return fn(state, x, dt[:, :, None].expand(-1, -1, p),
                  A[:, None, None].expand(-1, p, nst), B, C, D[:, None].expand(-1, p),
                  z=None, dt_bias=dt_bias[:, None].expand(-1, p), dt_softplus=True)
    y, final = fn(x.reshape(n, -1, h, p), dt.reshape(n, -1, h), A,
                  B.reshape(n, -1, *B.shape[1:]), C.reshape(n, -1, *C.shape[1:]),
                  chunk_size=chunk, D=D, z=None, dt_bias=dt_bias, dt_softplus=True,
                  initial_states=state, dt_limit=(0.0, math.inf), return_final_states=True)
    state.copy_(final)
    return y.reshape(t, h, p)


def hf_mamba1_fns() -> tuple[Callable, Callable] | None:
    """transformers' mamba mamba_selective_state_update and mamba_selective_scan (Mamba-1),
    unwrapped from the hub-kernel decorators so an installed mamba_ssm never stands in for
    them; None (said once) where transformers lacks them."""
    return _transformers_fns(("mamba.modeling_mamba",),
                             ("mamba_selective_state_update", "mamba_selective_scan"), "mamba")


def hf_mamba1(fn: Callable, x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor,
              A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
              dt_bias: torch.Tensor, state: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' Mamba-1 torch path as MambaMixer calls it, on n equal-length sequences
    of the op's varlen layout ([T, Dm] tokens) and the per-batch fp32 state [n, Dm, N]:
    decode (one token each) through mamba_selective_state_update (in place); prefill
    through mamba_selective_scan on [n, Dm, l] views (from zeros: it takes no initial
    state), the final state copied back."""
    t, dm = x.shape
    if t == n:
        return fn(state, x, dt, A, B[:, 0], C[:, 0], D, z=z, dt_bias=dt_bias,
                  dt_softplus=True)
    bdl = lambda v: v.reshape(n, t // n, -1).transpose(1, 2)       # noqa: E731
    y, final = fn(bdl(x), bdl(dt), A, bdl(B[:, 0]), bdl(C[:, 0]), D=D, z=bdl(z),
                  delta_bias=dt_bias, delta_softplus=True, return_last_state=True)
    state.copy_(final)
    return y.transpose(1, 2).reshape(t, dm)


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

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    on_gpu = device.startswith("cuda")
    rep = args.rep or (50 if on_gpu else 10)
    ceil = B.ceilings(device)
    rows: list[dict] = []
    failed: list[str] = []
    truncated = False
    try:
        _time_cases(op_cases(device, dtype, small=not on_gpu), rows, failed, on_gpu, device,
                    rep, ceil)
    except KeyboardInterrupt:
        # a time-capped run (bench/gpu_validation.sh sends SIGINT): keep the rows measured
        truncated = True
        print(f"interrupted: writing the {len(rows)} rows measured so far")
    cols = ["op", "shape", "backend", "us", "spread", "GB/s", "TFLOP/s", "frac_bw",
            "frac_mma"]
    print(B.markdown_table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(f"spread = (p90 - p10) / median over {rep} runs per row.")
    if not on_gpu:
        print(f"note: {B.CPU_NOTE}.")
    meta = {"ceilings": ceil, "dtype": args.dtype, "downsized": not on_gpu, "runs": rep,
            "truncated": truncated, "failed": failed}
    if not args.no_save:
        paths = B.write_results("ops", rows, meta, title="minikernels op benchmark",
                                columns=[c for c in cols if any(c in r for r in rows)],
                                plot=lambda path: plot_ops(rows, path), out_dir=args.result_dir)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.output_json:
        B.write_json(args.output_json, rows, meta)
        print(f"wrote {args.output_json}")
    if failed or not math.isfinite(sum(r["us"] for r in rows)):
        return 1
    return 0


def _time_cases(cases: "list[Case]", rows: list[dict], failed: list[str], on_gpu: bool,
                device: str, rep: int, ceil: dict) -> None:
    """Time every case's backends and peers into ``rows``; a case that raises is named in
    ``failed`` (with its error) and the others still run."""
    from ..backend import cuda_extension, use_backend

    for case in cases:
        try:
            _time_case(case, rows, on_gpu, device, rep, ceil, cuda_extension, use_backend)
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            failed.append(f"{case.op} [{case.shape}]: {type(e).__name__}: {e}")
            print(f"FAILED {failed[-1]}")


def _time_case(case: "Case", rows: list[dict], on_gpu: bool, device: str, rep: int,
               ceil: dict, cuda_extension: Any, use_backend: Any) -> None:
    """One case: its backends (triton / cuda on a GPU, the reference on the CPU) and,
    on a GPU, its peers, each a row."""
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
