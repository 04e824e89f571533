"""CUDA graphs of speculative verification steps (model_runner._VerifyGraphs), on the CPU.

CUDA graphs cannot run here, so a stand-in subclass "captures" by remembering which
bucket to run and "replays" by running the model eagerly on exactly the padded static
buffers a graph would read (the same buffers, copies, padding and logits gather as on
CUDA; only ``_capture`` differs). Checked: greedy outputs through that path are
token-identical to no speculation and to the eager speculative path (n-gram and draft
model, k = 2 and 4, batch sizes 1, 3, 5 over buckets 1, 2, 4, 8, sequences crossing
8-token blocks), steps that are not uniform verification steps fall back to eager (mixed
decode + verify rows, more drafts than captured), rows with fewer drafts are left-padded
and exact, padding rows never write the KV cache (also with
stale buffers from a larger step), and the bucket limits. The real graphs are checked on
a GPU by tests/test_model_gpu.py (graphs on vs off, token-identical).
"""
from __future__ import annotations

import random

import pytest
import torch
from test_engine import assert_all_free, tokens
from test_spec_decode import save_target_and_near

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.model_runner import StepInputs, _DecodeGraphs, _VerifyGraphs
from minikernels.models import AttentionMetadata


class EagerVerifyGraphs(_VerifyGraphs):
    """CPU stand-in: replay = the model on the bucket's padded static buffers, eagerly."""

    def _capture(self, bs):
        self.fallbacks = 0
        return lambda: self._forward(bs)

    def run(self, inputs):
        out = super().run(inputs)
        if out is None:
            self.fallbacks += 1
        return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_graphs")
    save_target_and_near(root)
    return {k: str(root / k) for k in ("target", "near")}


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    """Repetitive prompts (n-gram drafts found and accepted), 9..40 tokens."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [r.randrange(3, 300) for _ in range(r.randrange(2, 7))]
        out.append((phrase * 10)[:r.randrange(9, 41)])
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = prompts_of(5)


def make(path, spec=None, standin=False, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("max_num_seqs", 8)
    llm = LLM(path, dtype="float32", device="cpu", tokenizer=None, speculative_config=spec,
              **kw)
    if standin:
        runner = llm.llm_engine.runner
        assert runner.verify_graphs is None      # CPU: never captured by itself
        runner.capture_verify_graphs(EagerVerifyGraphs)
        assert runner.verify_graphs.sizes == [1, 2, 4, 8]
    return llm


def spec_cfg(method, k, paths):
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                "prompt_lookup_max": 3}
    return {"method": "draft_model", "model": paths["near"], "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def baseline(paths):
    return tokens(make(paths["target"]).generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [2, 4])
def test_standin_graphs_token_identical(paths, baseline, method, k):
    cfg = spec_cfg(method, k, paths)
    for n in (1, 3, 5):     # buckets 1, 4, 8: padding rows at 3 and 5
        llm = make(paths["target"], cfg, standin=True)
        got = tokens(llm.generate(PROMPTS[:n], GREEDY, use_tqdm=False))
        assert got == baseline[:n]
        assert llm.llm_engine.runner.verify_graphs.num_replays > 0, (method, k, n)
        st = llm.stats()
        assert st["spec_num_accepted_tokens"] > 0
        assert_all_free(llm)
    # the eager speculative path: the same tokens and the same drafts
    eager = make(paths["target"], cfg)
    assert tokens(eager.generate(PROMPTS, GREEDY, use_tqdm=False)) == got
    assert eager.stats()["spec_num_draft_tokens"] == st["spec_num_draft_tokens"]
    assert eager.stats()["spec_num_accepted_tokens"] == st["spec_num_accepted_tokens"]


class EagerDecodeGraphs(_DecodeGraphs):
    """CPU stand-in of the decode graphs (replay = the model on the static buffers)."""

    def _capture(self, bs):
        self.replays = getattr(self, "replays", 0)
        return lambda: self._count(bs)

    def _count(self, bs):
        self.replays += 1
        return self._forward(bs)


@pytest.mark.parametrize("k", [1, 3])
def test_draft_model_catch_up_through_graphs(paths, baseline, k):
    """The draft model's steady catch-up (1 or 2 tokens per row) goes to its decode
    graphs (one token) or its 1 + 1-token verification graphs (rows of one left-padded
    beside rows of two): every draft forward's logits equal those of plain eager
    prefill rows; the same tokens, drafts and acceptances."""
    cfg = spec_cfg("draft", k, paths)

    def recording(llm):      # every draft forward's logits, in order
        prop, seen = llm.llm_engine.proposer, []
        fwd = prop._forward
        prop._forward = lambda inputs: seen.append(fwd(inputs).clone()) or seen[-1]
        return seen

    def plain_catch_up(plan):   # the general path: prefill rows, no graph shapes
        ids, meta = prop._catch_up_meta(plan, shift=0)
        return StepInputs(input_ids=ids, meta=meta, decode_only=False,
                          sample_rows=list(range(sum(r.k > 0 for r in plan))))

    eager = make(paths["target"], cfg)
    prop = eager.llm_engine.proposer
    prop._catch_up_inputs = plain_catch_up
    eager_logits = recording(eager)
    want = tokens(eager.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert want == baseline
    llm = make(paths["target"], cfg)
    graph_logits = recording(llm)
    runner = llm.llm_engine.proposer.runner
    assert runner.verify_graph_sizes() == [1, 2, 4, 8]
    vg = runner.capture_verify_graphs(EagerVerifyGraphs)
    runner.graphs = EagerDecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4, 8],
                                      runner.max_blocks_per_seq, runner.config.vocab_size)
    spans = []
    run = vg.run
    vg.run = lambda inputs: spans.append(sorted(k for _, k in inputs.spec)) or run(inputs)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens"):
        assert eager.stats()[key] == llm.stats()[key] > 0, key
    assert vg.num_replays > 0 and runner.graphs.replays > 0
    assert any(s[0] == 0 and s[-1] == 1 for s in spans)     # mixed 1- and 2-token rows
    assert len(graph_logits) == len(eager_logits)
    for a, b in zip(graph_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert_all_free(llm)


def test_standin_graphs_with_an_eagle_head(tmp_path):
    """The target's hidden states reach the EAGLE head from graph replays (written into
    the capture buffer on padded static inputs): the same tokens, and the same drafts
    and acceptances as the eager path."""
    from test_eagle import _bigram_target, _save_oracle_head

    target = _bigram_target(tmp_path / "bigram", seed=20)
    _save_oracle_head(tmp_path / "head", target, 0.03, 22)   # accepts part of its drafts
    path = str(tmp_path / "bigram")
    cfg = {"method": "eagle", "model": str(tmp_path / "head"), "num_speculative_tokens": 3}
    want = tokens(make(path).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = make(path, cfg, standin=True)
    got = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert got == want and llm.llm_engine.runner.verify_graphs.num_replays > 0
    eager = make(path, cfg)
    assert tokens(eager.generate(PROMPTS, GREEDY, use_tqdm=False)) == got
    for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens"):
        assert eager.stats()[key] == llm.stats()[key] and llm.stats()[key] > 0, key
    assert_all_free(llm)


def test_mixed_rows_fall_back_to_eager(paths, baseline):
    """A row that never drafts (repetition penalty) next to drafting rows: its steps are
    mixed decode + verify rows (eager); outputs unchanged."""
    cfg = spec_cfg("draft", 2, paths)
    params = [GREEDY, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                     repetition_penalty=1.2), GREEDY]
    want = tokens(make(paths["target"]).generate(PROMPTS[:3], params, use_tqdm=False))
    llm = make(paths["target"], cfg, standin=True)
    assert tokens(llm.generate(PROMPTS[:3], params, use_tqdm=False)) == want
    vg = llm.llm_engine.runner.verify_graphs
    assert vg.fallbacks > 0            # mixed steps while the penalty row ran
    assert vg.num_replays > 0          # uniform steps once it finished
    assert_all_free(llm)


# ------------------------------------------------------------------ unit level
def _step(vg: _VerifyGraphs, ctx: list[int], tables: list[list[int]], block_size: int,
          ks: list[int] | None = None, vocab: int = 300, seed: int = 0) -> StepInputs:
    """A verification step: row i has ctx[i] cached tokens then 1 + ks[i] new ones."""
    ks = ks or [vg.k] * len(ctx)
    g = torch.Generator().manual_seed(seed)
    pos, slots, cu_q, cu_k = [], [], [0], [0]
    for c, k, tab in zip(ctx, ks, tables):
        for p in range(c, c + 1 + k):
            pos.append(p)
            slots.append(tab[p // block_size] * block_size + p % block_size)
        cu_q.append(cu_q[-1] + 1 + k)
        cu_k.append(cu_k[-1] + c + 1 + k)
    t = len(pos)
    width = max(len(tb) for tb in tables)
    bt = torch.tensor([tb + [0] * (width - len(tb)) for tb in tables], dtype=torch.int32)
    # eager layout: the rows' last positions, then each row's first k positions
    last = [e - 1 for e in cu_q[1:]]
    first = [j for i, k in enumerate(ks) for j in range(cu_q[i], cu_q[i] + k)]
    meta = AttentionMetadata(
        positions=torch.tensor(pos), slot_mapping=torch.tensor(slots), num_decode=0,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32), max_seqlen_q=max(ks) + 1,
        max_seqlen_k=max(cu_k[i + 1] - cu_k[i] for i in range(len(ctx))),
        prefill_block_table=bt, logits_indices=torch.tensor(last + first))
    return StepInputs(input_ids=torch.randint(3, vocab, (t,), generator=g), meta=meta,
                      sample_rows=list(range(len(ctx))), decode_only=False,
                      spec=[(i, k) for i, k in enumerate(ks)])


def _slots(step: StepInputs) -> set[int]:
    return set(step.meta.slot_mapping.tolist())


def test_padding_rows_never_write_kv_cache(paths):
    llm = make(paths["target"], spec_cfg("ngram", 2, paths), standin=True,
               num_kv_blocks=64)
    runner = llm.llm_engine.runner
    vg, bsz = runner.verify_graphs, runner.block_size
    g = torch.Generator().manual_seed(1)
    for kc, vc in runner.kv_caches:     # garbage everywhere: any write shows
        kc.copy_(torch.randn(kc.shape, generator=g))
        vc.copy_(torch.randn(vc.shape, generator=g))
    # a 4-row step (bucket 4) leaves its rows' slots in the static buffers ...
    big = _step(vg, [5, 14, 7, 22], [[1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11]], bsz)
    assert vg.bucket(big) == 4
    vg.run(big)
    # ... then a 3-row step in the same bucket: row 3 is padding (stale slots -> -1), and
    # row 1 has one draft (left-padded in its span)
    small = _step(vg, [6, 15, 3], [[20, 21], [22, 23, 24], [25]], bsz, ks=[2, 1, 2], seed=1)
    assert vg.bucket(small) == 4
    before = [(kc.clone(), vc.clone()) for kc, vc in runner.kv_caches]
    cache_ref = [(kc.clone(), vc.clone()) for kc, vc in runner.kv_caches]
    with torch.inference_mode():
        got = vg.run(small)
        want = runner.model(small.input_ids, small.meta, cache_ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = torch.zeros(runner.num_blocks * bsz, dtype=torch.bool)
    written[list(_slots(small))] = True
    assert not written[list(_slots(big))].any()
    for (k0, v0), (k1, v1), (kr, vr) in zip(before, runner.kv_caches, cache_ref):
        for a, b, r in ((k0, k1, kr), (v0, v1, vr)):
            a, b, r = a.flatten(0, 1), b.flatten(0, 1), r.flatten(0, 1)
            assert torch.equal(a[~written], b[~written])      # nothing else touched
            assert not torch.equal(a[written], b[written])
            torch.testing.assert_close(b[written], r[written], rtol=1e-5, atol=1e-5)
    assert (vg.slots[3 * vg.q:4 * vg.q] == -1).all() and vg.slots[vg.q] == -1
    assert vg.num_replays == 2


def test_bucket_choice_and_fallbacks(paths):
    llm = make(paths["target"], spec_cfg("ngram", 2, paths), standin=True)
    runner = llm.llm_engine.runner
    vg, bsz = runner.verify_graphs, runner.block_size
    assert vg.bucket(_step(vg, [3], [[1]], bsz)) == 1
    assert vg.bucket(_step(vg, [3, 4, 5], [[1], [2], [3]], bsz)) == 4
    assert vg.bucket(_step(vg, [3] * 8, [[i] for i in range(1, 9)], bsz)) == 8
    assert vg.bucket(_step(vg, [3] * 9, [[i] for i in range(1, 10)], bsz)) is None
    assert vg.bucket(_step(vg, [3, 4], [[1], [2]], bsz, ks=[2, 1])) == 2      # left-padded
    assert vg.bucket(_step(vg, [3, 4], [[1], [2]], bsz, ks=[3, 1])) is None   # k > 2
    mixed = _step(vg, [3, 4], [[1], [2]], bsz)
    mixed.meta.num_decode = 1                                     # a decode row first
    assert vg.bucket(mixed) is None
    plain = _step(vg, [3], [[1]], bsz)
    plain.spec = None                                             # a prefill chunk
    assert vg.bucket(plain) is None
    wide = _step(vg, [3], [[1] * (vg.width + 1)], bsz)
    assert vg.bucket(wide) is None


def test_bucket_limits(paths):
    r = make(paths["target"], spec_cfg("ngram", 2, paths), max_num_batched_tokens=8,
             max_num_seqs=8).llm_engine.runner
    assert r.verify_graph_sizes() == [1, 2]          # 2 rows of 3 tokens fit 8
    r = make(paths["target"], {**spec_cfg("ngram", 4, paths), "disable_by_batch_size": 5},
             max_num_seqs=64).llm_engine.runner
    assert r.verify_graph_sizes() == [1, 2, 4, 5]
    r = make(paths["target"]).llm_engine.runner
    assert r.verify_graph_sizes() == [] and r.capture_verify_graphs() is None
    assert r.verify_graphs is None
