"""Benchmark plumbing for the scripts in bench/: re-exported from minikernels.benchmarking."""
from minikernels.benchmarking import *  # noqa: F401,F403
from minikernels.benchmarking import (L2_FLUSH_BYTES, RESULTS_DIR, ceilings, device_name,  # noqa: F401
                                      environment, markdown_table, measure_copy_bandwidth,
                                      measure_matmul_flops, time_fn, write_results)
