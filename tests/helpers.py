"""Test helpers: tolerances per dtype and comparisons against the fp32 reference."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def examples(n: int) -> int:
    """``max_examples`` for a property test that sets its own count (an interpreter-bound
    kernel test, where each case costs seconds): n, or the loaded hypothesis profile's
    count when that is larger, so a bug hunt (HYPOTHESIS_PROFILE=hunt, 300) covers these
    tests too."""
    from hypothesis import settings

    return max(n, settings.default.max_examples)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0,
                 **overrides: float) -> None:
    """Compare with the tolerance of ``expected``'s dtype (times ``scale``); NaN fails."""
    tol = {k: v * scale for k, v in TOL[expected.dtype].items()}
    tol.update(overrides)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert not torch.isnan(actual).any(), "NaN in output (unwritten element?)"
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


@contextlib.contextmanager
def spy_launches(module: Any, kernel_name: str, constexpr: str) -> Iterator[list]:
    """Patch ``module.<kernel_name>`` (a Triton kernel) so that each launch records the
    value of one of its keyword constexprs; the kernel still runs."""
    seen: list = []
    real = getattr(module, kernel_name)

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kw: Any) -> Any:
                seen.append(kw[constexpr])
                return real[grid](*args, **kw)
            return launch
    with mock.patch.object(module, kernel_name, Spy()):
        yield seen


MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gate_act_by_hand(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """The fused MoE ops' gate activations written out (fp64 in, fp64 out): silu
    g sigmoid(g); gelu g (1 + erf(g / sqrt 2)) / 2; gelu_tanh
    g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) / 2; relu2 (non-gated experts only)
    max(g, 0)^2."""
    if activation == "silu":
        return gate * torch.sigmoid(gate)
    if activation == "gelu":
        return 0.5 * gate * (1.0 + torch.erf(gate / 2.0 ** 0.5))
    if activation == "relu2":
        return torch.where(gate > 0, gate, torch.zeros_like(gate)) ** 2
    assert activation == "gelu_tanh", activation
    return 0.5 * gate * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5
                                          * (gate + 0.044715 * gate ** 3)))


def moe_by_hand(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                activation: str = "silu", gated: bool = True) -> torch.Tensor:
    """fused_moe's independent formula: one (token, slot) at a time in fp64 on the given
    (dense or dequantized) experts w13 [E, 2I, H], w2 [E, H, I]; the activated intermediate
    act(gate) * up (``gate_act_by_hand``) rounded to x.dtype as the op's contract says.
    gated=False (non-gated experts): w13 [E, I, H] holds the up rows, the intermediate is
    act(up). Returns [T, H] fp64 on the CPU."""
    inter = w2.shape[2]
    xd, w13d, w2d, twd = (v.double().cpu() for v in (x, w13, w2, topk_weights))
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t, row in enumerate(topk_ids.cpu().tolist()):
        for j, e in enumerate(row):
            if gated:
                gate = w13d[e, :inter] @ xd[t]
                up = w13d[e, inter:] @ xd[t]
                act = gate_act_by_hand(gate, activation) * up
            else:
                act = gate_act_by_hand(w13d[e] @ xd[t], activation)
            act = act.to(x.dtype).double()
            out[t] += twd[t, j] * (w2d[e] @ act)
    return out


def bench_serve_llm_kwargs(argv: list[str]) -> dict[str, Any]:
    """The keyword arguments (and ``model``) ``minikernels bench serve ARGV`` builds its LLM
    with; the LLM is faked, so nothing loads or runs."""
    import pytest

    import minikernels.engine.llm_engine as llm_engine
    from minikernels.cli import main

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_llm(model: str, **kwargs: Any) -> None:
        seen.update(kwargs, model=model)
        raise Stop

    with mock.patch.object(llm_engine, "LLM", fake_llm), pytest.raises(Stop):
        main(["bench", "serve", *argv])
    return seen


def _rank_with_environment(rank: int, target: Any, environ: dict, *args: Any) -> None:
    from minikernels.distributed.launch import run_with_environment

    run_with_environment(target, environ, rank, *args)


def spawn_ranks(target: Any, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(target, args, nprocs)`` through the library's worker
    start method (MK_WORKER_MULTIPROC_METHOD; conftest.py picks the forkserver, which
    imports torch and minikernels once for the whole run): each rank runs
    ``target(rank, *args)`` with this process's current environment; join, and raise
    when a rank failed."""
    import os

    import torch.multiprocessing as mp

    from minikernels.distributed.launch import worker_context

    method = worker_context().get_start_method()
    mp.start_processes(_rank_with_environment, args=(target, dict(os.environ), *args),
                       nprocs=nprocs, join=True, start_method=method)


def paged_kv_cache_form(k: torch.Tensor, v: torch.Tensor, layout: str, form: str,
                        device: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """K / V pages [P, page, Hkv, D] as a FlashInfer paged cache: HND transposes pages to
    [P, Hkv, page, D]; form "tuple" gives (k, v) as strided views into larger zero-filled
    tensors (their own offsets and strides), anything else one [P, 2, ...] tensor."""
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if form == "tuple":
        big_k = torch.zeros(k.shape[0] + 1, *k.shape[1:-1], k.shape[-1] + 3,
                            dtype=k.dtype, device=device)
        big_v = torch.zeros_like(big_k)
        kc, vc = big_k[1:, ..., 2:2 + k.shape[-1]], big_v[1:, ..., :k.shape[-1]]
        kc.copy_(k)
        vc.copy_(v)
        return kc, vc
    out = torch.empty(k.shape[0], 2, *k.shape[1:], dtype=k.dtype, device=device)
    out[:, 0], out[:, 1] = k, v
    return out
