"""transformers with minikernels: SDPA vs minikernels attention vs kernelized vs kernelized + int4.

    python -m bench.bench_hf                  # GPU: qwen2.5-0.5b shape, bf16, random weights
    python -m bench.bench_hf --model PATH     # a HF checkpoint directory instead
    python -m bench.bench_hf --smoke          # tiny model on the CPU (CI check)

One model, four variants in the same process (each a copy of the same weights):
``sdpa`` (transformers' attn_implementation="sdpa"), ``mk_attention``
(attn_implementation="minikernels"), ``kernelized`` (+ ``minikernels.hf.kernelize``: fused
RMSNorm / residual add / gate_up + silu_and_mul) and ``kernelized_int4`` (+ RTN int4
Linears, group 128; lm_head dense). For batch 1 and 32: prefill tokens/s (one forward over
``prompt`` tokens per row, no cache) and decode tokens/s (``steps`` one-token forwards over a
DynamicCache holding the prompt, eager; the cache is cropped back between repetitions).
Every variant's prefill logits are compared with SDPA's (max abs error; int4 is expected to
differ) and the greedy next tokens counted as agreeing or not. Results:
bench/results/<device>/hf.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch

from bench.common import device_name, time_fn, write_results

# qwen2.5-0.5b's shape (random weights: no download)
GPU_CONFIG = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE_CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
VARIANTS = ("sdpa", "mk_attention", "kernelized", "kernelized_int4")


def build_base(model_path: str | None, smoke: bool, dtype: torch.dtype,
               device: str) -> torch.nn.Module:
    import transformers

    if model_path:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        config = transformers.Qwen2Config(**(SMOKE_CONFIG if smoke else GPU_CONFIG))
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_variant(base: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    import minikernels.hf as mkhf

    if name == "sdpa":
        model = base
        model.set_attn_implementation("sdpa")
        return model, ""
    model = copy.deepcopy(base)
    model.set_attn_implementation("minikernels")
    summary = ""
    if name.startswith("kernelized"):
        summary = str(mkhf.kernelize(model, quantize="int4" if name.endswith("int4") else None))
    return model, summary


def bench_variant(model: torch.nn.Module, batch: int, prompt: int, steps: int, vocab: int,
                  device: str, smoke: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g).to(device)
    warm, rep = (1, 2) if smoke else (3, 10)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, -1].float()
        t_prefill = time_fn(lambda: model(ids, use_cache=False), warmup=warm, rep=rep,
                            device=device)
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        tok = logits.argmax(-1, keepdim=True)

        def decode() -> None:
            t = tok
            for _ in range(steps):
                out = model(t, cache=cache, use_cache=True)
                t = out.logits[:, -1:].argmax(-1)
            cache.crop(-steps)   # back to the prompt

        t_decode = time_fn(decode, warmup=warm, rep=rep, device=device)
    return dict(logits=logits, prefill_s=t_prefill, decode_s=t_decode)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("tokens_per_s")]
    groups = sorted({(r["phase"], r["batch"]) for r in timed})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        ys = [next((r["speedup_vs_sdpa"] for r in timed if (r["phase"], r["batch"]) == grp
                    and r["variant"] == v), 0.0) or 0.0 for grp in groups]
        ax.bar([x + i * width for x in range(len(groups))], ys, width, label=v)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{p} b{b}" for p, b in groups])
    ax.set_ylabel("tokens/s relative to sdpa")
    ax.set_title("transformers + minikernels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--model", default=None, help="HF checkpoint directory")
    parser.add_argument("--batches", type=int, nargs="*")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = args.batches or ((1, 4) if args.smoke else (1, 32))
    prompt = args.prompt or (16 if args.smoke else 512)
    steps = args.steps or (2 if args.smoke else 32)
    base = build_base(args.model, args.smoke, dtype, device)
    vocab = base.config.vocab_size
    results: dict[tuple[str, int], dict[str, Any]] = {}
    summaries: dict[str, str] = {}
    # sdpa last: the other variants are copies of the base model
    for name in [v for v in args.variants if v != "sdpa"] + (
            ["sdpa"] if "sdpa" in args.variants else []):
        model, summary = make_variant(base, name)
        summaries[name] = summary
        for b in batches:
            results[(name, b)] = bench_variant(model, b, prompt, steps, vocab, device,
                                               args.smoke)
            r = results[(name, b)]
            print(f"{name} batch {b}: prefill {b * prompt / r['prefill_s']:.0f} tok/s, "
                  f"decode {b * steps / r['decode_s']:.1f} tok/s", flush=True)
        if model is not base:
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    rows: list[dict[str, Any]] = []
    for (name, b), r in results.items():
        ref = results.get(("sdpa", b))
        err = agree = None
        if ref is not None:
            err = float((r["logits"] - ref["logits"]).abs().max())
            agree = f"{int((r['logits'].argmax(-1) == ref['logits'].argmax(-1)).sum())}/{b}"
        for phase, seconds, tokens in (("prefill", r["prefill_s"], b * prompt),
                                       ("decode", r["decode_s"], b * steps)):
            base_s = (ref["prefill_s"] if phase == "prefill" else ref["decode_s"]) if ref \
                else None
            rows.append(dict(variant=name, batch=b, phase=phase, ms=seconds * 1e3,
                             tokens_per_s=tokens / seconds,
                             speedup_vs_sdpa=(base_s / seconds) if base_s else None,
                             max_abs_err_logits=err, next_token_agree=agree))
    rows.sort(key=lambda r: (r["phase"], r["batch"], VARIANTS.index(r["variant"])))
    meta = dict(model=args.model or ("qwen2 tiny (smoke)" if args.smoke
                                     else "qwen2.5-0.5b shape, random weights"),
                dtype=str(dtype).replace("torch.", ""), device=device_name(device),
                prompt=prompt, decode_steps=steps, smoke=args.smoke,
                kernelize={k: v for k, v in summaries.items() if v},
                timing="prefill: one forward, no cache; decode: steps one-token forwards "
                       "over a DynamicCache holding the prompt (eager, no CUDA graphs)")
    columns = ["phase", "batch", "variant", "tokens_per_s", "ms", "speedup_vs_sdpa",
               "max_abs_err_logits", "next_token_agree"]
    return write_results("hf", rows, meta, columns=columns,
                         title="transformers + minikernels (attention, kernelize, int4)",
                         plot=lambda p: _plot(rows, p), out_dir=out_dir or args.out_dir)


if __name__ == "__main__":
    main()
