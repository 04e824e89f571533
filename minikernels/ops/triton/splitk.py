"""Host-side plumbing shared by the weight-only matmul kernels (int4, int8, fp8 matmul):
split-K, the M dispatch, the launches and the AOT specs that mirror them.

At decode sizes (M <= ``GEMV_MAX_M``) one program per output tile cannot fill the GPU, so
K is split over ``SPLIT`` programs per tile; each writes its fp32 partial sums to a
workspace ``ws`` [SPLIT, M, N], and :func:`reduce_splits` adds them in split order
0..SPLIT-1 (+ bias) and casts once: the same bits run to run and for any batch
composition, unlike fp32 atomics, for one extra launch and SPLIT * M * N * 8 bytes of
traffic (tiny beside the weight at M <= 16). :func:`arch_and_sms` is what the configs
are chosen from.

Each matmul module's launcher validates nothing (the op did) and calls, in order:
:func:`alloc_output` (y, or the whole answer for an empty M / N / K), :func:`pick_path`,
then :func:`launch_gemm` or :func:`launch_decode` with its tile config ``cfg``: every cfg
entry but ``k_tiles_per_split`` is a kernel constexpr or launch option, so a launch is
``kernel(*tensors, bias_ptr, y_ptr, [ws_ptr,] *ints, [k_tiles_per_split,] HAS_BIAS, EVEN_K,
**cfg, **constexprs)``. :func:`register_config` registers the AOT spec of such a launch.
:func:`decode_config` builds the decode path's cfg. The decode kernels' shared device
code: :func:`decode_tile` (a program's columns and slice of K), :func:`load_decode_vec` /
:func:`load_decode_rows` (one K tile of x and of a one-byte weight, M == 1 / M > 1) and
:func:`store_decode_tile` (the epilogue).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

GEMV_MAX_M = 16
_REDUCE_BLOCK = 1024


@functools.cache
def arch_and_sms(device_index: int | None) -> tuple[int, int]:
    """(compute capability as 80 / 90 / ..., SM count) of a CUDA device; the interpreter
    (None) pretends to be an H100 / H200 so the split-K paths get used there too."""
    if device_index is None or not torch.cuda.is_available():
        return 90, 132
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor, torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(x: torch.Tensor) -> int | None:
    """x's CUDA device index (the current device for a bare "cuda"), None off the GPU."""
    if not x.is_cuda:
        return None
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def split_plan(k_tiles: int, n_tiles: int, sms: int,
               split_k: int | None = None) -> tuple[int, int]:
    """(SPLIT, K tiles per split): by default about 4 programs per SM (n_tiles x SPLIT),
    at most 16 splits; ``split_k`` forces a count (tests). No split is left empty."""
    if split_k is None:
        split_k = max(1, min(k_tiles, (4 * sms) // max(1, n_tiles), 16))
    split_k = max(1, min(int(split_k), k_tiles))
    per_split = triton.cdiv(k_tiles, split_k)
    return triton.cdiv(k_tiles, per_split), per_split


def block_k_dividing(want: int, block: int, k: int) -> tuple[int, bool]:
    """(BLOCK_K, spans): a power of two <= want that divides ``block`` (a scale block or
    group along K, a multiple of 16), so that no K tile straddles two of them; when one
    block spans K (spans True), any width not wider than K needs (at least 16)."""
    if block >= k:
        return min(want, max(16, triton.next_power_of_2(k))), True
    b = want
    while block % b:        # block % 16 == 0 (checked by the op), so this stops at >= 16
        b //= 2
    return b, False


def decode_block_m(m: int) -> int:
    """The decode kernels' BLOCK_M: 1 (CUDA-core FMAs) for M == 1, else 16 (swap-AB MMA)."""
    return 1 if m == 1 else 16


def decode_config(block_m: int, block_n: int, block_k: int, n: int, k: int, sms: int,
                  split_k: int | None, **constexprs) -> dict:
    """A decode launch's cfg for BLOCK_N x BLOCK_K weight tiles: the split-K plan
    (``split_plan``: SPLIT, k_tiles_per_split), 4 warps, 4 stages, and the kernel's own
    ``constexprs``."""
    split, per_split = split_plan(triton.cdiv(k, block_k), triton.cdiv(n, block_n), sms,
                                  split_k)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **constexprs, SPLIT=split,
                k_tiles_per_split=per_split, num_warps=4, num_stages=4)


def alloc_output(x: torch.Tensor, n: int,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(y [M, N] in x.dtype for x [M, K], done): done when y already holds the answer, for
    M = 0 or N = 0 (nothing to compute) and K = 0 (y = bias, or zeros)."""
    m, k = x.shape
    y = _alloc.empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y, True
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(y.dtype)
        return y, True
    return y, False


def pick_path(path: str, m: int) -> str:
    """"auto" -> "gemv" (the decode kernel) for M <= GEMV_MAX_M, else "gemm"; "gemm" and
    "gemv" force a path (tests), the decode path only for M <= GEMV_MAX_M."""
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the decode path handles M <= {GEMV_MAX_M}, got M = {m}")
    return path


def interpreter_bf16(x: torch.Tensor) -> bool:
    """True for bf16 x under Triton's interpreter (CPU tensors), which computes bf16 tl.dot
    wrongly and truncates fp32 -> bf16 casts (triton 3.9): the kernels then dot in fp32 on
    the same bf16 values (DOT_F32) and round to nearest even before bf16 casts (RNE_BF16).
    Never true on a GPU."""
    return not x.is_cuda and x.dtype == torch.bfloat16


def aligned_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x [M, K] and a 1-byte weight w [N, K] both have 16-byte aligned rows and w unit K
    strides, so the kernels' vector-load hints (ALIGNED) are safe."""
    return (w.stride(1) == 1 and w.stride(0) % 16 == 0 and w.data_ptr() % 16 == 0
            and x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0)


def launch_gemm(kernel, tensors: tuple, ints: tuple, y: torch.Tensor,
                bias: torch.Tensor | None, cfg: dict, k: int, **constexprs) -> None:
    """kernel(*tensors, bias_ptr, y_ptr, *ints, HAS_BIAS, EVEN_K, **cfg, **constexprs), one
    program per BLOCK_M x BLOCK_N tile of y [M, N] (the kernel orders them: grouped_tile)."""
    m, n = y.shape
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    kernel[grid](*tensors, bias if bias is not None else y, y, *ints,
                 HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg, **constexprs)


def launch_decode(kernel, tensors: tuple, ints: tuple, y: torch.Tensor,
                  bias: torch.Tensor | None, cfg: dict, k: int, rne_bf16: bool = False,
                  **constexprs) -> None:
    """kernel(*tensors, bias_ptr, y_ptr, ws_ptr, *ints, k_tiles_per_split, HAS_BIAS, EVEN_K,
    **cfg, **constexprs) on a (N / BLOCK_N, SPLIT) grid; with SPLIT > 1 the programs write
    a workspace [SPLIT, M, N] and :func:`reduce_splits` (rounding as ``rne_bf16``) adds it
    up (+ bias) into y [M, N]."""
    m, n = y.shape
    cfg = dict(cfg)
    per_split, split = cfg.pop("k_tiles_per_split"), cfg["SPLIT"]
    ws = _alloc.empty((split, m, n), torch.float32, y.device) if split > 1 else y
    kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        *tensors, bias if bias is not None else y, y, ws, *ints, per_split,
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg, **constexprs)
    if split > 1:
        reduce_splits(ws, bias, y, rne_bf16=rne_bf16)


def register_config(name: str, fn, cfg: dict, args: dict[str, str], constexprs: dict,
                    **spec) -> KernelSpec:
    """Register the AOT spec of a launch with tile config ``cfg``: the constexprs are cfg's
    (less the launch options and k_tiles_per_split) and ``constexprs`` (HAS_BIAS, EVEN_K, ...
    and any stride compiled as a constant); ``args`` types the other arguments."""
    const = {c: v for c, v in cfg.items()
             if c not in ("num_warps", "num_stages", "k_tiles_per_split")}
    const.update(constexprs)
    sig = {**args, **{c: "constexpr" for c in const}}
    return register(KernelSpec(name=name, fn=fn, signature={a: sig[a] for a in fn.arg_names},
                               constexprs=const, num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"], **spec))


@triton.jit
def decode_tile(N, K, k_tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(pid_k, rn, rn_l, rk, k_begin, k_end) of a decode program (grid (N / BLOCK_N,
    SPLIT)): its split pid_k, its output columns rn and the same clamped into y for the
    loads (rn % N; the store is masked), rk = 0..BLOCK_K-1, and the slice [k_begin, k_end)
    of K that its split covers."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_l = rn % N
    rk = tl.arange(0, BLOCK_K)
    k_begin = pid_k * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + k_tiles_per_split * BLOCK_K)
    return pid_k, rn, rn_l, rk, k_begin, k_end


@triton.jit
def load_decode_vec(x_ptr, w_rows, k0, rk, K, stride_wk, ALIGNED: tl.constexpr,
                    EVEN_K: tl.constexpr):
    """M == 1: (x[k0 + rk] in fp32 [BK], the one-byte weight tile [BN, BK] at w_rows [BN, 1]
    + (k0 + rk) * stride_wk); columns past K read 0 unless EVEN_K. ALIGNED: x and the
    weight rows are 16-byte aligned with unit K strides (16-byte vector loads)."""
    w_ptrs = w_rows + (k0 + rk)[None, :].to(tl.int64) * stride_wk
    x_ptrs = x_ptr + k0 + rk
    if ALIGNED:
        x_ptrs = tl.multiple_of(x_ptrs, 16)
        w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
    if EVEN_K:
        x = tl.load(x_ptrs).to(tl.float32)
        wb = tl.load(w_ptrs)
    else:
        x = tl.load(x_ptrs, mask=k0 + rk < K, other=0.0).to(tl.float32)
        wb = tl.load(w_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
    return x, wb


@triton.jit
def load_decode_rows(x_ptrs, w_rows, rm, M, k0, rk, K, stride_wk, ALIGNED: tl.constexpr,
                     EVEN_K: tl.constexpr):
    """2 <= M <= 16: (the x tile [BM, BK] at x_ptrs + k0, rows >= M read 0; the one-byte
    weight tile [BN, BK] as ``load_decode_vec``)."""
    w_ptrs = w_rows + (k0 + rk)[None, :].to(tl.int64) * stride_wk
    xk_ptrs = x_ptrs + k0
    if ALIGNED:
        xk_ptrs = tl.multiple_of(xk_ptrs, [1, 16])
        w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
    if EVEN_K:
        x = tl.load(xk_ptrs, mask=rm[:, None] < M, other=0.0)
        wb = tl.load(w_ptrs)
    else:
        k_ok = (k0 + rk)[None, :] < K
        x = tl.load(xk_ptrs, mask=(rm[:, None] < M) & k_ok, other=0.0)
        wb = tl.load(w_ptrs, mask=k_ok, other=0)
    return x, wb


@triton.jit
def store_decode_tile(out, rn, rn_l, pid_k, bias_ptr, y_ptr, ws_ptr, M, N,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
                      RNE_BF16: tl.constexpr):
    """A decode program's fp32 out [BN, BM] (columns rn of y's rows 0..BM-1): SPLIT == 1:
    + bias, one cast, into y [M, N]; else into split pid_k of the workspace [SPLIT, M, N]."""
    rm_o = tl.arange(0, BLOCK_M)
    mask = (rn[:, None] < N) & (rm_o[None, :] < M)
    offs = rm_o[None, :].to(tl.int64) * N + rn[:, None]
    if SPLIT == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn_l).to(tl.float32)[:, None]
        if RNE_BF16:
            out = rne_bf16(out)
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + offs, out, mask=mask)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, MN, N, HAS_BIAS: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """y = sum over splits in order 0..SPLIT-1 (+ bias), one cast: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if RNE_BF16:   # interpreter only (see interpreter_rounding)
        acc = rne_bf16(acc)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                  rne_bf16: bool = False) -> None:
    """y [M, N] = the sum of ws [SPLIT, M, N] over splits (+ bias [N]), cast to y.dtype."""
    split, m, n = ws.shape
    has_bias = bias is not None
    splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
        ws, bias if has_bias else ws, y, m * n, n, HAS_BIAS=has_bias, SPLIT=split,
        BLOCK=_REDUCE_BLOCK, RNE_BF16=rne_bf16, num_warps=4)


# (bias False: the bias-free decode GEMVs' split-K sums the engine launches)
for _dt in ("fp16", "bf16", "fp32"):
    for _bias in (True, False):
        register(KernelSpec(
            name=f"splitk_reduce[{_dt}{'' if _bias else ',bias=False'}]",
            fn=splitk_reduce_kernel,
            signature={"ws_ptr": "*fp32", "bias_ptr": f"*{_dt}", "y_ptr": f"*{_dt}",
                       "MN": "i32", "N": "i32", "HAS_BIAS": "constexpr", "SPLIT": "constexpr",
                       "BLOCK": "constexpr", "RNE_BF16": "constexpr"},
            constexprs={"HAS_BIAS": _bias, "SPLIT": 4, "BLOCK": _REDUCE_BLOCK,
                        "RNE_BF16": False},
            num_warps=4, num_stages=1))
