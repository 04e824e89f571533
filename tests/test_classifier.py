"""Sequence classifiers, reward models and rerankers: ``mk.Classifier`` against
transformers' ``XForSequenceClassification`` (logits, labels, softmax / sigmoid), pair
scoring against the pair encoding run by hand, ``classifier_from_token`` against the
lm_head's logits (Qwen3-Reranker's yes / no), batching, errors; and vLLM's ``/classify``,
``/score`` and ``/rerank`` routes through a live server (``--task classify``)."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from test_model_support import (_CONFIG_CLASSES, BASE, CASES, random_tokens, randomize_,
                                rel_err)

import minikernels as mk
from minikernels.engine import AsyncLLM
from minikernels.engine.pooling_model import PoolingInputError
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.loader import CheckpointError
from minikernels.server import create_app
from minikernels.server.testing import LiveServer

KEY = "classify-key"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _hf_classifier(kind: str, num_labels: int, seed: int = 0, **extra):
    """A tiny transformers ``XForSequenceClassification`` with random non-trivial
    weights, fp32."""
    import transformers

    family, overrides = CASES[kind]
    cfg_cls = getattr(transformers, _CONFIG_CLASSES.get(family, f"{family}Config"))
    labels = {i: LABELS.get(i, f"L{i}") for i in range(num_labels)} if num_labels > 1 \
        else {0: "relevant"}
    config = cfg_cls(**{**BASE, **overrides, **extra}, num_labels=num_labels,
                     id2label=labels, label2id={v: k for k, v in labels.items()})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForSequenceClassification")(config)
    return randomize_(model.float().eval(), seed + 1)


@torch.no_grad()
def _hf_logits(hf, seqs) -> torch.Tensor:
    return torch.stack([hf(torch.tensor([s])).logits[0].float() for s in seqs])


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    hf = _hf_classifier("qwen3", 3)
    path = str(tmp_path_factory.mktemp("qwen3cls"))
    hf.save_pretrained(path)
    return hf, path


def _save_pair_tokenizer(path: str) -> None:
    """A byte-level BPE (vocab <= 300) whose pair encoding is ``<s> A </s> B``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["apples are red bananas the sky"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    s, e = bpe.token_to_id("<s>"), bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", s), ("</s>", e)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    hf = _hf_classifier("llama", 1, seed=3)
    path = str(tmp_path_factory.mktemp("llamarank"))
    hf.save_pretrained(path)
    _save_pair_tokenizer(path)
    return hf, path


def test_hf_pair_encoding(reranker):
    """The checkpoint tokenizer's pair template (``<s> A </s> B``), as vLLM's score API
    encodes a cross-encoder's (query, document)."""
    from minikernels.models import load_tokenizer

    tok = load_tokenizer(reranker[1])
    a, b = tok.encode("apples", add_special_tokens=False), tok.encode(
        "the sky", add_special_tokens=False)
    s, e = tok.tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    assert tok.encode_pair("apples", "the sky") == [s, *a, e, *b]


@pytest.mark.parametrize("kind", ["qwen3", "llama", "gemma2-window-softcap", "qwen2-tied",
                                  "phi3-longrope-partial",
                                  # reward models of the older families (Pythia's
                                  # OpenAssistant RMs, GPT-2 / BLOOM / OPT heads)
                                  "gpt_neox", "gpt2", "bloom", "opt", "falcon-7b", "mpt",
                                  "gptj"])
def test_logits_match_transformers(kind, tmp_path):
    hf = _hf_classifier(kind, 3, seed=len(kind))
    hf.save_pretrained(str(tmp_path))
    clf = mk.Classifier(str(tmp_path), dtype="float32", device="cpu", tokenizer=None,
                        max_num_batched_tokens=24)
    seqs = [random_tokens(n, 300, n) for n in (1, 5, 17, 30)]
    want = _hf_logits(hf, seqs)
    got = clf.logits_ids(seqs)            # 2 forwards: [1, 5, 17] and [30] (budget 24)
    assert got.dtype == torch.float32 and got.shape == (4, 3)
    assert rel_err(got, want) <= 1e-4, (got, want)
    assert clf.num_forwards == 2
    assert clf.labels == ["negative", "neutral", "positive"] and clf.activation == "softmax"
    probs = clf.classify(seqs)
    assert torch.allclose(probs, torch.softmax(want, -1), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    clf.close()


def test_one_label_scores_pairs_and_multi_label_is_sigmoid(reranker, tmp_path):
    hf, path = reranker
    clf = mk.Classifier(path, dtype="float32", device="cpu", tokenizer="tiny")
    assert clf.num_labels == 1 and clf.labels == ["relevant"] and clf.activation == "sigmoid"
    tok = clf.tokenizer
    docs = ["red apples", "a short doc", "nothing at all"]
    pairs = [tok.encode_pair("fruit?", d) for d in docs]
    assert pairs[0] == tok.encode("fruit?") + [tok.EOS] + list(b"red apples")
    want = torch.sigmoid(_hf_logits(hf, pairs)[:, 0])
    got = torch.tensor(clf.score("fruit?", docs))                       # 1 x N
    assert torch.allclose(got, want, atol=1e-5)
    zipped = clf.score(["fruit?"] * 3, docs)                            # N x N
    assert torch.allclose(torch.tensor(zipped), want, atol=1e-5)
    with pytest.raises(PoolingInputError, match="text_1 has 2 items and text_2 3"):
        clf.score(["a", "b"], docs)
    clf.close()
    # problem_type multi_label_classification: a sigmoid per label
    multi = _hf_classifier("qwen3", 2, problem_type="multi_label_classification")
    multi.save_pretrained(str(tmp_path))
    clf = mk.Classifier(str(tmp_path), dtype="float32", device="cpu", tokenizer=None)
    seqs = [random_tokens(6, 300, 1)]
    assert clf.activation == "sigmoid"
    assert torch.allclose(clf.classify(seqs), torch.sigmoid(_hf_logits(multi, seqs)),
                          atol=1e-5)
    with pytest.raises(ValueError, match="scoring needs a model with one label"):
        clf.score("a", "b")
    clf.close()


def test_classifier_from_token_reads_the_lm_head():
    """Two label tokens [no, yes]: one label, logit(yes) - logit(no) (Qwen3-Reranker);
    k tokens: their k logits, softmax."""
    ref = load_model("tiny", dtype="float32", device="cpu")
    seqs = [list(b"is it?"), list(b"query: x doc: y")]

    def lm_logits(tokens):
        out = []
        for s in seqs:
            meta = AttentionMetadata.for_prompts([len(s)], device="cpu", last_only=True)
            out.append(ref(torch.tensor(s), meta, None)[0, tokens])
        return torch.stack(out)

    yes_no = mk.Classifier("tiny", dtype="float32", device="cpu",
                           classifier_from_token=["n", "y"])
    assert yes_no.labels == ["y"] and yes_no.activation == "sigmoid"
    lo = lm_logits([ord("n"), ord("y")])
    got = yes_no.classify(seqs)
    assert torch.allclose(got[:, 0], torch.sigmoid(lo[:, 1] - lo[:, 0]), atol=1e-5)
    assert torch.allclose(got[:, 0], torch.softmax(lo, -1)[:, 1], atol=1e-5)
    three = mk.Classifier("tiny", dtype="float32", device="cpu",
                          classifier_from_token=["a", "b", "c"])
    assert three.labels == ["a", "b", "c"] and three.activation == "softmax"
    assert torch.allclose(three.classify(seqs), torch.softmax(lm_logits([97, 98, 99]), -1),
                          atol=1e-5)
    for c in (yes_no, three):
        c.close()


def test_errors(sentiment):
    _, path = sentiment
    with pytest.raises(CheckpointError, match="sequence classifier.*--task classify"):
        load_model(path, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="not a sequence classifier.*classifier_from_token"):
        mk.Classifier("tiny", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="with its own score head"):
        mk.Classifier(path, dtype="float32", device="cpu", classifier_from_token=["a", "b"])
    with pytest.raises(ValueError, match="'no' is 2 tokens"):
        mk.Classifier("tiny", dtype="float32", device="cpu", classifier_from_token=["no", "y"])
    for bad in ([], [""], "yes"):
        with pytest.raises(ValueError, match="classifier_from_token must be"):
            mk.Classifier("tiny", dtype="float32", device="cpu",
                          classifier_from_token=bad if bad != "yes" else [1])
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.Classifier(path, dtype="float32", device="cpu", activation="relu")
    clf = mk.Classifier(path, dtype="float32", device="cpu", tokenizer=None,
                        max_model_len=16)
    for ids, index, match in [([], 0, "no inputs"), ([[1], []], 1, "empty"),
                              ([[1] * 17], 0, "maximum context length is 16"),
                              ([[1], [300]], 1, "outside the vocabulary")]:
        with pytest.raises(PoolingInputError, match=match) as exc:
            clf.logits_ids(ids)
        assert exc.value.index == index
    clf.close()


def test_concurrent_async_callers_share_forwards(sentiment):
    _, path = sentiment
    clf = mk.Classifier(path, dtype="float32", device="cpu", tokenizer=None,
                        max_num_batched_tokens=64)
    requests = [[random_tokens(3 + i % 5, 300, i)] for i in range(12)]
    want = [clf.classify(ids) for ids in requests]
    before = clf.num_forwards

    async def run():
        return await asyncio.gather(*(clf.classify_async(ids) for ids in requests))

    got = asyncio.run(run())
    assert clf.num_forwards - before <= 3
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5
    assert clf.stats()["classifications_total"] == 24
    clf.close()


# --------------------------------------------------------------------------- server
def _post(srv, path: str, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def servers(sentiment, reranker):
    sent = mk.Classifier(sentiment[1], dtype="float32", device="cpu", tokenizer="tiny",
                         max_model_len=64)
    rank = mk.Classifier(reranker[1], dtype="float32", device="cpu", max_model_len=64)
    with LiveServer(create_app(sent, api_key=KEY, served_model_name="sent")) as s1, \
            LiveServer(create_app(rank, api_key=KEY, served_model_name="rank")) as s2:
        yield (s1, sent), (s2, rank)
    sent.close()
    rank.close()


def test_classify_route(servers):
    (srv, clf), _ = servers
    texts = ["great film", "meh", "awful"]
    r = _post(srv, "/classify", {"model": "sent", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    want = clf.classify(texts)
    assert body["object"] == "list" and body["model"] == "sent"
    assert body["id"].startswith("classify-")
    for i, d in enumerate(body["data"]):
        assert d["index"] == i and d["num_classes"] == 3
        assert torch.allclose(torch.tensor(d["probs"]), want[i], atol=1e-6)
        assert d["label"] == clf.labels[int(want[i].argmax())]
    n = sum(len(clf.tokenize(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}
    one = _post(srv, "/classify", {"input": clf.tokenize("meh")}).json()["data"]
    assert len(one) == 1 and torch.allclose(torch.tensor(one[0]["probs"]), want[1],
                                            atol=1e-6)


def test_score_and_rerank_routes(servers):
    _, (srv, clf) = servers
    docs = ["apples are red", "bananas", "the sky", "apples"]
    want = clf.score("apples?", docs)
    for path in ("/score", "/v1/score"):
        r = _post(srv, path, {"model": "rank", "text_1": "apples?", "text_2": docs}).json()
        assert r["object"] == "list" and r["id"].startswith("score-")
        assert [d["index"] for d in r["data"]] == [0, 1, 2, 3]
        assert all(d["object"] == "score" for d in r["data"])
        assert torch.allclose(torch.tensor([d["score"] for d in r["data"]]),
                              torch.tensor(want), atol=1e-6)
    zipped = _post(srv, "/score", {"text_1": ["apples?"] * 2, "text_2": docs[:2]}).json()
    assert [round(d["score"], 6) for d in zipped["data"]] == [round(w, 6) for w in want[:2]]
    order = sorted(range(4), key=lambda i: -want[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = _post(srv, path, {"model": "rank", "query": "apples?", "documents": docs,
                              "top_n": 2}).json()
        assert [x["index"] for x in r["results"]] == order[:2], r
        assert [x["document"]["text"] for x in r["results"]] == [docs[i] for i in order[:2]]
        assert abs(r["results"][0]["relevance_score"] - want[order[0]]) < 1e-6
        assert r["usage"]["total_tokens"] == sum(len(clf.pair_ids("apples?", d))
                                                 for d in docs)
    bare = _post(srv, "/rerank", {"query": "q", "documents": docs,
                                  "return_documents": False}).json()["results"]
    assert len(bare) == 4 and all("document" not in x for x in bare)


@pytest.mark.parametrize(("which", "path", "body", "param", "code"), [
    (0, "/classify", {"input": []}, "input", None),
    (0, "/classify", {"input": ["ok", "x" * 200]}, "input[1]", "context_length_exceeded"),
    (0, "/classify", {"input": [[1, 2], [5000]]}, "input[1]", "invalid_value"),
    (0, "/classify", {"input": "x", "dimensions": 3}, "dimensions", None),
    (0, "/score", {"text_1": "a", "text_2": "b"}, "model", "model_not_supported"),
    (0, "/v1/embeddings", {"input": "x"}, "model", "model_not_supported"),
    (0, "/v1/completions", {"prompt": "x"}, "model", "model_not_supported"),
    (1, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", None),
    (1, "/score", {"text_1": "a", "text_2": []}, "text_2", None),
    (1, "/score", {"text_1": "a", "text_2": ["ok", "y" * 100]}, "text_2[1]",
     "context_length_exceeded"),
    (1, "/rerank", {"query": "q", "documents": []}, "documents", None),
    (1, "/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n", None),
    (1, "/rerank", {"query": "q" * 100, "documents": ["a"]}, "documents[0]",
     "context_length_exceeded"),
    (1, "/rerank", {"query": "q", "documents": ["a"], "model": "other"}, "model",
     "model_not_found"),
])
def test_bad_requests_are_4xx_naming_the_field(servers, which, path, body, param, code):
    srv, _ = servers[which]
    r = _post(srv, path, body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    assert _post(srv, "/classify" if which == 0 else "/rerank",
                 {"input": "still"} if which == 0 else
                 {"query": "q", "documents": ["d"]}).status_code == 200


def test_auth_and_a_generative_server_refuses(servers):
    (srv, _), _ = servers
    assert _post(srv, "/classify", {"input": "x"}, key="wrong").status_code == 401
    engine = AsyncLLM.from_args("tiny", dtype="float32", device="cpu", enforce_eager=True,
                                num_kv_blocks=32)
    try:
        with LiveServer(create_app(engine, api_key=KEY, served_model_name="tiny")) as gen:
            for path, body in (("/classify", {"input": "x"}),
                               ("/rerank", {"query": "q", "documents": ["d"]})):
                r = _post(gen, path, body)
                assert r.status_code == 400 and "--task classify" in r.json()["error"]["message"]
    finally:
        asyncio.run(engine.shutdown())


def test_serve_task_classify_builds_a_classifier(reranker):
    import argparse

    from minikernels.server.cli import add_arguments, build_engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([reranker[1], "--task", "classify", "--dtype", "float32",
                              "--device", "cpu", "--max-model-len", "48"])
    clf = build_engine(args)
    try:
        assert isinstance(clf, mk.Classifier) and clf.task == "classify"
        assert clf.max_model_len == 48 and clf.num_labels == 1
    finally:
        clf.close()
    args = parser.parse_args(["tiny", "--task", "classify", "--classifier-from-token", "0",
                              "1", "--dtype", "float32", "--device", "cpu"])
    clf = build_engine(args)
    assert clf.labels == ["1"]
    clf.close()
    with pytest.raises(ValueError, match="needs --task classify"):
        build_engine(parser.parse_args(["tiny", "--classifier-from-token", "0", "1"]))
