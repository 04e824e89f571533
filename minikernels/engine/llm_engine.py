"""LLMEngine (add requests, step, abort) and LLM (offline batched generation).

One engine step (``async_scheduling=False``)::

    batch = scheduler.schedule()                  # which tokens run (may preempt)
    step = launch(batch)                          # forward + sampling, on the device
    finish(step)                                  # tokens to the host; stops, text; free

With ``async_scheduling=True`` (overlap) the host does not wait for its own step::

    batch = scheduler.schedule()                  # counts the in-flight step's tokens
    step, in_flight = in_flight, launch(batch)    # inputs still on the device are read there
    finish(step)                                  # the previous step, while this one runs

so scheduling, input building, stop checks and detokenization of one step overlap the
device's work on the next. See docs/engine.md ("Overlap").
"""
from __future__ import annotations

import atexit
import gc
import dataclasses
import itertools
import os
import logging
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..models.eagle import EAGLE_METHODS, EagleHead, load_eagle_head
from ..models.kv_cache_dtype import resolve_kv_cache_dtype
from ..models.kv_layout import KVCacheLayout, plan_kv_layout
from .block_manager import BlockManager
from .draft_model import (DraftModelProposer, check_vocab, load_draft_model,
                          load_draft_tokenizer)
from .eagle import EagleProposer
from .generation_config import sampling_defaults
from .model_runner import ModelRunner
from .outputs import Logprob, RequestOutput
from .beam_search import BeamSearchOutput, BeamSearchParams
from .lora import EngineLoRA, LoRARequest
from .bad_words import banned_next_tokens, tokenize_bad_words
from .sampler import DeviceSample, Sampler, SamplerOutput, needs_host_tokens
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, Sequence, SequenceStatus
from .state_cache import StateCheckpoints
from .spec_decode import Proposer, SpeculativeConfig, make_proposer
from .structured_outputs import StructuredOutputManager

logger = logging.getLogger("minikernels.engine")


def _load_tokenizer(model: str) -> Any:
    """The model's tokenizer, or None when it has none (token-id prompts only)."""
    try:
        from ..models import load_tokenizer
    except ImportError:  # pragma: no cover - models layer without tokenizers
        return None
    try:
        return load_tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer"
        logger.warning("no tokenizer for %s (%s); prompts must be token ids and outputs "
                       "have no text", model, exc)
        return None


class EngineSleeping(RuntimeError):
    """A request reached an engine put to sleep (``LLMEngine.sleep``; wake_up first)."""


def salted_for_lora(params: SamplingParams) -> SamplingParams:
    """``params`` with its adapter's id leading its prefix-cache salt (length-prefixed,
    so no other adapter id spells it), so different adapters never share cached KV;
    unchanged without a LoRA request or when already salted (idempotent)."""
    if params.lora_request is None:
        return params
    lid = str(params.lora_request.lora_int_id)
    tag = f"lora:{len(lid)}:{lid};"
    if (params.cache_salt or "").startswith(tag):
        return params
    return dataclasses.replace(params, cache_salt=tag + (params.cache_salt or ""))


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


_unfreeze_registered = False


def _freeze_gc_heap() -> None:
    """gc.freeze() what exists now; unfrozen at exit so interpreter teardown still frees
    it (extension modules check for leaks there)."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


@dataclass
class LaunchedStep:
    """A step whose forward and sampling were launched on the device.

    seqs[i] sampled row i of ``sample``; ``host`` are the device->host copies of its
    tensors (started, maybe not finished), ``event`` completes when they are.
    needs_host_tokens: a sampled sequence needs its new token on the host before the next
    step samples (penalties read the output tokens, grammars fill the next mask): the
    next launch reads this step back after its forward is launched (before it when a
    proposer drafts from the host tokens).
    prompt_lp: (sequence, first prompt position, count, top-k) per prompt-logprob slice,
    in the row order of ``prompt_lp_host`` (chosen, ranks, top_lp, top_ids copies).
    """

    batch: ScheduledBatch
    seqs: list[Sequence]
    sample: DeviceSample | None
    host: list[Tensor | None]
    event: Any
    needs_host_tokens: bool
    prompt_lp: list[tuple[Sequence, int, int, int]] | None = None
    prompt_lp_host: list[Tensor | None] | None = None
    spec_seqs: list[Sequence] | None = None     # speculative rows (not in ``seqs``)
    spec_host: list[Tensor | None] | None = None  # their [B, K + 1] tokens (-1 padded),
    # then logprobs (chosen, ranks, top_lp, top_ids; None when no row asks)
    # recurrent models: each speculative row's state snapshot slot (its state before the
    # step), restored when a draft is rejected
    spec_snapshots: list[int] | None = None
    # structured outputs: the rows this step masked (their automata are matched in bulk),
    # and with device-resident automata their codes after this step (a host copy)
    grammar_rows: Any = None
    grammar_codes: Any = None

    def result(self) -> SamplerOutput:
        """Wait for the device, then the sampled tokens (and logprobs) as lists."""
        self.event.synchronize()
        if self.sample is None:
            return SamplerOutput(token_ids=[])
        tokens, chosen, ranks, top_lp, top_ids = self.host
        return DeviceSample(tokens, self.sample.want_lp, chosen, ranks, top_lp,
                            top_ids).to_host()


class _Throughput:
    """Generated tokens per second over the last ``window`` seconds, O(1) per step
    (one counter per whole second)."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.buckets: deque[list[float]] = deque()   # [second, tokens]

    def add(self, now: float, n: int) -> None:
        sec = int(now)
        b = self.buckets
        if b and b[-1][0] == sec:
            b[-1][1] += n
        else:
            b.append([sec, n])
            while b and now - b[0][0] > self.window + 1:
                b.popleft()

    def rate(self, now: float) -> float:
        recent = [(t, n) for t, n in list(self.buckets) if now - t <= self.window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-6)


def _draft_bad_words(bad_ids: list[list[int]], output: list[int], drafts: list[int]
                     ) -> tuple[list[int], list[list[int]]]:
    """(the drafts up to the first banned one, the banned ids at each verification
    position 0..m): position j bans the tokens that would complete a bad word after the
    output and the first j drafts, as plain decoding does there."""
    context = list(output)
    banned: list[list[int]] = []
    for j, d in enumerate(drafts):
        banned.append(banned_next_tokens(bad_ids, context))
        if d in banned[-1]:
            return list(drafts[:j]), banned
        context.append(d)
    banned.append(banned_next_tokens(bad_ids, context))
    return list(drafts), banned


class LLMEngine:
    """The serving engine: requests in, one batched step at a time, outputs out.

    Not thread-safe: one thread (the caller of LLM.generate, or AsyncLLM's engine
    thread) drives it. Arguments: see :class:`LLM`.
    """

    def __init__(self, model: str | torch.nn.Module, dtype: str | torch.dtype = "bfloat16",
                 quantization: str | None = None, block_size: int = 64,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 seed: int = 0, tokenizer: Any = "auto", tensor_parallel_size: int = 1,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 speculative_config: dict[str, Any] | None = None,
                 revision: str | None = None, generation_config: str = "auto",
                 enable_lora: bool = False, max_loras: int = 4, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None,
                 disable_hybrid_kv_cache_manager: bool = False,
                 state_checkpoint_interval: int | None = None,
                 state_checkpoint_slots: int | None = None,
                 structured_outputs_config: dict[str, Any] | None = None) -> None:
        _check_int("block_size", block_size, 1)
        self._structured_backend = _structured_backend(structured_outputs_config)
        if revision is not None and not isinstance(revision, str):
            raise TypeError(f"revision must be a str or None, got {type(revision).__name__}")
        if isinstance(model, str):
            # a hub id -> its snapshot in the hub cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN);
            # directories and built-in names pass through; the id stays the model's name
            from ..models.hub import resolve_model
            name, model = model, resolve_model(model, revision)
        # The checkpoint's recommended sampling (generation_config.json), vLLM's default.
        self.sampling_defaults = sampling_defaults(
            model if isinstance(model, str) else None, generation_config)
        self.spec_config = SpeculativeConfig.from_dict(speculative_config)
        self._model_dir = model if isinstance(model, str) and os.path.isdir(model) else None
        _check_int("max_num_seqs", max_num_seqs, 1)
        _check_int("max_num_batched_tokens", max_num_batched_tokens, 1)
        if max_model_len is not None:
            _check_int("max_model_len", max_model_len, 1)
        _check_int("seed", seed, 0)
        if async_scheduling is not None and not isinstance(async_scheduling, bool):
            raise TypeError(f"async_scheduling must be a bool or None, got "
                            f"{type(async_scheduling).__name__}")
        _check_int("tensor_parallel_size", tensor_parallel_size, 1)
        if (tensor_parallel_size > 1 and self.spec_config is not None
                and self.spec_config.method in EAGLE_METHODS
                and not (isinstance(model, str) and os.path.isdir(model))):
            raise ValueError(f"speculative_config.method {self.spec_config.method!r} with "
                             f"tensor_parallel_size > 1 needs the target as a checkpoint "
                             f"directory or hub id (the head reads whole copies of its "
                             f"embedding / lm_head from it), got {model!r}")
        if tensor_parallel_size > 1 and not isinstance(model, str):
            raise TypeError("tensor_parallel_size > 1 needs a model name or directory (each "
                            "rank loads its own shard), not a built model")
        if tensor_parallel_size > 1:
            from ..distributed import launch_tensor_parallel
            self.model = launch_tensor_parallel(model, tensor_parallel_size, device=device,
                                                dtype=dtype, quantization=quantization,
                                                seed=seed)
            self.model_name = name
            # decode graphs capture the all-reduces on NCCL only (distributed/graphs.py)
            enforce_eager = enforce_eager or not self.model.supports_cuda_graphs
        elif isinstance(model, torch.nn.Module):
            self.model = model
            self.model_name = getattr(model, "name_or_path", type(model).__name__)
        elif isinstance(model, str):
            from ..models.loader import load_model
            self.model = load_model(model, dtype=dtype, device=device,
                                    quantization=quantization, seed=seed)
            self.model_name = name
        else:
            raise TypeError(f"model must be a HF directory / built-in name (str) or a "
                            f"CausalLM, got {type(model).__name__}")
        if tokenizer == "auto":
            tokenizer = _load_tokenizer(model) if isinstance(model, str) else None
        self.tokenizer = tokenizer
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.eos_token_ids = set(int(t) for t in (self.config.eos_token_ids or []))
        if (not self.eos_token_ids and tokenizer is not None
                and getattr(tokenizer, "eos_token_ids", None)):
            # The model config's EOS ids win; the tokenizer's are a fallback only (a
            # dummy model's byte tokenizer has EOS ids that are ordinary tokens there).
            self.eos_token_ids = set(int(t) for t in tokenizer.eos_token_ids)
        self._eos_list = sorted(self.eos_token_ids)
        self.lora: EngineLoRA | None = None
        recurrent = bool(getattr(self.config, "is_recurrent", False))
        self._recurrent = recurrent
        self._max_num_seqs = max_num_seqs
        self._ckpt_slots = 0
        if recurrent:
            # Hybrid recurrent models (LFM2, Qwen3.5, Mamba-2 hybrids): a sequence's state
            # is one slot, overwritten as it advances; prefix hits resume from state
            # checkpoints (engine/state_cache.py), rejected drafts from snapshots.
            self._check_recurrent()
            if enable_prefix_caching:
                self._ckpt_slots = _check_checkpoints(state_checkpoint_interval,
                                                      state_checkpoint_slots, block_size,
                                                      max_num_seqs)
        if enable_lora:
            self.lora = EngineLoRA(self.model, max_loras, max_lora_rank, max_cpu_loras)
        draft_model, draft_kv_bytes, eagle_head = None, 0, None
        if self.spec_config is not None and self.spec_config.method == "draft_model":
            draft_model, common_vocab = self._load_draft(tensor_parallel_size, dtype,
                                                         quantization, seed)
            draft_kv_bytes = draft_model.kv_bytes_per_token(
                resolve_kv_cache_dtype(kv_cache_dtype))
        elif self.spec_config is not None and self.spec_config.method in EAGLE_METHODS:
            eagle_head = self._load_eagle(max_num_seqs, max_num_batched_tokens)
            draft_kv_bytes = eagle_head.kv_bytes_per_token()
        self.kv_layout = self._kv_layout(disable_hybrid_kv_cache_manager)
        self.runner = ModelRunner(self.model, block_size, num_kv_blocks,
                                  gpu_memory_utilization, max_num_seqs,
                                  max_num_batched_tokens, max_model_len, enforce_eager,
                                  kv_cache_dtype, extra_kv_bytes_per_token=draft_kv_bytes,
                                  lora=self.lora.manager if self.lora is not None else None,
                                  kv_layout=self.kv_layout,
                                  num_state_slots=self._state_slots(max_num_seqs),
                                  **self._verify_graph_args())
        self.device = self.runner.device
        self.max_model_len = self.runner.max_model_len
        hybrid = self.kv_layout is not None
        self.block_manager = BlockManager(
            self.runner.num_blocks, block_size, enable_prefix_caching,
            self.runner.max_blocks_per_seq,
            sliding_groups=self.kv_layout.num_sliding_groups if hybrid else 0,
            sliding_window=self.kv_layout.window if hybrid else 0,
            max_rows=max_num_seqs if recurrent else None)   # a row = a state slot
        self.block_manager.drop_last_hit = eagle_head is not None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self._ckpt: StateCheckpoints | None = None
        if self._ckpt_slots:
            interval = state_checkpoint_interval or max(block_size,
                                                        -(-512 // block_size) * block_size)
            self._ckpt = StateCheckpoints(self._state_slots(max_num_seqs) - self._ckpt_slots,
                                          self._ckpt_slots, interval // block_size,
                                          block_size)
            bm_ = self.block_manager
            bm_.hit_filter = lambda seq, hits: self._ckpt.cut_hits(seq, hits, bm_)
            self.scheduler.align_chunk = self._ckpt.align_chunk
        if self.lora is not None:   # at most max_loras adapters among running sequences
            self.lora.running = self.scheduler.running
            self.scheduler.admit = self.lora.admit
        self.sampler = Sampler(self.vocab_size, self.device, seed)
        # Overlap is exact (same tokens as without it) and on by default; the flag turns
        # it off (e.g. to measure it).
        self.async_scheduling = True if async_scheduling is None else async_scheduling
        self._in_flight: LaunchedStep | None = None
        self._early_updated: list[Request] | None = None   # read back inside _launch
        self.structured: StructuredOutputManager | None = None   # on first constraint
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        # Counters for stats().
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.computed_tokens_total = 0
        self.num_steps = 0
        self._throughput = _Throughput()
        self.proposer: Proposer | None = None
        if draft_model is not None:
            # Its own pool, as many blocks as the target's (automatic sizing above split
            # one budget between the two: docs/engine.md, "Speculative decoding").
            self.proposer = DraftModelProposer(
                self.spec_config, draft_model, vocab_size=self.vocab_size,
                common_vocab=common_vocab, block_size=block_size,
                num_blocks=self.runner.num_blocks, max_model_len=self.max_model_len,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                enforce_eager=self.runner.enforce_eager, kv_cache_dtype=kv_cache_dtype,
                seed=seed, eos_token_ids=self._eos_list,
                enable_prefix_caching=enable_prefix_caching)
        elif eagle_head is not None:
            # its K/V lives in the target's blocks (engine/eagle.py)
            self.proposer = EagleProposer(
                self.spec_config, eagle_head, block_manager=self.block_manager,
                block_size=block_size, num_blocks=self.runner.num_blocks,
                max_model_len=self.max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                eos_token_ids=self._eos_list, max_num_seqs=max_num_seqs,
                max_blocks_per_seq=self.runner.max_blocks_per_seq,
                enforce_eager=self.runner.enforce_eager)
        elif self.spec_config is not None:
            self.proposer = make_proposer(self.spec_config)
        self._eagle = self.proposer if isinstance(self.proposer, EagleProposer) else None
        # draft probabilities of this step's proposals (draft model; None = point masses)
        # and each proposing sequence's row in them
        self._draft_probs: Tensor | None = None
        self._draft_rows: dict[int, int] = {}
        # structured-output rows' masks per verification position (host int32 [k + 1, W])
        self._draft_masks: dict[int, Tensor] = {}
        self.spec_draft_tokens_total = 0
        self.spec_accepted_tokens_total = 0
        self.spec_verify_rows_total = 0
        self._sleeping: set[str] = set()       # sleep mode: what is released
        # What exists now (weights, modules, imports) lives as long as the engine: move it
        # out of the cyclic GC's sight so a full collection scans only per-request state
        # (vLLM does the same). Without it a full collection pauses ~100+ ms.
        _freeze_gc_heap()

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int], truncate_prompt_tokens: int | None = None
                 ) -> tuple[str | None, list[int]]:
        """Validate a prompt -> (text or None, token ids). truncate_prompt_tokens
        (``SamplingParams``'): keep only the last k ids (-1: max_model_len); the text is
        kept whole, as vLLM does."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model_name!r} has no tokenizer: pass the "
                                 f"prompt as a list of token ids")
            ids = list(self.tokenizer.encode(prompt))
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            text = None
            vocab = self.vocab_size
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool):
                    raise TypeError(f"prompt token ids must be ints, got {type(t).__name__}")
                if not 0 <= t < vocab:
                    raise ValueError(f"prompt token id {t} is outside the vocabulary "
                                     f"[0, {vocab})")
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got "
                            f"{type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must not be empty")
        if truncate_prompt_tokens is not None:
            keep = self.max_model_len if truncate_prompt_tokens == -1 else \
                truncate_prompt_tokens
            del ids[:-keep]
        return text, ids

    def validate(self, prompt_len: int, params: SamplingParams) -> None:
        """ValueError unless prompt + max_tokens fits max_model_len and the token ids of
        logit_bias / allowed_token_ids are in the vocabulary."""
        if params.lora_request is not None:
            if self.lora is None:
                raise ValueError("lora_request needs an engine built with enable_lora=True")
            self.lora.check(params.lora_request)
        if params.uses_logit_bias and params.max_biased_token_id() >= self.vocab_size:
            raise ValueError(f"logit_bias / allowed_token_ids name token id "
                             f"{params.max_biased_token_id()}, outside the vocabulary "
                             f"[0, {self.vocab_size})")
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if prompt_len + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_len + max_tokens} exceeds max_model_len ({self.max_model_len})")

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    stream: bool = False,
                    prompt_token_ids: list[int] | None = None,
                    prompt_block_hashes: list[bytes] | None = None) -> Request:
        """Queue a request. stream=True detokenizes incrementally (for streaming text).

        prompt_token_ids: the already validated tokens of ``prompt`` (skips tokenizing).
        The prompt's prefix-cache block hashes are computed here, once, unless
        ``prompt_block_hashes`` brings them (``block_manager.prompt_block_hashes(ids,
        params.cache_salt)``, computed on another thread, as AsyncLLM does).
        """
        if self._sleeping:
            raise EngineSleeping(f"the engine is sleeping ({sorted(self._sleeping)} "
                                 f"released): call wake_up() first")
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got "
                            f"{type(params).__name__}")
        if prompt_token_ids is not None:
            text, ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        else:
            text, ids = self.tokenize(prompt, params.truncate_prompt_tokens)
        self.validate(len(ids), params)
        params = salted_for_lora(params)      # an adapter's KV never serves another's
        compiled = None
        if params.structured_outputs is not None:   # cached; the server compiles ahead
            compiled = self._structured_manager().compile(params.structured_outputs)
        bad_words = tokenize_bad_words(params.bad_words, self.tokenizer, self.vocab_size) \
            if params.bad_words is not None else None
        req = Request(request_id, text, ids, params, self.tokenizer, arrival_time)
        if bad_words:
            req.bad_words_ids = bad_words
        incremental = self.tokenizer is not None and params.detokenize and \
            (stream or bool(params.stop_strings))
        hold = max((len(s) for s in params.stop_strings), default=1) - 1
        for i in range(params.n):
            gen = (self.sampler.make_generator(params.seed + i)
                   if params.seed is not None and not params.greedy else None)
            seq = Sequence(next(self._seq_ids), req, i, gen, self.max_model_len)
            if compiled is not None:
                seq.grammar = self.structured.new_matcher(
                    compiled, params.structured_outputs.start_after)
            if incremental:
                seq.start_detokenizer(self.tokenizer, hold if params.stop_strings else 0)
            if i == 0:
                self.block_manager.hash_prompt(seq, prompt_block_hashes)
            else:
                seq.block_hashes = list(req.seqs[0].block_hashes)
            req.seqs.append(seq)
        # Queue only once every sequence is built: a failure above queues nothing.
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(ids)
        return req

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request now (finish_reason "abort"), freeing its blocks. None if unknown.

        A step in flight may have sampled one more token for it: that token is dropped.
        """
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                seq.finalize_text()
            if self.proposer is not None:
                self.proposer.release(seq)
        req.finish_time = time.perf_counter()
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ------------------------------------------------------------------ step
    def step(self) -> list[Request]:
        """One engine step; returns the requests that got new tokens or finished.

        Without overlap the step's own tokens are read back at its end. With
        ``async_scheduling`` the step is launched, then the *previous* step's tokens are
        read back and processed while the device computes this one. Runs with the
        engine's GPU as the thread's current device (Triton launches use it).
        """
        with self.runner.on_device():
            return self._step()

    def _step(self) -> list[Request]:
        if self._in_flight is not None and self._in_flight.needs_host_tokens and \
                self.proposer is not None:
            return self._finish(self._take_in_flight())   # its tokens feed the drafts
        # (grammars / penalties need them only to sample: _launch reads the step back
        # after this step's forward is launched, before the mask and the sampler)
        drafted = self._propose() if self.proposer is not None else None
        batch = self.scheduler.schedule()
        if batch.preempted and self.proposer is not None:
            for s in batch.preempted:       # a draft model's pool drops them too
                self.proposer.release(s)
        if drafted:     # drafts of sequences not scheduled as speculative rows: dropped
            spec_rows = {id(s) for s, n in zip(batch.seqs, batch.num_new_tokens) if n > 1}
            for s in drafted:
                if id(s) not in spec_rows:
                    s.spec_token_ids = []
        step = self._launch(batch) if not batch.is_empty else None
        if self.async_scheduling:
            step, self._in_flight = self._in_flight, step
        updated = self._finish(step) if step is not None else []
        if self._early_updated is not None:
            updated, self._early_updated = self._early_updated + updated, None
        if self._in_flight is not None and not self.scheduler.has_unfinished():
            self._finish(self._take_in_flight())   # only finished sequences' dropped tokens
        return updated

    def _load_draft(self, tensor_parallel_size: int, dtype: Any, quantization: str | None,
                    seed: int) -> tuple[torch.nn.Module, int]:
        """speculative_config "draft_model": (the draft CausalLM, ids both models score)."""
        cfg = self.spec_config
        # Under tensor parallel the draft is not sharded: it runs whole on rank 0's device
        # (a draft is small; its forwards need no collective), beside rank 0's shard.
        draft = load_draft_model(cfg, self.model, dtype, quantization, seed, self.tokenizer)
        if getattr(draft.config, "is_recurrent", False):
            raise ValueError(f"speculative_config.model: a draft model with recurrent layers "
                             f"({draft.config.architecture}) is not supported (its drafts "
                             f"could not be rolled back)")
        draft_tok = load_draft_tokenizer(cfg) if self.tokenizer is not None else None
        common = check_vocab(self.vocab_size, int(draft.config.vocab_size), self.tokenizer,
                             draft_tok)
        return draft, common

    def _load_eagle(self, max_num_seqs: int, max_num_batched_tokens: int) -> EagleHead:
        """speculative_config "eagle" / "eagle3": the head, with the target set to write
        the hidden states it reads (before the runner captures CUDA graphs)."""
        cfg = self.spec_config
        if not hasattr(self.model, "hidden_capture"):
            raise ValueError(f"speculative_config.method {cfg.method!r} needs a minikernels "
                             f"CausalLM target, got {type(self.model).__name__}")
        if not getattr(self.config, "uniform_attention_shapes", True):
            raise ValueError(f"speculative_config.method {cfg.method!r} is not supported for "
                             f"{self.config.architecture} (layers of different KV shapes or "
                             "reading another layer's K / V); 'ngram' and 'draft_model' are")
        if isinstance(cfg.model, str):
            head = load_eagle_head(cfg.model, cfg.method, self.model, cfg.revision,
                                   target_dir=self._model_dir)
        else:
            head = cfg.model
            if head.target is not self.model:
                raise ValueError("speculative_config.model: the EAGLE head was built over "
                                 "another model than this engine's")
            if head.method != cfg.method:
                raise ValueError(f"speculative_config.model is an {head.method!r} head, "
                                 f"method is {cfg.method!r}")
        self.model.hidden_capture = head.capture(max(max_num_batched_tokens, max_num_seqs))
        return head

    def _check_recurrent(self) -> None:
        """Refuse, by name, what a hybrid recurrent model (LFM2) cannot run with."""
        arch = self.config.architecture
        if self.spec_config is not None and self.spec_config.method in EAGLE_METHODS:
            raise ValueError(f"speculative_config.method {self.spec_config.method!r} is not "
                             f"supported for {arch} (its recurrent layers); 'ngram' and "
                             f"'draft_model' are")


    def _state_slots(self, max_num_seqs: int) -> int:
        """Recurrent models: one state slot per running sequence, then (speculation) one
        snapshot slot per row a verification step may hold, then (prefix caching) the
        state checkpoints' slots."""
        if not self._recurrent:
            return 0
        spec = self.spec_config.disable_by_batch_size if self.spec_config is not None else 0
        return max_num_seqs + min(spec, max_num_seqs) + self._ckpt_slots

    def _snapshot_spec_states(self, batch: ScheduledBatch, spec: list[tuple[int, int]]
                              ) -> list[int]:
        """Copy each speculative row's state slot to a snapshot slot (after the running
        sequences' slots) before the verification forward; returns the snapshot slots in
        row order."""
        rows = [batch.seqs[i].block_row for i, _ in spec]
        snaps = [self._max_num_seqs + j for j in range(len(rows))]
        self.runner.copy_state_slots(rows, snaps)
        return snaps

    def _restore_checkpoints(self, batch: ScheduledBatch) -> list[int]:
        """Before a forward (prefix caching on a recurrent model): copy the state
        checkpoint of each sequence admitted on a prefix hit into its slot; returns each
        row's computed tokens after the step (for :meth:`_take_checkpoints`)."""
        src, dst = [], []
        for seq in batch.seqs:
            if seq.state_restore >= 0:
                src.append(seq.state_restore)
                dst.append(seq.block_row)
                seq.state_restore = -1
        self.runner.copy_state_slots(src, dst)
        return [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)]

    def _take_checkpoints(self, batch: ScheduledBatch, ends: list[int],
                          spec: list[tuple[int, int]] | None) -> None:
        """After launching a forward: copy the slots of the rows it brings to a checkpoint
        boundary into checkpoint slots (keyed once their tokens are known; speculative
        rows skipped)."""
        ckpt = self._ckpt
        ckpt.register_pending(self.block_manager)     # (frees no slot, keys the known)
        spec_rows = {i for i, _ in spec} if spec else ()
        src, dst = [], []
        for i, blocks in ckpt.checkpoints_to_take(batch.seqs, ends,
                                                  lambda i: i in spec_rows):
            slot = ckpt.take()
            if slot is None:
                break
            seq = batch.seqs[i]
            src.append(seq.block_row)
            dst.append(slot)
            ckpt.add_pending(seq, blocks, slot)
        self.runner.copy_state_slots(src, dst)

    def _kv_layout(self, disabled: bool) -> KVCacheLayout | None:
        """The hybrid KV layout (models/kv_layout.py) when the model interleaves
        full-attention and sliding-window layers, or None (one block table for all).

        With speculation too (a draft model keeps its own pool; an EAGLE head's K/V lives
        in the target's group-0, full-attention, blocks) and under tensor parallel (every
        rank allocates the same layout; the steps carry each group's tables). Off when
        disabled (vLLM's ``disable_hybrid_kv_cache_manager``).
        """
        config = self.config
        if disabled or not hasattr(config, "is_sliding"):
            return None
        layout = plan_kv_layout(config)
        return layout if layout.hybrid else None

    def _verify_graph_args(self) -> dict[str, int]:
        """ModelRunner arguments for the verification CUDA graphs (speculation only)."""
        if self.spec_config is None:
            return {}
        return {"num_speculative_tokens": self.spec_config.num_speculative_tokens,
                "max_spec_batch": self.spec_config.disable_by_batch_size}

    def _spec_on(self) -> bool:
        """Whether this step may draft: speculation configured and the batch is small."""
        return (self.proposer is not None and
                self.scheduler.num_running <= self.spec_config.disable_by_batch_size)

    def _propose(self) -> list[Sequence]:
        """Draft tokens for the running sequences that can take them (steady decode, last
        token on the host, no structured-output constraint, room before max_tokens);
        sets ``seq.spec_token_ids``; returns those sequences."""
        self._draft_probs, self._draft_rows, self._draft_masks = None, {}, {}
        self._draft_banned = {}
        if not self._spec_on():
            if self._eagle is not None:   # keep the head's K/V up to date
                self._eagle.catch_up()
            return []
        cands, room = [], []
        for s in self.scheduler.running:
            p = s.params
            n = len(s.token_ids)
            left = s.max_total_tokens - n - 1      # the target's own token always comes
            # grammar rows: drafts the grammar refuses are cut off, exact for greedy rows
            # and point-mass drafts (n-gram; a model drafts its argmax for sampled
            # constrained rows); the constraint must be active (a start_after marker
            # could start it mid-draft)
            if p.uses_grammar and (s.grammar is None or not s.grammar.active):
                continue
            if left > 0 and not s.num_pending and s.num_computed_tokens == n - 1:
                cands.append(s)
                room.append(left)
        if not cands and self._eagle is None:
            return []
        drafts, probs = self.proposer.propose(cands, room)
        self._draft_probs = probs
        self._draft_rows = {s.seq_id: i for i, s in enumerate(cands)} if probs is not None \
            else {}
        out = []
        for s, d in zip(cands, drafts):
            if d and s.grammar is not None:
                # keep the drafts the grammar accepts; each verification position gets
                # the mask plain decoding would apply there
                m, masks = self.structured.draft_bitmask(s.grammar, d)
                d = d[:m]
                if m:
                    self._draft_masks[s.seq_id] = masks
            if d and s.request.bad_words_ids:
                # bad words: position j bans what would complete a word after the first
                # j drafts (as plain decoding there); drafts from a banned one on are cut
                d, banned = _draft_bad_words(s.request.bad_words_ids,
                                             s.token_ids[s.num_prompt_tokens:], d)
                if d:
                    self._draft_banned[s.seq_id] = banned
            if d:
                s.spec_token_ids = list(d)
                out.append(s)
        return out

    def _verify(self, logits: Tensor, spec_logits: Tensor, spec: list[tuple[int, int]],
                seqs: list[Sequence]) -> list[Tensor | None]:
        """Rejection-sample the speculative rows: logits [B, V'] (each row's last
        position), spec_logits [sum k, V'] (the draft positions, in order) -> on the
        device: int64 [B, K + 1] tokens (-1 after each row's last token), then, when a row
        asks for logprobs, their chosen logprobs [B, K + 1], ranks [B, K + 1] and top
        logprobs / ids [B, K + 1, n] (else None x 4)."""
        from .. import ops

        B = len(seqs)
        ks = [k for _, k in spec]
        K = max(ks)
        nspec = spec_logits.shape[0]
        idx, off = [], 0
        for b, k in enumerate(ks):
            idx.extend(range(off, off + k))
            idx.extend([nspec + b] * (K + 1 - k))
            off += k
        V = self.vocab_size
        allrows = torch.cat([spec_logits, logits])[:, :V].float()
        dev = allrows.device
        index = torch.tensor(idx, dtype=torch.int64).to(dev, non_blocking=True)
        rows_logits = allrows.index_select(0, index).view(B, K + 1, V)
        if self._draft_masks:   # structured outputs: position j gets row min(j, k) of its mask
            masks = {}
            for b, s in enumerate(seqs):
                bits = self._draft_masks.get(s.seq_id)
                if bits is not None:
                    for j in range(K + 1):
                        masks[b * (K + 1) + j] = bits[min(j, ks[b])]
            if masks:
                self.structured.mask_rows(rows_logits.view(B * (K + 1), V), masks)
        if self._draft_banned:   # bad words: position j bans row min(j, k)'s tokens
            rows, cols = [], []
            for b, s in enumerate(seqs):
                banned = self._draft_banned.get(s.seq_id)
                for j in range(K + 1) if banned is not None else ():
                    ids = banned[min(j, ks[b])]
                    rows += [b * (K + 1) + j] * len(ids)
                    cols += ids
            if rows:
                flat = rows_logits.view(B * (K + 1), V)
                flat[torch.tensor(rows).to(dev), torch.tensor(cols).to(dev)] = float("-inf")
        draft = torch.zeros(B, K, dtype=torch.int64)
        for b, s in enumerate(seqs):
            draft[b, :ks[b]] = torch.tensor(s.spec_token_ids, dtype=torch.int64)
        draft = draft.to(dev, non_blocking=True)
        # per position: penalties (drafts before it counted), min_tokens, then
        # temperature / top-k / top-p / min-p: the distribution plain decoding samples
        probs = self.sampler.spec_target_probs(rows_logits, seqs, draft, ks, self._eos_list)
        u, q = self.sampler.spec_randoms(seqs, K, V, self.spec_config.num_speculative_tokens)
        draft_probs = None
        if self._draft_probs is not None:     # [proposing seqs, k, V] -> [B, K, V]
            rows = torch.tensor([self._draft_rows[s.seq_id] for s in seqs], dtype=torch.int64)
            draft_probs = self._draft_probs.index_select(0, rows.to(dev))[:, :K]
        out = ops.rejection_sample(
            draft, torch.tensor(ks, dtype=torch.int32).to(dev, non_blocking=True),
            probs, draft_probs, u, q,
            torch.tensor([s.params.greedy for s in seqs]).to(dev, non_blocking=True))
        want = [s.params.logprobs for s in seqs]
        if all(n is None for n in want):
            return [out, None, None, None, None]
        # logprobs as plain decoding gives them: the raw target logits of each position
        return [out, *self.sampler.spec_logprobs(rows_logits, out,
                                                 max(n for n in want if n is not None))]

    def _take_in_flight(self) -> LaunchedStep:
        step, self._in_flight = self._in_flight, None
        return step

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Build the inputs, launch forward + sampling, start copying the tokens back."""
        runner, bm = self.runner, self.block_manager
        prev = self._in_flight.sample.tokens \
            if self._in_flight is not None and self._in_flight.sample is not None else None
        inputs = runner.prepare(batch, bm.table, bm.row_blocks, bm.swa_table)
        if self.lora is not None:
            inputs.lora_slots = self.lora.token_slots(batch, self.device)
        seqs = [batch.seqs[r] for r in inputs.sample_rows]
        plp = plp_dev = None
        spec_seqs = spec_dev = None
        snapshots = None
        ends = None
        grammar_rows = grammar_codes = None
        try:
            if self._ckpt is not None:
                ends = self._restore_checkpoints(batch)
            if inputs.spec is not None and self._recurrent:
                snapshots = self._snapshot_spec_states(batch, inputs.spec)
            logits = runner.forward(inputs, prev)
            if ends is not None:
                self._take_checkpoints(batch, ends, inputs.spec)
            if self._eagle is not None:   # the head reads this forward's hidden states
                self._eagle.observe(batch)
            if inputs.spec is not None:   # speculative rows: verified, not sampled
                ns = len(seqs)
                nspec = sum(k for _, k in inputs.spec)
                spec_b = {i for i, _ in inputs.spec}
                srows = [r for r, i in enumerate(inputs.sample_rows) if i in spec_b]
                keep = [r for r, i in enumerate(inputs.sample_rows) if i not in spec_b]
                spec_seqs = [seqs[r] for r in srows]
                spec_dev = self._verify(logits[srows], logits[ns:ns + nspec], inputs.spec,
                                        spec_seqs)
                rest = logits[ns + nspec:]
                logits = logits[keep] if keep else logits[:0]
                seqs = [seqs[r] for r in keep]
                logits = torch.cat([logits, rest]) if rest.shape[0] else logits
            if inputs.prompt_lp is not None:
                ns = len(seqs)
                plp = [(batch.seqs[i], first, count, batch.seqs[i].params.prompt_logprobs)
                       for i, first, count in inputs.prompt_lp]
                plp_dev = self.sampler.prompt_logprobs(
                    logits[ns:], inputs.prompt_lp_targets, max(e[3] for e in plp))
                logits = logits[:ns]
            early = self._in_flight
            if early is not None and early.needs_host_tokens:
                # its tokens feed this step's masks / penalties: read it back now, while
                # the device runs this step's forward (advance first: what it finishes
                # leaves the scheduler after this batch counts as computed)
                self.scheduler.advance(batch)
                self._early_updated = self._finish(self._take_in_flight())
            if self.structured is not None:   # structured outputs: disallowed -> -inf
                grammar_rows = self.structured.mask_step(logits, seqs)
            sample = self.sampler.sample(logits, seqs, self._eos_list) if seqs else None
            if grammar_rows is not None and sample is not None:   # device automata
                grammar_codes = self.structured.advance_step(grammar_rows, sample.tokens)
        except BaseException:
            # schedule() offered this step's full blocks to the prefix cache before the
            # forward wrote their K/V; a forward that did not finish (error, Ctrl-C) must
            # not leave them there for later requests to hit.
            bm.reset_prefix_cache()
            raise
        if early is None or not early.needs_host_tokens:
            self.scheduler.advance(batch)
        for row, seq in enumerate(seqs):
            seq.num_pending += 1
            seq.pending_row = row
        host: list[Tensor | None] = [None] * 5
        if sample is not None:
            host = runner.to_host_async([sample.tokens, sample.chosen, sample.ranks,
                                         sample.top_lp, sample.top_ids])
        plp_host = None
        if plp is not None:
            plp_host = runner.to_host_async(list(plp_dev))
            for seq, first, count, _ in plp:      # a recompute does not repeat them
                seq.prompt_lp_next = first + count
        if grammar_codes is not None:
            grammar_codes = runner.to_host_async([grammar_codes])[0]
        spec_host = None
        if spec_seqs:
            for seq in spec_seqs:
                seq.num_pending += 1      # one or more tokens; read back before scheduling
                seq.pending_row = -1
            spec_host = runner.to_host_async(spec_dev)
        self.computed_tokens_total += batch.num_tokens
        self.num_steps += 1
        # penalties and grammars need this step's tokens on the host before the next launch;
        # so do drafts (proposed from the tokens on the host), whenever this batch is small
        # enough to draft for
        # (device-resident automata advance on the device: their rows need no host token)
        grammar_free = grammar_codes is not None and grammar_rows.host_tokens_free
        needs = bool(spec_seqs) or (self.proposer is not None and self._spec_on()) or \
            needs_host_tokens([s.params for s in seqs], grammars=not grammar_free)
        return LaunchedStep(batch, seqs, sample, host, runner.completion_event(), needs,
                            plp, plp_host, spec_seqs, spec_host, spec_snapshots=snapshots,
                            grammar_rows=grammar_rows, grammar_codes=grammar_codes)

    def _finish(self, step: LaunchedStep) -> list[Request]:
        """Read back a launched step's tokens; append them, check stops, free finished
        (the blocks of every sequence this step finishes are released together)."""
        with self.scheduler.batched_frees():
            return self._read_back(step)

    def _read_back(self, step: LaunchedStep) -> list[Request]:
        out = step.result()
        if step.prompt_lp is not None:
            self._record_prompt_logprobs(step)
        now = time.perf_counter()
        touched: dict[str, Request] = {}
        tokens, logprobs = out.token_ids, out.logprobs
        eos = self.eos_token_ids
        n_new = 0
        # structured outputs: the automaton rows advance together; {row: 1 done, 2 refused}
        rows = step.grammar_rows
        bulk = rows.bulk if rows is not None else None
        # (the host tensor of the tokens: numpy reads it without converting the list)
        bulk_done = self.structured.accept_step(
            rows, tokens if step.host[0] is None else step.host[0], step.grammar_codes) \
            if bulk is not None else None
        dense = rows is not None and rows.fsm_dense     # every row an automaton row
        for j, seq in enumerate(step.seqs):
            seq.num_pending -= 1
            if seq.status is SequenceStatus.FINISHED:
                continue      # stopped or aborted while this step ran: its token is dropped
            token = tokens[j]
            seq.token_ids.append(token)
            n_new += 1
            if logprobs is not None and seq.logprobs is not None:
                self._record_logprobs(seq, token, logprobs[j])
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            touched[req.request_id] = req
            p = seq.params
            det = seq.detokenizer
            delta = ""
            if det is not None:
                delta = det.step(token)
                if delta:
                    seq.unsent_text += delta
            if seq.grammar is None:
                grammar_done = False
            elif dense or bulk is not None and bulk[j]:
                grammar_done = bulk_done is not None and j in bulk_done and \
                    self._bulk_grammar_done(seq, token, bulk_done[j])
            else:
                grammar_done = self._advance_grammar(seq, token)
            # Fast path: no stop strings / ids, no min_tokens -> EOS and length only.
            if not p.simple_stop or (token in eos and not p.ignore_eos) or \
                    len(seq.token_ids) >= seq.max_total_tokens:
                self._check_stop(seq, token, delta)
            if grammar_done and seq.status is not SequenceStatus.FINISHED:
                self._finish_constrained(seq)
        if step.spec_seqs:
            n_new += self._finish_spec(step, now, touched)
        self.generation_tokens_total += n_new
        self._throughput.add(now, n_new)
        requests = self.requests
        for req in touched.values():
            if req.num_finished == len(req.seqs) and req.finish_time is None:
                req.finish_time = now
                requests.pop(req.request_id, None)
                if self.proposer is not None:
                    for s in req.seqs:
                        self.proposer.release(s)
        return list(touched.values())

    def _finish_spec(self, step: LaunchedStep, now: float,
                     touched: dict[str, Request]) -> int:
        """Append the verified tokens of the speculative rows (stops checked after each
        token, exactly as one token per step would), roll back the K/V of rejected drafts
        (num_computed_tokens, and blocks past the last token are freed). Returns the
        number of tokens appended."""
        rows = step.spec_host[0].tolist()
        lp_chosen = lp_ranks = lp_top = lp_ids = None
        if step.spec_host[1] is not None:
            lp_chosen, lp_ranks = step.spec_host[1].tolist(), step.spec_host[2].tolist()
            if step.spec_host[3] is not None:
                lp_top, lp_ids = step.spec_host[3].tolist(), step.spec_host[4].tolist()
        eos = self.eos_token_ids
        n_new = 0
        restore_src: list[int] = []
        restore_dst: list[int] = []
        for b, (seq, row) in enumerate(zip(step.spec_seqs, rows)):
            seq.num_pending -= 1
            k = len(seq.spec_token_ids)
            seq.spec_token_ids = []
            if seq.status is SequenceStatus.FINISHED:
                continue      # aborted while this step ran
            toks = [t for t in row if t >= 0]
            seq.num_draft_tokens += k
            seq.num_accepted_tokens += len(toks) - 1
            seq.num_spec_steps += 1
            self.spec_draft_tokens_total += k
            self.spec_accepted_tokens_total += len(toks) - 1
            self.spec_verify_rows_total += 1
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            touched[req.request_id] = req
            p = seq.params
            det = seq.detokenizer
            n_lp = p.logprobs
            for j, token in enumerate(toks):
                seq.token_ids.append(token)
                n_new += 1
                if n_lp is not None and lp_chosen is not None and seq.logprobs is not None:
                    self._record_logprobs(seq, token, (
                        lp_chosen[b][j], lp_ranks[b][j],
                        lp_ids[b][j][:n_lp] if n_lp else [],
                        lp_top[b][j][:n_lp] if n_lp else []))
                delta = ""
                if det is not None:
                    delta = det.step(token)
                    if delta:
                        seq.unsent_text += delta
                grammar_done = seq.grammar is not None and self._advance_grammar(seq, token)
                if not p.simple_stop or (token in eos and not p.ignore_eos) or \
                        len(seq.token_ids) >= seq.max_total_tokens:
                    self._check_stop(seq, token, delta)
                if grammar_done and seq.status is not SequenceStatus.FINISHED:
                    self._finish_constrained(seq)
                if seq.status is SequenceStatus.FINISHED:
                    break         # later tokens are dropped (blocks already freed)
            if seq.status is not SequenceStatus.FINISHED:
                # K/V is valid up to the token before the last one (the target's own
                # token is computed by the next step); rejected drafts' slots are reused.
                seq.num_computed_tokens = len(seq.token_ids) - 1
                if step.spec_snapshots is not None and len(toks) - 1 < k:
                    # Recurrent layers ran through the rejected drafts: their state goes
                    # back to the step's start and the next step recomputes this row's
                    # accepted tokens (their K/V rewritten with the same values).
                    restore_src.append(step.spec_snapshots[b])
                    restore_dst.append(seq.block_row)
                    seq.num_computed_tokens = len(seq.token_ids) - len(toks) - 1
                self.block_manager.trim(seq, len(seq.token_ids))
        self.runner.copy_state_slots(restore_src, restore_dst)
        return n_new

    def _record_prompt_logprobs(self, step: LaunchedStep) -> None:
        """Append a finished step's prompt-token logprobs to their requests (in order:
        a prompt's chunks are launched, and finished, one step after another)."""
        chosen, ranks, top_lp, top_ids = (t.tolist() if t is not None else None
                                          for t in step.prompt_lp_host)
        tok = self.tokenizer
        texts: dict[int, str | None] = {}

        def text(t: int) -> str | None:
            if tok is None:
                return None
            s = texts.get(t)
            if s is None:
                s = texts[t] = tok.decode([t], skip_special_tokens=False)
            return s

        def no_text(t: int) -> None:
            return None

        row = 0
        for seq, first, count, k in step.prompt_lp:
            lps = seq.request.prompt_logprobs
            if seq.is_finished or lps is None or len(lps) != first + 1:
                row += count      # aborted meanwhile (or already recorded): dropped
                continue
            prompt = seq.token_ids
            name = text if seq.params.detokenize else no_text
            for j in range(row, row + count):
                token = prompt[first + 1 + j - row]
                entry = {token: Logprob(chosen[j], ranks[j], name(token))}
                if k:
                    for r, (t, v) in enumerate(zip(top_ids[j][:k], top_lp[j][:k]), start=1):
                        if t not in entry:
                            entry[t] = Logprob(v, r, name(t))
                lps.append(entry)
            row += count

    def _record_logprobs(self, seq: Sequence, token: int,
                         lp: tuple[float, int, list[int], list[float]] | None) -> None:
        if lp is None:
            return
        chosen, rank, top_ids, top_lps = lp
        seq.cumulative_logprob += chosen
        tok = self.tokenizer if seq.params.detokenize else None

        def text(t: int) -> str | None:
            return tok.decode([t], skip_special_tokens=False) if tok is not None else None

        entry = {token: Logprob(chosen, rank, text(token))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            if t not in entry:
                entry[t] = Logprob(v, r, text(t))
        seq.logprobs.append(entry)

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Feed the sampled token to the sequence's matcher; True when the constraint is
        over (it accepted a stop token, or - never expected, the mask forbids it - refused
        the token). Before a ``start_after`` constraint starts, the token only moves the
        sequence toward it."""
        if not seq.grammar.active:
            seq.grammar.wait(seq.token_ids, seq.num_prompt_tokens)
            if seq.grammar.active:          # it starts: the next steps' rows change
                self.structured.epoch += 1
            return False
        if not seq.grammar.accept(token):
            logger.warning("structured outputs: the grammar refused sampled token %d of "
                           "request %s; finishing it", token, seq.request.request_id)
            return True
        # only a stop token can end a grammar (the matcher's stop ids are the engine's EOS)
        return token in self.eos_token_ids and seq.grammar.terminated

    def _bulk_grammar_done(self, seq: Sequence, token: int, code: int) -> bool:
        """A row the automata matched in bulk needs attention: code 1 - it accepted a
        stop token (the constraint is over); 2 - it refused the token (never expected:
        the mask forbids it), so the request finishes."""
        if code == 2:
            logger.warning("structured outputs: the grammar refused sampled token %d of "
                           "request %s; finishing it", token, seq.request.request_id)
        return True

    def _finish_constrained(self, seq: Sequence) -> None:
        """The constraint is complete and nothing may follow (e.g. under ignore_eos)."""
        if seq.detokenizer is not None:
            seq.add_text(seq.detokenizer.flush())
        self.scheduler.finish(seq, "stop")
        seq.finalize_text()

    def _structured_manager(self) -> StructuredOutputManager:
        """The grammar compiler / matcher factory, built on first use (needs xgrammar)."""
        if self.structured is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs the model's tokenizer (this "
                                 "engine was built with tokenizer=None)")
            # automata states on a GPU unless a proposer drafts (its drafts follow grammars
            # one token at a time on the host); on the CPU the host bank measured cheaper
            self.structured = StructuredOutputManager(
                self.tokenizer, self.vocab_size, self._eos_list,
                backend=self._structured_backend,
                device_states=self.proposer is None and self.device.type == "cuda")
            if self.proposer is not None:     # a model drafter masks constrained rows too
                self.proposer.structured = self.structured
        return self.structured

    def _check_stop(self, seq: Sequence, token: int, delta: str) -> None:
        """Finish seq if ``token`` (already appended and decoded into ``delta``) stops it."""
        p = seq.params
        det = seq.detokenizer
        reason: str | None = None
        stop_reason: str | int | None = None
        if p.min_tokens == 0 or seq.num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif p.stop_token_ids and token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif p.stop_strings and delta and det is not None:
                hit = self._find_stop(det, len(delta), p.stop_strings)
                if hit is not None:
                    idx, s = hit
                    seq.cut_text(idx + len(s) if p.include_stop_str_in_output else idx)
                    reason, stop_reason = "stop", s
        if reason is None and len(seq.token_ids) >= seq.max_total_tokens:
            reason = "length"
        if reason is not None:
            if det is not None and not isinstance(stop_reason, str):
                seq.add_text(det.flush())
            self.scheduler.finish(seq, reason, stop_reason)
            seq.finalize_text()

    @staticmethod
    def _find_stop(det: Any, delta_len: int, stops: list[str]) -> tuple[int, str] | None:
        """Earliest stop string that ends inside the new text, as (start index in the
        whole text, string). Looks only at the tail that can hold such a match."""
        longest = max(len(s) for s in stops)
        tail = det.tail(delta_len + longest - 1)
        base = det.num_chars - len(tail)
        best: tuple[int, str] | None = None
        for s in stops:
            start = max(0, len(tail) - delta_len - len(s) + 1)
            idx = tail.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return (base + best[0], best[1]) if best is not None else None

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Counters (O(1)): queues, KV usage, token totals, prefix-cache hits, rate."""
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": bm.usage,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_total": bm.num_usable_blocks,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "computed_tokens_total": self.computed_tokens_total,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "prefix_cache_hit_rate": bm.num_hit_tokens / max(1, bm.num_queried_tokens),
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_num_draft_tokens": self.spec_draft_tokens_total,
            "spec_num_accepted_tokens": self.spec_accepted_tokens_total,
            "spec_mean_acceptance_length": (
                (self.spec_accepted_tokens_total + self.spec_verify_rows_total)
                / self.spec_verify_rows_total if self.spec_verify_rows_total else 0.0),
            "num_steps": self.num_steps,
            "tokens_per_s": self._throughput.rate(time.perf_counter()),
        }

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory of an idle engine (engine/sleep.py): level 1 keeps a host
        copy of the weights, level 2 discards them (reload with :meth:`load_weights`
        after waking up); both free the KV pools and drop the CUDA graphs. RuntimeError
        while a request is unfinished."""
        from .sleep import offload, offload_tensors

        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self.has_unfinished():
            raise RuntimeError("sleep: requests are still running")
        if self._sleeping:
            return
        with self.runner.on_device():
            self.block_manager.reset_prefix_cache()
            if self._ckpt is not None:       # (the state pool is emptied below)
                self._ckpt.clear()
            modules = [self.model]
            prop = self.proposer
            if isinstance(prop, DraftModelProposer):
                modules.append(prop.runner.model)
                prop.release_pool()
            elif isinstance(prop, EagleProposer):
                modules.append(prop.head)
                prop.release_pool()
            capture = getattr(self.model, "hidden_capture", None)
            if capture is not None:
                self._capture_shape = capture.buffer.shape
                capture.buffer.data = torch.empty(0, dtype=capture.buffer.dtype,
                                                  device=capture.buffer.device)
            self.runner.release()
            self._offloaded = [t for m in modules for t in offload(m, keep=level == 1)]
            if self.lora is not None:     # adapter slots: always a host copy (small)
                self._offloaded += offload_tensors(self.lora.manager.tensors(),
                                                   lambda t: True)
            if self._tensor_parallel:     # the workers empty their shards alike
                self.model.sleep(level)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo :meth:`sleep` for ``tags`` ("weights", "kv_cache"; default both, vLLM's
        names): weights come back from their host copies (zeroed after level 2), pools
        zeroed; once both are back the CUDA graphs are captured again."""
        from .sleep import reload

        want = {"weights", "kv_cache"} if tags is None else set(tags)
        if not want <= {"weights", "kv_cache"}:
            raise ValueError(f"wake_up tags must be 'weights' / 'kv_cache', got {tags!r}")
        with self.runner.on_device():
            if self._tensor_parallel and want & self._sleeping:
                self.model.wake_up(sorted(want & self._sleeping))   # before any graphs
            if "weights" in want and "weights" in self._sleeping:
                reload(self._offloaded)
                self._sleeping.discard("weights")
            if "kv_cache" in want and "kv_cache" in self._sleeping:
                self.runner.restore()
                capture = getattr(self.model, "hidden_capture", None)
                if capture is not None:
                    capture.buffer.data = torch.zeros(self._capture_shape,
                                                      dtype=capture.buffer.dtype,
                                                      device=capture.buffer.device)
                self._sleeping.discard("kv_cache")
                self._pools_back = True
            if not self._sleeping and getattr(self, "_pools_back", False):
                self._pools_back = False
                self.runner.capture_graphs()       # graphs run the model: weights first
                if isinstance(self.proposer, (DraftModelProposer, EagleProposer)):
                    self.proposer.restore_pool()

    @property
    def is_sleeping(self) -> bool:
        return bool(self._sleeping)

    @property
    def _tensor_parallel(self) -> bool:
        """Whether the model is the tensor-parallel front end (workers on other ranks)."""
        return hasattr(self.model, "decode_graphs_class")

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (e.g. after the weights changed): later
        requests recompute their prefixes. Blocks in use keep their contents."""
        self.block_manager.reset_prefix_cache()
        if self._ckpt is not None:
            self._ckpt.clear()
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.reset_prefix_cache()

    def load_weights(self, weights: Any, dry_run: bool = False, stream: bool = False) -> int:
        """Copy HF-named tensors into the served model in place (RL weight sync; see
        :func:`minikernels.models.weight_update.load_weights`) and reset the prefix
        cache (its K/V came from the old weights). Only between requests: RuntimeError
        while any request is unfinished. Returns the number of tensors loaded.

        All or nothing: every tensor is checked against the model (rank 0's shard under
        tensor parallel) before the first copy. dry_run: only those checks (meta tensors
        accepted), nothing copied, allowed while requests run; returns how many would
        load. stream: check and copy one tensor at a time without holding the set (for
        one already checked with dry_run)."""
        from ..models.weight_update import check_weights, load_weights, validated

        if not dry_run and self.has_unfinished():
            raise RuntimeError("load_weights: requests are still running (their K/V comes "
                               "from the old weights); call it between generate calls")
        if "weights" in self._sleeping:
            raise RuntimeError("load_weights: the weights are asleep: wake_up(['weights']) "
                               "first")
        target = self.model.model if self._tensor_parallel else self.model
        if dry_run:
            return check_weights(target, weights)
        if not stream:
            weights = validated(target, weights)
        with torch.inference_mode(False), self.runner.on_device():
            if not self._tensor_parallel:
                n = load_weights(self.model, weights, stream=True)
            else:                              # every rank; an EAGLE head's whole tables too
                tables: dict[str, Any] = {}
                n = self.model.load_weights(self._tap_target_tables(weights, tables))
                if tables:
                    self._refresh_head_tables(tables)
        self.reset_prefix_cache()
        return n

    def _tap_target_tables(self, weights: Any, seen: dict[str, Any]) -> Any:
        """``weights`` as (name, tensor) pairs, keeping the embedding and lm_head tensors
        in ``seen`` when an EAGLE head holds whole copies of them (tensor parallel)."""
        from collections.abc import Mapping

        from ..models.loader import map_name

        items = weights.items() if isinstance(weights, Mapping) else weights
        head = self._eagle.head if self._eagle is not None else None
        if head is None or (head.target_embed is None and head.target_lm_head is None):
            yield from items
            return
        for name, tensor in items:
            target = map_name(name)
            if target is not None and target[0] in ("embed_tokens", "lm_head") \
                    and target[2] == "weight":
                seen[target[0]] = tensor
            yield name, tensor

    def _refresh_head_tables(self, seen: dict[str, Any]) -> None:
        """An EAGLE head's whole embedding / lm_head copies from updated target tensors
        (a tied lm_head is the embedding)."""
        head = self._eagle.head
        embed, lm_head = seen.get("embed_tokens"), seen.get("lm_head")
        if self.model.config.tie_word_embeddings and embed is not None:
            lm_head = embed
        with torch.no_grad():
            head.use_target_tables(
                embed if embed is not None and head.target_embed is not None
                else head.target_embed,
                lm_head if lm_head is not None and head.target_lm_head is not None
                else head.target_lm_head)

    def check_no_leaks(self) -> None:
        """AssertionError unless the block accounting is consistent (tests, debugging)."""
        live = [s for r in self.requests.values() for s in r.seqs if s.block_table]
        live += [s for s in self.scheduler.running if s not in live]
        self.block_manager.check_invariants(live)
        if self.proposer is not None:
            self.proposer.check_invariants()


def _check_checkpoints(interval: int | None, slots: int | None, block_size: int,
                       max_num_seqs: int) -> int:
    """Validate the state-checkpoint arguments of a recurrent model's prefix caching;
    returns the number of checkpoint slots (default: max_num_seqs, 4 .. 32)."""
    if interval is not None:
        _check_int("state_checkpoint_interval", interval, 1)
        if interval % block_size:
            raise ValueError(f"state_checkpoint_interval ({interval}) must be a multiple of "
                             f"block_size ({block_size})")
    if slots is None:
        return max(4, min(32, max_num_seqs))
    _check_int("state_checkpoint_slots", slots, 1)
    return slots


def _from_prompt_dict(prompt: dict[str, Any]) -> str | list[int]:
    """vLLM's TextPrompt / TokensPrompt dict -> its text or token ids."""
    keys = set(prompt)
    if keys == {"prompt"}:
        return prompt["prompt"]
    if keys == {"prompt_token_ids"} or keys == {"prompt_token_ids", "prompt"}:
        return list(prompt["prompt_token_ids"])
    extra = sorted(keys - {"prompt", "prompt_token_ids"})
    if extra:
        raise ValueError(f"prompt dict keys {extra} are not supported (only 'prompt' or "
                         f"'prompt_token_ids'; images and other inputs are not served)")
    raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")


def _structured_backend(config: dict[str, Any] | None) -> str:
    """The structured-outputs backend of vLLM's ``structured_outputs_config``
    ({"backend": "xgrammar" | "outlines"}; default xgrammar)."""
    from .structured_outputs import BACKENDS

    if config is None:
        return "xgrammar"
    if not isinstance(config, dict):
        raise TypeError("structured_outputs_config must be a dict, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(config) - {"backend"})
    if unknown:
        raise ValueError(f"structured_outputs_config: unknown keys {unknown} (known: "
                         "['backend'])")
    backend = config.get("backend", "xgrammar")
    if backend == "auto":
        backend = "xgrammar"
    if backend not in BACKENDS:
        raise ValueError(f"structured_outputs_config.backend must be one of "
                         f"{('auto',) + BACKENDS}, got {backend!r}")
    if backend == "outlines":      # fail at start-up, not at the first constrained request
        try:
            import outlines_core  # noqa: F401
        except ImportError as exc:
            raise ImportError("structured_outputs_config.backend 'outlines' needs "
                              "outlines-core: pip install outlines-core (or the "
                              "'structured' extra)") from exc
    return backend


class LLM:
    """Offline batched generation (vLLM-style).

    Args:
        model: HF checkpoint directory, built-in name (dummy weights; see
            minikernels.models.list_models) or an already built CausalLM.
        dtype: "bfloat16" | "float16" | "float32" | "auto".
        quantization: None | "int4" | "gptq" | "awq" | "fp8" | "fp8_w8a8" | "int8"
            (models.loader).
        block_size: KV block size in tokens (any size in [1, 256]; default 64, chosen
            by ``minikernels bench engine``: see docs/engine.md, "Block size").
        num_kv_blocks: KV pool size in blocks (None = from gpu_memory_utilization on a
            GPU, or 1 GiB / 4096 blocks at most on the CPU).
        gpu_memory_utilization: fraction of GPU memory for weights + activations + KV.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: token budget of one step (chunked prefill splits longer
            prompts).
        enable_prefix_caching: share K/V of equal prompt prefixes.
        enforce_eager: never use CUDA graphs.
        device: default cuda when available.
        max_model_len: longest prompt + output (default: model limit, capped by the pool).
        seed: dummy-weight seed and the seed of unseeded sampling.
        tokenizer: "auto" (load the model's), None, or an object with encode/decode.
        async_scheduling: overlap the host's work for step N+1 with the device's step N
            (None = on; outputs are the same either way, see docs/engine.md).
        kv_cache_dtype: "auto" (the model's dtype), "fp8" / "fp8_e4m3": an e4m3 KV
            cache (twice the tokens of bf16 in the same memory; docs/models.md states the
            measured logit error), or "fp8_e5m2" (coarser, wider range).
        tensor_parallel_size: shard the model over this many processes / GPUs
            (torch.distributed; docs/parallel.md). The scheduler stays here, in rank 0.
        speculative_config: None, or {"method": "ngram", "num_speculative_tokens": k,
            "prompt_lookup_min": 1, "prompt_lookup_max": 4, "disable_by_batch_size": 32},
            or {"method": "draft_model", "model": <HF dir, hub id, built-in name or
            CausalLM with the target's vocabulary>, "num_speculative_tokens": k,
            "quantization": "auto", "revision": None} (vLLM's keys; the draft's KV pool
            has num_kv_blocks blocks too, automatic sizing splits one budget; exact:
            see docs/engine.md, "Speculative decoding").
        revision: hub branch, tag or commit when ``model`` is a hub id (default: main).
        generation_config: "auto" (the checkpoint's generation_config.json sampling
            fields are the defaults of :meth:`get_default_sampling_params`, vLLM's
            default), "vllm" (ignore it) or a directory holding one.
        disable_hybrid_kv_cache_manager: keep one block table for all layers even when
            the model interleaves sliding-window and full-attention layers (Gemma 2 / 3).
            By default such a model's sliding layers get their own block tables and hand
            back the blocks behind their window (docs/engine.md, "Hybrid KV pools").
        state_checkpoint_interval, state_checkpoint_slots: hybrid recurrent models (LFM2,
            Qwen3.5, Mamba-2 hybrids) with prefix caching: their states are checkpointed
            every this many tokens (a multiple of block_size; default the multiple of
            block_size >= 512) into this many slots (default max_num_seqs, 4 .. 32), and a
            prefix hit resumes from the longest checkpointed prefix (docs/engine.md,
            "Recurrent state slots").
    """

    def __init__(self, model: str | torch.nn.Module, dtype: str | torch.dtype = "bfloat16",
                 quantization: str | None = None, block_size: int = 64,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 seed: int = 0, tokenizer: Any = "auto", tensor_parallel_size: int = 1,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 speculative_config: dict[str, Any] | None = None,
                 revision: str | None = None, generation_config: str = "auto",
                 enable_lora: bool = False, max_loras: int = 4, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None,
                 disable_hybrid_kv_cache_manager: bool = False,
                 state_checkpoint_interval: int | None = None,
                 state_checkpoint_slots: int | None = None,
                 structured_outputs_config: dict[str, Any] | None = None) -> None:
        self.llm_engine = LLMEngine(
            model, dtype=dtype, quantization=quantization, block_size=block_size,
            num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            device=device, max_model_len=max_model_len, seed=seed, tokenizer=tokenizer,
            tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling, kv_cache_dtype=kv_cache_dtype,
            speculative_config=speculative_config, revision=revision,
            generation_config=generation_config, enable_lora=enable_lora,
            max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
            disable_hybrid_kv_cache_manager=disable_hybrid_kv_cache_manager,
            state_checkpoint_interval=state_checkpoint_interval,
            state_checkpoint_slots=state_checkpoint_slots,
            structured_outputs_config=structured_outputs_config)
        self._counter = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.llm_engine.model_name

    def stats(self) -> dict[str, Any]:
        return self.llm_engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (vLLM's ``LLM.reset_prefix_cache``)."""
        self.llm_engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free this idle engine's GPU memory (weights, KV pools, CUDA graphs) until
        :meth:`wake_up` (vLLM's API; level 1 keeps the weights in host memory, level 2
        drops them: ``wake_up(["weights"])``, :meth:`load_weights`, then
        ``wake_up(["kv_cache"])``). Single-GPU engines without LoRA."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back what :meth:`sleep` released (``tags``: "weights" / "kv_cache";
        default both)."""
        self.llm_engine.wake_up(tags)

    @property
    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping

    def start_profile(self, profile_dir: str | None = None) -> None:
        """Start a torch.profiler trace of everything the engine runs until
        :meth:`stop_profile` (vLLM's ``LLM.start_profile``): CPU ops and, on a GPU, CUDA
        kernels, with shapes. profile_dir: where the Chrome / Perfetto trace goes
        (default ``$MINIKERNELS_PROFILE_DIR``, else ``./minikernels_profile``)."""
        import os

        from torch.profiler import ProfilerActivity, profile

        if getattr(self, "_profiler", None) is not None:
            raise RuntimeError("a profile is already running: stop_profile() first")
        self._profile_dir = profile_dir or os.environ.get("MINIKERNELS_PROFILE_DIR",
                                                          "minikernels_profile")
        activities = [ProfilerActivity.CPU]
        if self.llm_engine.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def stop_profile(self) -> str:
        """Stop the trace started by :meth:`start_profile`; returns the written trace's
        path (``<profile_dir>/trace-<time>.json``)."""
        import os
        import time as _time

        prof = getattr(self, "_profiler", None)
        if prof is None:
            raise RuntimeError("no profile is running: start_profile() first")
        self._profiler = None
        prof.__exit__(None, None, None)
        os.makedirs(self._profile_dir, exist_ok=True)
        path = os.path.join(self._profile_dir, f"trace-{_time.strftime('%Y%m%d-%H%M%S')}"
                                               f"-{os.getpid()}.json")
        prof.export_chrome_trace(path)
        return path

    def load_weights(self, weights: Any, dry_run: bool = False, stream: bool = False) -> int:
        """Replace the model's weights in place from HF-named tensors (``(name, tensor)``
        pairs, e.g. a trainer's ``model.named_parameters()``, or a state dict), between
        generate calls; the prefix cache is reset. For RL loops (GRPO) that generate
        with this engine and train a transformers copy. Dense models (tensor parallel:
        every rank takes its shard of each full tensor); returns the number of tensors
        loaded. Every tensor is checked before the first copy: a bad one (ValueError
        naming it) leaves the model unchanged. ``dry_run=True``: only check (meta
        tensors accepted); ``stream=True``: check and copy one at a time without holding
        the set (:meth:`LLMEngine.load_weights`)."""
        return self.llm_engine.load_weights(weights, dry_run=dry_run, stream=stream)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The SamplingParams fields the checkpoint's generation_config.json sets (empty
        with ``generation_config="vllm"`` or without one); a copy."""
        return dict(self.llm_engine.sampling_defaults)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the checkpoint's recommended sampling (vLLM's name): what
        :meth:`generate` uses when given no sampling params."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    @staticmethod
    def _normalize_prompts(prompts: Any) -> list[str | list[int]]:
        """-> one str or token-id list per prompt. Also vLLM's prompt dicts
        (``TextPrompt`` ``{"prompt": str}``, ``TokensPrompt`` ``{"prompt_token_ids":
        [...]}``), alone or in a list; other keys (``multi_modal_data``, ...) are a
        ValueError naming them."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)):
            if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
                return [list(prompts)]  # one prompt given as token ids
            return [_from_prompt_dict(p) if isinstance(p, dict) else p for p in prompts]
        raise TypeError(f"prompts must be a str, a list of str, a list of token ids or a "
                        f"list of token-id lists, got {type(prompts).__name__}")

    def beam_search(self, prompts: str | list[int] | Seq[str | list[int]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (vLLM's ``LLM.beam_search``): for each prompt, the best
        ``params.beam_width`` sequences, best first. See
        :mod:`minikernels.engine.beam_search`."""
        from .beam_search import beam_search

        return beam_search(self, self._normalize_prompts(prompts), params)

    def chat(self, messages: Seq[dict[str, Any]] | Seq[Seq[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None, *,
             add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to conversations (vLLM's ``LLM.chat``).

        messages: one conversation (a list of ``{"role", "content"}`` dicts) or a list of
            them; each is rendered with the tokenizer's chat template, with ``tools``
            (OpenAI function specs) and ``chat_template_kwargs`` passed to it.
        continue_final_message: the reply continues the last (assistant) message instead
            of starting a new one (needs ``add_generation_prompt=False``).
        chat_template: a Jinja chat template to render with instead of the tokenizer's
            (vLLM's argument; an HF tokenizer).
        Each output's ``prompt`` is the rendered text (special tokens included).
        """
        if isinstance(messages, (list, tuple)) and messages and \
                all(isinstance(m, dict) for m in messages):
            conversations = [list(messages)]
        elif isinstance(messages, (list, tuple)) and messages and \
                all(isinstance(c, (list, tuple)) for c in messages):
            conversations = [list(c) for c in messages]
        else:
            raise TypeError("messages must be a conversation (a list of message dicts) or a "
                            "non-empty list of conversations")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer to render chats with")
        kwargs = dict(chat_template_kwargs or {})
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise ValueError("chat_template must be a non-empty Jinja template string")
            kwargs["chat_template"] = chat_template
        if continue_final_message:
            kwargs["continue_final_message"] = True
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                           tools=tools, **kwargs) for c in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                                lora_request=lora_request)
        for out, ids in zip(outputs, prompts):
            out.prompt = tok.decode(ids, skip_special_tokens=False)
        return outputs

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 priority: Seq[int] | None = None) -> list[RequestOutput]:
        """Generate completions for all prompts; outputs come back in prompt order.

        prompts: a string, a list of token ids, or a list of either (or vLLM's prompt
            dicts: ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``).
        sampling_params: one SamplingParams for all prompts, or one per prompt
            (default :meth:`get_default_sampling_params`).
        lora_request: a LoRARequest for every prompt, or one (or None) per prompt
            (``LLM(enable_lora=True)``; vLLM's argument).
        priority: one int per prompt (vLLM's argument): each request's
            ``SamplingParams.priority`` (lower runs first).
        """
        plist = self._normalize_prompts(prompts)
        if sampling_params is None:
            params = [self.get_default_sampling_params()] * len(plist)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(plist)
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(plist):
                raise ValueError(f"got {len(sampling_params)} sampling_params for "
                                 f"{len(plist)} prompts (give one, or one per prompt)")
            params = list(sampling_params)
        else:
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, "
                            f"got {type(sampling_params).__name__}")
        if lora_request is not None:
            loras = list(lora_request) if isinstance(lora_request, (list, tuple)) \
                else [lora_request] * len(plist)
            if len(loras) != len(plist):
                raise ValueError(f"got {len(loras)} lora_requests for {len(plist)} prompts")
            params = [dataclasses.replace(p, lora_request=lr) if lr is not None else p
                      for p, lr in zip(params, loras)]
        if priority is not None:
            if not isinstance(priority, (list, tuple)) or len(priority) != len(plist):
                raise ValueError(f"priority must be a list of one int per prompt "
                                 f"({len(plist)}), got {priority!r}")
            params = [dataclasses.replace(p, priority=pr) if pr != p.priority else p
                      for p, pr in zip(params, priority)]
        engine = self.llm_engine
        # Validate everything before queuing anything.
        for p, sp in zip(plist, params):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must hold SamplingParams, got "
                                f"{type(sp).__name__}")
            engine.validate(len(engine.tokenize(p, sp.truncate_prompt_tokens)[1]), sp)
        ids = [f"gen-{next(self._counter)}" for _ in plist]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(plist), desc="Generating", dynamic_ncols=True)
        try:
            for rid, p, sp in zip(ids, plist, params):
                engine.add_request(rid, p, sp)
            t0 = time.perf_counter()
            gen0 = engine.generation_tokens_total
            while len(results) < len(ids):
                for req in engine.step():
                    if req.finished:
                        results[req.request_id] = req.to_output()
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(out_tok_s=f"{(engine.generation_tokens_total - gen0) / dt:.0f}",
                                    refresh=False)
                if not engine.has_unfinished() and len(results) < len(ids):
                    raise RuntimeError("engine went idle with unfinished requests")
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]
