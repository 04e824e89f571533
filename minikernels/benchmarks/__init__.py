"""Every benchmark, its peers and its result files, in one place.

    plumbing      device names, ceilings (copy bandwidth, bf16 matmul), timing with the
                  spread of repeated runs, result files (json, md, png) and --result-dir
    ops           `minikernels bench ops`: every op on each backend (+ pytest-benchmark
                  cases in bench/test_ops.py)
    int4          int4 GEMV / GEMM vs cuBLAS bf16 and peers      (python -m bench.bench_int4)
    attention     flash attention prefill vs SDPA and peers      (python -m bench.bench_attention)
    paged_decode  paged decode attention (bf16, fp8) vs peers    (python -m bench.bench_paged_decode)
    serve         `minikernels bench serve`: end-to-end engine throughput and latency
    serve_vs_hf   the same workload beside transformers          (python bench/bench_serve.py)
    engine        `minikernels bench engine`: host overhead per engine step (stub forward)

Results go to bench/results/<device>/ in a checkout (./bench/results/<device> when
installed), or --result-dir / $MINIKERNELS_BENCH_OUT. Modules import torch and the engine
only when run, so `minikernels bench ... --help` stays quick where they can.
"""
