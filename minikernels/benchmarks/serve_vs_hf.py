"""Serving side by side: the minikernels engine vs HF transformers, same workload, same model.

    python bench/bench_serve.py                       # GPU: qwen2.5-0.5b bf16, nano-vllm workload
    python bench/bench_serve.py --model llama-3.2-1b --quantization int4
    python bench/bench_serve.py --smoke               # CPU: tiny model, a few requests

Rows (one per system and phase):
    minikernels   offline throughput (all requests at once), latency under a Poisson
                  request rate (TTFT/TPOT p50/p99), batch-1 decode tok/s and its fraction
                  of the bandwidth floor ((weight + KV bytes per token) / measured copy
                  bandwidth, plumbing.ceilings).
    hf-static     transformers generate() on static batches (left padded, sorted by
                  length, --hf-batch-size rows); useful output tokens only are counted.
                  TTFT = the batch's first-token time; TPOT = (batch time - TTFT) / steps.
    hf-cb         transformers' continuous batching (generate_batch) when this
                  transformers has it; errors are recorded, not fatal.
    hf-b1         transformers batch-1 decode tok/s (and fraction of the same floor).
Built-in names run on dummy weights in both systems (HF: the same architecture built from
the equivalent transformers config, random init), so speeds compare; outputs do not.
Writes serve_vs_hf.{json,md,png} under bench/results/<device> (or --result-dir).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from . import plumbing as common
from ..engine import LLM
from .serve import (make_workload, run_decode_b1, run_latency,
                                            run_offline)


# --------------------------------------------------------------------------- HF side
def hf_config_for(model: Any) -> Any:
    """The transformers config equivalent to a minikernels CausalLM's DecoderConfig."""
    import transformers

    c = model.config
    common_kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                     intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                     num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                     max_position_embeddings=c.max_position_embeddings,
                     rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                     rope_theta=c.rope_theta)
    arch = c.architecture
    if arch in ("gemma", "gemma2", "gemma3"):
        return _gemma_config(c, common_kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common_kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=c.head_dim, **common_kw)
    if arch == "mistral":
        return transformers.MistralConfig(head_dim=c.head_dim, **common_kw)
    return transformers.LlamaConfig(head_dim=c.head_dim, rope_scaling=c.rope_scaling,
                                    **common_kw)


def _gemma_config(c: Any, common_kw: dict[str, Any]) -> Any:
    import transformers

    kw = dict(common_kw, head_dim=c.head_dim, hidden_activation=c.hidden_act)
    if c.architecture == "gemma":
        kw["hidden_act"] = kw.pop("hidden_activation")
        return transformers.GemmaConfig(**kw)
    layer_types = ["sliding_attention" if c.is_sliding(i) else "full_attention"
                   for i in range(c.num_layers)]
    kw.update(query_pre_attn_scalar=round(c.softmax_scale ** -2), sliding_window=c.sliding_window,
              layer_types=layer_types, final_logit_softcapping=c.final_logit_softcapping)
    if c.architecture == "gemma2":
        return transformers.Gemma2Config(attn_logit_softcapping=c.attn_logit_softcapping,
                                         **kw)
    theta = kw.pop("rope_theta")
    kw["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": theta},
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": c.sliding_rope_theta or theta}}
    return transformers.Gemma3TextConfig(**kw)


def load_hf(model_name: str, mk_model: Any, dtype: torch.dtype, device: str) -> Any:
    import transformers

    if os.path.isdir(model_name):
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    else:
        cfg = hf_config_for(mk_model)
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return hf.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_static(hf: Any, workload: list, batch_size: int, temperature: float,
              device: str) -> dict[str, Any]:
    """Static batching with generate(): sorted by prompt length, left padded."""
    order = sorted(range(len(workload)), key=lambda i: len(workload[i][0]))
    pad = 0
    full_time = 0.0
    ttfts, tpots = [], []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        prompts = [workload[i][0] for i in idx]
        max_new = max(workload[i][1] for i in idx)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)
        kw = dict(do_sample=temperature > 0, temperature=temperature or None, top_p=None,
                  top_k=None, pad_token_id=pad, eos_token_id=None)
        _sync(device)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                    **kw)
        _sync(device)
        t1 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                    min_new_tokens=max_new, **kw)
        _sync(device)
        t2 = time.perf_counter()
        ttft = t1 - t0
        full_time += t2 - t1  # the full run only (the first-token probe is not counted)
        ttfts += [ttft * 1e3] * len(idx)
        tpots += [max(t2 - t1 - ttft, 0.0) / max(max_new - 1, 1) * 1e3] * len(idx)
    out_tokens = sum(o for _, o in workload)
    from .plumbing import percentile as _percentile
    return {"system": "hf-static", "phase": "offline", "requests": len(workload),
            "seconds": full_time, "output_tok_s": out_tokens / full_time,
            "ttft_p50_ms": _percentile(ttfts, 50), "ttft_p99_ms": _percentile(ttfts, 99),
            "tpot_p50_ms": _percentile(tpots, 50), "tpot_p99_ms": _percentile(tpots, 99)}


@torch.inference_mode()
def hf_continuous(hf: Any, workload: list, temperature: float, device: str) -> dict[str, Any]:
    """transformers' continuous batching (generate_batch), if this version has it."""
    from transformers import GenerationConfig

    if not hasattr(hf, "generate_batch"):
        return {"system": "hf-cb", "phase": "offline", "error": "no generate_batch"}
    max_new = max(o for _, o in workload)
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=temperature > 0,
                           temperature=temperature or None, eos_token_id=-1, pad_token_id=0,
                           num_blocks=2048, block_size=128, max_batch_tokens=8192)
    try:
        _sync(device)
        t0 = time.perf_counter()
        hf.generate_batch(inputs=[p for p, _ in workload], generation_config=cfg,
                          progress_bar=False)
        _sync(device)
        dt = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        return {"system": "hf-cb", "phase": "offline", "error": repr(exc)[:200]}
    # Every request ran to max_new tokens (no EOS): count those tokens.
    out_tokens = max_new * len(workload)
    return {"system": "hf-cb", "phase": "offline", "requests": len(workload), "seconds": dt,
            "output_tok_s": out_tokens / dt}


@torch.inference_mode()
def hf_decode_b1(hf: Any, prompt_len: int, n: int, device: str, floor_tok_s: float
                 ) -> dict[str, Any]:
    ids = torch.tensor([[(7 * i + 3) % 1000 for i in range(prompt_len)]], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    times = []
    for new in (1, n):
        _sync(device)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
    tok_s = (n - 1) / max(times[1] - times[0], 1e-9)
    return {"system": "hf-b1", "phase": "decode-b1", "requests": 1, "decode_tok_s": tok_s,
            "tpot_p50_ms": 1e3 / tok_s, "floor_tok_s": floor_tok_s,
            "fraction_of_floor": tok_s / floor_tok_s if floor_tok_s == floor_tok_s
            and floor_tok_s > 0 else None}


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, few requests")
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, nargs=2, default=None)
    p.add_argument("--output-len", type=int, nargs=2, default=None)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=None)
    p.add_argument("--hf-requests", type=int, default=None,
                   help="requests for the (slow) HF runs (default: all)")
    p.add_argument("--skip-hf-cb", action="store_true",
                   help="skip transformers continuous batching (skipped by default in --smoke)")
    p.add_argument("--hf-cb", action="store_true", help="run it even in --smoke")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--decode-tokens", type=int, default=None)
    common.add_result_arguments(p, "serve_vs_hf")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if gpu else "cpu"
    model = args.model or ("qwen2.5-0.5b" if gpu else "tiny")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    n = args.num_requests or (256 if gpu else 4)
    in_len = tuple(args.input_len or ((100, 1024) if gpu else (8, 16)))
    out_len = tuple(args.output_len or ((100, 1024) if gpu else (4, 8)))
    decode_tokens = args.decode_tokens or (256 if gpu else 8)
    llm = LLM(model, dtype=dtype, quantization=args.quantization, device=device,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens or (8192 if gpu else 256),
              enforce_eager=args.enforce_eager, seed=args.seed,
              num_kv_blocks=None if gpu else 64,
              max_model_len=-(-max(in_len[1] + out_len[1],
                                   min(128, in_len[1]) + decode_tokens) // 16) * 16)
    eng = llm.llm_engine
    work = make_workload(n, in_len, out_len, eng.vocab_size, args.seed)
    ceil = common.ceilings(device)
    copy_bw = ceil["copy_bytes_per_s"]

    rows: list[dict[str, Any]] = []
    run_offline(llm, make_workload(2, (in_len[0],) * 2, (4, 4), eng.vocab_size, 99), tag="w")
    off = run_offline(llm, work, args.temperature)
    rows.append({"system": "minikernels", **off})
    lat = run_latency(llm, make_workload(max(1, n // 2), in_len, out_len, eng.vocab_size,
                                         args.seed + 1),
                      0.5 * off["requests_per_s"], args.temperature, args.seed)
    rows.append({"system": "minikernels", **lat})
    b1 = run_decode_b1(llm, min(128, in_len[1]), decode_tokens, copy_bw)
    rows.append({"system": "minikernels", **b1})
    eng.check_no_leaks()

    hf_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                "float32": torch.float32}.get(dtype, torch.bfloat16)
    hf = load_hf(model, eng.model, hf_dtype, device)
    hf_work = work[:args.hf_requests] if args.hf_requests else work
    rows.append(hf_static(hf, hf_work, args.hf_batch_size or (64 if gpu else 4),
                          args.temperature, device))
    if not args.skip_hf_cb and (gpu or args.hf_cb):
        rows.append(hf_continuous(hf, hf_work, args.temperature, device))
    rows.append(hf_decode_b1(hf, min(128, in_len[1]), decode_tokens, device,
                             b1["floor_tok_s"]))
    best_hf = max((r.get("output_tok_s") or 0.0) for r in rows
                  if r["system"].startswith("hf") and r["phase"] == "offline")
    speedup = off["output_tok_s"] / best_hf if best_hf else None
    meta = {"model": model, "dtype": dtype, "quantization": args.quantization,
            "requests": n, "input_len": list(in_len), "output_len": list(out_len),
            "temperature": args.temperature, "seed": args.seed, "smoke": args.smoke,
            "ceilings": ceil, "speedup_vs_best_hf_offline": speedup,
            "targets": "qwen2.5-0.5b bf16 >= 30000 out tok/s and >= 5x transformers; "
                       "llama-3.2-1b int4 batch-1 decode >= 60% of its bandwidth floor",
            "kv_blocks": eng.runner.num_blocks, "cuda_graphs": eng.runner.graphs is not None}
    columns = ["system", "phase", "requests", "seconds", "output_tok_s", "request_rate",
               "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "decode_tok_s",
               "fraction_of_floor", "error"]
    print(common.markdown_table(rows, columns))
    print("speed-up vs best transformers offline: " +
          (f"{speedup:.2f}x" if speedup is not None else "n/a"))
    if device == "cpu":
        print(f"note: {common.CPU_NOTE}.")
    if not args.no_save:
        paths = common.write_results("serve_vs_hf", rows, meta, columns=columns,
                                     title="Serving: minikernels vs transformers",
                                     out_dir=args.result_dir,
                                     plot=lambda path: plot_vs_hf(rows, path))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.output_json:
        common.write_json(args.output_json, rows, meta)
        print(f"wrote {args.output_json}")
    return 0


def plot_vs_hf(rows: list[dict[str, Any]], path: Any) -> None:
    """Offline output tok/s and batch-1 decode tok/s per system."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    off = [r for r in rows if r["phase"] == "offline" and r.get("output_tok_s")]
    ax1.bar([r["system"] for r in off], [r["output_tok_s"] for r in off], color="tab:blue")
    ax1.set_ylabel("offline output tok/s")
    b1 = [r for r in rows if r["phase"] == "decode-b1" and r.get("decode_tok_s")]
    ax2.bar([r["system"] for r in b1], [r["decode_tok_s"] for r in b1], color="tab:green")
    ax2.set_ylabel("batch-1 decode tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
