"""minikernels.hf.kernelize on the newer families' transformers models (Gemma 3n / 4,
LFM3, Zamba2, Zamba, Jamba, EXAONE 3, Granite-MoE-shared): the routed norms, MLPs and recurrent
mixers, and the "minikernels" attention implementation, keep transformers' logits."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_model_support import make_hf_model

import minikernels.hf as mkhf

KINDS = ["gemma4", "gemma3n", "lfm3", "zamba2", "zamba", "jamba-moe", "exaone",
         "granitemoeshared"]


@pytest.mark.parametrize("kind", KINDS)
def test_kernelize_keeps_the_logits(kind: str) -> None:
    model = make_hf_model(kind)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    summary = mkhf.kernelize(model)
    assert summary.rms_norm, "no norm was routed"
    with torch.no_grad():
        got = model(ids).logits
        model.set_attn_implementation("minikernels")
        got_mk = model(ids).logits
    torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(got_mk, want, atol=3e-5, rtol=3e-5)
