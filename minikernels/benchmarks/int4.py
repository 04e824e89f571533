"""int4 weight-only matmul benchmark: minikernels (Triton, CUDA) vs cuBLAS bf16 and tinygemm.

    python -m bench.bench_int4            # GPU: full sweep, writes bench/results/<gpu>/int4_matmul.*
    python -m bench.bench_int4 --smoke    # CPU: tiny shapes on reference/interpreter (CI check)

For each layer shape (K -> N) and M, every peer runs in the same process on the same
random inputs: cuBLAS bf16 (torch.matmul with the dense weight), torch._weight_int4pack_mm
(tinygemm, when available), minikernels Triton and minikernels CUDA (auto dispatch also
reported). Several weight copies (> 2x L2 together) are rotated so L2 does not flatter the
memory-bound cases. Reported: median microseconds, minimum bytes moved / time as a fraction
of the copy bandwidth measured in the same run, TFLOP/s as a fraction of measured bf16
matmul throughput, speed-up vs cuBLAS. Each kernel's output is checked against the
dequantize-then-matmul result before timing.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import plumbing as common

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 8192))  # (K, N)
GROUP = 128
SMOKE_M = (1, 3, 17)
SMOKE_SHAPES = ((64, 32), (128, 64))


def _int4_bytes(n: int, k: int, group: int) -> int:
    return n * k // 2 + 2 * 2 * n * (k // group)


def _tinygemm(w_dense: torch.Tensor, group: int):
    """(pack fn result, run fn) for torch._weight_int4pack_mm, or None if unavailable."""
    if not hasattr(torch, "_weight_int4pack_mm") or not w_dense.is_cuda:
        return None
    try:
        n, k = w_dense.shape
        w4 = __import__("minikernels").quant.quantize_int4(w_dense, group)
        q = w4.unpack().to(torch.int32)
        packed = torch._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        # tinygemm: W = (q - 8) * s + zero_point'  with scales_and_zeros [K/G, N, 2]
        s = w4.scales.float()
        zp = (8 - w4.zeros.float()) * s
        sz = torch.stack([s, zp], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x, packed, group, sz)
    except Exception as exc:  # noqa: BLE001 — an unsupported torch build just skips the peer
        print(f"tinygemm unavailable: {exc}")
        return None


def run(smoke: bool = False, out_dir: str | os.PathLike | None = None,
        m_values=None, shapes=None, copies: int | None = None) -> dict[str, Path]:
    import minikernels as mk

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16
    m_values = m_values or (SMOKE_M if smoke else M_VALUES)
    shapes = shapes or (SMOKE_SHAPES if smoke else SHAPES)
    group = 32 if smoke else GROUP
    ceil = common.ceilings(device)
    bw, flops_peak = ceil["copy_bytes_per_s"], ceil["bf16_matmul_flops"]
    l2 = 50 << 20
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for k, n in shapes:
        w_dense = (torch.randn(n, k, generator=gen) * 0.02).to(device, dtype)
        w4 = mk.quant.quantize_int4(w_dense, group)
        ncopy = copies or (1 if smoke else max(2, 2 * l2 // (n * k * 2) + 1))
        w4s = [mk.quant.Int4Weight(w4.qweight.clone(), w4.scales.clone(), w4.zeros.clone(),
                                   group) for _ in range(ncopy)]
        denses = [w_dense.clone() for _ in range(max(1, min(ncopy, 4)))]
        tiny = _tinygemm(w_dense, group)
        w_deq = w4.dequantize(dtype)
        for m in m_values:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            ref = (x.float() @ w_deq.float().t()).to(dtype)
            it = {"i": 0}

            def rotate(fn, pool):
                def call():
                    it["i"] = (it["i"] + 1) % len(pool)
                    return fn(pool[it["i"]])
                return call

            peers = {}
            if device.type == "cuda":
                peers["cublas_bf16"] = rotate(lambda w: x @ w.t(), denses)
                if tiny is not None:
                    peers["tinygemm"] = lambda: tiny(x)
            backends = ["triton", "cuda", "auto"] if device.type == "cuda" else ["reference",
                                                                                  "triton"]
            for b in backends:
                if b == "cuda" and (mk.backend.cuda_extension() is None or m > 16):
                    continue

                def mk_fn(b=b):
                    def f(w):
                        with mk.use_backend(b):
                            return mk.ops.int4_matmul(x, w.qweight, w.scales, w.zeros, group)
                    return f
                peers[f"mk_{b}"] = rotate(mk_fn(), w4s)
            flops = 2 * m * n * k
            min_bytes_int4 = _int4_bytes(n, k, group) + 2 * m * (k + n)
            min_bytes_dense = 2 * n * k + 2 * m * (k + n)
            times = {}
            for name, fn in peers.items():
                y = fn()
                err = (y.float() - ref.float()).abs().max().item()
                tol = 0.05 * ref.float().abs().max().item() + 1e-2
                ok = name == "tinygemm" or name == "cublas_bf16" or err <= tol
                t = common.time_fn(fn, warmup=2 if smoke else 10, rep=3 if smoke else 50,
                                   device=device)
                times[name] = t
                nbytes = min_bytes_dense if name == "cublas_bf16" else min_bytes_int4
                rows.append({
                    "shape": f"{k}->{n}", "M": m, "peer": name, "us": t * 1e6,
                    "bw_frac": (nbytes / t / bw) if bw else None,
                    "tflops": flops / t / 1e12,
                    "flops_frac": (flops / t / flops_peak) if flops_peak else None,
                    "max_err": err, "correct": ok})
            base = times.get("cublas_bf16")
            for r in rows:
                if r["shape"] == f"{k}->{n}" and r["M"] == m:
                    r["speedup_vs_cublas"] = (base / (r["us"] / 1e6)) if base else None
    meta = {"dtype": "bfloat16", "group_size": group, "smoke": smoke,
            "copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": flops_peak / 1e12,
            "weight_copies_rotated": "enough to exceed 2x a 50 MB L2"}
    columns = ["shape", "M", "peer", "us", "bw_frac", "tflops", "flops_frac",
               "speedup_vs_cublas", "max_err", "correct"]

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
        for ax, (k, n) in zip(axes[0], shapes):
            for peer in sorted({r["peer"] for r in rows}):
                pts = [(r["M"], r["us"]) for r in rows
                       if r["shape"] == f"{k}->{n}" and r["peer"] == peer]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=peer)
            ax.set(xscale="log", yscale="log", title=f"{k}->{n}", xlabel="M", ylabel="us")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return common.write_results("int4_matmul", rows, meta, columns=columns,
                                title="int4 weight-only matmul (W4A16, g%d)" % group,
                                plot=plot, out_dir=out_dir)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI check)")
    p.add_argument("--result-dir", dest="out_dir", default=None,
                   help="output folder (default: bench/results/<device>; "
                        "$MINIKERNELS_BENCH_OUT overrides)")
    p.add_argument("--out-dir", dest="out_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = run(smoke=args.smoke, out_dir=args.out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
