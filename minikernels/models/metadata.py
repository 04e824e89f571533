"""The forward contract between the engine and the decoder model.

One engine step runs one model forward over the flattened tokens of many sequences:

    logits = model(input_ids, meta, kv_caches)

input_ids int64 [T]. Tokens are ordered: first ``num_decode`` decode tokens (one per
decoding sequence), then the prefill chunks of ``P`` sequences back to back.
kv_caches: one (k_cache, v_cache) pair per layer, each
[num_blocks, block_size, num_kv_heads, head_dim] (the model's dtype), or None for a
cache-less forward (all tokens are whole prompts: plain varlen causal attention).

Each layer writes the new tokens' K/V into the cache (write_kv_cache with slot_mapping)
before attending, so attention always reads the whole context from the cache:
decode tokens through paged_decode_attention, prefill chunks through flash_attention with
block_table (a chunk attends to its cached prefix, bottom-right causal).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RecurrentPart:
    """One launch of the recurrent ops over some of a step's sequences: tokens
    ``tokens`` (a slice of the step's T), their ``cu_seqlens`` int32 [N + 1] (relative to
    the slice), the longest sequence, each sequence's state slot (int32 [N] or None) and
    whether it resumes its slot (bool [N]; None = all)."""

    tokens: slice
    cu_seqlens: Tensor
    max_seqlen: int
    state_indices: Tensor | None
    has_initial_state: Tensor | None


@dataclass
class AttentionMetadata:
    """Per-step batch description (all tensors on the model's device).

    positions:            int64 [T], each token's position in its sequence.
    slot_mapping:         int64 [T], cache slot of each token (-1 = padding, not written);
                          None with kv_caches=None.
    num_decode:           the first num_decode tokens are single decode tokens.
    decode_block_table:   int32 [num_decode, max_blocks] (None when num_decode == 0).
    decode_seq_lens:      int32 [num_decode], context length incl. the new token.
    cu_seqlens_q:         int32 [P + 1] over the prefill tokens (offsets relative to
                          token num_decode).
    cu_seqlens_k:         int32 [P + 1], cumulative context lengths (cached prefix + chunk).
    max_seqlen_q/k:       upper bounds of the prefill chunk / context lengths.
    prefill_block_table:  int32 [P, max_blocks] (None for a cache-less forward).
    logits_indices:       int64 [R], rows of the T tokens whose logits are returned
                          (None = all T rows).
    layer_group:          hybrid KV pools (models/kv_layout.py): each layer's KV group;
                          None = every layer reads the fields above (group 0).
    group_meta:           groups 1..: the same step with that group's ``slot_mapping``,
                          ``decode_block_table`` and ``prefill_block_table``.
    state_indices:        recurrent layers (hybrid models: LFM2's short conv): int32 [N],
                          each sequence's state slot, N = num_decode + P in token order
                          (decode rows, then prefill chunks); -1 = a padding row (its
                          state is neither read nor written). None with kv_caches=None.
    has_initial_state:    bool [N]: whether the sequence's slot holds its state so far
                          (False: a first chunk, started from zeros); None = all True.
    """

    positions: Tensor
    slot_mapping: Tensor | None = None
    num_decode: int = 0
    decode_block_table: Tensor | None = None
    decode_seq_lens: Tensor | None = None
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    prefill_block_table: Tensor | None = None
    logits_indices: Tensor | None = None
    layer_group: tuple[int, ...] | None = None
    group_meta: list["AttentionMetadata"] | None = None
    state_indices: Tensor | None = None
    has_initial_state: Tensor | None = None

    def for_layer(self, layer: int) -> "AttentionMetadata":
        """The metadata layer ``layer`` attends with (its KV group's tables)."""
        if self.layer_group is None:
            return self
        g = self.layer_group[layer]
        return self if g == 0 else self.group_meta[g - 1]  # type: ignore[index]

    def with_group_tables(self, slot_mappings: list[Tensor],
                          decode_tables: list[Tensor | None],
                          prefill_tables: list[Tensor | None],
                          layer_group: tuple[int, ...]) -> "AttentionMetadata":
        """Attach groups 1..'s slot mappings and block tables (hybrid KV pools)."""
        self.layer_group = layer_group
        self.group_meta = [dataclasses.replace(self, slot_mapping=s, decode_block_table=d,
                                               prefill_block_table=p)
                           for s, d, p in zip(slot_mappings, decode_tables, prefill_tables)]
        return self

    def recurrent_parts(self, with_state: bool) -> list["RecurrentPart"]:
        """The step's sequences for the recurrent ops, in at most two launches: the decode
        rows (one token each: the ops' decode kernels) and the prefill chunks (their
        chunked prefill kernels); a cache-less forward's whole prompts in one. Computed
        once per step (cached on this object). with_state: the cache is there (state slots
        named); False: every sequence starts from zeros, nothing kept."""
        key = "_recurrent_parts" if with_state else "_recurrent_parts_stateless"
        cached = self.__dict__.get(key)
        if cached is not None:
            return cached
        nd, t = self.num_decode, self.num_tokens
        dev = self.positions.device
        idx = self.state_indices if with_state else None
        init = self.has_initial_state if with_state else None
        parts: list[RecurrentPart] = []
        if nd:
            parts.append(RecurrentPart(slice(0, nd),
                                       torch.arange(nd + 1, dtype=torch.int32, device=dev), 1,
                                       None if idx is None else idx[:nd], None))
        if self.cu_seqlens_q is not None and t > nd:
            parts.append(RecurrentPart(slice(nd, t), self.cu_seqlens_q.to(torch.int32),
                                       max(1, int(self.max_seqlen_q)),
                                       None if idx is None else idx[nd:],
                                       None if init is None else init[nd:]))
        self.__dict__[key] = parts
        return parts

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def for_prompts(lengths: list[int], device: torch.device | str = "cpu",
                    last_only: bool = False) -> "AttentionMetadata":
        """Cache-less metadata for whole prompts of the given lengths (tests, scoring)."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        if lengths:
            cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]) \
            if lengths else torch.zeros(0, dtype=torch.int64)
        logits_indices = (cu[1:].long() - 1) if last_only else None
        return AttentionMetadata(
            positions=positions.to(device), cu_seqlens_q=cu.to(device),
            cu_seqlens_k=cu.to(device), max_seqlen_q=max(lengths, default=0),
            max_seqlen_k=max(lengths, default=0),
            logits_indices=logits_indices.to(device) if logits_indices is not None else None)
