"""Speculative decoding (n-gram, draft model, EAGLE): target forwards per token (CPU); --timing.

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

Timing mode (``--timing``; issue 19's GPU measurement): wall time per output token at
batch 1 and 8 (``--batch-sizes``) without speculation, with n-gram, and with a draft model
agreeing a = 0.9 / 0.7 of the time (``--draft-agreement``), all on the copy workload
(``--prompt-len`` 300-token prompt, ``--tokens`` 128 output tokens per request, greedy).
The target is a built-in model (``--target``, default the qwen2.5-0.5b shape, random
weights, bf16 on cuda); the draft is a small decoder built from the target's config with
the same vocabulary (``--draft-layers`` 2, ``--draft-hidden`` 512: 8 heads of the
target's head_dim, MLP 4x hidden, tied embeddings), run by the engine for real: its own
paged KV pool, catch-up forward, CUDA graphs for its decode steps, rollback. Acceptance is
controlled by scripting logits, and the scripting cannot cheat the timing: every target
and draft forward first computes the whole model (embedding, all layers, final norm and
the lm_head over every logits row) and only then replaces its logits with ones that put
the plan's token on top (``GraphScripted``: a lookup in fixed device tables, a handful of
small kernels, inside the CUDA graphs; the same per forward with and without
speculation). The draft's planned token is right with probability a per request and
position. The "eagle-a" rows do the same with an EAGLE-1 head (``dummy_eagle_head``: one
layer of the target's shape over the target's final hidden states, the target's lm_head,
its K/V in the target's blocks, CUDA graphs for its draft steps; ``GraphScriptedHead``
scripts its logits, shifted by one position as the head is).

Per (batch, method): one warm-up generate, then ``--repeats`` (3) timed generates of the
batch and as many prefill-only ones (max_tokens = 1), each between
``torch.cuda.synchronize()`` calls; ms/token = (median full - median prefill-only) /
(tokens - 1), i.e. the decode time per output token of each sequence; speed-up = no
speculation's ms/token (with CUDA graphs) / the method's, same batch. Also: mean acceptance length
(tokens per verification), acceptance rate, engine steps per generate, and draft_share:
the fraction of the timed generates' wall time spent inside the proposer's ``propose``
(it ends in a device->host copy of the drafts, so the draft's GPU time is included).
On a GPU the "off-eager" rows (no speculation, no CUDA graphs;
``--no-eager-baseline`` skips them) show what graphs buy the baseline; verification steps
replay CUDA graphs too (model_runner ``_VerifyGraphs``) when every row in the step drafts,
otherwise (mixed decode + verify rows) they run eagerly. Prefix caching is off (the repeats do the same work). Writes
spec_decode_timing.{json,md,png} to ``--result-dir``, else $MINIKERNELS_BENCH_OUT, else
bench/results/<device>/, after each method (a cut run keeps its rows). ``--smoke``: the
"tiny" target, a 1-layer hidden-32 draft, 12 tokens, 1 repeat (seconds on a CPU).

    python bench/bench_spec_decode.py --timing [--device cuda] [--target qwen2.5-0.5b]
        [--batch-sizes 1 8] [--draft-agreement 0.9 0.7] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import gc
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

    def planned(self) -> list[int]:
        """The tokens this model's logits put on top (position p -> planned[p + 1])."""
        return self.script

    def forward(self, input_ids, meta, kv_caches):
        logits = self.inner(input_ids, meta, kv_caches)
        pos = meta.positions if meta.logits_indices is None else \
            meta.positions.index_select(0, meta.logits_indices)
        plan = self.planned()
        nxt = torch.tensor(plan, device=logits.device)[(pos + 1).clamp_max(len(plan) - 1)]
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

    def planned(self) -> list[int]:
        return self.plan


def workload(name: str, n_out: int, r: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    tok = lambda: r.randrange(VOCAB_LO, vocab)
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


# ----------------------------------------------------------------------------- timing
# (--timing) Wall time per output token with and without speculation, batch 1 and 8.


class GraphScripted(torch.nn.Module):
    """A real decoder forward whose logits are then replaced by a plan, CUDA-graph safe.

    ``inner(input_ids, meta, kv_caches)`` runs first and in full (embedding, every layer,
    the final norm and the lm_head over all logits rows: the timed cost is the model's);
    only its output is then replaced by logits that put the planned next token on top.
    The plan lives in fixed device tables (``tok``, ``nxt``: [max_len, width], one column
    per request of the batch), rewritten in place between generates, so graphs captured
    once stay valid: a row at position p whose input token is ``tok[p, j]`` predicts
    ``nxt[p, j]`` (no match: column 0). Requests of one batch are given disjoint token
    residues (``disjoint_tokens``), so a (position, token) pair names one request.
    """

    def __init__(self, inner: torch.nn.Module, max_len: int, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        dev = inner.device
        self.max_len = int(max_len)
        self.tok = torch.full((max_len, width), -1, dtype=torch.int64, device=dev)
        self.nxt = torch.zeros((max_len, width), dtype=torch.int64, device=dev)

    def __getattr__(self, name: str):   # device, dtype, allocate_kv_caches, ... of inner
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    @property
    def hidden_capture(self):
        """The inner model's (an EAGLE head reads what the inner forward captures)."""
        return getattr(self._modules["inner"], "hidden_capture", None)

    @hidden_capture.setter
    def hidden_capture(self, capture) -> None:
        self._modules["inner"].hidden_capture = capture

    def _tables(self, seqs: list[list[int]], nexts: list[list[int]]) -> None:
        tok = torch.full(tuple(self.tok.shape), -1, dtype=torch.int64)
        nxt = torch.zeros(tuple(self.nxt.shape), dtype=torch.int64)
        for j, (s, n) in enumerate(zip(seqs, nexts)):
            L = min(len(s), self.max_len)
            tok[:L, j] = torch.tensor(s[:L])
            nxt[:L, j] = torch.tensor(n[:L])
        with torch.no_grad():
            self.tok.copy_(tok)
            self.nxt.copy_(nxt)

    def set_scripts(self, seqs: list[list[int]]) -> None:
        """seqs[j]: request j's prompt + planned output; position p predicts s[p + 1]."""
        self._tables(seqs, [s[1:] + s[-1:] for s in seqs])

    def forward(self, input_ids, meta, kv_caches):
        logits = self.inner(input_ids, meta, kv_caches)     # the full model, lm_head too
        return self._scripted(logits, input_ids, meta)

    def _scripted(self, logits, input_ids, meta):
        """Logits putting each row's planned next token on top (see the class)."""
        pos, x = meta.positions, input_ids
        if meta.logits_indices is not None:
            pos = pos.index_select(0, meta.logits_indices)
            x = x.index_select(0, meta.logits_indices)
        p = pos.clamp(0, self.max_len - 1)
        j = (self.tok.index_select(0, p) == x[:, None]).to(torch.float32).argmax(1)
        nxt = self.nxt.index_select(0, p).gather(1, j[:, None].to(torch.int64))
        out = torch.full_like(logits, -10.0)
        out.scatter_(1, nxt, 10.0)
        return out


class GraphScriptedDraft(GraphScripted):
    """The draft: its real forward, then the plan's next token where the draft "agrees"
    (drawn once per request and position with probability ``agree``), else a wrong one."""

    def set_scripts(self, seqs: list[list[int]], agree: float = 1.0, seed: int = 0) -> None:
        vocab = int(self.config.vocab_size)
        nexts = []
        for j, s in enumerate(seqs):
            r = random.Random(hash(tuple(s)) ^ seed ^ (j << 20))   # ints hash reproducibly
            want = s[1:] + s[-1:]
            nexts.append([t if r.random() < agree else
                          VOCAB_LO + (t - VOCAB_LO + 1 + r.randrange(vocab - VOCAB_LO - 1))
                          % (vocab - VOCAB_LO) for t in want])
        self._tables(seqs, nexts)


class GraphScriptedHead(GraphScriptedDraft):
    """An EAGLE head (models/eagle.py): its real forward over the target's hidden states
    and its own K/V, then the plan's token where it "agrees". Draft position p holds
    token p + 1 and predicts token p + 2, so its tables are the scripts shifted by one."""

    def set_scripts(self, seqs: list[list[int]], agree: float = 1.0, seed: int = 0) -> None:
        super().set_scripts([s[1:] for s in seqs], agree, seed)

    def forward(self, input_ids, hidden, meta, kv_cache):
        logits, g = self.inner(input_ids, hidden, meta, kv_cache)   # the whole head
        return self._scripted(logits, input_ids, meta), g


def disjoint_tokens(seq: list[int], j: int, width: int, vocab: int) -> list[int]:
    """Map request j's tokens to ids = j (mod width) above VOCAB_LO (keeps repeats)."""
    out = []
    for t in seq:
        u = VOCAB_LO + (t - VOCAB_LO) // width * width + j
        out.append(u if u < vocab else u - width)
    return out


def copy_workload(n_out: int, prompt_len: int, r: random.Random, vocab: int
                  ) -> tuple[list[int], list[int]]:
    """The copy (summarisation-like) workload: spans of 8..32 prompt tokens."""
    prompt = [r.randrange(VOCAB_LO, vocab) for _ in range(prompt_len)]
    out: list[int] = []
    while len(out) < n_out:
        s = r.randrange(0, max(1, prompt_len - 32))
        out += prompt[s:s + r.randrange(8, 33)]
    return prompt, out[:n_out]


def build_draft(target_config, layers: int, hidden: int, dtype, device, seed: int = 1):
    """A small random-weight decoder with the target's vocabulary (and head_dim, rotary,
    tied embeddings): ``layers`` layers, hidden size ``hidden``, MLP 4 x hidden."""
    import dataclasses
    import math

    from minikernels.models.decoder import CausalLM
    from minikernels.models.loader import _init_dummy, parse_dtype

    hd = int(target_config.head_dim)
    heads = max(1, hidden // hd)
    cfg = dataclasses.replace(
        target_config, num_layers=layers, hidden_size=heads * hd,
        intermediate_size=4 * heads * hd, num_heads=heads,
        num_kv_heads=math.gcd(int(target_config.num_kv_heads), heads),
        sliding_window=None, sliding_window_layers=None, quantization_config=None)
    dev = torch.device(device)
    m = CausalLM(cfg, dtype=parse_dtype(dtype, cfg, dev), device=dev, dense=True)
    _init_dummy(m, seed)
    m.eval()
    m.requires_grad_(False)
    m.name_or_path = f"draft-{layers}L-h{cfg.hidden_size}"
    m.quantization = None
    return m


def _median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _finish(rows: list[dict]) -> list[dict]:
    """Rows in display order (batch, then off / ngram / drafts) with speed-ups vs off."""
    rank = {"off": 0, "off-eager": 1, "ngram": 2}
    out = sorted((dict(r) for r in rows), key=lambda r: (
        r["batch"], rank.get(r["method"], 3), -(r["agreement"] or 0)))
    base = {r["batch"]: r["ms_per_token"] for r in out if r["method"] == "off"}
    for r in out:
        r["speedup"] = base[r["batch"]] / r["ms_per_token"] if r["batch"] in base else None
    return out


def timing_run(args, on_progress=None) -> tuple[list[dict], dict]:
    """Rows of (batch, method) timings and the run's settings; see the module docstring.
    on_progress(rows, meta) is called after each method (a cut run keeps what it did)."""
    from minikernels.models.loader import load_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    k, N, P = args.k, args.tokens, args.prompt_len
    batches = list(args.batch_sizes)
    B = max(batches)
    max_len = P + N + k + 8
    t_setup = time.perf_counter()
    inner = load_model(args.target, dtype=dtype, device=dev, seed=0)
    vocab = int(inner.config.vocab_size)
    target = GraphScripted(inner, max_len, B)
    draft_inner = build_draft(inner.config, args.draft_layers, args.draft_hidden, dtype, dev)
    draft = GraphScriptedDraft(draft_inner, max_len, B)
    dc = draft_inner.config
    from minikernels.models.eagle import dummy_eagle_head
    head = GraphScriptedHead(dummy_eagle_head(target, "eagle", seed=2), max_len, B)
    per_seq_blocks = -(-max_len // 64)
    common = {"tokenizer": None, "device": dev, "dtype": dtype, "max_num_seqs": B,
              "num_kv_blocks": B * per_seq_blocks + 8, "max_model_len": max_len,
              "enable_prefix_caching": False, "enforce_eager": args.enforce_eager}
    agreements = list(args.draft_agreement)
    graphs = cuda and not args.enforce_eager
    methods: list[tuple[str, dict | None, list[float | None]]] = [
        ("off", None, [None]),
        ("draft", {"method": "draft_model", "model": draft, "num_speculative_tokens": k},
         agreements),
        ("eagle", {"method": "eagle", "model": head, "num_speculative_tokens": k},
         agreements),
        ("ngram", {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                   "prompt_lookup_max": 4}, [None])]
    if graphs and getattr(args, "eager_baseline", True):
        # no speculation without CUDA graphs: what graphs buy the baseline, to read the
        # speed-ups against (a step mixing decode and verify rows runs eagerly)
        methods.append(("off-eager", None, [None]))
    r = random.Random(0)
    cases = {b: [copy_workload(N, P, r, vocab) for _ in range(b)] for b in batches}
    for b in batches:
        cases[b] = [(disjoint_tokens(p, j, B, vocab), disjoint_tokens(o, j, B, vocab))
                    for j, (p, o) in enumerate(cases[b])]
    full = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows: list[dict] = []
    setup_s = time.perf_counter() - t_setup
    meta = {
        "mode": "timing", "device": str(dev), "dtype": dtype, "k": k,
        "target": f"{args.target} (built-in, random weights; scripted logits)",
        "draft": (f"{dc.num_layers} layers, hidden {dc.hidden_size}, heads {dc.num_heads}/"
                  f"{dc.num_kv_heads}, intermediate {dc.intermediate_size}, vocab "
                  f"{dc.vocab_size} (the target's; random weights; scripted logits agreeing "
                  f"a of the time; own paged KV"
                  f"{', CUDA graphs for its decode steps' if graphs else ', eager'})"),
        "eagle_head": (f"EAGLE-1 head: one layer of the target's shape over its final "
                       f"hidden states, the target's lm_head (random weights; scripted "
                       f"logits agreeing a of the time; K/V in the target's blocks; "
                       f"eager draft steps)"),
        "draft_params_m": round(sum(p.numel() for p in draft_inner.parameters()) / 1e6, 2),
        "target_params_m": round(sum(p.numel() for p in inner.parameters()) / 1e6, 2),
        "workload": f"copy: {P}-token prompt, output = 8..32-token spans of it",
        "tokens": N, "prompt_len": P, "repeats": args.repeats, "batch_sizes": batches,
        "draft_agreement": agreements, "cuda_graphs": graphs,
        "prefix_caching": False, "setup_s": round(setup_s, 2),
        "ms_per_token": "(median full generate - median prefill-only generate) / (tokens - 1)",
        "logits": "every forward computes the whole model incl. lm_head, then its logits "
                  "are replaced by the plan's",
    }
    for name, spec, agrees in methods:
        t0 = time.perf_counter()
        llm = LLM(target, speculative_config=spec, **{
            **common, "enforce_eager": common["enforce_eager"] or name == "off-eager"})
        eng = llm.llm_engine
        init_s = time.perf_counter() - t0
        prop = {"on": False, "s": 0.0}
        if eng.proposer is not None:
            inner_propose = eng.proposer.propose

            def timed_propose(seqs, max_tokens, _f=inner_propose, _st=prop):
                # ends in a device->host copy of the drafts: includes the draft's GPU time
                t = time.perf_counter()
                try:
                    return _f(seqs, max_tokens)
                finally:
                    if _st["on"]:
                        _st["s"] += time.perf_counter() - t
            eng.proposer.propose = timed_propose
        for b in batches:
            prompts = [p for p, _ in cases[b]]
            seqs = [p + o for p, o in cases[b]]
            target.set_scripts(seqs)
            for a in agrees:
                if a is not None:
                    (head if name == "eagle" else draft).set_scripts(seqs, a, seed=1)
                llm.generate(prompts, full, use_tqdm=False)          # warm-up (compiles)
                d0, a0, v0 = (eng.spec_draft_tokens_total, eng.spec_accepted_tokens_total,
                              eng.spec_verify_rows_total)
                s0, g0 = eng.num_steps, eng.generation_tokens_total
                t_full, t_first, match = [], [], 0
                prop["s"] = 0.0
                for _ in range(args.repeats):
                    prop["on"] = True
                    sync()
                    t = time.perf_counter()
                    res = llm.generate(prompts, full, use_tqdm=False)
                    sync()
                    t_full.append(time.perf_counter() - t)
                    prop["on"] = False
                    match += sum(o.outputs[0].token_ids == c[1] for o, c in zip(res, cases[b]))
                steps = (eng.num_steps - s0) / args.repeats
                gen = eng.generation_tokens_total - g0
                acc = eng.spec_accepted_tokens_total - a0
                ver = eng.spec_verify_rows_total - v0
                drafted = eng.spec_draft_tokens_total - d0
                for _ in range(args.repeats):
                    sync()
                    t = time.perf_counter()
                    llm.generate(prompts, first, use_tqdm=False)
                    sync()
                    t_first.append(time.perf_counter() - t)
                tf, t1 = _median(t_full), _median(t_first)
                decode = tf - t1
                tpot = decode / (N - 1) if decode > 0 and N > 1 else tf / N
                label = name if a is None else f"{name}-{a:g}"
                rows.append({
                    "batch": b, "method": label, "agreement": a,
                    "ms_per_token": 1e3 * tpot,
                    "speedup": None,   # _finish
                    "tok_per_s": b / tpot,
                    "mean_acceptance_length": (acc + ver) / ver if ver else None,
                    "acceptance_rate": acc / drafted if drafted else None,
                    "steps_per_generate": steps,
                    "draft_share": (prop["s"] / sum(t_full)) if eng.proposer is not None
                    else None,
                    "generate_s": tf, "prefill_only_s": t1,
                    "generate_spread": (max(t_full) - min(t_full)) / tf if tf > 0 else None,
                    "tokens_per_generate": gen / args.repeats,
                    "outputs_as_planned": match / (args.repeats * b),
                    "engine_init_s": init_s})
                print(f"batch {b} {label:10s} {1e3 * tpot:8.3f} ms/token  "
                      f"acc. len {rows[-1]['mean_acceptance_length'] or 0:.2f}  "
                      f"steps {steps:.0f}  draft share "
                      f"{rows[-1]['draft_share'] or 0:.2f}", flush=True)
        del llm, eng
        target.hidden_capture = None    # the next method's target writes no states
        inner_propose = timed_propose = None   # drop the proposer (its pool, graphs)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if on_progress is not None:
            on_progress(_finish(rows), meta)
    return _finish(rows), meta


def write_timing(rows: list[dict], meta: dict, out_dir, quiet: bool = False) -> dict:
    from minikernels.benchmarks.plumbing import write_results

    for kind in ("draft", "eagle"):
        b1 = [r for r in rows if r["batch"] == 1 and r["method"].startswith(kind + "-")]
        best = max(b1, key=lambda r: r["speedup"]) if b1 else None
        if best is not None:
            key = "target_check" if kind == "draft" else "eagle_check"
            meta = {**meta, key: (
                f"batch-1 {kind} speed-up {best['speedup']:.2f}x at a = {best['agreement']:g}"
                f" (issue 19 target for a draft model: >= 1.8x) -> "
                f"{'met' if best['speedup'] >= 1.8 else 'missed'}")}
            if not quiet:
                print(meta[key])

    def plot(path):
        import matplotlib.pyplot as plt
        labels = list(dict.fromkeys(r["method"] for r in rows))
        bs = list(dict.fromkeys(r["batch"] for r in rows))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ys = [next((r["ms_per_token"] for r in rows if r["batch"] == b
                        and r["method"] == label), 0.0) for b in bs]
            ax.bar([x - 0.4 + w * (i + 0.5) for x in range(len(bs))], ys, w, label=label)
        ax.set_xticks(list(range(len(bs))), [f"batch {b}" for b in bs])
        ax.set_ylabel("ms / output token")
        ax.set_title(f"speculative decoding, k = {meta['k']} ({meta['device']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    cols = ["batch", "method", "ms_per_token", "speedup", "tok_per_s",
            "mean_acceptance_length", "acceptance_rate", "steps_per_generate", "draft_share",
            "outputs_as_planned", "generate_spread"]
    return write_results("spec_decode_timing", rows, meta, columns=cols,
                         title="Speculative decoding: time per output token", plot=plot,
                         out_dir=out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=None,
                    help="output tokens per request (default 128; --smoke: 12)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--draft-agreement", type=float, nargs="*", default=None,
                    help="scripted draft models agreeing this often with the target "
                         "(default 0.9 0.6; --timing: 0.9 0.7)")
    ap.add_argument("--out", "--result-dir", dest="out", default=None,
                    help="result folder (default bench/results/cpu; --timing: "
                         "$MINIKERNELS_BENCH_OUT, else bench/results/<device>)")
    t = ap.add_argument_group("--timing: wall time per output token (GPU)")
    t.add_argument("--timing", action="store_true",
                   help="time generate with and without speculation (spec_decode_timing.*)")
    t.add_argument("--device", default=None, help="default cuda when available, else cpu")
    t.add_argument("--target", default=None,
                   help="built-in target model (default qwen2.5-0.5b; --smoke: tiny)")
    t.add_argument("--draft-layers", type=int, default=None, help="default 2 (--smoke: 1)")
    t.add_argument("--draft-hidden", type=int, default=None, help="default 512 (--smoke: 32)")
    t.add_argument("--prompt-len", type=int, default=None, help="default 300 (--smoke: 40)")
    t.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    t.add_argument("--repeats", type=int, default=None, help="default 3 (--smoke: 1)")
    t.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    t.add_argument("--no-eager-baseline", dest="eager_baseline", action="store_false",
                   help="skip the off-eager rows (no speculation, no CUDA graphs; GPU only)")
    t.add_argument("--smoke", action="store_true",
                   help="a tiny target and draft, few tokens: seconds on a CPU")
    args = ap.parse_args()
    if args.timing:
        smoke = args.smoke
        for key, normal, small in (("tokens", 128, 12), ("target", "qwen2.5-0.5b", "tiny"),
                                   ("draft_layers", 2, 1), ("draft_hidden", 512, 32),
                                   ("prompt_len", 300, 40), ("repeats", 3, 1),
                                   ("draft_agreement", [0.9, 0.7], [0.9, 0.7])):
            if getattr(args, key) is None:
                setattr(args, key, small if smoke else normal)
        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        from minikernels.benchmarks.plumbing import results_dir
        out = results_dir(args.device, args.out)
        rows, meta = timing_run(args, on_progress=lambda r, m: write_timing(r, m, out, quiet=True))
        paths = write_timing(rows, meta, out)
        print(meta.get("draft"))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    args.tokens = 128 if args.tokens is None else args.tokens
    if args.draft_agreement is None:
        args.draft_agreement = [0.9, 0.6]
    args.out = args.out or str(Path(__file__).parent / "results" / "cpu")
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
