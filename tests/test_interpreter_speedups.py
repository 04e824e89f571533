"""conftest.py's Triton-interpreter speed-ups change no result: a launch still patches
triton.language and restores it afterwards, helpers still run interpreted, and the
overflow sanitizer still runs (and fails) when the options ask for debug."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without a GPU")

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _shifted(x, shift):
    return _scaled(x, 2) + shift          # a helper calling a helper


@triton.jit
def _helper_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, _shifted(x, 1.0) + _scaled(x, 3.0), mask=mask)


@triton.jit
def _add_int32(a_ptr, b_ptr, out_ptr):
    tl.store(out_ptr, tl.load(a_ptr) + tl.load(b_ptr))


def test_speedups_are_installed():
    from triton.runtime import interpreter

    assert interpreter._mk_sped_up
    assert interpreter._patch_lang.__name__ == "patch_lang"
    assert interpreter.interpreter_semantic.binary_op_sanitize_overflow_impl.__name__ \
        == "sanitize_overflow"


def test_helpers_compute_the_same_and_the_language_is_restored():
    before = {name: getattr(tl, name) for name in ("arange", "load", "store", "program_id")}
    x = torch.randn(37)
    out = torch.full_like(x, float("nan"))
    for _ in range(2):                    # a second launch patches again from scratch
        _helper_kernel[(3,)](x, out, x.numel(), BLOCK=16)
        torch.testing.assert_close(out, x * 2 + 1 + x * 3)
    assert {name: getattr(tl, name) for name in before} == before


def test_np_dtypes_match_upstream_table():
    import numpy as np
    from triton.runtime import interpreter

    assert interpreter._get_np_dtype(tl.bfloat16) == np.dtype(np.uint16)
    assert interpreter._get_np_dtype(tl.float8e4nv) == np.dtype(np.uint8)
    assert interpreter._get_np_dtype(tl.pointer_type(tl.float32)) == np.dtype(np.uint64)
    assert interpreter._get_np_dtype(tl.block_type(tl.int32, [4])) == np.dtype(np.int32)
    assert interpreter._get_np_dtype(tl.block_type(tl.pointer_type(tl.int8), [4])) \
        == np.dtype(np.uint64)


def test_overflow_sanitizer_still_runs_under_debug(monkeypatch):
    from triton.runtime import interpreter

    a = torch.tensor([2**31 - 1], dtype=torch.int32)
    b = torch.tensor([1], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    _add_int32[(1,)](a, b, out)           # no debug: wraps, as upstream (assert unchecked)
    assert out.item() == -(2**31)
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    with pytest.raises(Exception, match="overflow"):
        _add_int32[(1,)](a, b, out)
