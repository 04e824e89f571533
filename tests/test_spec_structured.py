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


def test_sampled_constrained_rows_with_ngram_stay_valid_and_reproducible():
    params = _params(temperature=0.9, seed=5)
    runs = []
    for _ in range(2):
        llm = _llm(NGRAM)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        _check_valid(outs, params)
        runs.append([o.outputs[0].token_ids for o in outs])
        assert sum(o.metrics["spec_num_draft_tokens"] for o in outs) > 0
    assert runs[0] == runs[1]


def test_sampled_constrained_rows_get_point_mass_drafts_from_a_model():
    """A draft model at temperature > 0: cutting randomly drawn drafts at a refused one
    would bias the output, so constrained sampled rows draft the argmax as a point mass
    (exact with the cut); free rows keep sampled drafts. Outputs stay valid, reproduce
    run to run, and constrained rows are drafted for."""
    spec = {"method": "draft_model", "model": "tiny", "num_speculative_tokens": 3}
    params = _params(temperature=0.9, seed=5)
    runs = []
    for _ in range(2):
        llm = _llm(spec)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        _check_valid(outs, params)
        runs.append([o.outputs[0].token_ids for o in outs])
        # (the draft knows no grammar: most of its argmax drafts are refused and cut)
        assert sum(o.metrics["spec_num_draft_tokens"] for o, p in zip(outs, params)
                   if p.structured_outputs is not None) > 0
        llm.llm_engine.check_no_leaks()
    assert runs[0] == runs[1]


def test_point_mass_drafts_for_sampled_constrained_rows():
    """DraftSampler._sample: a sampled row with a constraint drafts its argmax with a
    one-hot probability row; a sampled free row draws from its distribution."""
    import torch

    from minikernels.engine.draft_model import DraftSampler
    from minikernels.engine.sampler import Sampler

    class Rows(DraftSampler):
        def __init__(self):
            self.k, self.vocab_size, self.common_vocab = 2, 16, 16
            self.device = torch.device("cpu")
            self.sampler = Sampler(16, self.device, 0)
            self.eos_token_ids = []

        def propose(self, seqs, max_tokens):
            raise NotImplementedError

    class Seq:
        def __init__(self, params):
            self.params, self.generator = params, None

    logits = torch.randn(3, 16)
    seqs = [Seq(SamplingParams(temperature=1.0, structured_outputs={"regex": "a+"})),
            Seq(SamplingParams(temperature=1.0)), Seq(SamplingParams(temperature=0.0))]
    tok, probs = Rows()._sample(logits, seqs)
    assert tok[0] == logits[0].argmax() and probs[0].tolist() == \
        torch.nn.functional.one_hot(tok[0], 16).float().tolist()
    assert abs(float(probs[1].sum()) - 1.0) < 1e-5 and probs[1].max() < 1.0
    assert tok[2] == logits[2].argmax() and float(probs[2].abs().sum()) == 0.0


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
