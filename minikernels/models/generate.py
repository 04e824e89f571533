"""A plain generation loop over the paged KV cache, and ``minikernels generate``.

    model = load_model("tiny", dtype="float32", device="cpu")
    out = generate_tokens(model, [[256, 72, 105]], max_new_tokens=8)   # greedy

One sequence gets a contiguous run of cache blocks; the prompts are prefilled together
(optionally in chunks of ``prefill_chunk`` tokens), then every step decodes one token per
live sequence. This is the reference loop for the model; the engine (minikernels.engine)
adds scheduling, prefix caching and CUDA graphs on top of the same forward contract.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .kv_cache_dtype import KV_CACHE_DTYPE_NAMES

if TYPE_CHECKING:  # torch loads when generation runs, so `generate --help` stays quick
    import torch
    from torch import Tensor

    from .metadata import AttentionMetadata

__all__ = ["add_generate_arguments", "build_step_metadata", "generate_tokens", "run_generate",
           "sample_next"]


def build_step_metadata(decode: Sequence[tuple[Sequence[int], int]],
                        prefill: Sequence[tuple[Sequence[int], int, int]], block_size: int,
                        device: torch.device | str = "cpu", all_logits: bool = False,
                        state_slots: Sequence[int] | None = None) -> AttentionMetadata:
    """Metadata for one forward over a paged cache (tokens: decodes first, then chunks).

    decode:  (block_row, context_len) per decoding sequence; its one new token sits at
             position context_len - 1 (context_len counts it).
    prefill: (block_row, num_cached, chunk_len) per prefill chunk: tokens at positions
             num_cached .. num_cached + chunk_len - 1, attending to the cached prefix.
    Logits rows: each decode token and each chunk's last token (all rows if all_logits).
    state_slots: recurrent models: each item's state slot (decodes, then chunks); a
    chunk with no cached tokens starts from a zero state.
    """
    import torch

    from .metadata import AttentionMetadata

    positions: list[int] = []
    slots: list[int] = []

    def slot(row: Sequence[int], pos: int) -> int:
        return int(row[pos // block_size]) * block_size + pos % block_size

    width = max([len(r) for r, *_ in list(decode) + list(prefill)] or [1])

    def table(rows: list[Sequence[int]]) -> Tensor:
        t = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            t[i, :len(r)] = torch.tensor(list(r), dtype=torch.int32)
        return t.to(device)

    logits_rows: list[int] = []
    for row, ctx in decode:
        logits_rows.append(len(positions))
        positions.append(ctx - 1)
        slots.append(slot(row, ctx - 1))
    cu_q, cu_k = [0], [0]
    for row, cached, n in prefill:
        positions.extend(range(cached, cached + n))
        slots.extend(slot(row, p) for p in range(cached, cached + n))
        logits_rows.append(len(positions) - 1)
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + cached + n)
    nd = len(decode)
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decode=nd,
        logits_indices=None if all_logits else torch.tensor(logits_rows, dtype=torch.int64,
                                                            device=device))
    if nd:
        meta.decode_block_table = table([r for r, _ in decode])
        meta.decode_seq_lens = torch.tensor([c for _, c in decode], dtype=torch.int32,
                                            device=device)
    if prefill:
        meta.cu_seqlens_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
        meta.cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
        meta.max_seqlen_q = max(n for _, _, n in prefill)
        meta.max_seqlen_k = max(c + n for _, c, n in prefill)
        meta.prefill_block_table = table([r for r, _, _ in prefill])
    if state_slots is not None:
        if len(state_slots) != nd + len(prefill):
            raise ValueError(f"state_slots must name one slot per item ({nd + len(prefill)}),"
                             f" got {len(state_slots)}")
        meta.state_indices = torch.tensor(list(state_slots), dtype=torch.int32, device=device)
        meta.has_initial_state = torch.tensor([True] * nd + [c > 0 for _, c, _ in prefill],
                                              dtype=torch.bool, device=device)
    return meta


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits fp32 [B, V] -> next ids int64 [B]: greedy at temperature 0, else top-p sampling."""
    import torch

    from .. import ops

    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_p < 1.0:   # the engine sampler's top-p (mk.ops.top_k_top_p_mask_logits)
        scaled = ops.top_k_top_p_mask_logits(scaled, top_p=top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_tokens(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                    eos_token_ids: Sequence[int] = (), seed: int = 0, block_size: int = 16,
                    prefill_chunk: int | None = None,
                    kv_cache_dtype: str = "auto") -> list[list[int]]:
    """Generate up to max_new_tokens per prompt; returns the new ids of each (eos included
    when hit). The caches are allocated for exactly these prompts, in the model's dtype or
    fp8 (kv_cache_dtype "fp8")."""
    import torch

    with torch.inference_mode():
        return _generate(model, prompts, max_new_tokens, temperature, top_p, eos_token_ids,
                         seed, block_size, prefill_chunk, kv_cache_dtype)


def _generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              temperature: float, top_p: float, eos_token_ids: Sequence[int], seed: int,
              block_size: int, prefill_chunk: int | None, kv_cache_dtype: str
              ) -> list[list[int]]:
    import torch

    from .kv_cache_dtype import resolve_kv_cache_dtype

    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = model.config.max_position_embeddings
    for p in prompts:
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"prompt ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings ({limit})")
    device = model.device
    rows: list[list[int]] = []
    next_block = 0
    for p in prompts:
        n = math.ceil((len(p) + max_new_tokens) / block_size)
        rows.append(list(range(next_block, next_block + n)))
        next_block += n
    recurrent = model.config.is_recurrent    # prompt i keeps its state in slot i
    kv = model.allocate_kv_caches(next_block, block_size, dtype=kv_dtype,
                                  **({"num_state_slots": len(prompts)} if recurrent else {}))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    eos = set(int(e) for e in eos_token_ids)

    # Prefill, all prompts together, chunk by chunk.
    chunk = prefill_chunk or max(len(p) for p in prompts)
    done = [0] * len(prompts)
    last_logits: list[Tensor | None] = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        items, ids = [], []
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        for i in active:
            n = min(chunk, len(prompts[i]) - done[i])
            items.append((rows[i], done[i], n))
            ids.extend(prompts[i][done[i]:done[i] + n])
        meta = build_step_metadata([], items, block_size, device,
                                   state_slots=active if recurrent else None)
        logits = model(torch.tensor(ids, dtype=torch.int64, device=device), meta, kv)
        for j, i in enumerate(active):
            done[i] += items[j][2]
            if done[i] == len(prompts[i]):
                last_logits[i] = logits[j]
    outputs: list[list[int]] = [[] for _ in prompts]
    first = sample_next(torch.stack(last_logits), temperature, top_p, gen)  # type: ignore
    live = []
    for i, t in enumerate(first.tolist()):
        outputs[i].append(t)
        if t not in eos and max_new_tokens > 1:
            live.append(i)

    # Decode: one token per live sequence per step.
    while live:
        items = [(rows[i], len(prompts[i]) + len(outputs[i])) for i in live]
        ids = [outputs[i][-1] for i in live]
        meta = build_step_metadata(items, [], block_size, device,
                                   state_slots=live if recurrent else None)
        logits = model(torch.tensor(ids, dtype=torch.int64, device=device), meta, kv)
        nxt = sample_next(logits, temperature, top_p, gen).tolist()
        still = []
        for i, t in zip(live, nxt):
            outputs[i].append(t)
            if t not in eos and len(outputs[i]) < max_new_tokens:
                still.append(i)
        live = still
    return outputs


# ----------------------------------------------------------------------------- CLI
def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``minikernels generate``."""
    parser.add_argument("--model", required=True,
                        help="hub id (org/name), HF model directory, or a built-in name "
                             "(random weights)")
    parser.add_argument("--revision", default=None,
                        help="hub branch, tag or commit (hub ids; default: main)")
    parser.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling (and dummy weights) seed")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights and activations; auto = the checkpoint's")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--quantization", default=None,
                        choices=["int4", "gptq", "awq", "fp8", "fp8_w8a8", "int8", "mxfp4", "dense"],
                        help="int4 / fp8: RTN-quantize the weights at load; gptq / awq: an "
                             "int4 checkpoint (default: none, or the checkpoint's own)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message with the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle *.bin weights (trusted sources only)")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_NAMES,
                        help="auto = the model's dtype; fp8 = e4m3 (half the bytes); "
                             "fp8_e5m2 = e5m2")
    return parser


def run_generate(args: argparse.Namespace) -> int:
    """Run ``minikernels generate``: print the completion of --prompt; returns an exit code.

    The model loads first (it says what is wrong with a path or id), then its tokenizer."""
    from .._extras import missing_extra_message
    from .hub import resolve_model
    from .loader import load_model
    from .tokenizer import load_tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.max_tokens < 1:
        print("error: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        path = resolve_model(args.model, getattr(args, "revision", None))
        model = load_model(path, dtype=args.dtype, device=args.device,
                           quantization=args.quantization,
                           allow_pickle=getattr(args, "allow_pickle", False),
                           seed=getattr(args, "seed", 0))
        tokenizer = load_tokenizer(path)
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = tokenizer.encode(prompt)
        if not ids:
            print("error: the prompt encodes to no tokens", file=sys.stderr)
            return 2
        eos = list(tokenizer.eos_token_ids)
        eos += [e for e in model.config.eos_token_ids if e not in eos]
        max_new = min(args.max_tokens, model.config.max_position_embeddings - len(ids))
        if max_new < 1:
            print(f"error: the prompt ({len(ids)} tokens) fills the model's context",
                  file=sys.stderr)
            return 2
        out = generate_tokens(model, [ids], max_new_tokens=max_new,
                              temperature=args.temperature, top_p=args.top_p,
                              eos_token_ids=eos, seed=args.seed, block_size=args.block_size,
                              kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    except ImportError as exc:
        message = missing_extra_message(exc, "minikernels generate")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    new = out[0]
    if new and new[-1] in eos:
        new = new[:-1]
    print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_generate_arguments(argparse.ArgumentParser(prog="minikernels generate"))
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
