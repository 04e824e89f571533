"""Speculative decoding (n-gram): target forwards per generated token, CPU.

The target is the built-in "tiny" decoder (its forward, paged KV and attention run for
real) whose logits are replaced by a script: the token at position p + 1 of a planned
output, so the workload decides how much the output repeats its context. Batch 1 (one
request at a time): each engine step is one target forward. Workloads:

- code-edit: the output re-emits the prompt (a 200-token "file") with one token changed
  every 25;
- copy (summarisation-like): the output is spans of 8..32 tokens copied from random
  places in a 300-token prompt;
- free-text: the output is random tokens (repeats only by chance).

Forwards per token without speculation is 1 by construction (checked). Writes
bench/results/cpu/spec_decode.{json,md,png}.

    python bench/bench_spec_decode.py [--k 4] [--tokens 128] [--requests 4]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from minikernels.engine import LLM, SamplingParams
from minikernels.models.loader import load_model

VOCAB_LO = 3


class ScriptedTarget(torch.nn.Module):
    """A real decoder forward whose logits are overridden: position p predicts script[p+1]."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.script: list[int] = []

    @property
    def device(self):
        return self.inner.device

    def allocate_kv_caches(self, *a, **kw):
        return self.inner.allocate_kv_caches(*a, **kw)

    def kv_bytes_per_token(self, *a, **kw):
        return self.inner.kv_bytes_per_token(*a, **kw)

    def forward(self, input_ids, meta, kv_caches):
        logits = self.inner(input_ids, meta, kv_caches)
        pos = meta.positions if meta.logits_indices is None else \
            meta.positions.index_select(0, meta.logits_indices)
        nxt = torch.tensor(self.script, device=logits.device)[(pos + 1).clamp_max(
            len(self.script) - 1)]
        out = torch.full_like(logits, -10.0)
        out.scatter_(1, nxt[:, None], 10.0)
        return out


def workload(name: str, n_out: int, r: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    tok = lambda: r.randrange(VOCAB_LO, vocab)  # noqa: E731
    if name == "code-edit":
        prompt = [tok() for _ in range(200)]
        out = [tok() if i % 25 == 24 else prompt[i % len(prompt)] for i in range(n_out)]
    elif name == "copy":
        prompt = [tok() for _ in range(300)]
        out = []
        while len(out) < n_out:
            s = r.randrange(0, 268)
            out += prompt[s:s + r.randrange(8, 33)]
        out = out[:n_out]
    else:
        prompt = [tok() for _ in range(200)]
        out = [tok() for _ in range(n_out)]
    return prompt, out


def run(args) -> dict:
    inner = load_model("tiny", dtype="float32", device="cpu")
    vocab = int(inner.config.vocab_size)
    results = {}
    for wl in ("code-edit", "copy", "free-text"):
        r = random.Random(0)
        cases = [workload(wl, args.tokens, r, vocab) for _ in range(args.requests)]
        row = {}
        for label, spec in (("off", None), ("ngram", {
                "method": "ngram", "num_speculative_tokens": args.k,
                "prompt_lookup_min": 1, "prompt_lookup_max": 4})):
            model = ScriptedTarget(inner)
            llm = LLM(model, tokenizer=None, num_kv_blocks=64, block_size=16,
                      speculative_config=spec)
            eng = llm.llm_engine
            steps = gen = 0
            t0 = time.perf_counter()
            for prompt, out in cases:
                model.script = prompt + out
                s0, g0 = eng.num_steps, eng.generation_tokens_total
                res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=len(out),
                                                            ignore_eos=True), use_tqdm=False)
                assert res[0].outputs[0].token_ids == out, "scripted output not reproduced"
                steps += eng.num_steps - s0
                gen += eng.generation_tokens_total - g0
            st = llm.stats()
            row[label] = {"forwards": steps, "tokens": gen, "forwards_per_token": steps / gen,
                          "draft_tokens": st["spec_num_draft_tokens"],
                          "accepted_tokens": st["spec_num_accepted_tokens"],
                          "mean_acceptance_length": st["spec_mean_acceptance_length"],
                          "wall_s": time.perf_counter() - t0}
        row["reduction"] = row["off"]["forwards_per_token"] / row["ngram"]["forwards_per_token"]
        results[wl] = row
        print(f"{wl:10s} off {row['off']['forwards_per_token']:.3f} fwd/tok  ngram "
              f"{row['ngram']['forwards_per_token']:.3f} fwd/tok  ({row['reduction']:.2f}x fewer; "
              f"mean acceptance length {row['ngram']['mean_acceptance_length']:.2f})")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"k": args.k, "tokens": args.tokens, "requests": args.requests, "batch": 1,
            "target": "tiny (scripted logits)", "prompt_lookup": [1, 4]}
    (out / "spec_decode.json").write_text(json.dumps({"config": meta, "results": res},
                                                     indent=2))
    lines = ["# Speculative decoding (n-gram): target forwards per generated token", "",
             f"CPU, batch 1, k = {args.k}, prompt lookup 1..4, {args.requests} requests x "
             f"{args.tokens} tokens per workload (python bench/bench_spec_decode.py).", "",
             "| workload | fwd/token off | fwd/token ngram | reduction | mean acceptance length |",
             "|---|---|---|---|---|"]
    for wl, row in res.items():
        lines.append(f"| {wl} | {row['off']['forwards_per_token']:.3f} | "
                     f"{row['ngram']['forwards_per_token']:.3f} | {row['reduction']:.2f}x | "
                     f"{row['ngram']['mean_acceptance_length']:.2f} |")
    (out / "spec_decode.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(res)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [res[n]["off"]["forwards_per_token"] for n in names],
               0.4, label="no speculation")
        ax.bar([i + 0.2 for i in x], [res[n]["ngram"]["forwards_per_token"] for n in names],
               0.4, label=f"n-gram, k={args.k}")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("target forwards / token")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "spec_decode.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out}/spec_decode.json, .md, .png")


if __name__ == "__main__":
    main()
