"""Speculative decoding for structured-output rows (engine/llm_engine.py ``_propose`` /
``_verify``; StructuredOutputManager.draft_bitmask): drafts the grammar refuses are cut
off, each verification position is masked as plain decoding masks it, and the matcher
advances through the verified tokens. Greedy constrained outputs are token-identical with
and without speculation (n-gram and a draft model), batched with free rows; sampled
constrained rows (n-gram) stay valid and reproducible; the matcher never sees a refused
token. Tiny dummy model with the byte tokenizer (CPU)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from minikernels.engine import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "n": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["aa", "bb"]}, "maxItems": 4}},
    "required": ["name", "n", "tags"], "additionalProperties": False}
REGEX = r"(ab|abc|x[0-9]{1,3}){2,6}-(yes|no)"


def _llm(spec=None, **kw) -> LLM:
    kw.setdefault("block_size", 16)
    return LLM("tiny", dtype="float32", device="cpu", speculative_config=spec, **kw)


def _params(temperature=0.0, **extra):
    common = dict(temperature=temperature, max_tokens=80, **extra)
    js = {"json": SCHEMA, "disable_any_whitespace": True}   # bounded: the output ends
    return [SamplingParams(structured_outputs=js, **common),
            SamplingParams(structured_outputs={"regex": REGEX}, **common),
            SamplingParams(temperature=temperature, max_tokens=30, ignore_eos=True,
                           **extra),
            SamplingParams(structured_outputs={"choice": ["alpha beta gamma", "alpha b"]},
                           **common),
            SamplingParams(structured_outputs=js, **common)]


PROMPTS = ["Give me JSON about cats", "abcabc x12", [5, 6, 7, 5, 6, 7, 5, 6], "pick",
           "more JSON please"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


def _check_valid(outs, params):
    for o, p in zip(outs, params):
        c = o.outputs[0]
        so = p.structured_outputs
        if so is None:
            continue
        assert c.finish_reason == "stop", c
        if so.json is not None:
            jsonschema.validate(json.loads(c.text), SCHEMA)
        elif so.regex is not None:
            assert re.fullmatch(REGEX, c.text), c.text
        else:
            assert c.text in so.choice


@pytest.fixture(scope="module")
def greedy_ref():
    params = _params()
    outs = _llm().generate(PROMPTS, params, use_tqdm=False)
    _check_valid(outs, params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("spec", [NGRAM, {"method": "draft_model", "model": "tiny",
                                          "num_speculative_tokens": 3}],
                         ids=["ngram", "draft_model"])
def test_greedy_constrained_rows_are_drafted_and_exact(greedy_ref, spec):
    llm = _llm(spec)
    params = _params()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == greedy_ref
    _check_valid(outs, params)
    drafted = [o.metrics["spec_num_draft_tokens"] for o in outs]
    accepted = [o.metrics["spec_num_accepted_tokens"] for o in outs]
    constrained = [i for i, p in enumerate(params) if p.structured_outputs is not None]
    assert sum(drafted[i] for i in constrained) > 0, drafted
    assert sum(accepted[i] for i in constrained) > 0, accepted
    if spec["method"] == "draft_model":
        # the drafter is the target itself and drafts inside the grammar: every
        # constrained draft is the target's own choice
        assert all(accepted[i] == drafted[i] for i in constrained), (drafted, accepted)
        # ... and few drafts are refused: most of each constrained output was drafted
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert all(drafted[i] >= lengths[i] // 2 for i in constrained), (drafted, lengths)
    llm.llm_engine.check_no_leaks()


@pytest.mark.parametrize("spec", [NGRAM, {"method": "draft_model", "model": "tiny",
                                          "num_speculative_tokens": 3}],
                         ids=["ngram", "draft_model"])
def test_sampled_constrained_rows_stay_valid_and_reproducible(spec):
    """Temperature > 0: n-gram drafts (cut at a refused one) and a draft model's (sampled
    inside the grammar, masked like the target): outputs stay valid, reproduce run to
    run, and constrained rows are drafted for (every row, with the draft model)."""
    params = _params(temperature=0.9, seed=5)
    runs = []
    for _ in range(2):
        llm = _llm(spec)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        _check_valid(outs, params)
        runs.append([o.outputs[0].token_ids for o in outs])
        drafted = [o.metrics["spec_num_draft_tokens"] for o in outs]
        assert sum(drafted) > 0 and (spec is NGRAM or all(d > 0 for d in drafted))
        llm.llm_engine.check_no_leaks()
    assert runs[0] == runs[1]


def test_draft_bitmask_rolls_back_and_cuts_refused_drafts():
    llm = _llm()
    eng = llm.llm_engine
    mgr = eng._structured_manager()
    from minikernels.engine.structured_outputs import StructuredOutputsParams

    g = mgr.new_matcher(mgr.compile(StructuredOutputsParams(regex="ab(cd|ce)f")))
    tok = llm.get_tokenizer()
    ids = [tok.encode(c)[-1] for c in "abcdf"]
    before = mgr.allocate_bitmask(1)
    mgr.fill_bitmask([g], before)
    m, bits = mgr.draft_bitmask(g, ids[:3] + [ids[0]] + ids[3:])   # a, b, c, a(refused)
    assert m == 3 and bits.shape[0] == 4
    assert (bits[0] == before[0]).all()                 # row 0: the state before drafts
    after = mgr.allocate_bitmask(1)
    mgr.fill_bitmask([g], after)
    assert (after[0] == before[0]).all()                # rolled back
    for t in ids[:4] + [ids[4]]:                          # a b c d f: the grammar's path
        assert g.accept(t)
    assert g.terminated or g.matcher.is_completed()


def test_sampled_constrained_output_follows_the_masked_target_distribution():
    """Temperature > 0, a regex constraint ([ab]{3}: 8 outcomes) and a draft model that
    differs from the target: the outputs' distribution is the target's masked one
    (enumerated exactly: at each position a softmax over the two allowed tokens), not the
    drafter's. Every token after the first comes through verification of drafts sampled
    inside the grammar."""
    import itertools

    import torch
    from test_spec_decode_draft import _chi_square_p

    from minikernels.models.loader import load_model
    from minikernels.models.metadata import AttentionMetadata

    T, N = 1.3, 3000
    target = load_model("tiny", dtype="float32", device="cpu", seed=0)
    drafter = load_model("tiny", dtype="float32", device="cpu", seed=5)
    llm = LLM("tiny", dtype="float32", device="cpu", seed=0, block_size=16,
              num_kv_blocks=N + 64, max_num_seqs=N, max_num_batched_tokens=8 * N,
              speculative_config={"method": "draft_model", "model": drafter,
                                  "num_speculative_tokens": 2, "disable_by_batch_size": N})
    tok = llm.get_tokenizer()
    prompt = tok.encode("pick: ")
    ab = [tok.encode("a")[-1], tok.encode("b")[-1]]

    @torch.no_grad()
    def joint(model):
        out = {}
        for s in itertools.product((0, 1), repeat=3):
            p = 1.0
            for j in range(3):
                ids = prompt + [ab[c] for c in s[:j]]
                logits = model(torch.tensor(ids), AttentionMetadata.for_prompts([len(ids)]))[-1]
                p *= float(torch.softmax(logits[ab].double() / T, 0)[s[j]])
            out["".join("ab"[c] for c in s)] = p
        return out

    want, theirs = joint(target), joint(drafter)
    res = llm.generate([prompt], SamplingParams(n=N, temperature=T, max_tokens=6,
                                                structured_outputs={"regex": "[ab]{3}"}),
                       use_tqdm=False)[0]
    st = llm.stats()
    assert st["spec_num_draft_tokens"] >= N and 0 < st["spec_num_accepted_tokens"] < \
        st["spec_num_draft_tokens"]
    keys = sorted(want)
    counts = torch.tensor([sum(c.text == k for c in res.outputs) for k in keys],
                          dtype=torch.float64)
    assert counts.sum() == N
    assert _chi_square_p(counts, torch.tensor([want[k] for k in keys])) > 1e-4
    assert _chi_square_p(counts, torch.tensor([theirs[k] for k in keys])) < 1e-6   # power
