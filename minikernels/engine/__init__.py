"""Batched serving engine: continuous batching over a paged KV cache.

    import minikernels as mk
    llm = mk.LLM("tiny")                                   # or a HF dir, or "qwen2.5-0.5b"
    outs = llm.generate(["Hello"], mk.SamplingParams(max_tokens=32))
    outs[0].outputs[0].text

Modules: sampling_params (SamplingParams), outputs (RequestOutput, CompletionOutput),
sequence (Request, Sequence), detokenizer (incremental text), block_manager (KV blocks + prefix cache), scheduler
(continuous batching, chunked prefill, preemption), model_runner (metadata, CUDA graphs,
KV pool), sampler (batched sampling), llm_engine (LLMEngine, LLM), async_llm (AsyncLLM),
embedding (Embedder: embedding models), classifier (Classifier: classifiers, reward models,
rerankers; both on pooling_model's one-pass runner); the engine benchmarks live in minikernels.benchmarks.
See docs/engine.md.
"""
from .async_llm import AsyncLLM, EngineOverloaded
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .classifier import Classifier
from .embedding import Embedder
from .llm_engine import LLM, EngineSleeping, LLMEngine
from .lora import LoRARequest
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__all__ = ["AsyncLLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence",
           "Classifier", "CompletionOutput", "Embedder", "EngineOverloaded", "EngineSleeping",
           "LLM", "LLMEngine", "Logprob",
           "LoRARequest", "RequestOutput", "RequestOutputKind", "SamplingParams",
           "StructuredOutputsParams"]
