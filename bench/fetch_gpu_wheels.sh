#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels the H200 image lacks, so the GPU
# run can install them without one (the device tool carries ./.whl, which .gitignore keeps
# out of git: run this in each session before the device call, then carry [".whl"]).
#
#   bash bench/fetch_gpu_wheels.sh          # -> ./.whl/*.whl (CPython 3.12, manylinux x86_64)
#
# What they enable there (bench/gpu_validation.sh installs them into /tmp/site when .whl
# holds wheels): the server and its tests (fastapi, starlette, pydantic, uvicorn; the
# official openai client), the structured-output backends (xgrammar, outlines-core) for
# `bench_structured --device cuda` (issue 17's cost on a GPU host) and the structured-output
# tests (jsonschema). The image already has torch, triton, transformers, numpy, anyio,
# httpx, h11, click, attrs, typing-extensions, uvloop (device tool: KINDS.md's list); each
# package below is one it lacks, with what it needs that the image lacks too. Versions are
# the ones this project's CI installs (python 3.11 here; the image runs python 3.12.3).
# `tests/test_first_hour.py` checks that the list is closed under the packages' own
# requirements (markers for python 3.12 on linux) against the image's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  # server
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4
  annotated-types==0.7.0 typing-inspection==0.4.2 opentelemetry-api==1.45.2
  uvicorn==0.55.0
  # the official OpenAI client (tests)
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0
  sniffio==1.3.1
  # structured outputs
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 outlines-core==0.2.14
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==0.30.0
)
# What those need that the image already has (not fetched; the test above reads this)
IMAGE_HAS=(annotated-doc anyio attrs click h11 idna numpy torch transformers triton
           typing-extensions)
PLATFORMS=()
for n in 28 27 24 17 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  # one at a time: a wheel pip cannot find is named, the others still come
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "$spec" \
    || { echo "fetch_gpu_wheels: no CPython 3.12 manylinux wheel for $spec" >&2; exit 1; }
done
ls .whl | wc -l | xargs echo "wheels in .whl:"
du -sh .whl
