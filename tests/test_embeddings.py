"""Embedding models: ``mk.Embedder`` against transformers' hidden states pooled by hand
(last token and mean, as the checkpoint's sentence-transformers files say), batching
invariance, Matryoshka ``dimensions``, input errors; and ``/v1/embeddings`` through the
official openai client (base64 and float encodings), with generation refused on an
embedding server and embeddings refused on a generative one."""
from __future__ import annotations

import asyncio
import json
import os

import httpx
import openai
import pytest
import torch
from test_model_support import make_hf_model, random_tokens, rel_err, save_hf

import minikernels as mk
from minikernels.engine import AsyncLLM
from minikernels.engine.embedding import EmbeddingInputError
from minikernels.models.pooling import PoolingConfig
from minikernels.server import create_app
from minikernels.server.testing import LiveServer

KEY = "embed-key"


def _sentence_transformers_files(path: str, mode: str, normalize: bool = True) -> None:
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    key = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens",
           "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}[mode]
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, key: True}, f)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    hf = make_hf_model("qwen3")
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("qwen3emb")))


@torch.no_grad()
def _reference(hf, seqs, mode: str) -> torch.Tensor:
    out = []
    for s in seqs:
        h = hf.model(torch.tensor([s])).last_hidden_state[0].float()
        v = h[-1] if mode == "last" else h.mean(0) if mode == "mean" else h[0]
        out.append(torch.nn.functional.normalize(v, dim=-1))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["last", "mean", "cls"])
def test_embeddings_match_transformers_pooled_by_hand(qwen3, tmp_path, mode):
    hf, src = qwen3
    path = str(tmp_path / "m")
    import shutil

    shutil.copytree(src, path)
    _sentence_transformers_files(path, mode)
    emb = mk.Embedder(path, dtype="float32", device="cpu", tokenizer=None,
                      max_num_batched_tokens=20)
    assert emb.pooling == PoolingConfig(mode, True)
    seqs = [random_tokens(n, 300, n) for n in (7, 1, 13, 9)]
    got = emb.embed(seqs)
    assert got.shape == (4, 64) and got.dtype == torch.float32
    assert rel_err(got, _reference(hf, seqs, mode)) <= 1e-4
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)
    # one at a time (other batches, other packing) gives the same vectors
    alone = torch.cat([emb.embed([s]) for s in seqs])
    assert (alone - got).abs().max() <= 1e-5
    emb.close()


def test_defaults_dimensions_and_errors(qwen3):
    hf, path = qwen3
    emb = mk.Embedder(path, dtype="float32", device="cpu", tokenizer=None, max_model_len=32,
                      normalize=False)
    assert emb.pooling == PoolingConfig("last", False)    # no sentence-transformers files
    seqs = [random_tokens(n, 300, 3 * n) for n in (5, 11)]
    raw = emb.embed(seqs)
    with torch.no_grad():
        want = torch.stack([hf.model(torch.tensor([s])).last_hidden_state[0, -1]
                            for s in seqs])
    assert rel_err(raw, want) <= 1e-4
    emb.pooling = PoolingConfig("last", True)
    short = emb.embed(seqs, dimensions=8)
    assert short.shape == (2, 8)
    assert torch.allclose(short, torch.nn.functional.normalize(raw[:, :8], dim=-1), atol=1e-6)
    for ids, dims, index, match in [([[1] * 33], None, 0, "maximum context length is 32"),
                                    ([[1, 2], [300]], None, 1, "outside the vocabulary"),
                                    ([[1], []], None, 1, "empty"),
                                    ([[1]], 65, None, "dimensions must be in")]:
        with pytest.raises(EmbeddingInputError, match=match) as exc:
            emb.embed_ids(ids, dims)
        assert exc.value.index == index
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        import tempfile

        d = tempfile.mkdtemp()
        _sentence_transformers_files(d, "max")
        PoolingConfig.from_checkpoint(d)
    emb.close()


# --------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def embed_server():
    emb = mk.Embedder("tiny-qwen3", dtype="float32", device="cpu", max_model_len=64)
    app = create_app(emb, api_key=KEY, served_model_name="tiny-embed")
    with LiveServer(app) as srv:
        yield srv, emb
    emb.close()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_openai_client_embeddings_round_trip(embed_server):
    srv, emb = embed_server
    client = _client(srv)
    texts = ["hello world", "a", "the same text in a batch"]
    want = emb.embed(texts)
    r = client.embeddings.create(model="tiny-embed", input=texts)   # base64 by default
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "tiny-embed"
    got = torch.tensor([d.embedding for d in r.data])
    assert (got - want).abs().max() <= 1e-6
    ids = [emb.tokenize(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    f = client.embeddings.create(model="tiny-embed", input="hello world",
                                 encoding_format="float", dimensions=16)
    vec = torch.tensor(f.data[0].embedding)
    assert vec.shape == (16,) and abs(float(vec.norm()) - 1) < 1e-5
    assert torch.allclose(vec, torch.nn.functional.normalize(want[0, :16], dim=-1),
                          atol=1e-6)
    tok = client.embeddings.create(model="tiny-embed", input=ids[0], encoding_format="float")
    assert torch.allclose(torch.tensor(tok.data[0].embedding), want[0], atol=1e-6)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": []}, "input", None),
    ({"input": ["ok", ""]}, "input[1]", None),
    ({"input": ["ok", "x" * 200]}, "input[1]", "context_length_exceeded"),
    ({"input": [[1, 2], [5000]]}, "input[1]", "invalid_value"),
    ({"input": [-1]}, "input", None),
    ({"input": "x", "dimensions": 0}, "dimensions", None),
    ({"input": "x", "dimensions": 65}, "dimensions", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": "x", "pooling": "max"}, "pooling", None),
])
def test_bad_embedding_requests_are_400_naming_the_field(embed_server, body, param, code):
    srv, _ = embed_server
    r = _post(srv, "/v1/embeddings", {"model": "tiny-embed", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    assert _post(srv, "/v1/embeddings", {"input": "still serving"}).status_code == 200


def test_an_embedding_server_does_not_generate_and_vice_versa(embed_server):
    srv, _ = embed_server
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "x"}]}),
                       ("/v1/responses", {"input": "x"})):
        r = _post(srv, path, {"model": "tiny-embed", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    engine = AsyncLLM.from_args("tiny", dtype="float32", device="cpu", enforce_eager=True,
                                num_kv_blocks=32)
    try:
        with LiveServer(create_app(engine, api_key=KEY, served_model_name="tiny")) as gen:
            r = _post(gen, "/v1/embeddings", {"input": "x"})
            assert r.status_code == 400 and "--task embed" in r.json()["error"]["message"]
    finally:
        asyncio.run(engine.shutdown())


def test_serve_task_embed_builds_an_embedder():
    import argparse

    from minikernels.server.cli import add_arguments, build_engine, describe_engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny-qwen3", "--task", "embed", "--dtype", "float32",
                              "--device", "cpu", "--max-model-len", "48",
                              "--max-num-batched-tokens", "100"])
    emb = build_engine(args)
    try:
        assert isinstance(emb, mk.Embedder) and emb.task == "embed"
        assert emb.max_model_len == 48 and emb.max_num_batched_tokens == 100
        assert "float32" in describe_engine(emb, args)
    finally:
        emb.close()


def test_a_checkpoint_without_lm_head_embeds(qwen3, tmp_path):
    """Embedding checkpoints (Qwen3-Embedding-8B's kind) often store no lm_head: the
    Embedder neither reads nor allocates one; a generative load still asks for it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from minikernels.models import load_model
    from minikernels.models.loader import CheckpointError

    hf, src = qwen3
    assert not hf.config.tie_word_embeddings
    path = str(tmp_path / "headless")
    shutil.copytree(src, path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, f,   # Qwen3Model names
              metadata={"format": "pt"})
    emb = mk.Embedder(path, dtype="float32", device="cpu", tokenizer=None)
    assert emb.model.lm_head.weight is None
    seqs = [random_tokens(n, 300, n) for n in (6, 10)]
    assert rel_err(emb.embed(seqs), _reference(hf, seqs, "last")) <= 1e-4
    emb.close()
    with pytest.raises(CheckpointError, match="lm_head"):
        load_model(path, dtype="float32", device="cpu")


def test_concurrent_async_callers_share_forwards(qwen3):
    """Requests that arrive while the worker is busy go into its next forward together,
    and each gets exactly the vectors it would get alone (its own ``dimensions``)."""
    _, path = qwen3
    emb = mk.Embedder(path, dtype="float32", device="cpu", tokenizer=None,
                      max_num_batched_tokens=64)
    requests = [([random_tokens(3 + i % 5, 300, i)], 8 if i % 3 == 0 else None)
                for i in range(12)]
    want = [emb.embed_ids(ids, dims) for ids, dims in requests]
    before = emb.num_forwards

    async def run():
        return await asyncio.gather(*(emb.embed_async(ids, dims) for ids, dims in requests))

    got = asyncio.run(run())
    used = emb.num_forwards - before
    assert used <= 3, used               # 12 requests of <= 7 tokens, budget 64
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-5
    with pytest.raises(EmbeddingInputError, match="outside the vocabulary"):
        asyncio.run(emb.embed_async([[999]]))
    emb.close()
