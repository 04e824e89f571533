"""Structured-output cost on the engine's decode step (issue 17's benchmark).

    python -m bench.bench_structured            # batch 256, the full table + plot
    python -m bench.bench_structured --smoke    # small and quick (CI check)

The engine of ``minikernels bench engine`` (a stub forward whose cost is ~nothing, a real
byte-level BPE tokenizer) decodes a batch of 256 requests of which 0%, 50% or 100% carry a
constraint (a JSON schema, or a regex), so what is measured is the host work the
constraints add per step: xgrammar's bitmask fill, the host->device copy, the mask op, the
matchers accepting tokens, and the read-back that constrained steps need before the next
launch. Thread CPU time of the engine thread per decode round (one token for every
request; a constrained step takes two engine.step() calls, launch and read-back) over the
steady window (every request running), repeated runs; the overhead is reported against
the unconstrained run of the same repetition. Greedy sampling keeps the sampler's math
(which a GPU does) small; on a CPU the mask op is the fp32 reference (a GPU runs the Triton kernel), and timings on
shared cores are noisy: read the ratios and their spread.
Results: bench/results/<device>/structured.{json,md,png}.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import device_name, write_results
from minikernels.engine import SamplingParams
from minikernels.engine.bench_engine import BenchTokenizer, PhaseTimer, _build

# Constraints that cannot complete inside the measured window (so every request keeps
# running): a JSON array of at least 64 integers; 200..400 letters and spaces.
CONSTRAINTS = {
    "json": {"json": {"type": "array", "items": {"type": "integer"}, "minItems": 64}},
    "regex": {"regex": "[a-z ]{200,400}"},
}


def run_once(batch: int, fraction: float, constraint: str, steps: int,
             tokenizer: Any) -> dict[str, Any]:
    """One engine run: ``batch`` requests, the first ``fraction`` constrained; returns the
    engine thread's CPU ms per decode round in the steady window."""
    prompt_len, max_tokens = 16, steps + 8
    llm = _build(block_size=64, max_len=prompt_len + max_tokens + 64, tokenizer=tokenizer)
    eng = llm.llm_engine
    stub = eng.model
    shared_forward = stub.forward
    # the stub hands out rows of a shared logits pool; the mask writes -inf in place, so
    # give every step fresh logits (as a real forward does): the copy is in all variants
    stub.forward = lambda *a, **k: shared_forward(*a, **k).clone()
    timer = PhaseTimer(llm)
    n_constrained = int(round(batch * fraction))
    so = CONSTRAINTS[constraint]
    for i in range(batch):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=so if i < n_constrained else None)
        eng.add_request(f"r{i}", list(range(3, 3 + prompt_len)), sp)
    # A constrained step is read back before the next launch, so engine.step() calls are
    # not comparable: count CPU per decode round (batch tokens generated), over the window
    # where every request is running.
    cpu = 0.0
    tokens0 = None
    k = 0
    while eng.has_unfinished() and eng.generation_tokens_total < batch * steps:
        full = eng.scheduler.num_waiting == 0 and len(eng.requests) == batch and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in eng.scheduler.running)
        measure = full and eng.generation_tokens_total >= 3 * batch
        if measure and tokens0 is None:
            tokens0 = eng.generation_tokens_total
        timer.enabled = measure
        t0 = time.thread_time()
        eng.step()
        if measure:
            cpu += time.thread_time() - t0
        k += 1
    rounds = (eng.generation_tokens_total - tokens0) / batch if tokens0 is not None else 0
    for rid in list(eng.requests):
        eng.abort_request(rid)
    while eng.has_unfinished():
        eng.step()
    per = max(rounds, 1e-9)
    return {"host_ms": 1e3 * cpu / per if rounds else None, "rounds_measured": rounds,
            "finish_ms_per_round": 1e3 * timer.totals["finish"] / per,
            "sample_ms_per_round": 1e3 * timer.totals["sample"] / per}


def main(argv: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="batch 16, few steps")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    batch, steps, repeats = ((16, 10, 1) if args.smoke
                             else (args.batch, args.steps, args.repeats))
    tokenizer = BenchTokenizer()
    for constraint in CONSTRAINTS:   # warm-up: first-call costs (allocator, kernels, xgrammar)
        run_once(min(batch, 16), 0.5, constraint, 6, tokenizer)
    rows: list[dict[str, Any]] = []
    for constraint in CONSTRAINTS:
        for rep in range(repeats):
            base = None
            for fraction in (0.0, 0.5, 1.0):
                t0 = time.perf_counter()
                r = run_once(batch, fraction, constraint, steps, tokenizer)
                if fraction == 0.0:
                    base = r["host_ms"]
                overhead = (r["host_ms"] / base - 1.0) if base and r["host_ms"] else None
                rows.append(dict(constraint=constraint, repeat=rep, batch=batch,
                                 constrained=fraction, **r, overhead_vs_none=overhead,
                                 wall_s=time.perf_counter() - t0))
                print(f"{constraint} rep {rep} {fraction:.0%} constrained: "
                      f"{r['host_ms']:.3f} ms/round"
                      + (f" (+{overhead:.0%})" if overhead is not None else ""), flush=True)
    summary = []
    for constraint in CONSTRAINTS:
        for fraction in (0.0, 0.5, 1.0):
            xs = [r["host_ms"] for r in rows if r["constraint"] == constraint
                  and r["constrained"] == fraction and r["host_ms"] is not None]
            ov = [r["overhead_vs_none"] for r in rows if r["constraint"] == constraint
                  and r["constrained"] == fraction and r["overhead_vs_none"] is not None]
            summary.append(dict(constraint=constraint, constrained=fraction, batch=batch,
                                host_ms=statistics.median(xs) if xs else None,
                                host_ms_min=min(xs) if xs else None,
                                host_ms_max=max(xs) if xs else None,
                                overhead_vs_none=statistics.median(ov) if ov else None))
    meta = dict(device=device_name("cpu"), batch=batch, steps=steps, repeats=repeats,
                smoke=args.smoke, target="overhead <= 10% of a step's host time with every "
                "row constrained (issue 17)", runs=rows,
                timing="engine-thread CPU time per decode round (a token for every request)")
    columns = ["constraint", "constrained", "batch", "host_ms", "host_ms_min", "host_ms_max",
               "overhead_vs_none"]
    return write_results("structured", summary, meta, columns=columns,
                         title="Structured outputs: host cost per decode step",
                         plot=lambda p: _plot(summary, p), out_dir=out_dir or args.out_dir)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for constraint in CONSTRAINTS:
        pts = [(r["constrained"], r["host_ms"]) for r in rows
               if r["constraint"] == constraint and r["host_ms"] is not None]
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=constraint)
    ax.set_xlabel("rows constrained (%)")
    ax.set_ylabel("host ms per decode step (median)")
    ax.set_title("structured outputs: host cost per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
