"""One GPU run's result files -> the README's performance section (issue #12).

    python -m minikernels.benchmarks.report bench/results/h200                   # print it
    python -m minikernels.benchmarks.report bench/results/h200 --readme README.md
    python -m minikernels.benchmarks.report bench/results/h200 --readme README.md --check

Made from those files only: <dir>/<name>.json as plumbing.write_results / write_json write
them ({"meta": {"environment": ..., ...}, "rows": [...]}). Every target is decided from the
rows of one file: a fraction of a ceiling that file's run measured (``bw_frac``,
``frac_copy_bw``) or a speed-up against a peer timed in the same process
(``speedup_vs_cublas``, ``vs_best_sdpa``, ``speedup_vs_gather_sdpa``, transformers' rows).
A missing file or row gives "no data", never a default. ``--readme`` replaces what lies
between the README's ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` markers;
``--check`` exits 1 when that differs from what the files give.

Files read (their row keys: each function's docstring):
    int4_matmul.json          python -m bench.bench_int4            (int4.py)
    attention.json            python -m bench.bench_attention       (attention.py)
    paged_decode.json         python -m bench.bench_paged_decode    (paged_decode.py)
    serve_vs_hf.json          python bench/bench_serve.py           (serve_vs_hf.py)
    serve*.json               minikernels bench serve               (serve.py)
    ops.json                  minikernels bench ops                 (ops.py)
    spec_decode_timing.json   python bench/bench_spec_decode.py --timing
    engine.json               minikernels bench engine              (engine.py)
Subfolders (the d512 runs of bench/gpu_validation.sh) are not read.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plumbing import markdown_table

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
MET, MISSED, NO_DATA = "met", "missed", "no data"

# issue #12's targets, on the workloads the benchmarks time by default on a GPU
INT4_SHAPE, INT4_GROUP = "8192->8192", 128        # int4.py's "shape" is f"{K}->{N}"
INT4_GEMV_BW = 0.85                               # M = 1: of copy bandwidth
INT4_SMALL_M, INT4_SMALL_M_SPEEDUP = 16, 3.3      # every M <= 16: x cuBLAS bf16
INT4_LARGE_M, INT4_LARGE_M_SPEEDUP = 4096, 0.85   # M = 4096: x cuBLAS bf16
INT4_OURS = ("mk_triton", "mk_cuda", "mk_auto")
FLASH_HEAD_DIM, FLASH_SEQLEN, FLASH_VS_SDPA = 128, 4096, 1.0   # causal
SDPA_BACKENDS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")  # attention.PEERS[:3]
PAGED_BATCH, PAGED_CONTEXT, PAGED_HKV, PAGED_D = 64, 4096, 8, 128
PAGED_BW, PAGED_VS_GATHER = 0.90, 2.0
PAGED_OURS = ("minikernels_triton", "minikernels_cuda")         # bf16 KV, default split
SERVE_MODEL, SERVE_TOK_S, SERVE_VS_HF = "qwen2.5-0.5b", 30_000.0, 5.0

Row = dict[str, Any]


@dataclass
class Run:
    """One run's result files: ``files`` by stem ({"meta": dict, "rows": list}), and
    ``unread``: the other *.json in the folder, with why."""

    folder: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)

    def rows(self, name: str) -> list[Row] | None:
        """<name>.json's rows, None when the file is absent."""
        return self.files[name]["rows"] if name in self.files else None

    def meta(self, name: str) -> dict[str, Any]:
        """<name>.json's meta ({} when the file is absent)."""
        return self.files[name]["meta"] if name in self.files else {}


@dataclass(frozen=True)
class Target:
    """One row of the targets table."""

    name: str
    goal: str
    measured: str
    status: str


@dataclass(frozen=True)
class Absent:
    """Why a target has no figure: NO_DATA (file or row absent), or MISSED (the only rows
    there failed the benchmark's correctness check)."""

    why: str
    status: str = NO_DATA


# ------------------------------------------------------------------------- files
def results_folder(path: Path | str) -> Path:
    """The folder holding the JSON files: ``path``, or ``path/results`` where the device
    archive (bench/gpu_validation.sh's gpu_results.tar.gz) was unpacked as it is."""
    path = Path(path)
    if not any(path.glob("*.json")) and any((path / "results").glob("*.json")):
        return path / "results"
    return path


def load_run(path: Path | str) -> Run:
    """Every <folder>/*.json shaped as plumbing.write_json writes it ({"meta": {...},
    "rows": [...]}); other JSON files are listed in ``unread``."""
    run = Run(results_folder(path))
    for f in sorted(run.folder.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            run.unread.append(f"{f.name} ({type(exc).__name__})")
            continue
        if isinstance(data, dict) and isinstance(data.get("meta"), dict) \
                and isinstance(data.get("rows"), list):
            run.files[f.stem] = data
        else:
            run.unread.append(f"{f.name} (no meta / rows)")
    return run


# ------------------------------------------------------------------- formatting
def _num(v: Any, digits: int = 3) -> str:
    """A table cell: "" for None, whole numbers with thousands separators from 100, else
    ``digits`` significant digits."""
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v != v:
        return "nan"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def _shown(value: float, goal: float, scale: float = 1.0, unit: str = "",
           decimals: int = 1) -> str:
    """value * scale with ``decimals`` decimals, more where rounding would put it on the
    other side of ``goal`` than the decision (84.99% stays "84.99%" against 85%)."""
    text = ""
    for d in range(decimals, decimals + 6):
        text = f"{value * scale:,.{d}f}"
        if (float(text.replace(",", "")) >= round(goal * scale, 9)) == (value >= goal):
            break
    return text + unit


def _pct_of(value: float, goal: float) -> str:
    return _shown(value, goal, 100, "%")


def _x_of(value: float, goal: float) -> str:
    return _shown(value, goal, 1, "x", 2)


def _decide(value: float, goal: float) -> str:
    return MET if value >= goal else MISSED


def _absent(name: str, goal: str, why: Absent) -> Target:
    return Target(name, goal, why.why, why.status)


def _table(rows: Sequence[Row]) -> str:
    """plumbing.markdown_table with "|" and line breaks in cells escaped."""
    return markdown_table([{k: v.replace("|", "\\|").replace("\n", " ")
                            if isinstance(v, str) else v for k, v in r.items()} for r in rows])


def _groups(rows: Iterable[Row], keys: Sequence[str]) -> dict[tuple, list[Row]]:
    """Rows grouped by ``keys``' values, in first-seen order."""
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def _fastest(rows: Iterable[Row]) -> Row | None:
    """The row with the smallest ``us`` (rows without one are left out)."""
    timed = [r for r in rows if r.get("us") is not None]
    return min(timed, key=lambda r: r["us"]) if timed else None


# ------------------------------------------------------------------------ int4
def int4_pick(run: Run, m: int) -> Row | Absent:
    """int4_matmul.json (meta ``group_size`` must be INT4_GROUP): the fastest row of ours
    (``peer`` in INT4_OURS, ``correct`` true) at ``shape`` INT4_SHAPE and ``M`` = m."""
    rows = run.rows("int4_matmul")
    if rows is None:
        return Absent("int4_matmul.json absent")
    group = run.meta("int4_matmul").get("group_size")
    if group != INT4_GROUP:
        return Absent(f"int4_matmul.json ran group {group}, not {INT4_GROUP}")
    ours = [r for r in rows if r.get("shape") == INT4_SHAPE and r.get("M") == m
            and r.get("peer") in INT4_OURS and r.get("us") is not None]
    if not ours:
        return Absent(f"no minikernels row at {INT4_SHAPE}, M={m}")
    best = _fastest(r for r in ours if r.get("correct") is True)
    if best is None:
        return Absent(f"wrong output at {INT4_SHAPE}, M={m} (correct: false)", MISSED)
    return best


def target_int4_gemv(run: Run) -> Target:
    """int4 GEMV M=1 8192x8192 g128: the row's ``bw_frac`` (of the copy bandwidth that
    run measured) >= INT4_GEMV_BW."""
    name = "int4 GEMV, M=1, 8192x8192, group 128: of copy bandwidth"
    goal = f"≥ {INT4_GEMV_BW:.0%}"
    row = int4_pick(run, 1)
    if isinstance(row, Absent):
        return _absent(name, goal, row)
    if row.get("bw_frac") is None:
        return _absent(name, goal, Absent("bw_frac is null (no copy bandwidth measured)"))
    v = row["bw_frac"]
    return Target(name, goal, f"{_pct_of(v, INT4_GEMV_BW)} ({row['peer']}, "
                  f"{_num(row['us'])} us)", _decide(v, INT4_GEMV_BW))


def int4_speedups(run: Run, ms: Iterable[int]) -> list[tuple[int, Row]] | Absent:
    """(M, our fastest row) with a ``speedup_vs_cublas`` for each M in ``ms`` that has
    one (int4_pick); an Absent when none has, or when one of them has a wrong output."""
    found, why = [], Absent(f"no minikernels row at {INT4_SHAPE}")
    for m in ms:
        row = int4_pick(run, m)
        if isinstance(row, Absent):
            if row.status == MISSED:
                return row
            why = row
        elif row.get("speedup_vs_cublas") is not None:
            found.append((m, row))
        else:
            why = Absent(f"no cuBLAS bf16 row at {INT4_SHAPE}, M={m}")
    return found or why


def _int4_ms(run: Run, keep: Callable[[int], bool]) -> list[int]:
    """The M values of int4_matmul.json's rows at INT4_SHAPE that ``keep`` accepts."""
    return sorted({r["M"] for r in run.rows("int4_matmul") or []
                   if r.get("shape") == INT4_SHAPE and isinstance(r.get("M"), int)
                   and keep(r["M"])})


def target_int4_small_m(run: Run) -> Target:
    """int4 8192x8192 g128 at every M <= 16 in the file: the lowest ``speedup_vs_cublas``
    of our fastest rows >= INT4_SMALL_M_SPEEDUP."""
    name = f"int4, M <= {INT4_SMALL_M}, 8192x8192, group 128: vs cuBLAS bf16"
    goal = f"≥ {INT4_SMALL_M_SPEEDUP:g}x at every M"
    found = int4_speedups(run, _int4_ms(run, lambda m: m <= INT4_SMALL_M) or [1])
    if isinstance(found, Absent):
        return _absent(name, goal, found)
    m, row = min(found, key=lambda mr: mr[1]["speedup_vs_cublas"])
    v = row["speedup_vs_cublas"]
    ms = ", ".join(str(k) for k, _ in found)
    return Target(name, goal, f"{_x_of(v, INT4_SMALL_M_SPEEDUP)} at M={m} ({row['peer']}; "
                  f"lowest of M = {ms})", _decide(v, INT4_SMALL_M_SPEEDUP))


def target_int4_large_m(run: Run) -> Target:
    """int4 8192x8192 g128 at M = 4096: our fastest row's ``speedup_vs_cublas`` >=
    INT4_LARGE_M_SPEEDUP."""
    name = f"int4 GEMM, M={INT4_LARGE_M}, 8192x8192, group 128: vs cuBLAS bf16"
    goal = f"≥ {INT4_LARGE_M_SPEEDUP:g}x"
    found = int4_speedups(run, [INT4_LARGE_M])
    if isinstance(found, Absent):
        return _absent(name, goal, found)
    row = found[0][1]
    v = row["speedup_vs_cublas"]
    return Target(name, goal, f"{_x_of(v, INT4_LARGE_M_SPEEDUP)} ({row['peer']}, "
                  f"{_num(row['us'])} us)", _decide(v, INT4_LARGE_M_SPEEDUP))


# ------------------------------------------------------------------- attention
def flash_row(run: Run) -> Row | Absent:
    """attention.json: the row with ``head_dim`` 128, ``causal`` true, ``seqlen`` 4096."""
    rows = run.rows("attention")
    if rows is None:
        return Absent("attention.json absent")
    for r in rows:
        if (r.get("head_dim"), r.get("causal"), r.get("seqlen")) == \
                (FLASH_HEAD_DIM, True, FLASH_SEQLEN):
            return r
    return Absent(f"no row at d{FLASH_HEAD_DIM} causal seqlen {FLASH_SEQLEN}")


def _best_sdpa(row: Row) -> tuple[str, float] | None:
    """(backend, TFLOP/s) of the fastest SDPA backend in an attention.json row
    (``sdpa_flash_tflops``, ``sdpa_cudnn_tflops``, ``sdpa_efficient_tflops``)."""
    ran = [(b, row[f"{b}_tflops"]) for b in SDPA_BACKENDS if row.get(f"{b}_tflops")]
    return max(ran, key=lambda bt: bt[1]) if ran else None


def target_flash(run: Run) -> Target:
    """flash prefill d128 causal seqlen 4k: the row's ``vs_best_sdpa``
    (``minikernels_tflops`` / ``best_sdpa_tflops``, the best SDPA backend of the same run)
    >= FLASH_VS_SDPA."""
    name = f"flash prefill, d{FLASH_HEAD_DIM} causal, seqlen {FLASH_SEQLEN // 1024}k: " \
           "vs the best SDPA backend"
    goal = f"≥ {FLASH_VS_SDPA:g}x"
    row = flash_row(run)
    if isinstance(row, Absent):
        return _absent(name, goal, row)
    best = _best_sdpa(row)
    if row.get("vs_best_sdpa") is None or best is None:
        why = "no SDPA backend ran" if best is None else "minikernels did not run"
        return _absent(name, goal, Absent(why))
    v = row["vs_best_sdpa"]
    return Target(name, goal, f"{_x_of(v, FLASH_VS_SDPA)} ({_num(row['minikernels_tflops'])}"
                  f" vs {best[0]} {_num(best[1])} TFLOP/s)", _decide(v, FLASH_VS_SDPA))


# ---------------------------------------------------------------- paged decode
def _paged_heads(meta: dict[str, Any]) -> tuple[int | None, int | None]:
    """(Hkv, D) from paged_decode.json's meta ``shapes`` ("Hq=32, Hkv=8, D=128, block=16")."""
    text = str(meta.get("shapes", ""))
    hkv, d = re.search(r"\bHkv=(\d+)", text), re.search(r"\bD=(\d+)", text)
    return (int(hkv.group(1)) if hkv else None, int(d.group(1)) if d else None)


def paged_pick(run: Run) -> Row | Absent:
    """paged_decode.json (meta ``shapes`` with Hkv=8, D=128): our fastest bf16 row
    (``impl`` in PAGED_OURS, ``kv_dtype`` "bfloat16", a time ``us``) at ``batch`` 64,
    ``context`` 4096."""
    rows = run.rows("paged_decode")
    if rows is None:
        return Absent("paged_decode.json absent")
    if _paged_heads(run.meta("paged_decode")) != (PAGED_HKV, PAGED_D):
        return Absent(f"paged_decode.json ran {run.meta('paged_decode').get('shapes')}")
    best = _fastest(r for r in rows if (r.get("batch"), r.get("context")) ==
                    (PAGED_BATCH, PAGED_CONTEXT) and r.get("impl") in PAGED_OURS
                    and r.get("kv_dtype") == "bfloat16")
    return best or Absent(f"no minikernels row at {PAGED_BATCH} x {PAGED_CONTEXT}")


def _paged_target(run: Run, name: str, key: str, goal: float, goal_text: str,
                  shown: Callable[[float, float], str]) -> Target:
    row = paged_pick(run)
    if isinstance(row, Absent):
        return _absent(name, goal_text, row)
    if row.get(key) is None:
        return _absent(name, goal_text, Absent(f"{key} is null"))
    return Target(name, goal_text, f"{shown(row[key], goal)} ({row['impl']}, "
                  f"{_num(row['us'])} us)", _decide(row[key], goal))


def target_paged_bw(run: Run) -> Target:
    """paged decode 64 x 4096, Hkv 8, d128: our fastest row's ``frac_copy_bw`` >= PAGED_BW."""
    return _paged_target(run, f"paged decode, {PAGED_BATCH} x {PAGED_CONTEXT}, Hkv "
                         f"{PAGED_HKV}, d{PAGED_D}: of copy bandwidth", "frac_copy_bw",
                         PAGED_BW, f"≥ {PAGED_BW:.0%}", _pct_of)


def target_paged_vs_gather(run: Run) -> Target:
    """paged decode 64 x 4096, Hkv 8, d128: our fastest row's ``speedup_vs_gather_sdpa``
    >= PAGED_VS_GATHER."""
    return _paged_target(run, f"paged decode, {PAGED_BATCH} x {PAGED_CONTEXT}, Hkv "
                         f"{PAGED_HKV}, d{PAGED_D}: vs gather + SDPA",
                         "speedup_vs_gather_sdpa", PAGED_VS_GATHER,
                         f"≥ {PAGED_VS_GATHER:g}x", _x_of)


# ---------------------------------------------------------------------- serving
def serve_offline(run: Run) -> tuple[Row, list[Row]] | Absent:
    """serve_vs_hf.json (meta ``model`` qwen2.5-0.5b, ``quantization`` null): our offline
    row (``system`` "minikernels", ``phase`` "offline", ``output_tok_s``) and transformers'
    offline rows that have an ``output_tok_s`` (``system`` "hf-*"; failed ones carry
    ``error`` instead)."""
    rows = run.rows("serve_vs_hf")
    if rows is None:
        return Absent("serve_vs_hf.json absent")
    meta = run.meta("serve_vs_hf")
    if meta.get("model") != SERVE_MODEL or meta.get("quantization") is not None:
        return Absent(f"serve_vs_hf.json ran {meta.get('model')} "
                      f"(quantization {meta.get('quantization')})")
    offline = [r for r in rows if r.get("phase") == "offline" and r.get("output_tok_s")]
    ours = next((r for r in offline if r.get("system") == "minikernels"), None)
    if ours is None:
        return Absent("no minikernels offline row")
    return ours, [r for r in offline if str(r.get("system", "")).startswith("hf")]


def target_serve_tok_s(run: Run) -> Target:
    """serving qwen2.5-0.5b: our offline ``output_tok_s`` >= SERVE_TOK_S."""
    name = f"serving {SERVE_MODEL}: offline output tok/s"
    goal = f"≥ {SERVE_TOK_S:,.0f} tok/s"
    got = serve_offline(run)
    if isinstance(got, Absent):
        return _absent(name, goal, got)
    v = got[0]["output_tok_s"]
    return Target(name, goal, _shown(v, SERVE_TOK_S, 1, " tok/s", 0), _decide(v, SERVE_TOK_S))


def target_serve_vs_hf(run: Run) -> Target:
    """serving qwen2.5-0.5b: our offline ``output_tok_s`` / the best transformers offline
    ``output_tok_s`` of the same run >= SERVE_VS_HF."""
    name = f"serving {SERVE_MODEL}: vs transformers, same run"
    goal = f"≥ {SERVE_VS_HF:g}x"
    got = serve_offline(run)
    if isinstance(got, Absent):
        return _absent(name, goal, got)
    ours, hf = got
    if not hf:
        return _absent(name, goal, Absent("no transformers offline row with output_tok_s"))
    best = max(hf, key=lambda r: r["output_tok_s"])
    v = ours["output_tok_s"] / best["output_tok_s"]
    return Target(name, goal, f"{_x_of(v, SERVE_VS_HF)} (vs {best['system']} "
                  f"{_num(best['output_tok_s'])} tok/s)", _decide(v, SERVE_VS_HF))


TARGETS: tuple[Callable[[Run], Target], ...] = (
    target_int4_gemv, target_int4_small_m, target_int4_large_m, target_flash,
    target_paged_bw, target_paged_vs_gather, target_serve_tok_s, target_serve_vs_hf)


def targets(run: Run) -> list[Target]:
    """Issue #12's targets, each decided from one file of ``run``."""
    return [t(run) for t in TARGETS]


def targets_table(found: Sequence[Target]) -> str:
    rows = [{"target": t.name, "measured": t.measured, "goal": t.goal, "status": t.status}
            for t in found]
    counts = ", ".join(f"{sum(t.status == s for t in found)} {s}"
                       for s in (MET, MISSED, NO_DATA))
    return _table(rows) + \
        f"\nTargets: {counts}.\n"


# ------------------------------------------------------------ per-file tables
def int4_table(rows: list[Row]) -> str:
    """int4_matmul.json, one line per (``shape``, ``M``): our fastest correct row (``peer``
    mk_*, ``us``, ``bw_frac``, ``flops_frac``, ``speedup_vs_cublas``) beside cuBLAS bf16
    and tinygemm (``peer`` "cublas_bf16" / "tinygemm", their ``us``)."""
    out = []
    for (shape, m), grp in _groups(rows, ("shape", "M")).items():
        ours = _fastest(r for r in grp if str(r.get("peer", "")).startswith("mk_")
                        and r.get("correct") is True)
        peer = {r.get("peer"): r for r in grp}
        cublas, tiny = peer.get("cublas_bf16", {}), peer.get("tinygemm", {})
        wrong = [r["peer"] for r in grp if r.get("correct") is False]
        ours = ours or {}
        out.append({"K->N": shape, "M": m, "ours": ours.get("peer", ""),
                    "us": _num(ours.get("us")), "of copy bw": _pct(ours.get("bw_frac")),
                    "of bf16 mma": _pct(ours.get("flops_frac")),
                    "cuBLAS us": _num(cublas.get("us")),
                    "vs cuBLAS": _x(ours.get("speedup_vs_cublas")),
                    "tinygemm us": _num(tiny.get("us")),
                    "vs tinygemm": _x(_ratio(tiny.get("us"), ours.get("us"))),
                    "wrong output": ", ".join(wrong)})
    return _table(out)


def attention_table(rows: list[Row]) -> str:
    """attention.json as it is: ``minikernels_tflops``, ``frac_matmul_ceiling``, each peer's
    ``<peer>_tflops`` and ``vs_best_sdpa`` per (``head_dim``, ``causal``, ``seqlen``)."""
    peers = [*SDPA_BACKENDS, "flex_attention"]
    out = [{"d": r.get("head_dim"), "causal": r.get("causal"), "seqlen": r.get("seqlen"),
            "B x H": f"{r.get('batch')} x {r.get('heads')}",
            "ours TFLOP/s": _num(r.get("minikernels_tflops")),
            "of bf16 mma": _pct(r.get("frac_matmul_ceiling")),
            **{p: _num(r.get(f"{p}_tflops")) for p in peers},
            "vs best SDPA": _x(r.get("vs_best_sdpa"))} for r in rows]
    return _table(out)


def paged_decode_table(rows: list[Row]) -> str:
    """paged_decode.json, one line per (``batch``, ``context``): our fastest bf16 row
    (``impl``, ``us``, ``gb_per_s``, ``frac_copy_bw``, ``speedup_vs_gather_sdpa``), our
    fastest fp8-KV row (``impl`` *_fp8kv), and the peers' ``us`` (or ``skipped``)."""
    out = []
    for (b, ctx), grp in _groups(rows, ("batch", "context")).items():
        ours = _fastest(r for r in grp if r.get("impl") in PAGED_OURS) or {}
        fp8 = _fastest(r for r in grp if str(r.get("impl", "")).endswith("_fp8kv")
                       and not str(r.get("impl")).startswith("reference")) or {}
        by = {r.get("impl"): r for r in grp}

        def peer(name: str) -> str:
            r = by.get(name, {})
            return "skipped" if r.get("skipped") else _num(r.get("us"))
        out.append({"batch": b, "context": ctx, "ours": ours.get("impl", ""),
                    "us": _num(ours.get("us")), "GB/s": _num(ours.get("gb_per_s")),
                    "of copy bw": _pct(ours.get("frac_copy_bw")),
                    "vs gather+SDPA": _x(ours.get("speedup_vs_gather_sdpa")),
                    "fp8 KV us": _num(fp8.get("us")),
                    "fp8 KV of copy bw": _pct(fp8.get("frac_copy_bw")),
                    "gather+SDPA us": peer("gather_sdpa"),
                    "SDPA contiguous us": peer("sdpa_contiguous"),
                    "flex us": peer("flex_paged")})
    return _table(out)


OPS_OURS = ("triton", "cuda", "reference")


def ops_table(rows: list[Row]) -> str:
    """ops.json, one line per (``op``, ``shape``): our fastest ``backend`` (triton / cuda)
    with ``us``, ``frac_bw``, ``frac_mma``, beside the fastest peer (``backend`` "torch" or
    a named extra peer) and the speed-up over it."""
    out = []
    for (op, shape), grp in _groups(rows, ("op", "shape")).items():
        ours = _fastest(r for r in grp if r.get("backend") in OPS_OURS) or {}
        peer = _fastest(r for r in grp if r.get("backend") not in OPS_OURS) or {}
        out.append({"op": op, "shape": shape, "ours": ours.get("backend", ""),
                    "us": _num(ours.get("us")), "spread": _pct(ours.get("spread")),
                    "of copy bw": _pct(ours.get("frac_bw")),
                    "of bf16 mma": _pct(ours.get("frac_mma")),
                    "fastest peer": peer.get("backend", ""), "peer us": _num(peer.get("us")),
                    "vs peer": _x(_ratio(peer.get("us"), ours.get("us")))})
    return _table(out)


def serve_vs_hf_table(rows: list[Row]) -> str:
    """serve_vs_hf.json as it is (``system``, ``phase``, ``output_tok_s``, ``ttft_p50_ms``,
    ``tpot_p50_ms``, ``decode_tok_s``, ``fraction_of_floor``, ``error``), offline rows
    beside ours."""
    ours = next((r.get("output_tok_s") for r in rows if r.get("system") == "minikernels"
                 and r.get("phase") == "offline"), None)
    out = [{"system": r.get("system"), "phase": r.get("phase"),
            "output tok/s": _num(r.get("output_tok_s")),
            "ours vs it": _x(_ratio(ours, r.get("output_tok_s")))
            if r.get("phase") == "offline" and r.get("system") != "minikernels" else "",
            "TTFT p50 ms": _num(r.get("ttft_p50_ms")), "TPOT p50 ms": _num(r.get("tpot_p50_ms")),
            "decode tok/s": _num(r.get("decode_tok_s")),
            "of floor": _pct(r.get("fraction_of_floor")), "error": r.get("error", "")}
           for r in rows]
    return _table(out)


def serve_files(run: Run) -> list[str]:
    """``minikernels bench serve``'s files (serve.json, serve_main.json, serve_fp8kv.json,
    ...; not serve_vs_hf.json); serve.json is left out when serve_main.json holds the same
    rows (the serve stage writes both from one run)."""
    names = [n for n in run.files if n.startswith("serve") and n != "serve_vs_hf"]
    if "serve" in names and "serve_main" in names and \
            run.rows("serve") == run.rows("serve_main"):
        names.remove("serve")
    return sorted(names, key=lambda n: (n not in ("serve_main", "serve"), n))


def serve_table(run: Run, names: Sequence[str]) -> str:
    """One line per serve*.json: meta ``model``, ``quantization``, ``kv_cache_dtype``,
    ``num_loras``; the rows' ``phase`` "offline" ``output_tok_s`` (vs the first file, the
    plain run), "latency" ``ttft_p50_ms`` / ``tpot_p50_ms``, "decode-b1" ``decode_tok_s`` /
    ``fraction_of_floor``."""
    def phases(name: str) -> dict[Any, Row]:
        return {r.get("phase"): r for r in run.rows(name) or []}

    out, base = [], phases(names[0]).get("offline", {}).get("output_tok_s")
    for name in names:
        meta = run.meta(name)
        phase = phases(name)
        off, lat, b1 = (phase.get(p, {}) for p in ("offline", "latency", "decode-b1"))
        out.append({"file": f"{name}.json", "model": meta.get("model"),
                    "quantization": meta.get("quantization") or "",
                    "KV cache": meta.get("kv_cache_dtype"), "LoRAs": meta.get("num_loras"),
                    "offline tok/s": _num(off.get("output_tok_s")),
                    f"vs {names[0]}": _x(_ratio(off.get("output_tok_s"), base)),
                    "TTFT p50 ms": _num(lat.get("ttft_p50_ms")),
                    "TPOT p50 ms": _num(lat.get("tpot_p50_ms")),
                    "b1 decode tok/s": _num(b1.get("decode_tok_s")),
                    "b1 of floor": _pct(b1.get("fraction_of_floor"))})
    return _table(out)


def spec_table(rows: list[Row]) -> str:
    """spec_decode_timing.json as it is: ``batch``, ``method``, ``ms_per_token``,
    ``speedup`` (vs "off", no speculation, same batch), ``tok_per_s``,
    ``mean_acceptance_length``, ``acceptance_rate``, ``draft_share``,
    ``outputs_as_planned``."""
    out = [{"batch": r.get("batch"), "method": r.get("method"),
            "ms/token": _num(r.get("ms_per_token")), "vs off": _x(r.get("speedup")),
            "tok/s": _num(r.get("tok_per_s")),
            "acceptance length": _num(r.get("mean_acceptance_length")),
            "acceptance rate": _pct(r.get("acceptance_rate")),
            "draft share": _pct(r.get("draft_share")),
            "as planned": _pct(r.get("outputs_as_planned"))} for r in rows]
    return _table(out)


def engine_table(rows: list[Row]) -> str:
    """engine.json as it is: ``workload``, ``path``, ``device``, ``block_size``,
    ``host_ms_median``, ``host_ms_p99``, ``total_cpu_ms_per_step`` (stream path),
    ``tok_s``, ``gc_max_ms``."""
    out = [{"workload": r.get("workload"), "path": r.get("path"), "device": r.get("device"),
            "block size": r.get("block_size"), "host ms/step": _num(r.get("host_ms_median")),
            "p99": _num(r.get("host_ms_p99")),
            "CPU ms/step (stream)": _num(r.get("total_cpu_ms_per_step")),
            "tok/s": _num(r.get("tok_s")), "GC max ms": _num(r.get("gc_max_ms"))}
           for r in rows]
    return _table(out)


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body.rstrip()}\n\n</details>\n"


def sections(run: Run) -> list[str]:
    """A collapsed table per results file present, in the order of the targets."""
    simple: tuple[tuple[str, str, Callable[[list[Row]], str]], ...] = (
        ("int4_matmul", "int4 weight-only matmul (W4A16) beside cuBLAS bf16 and tinygemm",
         int4_table),
        ("attention", "flash attention prefill beside SDPA backends and flex_attention",
         attention_table),
        ("paged_decode", "paged decode attention beside gather + SDPA and flex_attention",
         paged_decode_table),
        ("serve_vs_hf", "serving beside transformers, same workload", serve_vs_hf_table),
    )
    out = []
    for name, title, table in simple:
        if name in run.files:
            out.append(_details(f"<code>{name}.json</code>: {title}", table(run.rows(name))))
    names = serve_files(run)
    if names:
        out.append(_details("<code>serve*.json</code>: <code>minikernels bench serve</code> "
                            "variants beside the plain run", serve_table(run, names)))
    if "ops" in run.files:
        meta = run.meta("ops")
        notes = "".join(f"\nfailed: {f}\n" for f in meta.get("failed") or [])
        notes += "\ntruncated: the stage's time cap cut the run\n" if meta.get("truncated") \
            else ""
        out.append(_details("<code>ops.json</code>: every op, fastest backend beside its "
                            "fastest peer", ops_table(run.rows("ops")) + notes))
    for name, title, table in (
            ("spec_decode_timing", "speculative decoding, ms per output token", spec_table),
            ("engine", "engine host time per step", engine_table)):
        if name in run.files:
            out.append(_details(f"<code>{name}.json</code>: {title}", table(run.rows(name))))
    return out


# ------------------------------------------------------------------ environment
def file_ceilings(meta: dict[str, Any]) -> dict[str, float]:
    """The ceilings a file's run measured: meta ``ceilings`` ({"copy_bytes_per_s",
    "bf16_matmul_flops"}: attention, paged_decode, ops, serve_vs_hf), int4_matmul's
    ``copy_bandwidth_GBps`` / ``bf16_matmul_TFLOPs``, serve's ``copy_bytes_per_s``. Zeros
    (not measured: CPU) are left out."""
    got: dict[str, float] = {}
    ceil = meta.get("ceilings")
    if isinstance(ceil, dict):
        got.update({k: ceil[k] for k in ("copy_bytes_per_s", "bf16_matmul_flops")
                    if isinstance(ceil.get(k), (int, float))})
    if isinstance(meta.get("copy_bandwidth_GBps"), (int, float)):
        got["copy_bytes_per_s"] = meta["copy_bandwidth_GBps"] * 1e9
    if isinstance(meta.get("bf16_matmul_TFLOPs"), (int, float)):
        got["bf16_matmul_flops"] = meta["bf16_matmul_TFLOPs"] * 1e12
    if isinstance(meta.get("copy_bytes_per_s"), (int, float)):
        got["copy_bytes_per_s"] = meta["copy_bytes_per_s"]
    return {k: v for k, v in got.items() if v > 0}


def _environment(meta: dict[str, Any]) -> str:
    """meta ``environment`` (plumbing.environment(): gpu, device, torch, triton, cuda) in
    words."""
    env = meta.get("environment") or {}
    where = f"{env['gpu']} ({env.get('device')})" if env.get("gpu") else \
        str(env.get("device", "unknown device"))
    parts = [where, f"torch {env.get('torch')}", f"triton {env.get('triton')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    return ", ".join(parts)


def environment_line(run: Run) -> str:
    """The device, torch / triton versions (every file's; each distinct one is named with
    its files) and the ceilings each file's run measured."""
    envs: dict[str, list[str]] = {}
    for name, data in run.files.items():
        envs.setdefault(_environment(data["meta"]), []).append(name)
    if len(envs) <= 1:
        line = f"Device: {next(iter(envs), 'no results files')}."
    else:
        line = "Environments differ between files: " + "; ".join(
            f"{env} ({', '.join(names)})" for env, names in envs.items()) + "."
    copy: dict[str, list[str]] = {}
    mma: dict[str, list[str]] = {}
    for name, data in run.files.items():
        ceil = file_ceilings(data["meta"])
        if "copy_bytes_per_s" in ceil:
            copy.setdefault(f"{ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s", []).append(name)
        if "bf16_matmul_flops" in ceil:
            mma.setdefault(f"{ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s", []).append(name)

    def listed(found: dict[str, list[str]]) -> str:
        return "; ".join(f"{v} ({', '.join(names)})" for v, names in found.items()) or "none"
    line += f" Ceilings measured in the same runs: copy bandwidth {listed(copy)}; bf16 " \
            f"matmul {listed(mma)}."
    return line


# ------------------------------------------------------------------------ block
def render(path: Path | str) -> str:
    """The README block for the result folder ``path``: the targets table, a collapsed
    table per results file, then the device, versions and ceilings."""
    run = load_run(path)
    files = ", ".join(f"`{n}.json`" for n in run.files) or "none found"
    parts = [f"Issue #12's targets, from one GPU run's result files only ({files}), by "
             "`python -m minikernels.benchmarks.report` (fractions are of the ceilings each "
             "file measured; speed-ups are against peers timed in the same process):\n",
             targets_table(targets(run))]
    if run.unread:
        parts.append("Not read (not a results file): " + ", ".join(run.unread) + ".\n")
    parts += sections(run)
    parts.append(environment_line(run) + "\n")
    return "\n".join(parts)


def _markers(text: str) -> tuple[int, int]:
    """(end of BEGIN, start of END) in ``text``; ValueError unless each occurs once, in
    that order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one {BEGIN} and one {END}")
    begin, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if end < begin:
        raise ValueError(f"{END} comes before {BEGIN}")
    return begin, end


def read_block(text: str) -> str:
    """What lies between the markers, without the surrounding newlines."""
    begin, end = _markers(text)
    return text[begin:end].strip("\n")


def replace_block(text: str, block: str) -> str:
    """``text`` with ``block`` between the markers (on lines of their own)."""
    begin, end = _markers(text)
    return text[:begin] + "\n" + block.strip("\n") + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minikernels.benchmarks.report",
                                description=__doc__.splitlines()[0])
    p.add_argument("results_dir", help="one run's result folder, e.g. bench/results/h200")
    p.add_argument("--readme", default=None,
                   help=f"write the block between {BEGIN} and {END} in this file "
                        "(default: print it)")
    p.add_argument("--check", action="store_true",
                   help="with --readme: change nothing, exit 1 if the file's block differs")
    args = p.parse_args(argv)
    if args.check and not args.readme:
        p.error("--check needs --readme")
    if not Path(args.results_dir).is_dir():
        p.error(f"results_dir: no such folder: {args.results_dir}")
    if args.readme and not Path(args.readme).is_file():
        p.error(f"--readme: no such file: {args.readme}")
    block = render(args.results_dir)
    if not args.readme:
        print(block)
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    try:
        current = read_block(text)
    except ValueError as exc:
        print(f"{readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if current == block.strip("\n"):
            return 0
        sys.stderr.writelines(difflib.unified_diff(
            (current + "\n").splitlines(True), (block.strip("\n") + "\n").splitlines(True),
            f"{readme} (perf block)", f"from {args.results_dir}"))
        print(f"\n{readme}'s performance block differs from {args.results_dir}: rerun "
              f"without --check", file=sys.stderr)
        return 1
    if not load_run(args.results_dir).files:
        print(f"no results files in {args.results_dir}: {readme} left as it is",
              file=sys.stderr)
        return 2
    readme.write_text(replace_block(text, block))
    print(f"updated {readme} from {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
