"""``minikernels generate`` (run_generate), the generation loop, and the tokenizers."""
from __future__ import annotations

import argparse
import io

import pytest
import torch
from test_model_support import make_hf_model, save_hf

from minikernels.models import ByteTokenizer, load_model, load_tokenizer
from minikernels.models.generate import (add_generate_arguments, generate_tokens, run_generate,
                                         sample_next)

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "user",
         "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> "
                 "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> str:
    """A tiny saved Llama with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ":": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    for i in range(len(vocab), 300):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    save_hf(make_hf_model("llama", seed=7), path)
    fast.save_pretrained(path)
    return path


def _args(**kw) -> argparse.Namespace:
    parser = add_generate_arguments(argparse.ArgumentParser())
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)


def test_hf_tokenizer_and_chat_template(tiny_hf_dir):
    tok = load_tokenizer(tiny_hf_dir)
    ids = tok.encode("hello world")
    assert ids == [1, 4, 5]
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert tok.decode([1, 4, 5, 2]) == "hello world"
    assert tok.eos_token_ids == [2] and tok.vocab_size == 300
    chat = tok.apply_chat_template([{"role": "user", "content": "the cat"}])
    assert chat == tok.encode("<s> user : the cat </s> <s> assistant :",
                              add_special_tokens=False)


def test_chat_with_a_template_of_the_callers(tiny_hf_dir):
    """LLM.chat(chat_template=...): the conversation rendered by the given Jinja template
    instead of the tokenizer's (vLLM's argument); the byte tokenizer refuses one."""
    import minikernels as mk

    llm = mk.LLM(tiny_hf_dir, dtype="float32", device="cpu", num_kv_blocks=32, block_size=8)
    template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant :{% endif %}")
    p = mk.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    [out] = llm.chat([{"role": "user", "content": "the cat"}], p, use_tqdm=False,
                     chat_template=template)
    assert out.prompt_token_ids == llm.get_tokenizer().encode("the cat assistant :",
                                                              add_special_tokens=False)
    [default] = llm.chat([{"role": "user", "content": "the cat"}], p, use_tqdm=False)
    assert default.prompt_token_ids != out.prompt_token_ids
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat([{"role": "user", "content": "x"}], p, chat_template="  ")
    byte = mk.LLM("tiny", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="chat_template"):
        byte.chat([{"role": "user", "content": "x"}], p, chat_template=template)


def test_run_generate_hf_dir_matches_transformers(tiny_hf_dir, capsys):
    from transformers import AutoModelForCausalLM

    rc = run_generate(_args(model=tiny_hf_dir, prompt="the cat sat", max_tokens=6,
                            dtype="float32", device="cpu"))
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(tiny_hf_dir)
    ids = tok.encode("the cat sat")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                      eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
    assert printed and printed == tok.decode(ref).strip()


def test_run_generate_chat_and_sampling(tiny_hf_dir, capsys):
    rc = run_generate(_args(model=tiny_hf_dir, prompt="hello", max_tokens=4, chat=True,
                            system="a dog", temperature=0.8, top_p=0.9, seed=3,
                            dtype="float32", device="cpu"))
    assert rc == 0
    first = capsys.readouterr().out
    run_generate(_args(model=tiny_hf_dir, prompt="hello", max_tokens=4, chat=True,
                       system="a dog", temperature=0.8, top_p=0.9, seed=3, dtype="float32",
                       device="cpu"))
    assert capsys.readouterr().out == first  # seeded


def test_run_generate_builtin_tiny(capsys, monkeypatch):
    rc = run_generate(_args(model="tiny", prompt="Hello", max_tokens=5, device="cpu"))
    assert rc == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert run_generate(_args(model="tiny", prompt="-", max_tokens=3, chat=True,
                              device="cpu", quantization="int4")) == 0


def test_run_generate_errors(capsys):
    assert run_generate(_args(model="no-such-model", prompt="x", device="cpu")) == 1
    assert "neither" in capsys.readouterr().err
    assert run_generate(_args(model="tiny", prompt="x", max_tokens=0, device="cpu")) == 2


def test_byte_tokenizer():
    tok = load_tokenizer("tiny")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode("héllo")
    assert ids[0] == 256 and tok.decode(ids) == "héllo"
    assert tok.decode(ids + [257]) == "héllo"           # specials skipped
    assert tok.decode([104, 400]) == "h<400>"            # non-byte ids of dummy vocabularies
    assert tok.decode([258], skip_special_tokens=False) == "<|im_start|>"
    assert 257 in tok.eos_token_ids and tok.vocab_size >= 260
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=False) == \
        "<bos><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    big = load_tokenizer("qwen3-0.6b")
    assert big.vocab_size == 151936
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_generate_tokens_stops_at_eos_and_checks_lengths():
    model = load_model("tiny", dtype="float32", device="cpu")
    prompt = [256, 72, 105]
    free = generate_tokens(model, [prompt], max_new_tokens=6)[0]
    assert len(free) == 6
    stop = free[2]
    cut = generate_tokens(model, [prompt], max_new_tokens=6, eos_token_ids=[stop])[0]
    assert cut == free[:free.index(stop) + 1]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_tokens(model, [prompt], max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]])


def test_sample_next():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.5, g) for _ in range(50)])
    assert draws.tolist() == [[1, 0]] * 50   # top-p 0.5 keeps only the top token
    hot = torch.stack([sample_next(torch.zeros(1, 4), 1.0, 1.0, g) for _ in range(200)])
    assert len(set(hot.flatten().tolist())) == 4
