"""How a model's layers share the paged KV pool: one group, or a hybrid of full-attention
and sliding-window groups (vLLM's hybrid KV cache manager, for Gemma 2 / 3 and other
models that interleave both).

Uniform (the default, and every model without both kinds of layer): every layer has its
own cache tensors ``[num_blocks, block_size, Hkv, D]`` and every layer reads the
sequence's one block table.

Hybrid: a sliding-window layer only ever reads its last W keys, so its blocks before the
window can go back to the pool while the full-attention layers keep theirs. For that the
two kinds need their own block tables (KV *groups*): group 0 holds the F full-attention
layers, groups 1..m the S sliding layers, F per group (the last group padded). All groups
draw block ids from one pool: cache tensor pair ``slot`` j (j < F) is shared by the j-th
layer of every group, so block b of pair j belongs to whichever group holds b, and a
block freed by one group can serve any other. A block costs F layers' K/V instead of L,
so the same memory holds L / F times as many blocks; a sequence holds one group-0 block
per ``block_size`` tokens and m group blocks per block of its window.

Chosen when the model has F >= 1 full and S >= F sliding layers (every group then holds
F layers); otherwise the padding would cost more than the window saves, and the layout
stays uniform. A model whose every layer is sliding (Mistral v0.1, Phi-3-mini) lets its
first ceil(L / 8) layers play group 0: they keep every block (their kernels
still mask to the window), and the other layers hand theirs back.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DecoderConfig


@dataclass(frozen=True)
class KVCacheLayout:
    """Which cache tensors and which block table each layer uses.

    num_slots:     cache tensor pairs to allocate (each [num_blocks, block_size, Hkv, D]).
    layer_slot:    the pair of each layer.
    layer_group:   the KV group (block table) of each layer; 0 = the sequence's main table.
    num_groups:    1 (uniform) or 1 + m (hybrid: m sliding-window groups).
    window:        tokens a sliding layer's query sees, itself included (the config's
                   ``sliding_window``; window_left = window - 1); 0 when uniform.
    """

    num_slots: int
    layer_slot: tuple[int, ...]
    layer_group: tuple[int, ...]
    num_groups: int = 1
    window: int = 0

    @property
    def hybrid(self) -> bool:
        return self.num_groups > 1

    @property
    def num_sliding_groups(self) -> int:
        return self.num_groups - 1

    @staticmethod
    def uniform(num_layers: int) -> "KVCacheLayout":
        return KVCacheLayout(num_layers, tuple(range(num_layers)), (0,) * num_layers)


def plan_kv_layout(config: DecoderConfig, hybrid: bool = True) -> KVCacheLayout:
    """The layout for ``config``: hybrid when asked and worthwhile (see the module doc)."""
    n = config.num_layers
    # (Gemma 4: a layer reading an earlier layer's K / V holds no cache of its own: it
    # takes that layer's pair and block table)
    source = [getattr(config, "kv_source", lambda i: None)(i) for i in range(n)]
    own = [i for i in range(n) if source[i] is None]
    sliding = [i for i in own if config.is_sliding(i)]
    full = [i for i in own if not config.is_sliding(i)]
    if not full and sliding:
        # every layer sliding: a few keep every block as group 0 (fewer groups to fill
        # per step than one per layer), the rest release theirs
        keep = -(-n // 8)                         # at most ~8 groups
        full, sliding = sliding[:keep], sliding[keep:]
    if not hybrid or not full or len(sliding) < len(full):
        layout = KVCacheLayout.uniform(n)
        if any(src is not None for src in source):
            slot = [i if src is None else src for i, src in enumerate(source)]
            layout = KVCacheLayout(n, tuple(slot), (0,) * n)
        return layout
    per = len(full)
    slot = [0] * n
    group = [0] * n
    for j, layer in enumerate(full):
        slot[layer] = j
    for j, layer in enumerate(sliding):
        group[layer] = 1 + j // per
        slot[layer] = j % per
    for i, src in enumerate(source):
        if src is not None:
            slot[i], group[i] = slot[src], group[src]
    return KVCacheLayout(per, tuple(slot), tuple(group), 1 + -(-len(sliding) // per),
                         int(config.sliding_window))
