"""``minikernels bench serve``: end-to-end serving throughput and latency of the engine.

Phases (each reported as one row of the table and of the JSON):
    offline   the nano-vllm workload: N requests, random prompt ids, prompt and output
              lengths uniform in [min, max] (fixed seed), ignore_eos, temperature 0.6;
              all submitted at once -> output tok/s and total tok/s.
    latency   the same kind of requests arriving as a Poisson process at --request-rate
              (default: half the offline request throughput, i.e. ~50% load) ->
              TTFT and TPOT p50/p99, achieved output tok/s.
    decode-b1 one request alone -> decode tok/s, and on a GPU its fraction of the
              bandwidth floor (weight bytes + KV bytes per token over measured copy
              bandwidth).
--num-loras N: N random PEFT adapters of rank --max-lora-rank on every projection (the
experts too; benchmarks/lora_adapters.py), request i of the offline and latency phases
through adapter i % N (vLLM's benchmark with --enable-lora: every request adapted).
GPU defaults: qwen2.5-0.5b (dummy weights), 256 requests, lengths 100..1024. CPU defaults
are downsized to finish in well under 2 minutes on 2 cores: "tiny", 16 requests, lengths
16..48, and the offline phase runs 3 times (--repeat) so the table shows the spread that
machine load causes. Writes serve.{json,md,png} (see --result-dir).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the engine load when a benchmark runs, not for --help
    from ..engine.llm_engine import LLM
    from ..engine.sampling_params import SamplingParams

Workload = list[tuple[list[int], int]]


def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int = 0) -> Workload:
    """nano-vllm's benchmark workload: (random prompt ids, output length) per request."""
    r = random.Random(seed)
    hi = min(vocab_size, 10000)
    return [([r.randrange(0, hi) for _ in range(r.randint(*input_len))], r.randint(*output_len))
            for _ in range(num_requests)]


def _params(max_tokens: int, temperature: float, lora: Any = None) -> SamplingParams:
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                          lora_request=lora)


def _lora(loras: list | None, i: int) -> Any:
    """Request i's LoRARequest (round robin over ``loras``), None without adapters."""
    return loras[i % len(loras)] if loras else None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _sync(llm: LLM) -> None:
    import torch

    if llm.llm_engine.device.type == "cuda":
        torch.cuda.synchronize(llm.llm_engine.device)


def run_offline(llm: LLM, workload: Workload, temperature: float = 0.6,
                tag: str = "off", loras: list | None = None) -> dict[str, Any]:
    """All requests at once (request i through ``loras[i % len]`` if given); returns
    throughput numbers."""
    eng = llm.llm_engine
    _sync(llm)
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(workload):
        eng.add_request(f"{tag}-{i}", prompt, _params(out_len, temperature, _lora(loras, i)))
    done = 0
    while done < len(workload):
        done += sum(1 for r in eng.step() if r.finished)
    _sync(llm)
    dt = time.perf_counter() - t0
    out_tokens = sum(o for _, o in workload)
    in_tokens = sum(len(p) for p, _ in workload)
    return {"phase": "offline", "requests": len(workload), "seconds": dt,
            "output_tok_s": out_tokens / dt, "total_tok_s": (in_tokens + out_tokens) / dt,
            "requests_per_s": len(workload) / dt, "input_tokens": in_tokens,
            "output_tokens": out_tokens}


def run_latency(llm: LLM, workload: Workload, request_rate: float, temperature: float = 0.6,
                seed: int = 0, tag: str = "lat", loras: list | None = None) -> dict[str, Any]:
    """Poisson arrivals at request_rate (req/s); TTFT and TPOT percentiles (ms)."""
    eng = llm.llm_engine
    r = random.Random(seed + 1)
    t = 0.0
    arrivals = []
    for _ in workload:
        t += r.expovariate(request_rate)
        arrivals.append(t)
    start = time.perf_counter()
    nxt = 0
    reqs = []
    finished = 0
    while finished < len(workload):
        now = time.perf_counter() - start
        while nxt < len(workload) and arrivals[nxt] <= now:
            prompt, out_len = workload[nxt]
            reqs.append(eng.add_request(f"{tag}-{nxt}", prompt,
                                        _params(out_len, temperature, _lora(loras, nxt)),
                                        arrival_time=start + arrivals[nxt]))
            nxt += 1
        if eng.has_unfinished():
            finished += sum(1 for q in eng.step() if q.finished)
        elif nxt < len(workload):
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
    dt = time.perf_counter() - start
    ttft = [(q.first_token_time - q.arrival_time) * 1e3 for q in reqs]
    tpot = [(q.finish_time - q.first_token_time) * 1e3 / (q.seqs[0].num_output_tokens - 1)
            for q in reqs if q.seqs[0].num_output_tokens > 1]
    out_tokens = sum(o for _, o in workload)
    return {"phase": "latency", "requests": len(workload), "request_rate": request_rate,
            "seconds": dt, "output_tok_s": out_tokens / dt,
            "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
            "tpot_p50_ms": _percentile(tpot, 50), "tpot_p99_ms": _percentile(tpot, 99)}


def bandwidth_floor_tok_s(llm: LLM, context: int, copy_bytes_per_s: float) -> float:
    """Batch-1 decode tokens/s if every step only streamed weights + the KV context."""
    model = llm.llm_engine.model
    step_bytes = model.weight_bytes() + model.kv_bytes_per_token() * context
    return copy_bytes_per_s / step_bytes if copy_bytes_per_s > 0 else float("nan")


def run_decode_b1(llm: LLM, prompt_len: int, num_tokens: int,
                  copy_bytes_per_s: float = 0.0, tag: str = "b1") -> dict[str, Any]:
    """One request alone: decode tok/s after the first token (and % of the floor)."""
    eng = llm.llm_engine
    vocab = min(eng.vocab_size, 10000)
    prompt = [(7 * i + 3) % vocab for i in range(prompt_len)]
    req = eng.add_request(tag, prompt, _params(num_tokens, 0.0))
    while not req.finished:
        eng.step()
    n = req.seqs[0].num_output_tokens
    decode_s = req.finish_time - req.first_token_time
    tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    floor = bandwidth_floor_tok_s(llm, prompt_len + num_tokens // 2, copy_bytes_per_s)
    return {"phase": "decode-b1", "requests": 1, "prompt_len": prompt_len,
            "output_tokens": n, "decode_tok_s": tok_s,
            "tpot_p50_ms": 1e3 / tok_s if tok_s == tok_s else float("nan"),
            "floor_tok_s": floor,
            "fraction_of_floor": tok_s / floor if floor == floor and floor > 0 else None}


# ---------------------------------------------------------------------------- CLI
# (GPU default, CPU default) of the options whose default depends on the device.
DEVICE_DEFAULTS = {"model": ("qwen2.5-0.5b", "tiny"), "dtype": ("bfloat16", "float32"),
                   "num_requests": (256, 16), "min_input_len": (100, 16),
                   "max_input_len": (1024, 48), "min_output_len": (100, 16),
                   "max_output_len": (1024, 48), "decode_tokens": (256, 32),
                   "max_num_batched_tokens": (8192, 1024), "repeat": (1, 3)}


def _by_device(name: str) -> str:
    gpu, cpu = DEVICE_DEFAULTS[name]
    return f"default: {gpu} on a GPU, {cpu} on CPU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``minikernels bench serve``'s arguments (vLLM's names; defaults by device at run)."""
    from . import plumbing as bm

    hidden = argparse.SUPPRESS
    g = parser.add_argument_group("workload")
    g.add_argument("--model", default=None,
                   help=f"hub id, HF dir or built-in name ({_by_device('model')})")
    g.add_argument("--num-prompts", dest="num_requests", type=int, default=None,
                   help=f"requests in the offline phase ({_by_device('num_requests')})")
    g.add_argument("--num-requests", dest="num_requests", type=int, help=hidden)
    for name in ("min_input_len", "max_input_len", "min_output_len", "max_output_len"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"tokens ({_by_device(name)})")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    g.add_argument("--seed", type=int, default=0, help="workload and dummy-weight seed")
    g.add_argument("--request-rate", type=float, default=None,
                   help="latency phase arrival rate in req/s (default: half the offline rate)")
    g.add_argument("--latency-requests", type=int, default=None,
                   help="requests in the latency phase (default: --num-prompts // 2)")
    g.add_argument("--decode-tokens", type=int, default=None,
                   help=f"batch-1 decode length ({_by_device('decode_tokens')})")
    g.add_argument("--repeat", type=int, default=None,
                   help="runs of the offline phase; the table shows their median and "
                        f"spread ({_by_device('repeat')})")
    g.add_argument("--skip-latency", action="store_true", help="no latency phase")
    g.add_argument("--skip-decode", action="store_true", help="no batch-1 decode phase")
    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"],
                   help=_by_device("dtype"))
    e.add_argument("--quantization", default=None,
                   choices=["int4", "gptq", "awq", "fp8", "fp8_w8a8", "int8", "mxfp4", "dense"],
                   help="int4 / fp8: RTN-quantize at load (fp8_w8a8: fp8 run W8A8); gptq / "
                        "awq: an int4 checkpoint (default: none)")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    e.add_argument("--block-size", type=int, default=64, help="KV block size in tokens")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="auto = the model's dtype; fp8 = e4m3 KV cache")
    e.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: sized from memory)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="default: max input + max output (a tight CUDA-graph block table)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights + KV pool")
    e.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per step at most ({_by_device('max_num_batched_tokens')})")
    e.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV blocks of shared prompt prefixes (default: on)")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help=hidden)
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="one block table for all layers (models with sliding-window layers "
                        "otherwise get hybrid KV pools: docs/engine.md)")
    e.add_argument("--num-loras", type=int, default=0,
                   help="serve this many random LoRA adapters (every projection, the experts "
                        "too), request i through adapter i %% N (default: 0, no LoRA)")
    e.add_argument("--max-lora-rank", type=int, default=16,
                   help="rank of the --num-loras adapters (default: 16)")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many GPUs / processes (docs/parallel.md)")
    bm.add_result_arguments(parser, "serve")


def _defaults(args: argparse.Namespace) -> tuple[str, str, str]:
    """Fill the device-dependent defaults into ``args``; returns (device, model, dtype)."""
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    col = 0 if dev.startswith("cuda") else 1
    for name, pair in DEVICE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, pair[col])
    return dev, args.model, args.dtype


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def run(args: argparse.Namespace) -> int:
    from ..engine.llm_engine import LLM
    from . import plumbing as bm

    dev, model, dtype = _defaults(args)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    for name in ("num_requests", "min_input_len", "min_output_len", "decode_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_input_len > args.max_input_len or args.min_output_len > args.max_output_len:
        raise SystemExit("min lengths must be <= max lengths")
    if args.num_loras < 0 or args.max_lora_rank < 1:
        raise SystemExit("--num-loras must be >= 0 and --max-lora-rank >= 1")
    lora_kw = ({"enable_lora": True, "max_loras": args.num_loras,
                "max_lora_rank": args.max_lora_rank} if args.num_loras else {})
    t_build = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=args.quantization, device=dev, **lora_kw,
              block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              kv_cache_dtype=args.kv_cache_dtype,
              gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=args.enable_prefix_caching,
              enforce_eager=args.enforce_eager, seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size,
              disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager,
              max_model_len=args.max_model_len or _round_up(
                  max(args.max_input_len + args.max_output_len,
                      min(128, args.max_input_len) + args.decode_tokens), args.block_size))
    build_s = time.perf_counter() - t_build
    eng = llm.llm_engine
    need = args.max_input_len + args.max_output_len
    if need > llm.max_model_len:
        raise SystemExit(f"max input + output ({need}) exceeds max_model_len "
                         f"({llm.max_model_len}); lower the lengths or raise the KV pool")
    vocab = eng.vocab_size
    loras = _random_loras(eng, args) if args.num_loras else None
    # Warm-up: lazy kernel compilation / first-call costs (and the adapters' first load)
    # stay out of the timings.
    run_offline(llm, make_workload(max(2, args.num_loras), (args.min_input_len,
                                                            args.min_input_len),
                                   (4, 4), vocab, args.seed + 99), args.temperature, tag="warm",
                loras=loras)
    rows = []
    work = make_workload(args.num_requests, (args.min_input_len, args.max_input_len),
                         (args.min_output_len, args.max_output_len), vocab, args.seed)
    runs = [run_offline(llm, work, args.temperature, tag=f"off{i}", loras=loras)
            for i in range(args.repeat)]
    offline = dict(runs[0])
    rates = sorted(r["output_tok_s"] for r in runs)
    for key in ("seconds", "output_tok_s", "total_tok_s", "requests_per_s"):
        offline[key] = statistics.median(r[key] for r in runs)
    offline.update(runs=len(runs), output_tok_s_min=rates[0], output_tok_s_max=rates[-1],
                   spread=(rates[-1] - rates[0]) / offline["output_tok_s"])
    rows.append(offline)
    if not args.skip_latency:
        n_lat = args.latency_requests or max(1, args.num_requests // 2)
        rate = args.request_rate or 0.5 * offline["requests_per_s"]
        lat_work = make_workload(n_lat, (args.min_input_len, args.max_input_len),
                                 (args.min_output_len, args.max_output_len), vocab,
                                 args.seed + 1)
        rows.append(run_latency(llm, lat_work, rate, args.temperature, args.seed,
                                loras=loras))
    copy_bw = bm.ceilings(dev)["copy_bytes_per_s"] if dev.startswith("cuda") else 0.0
    if not args.skip_decode:
        rows.append(run_decode_b1(llm, min(128, args.max_input_len), args.decode_tokens,
                                  copy_bw))
    stats = eng.stats()
    meta = {"model": model, "dtype": dtype, "quantization": args.quantization,
            "device": bm.device_name(dev), "num_kv_blocks": eng.runner.num_blocks,
            "block_size": args.block_size, "kv_cache_dtype": args.kv_cache_dtype,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "tensor_parallel_size": args.tensor_parallel_size,
            "num_loras": args.num_loras,
            "max_lora_rank": args.max_lora_rank if args.num_loras else None,
            "cuda_graphs": eng.runner.graphs is not None,
            "prefix_caching": args.enable_prefix_caching, "offline_runs": args.repeat,
            "input_len": [args.min_input_len, args.max_input_len],
            "output_len": [args.min_output_len, args.max_output_len],
            "seed": args.seed, "copy_bytes_per_s": copy_bw, "engine_build_s": build_s,
            "num_preemptions": stats["num_preemptions"],
            "weight_bytes": eng.model.weight_bytes(),
            "kv_bytes_per_token": eng.model.kv_bytes_per_token()}
    columns = ["phase", "requests", "seconds", "output_tok_s", "spread", "total_tok_s",
               "request_rate", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
               "decode_tok_s", "fraction_of_floor"]
    lora_note = (f", {args.num_loras} LoRA adapters of rank {args.max_lora_rank}"
                 if args.num_loras else "")
    print(f"minikernels bench serve: {model} ({dtype}) on {meta['device']}, "
          f"{eng.runner.num_blocks} KV blocks, graphs={meta['cuda_graphs']}{lora_note}")
    print(bm.markdown_table(rows, columns))
    if args.repeat > 1:
        print(f"offline: median of {args.repeat} runs; spread = (max - min) / median = "
              f"{offline['spread']:.0%} (output tok/s {offline['output_tok_s_min']:.1f} .. "
              f"{offline['output_tok_s_max']:.1f})")
    if not dev.startswith("cuda"):
        print(f"note: {bm.CPU_NOTE}.")
    if not args.no_save:
        paths = bm.write_results("serve", rows, meta, columns=columns,
                                 title="minikernels bench serve", out_dir=args.result_dir,
                                 plot=lambda path: plot_serve(rows, meta, path))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.output_json:
        bm.write_json(args.output_json, rows, meta)
        print(f"wrote {args.output_json}")
    eng.check_no_leaks()
    return 0


def _random_loras(eng: Any, args: argparse.Namespace) -> list:
    """--num-loras random adapters for the served model, written to a temporary directory
    (removed at exit); their LoRARequests."""
    import atexit
    import shutil
    import tempfile

    from ..engine.lora import LoRARequest
    from .lora_adapters import write_random_adapter

    root = tempfile.mkdtemp(prefix="mk-bench-lora-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return [LoRARequest(f"lora{i}", i + 1, write_random_adapter(
                eng.config, os.path.join(root, f"lora{i}"), args.max_lora_rank,
                seed=args.seed + i)) for i in range(args.num_loras)]


def plot_serve(rows: list[dict[str, Any]], meta: dict[str, Any], path: Any) -> None:
    """Throughput by phase (offline: min..max of its runs) and latency percentiles."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tput = [r for r in rows if r.get("output_tok_s") or r.get("decode_tok_s")]
    vals = [r.get("output_tok_s") or r.get("decode_tok_s") for r in tput]
    lo = [v - r.get("output_tok_s_min", v) for v, r in zip(vals, tput)]
    hi = [r.get("output_tok_s_max", v) - v for v, r in zip(vals, tput)]
    ax1.bar([r["phase"] for r in tput], vals, yerr=[lo, hi], capsize=4, color="tab:blue")
    ax1.set_ylabel("output tok/s (decode-b1: decode tok/s)")
    ax1.set_title(f"{meta['model']} ({meta['dtype']}) on {meta['device']}")
    lat = next((r for r in rows if r["phase"] == "latency"), None)
    if lat:
        keys = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
        ax2.bar([k.replace("_ms", "") for k in keys], [lat[k] for k in keys],
                color=["tab:orange", "tab:orange", "tab:green", "tab:green"])
        ax2.set_ylabel("ms")
        ax2.set_title(f"latency at {lat['request_rate']:.2f} req/s (Poisson)")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:  # python -m minikernels.benchmarks.serve
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["add_arguments", "run", "make_workload", "run_offline", "run_latency",
           "run_decode_b1", "bandwidth_floor_tok_s", "plot_serve"]
