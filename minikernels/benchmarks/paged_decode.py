"""Paged decode attention benchmark: minikernels.paged_decode_attention against its peers.

    python -m bench.bench_paged_decode             # H200: the standard table + plot
    python -m bench.bench_paged_decode --smoke     # tiny shapes on the CPU (CI check)

Shapes: batch {1, 8, 64, 256} x context {512, 4096, 32768}, Hq=32, Hkv=8, D=128, block 16,
bf16, every sequence at the full context, pages shuffled over the pool. Implementations in
the same process: ours (Triton with the split-KV heuristic; Triton in batch-invariant mode,
split_size=512; CUDA C++ when the extension is built), gather + SDPA (pages gathered to a
contiguous [B, Hkv, ctx, D] copy, then SDPA with enable_gqa: what a framework without a
paged kernel does), SDPA over already-contiguous KV (the upper reference: no paging cost),
and flex_attention (compiled) over the whole page pool with a block mask built from the
block table, where it runs. Beside them, ours over an fp8 (e4m3) KV cache quantized from the
same K/V with per-head scales (``*_fp8kv`` rows: half the bytes; checked against SDPA over
the dequantized cache; ``minikernels_triton_bytes_fp8kv``: the cache read as bytes and
decoded in software, the A100's path, here on whatever GPU runs it). Minimum bytes = the K and V pages read once (+ q, out); every
time is reported as GB/s and as a fraction of the copy bandwidth measured in the same run
(L2 flushed before each call). Our output is checked against SDPA on the same inputs.
Results: bench/results/<device>/paged_decode.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
    # the CPU smoke run needs the Triton interpreter, set before triton is imported
    try:
        import torch as _t
        if not _t.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import torch

from ..ops.triton import fp8_bits
from .plumbing import ceilings, device_name, time_fn, write_results

BATCHES = (1, 8, 64, 256)
CONTEXTS = (512, 4096, 32768)
HQ, HKV, D, BLOCK = 32, 8, 128, 16
SMOKE = dict(batches=(1, 3), contexts=(40, 100), hq=4, hkv=2, d=64, block=16)


def make_inputs(batch: int, ctx: int, hq: int, hkv: int, d: int, block: int,
                dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = -(-ctx // block)
    num_blocks = batch * per_seq + 1
    perm = torch.randperm(num_blocks, device=device, generator=g)
    table = perm[:batch * per_seq].view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch, hq, d, device=device, generator=g, dtype=torch.float32).to(dtype)
    kc = torch.randn(num_blocks, block, hkv, d, device=device, generator=g,
                     dtype=torch.float32).to(dtype)
    vc = torch.randn(num_blocks, block, hkv, d, device=device, generator=g,
                     dtype=torch.float32).to(dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return dict(q=q, k_cache=kc, v_cache=vc, block_table=table, seq_lens=lens)


def quantize_caches(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8 e4m3 copies of the caches with per-kv-head scales amax / 448 (no saturation)."""
    from minikernels.ops import reference

    out = {}
    for name in ("k", "v"):
        cache = inp[f"{name}_cache"]
        scale = (cache.float().abs().amax(dim=(0, 1, 3)) / 448.0).clamp_min(1e-8)
        out[f"{name}_cache"] = reference.quantize_kv(cache, scale, torch.float8_e4m3fn)
        out[f"{name}_scale"] = scale
    return out


def gather_kv(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """Pages -> contiguous [B, Hkv, ctx, D] (every sequence has ctx tokens)."""
    b = table.shape[0]
    x = cache[table.long()]                                  # [B, pages, BS, Hkv, D]
    x = x.view(b, -1, cache.shape[2], cache.shape[3])[:, :ctx]
    return x.transpose(1, 2).contiguous()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v,
                                                           enable_gqa=True)
    return out.squeeze(2)


def _flex_paged(inp: dict[str, torch.Tensor], ctx: int) -> Callable[[], torch.Tensor]:
    """flex_attention over the whole page pool: sequence b sees the slots of its pages."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kc, vc, table = inp["k_cache"], inp["v_cache"], inp["block_table"]
    nb, bs, hkv, d = kc.shape
    batch = table.shape[0]
    slots = nb * bs
    owner = torch.full((slots,), -1, dtype=torch.int32, device=kc.device)
    pos = torch.zeros(slots, dtype=torch.int32, device=kc.device)
    pages = table.long()
    page_slots = (pages.unsqueeze(-1) * bs + torch.arange(bs, device=kc.device)).view(batch, -1)
    owner.scatter_(0, page_slots.reshape(-1), torch.arange(batch, device=kc.device, dtype=torch.int32)
                   .repeat_interleave(page_slots.shape[1]))
    pos.scatter_(0, page_slots.reshape(-1), torch.arange(page_slots.shape[1], device=kc.device,
                                                         dtype=torch.int32).repeat(batch))
    lens = inp["seq_lens"]

    def mask_mod(b, h, q_idx, kv_idx):
        return (owner[kv_idx] == b) & (pos[kv_idx] < lens[b])

    mask = create_block_mask(mask_mod, batch, None, 1, slots, device=kc.device)
    k = kc.view(1, slots, hkv, d).transpose(1, 2).expand(batch, hkv, slots, d)
    v = vc.view(1, slots, hkv, d).transpose(1, 2).expand(batch, hkv, slots, d)
    q = inp["q"].unsqueeze(2)
    flex = torch.compile(flex_attention, dynamic=False)

    def fn() -> torch.Tensor:
        return flex(q, k, v, block_mask=mask, enable_gqa=True).squeeze(2)
    return fn


def bench_shape(batch: int, ctx: int, *, hq: int, hkv: int, d: int, block: int,
                device: str, copy_bw: float, smoke: bool) -> list[dict[str, Any]]:
    import minikernels as mk

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inp = make_inputs(batch, ctx, hq, hkv, d, block, dtype, device)
    esize = inp["q"].element_size()
    kv_bytes = 2 * batch * ctx * hkv * d * esize
    min_bytes = kv_bytes + 2 * inp["q"].numel() * esize + inp["block_table"].numel() * 4
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 62

    impls: dict[str, Callable[[], torch.Tensor]] = {}

    def ours(backend: str, **kw: Any) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with mk.use_backend(backend):
                return mk.ops.paged_decode_attention(inp["q"], inp["k_cache"], inp["v_cache"],
                                                     inp["block_table"], inp["seq_lens"], **kw)
        return fn

    fp8 = quantize_caches(inp)

    def ours_fp8(backend: str, as_bytes: bool | None = None) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with mk.use_backend(backend), fp8_bits.emulated_e4m3(as_bytes):
                return mk.ops.paged_decode_attention(
                    inp["q"], fp8["k_cache"], fp8["v_cache"], inp["block_table"],
                    inp["seq_lens"], k_scale=fp8["k_scale"], v_scale=fp8["v_scale"])
        return fn

    impls["minikernels_triton"] = ours("triton")
    impls["minikernels_triton_invariant"] = ours("triton", split_size=512)
    impls["minikernels_triton_fp8kv"] = ours_fp8("triton")
    # the A100's path (the cache as bytes, e4m3 decoded in software) wherever this runs
    impls["minikernels_triton_bytes_fp8kv"] = ours_fp8("triton", as_bytes=True)
    if device == "cuda":
        from minikernels import backend as _backend
        if _backend.cuda_extension() is not None and \
                hasattr(_backend.cuda_extension(), "paged_decode_attention"):
            impls["minikernels_cuda"] = ours("cuda")
            impls["minikernels_cuda_fp8kv"] = ours_fp8("cuda")
    else:
        impls["reference"] = ours("reference")
        impls["reference_fp8kv"] = ours_fp8("reference")
    fp8_bytes = kv_bytes // esize + (min_bytes - kv_bytes)   # one byte per K/V element
    # peers
    skipped: dict[str, str] = {}
    if 3 * kv_bytes < 0.8 * free:
        impls["gather_sdpa"] = lambda: _sdpa(
            inp["q"], gather_kv(inp["k_cache"], inp["block_table"], ctx),
            gather_kv(inp["v_cache"], inp["block_table"], ctx))
    else:
        skipped["gather_sdpa"] = "out of memory (needs a contiguous copy of KV)"
    k_contig = v_contig = None
    if 2 * kv_bytes < 0.6 * free:
        k_contig = gather_kv(inp["k_cache"], inp["block_table"], ctx)
        v_contig = gather_kv(inp["v_cache"], inp["block_table"], ctx)
        impls["sdpa_contiguous"] = lambda: _sdpa(inp["q"], k_contig, v_contig)
    else:
        skipped["sdpa_contiguous"] = "out of memory"
    if device == "cuda" and batch * inp["k_cache"].shape[0] * block <= (1 << 31):
        try:
            impls["flex_paged"] = _flex_paged(inp, ctx)
        except Exception as exc:  # noqa: BLE001 - record why the peer does not run
            skipped["flex_paged"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    elif device == "cuda":
        skipped["flex_paged"] = "block mask too large"

    # correctness on these inputs: against SDPA over the same (gathered) K/V
    kr = k_contig if k_contig is not None else None
    expect = expect_fp8 = None
    if kr is not None:
        expect = _sdpa(inp["q"].float(), kr.float(), v_contig.float())
        deq = {n: (gather_kv(fp8[f"{n}_cache"].view(torch.uint8), inp["block_table"], ctx)
                   .view(torch.float8_e4m3fn).float()
                   * fp8[f"{n}_scale"].view(1, -1, 1, 1)) for n in ("k", "v")}
        expect_fp8 = _sdpa(inp["q"].float(), deq["k"], deq["v"])
        del deq
    rows: list[dict[str, Any]] = []
    base_time = None
    results: dict[str, float] = {}
    for name, fn in impls.items():
        is_fp8 = name.endswith("_fp8kv")
        want = expect_fp8 if is_fp8 else expect
        try:
            out = fn()
            err = (float((out.float() - want).abs().max()) if want is not None else None)
            seconds = time_fn(fn, warmup=1 if smoke else 5, rep=2 if smoke else 30,
                              flush_l2=device == "cuda", device=device)
        except Exception as exc:  # noqa: BLE001
            skipped[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        results[name] = seconds
        nbytes = fp8_bytes if is_fp8 else min_bytes
        rows.append(dict(batch=batch, context=ctx, impl=name,
                         kv_dtype="fp8_e4m3" if is_fp8 else str(inp["q"].dtype)[6:],
                         us=seconds * 1e6, gb_per_s=nbytes / seconds / 1e9,
                         frac_copy_bw=(nbytes / seconds / copy_bw) if copy_bw else None,
                         max_abs_err=err))
    base_time = results.get("gather_sdpa")
    for r in rows:
        r["speedup_vs_gather_sdpa"] = (base_time / (r["us"] / 1e6)) if base_time else None
    for name, why in skipped.items():
        rows.append(dict(batch=batch, context=ctx, impl=name, skipped=why))
    del inp, k_contig, v_contig, fp8
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _plot(rows: list[dict[str, Any]], path: Path,
          shape: str = "Hq=32, Hkv=8, D=128, block 16") -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("us") is not None]
    shapes = sorted({(r["batch"], r["context"]) for r in timed})
    impls = sorted({r["impl"] for r in timed})
    fig, ax = plt.subplots(figsize=(max(6, len(shapes) * 0.9), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = []
        for s in shapes:
            r = next((r for r in timed if (r["batch"], r["context"]) == s and r["impl"] == impl),
                     None)
            ys.append((r["frac_copy_bw"] if r and r["frac_copy_bw"] is not None
                       else (r["gb_per_s"] if r else 0.0)))
        ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
    ax.set_xticklabels([f"{b}x{c}" for b, c in shapes], rotation=45, ha="right")
    ax.set_ylabel("fraction of copy bandwidth" if any(r["frac_copy_bw"] for r in timed)
                  else "GB/s")
    ax.set_xlabel("batch x context")
    ax.set_title(f"paged decode attention ({shape}, bf16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--batches", type=int, nargs="*")
    parser.add_argument("--contexts", type=int, nargs="*")
    parser.add_argument("--heads", type=int, nargs=3, metavar=("HQ", "HKV", "D"),
                        help="q heads, kv heads, head dim (default 32 8 128; Gemma 4 31B's "
                             "full-attention layers: 32 4 512)")
    parser.add_argument("--result-dir", dest="out_dir", default=None,
                        help="output folder (default: bench/results/<device>; "
                             "$MINIKERNELS_BENCH_OUT overrides)")
    parser.add_argument("--out-dir", dest="out_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        cfg = dict(SMOKE)
    else:
        cfg = dict(batches=BATCHES, contexts=CONTEXTS, hq=HQ, hkv=HKV, d=D, block=BLOCK)
    if args.heads:
        cfg.update(hq=args.heads[0], hkv=args.heads[1], d=args.heads[2])
    batches = args.batches or cfg["batches"]
    contexts = args.contexts or cfg["contexts"]
    ceil = ceilings(device)
    rows: list[dict[str, Any]] = []
    for ctx in contexts:
        for batch in batches:
            rows += bench_shape(batch, ctx, hq=cfg["hq"], hkv=cfg["hkv"], d=cfg["d"],
                                block=cfg["block"], device=device,
                                copy_bw=ceil["copy_bytes_per_s"], smoke=args.smoke)
            print(f"batch {batch} x ctx {ctx}: " + ", ".join(
                f"{r['impl']}={r['us']:.1f}us" for r in rows[-10:]
                if r.get("us") is not None and r["batch"] == batch and r["context"] == ctx),
                flush=True)
    meta = dict(shapes=f"Hq={cfg['hq']}, Hkv={cfg['hkv']}, D={cfg['d']}, block={cfg['block']}",
                dtype="bf16" if device == "cuda" else "fp32 (CPU smoke)",
                ceilings=ceil, smoke=args.smoke,
                bytes="2 * B * ctx * Hkv * D * elem (K and V read once; elem 2, or 1 for "
                      "fp8 KV) + q + out + block_table")
    columns = ["batch", "context", "impl", "kv_dtype", "us", "gb_per_s", "frac_copy_bw",
               "speedup_vs_gather_sdpa", "max_abs_err", "skipped"]
    return write_results("paged_decode", rows, meta, columns=columns,
                         title="Paged decode attention", plot=lambda p: _plot(
                             rows, p, f"Hq={cfg['hq']}, Hkv={cfg['hkv']}, D={cfg['d']}, "
                             f"block {cfg['block']}"),
                         out_dir=out_dir or args.out_dir)


if __name__ == "__main__":
    main()
