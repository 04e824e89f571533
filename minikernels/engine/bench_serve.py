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
GPU defaults: qwen2.5-0.5b (dummy weights), 256 requests, lengths 100..1024. CPU defaults
are downsized to finish in well under 2 minutes on 2 cores: "tiny", 16 requests, lengths
16..48.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from typing import Any

import torch

from .llm_engine import LLM
from .sampling_params import SamplingParams

Workload = list[tuple[list[int], int]]


def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int = 0) -> Workload:
    """nano-vllm's benchmark workload: (random prompt ids, output length) per request."""
    r = random.Random(seed)
    hi = min(vocab_size, 10000)
    return [([r.randrange(0, hi) for _ in range(r.randint(*input_len))], r.randint(*output_len))
            for _ in range(num_requests)]


def _params(max_tokens: int, temperature: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _sync(llm: LLM) -> None:
    if llm.llm_engine.device.type == "cuda":
        torch.cuda.synchronize(llm.llm_engine.device)


def run_offline(llm: LLM, workload: Workload, temperature: float = 0.6,
                tag: str = "off") -> dict[str, Any]:
    """All requests at once; returns throughput numbers."""
    eng = llm.llm_engine
    _sync(llm)
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(workload):
        eng.add_request(f"{tag}-{i}", prompt, _params(out_len, temperature))
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
                seed: int = 0, tag: str = "lat") -> dict[str, Any]:
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
            reqs.append(eng.add_request(f"{tag}-{nxt}", prompt, _params(out_len, temperature),
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    g = parser.add_argument_group("workload")
    g.add_argument("--model", default=None,
                   help="HF dir or built-in name (default: qwen2.5-0.5b on a GPU, tiny on CPU)")
    g.add_argument("--num-requests", type=int, default=256 if on_gpu else 16)
    g.add_argument("--min-input-len", type=int, default=100 if on_gpu else 16)
    g.add_argument("--max-input-len", type=int, default=1024 if on_gpu else 48)
    g.add_argument("--min-output-len", type=int, default=100 if on_gpu else 16)
    g.add_argument("--max-output-len", type=int, default=1024 if on_gpu else 48)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--request-rate", type=float, default=None,
                   help="latency phase arrival rate in req/s (default: half the offline rate)")
    g.add_argument("--latency-requests", type=int, default=None,
                   help="requests in the latency phase (default: --num-requests // 2)")
    g.add_argument("--decode-tokens", type=int, default=256 if on_gpu else 32)
    g.add_argument("--skip-latency", action="store_true")
    g.add_argument("--skip-decode", action="store_true")
    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on CPU")
    e.add_argument("--quantization", default=None, choices=[None, "int4", "gptq", "awq"])
    e.add_argument("--device", default=None)
    e.add_argument("--block-size", type=int, default=64)
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="auto = the model's dtype; fp8 = e4m3 KV cache")
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None,
                   help="default: max input + max output (a tight CUDA-graph block table)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=8192 if on_gpu else 1024)
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--output", default=None,
                        help="also write the JSON to this path (default: only "
                             "bench/results/<device>/serve.{json,md})")
    parser.add_argument("--no-save", action="store_true",
                        help="do not write bench/results/<device>/serve.*")


def _defaults(args: argparse.Namespace) -> tuple[str, str, str]:
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("qwen2.5-0.5b" if dev.startswith("cuda") else "tiny")
    dtype = args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    return dev, model, dtype


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def run(args: argparse.Namespace) -> int:
    from .. import benchmarking as bm

    dev, model, dtype = _defaults(args)
    for name in ("num_requests", "min_input_len", "min_output_len", "decode_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_input_len > args.max_input_len or args.min_output_len > args.max_output_len:
        raise SystemExit("min lengths must be <= max lengths")
    t_build = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=args.quantization, device=dev,
              block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              kv_cache_dtype=args.kv_cache_dtype,
              gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching,
              enforce_eager=args.enforce_eager, seed=args.seed,
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
    # Warm-up: lazy kernel compilation / first-call costs stay out of the timings.
    run_offline(llm, make_workload(2, (args.min_input_len, args.min_input_len),
                                   (4, 4), vocab, args.seed + 99), args.temperature, tag="warm")
    rows = []
    work = make_workload(args.num_requests, (args.min_input_len, args.max_input_len),
                         (args.min_output_len, args.max_output_len), vocab, args.seed)
    offline = run_offline(llm, work, args.temperature)
    rows.append(offline)
    if not args.skip_latency:
        n_lat = args.latency_requests or max(1, args.num_requests // 2)
        rate = args.request_rate or 0.5 * offline["requests_per_s"]
        lat_work = make_workload(n_lat, (args.min_input_len, args.max_input_len),
                                 (args.min_output_len, args.max_output_len), vocab,
                                 args.seed + 1)
        rows.append(run_latency(llm, lat_work, rate, args.temperature, args.seed))
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
            "cuda_graphs": eng.runner.graphs is not None,
            "prefix_caching": not args.no_prefix_caching,
            "input_len": [args.min_input_len, args.max_input_len],
            "output_len": [args.min_output_len, args.max_output_len],
            "seed": args.seed, "copy_bytes_per_s": copy_bw, "engine_build_s": build_s,
            "num_preemptions": stats["num_preemptions"],
            "weight_bytes": eng.model.weight_bytes(),
            "kv_bytes_per_token": eng.model.kv_bytes_per_token()}
    columns = ["phase", "requests", "seconds", "output_tok_s", "total_tok_s", "request_rate",
               "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "decode_tok_s",
               "fraction_of_floor"]
    print(f"minikernels bench serve: {model} ({dtype}) on {meta['device']}, "
          f"{eng.runner.num_blocks} KV blocks, graphs={meta['cuda_graphs']}")
    print(bm.markdown_table(rows, columns))
    if not args.no_save:
        paths = bm.write_results("serve", rows, meta, columns=columns,
                                 title="minikernels bench serve")
        print(f"wrote {paths['json']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"meta": {"environment": bm.environment(), **meta}, "rows": rows}, f,
                      indent=2, default=str)
        print(f"wrote {args.output}")
    eng.check_no_leaks()
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m minikernels.engine.bench_serve
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["add_arguments", "run", "make_workload", "run_offline", "run_latency",
           "run_decode_b1", "bandwidth_floor_tok_s", "statistics"]
