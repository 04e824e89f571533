"""Sequence classifiers, reward models and cross-encoder rerankers from a decoder
checkpoint: :class:`Classifier` (``minikernels serve --task classify`` serves it as vLLM's
``/classify``, ``/score`` and ``/rerank``).

Each input runs one cache-less forward (:class:`~.pooling_model.PoolingModel`); its last
token's final-normed hidden state h [H] goes through a head, in fp32:

- a ``XForSequenceClassification`` checkpoint (Llama, Qwen2/3, Mistral, Gemma, ... with a
  ``score`` linear, transformers' layout ``score.weight`` [num_labels, H], no bias):
  logits = score.weight @ h, as transformers (it pools the last non-padding token; inputs
  here are never padded);
- ``classifier_from_token=[t_1, ..., t_k]`` on a generative checkpoint: the lm_head's
  logits of those tokens (vLLM's option). Two tokens ``[no, yes]`` give one label scored
  ``logit(yes) - logit(no)``, whose sigmoid is P(yes | yes or no): how Qwen3-Reranker is
  run.

Probabilities: softmax over the labels, or a sigmoid per label when there is one label or
the config's ``problem_type`` is ``multi_label_classification`` (vLLM's defaults);
``activation`` overrides. A score (``/score``, ``/rerank``) needs one label: it is that
label's probability for the pair encoded as the tokenizer's ``(text_1, text_2)`` pair.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch

from ..models import AttentionMetadata
from ..models.config import is_classifier_architecture
from ..models.hub import resolve_model
from ..models.loader import checkpoint_files
from .pooling_model import PoolingInputError, PoolingModel

ClassifyInput = Union[str, Sequence[int]]
ACTIVATIONS = ("softmax", "sigmoid", "none")


class Classifier(PoolingModel):
    """A classifier: ``classify(inputs) -> [B, num_labels]`` probabilities (see the module
    docstring for the head and the activation).

    model: a HF checkpoint directory or hub id (a ``...ForSequenceClassification``
    checkpoint, or any of ours with ``classifier_from_token``), or a built-in name with
    ``classifier_from_token``. labels: ``id2label`` of the config (``LABEL_i`` when absent),
    or the label tokens.
    """

    task = "classify"

    def __init__(self, model: str, *, dtype: str = "bfloat16", device: Optional[str] = None,
                 tokenizer: Optional[str] = "auto", revision: Optional[str] = None,
                 quantization: Optional[str] = None, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: int = 8192, seed: int = 0,
                 classifier_from_token: Optional[Sequence[str]] = None,
                 activation: Optional[str] = None) -> None:
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        tokens = list(classifier_from_token) if classifier_from_token is not None else None
        if tokens is not None and (not tokens or not all(isinstance(t, str) and t
                                                         for t in tokens)):
            raise ValueError("classifier_from_token must be a non-empty list of tokens")
        path = resolve_model(model, revision)
        hf = _read_config(path)
        arch = (hf.get("architectures") or [None])[0]
        if tokens is None and not is_classifier_architecture(arch):
            raise ValueError(
                f"{model} is not a sequence classifier (architecture {arch!r}, no score "
                "head); pass classifier_from_token to classify with token logits (e.g. "
                "['no', 'yes'] for Qwen3-Reranker)")
        if tokens is not None and is_classifier_architecture(arch):
            raise ValueError(f"classifier_from_token reads an lm_head; {model} is a "
                             f"sequence classifier ({arch}) with its own score head")
        super().__init__(model, dtype=dtype, device=device, tokenizer=tokenizer,
                         revision=revision, quantization=quantization,
                         max_model_len=max_model_len,
                         max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                         lm_head=tokens is not None)
        self._score: Optional[torch.Tensor] = None       # [L, H] fp32
        self._token_ids: Optional[torch.Tensor] = None   # [k] int64 lm_head rows
        if tokens is None:
            self._score = _read_score_weight(path, self.hidden_size).to(self.model.device)
            n = self._score.shape[0]
            id2label = hf.get("id2label") or {}
            self.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                           for i in range(n)]
        else:
            self._token_ids = torch.tensor(self._label_token_ids(tokens),
                                           device=self.model.device)
            self.labels = tokens[1:] if len(tokens) == 2 else tokens
        self.num_labels = len(self.labels)
        multi = hf.get("problem_type") == "multi_label_classification"
        self.activation = activation or (
            "sigmoid" if self.num_labels == 1 or multi else "softmax")

    # ------------------------------------------------------------------ api
    def classify(self, inputs: Union[ClassifyInput, Sequence[ClassifyInput]]
                 ) -> torch.Tensor:
        """Probabilities [B, num_labels] fp32 (CPU) of texts or token-id lists (one input,
        or a list of them)."""
        return self.activate(self.logits_ids(self._ids_of(inputs)))

    def logits_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw logits [B, num_labels] fp32 (CPU) of token-id lists, checked first."""
        self.check(ids)
        return self._run(ids)

    async def classify_async(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Probabilities of token-id lists for concurrent async callers (their inputs
        share forwards, as :meth:`Embedder.embed_async`)."""
        self.check(ids)
        return await self._run_async(ids, self.activate)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] -> probabilities with this model's activation."""
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def pair_ids(self, text_1: str, text_2: str) -> list[int]:
        """A (query, document) pair's ids: the tokenizer's pair encoding."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return [int(t) for t in self.tokenizer.encode_pair(text_1, text_2)]

    def score(self, text_1: Union[str, Sequence[str]], text_2: Union[str, Sequence[str]]
              ) -> list[float]:
        """Relevance of each (text_1, text_2) pair, vLLM's pairing: one text_1 against
        every text_2, or the two lists zipped (equal lengths). Needs a one-label model."""
        pairs = score_pairs(text_1, text_2)
        self.check_scorer()
        probs = self.activate(self.logits_ids([self.pair_ids(a, b) for a, b in pairs]))
        return [float(p) for p in probs[:, 0]]

    def check_scorer(self) -> None:
        """ValueError unless the model scores pairs (exactly one label)."""
        if self.num_labels != 1:
            raise ValueError(f"scoring needs a model with one label; this one has "
                             f"{self.num_labels} ({self.labels})")

    def stats(self) -> dict:
        out = super().stats()
        out["classifications_total"] = out.pop("inputs_total")
        return out

    # ------------------------------------------------------------------ internals
    def _ids_of(self, inputs: Union[ClassifyInput, Sequence[ClassifyInput]]
                ) -> list[list[int]]:
        items = [inputs] if isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], int)) \
            else list(inputs)
        return [self.tokenize(x) if isinstance(x, str) else [int(t) for t in x]
                for x in items]

    def _label_token_ids(self, tokens: list[str]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("classifier_from_token needs the model's tokenizer")
        out = []
        for t in tokens:
            ids = self.tokenizer.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"classifier_from_token: {t!r} is {len(ids)} tokens "
                                 f"{list(ids)}; each label must be one token")
            out.append(int(ids[0]))
        return out

    @torch.inference_mode()
    def _forward(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        lengths = [len(x) for x in ids]
        dev = self.model.device
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64, device=dev)
        meta = AttentionMetadata.for_prompts(lengths, device=dev, last_only=True)
        if self._score is not None:
            logits = self.model.hidden_states(flat, meta, None).float() @ self._score.T
        else:
            logits = self.model(flat, meta, None).index_select(1, self._token_ids)
            if logits.shape[1] == 2:     # [no, yes] -> logit(yes) - logit(no)
                logits = logits[:, 1:] - logits[:, :1]
        self.num_forwards += 1
        return logits.float().cpu()


def score_pairs(text_1: Union[str, Sequence[str]], text_2: Union[str, Sequence[str]]
                ) -> list[tuple[str, str]]:
    """vLLM's score pairing: 1 x 1, 1 x N (text_1 against each text_2) or N x N (zipped).
    ValueError naming ``text_1`` / ``text_2`` otherwise."""
    a = [text_1] if isinstance(text_1, str) else list(text_1)
    b = [text_2] if isinstance(text_2, str) else list(text_2)
    if not a:
        raise PoolingInputError("text_1 is empty", None)
    if not b:
        raise PoolingInputError("text_2 is empty", None)
    if len(a) == 1:
        a = a * len(b)
    if len(a) != len(b):
        raise PoolingInputError(f"text_1 has {len(a)} items and text_2 {len(b)}: give one "
                                "text_1, or as many as text_2", None)
    return list(zip(a, b))


def _read_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return {}
    with open(cfg, encoding="utf-8") as f:
        return json.load(f)


def _read_score_weight(path: str, hidden_size: int) -> torch.Tensor:
    """``score.weight`` [num_labels, H] of a checkpoint, fp32 on the CPU."""
    from safetensors import safe_open

    for f in checkpoint_files(path):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(f, framework="pt") as st:
            if "score.weight" in st.keys():
                w = st.get_tensor("score.weight").float()
                if w.dim() != 2 or w.shape[1] != hidden_size or w.shape[0] < 1:
                    raise ValueError(f"{f}: score.weight must be [num_labels, {hidden_size}], "
                                     f"got {list(w.shape)}")
                if "score.bias" in st.keys():
                    raise ValueError(f"{f}: a score head with a bias is not supported")
                return w
    raise ValueError(f"{path} has no score.weight (the classification head)")
