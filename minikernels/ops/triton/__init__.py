"""Triton kernels, one module per op family. Each module registers its kernels with
representative compile signatures in :mod:`minikernels.ops.triton.registry`."""
