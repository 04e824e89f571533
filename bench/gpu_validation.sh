#!/usr/bin/env bash
# GPU validation pass (issue 9): build, test on cuda, sanitize, measure, benchmark.
#
#   bash bench/gpu_validation.sh all                   (one device call: every stage, capped)
#   bash bench/gpu_validation.sh STAGE [STAGE ...]     (from the repo root, on the GPU machine)
#
# `all` runs the stages in order of importance, each under its own time cap (seconds, env
# CAP_<STAGE> overrides): build 75, test 160, bench 100, serve 95, spec 55, host 45,
# sanitize 30 (560 s at most; give the device call timeout_s=600). Every stage writes into
# $WORK (default /tmp/gpu_work on the device, ./gpu_out elsewhere), and after each stage
# the whole of $WORK is packed into $OUT/gpu_results.tar.gz: the device tool returns at
# most 8 files, and a run cut short still returns what the finished stages wrote.
# Unpack here with: tar xzf gpu_results.tar.gz -C bench/results/h200/
#
# Stages (each fits one 10-minute device command; run them in order in one lease):
#   build     build minikernels._C in place (TORCH_CUDA_ARCH_LIST, default 9.0a) and copy
#             the .so to $OUT/ext/ so a later call can carry it back in (carry: minikernels/_C*.so)
#   test      the kernels on cuda (every op, every backend vs the reference, strided views,
#             fp8 KV), the decoder vs transformers and the engine on cuda (graphs on / off,
#             int4, speculative verification graphs); log -> pytest_cuda.log, JUnit ->
#             pytest_cuda.xml; GPU_TEST_WORKERS xdist processes (default 8: the first run
#             of each kernel is a JIT compile on one core), GPU_TEST_TIMEOUT s per test
#   testall   the whole suite on cuda (server tests skipped when fastapi/uvicorn/openai are
#             missing on the machine); log -> pytest_cuda_all.log
#   sanitize  compute-sanitizer memcheck and racecheck over the CUDA C++ kernels' tests
#   bench     ceilings + every benchmark with its peers -> $OUT/results/ (JSON, md, png)
#   serve     the end-to-end engine benchmark (minikernels bench serve, + fp8 KV) and
#             bench/bench_serve.py (beside transformers), then fp8 weights (W8A16, W8A8)
#             -> $OUT/results/
#   spec      speculative decoding timing (bench/bench_spec_decode.py --timing, capped at
#             120 s): batch-1 / batch-8 ms per output token without speculation, n-gram,
#             draft model, EAGLE head -> $OUT/results/spec_decode_timing.*; log ->
#             $OUT/spec_decode_timing.log
#   host      the engine's host time per step on a GPU host (issues 14 and 17): `minikernels
#             bench engine --device cuda` (steady decode at batch 256, generate and
#             streaming paths; the stub's logits on the GPU, so sampling, masks and
#             read-backs are real launches) and, when xgrammar / outlines-core are
#             installed there, `bench_structured --device cuda` -> $OUT/results/
# The benchmarks live in minikernels/benchmarks/; bench/*.py are thin scripts over them.
#
# Wheels: `bash bench/fetch_gpu_wheels.sh` here first and carry [".whl"] (13 MB): the
# server tests (testall) and `host`'s structured-output rows need them.
#
# Results: unpack gpu_results.tar.gz (results/ holds the benchmarks' JSON, md and png; the
# logs sit beside it) and commit results/* under bench/results/h200/.
set -uo pipefail
cd "$(dirname "$0")/.."
# $OUT (the device tool's return folder) receives only the packed archive; stages write
# into $WORK, which the stage functions below call OUT.
DEVICE_OUT="${OUT:-}"
if [ -n "$DEVICE_OUT" ]; then WORK="${WORK:-/tmp/gpu_work}"; else WORK="${WORK:-$(pwd)/gpu_out}"; fi
OUT="$WORK"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 MINIKERNELS_BENCH_OUT="$OUT/results"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
# Wheels the image lacks (server, openai client, xgrammar, outlines-core, jsonschema):
# bench/fetch_gpu_wheels.sh downloads them into .whl before the device call, which
# carries [".whl"]. On the device they go to /tmp/site once per run (every stage sees
# them); without them the server tests and the structured-output benchmarks are skipped.
if [ -n "$DEVICE_OUT" ] && compgen -G ".whl/*.whl" > /dev/null; then
  if [ ! -e /tmp/site/.mk_wheels ]; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && touch /tmp/site/.mk_wheels \
      || echo "wheels: install failed (server tests and structured-output benchmarks skip)"
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The CUDA kernels' tests (cuda backend params and GPU-only checks).
CUDA_TESTS=(tests/test_int4_matmul.py tests/test_kv_cache.py tests/test_paged_decode.py
            tests/test_norm_activation_rotary.py tests/test_fp8_kv_cache.py
            tests/test_strided_views.py)

# A stage's cap sends SIGINT to its whole process group: pytest and the benchmarks then
# write what they have, so the log writers in their pipelines must outlive the signal
# (`tee -i`; tail with SIGINT ignored) or the summary is lost.
last_lines() { (trap '' INT; exec tail -n "$1"); }

server_ignores() {
  python - <<'EOF'
import importlib.util as u
missing = [m for m in ("fastapi", "uvicorn", "openai") if u.find_spec(m) is None]
if missing:
    print("--ignore=tests/test_server_fake.py --ignore=tests/test_server_engine.py")
EOF
}

stage_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
  # pyproject.toml's PEP 639 license fields need setuptools >= 77; an older setuptools
  # refuses the whole file ("invalid pyproject.toml config: project.license"). The
  # image's version is not on record: with an older one, build from a copy of the tree
  # whose license fields are the older table form (the metadata plays no part in it).
  local src=.
  if ! python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
    src=/tmp/mk_build_src
    echo "setuptools $(python -c 'import setuptools; print(setuptools.__version__)') < 77: building from $src" | tee -a "$OUT/gpu.txt"
    rm -rf "$src" && mkdir -p "$src" && cp -r setup.py pyproject.toml MANIFEST.in README.md LICENSE csrc minikernels "$src"/
    sed -i -e 's/^license = "\(.*\)"$/license = {text = "\1"}/' -e '/^license-files = /d' "$src/pyproject.toml"
  fi
  (cd "$src" && MINIKERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace -j 16) 2>&1 \
    | tee -i "$OUT/build.log" | last_lines 20
  [ "$src" = . ] || cp "$src"/minikernels/_C*.so minikernels/
  if [ -n "$DEVICE_OUT" ]; then mkdir -p "$DEVICE_OUT/ext" && cp minikernels/_C*.so "$DEVICE_OUT/ext/"; fi
  python -c "import torch, minikernels._C as c; print('extension ok:', [n for n in dir(c) if not n.startswith('_')])"
}

# The kernels, the decoder and the engine on cuda (the `test` stage).
GPU_TESTS=("${CUDA_TESTS[@]}" tests/test_flash_attention.py tests/test_op_contract.py
           tests/test_bitmask.py tests/test_fsm_advance.py tests/test_rejection_sampler.py
           tests/test_sampling_mask.py
           tests/test_lora_op.py tests/test_moe_op.py tests/test_moe_int4_op.py
           tests/test_model_gpu.py
           tests/test_model_hf.py tests/test_engine.py
           # the fp8 weight ops, then the MoE routing ops, last: newest, and a capped
           # stage keeps the rows above
           tests/test_fp8_matmul.py tests/test_fp8_w8a8.py tests/test_moe_fp8_op.py
           tests/test_moe_fp8_w8a8_op.py
           tests/test_fp8_bits.py
           tests/test_router_op.py tests/test_moe_align_op.py tests/test_moe_lora_op.py
           # INT8 (newest): W8A8 ops, the model / engine on them, then weight-only int8
           tests/test_int8_w8a8.py tests/test_moe_int8_w8a8_op.py tests/test_int8_model.py
           tests/test_int8_matmul.py tests/test_int8_weight_only.py
           # the fused norm / activation + quantization ops and W8A8 models using them
           tests/test_rms_norm_quant.py tests/test_act_and_mul_quant.py
           tests/test_norm_quant_fusion.py tests/test_qk_norm_rope.py
           # peers' APIs over the kernels (newest)
           tests/test_compat_flash_attn.py tests/test_compat_flash_attn3.py
           tests/test_compat_flashinfer.py
           tests/test_compat_flashinfer_cascade.py tests/test_compat_vllm_attention.py
           tests/test_compat_vllm_sampling.py tests/test_compat_vllm_rejection_sampler.py
           tests/test_compat_flashinfer_posenc.py tests/test_compat_flashinfer_batch_attention.py
           tests/test_compat_vllm_ops.py tests/test_compat_gptq_awq.py
           tests/test_compat_vllm_fused_moe.py tests/test_compat_vllm_marlin.py
           tests/test_compat_flashinfer_moe.py
           # hybrid recurrent layers' ops (LFM2 / Qwen3.5; the models are in
           # test_model_gpu.py above)
           tests/test_causal_conv1d.py tests/test_gated_delta_rule.py
           tests/test_mamba2_scan.py tests/test_gated_delta_rule_chunked.py
           tests/test_mamba2_scan_chunked.py tests/test_compat_recurrent.py
           tests/test_selective_scan.py tests/test_compat_selective_scan.py)

# The first run of a kernel specialization on the GPU is a Triton JIT compile (LLVM +
# ptxas, ~1-2 CPU-s, one core): the test stage is compile-bound, not GPU-bound. The image
# has pytest-xdist and pytest-timeout, so files are spread over GPU_TEST_WORKERS processes
# (default 8 of the 16 cores; 0 = one process), each on the one GPU (the GPU tests size
# their KV pools with num_kv_blocks, so processes do not compete for memory), and a test
# stuck in a GPU sync past GPU_TEST_TIMEOUT seconds ends its worker (xdist starts another)
# instead of the stage. Results also go to a JUnit file, which pytest writes when the
# stage's cap interrupts it too.
pytest_parallel_args() {
  python - <<'EOF'
import importlib.util as u, os
args = []
workers = int(os.environ.get("GPU_TEST_WORKERS", "8"))
if workers > 0 and u.find_spec("xdist") is not None:
    args += [f"-n {workers}", "--dist loadfile"]
if u.find_spec("pytest_timeout") is not None:
    args += [f"--timeout {os.environ.get('GPU_TEST_TIMEOUT', '100')}", "--timeout-method thread"]
print(" ".join(args))
EOF
}

stage_test() {
  # shellcheck disable=SC2046
  python -m pytest -q -p no:cacheprovider -rfE $(pytest_parallel_args) \
    --junitxml="$OUT/pytest_cuda.xml" "${GPU_TESTS[@]}" 2>&1 \
    | tee -i "$OUT/pytest_cuda.log" | last_lines 40
}

stage_testall() {
  # shellcheck disable=SC2046
  python -m pytest -q -p no:cacheprovider -rfE $(pytest_parallel_args) \
    --junitxml="$OUT/pytest_cuda_all.xml" $(server_ignores) 2>&1 \
    | tee -i "$OUT/pytest_cuda_all.log" | last_lines 40
}

stage_sanitize() {
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      python -m pytest -q -p no:cacheprovider -x -k "cuda" "${CUDA_TESTS[@]}" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?" | tee -a "$OUT/sanitizer_summary.txt"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
  done
}

stage_bench() {
  # The issue's target benchmarks first (each measures its own ceilings), then every op
  # beside its peers (the longest list, and the one a stage cap should cut)
  python -m bench.bench_int4 || echo "int4 bench failed"
  python -m bench.bench_paged_decode || echo "paged decode bench failed"
  python -m bench.bench_attention || echo "attention bench failed"
  # head dim 512 (Gemma 4's full-attention layers; 32-row tiles, no wgmma): own folder
  python -m bench.bench_attention --head-dims 512 --seqlens 1024 4096 16384 \
    --result-dir "$OUT/results/d512" || echo "attention bench (d512) failed"
  python -m bench.bench_paged_decode --heads 32 4 512 --batches 1 64 --contexts 4096 32768 \
    --result-dir "$OUT/results/d512" || echo "paged decode bench (d512) failed"
  python -m minikernels bench --result-dir "$OUT/results" || echo "op bench failed"
}

stage_serve() {
  python -m minikernels bench serve --output-json "$OUT/results/serve_main.json" || echo "bench serve failed"
  python -m minikernels bench serve --kv-cache-dtype fp8 --skip-latency --no-save \
    --output-json "$OUT/results/serve_fp8kv.json" || echo "bench serve (fp8 KV) failed"
  python bench/bench_serve.py || echo "bench_serve (vs transformers) failed"
  # fp8 weights, W8A16 then W8A8 (which should be the default: bench/NOTES.md); last, so
  # the stage cap cuts these first
  python -m minikernels bench serve --quantization fp8 --skip-latency --no-save \
    --output-json "$OUT/results/serve_fp8w.json" || echo "bench serve (fp8 weights) failed"
  python -m minikernels bench serve --quantization fp8_w8a8 --skip-latency --no-save \
    --output-json "$OUT/results/serve_fp8w8a8.json" || echo "bench serve (fp8 W8A8) failed"
  # INT8 W8A8 (per-channel RTN int8 weights, per-token int8 activations, int32 dots)
  python -m minikernels bench serve --quantization int8 --skip-latency --no-save \
    --output-json "$OUT/results/serve_int8.json" || echo "bench serve (int8 W8A8) failed"
  # 4 LoRA adapters of rank 16 (every request adapted; SGMV prefill, BGMV / SGMV decode)
  # beside serve_main's plain run; newest, so after the rows above
  python -m minikernels bench serve --num-loras 4 --max-lora-rank 16 --skip-latency \
    --no-save --output-json "$OUT/results/serve_lora.json" || echo "bench serve (LoRA) failed"
  # Hybrid KV pools (Gemma 3 1B shape, dummy weights): 3-4k-token prompts in a small KV
  # budget, the sliding layers handing back their blocks vs one table for all layers
  # (docs/engine.md, "Hybrid KV pools"); newest, so last
  for off in "" "--disable-hybrid-kv-cache-manager"; do
    python -m minikernels bench serve --model gemma-3-1b --min-input-len 3000 \
      --max-input-len 4000 --min-output-len 128 --max-output-len 256 --num-prompts 256 \
      --gpu-memory-utilization 0.1 --skip-latency --skip-decode --no-save $off \
      --output-json "$OUT/results/serve_gemma3_hybrid${off:+_off}.json" \
      || echo "bench serve (gemma-3-1b hybrid pools ${off:-on}) failed"
  done
  # Multi-GPU tensor parallel (NCCL, decode CUDA graphs): only with >= 2 GPUs (the H200
  # validation machine has one, so it is skipped there).
  if python -c "import sys, torch; sys.exit(torch.cuda.device_count() < 2)"; then
    python -m minikernels.distributed.selfcheck --tensor-parallel-size 2 || echo "TP=2 graphs != eager"
    python -m minikernels bench serve --tensor-parallel-size 2 --skip-latency --no-save \
      --output-json "$OUT/results/serve_tp2.json" || echo "bench serve (TP=2) failed"
  else
    echo "tensor parallel: skipped (fewer than 2 GPUs)"
  fi
}

stage_spec() {
  # qwen2.5-0.5b-shaped target, 2-layer hidden-512 draft (same vocabulary), scripted
  # acceptance; results are written after each method, so a cut run keeps its rows.
  timeout 120 python bench/bench_spec_decode.py --timing --device cuda \
    --result-dir "$OUT/results" 2>&1 | tee -i "$OUT/spec_decode_timing.log" | last_lines 25
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "spec decode timing failed or timed out (rc=$rc)"
}

stage_host() {
  python -m minikernels bench engine --device cuda --workloads steady \
    --paths generate,stream --block-sizes "" || echo "bench engine (cuda) failed"
  # (the structured-output backends are optional packages: skipped where missing)
  if python -c "import outlines_core" 2>/dev/null; then
    python -m bench.bench_structured --device cuda --backend outlines --repeats 1 \
      || echo "bench_structured (outlines, cuda) failed"
  else echo "bench_structured (outlines): skipped (no outlines-core here)"; fi
  if python -c "import xgrammar" 2>/dev/null; then
    python -m bench.bench_structured --device cuda --backend xgrammar --repeats 1 \
      || echo "bench_structured (xgrammar, cuda) failed"
  else echo "bench_structured (xgrammar): skipped (no xgrammar here)"; fi
}

pack() {
  [ -n "$DEVICE_OUT" ] || return 0
  tar czf "$DEVICE_OUT/gpu_results.tar.gz.tmp" -C "$OUT" . \
    && mv "$DEVICE_OUT/gpu_results.tar.gz.tmp" "$DEVICE_OUT/gpu_results.tar.gz"
}

stage_all() {
  local stage cap rc
  for stage in build test bench serve spec host sanitize; do
    case "$stage" in
      build) cap=75 ;; test) cap=160 ;; bench) cap=100 ;; serve) cap=95 ;;
      spec) cap=55 ;; host) cap=45 ;; sanitize) cap=30 ;;
    esac
    var="CAP_${stage^^}"
    cap="${!var:-$cap}"
    echo "=== $stage (cap ${cap}s) ===" | tee -a "$OUT/stages.txt"
    start=$(date +%s)
    # SIGINT first: pytest and the benchmarks then write what they have
    WORK="$OUT" OUT="" timeout --signal=INT --kill-after=15 "$cap" bash "$0" "$stage"
    rc=$?
    echo "$stage rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/stages.txt"
    pack
  done
}

[ $# -gt 0 ] || { sed -n 2,30p "$0"; exit 2; }
for stage in "$@"; do
  echo "=== $stage ==="
  "stage_$stage"
  [ "$stage" = all ] || pack
done
