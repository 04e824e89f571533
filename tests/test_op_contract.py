"""The op contract: custom ops with fake impls (opcheck), torch.compile, backend selection,
and clear errors for bad input."""
from __future__ import annotations

import logging

import pytest
import torch

import minikernels as mk
from minikernels import backend as mk_backend

OPS_WITH_SAMPLES = {}


def _samples(device: str):
    """Small valid inputs for every public op (args for torch.ops.minikernels.*)."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, device=device)
    w = torch.rand(64, device=device) + 0.5
    q = torch.randn(5, 4, 16, device=device)
    k = torch.randn(5, 2, 16, device=device)
    cache = mk.ops.build_rope_cache(16, 32).to(device)
    pos = torch.tensor([0, 1, 2, 0, 1], device=device)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    kc = torch.randn(4, 8, 2, 16, device=device)
    vc = torch.randn(4, 8, 2, 16, device=device)
    bt = torch.tensor([[1, 3], [0, 2]], dtype=torch.int32, device=device)
    sl = torch.tensor([9, 4], dtype=torch.int32, device=device)
    slots = torch.tensor([0, 9, -1, 17, 30], device=device)
    qw = torch.randint(-2**31, 2**31 - 1, (16, 8), dtype=torch.int32, device=device)
    sc = (torch.rand(16, 2, device=device) / 10).half()
    zr = torch.randint(0, 16, (16, 2), device=device).half()
    xh = torch.randn(3, 64, device=device).half()
    return {
        "rms_norm": (x, w, 1e-6, 1.0),
        "fused_add_rms_norm": (x, torch.randn_like(x), w, 1e-6, 1.0),
        "rms_norm_quant": (x, w, torch.randn_like(x), 1e-6, 0.0, torch.int8, None, 16, None,
                           0.0, False),
        "layer_norm": (x, w, torch.randn(64, device=device), 1e-5),
        "fused_add_layer_norm": (x, torch.randn_like(x), w, None, 1e-5),
        "silu_and_mul": (x,),
        "act_and_mul_quant": (x, "silu", torch.int8, None, 8, None, 0.0, True),
        "gelu_and_mul": (x, "tanh"),
        "fatrelu_and_mul": (x, 0.25),
        "swigluoai_and_mul": (x, 1.702, 7.0),
        "gelu_variant": (x, "gelu_new"),
        "rotary_embedding": (q, k, pos, cache),
        "qk_norm_rope": (q, k, torch.rand(16, device=device), None, pos, cache, 1e-6, True,
                         1.0, False),
        "int4_matmul": (xh, qw, sc, zr, 32, None),
        "int8_matmul": (xh, torch.randint(0, 256, (13, 64), dtype=torch.uint8, device=device),
                        (torch.rand(13, 2, device=device) / 100).half(),
                        torch.randint(0, 256, (13, 2), device=device).half(), 32,
                        torch.randn(13, device=device).half()),
        # fp8_matmul takes the weight's bytes (e4m3 bit patterns; see minikernels/ops/fp8.py)
        "fp8_matmul": (xh, torch.randn(16, 64, device=device).to(torch.float8_e4m3fn).view(
                           torch.uint8), torch.rand(2, 2, device=device) / 50, [8, 32],
                       torch.randn(16, device=device).half()),
        "flash_attention": (q, k, k.clone(), cu, cu, 3, 3, True, 0.25, -1, 0.0, None),
        "write_kv_cache": (k, k.clone(), kc, vc, slots),
        "paged_decode_attention": (q[:2], kc, vc, bt, sl, 0.25, -1, 0.0, 0),
        "apply_token_bitmask": (torch.randn(3, 70, device=device),
                                torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32,
                                              device=device),
                                torch.tensor([2, 0], device=device), 70),
        "fsm_advance": (torch.tensor([1, 0, 2], device=device),
                        torch.zeros(3, dtype=torch.int8, device=device),
                        torch.tensor([2, 0], device=device), torch.tensor([1, 0], device=device),
                        torch.tensor([3, 69], device=device),
                        torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32,
                                      device=device),
                        torch.tensor([1, 2, 0], device=device),
                        torch.tensor([(1 << 32) | 69], device=device),
                        torch.tensor([2], device=device),
                        torch.arange(70, device=device) == 5, 70),
        "fsm_mask_logits": (torch.randn(3, 70, device=device),
                            torch.tensor([1, 0, 2], device=device),
                            torch.tensor([2, 0], device=device),
                            torch.tensor([1, 0], device=device),
                            torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32,
                                          device=device), 70),
        "top_k_top_p_mask_logits": (torch.randn(3, 70, device=device),
                                    torch.tensor([2, 0, 5], device=device),
                                    torch.tensor([0.9, 1.0, 0.5], device=device),
                                    torch.tensor([0.0, 0.1, 0.2], device=device)),
        "lora_delta": (x, torch.randn(2, 4, 64, device=device),
                       torch.randn(2, 10, 4, device=device),
                       torch.tensor([1, -1, 0], device=device),
                       torch.tensor([0.5, 2.0], device=device)),
        "fused_moe": (x, torch.randn(4, 10, 64, device=device) * 0.1,
                      torch.randn(4, 64, 5, device=device) * 0.1,
                      torch.rand(3, 2, device=device),
                      torch.tensor([[1, 3], [0, 0], [2, 1]], device=device)),
        "fused_moe_int4": (xh, torch.randint(-2**31, 2**31 - 1, (4, 64, 8), dtype=torch.int32,
                                             device=device),
                           (torch.rand(4, 64, 2, device=device) / 40).half(),
                           torch.randint(0, 16, (4, 64, 2), device=device).half(),
                           torch.randint(-2**31, 2**31 - 1, (4, 64, 4), dtype=torch.int32,
                                         device=device),
                           (torch.rand(4, 64, 1, device=device) / 40).half(),
                           torch.randint(0, 16, (4, 64, 1), device=device).half(),
                           torch.rand(3, 2, device=device),
                           torch.tensor([[1, 3], [0, 0], [2, 1]], device=device), 32),
        "fused_moe_fp8": (xh, (torch.randn(4, 64, 64, device=device) * 64).to(
                              torch.float8_e4m3fn).view(torch.uint8),
                          torch.rand(4, 2, 2, device=device) / 800,
                          (torch.randn(4, 64, 32, device=device) * 64).to(
                              torch.float8_e4m3fn).view(torch.uint8),
                          torch.rand(4, 2, 1, device=device) / 800,
                          torch.rand(3, 2, device=device),
                          torch.tensor([[1, 3], [0, 0], [2, 1]], device=device), [32, 32]),
        "fused_moe_int8": (xh, torch.randint(-128, 128, (4, 64, 64), dtype=torch.int8,
                                             device=device),
                           torch.rand(4, 64, device=device) / 800,
                           torch.randint(-128, 128, (4, 64, 32), dtype=torch.int8,
                                         device=device),
                           torch.rand(4, 64, device=device) / 800,
                           torch.rand(3, 2, device=device),
                           torch.tensor([[1, 3], [0, 0], [2, 1]], device=device)),
        "fused_moe_fp8_w8a8": (xh, (torch.randn(4, 64, 64, device=device) * 64).to(
                                   torch.float8_e4m3fn).view(torch.uint8),
                               torch.rand(4, 2, 2, device=device) / 800,
                               (torch.randn(4, 64, 32, device=device) * 64).to(
                                   torch.float8_e4m3fn).view(torch.uint8),
                               torch.rand(4, 2, 1, device=device) / 800,
                               torch.rand(3, 2, device=device),
                               torch.tensor([[1, 3], [0, 0], [2, 1]], device=device),
                               [32, 32]),
        "fused_moe_int8_w8a8": (xh, torch.randint(-128, 128, (4, 64, 64), dtype=torch.int8,
                                                  device=device),
                                torch.rand(4, 64, device=device) / 800,
                                torch.randint(-128, 128, (4, 64, 32), dtype=torch.int8,
                                              device=device),
                                torch.rand(4, 64, device=device) / 800,
                                torch.rand(3, 2, device=device),
                                torch.tensor([[1, 3], [0, 0], [2, 1]], device=device)),
        "fused_moe_mxfp4": (xh, torch.randint(0, 256, (4, 64, 2, 16), dtype=torch.uint8,
                                              device=device),
                            torch.randint(119, 124, (4, 64, 2), dtype=torch.uint8,
                                          device=device),
                            torch.randint(0, 256, (4, 64, 1, 16), dtype=torch.uint8,
                                          device=device),
                            torch.randint(119, 124, (4, 64, 1), dtype=torch.uint8,
                                          device=device),
                            torch.rand(3, 2, device=device),
                            torch.tensor([[1, 3], [0, 0], [2, 1]], device=device)),
        "moe_align_block_size": (torch.tensor([[1, 3], [0, 0], [2, 1]], device=device), 4,
                                 4, torch.tensor([1, -1, 0, 2], dtype=torch.int32,
                                                 device=device), True, False),
        "rejection_sample": (torch.tensor([[1, 2], [3, 0]], device=device),
                             torch.tensor([2, 1], dtype=torch.int32, device=device),
                             torch.softmax(torch.randn(2, 3, 5, device=device), -1), None,
                             torch.rand(2, 2, device=device),
                             torch.rand(2, 5, device=device) + 0.1,
                             torch.tensor([False, True], device=device)),
        "per_token_group_quant_fp8": (xh, 32, 1e-10, True, False, False),
        "topk_softmax": (torch.randn(5, 12, device=device).to(torch.bfloat16), 3, True,
                         torch.int32),
        "topk_sigmoid": (torch.randn(5, 12, device=device).to(torch.bfloat16), 3, True,
                         torch.randn(12, device=device), 1e-6, 4, 2, torch.int32),
        "w8a8_block_fp8_matmul": ((torch.randn(3, 96, device=device) * 8).to(
                                      torch.float8_e4m3fn),
                                  (torch.randn(40, 96, device=device) * 8).to(
                                      torch.float8_e4m3fn),
                                  torch.rand(3, 2, device=device) / 50,
                                  torch.rand(2, 2, device=device) / 50, [32, 64],
                                  torch.bfloat16),
        "scaled_int8_quant": (xh, None, None, False),
        "scaled_mm": (torch.randint(-128, 128, (3, 96), dtype=torch.int8, device=device),
                      torch.randint(-128, 128, (40, 96), dtype=torch.int8,
                                    device=device).t(),
                      torch.rand(3, device=device) / 50, torch.rand(40, device=device) / 50,
                      torch.bfloat16, torch.randn(40, device=device).to(torch.bfloat16)),
        "gated_delta_rule": (q[:, :2], k, torch.randn(5, 4, 8, device=device),
                             -torch.rand(5, 4, device=device), torch.rand(5, 4, device=device),
                             cu, torch.randn(3, 4, 16, 8, device=device),
                             torch.tensor([2, 0], device=device),
                             torch.tensor([True, False], device=device), 0.25, True),
        "causal_conv1d": (x[:, :6], torch.randn(6, 4, device=device),
                          torch.randn(6, device=device), cu[:2],
                          torch.randn(3, 6, 3, device=device),
                          torch.tensor([2], device=device),
                          torch.tensor([False], device=device), True, 3),
        "mamba2_scan": (q[:, :, :6], torch.randn(5, 4, device=device),
                        -torch.rand(4, device=device), k[:, :, :8], k[:, :, 8:], cu,
                        torch.randn(4, device=device), torch.randn(4, device=device), True,
                        0.0, float("inf"), torch.randn(3, 4, 6, 8, device=device),
                        torch.tensor([2, -1], device=device),
                        torch.tensor([True, False], device=device)),
        "selective_scan": (x[:, :6].repeat(2, 1)[:5], torch.randn(5, 6, device=device),
                           -torch.rand(6, 8, device=device), k[:, :, :8], k[:, :, 8:], cu,
                           torch.randn(6, device=device), torch.randn(5, 6, device=device),
                           torch.randn(6, device=device), True,
                           torch.randn(3, 6, 8, device=device),
                           torch.tensor([2, -1], device=device),
                           torch.tensor([True, False], device=device)),
    }


# torch's schema check compares every input before / after the call with allclose, which
# fp8 tensors do not have: those ops skip it (tests/test_fp8_w8a8.py compares the inputs)
OPCHECK_UTILS = {"w8a8_block_fp8_matmul": ("test_autograd_registration", "test_faketensor",
                                           "test_aot_dispatch_dynamic")}


def test_every_op_has_samples():
    registered = {name for name in dir(torch.ops.minikernels)
                  if isinstance(getattr(torch.ops.minikernels, name),
                                torch._ops.OpOverloadPacket)}
    missing = registered - set(_samples("cpu"))
    assert not missing, f"ops without opcheck samples: {missing}"


@pytest.mark.parametrize("name", list(_samples("cpu")))
def test_opcheck(name, device):
    args = _samples(device)[name]
    op = getattr(torch.ops.minikernels, name)
    if name in OPCHECK_UTILS:
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS[name])
        return
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])
def test_opcheck_rotary_styles(backend, is_neox_style, device):
    # the explicit bool argument (the generic sample above leaves it at its default)
    q, k, pos, cache = _samples(device)["rotary_embedding"]
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.rotary_embedding,
                              (q, k, pos, cache, is_neox_style))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("name", ["fused_moe", "fused_moe_int4", "fused_moe_fp8",
                                  "fused_moe_fp8_w8a8", "fused_moe_int8",
                                  "fused_moe_int8_w8a8", "fused_moe_mxfp4"])
def test_opcheck_moe_activation(name, activation, device):
    # the fused MoE ops' activation argument (the generic sample leaves it at "silu")
    op = getattr(torch.ops.minikernels, name)
    assert op.default._schema.arguments[-2].name == "activation"
    with mk.use_backend("triton"):
        torch.library.opcheck(op, _samples(device)[name], {"activation": activation})


@pytest.mark.parametrize("activation", ["relu2", "silu"])
@pytest.mark.parametrize("name", ["fused_moe", "fused_moe_int4", "fused_moe_fp8",
                                  "fused_moe_fp8_w8a8", "fused_moe_int8",
                                  "fused_moe_int8_w8a8", "fused_moe_mxfp4"])
def test_opcheck_moe_nongated(name, activation, device):
    # non-gated experts (gated=False, the ops' last argument): the generic sample's w13
    # (and its scales / zeros) cut to the I up rows
    op = getattr(torch.ops.minikernels, name)
    assert op.default._schema.arguments[-1].name == "gated"
    args = list(_samples(device)[name])
    up_rows = {"fused_moe": (1,), "fused_moe_int4": (1, 2, 3), "fused_moe_fp8": (1, 2),
               "fused_moe_fp8_w8a8": (1, 2), "fused_moe_int8": (1, 2),
               "fused_moe_int8_w8a8": (1, 2),
               "fused_moe_mxfp4": (1, 2)}[name]
    for i in up_rows:          # (fp8: 2 row blocks of 32 -> 1)
        args[i] = args[i][:, :args[i].shape[1] // 2].contiguous()
    with mk.use_backend("triton"):
        torch.library.opcheck(op, tuple(args), {"activation": activation, "gated": False})


@pytest.mark.parametrize("name", ["fused_moe", "fused_moe_int4", "fused_moe_fp8",
                                  "fused_moe_fp8_w8a8", "fused_moe_int8",
                                  "fused_moe_int8_w8a8", "fused_moe_mxfp4"])
def test_opcheck_moe_swigluoai_biases(name, device):
    # GPT-OSS's experts: the optional expert biases (w13_bias [E, 2I], w2_bias [E, H])
    # and swigluoai's alpha / limit, the schema's arguments before activation / gated
    op = getattr(torch.ops.minikernels, name)
    names = [a.name for a in op.default._schema.arguments]
    assert names[-6:] == ["w13_bias", "w2_bias", "alpha", "limit", "activation", "gated"]
    args = _samples(device)[name]
    x, e = args[0], args[1].shape[0]
    # I from w2 (int4: 8 values per packed word; mxfp4: 32 per block)
    w2_at, per_word = {"fused_moe": (2, 1), "fused_moe_int4": (4, 8),
                       "fused_moe_mxfp4": (3, 32)}.get(name, (3, 1))
    b13 = torch.randn(e, 2 * args[w2_at].shape[2] * per_word, device=device).to(x.dtype)
    b2 = torch.randn(e, x.shape[1], device=device).to(x.dtype)
    with mk.use_backend("triton"):
        torch.library.opcheck(op, args, {"w13_bias": b13, "w2_bias": b2, "alpha": 1.5,
                                         "limit": 0.75, "activation": "swigluoai"})
        torch.library.opcheck(op, args, {"w2_bias": b2})


def test_torch_compile_fullgraph_over_ops():
    def block(x, residual, w, q, k, pos, cache):
        y, h = mk.ops.rms_norm(x, w, residual=residual)
        gated = mk.ops.silu_and_mul(torch.cat([y, y], dim=-1))
        q2, k2 = mk.ops.rotary_embedding(q, k, pos, cache)
        return gated, h, q2, k2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = (torch.randn(4, 32), torch.randn(4, 32), torch.rand(32) + 0.5, torch.randn(4, 2, 16),
            torch.randn(4, 1, 16), torch.arange(4), mk.ops.build_rope_cache(16, 8))
    for got, want in zip(compiled(*args), block(*args)):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_rotary_gptj_style():
    def rope(q, k, pos, cache):
        return mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=False)

    torch._dynamo.reset()
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    args = (torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.arange(4),
            mk.ops.build_rope_cache(16, 8))
    for got, want in zip(compiled(*args), rope(*args)):
        torch.testing.assert_close(got, want)
    neox = mk.ops.rotary_embedding(*args)
    assert not torch.allclose(compiled(*args)[0], neox[0])


def test_torch_compile_fullgraph_qk_norm_rope_on_qkv_views():
    """The fused q / k norm + RoPE on strided views of a qkv projection compiles in one
    graph and equals the eager call."""
    def prologue(qkv, qw, kw, pos, cache):
        q = qkv[:, :32].view(-1, 2, 16)
        k = qkv[:, 32:48].view(-1, 1, 16)
        return mk.ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6, True, 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(prologue, fullgraph=True, backend="aot_eager")
    args = (torch.randn(4, 64), torch.rand(16), torch.rand(16), torch.arange(4),
            mk.ops.build_rope_cache(16, 8))
    for got, want in zip(compiled(*args), prologue(*args)):
        torch.testing.assert_close(got, want)


# -------------------------------------------------------------------- backend selection
def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("MINIKERNELS_BACKEND", raising=False)
    assert mk.current_backend() == "auto"
    with mk.use_backend("reference"):
        assert mk.current_backend() == "reference"
        with mk.use_backend("triton"):
            assert mk.current_backend() == "triton"
        assert mk.current_backend() == "reference"
    assert mk.current_backend() == "auto"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MINIKERNELS_BACKEND", "reference")
    assert mk.current_backend() == "reference"
    monkeypatch.setenv("MINIKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MINIKERNELS_BACKEND"):
        mk.current_backend()


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        with mk.use_backend("tpu"):
            pass


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("MINIKERNELS_BACKEND", raising=False)
    assert mk_backend.resolve("rms_norm", torch.device("cpu")) == "reference"


def test_cuda_backend_on_cpu_tensors_errors():
    with mk.use_backend("cuda"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        mk.ops.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mk_backend.resolve("rms_norm", torch.device("cpu"))


def test_missing_extension_falls_back_to_triton_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(mk_backend, "_cuda_ext", None)
    monkeypatch.setattr(mk_backend, "_logged", set())
    monkeypatch.setattr(mk_backend, "triton_available", lambda: True)
    dev = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="minikernels"), mk.use_backend("cuda"):
        for _ in range(3):
            assert mk_backend.resolve("rms_norm", dev, cuda_ok=True) == "triton"
    lines = [r for r in caplog.records if "falling back to Triton" in r.getMessage()]
    assert len(lines) == 1
    with mk.use_backend("auto"):
        assert mk_backend.resolve("rms_norm", dev, cuda_ok=True, prefer_cuda=True) == "triton"


def test_auto_prefers_cuda_kernel_only_once_validated(monkeypatch):
    """auto follows an op's prefer-CUDA policy only for ops a GPU run validated
    (backend.CUDA_VALIDATED); an unvalidated CUDA kernel runs only when asked for."""
    monkeypatch.setattr(mk_backend, "_cuda_ext", object())
    monkeypatch.setattr(mk_backend, "triton_available", lambda: True)
    dev = torch.device("cuda")
    monkeypatch.setattr(mk_backend, "CUDA_VALIDATED", frozenset())
    with mk.use_backend("auto"):
        assert mk_backend.resolve("int4_matmul", dev, cuda_ok=True, prefer_cuda=True) == "triton"
    with mk.use_backend("cuda"):
        assert mk_backend.resolve("int4_matmul", dev, cuda_ok=True, prefer_cuda=False) == "cuda"
    monkeypatch.setattr(mk_backend, "CUDA_VALIDATED", frozenset({"int4_matmul"}))
    with mk.use_backend("auto"):
        assert mk_backend.resolve("int4_matmul", dev, cuda_ok=True, prefer_cuda=True) == "cuda"
        assert mk_backend.resolve("int4_matmul", dev, cuda_ok=True, prefer_cuda=False) == "triton"
        assert mk_backend.resolve("int4_matmul", dev, cuda_ok=False) == "triton"
        assert mk_backend.resolve("rms_norm", dev, cuda_ok=True, prefer_cuda=True) == "triton"


def test_validated_cuda_ops_have_committed_gpu_results():
    """An op enters CUDA_VALIDATED only with a GPU run's results committed: the CUDA test
    log of that run under bench/results/<gpu>/ must show no failure."""
    import pathlib

    if not mk_backend.CUDA_VALIDATED:
        return
    results = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
    logs = sorted(results.glob("*/pytest_cuda.log"))
    assert logs, "CUDA_VALIDATED is not empty but no GPU run's pytest_cuda.log is committed"
    for log in logs:
        tail = log.read_text().splitlines()[-5:]
        assert not any(" failed" in line for line in tail), (log, tail)


# ---------------------------------------------------------------------------- bad input
def test_rms_norm_bad_inputs():
    x = torch.randn(4, 16)
    w = torch.ones(16)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.ops.rms_norm(x.int(), w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mk.ops.rms_norm([1.0, 2.0], w)
    with pytest.raises(ValueError, match="weight must have shape"):
        mk.ops.rms_norm(x, torch.ones(15))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        mk.ops.rms_norm(x, torch.ones(1, 16))
    with pytest.raises(ValueError, match="residual must have shape"):
        mk.ops.rms_norm(x, w, residual=torch.randn(4, 15))
    with pytest.raises(TypeError, match="residual must have the same dtype"):
        mk.ops.rms_norm(x, w, residual=torch.randn(4, 16).half())
    xt = torch.randn(16, 4).t()   # strided last dim: honoured, not refused
    torch.testing.assert_close(mk.ops.rms_norm(xt, w), mk.ops.rms_norm(xt.contiguous(), w))
    with pytest.raises(ValueError, match="eps must be > 0"):
        mk.ops.rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="weight_offset must be finite"):
        mk.ops.rms_norm(x, w, weight_offset=float("nan"))
    with pytest.raises(TypeError, match="weight_offset must be a number"):
        mk.ops.rms_norm(x, w, weight_offset=True)
    with pytest.raises(ValueError, match="weight must have shape"):
        mk.ops.gemma_rms_norm(x, torch.ones(15))
    with pytest.raises(ValueError, match="weight must be on meta"):
        mk.ops.rms_norm(torch.randn(4, 16, device="meta"), w)


def test_silu_and_mul_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        mk.ops.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(TypeError, match="dtype"):
        mk.ops.silu_and_mul(torch.ones(2, 8, dtype=torch.int64))


def test_gelu_and_mul_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        mk.ops.gelu_and_mul(torch.randn(2, 7))
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.ops.gelu_tanh_and_mul(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="approximate must be one of"):
        mk.ops.gelu_and_mul(torch.randn(2, 8), approximate="erf")


def test_activation_variants_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        mk.ops.fatrelu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="threshold must be a finite"):
        mk.ops.fatrelu_and_mul(torch.randn(2, 8), float("nan"))
    with pytest.raises(ValueError, match="limit must be > 0"):
        mk.ops.swigluoai_and_mul(torch.randn(2, 8), limit=0.0)
    with pytest.raises(ValueError, match="alpha must be a finite"):
        mk.ops.swigluoai_and_mul(torch.randn(2, 8), alpha="1")
    with pytest.raises(ValueError, match="kind must be one of"):
        mk.ops.gelu_variant(torch.randn(2, 8), "gelu_slow")
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.ops.gelu_quick(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_gelu_and_mul_exact(backend, device):
    x = torch.randn(3, 2, 10, device=device)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.gelu_and_mul, (x, "none"))


def test_rotary_bad_inputs():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cache = mk.ops.build_rope_cache(16, 8)
    pos = torch.arange(3)
    with pytest.raises(TypeError, match="positions must have dtype"):
        mk.ops.rotary_embedding(q, k, pos.float(), cache)
    with pytest.raises(ValueError, match="positions must have shape"):
        mk.ops.rotary_embedding(q, k, torch.arange(4), cache)
    with pytest.raises(ValueError, match="k must have shape"):
        mk.ops.rotary_embedding(q, torch.randn(3, 2, 8), pos, cache)
    with pytest.raises(TypeError, match="k must have dtype"):
        mk.ops.rotary_embedding(q, k.half(), pos, cache)
    with pytest.raises(ValueError, match="rot_dim"):
        mk.ops.rotary_embedding(q, k, pos, mk.ops.build_rope_cache(32, 8))
    with pytest.raises(ValueError, match=r"positions values must be in \[0, 8\)"):
        mk.ops.rotary_embedding(q, k, torch.tensor([0, 1, 8]), cache)
    for bad in (1, "gptj", None, torch.tensor(True)):
        with pytest.raises(TypeError, match="is_neox_style must be a bool, got"):
            mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=bad)


def test_fused_moe_int8_bad_inputs():
    x = torch.randn(3, 16).half()
    w13 = torch.randint(-128, 128, (2, 8, 16), dtype=torch.int8)
    s13 = torch.rand(2, 8)
    w2 = torch.randint(-128, 128, (2, 16, 4), dtype=torch.int8)
    s2 = torch.rand(2, 16)
    tw, ids = torch.rand(3, 2), torch.tensor([[0, 1], [1, 1], [0, 0]])
    mk.ops.fused_moe_int8(x, w13, s13, w2, s2, tw, ids)
    with pytest.raises(TypeError, match="w13 must have dtype"):
        mk.ops.fused_moe_int8(x, w13.view(torch.uint8), s13, w2, s2, tw, ids)
    with pytest.raises(TypeError, match="w2 must have dtype"):
        mk.ops.fused_moe_int8(x, w13, s13, w2.half(), s2, tw, ids)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.ops.fused_moe_int8(x.int(), w13, s13, w2, s2, tw, ids)
    with pytest.raises(TypeError, match="w13_scale must have dtype"):
        mk.ops.fused_moe_int8(x, w13, s13.half(), w2, s2, tw, ids)
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[E = 2, 8\]"):
        mk.ops.fused_moe_int8(x, w13, s13[:, :4], w2, s2, tw, ids)
    with pytest.raises(ValueError, match="w2_scale must be 2-D"):
        mk.ops.fused_moe_int8(x, w13, s13, w2, s2[:, :, None], tw, ids)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E = 2, 16, 4\]"):
        mk.ops.fused_moe_int8(x, w13, s13, w2[:, :8], s2, tw, ids)
    with pytest.raises(ValueError, match=r"w13 must have shape \[E, 2I, H = 16\]"):
        mk.ops.fused_moe_int8(x, w13[:, :, :8], s13, w2, s2, tw, ids)
    with pytest.raises(ValueError, match="w2_scale must be on meta"):
        mk.ops.fused_moe_int8(x.to("meta"), w13.to("meta"), s13.to("meta"),
                              w2.to("meta"), s2, tw.to("meta"), ids.to("meta"))
    with pytest.raises(ValueError, match=r"topk_ids values must be in \[0, 2\)"):
        mk.ops.fused_moe_int8(x, w13, s13, w2, s2, tw, ids + 1)


def test_int8_matmul_bad_inputs():
    x = torch.randn(3, 64).half()
    q = torch.randint(0, 256, (13, 64), dtype=torch.uint8)
    s = (torch.rand(13, 2) / 100).half()
    z = torch.full((13, 2), 128.0).half()
    mk.ops.int8_matmul(x, q, s, z, 32)
    with pytest.raises(TypeError, match="qweight must have dtype in \\(uint8\\)"):
        mk.ops.int8_matmul(x, q.view(torch.int8), s, z, 32)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.ops.int8_matmul(x.float(), q, s, z, 32)
    with pytest.raises(ValueError, match="group_size must be -1 .* multiple of 16, got 8"):
        mk.ops.int8_matmul(x, q, s, z, 8)
    with pytest.raises(ValueError, match=r"K \(64\) must be a multiple of group_size \(48\)"):
        mk.ops.int8_matmul(x, q, s, z, 48)
    with pytest.raises(ValueError, match=r"scales must have shape \[13, 1\]"):
        mk.ops.int8_matmul(x, q, s, z, -1)
    with pytest.raises(ValueError, match=r"x last dim \(32\) must equal K"):
        mk.ops.int8_matmul(x[:, :32], q, s, z, 32)
    with pytest.raises(ValueError, match=r"bias must have shape \[13\]"):
        mk.ops.int8_matmul(x, q, s, z, 32, torch.randn(12).half())
    with pytest.raises(ValueError, match="qweight must be on meta"):
        mk.ops.int8_matmul(x.to("meta"), q, s, z, 32)


def test_index_checks_context_is_thread_local():
    import threading

    from minikernels import _validation

    seen = {}
    with mk.index_checks(False):
        assert not _validation.index_checks_enabled()
        t = threading.Thread(target=lambda: seen.setdefault("other", _validation.index_checks_enabled()))
        t.start()
        t.join()
        # a disabled check lets a bad slot through to the (reference) kernel
        with pytest.raises(IndexError):
            mk.ops.write_kv_cache(torch.randn(1, 1, 8), torch.randn(1, 1, 8),
                                  torch.zeros(1, 8, 1, 8), torch.zeros(1, 8, 1, 8),
                                  torch.tensor([99]))
    assert seen["other"] is True
    assert _validation.index_checks_enabled()
    with pytest.raises(ValueError, match="slot_mapping values"):
        mk.ops.write_kv_cache(torch.randn(1, 1, 8), torch.randn(1, 1, 8),
                              torch.zeros(1, 8, 1, 8), torch.zeros(1, 8, 1, 8),
                              torch.tensor([99]))
