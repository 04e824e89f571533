"""Speculative decoding (n-gram, draft model): target forwards per generated token, CPU.

The target is the built-in "tiny" decoder (its forward, paged KV and attention run for
real) whose logits are replaced by a script: the token at position p + 1 of a planned
output, so the workload decides how much the output repeats its context. Batch 1 (one
request at a time): each engine step is one target forward. Workloads:

- code-edit: the output re-emits the prompt (a 200-token "file") with one token changed
  every 25;
- copy (summarisation-like): the output is spans of 8..32 tokens copied from random
  places in a 300-token prompt;
- free-text: the output is random tokens (repeats only by chance).

Methods: off, n-gram (prompt lookup 1..4), and draft_model with a scripted draft: the
built-in "tiny" decoder run for real as the draft (its own paged KV pool, catch-up,
k batched draft steps, rollback) whose logits predict the planned token with
probability ``a`` per position (independently; else a wrong token), for each
``--draft-agreement a``. A draft model's acceptance does not depend on repetition, so
its rows show what a draft that agrees a of the time buys (i.i.d. acceptance a, k
drafts: (1 - a^(k+1)) / (1 - a) tokens per target forward). Also reported: draft
forwards per token (the draft's cost: one catch-up + k - 1 decode forwards per step).

Forwards per token without speculation is 1 by construction (checked). Writes
bench/results/cpu/spec_decode.{json,md,png}.

    python bench/bench_spec_decode.py [--k 4] [--tokens 128] [--requests 4]
        [--draft-agreement 0.9 0.6]
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


class ScriptedDraft(ScriptedTarget):
    """A draft whose forward is the real decoder's; position p predicts script[p + 1]
    where ``ok[p]`` (drawn once per script: probability ``agree``), else another token."""

    def __init__(self, inner: torch.nn.Module, agree: float, seed: int = 0) -> None:
        super().__init__(inner)
        self.agree = agree
        self.seed = seed
        self.plan: list[int] = []

    def set_script(self, script: list[int]) -> None:
        r = random.Random(hash(tuple(script)) ^ self.seed)   # ints hash reproducibly
        vocab = int(self.config.vocab_size)
        self.script = script
        self.plan = [t if r.random() < self.agree else
                     VOCAB_LO + (t - VOCAB_LO + 1 + r.randrange(vocab - VOCAB_LO - 1))
                     % (vocab - VOCAB_LO) for t in script]

    def forward(self, input_ids, meta, kv_caches):
        logits = self.inner(input_ids, meta, kv_caches)
        pos = meta.positions if meta.logits_indices is None else \
            meta.positions.index_select(0, meta.logits_indices)
        nxt = torch.tensor(self.plan, device=logits.device)[(pos + 1).clamp_max(
            len(self.plan) - 1)]
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
    agreements = list(getattr(args, "draft_agreement", None) or [])
    results = {}
    for wl in ("code-edit", "copy", "free-text"):
        r = random.Random(0)
        cases = [workload(wl, args.tokens, r, vocab) for _ in range(args.requests)]
        row = {}
        methods: list[tuple[str, dict | None, ScriptedDraft | None]] = [
            ("off", None, None),
            ("ngram", {"method": "ngram", "num_speculative_tokens": args.k,
                       "prompt_lookup_min": 1, "prompt_lookup_max": 4}, None)]
        for a in agreements:
            draft = ScriptedDraft(load_model("tiny", dtype="float32", device="cpu", seed=1), a)
            methods.append((f"draft-{a:g}", {"method": "draft_model", "model": draft,
                                              "num_speculative_tokens": args.k}, draft))
        for label, spec, draft in methods:
            model = ScriptedTarget(inner)
            llm = LLM(model, tokenizer=None, num_kv_blocks=64, block_size=16,
                      speculative_config=spec)
            eng = llm.llm_engine
            steps = gen = 0
            t0 = time.perf_counter()
            for prompt, out in cases:
                model.script = prompt + out
                if draft is not None:
                    draft.set_script(prompt + out)
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
            if draft is not None:
                row[label]["draft_forwards_per_token"] = eng.proposer.num_forwards / gen
        row["reduction"] = row["off"]["forwards_per_token"] / row["ngram"]["forwards_per_token"]
        row["reductions"] = {label: row["off"]["forwards_per_token"]
                             / row[label]["forwards_per_token"] for label, _, _ in methods[1:]}
        results[wl] = row
        print(f"{wl:10s} off {row['off']['forwards_per_token']:.3f} fwd/tok  " + "  ".join(
            f"{label} {row[label]['forwards_per_token']:.3f} "
            f"({row['reductions'][label]:.2f}x fewer, acc. len "
            f"{row[label]['mean_acceptance_length']:.2f})" for label, _, _ in methods[1:]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--draft-agreement", type=float, nargs="*", default=[0.9, 0.6],
                    help="scripted draft models agreeing this often with the target")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"k": args.k, "tokens": args.tokens, "requests": args.requests, "batch": 1,
            "target": "tiny (scripted logits)", "prompt_lookup": [1, 4],
            "draft_agreement": args.draft_agreement,
            "draft": "tiny (seed 1, scripted logits; own paged KV pool)"}
    (out / "spec_decode.json").write_text(json.dumps({"config": meta, "results": res},
                                                     indent=2))
    labels = list(next(iter(res.values()))["reductions"])
    lines = ["# Speculative decoding: target forwards per generated token", "",
             (f"CPU, batch 1, k = {args.k}, prompt lookup 1..4, scripted drafts agreeing "
              f"{', '.join(f'{a:g}' for a in args.draft_agreement)} of the time; "
              f"{args.requests} requests x {args.tokens} tokens per workload "
              f"(python bench/bench_spec_decode.py)."), "",
             ("| workload | method | fwd/token | reduction | mean acceptance length | "
              "draft fwd/token |"), "|---|---|---|---|---|---|"]
    for wl, row in res.items():
        lines.append(f"| {wl} | off | {row['off']['forwards_per_token']:.3f} | 1.00x | - | - |")
        for label in labels:
            m = row[label]
            dft = m.get("draft_forwards_per_token")
            lines.append(f"| {wl} | {label} | {m['forwards_per_token']:.3f} | "
                         f"{row['reductions'][label]:.2f}x | "
                         f"{m['mean_acceptance_length']:.2f} | "
                         f"{f'{dft:.2f}' if dft is not None else '-'} |")
    (out / "spec_decode.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(res)
        series = ["off"] + labels
        w = 0.8 / len(series)
        for j, label in enumerate(series):
            ax.bar([i - 0.4 + w * (j + 0.5) for i in range(len(names))],
                   [res[n][label]["forwards_per_token"] for n in names], w,
                   label="no speculation" if label == "off" else f"{label}, k={args.k}")
        ax.set_xticks(list(range(len(names))), names)
        ax.set_ylabel("target forwards / token")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "spec_decode.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out}/spec_decode.json, .md, .png")


if __name__ == "__main__":
    main()
