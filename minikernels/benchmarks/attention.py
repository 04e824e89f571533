"""Prefill attention benchmark: minikernels.flash_attention against its peers, in one run.

    python -m bench.bench_attention                 # H200: the standard table + plot
    python -m bench.bench_attention --sweep         # also time every tile config (tuning)
    python -m bench.bench_attention --smoke         # tiny shapes on the CPU (CI check)

Shapes (FlashAttention's benchmark): bf16, head dim 64 and 128, heads = 2048 / head_dim,
seqlen 512..16k with batch x seqlen = 16k tokens, causal and not. Peers in the same process:
SDPA restricted to each backend (flash, cuDNN, efficient) with torch.nn.attention.sdpa_kernel,
and flex_attention (torch.compile'd, causal block mask). TFLOP/s use FlashAttention's count
4 * B * S^2 * H * D (halved for causal); every result is also given as a fraction of the
bf16 matmul ceiling measured in the same run. Our output is checked against the SDPA flash
(CPU: math) output on the same inputs. Results: bench/results/<device>/attention.{json,md,png}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .plumbing import ceilings, device_name, time_fn, write_results

PEERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_attention")


def flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool) -> float:
    f = 4.0 * batch * seqlen * seqlen * heads * head_dim
    return f / 2 if causal else f


def _sdpa(backend_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa_math": SDPBackend.MATH}[backend_name]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views of BSHD

    def fn() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                    is_causal=causal)
    return fn


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          compile_it: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = q.shape[1]
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s,
                                 device=str(q.device))
    if compile_it:
        attn = torch.compile(flex_attention)
        return lambda: attn(qt, kt, vt, block_mask=mask)

    def eager() -> torch.Tensor:  # the smoke run: tiny shapes, no compiler needed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(qt, kt, vt, block_mask=mask)
    return eager


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          config: Any = None) -> Callable[[], torch.Tensor]:
    import minikernels as mk
    from minikernels.ops.triton import flash_attn

    b, s, h, d = q.shape
    cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=q.device) * s
    qf, kf, vf = (t.view(b * s, h, d) for t in (q, k, v))
    if config is not None:  # the kernel directly, one tile config (sweep)
        return lambda: flash_attn.flash_attention(qf, kf, vf, cu_seqlens, cu_seqlens, s, s,
                                                  causal, 1 / math.sqrt(d), -1, 0.0, None,
                                                  config=config)[0]

    def fn() -> torch.Tensor:
        with mk.use_backend("triton"):
            return mk.ops.flash_attention(qf, kf, vf, cu_seqlens, cu_seqlens, s, s,
                                          causal=causal)
    return fn


def _time(fn: Callable[[], Any], device: torch.device, smoke: bool) -> float | None:
    try:
        fn()  # compile / first call outside the timing; unsupported backends raise here
    except Exception as exc:  # noqa: BLE001 - a peer missing on this machine is a result
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
              file=sys.stderr)
        return None
    if smoke:
        return time_fn(fn, warmup=0, rep=1, device=device)
    return time_fn(fn, warmup=5, rep=30, flush_l2=True, device=device)


def run_shape(d: int, s: int, tokens: int, causal: bool, device: torch.device, smoke: bool,
              matmul_flops: float) -> dict[str, Any]:
    b = max(1, tokens // s)
    h = 2 if smoke else max(1, 2048 // d)
    g = torch.Generator(device=device).manual_seed(s * 1000 + d)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    work = flops(b, s, h, d, causal)
    row: dict[str, Any] = {"head_dim": d, "causal": causal, "seqlen": s, "batch": b,
                           "heads": h}
    ours = _ours(q, k, v, causal)
    t = _time(ours, device, smoke)
    row["minikernels_ms"] = t * 1e3 if t else None
    row["minikernels_tflops"] = work / t / 1e12 if t else None
    for peer in PEERS:
        if peer == "flex_attention":
            fn = _flex(q, k, v, causal, compile_it=device.type == "cuda")
        else:
            fn = _sdpa(peer, q, k, v, causal)
        tp = _time(fn, device, smoke)
        row[f"{peer}_tflops"] = work / tp / 1e12 if tp else None
    peers = [row[f"{p}_tflops"] for p in PEERS[:3] if row[f"{p}_tflops"]]
    row["best_sdpa_tflops"] = max(peers) if peers else None
    row["vs_best_sdpa"] = (row["minikernels_tflops"] / row["best_sdpa_tflops"]
                           if peers and row["minikernels_tflops"] else None)
    row["frac_matmul_ceiling"] = (row["minikernels_tflops"] * 1e12 / matmul_flops
                                  if matmul_flops and row["minikernels_tflops"] else None)
    # correctness on the same inputs: SDPA flash on the GPU (efficient, then math, where
    # flash refuses the head dim: D > 256), math (fp32 inside) on the CPU
    row["max_abs_err"] = None
    for name in (("sdpa_flash", "sdpa_efficient", "sdpa_math") if device.type == "cuda"
                 else ("sdpa_math",)):
        try:
            row["max_abs_err"] = (ours().view(b, s, h, d).float() - _sdpa(
                name, q, k, v, causal)().transpose(1, 2).float()).abs().max().item()
            break
        except Exception:  # noqa: BLE001
            continue
    return row


def sweep(device: torch.device, tokens: int, seqlen: int,
          head_dims: tuple[int, ...] = (64, 128)) -> list[dict[str, Any]]:
    """Time every plausible tile config of the kernel (GPU tuning aid). Head dims over 256
    (Gemma 4's 512) try 16- to 64-row query tiles (64 rows spill there: flash_attn.py)."""
    from minikernels.ops.triton import flash_attn

    rows = []
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    for d in head_dims:
        for causal in (True, False):
            b, h = max(1, tokens // seqlen), max(1, 2048 // d)
            q, k, v = (torch.randn(b, seqlen, h, d, device=device, dtype=torch.bfloat16)
                       for _ in range(3))
            work = flops(b, seqlen, h, d, causal)
            for bm in ((64, 128) if d <= 256 else (16, 32, 64)):
                for bn in (32, 64, 128):
                    for warps in (4, 8):
                        for stages in (1, 2, 3, 4):
                            cfg = flash_attn.FlashConfig(bm, bn, warps, stages)
                            if flash_attn._smem_bytes(cfg, flash_attn.block_d(d), 2) > smem:
                                continue
                            t = _time(_ours(q, k, v, causal, cfg), device, False)
                            rows.append({"head_dim": d, "causal": causal, "seqlen": seqlen,
                                         "block_m": bm, "block_n": bn, "warps": warps,
                                         "stages": stages,
                                         "tflops": work / t / 1e12 if t else None})
                            print(rows[-1], flush=True)
    return rows


def _plot(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        keys = sorted({(r["head_dim"], r["causal"]) for r in rows})
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, (d, causal) in zip(axes[0], keys):
            sub = [r for r in rows if r["head_dim"] == d and r["causal"] == causal]
            xs = [r["seqlen"] for r in sub]
            for name in ("minikernels",) + PEERS:
                ys = [r.get(f"{name}_tflops") for r in sub]
                if any(y is not None for y in ys):
                    ax.plot(xs, [y if y is not None else float("nan") for y in ys],
                            marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"d={d} {'causal' if causal else 'full'}")
            ax.set_xlabel("seqlen (batch x seqlen = const)")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return plot


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU")
    parser.add_argument("--sweep", action="store_true", help="also time all tile configs")
    parser.add_argument("--result-dir", dest="out_dir", default=None,
                        help="output folder (default: bench/results/<device>; "
                             "$MINIKERNELS_BENCH_OUT overrides)")
    parser.add_argument("--out-dir", dest="out_dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help="batch x seqlen")
    parser.add_argument("--seqlens", type=int, nargs="*", default=None)
    parser.add_argument("--head-dims", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("needs a CUDA GPU (or --smoke for the CPU check)")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before minikernels imports triton
    device = torch.device("cuda" if cuda else "cpu")
    from minikernels import _validation

    with _validation.index_checks(False):  # as a serving engine runs it: no host syncs
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> dict[str, Path]:
    cuda = device.type == "cuda"
    tokens = args.tokens or (64 if args.smoke else 16384)
    seqlens = args.seqlens or ([32] if args.smoke else [512, 1024, 2048, 4096, 8192, 16384])
    head_dims = args.head_dims or ([64] if args.smoke else [64, 128])
    ceil = ceilings(device)
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for s in seqlens:
                print(f"d={d} causal={causal} seqlen={s}", file=sys.stderr, flush=True)
                rows.append(run_shape(d, s, tokens, causal, device, args.smoke,
                                      ceil["bf16_matmul_flops"]))
                print("   ", {k: v for k, v in rows[-1].items() if v is not None},
                      file=sys.stderr, flush=True)
    meta = {"tokens": tokens, "dtype": "bfloat16", "heads": "2048 / head_dim",
            "flops": "4*B*S*S*H*D, halved for causal", "ceilings": ceil,
            "smoke": args.smoke, "index_checks": False}
    columns = ["head_dim", "causal", "seqlen", "batch", "heads", "minikernels_ms",
               "minikernels_tflops", *(f"{p}_tflops" for p in PEERS), "vs_best_sdpa",
               "frac_matmul_ceiling", "max_abs_err"]
    paths = write_results("attention", rows, meta, columns=columns,
                          title=f"flash attention prefill ({device_name(device)})",
                          plot=_plot(rows), out_dir=args.out_dir)
    if args.sweep and cuda:
        srows = sweep(device, tokens, 4096, tuple(args.head_dims or (64, 128)))
        paths.update({f"sweep_{k}": v for k, v in write_results(
            "attention_sweep", srows, {"tokens": tokens, "seqlen": 4096},
            title="flash attention tile sweep", out_dir=args.out_dir).items()})
    for p in paths.values():
        print(p)
    return paths


if __name__ == "__main__":
    main()
