"""Benchmark plumbing for scripts in bench/: re-exported from minikernels.benchmarks.plumbing."""
from minikernels.benchmarks.plumbing import *  # noqa: F401,F403
from minikernels.benchmarks.plumbing import (CPU_NOTE, L2_FLUSH_BYTES, RESULTS_DIR,  # noqa: F401
                                             Timing, add_result_arguments, ceilings,
                                             device_name, environment, markdown_table,
                                             measure_copy_bandwidth, measure_matmul_flops,
                                             percentile, results_dir, time_fn, time_stats,
                                             write_json, write_results)
