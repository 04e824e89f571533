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
