"""NumPy's matmul rate with the kernels its OpenBLAS runs in this process.

    python benchmarks/blas_rate.py
    OPENBLAS_CORETYPE=SkylakeX python benchmarks/blas_rate.py   # force a kernel set

Prints the kernels (`dbpgen.bench.blas_kernels`) and the GFLOP/s of square products in float32
and float64 (median of repeated products). On an AVX-512 CPU, OpenBLAS's Haswell kernels
use AVX2 only: docs/performance.md, "On an AVX-512 machine whose OpenBLAS is pinned to AVX2".
"""
import time

import numpy as np

from dbpgen.bench import blas_kernels


def gflops(n: int, dtype, seconds: float = 1.0) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    a @ a
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def main():
    print(f"NumPy's OpenBLAS runs its {blas_kernels() or 'unknown kernels'}")
    for dtype in (np.float32, np.float64):
        print(" ".join(f"{np.dtype(dtype).name} {n}: {gflops(n, dtype):.0f} GFLOP/s" for n in (256, 1024, 2048)))


if __name__ == "__main__":
    main()
