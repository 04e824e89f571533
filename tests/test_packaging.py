"""Packaging: the sdist ships the CUDA sources, the license is declared, and the declared
dependencies match what the code imports (no undeclared import, no unused declaration)."""
from __future__ import annotations

import ast
import os
import re
import runpy
import subprocess
import sys
import tarfile
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# import name -> distribution name, where they differ
_DIST = {"yaml": "pyyaml", "pytest_benchmark": "pytest-benchmark"}
# always present with torch (its own dependencies), or the package itself
_IMPLIED = {"torch", "triton", "minikernels", "bench", "helpers", "conftest", "setuptools",
            "typing_extensions", "sympy", "jinja2", "filelock", "fsspec", "networkx"}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-")
            for r in reqs}


def _python_files(folder: str) -> list[str]:
    """The tracked .py files under folder (work in progress of others is not yet checked);
    every .py file when this is not a git checkout (an unpacked sdist)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", f"{folder}/*.py"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return [os.path.join(ROOT, p) for p in out.stdout.split()]
    except (OSError, subprocess.SubprocessError):
        pass
    paths = []
    for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "results")]
        paths += [os.path.join(base, fn) for fn in files if fn.endswith(".py")]
    return paths


def _imports(folder: str) -> dict[str, str]:
    """Top-level third-party module -> one file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    paths = _python_files(folder)
    local = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    for path in paths:
        if os.path.isfile(path):
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                for m in mods:
                    top = m.split(".")[0]
                    if top not in sys.stdlib_module_names | _IMPLIED | local:
                        found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def _dist(module: str) -> str:
    return _DIST.get(module, module).lower().replace("_", "-")


def test_license_file_and_spdx_string():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"          # an SPDX expression, not a table
    assert "LICENSE" in project["license-files"]
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0" in text


def test_declared_dependencies_match_imports():
    project = _pyproject()["project"]
    core = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    declared = core.union(*extras.values())
    # Library code: every third-party import is declared (core or an extra).
    lib = _imports("minikernels")
    undeclared = {m: f for m, f in lib.items() if _dist(m) not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    # The server's direct imports are in [serve]; the HF tokenizer's in [hf].
    assert {"fastapi", "starlette", "pydantic", "uvicorn"} <= extras["serve"]
    assert {"transformers", "tokenizers"} <= extras["hf"]
    # Tests: every import is in [test].
    tests = _imports("tests")
    missing = {m: f for m, f in tests.items()
               if _dist(m) not in extras["test"] | core}
    assert not missing, f"tests import what [test] does not declare: {missing}"
    # Nothing declared is left unused (pytest-benchmark is used as a fixture in bench/).
    used = {_dist(m) for m in {**lib, **tests, **_imports("bench")}} | {"torch", "triton"}
    bench_tests = [f for f in os.listdir(os.path.join(ROOT, "bench")) if f.startswith("test_")]
    if any("benchmark" in open(os.path.join(ROOT, "bench", f)).read() for f in bench_tests):
        used.add("pytest-benchmark")
    # pytest-xdist: the README's test command runs the suite on its workers (-n 2)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if re.search(r"python -m pytest .*-n \d", readme):
        used.add("pytest-xdist")
    unused = declared - used
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def _local_includes(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M)


@pytest.mark.slow
def test_sdist_has_every_file_setup_py_compiles(tmp_path):
    setup_mod = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_for_tests")
    sources = setup_mod["cuda_sources"](ROOT)
    assert "csrc/bindings.cpp" in sources and any(s.endswith(".cu") for s in sources)
    dist = tmp_path / "dist"
    env = dict(os.environ, MINIKERNELS_BUILD_CUDA="0")
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (archive,) = list(dist.glob("minikernels-*.tar.gz"))
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    (top,) = list(unpacked.iterdir())
    # What setup.py would compile from the unpacked sdist = what it compiles from the checkout.
    assert runpy.run_path(str(top / "setup.py"), run_name="x")["cuda_sources"](str(top)) \
        == sources
    for rel in sources:
        path = top / rel
        assert path.is_file(), f"sdist lacks {rel}"
        for inc in _local_includes(str(path)):
            assert (path.parent / inc).is_file() or (top / "csrc" / inc).is_file(), \
                f"sdist lacks {inc} (included by {rel})"
    for rel in ("LICENSE", "README.md", "pyproject.toml", "MANIFEST.in"):
        assert (top / rel).is_file(), rel
    assert not list(top.rglob("*.so")) and not list(top.rglob("__pycache__"))
    assert not (top / "bench" / "results").exists()
