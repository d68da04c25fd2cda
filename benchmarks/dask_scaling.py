"""One full-data-set value_and_grad of mnist_cdb on Dask: 1 and 2 workers vs one process.

    python benchmarks/dask_scaling.py [--samples 100000] [--repeats 3] > docs/scaling-table.md

The data (N x 784, float64) is generated on the workers and persisted there, so the times
are computation and reduction, not the client sending data. Each worker is one process with
one thread and BLAS pinned to one thread (dbpgen.distributed.PINNED). The single-process
reference runs the module on all N samples at once, with BLAS on all cores and pinned to
one thread. Prints a markdown table: median seconds of `repeats` calls after a warm-up, and
Dask's own time per task.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks" / "mnist_cdb.yaml"

SINGLE = """
import sys, time, numpy as np
from dbpgen.compiler import compile_file, load_generated
m = load_generated(compile_file(sys.argv[1], sys.argv[2]))
n, repeats = int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
x, y = rng.standard_normal((n, 784)), np.eye(10)[rng.integers(0, 10, n)]
params = m.init_params(seed=0)
m.value_and_grad(params, x[:256], y[:256])
times = []
for _ in range(repeats):
    t = time.perf_counter(); m.value_and_grad(params, x, y); times.append(time.perf_counter() - t)
print(np.median(times))
"""


def single(n: int, repeats: int, threads: int | None, out: Path) -> float:
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run([sys.executable, "-c", SINGLE, str(MODEL), str(out), str(n), str(repeats)],
                          capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def on_dask(module, n: int, workers: int, chunk_sizes: list[int], repeats: int) -> dict[int, float]:
    import dask.array as da
    from distributed import Client, LocalCluster

    from dbpgen import distributed as dist

    times = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=dict(dist.PINNED)) as cluster, Client(cluster) as client:
        params = module.init_params(seed=0)
        for rows in chunk_sizes:
            rng = da.random.default_rng(0)
            x = rng.standard_normal((n, 784), chunks=(rows, 784)).persist()
            labels = rng.integers(0, 10, n, chunks=rows)
            y = da.map_blocks(lambda c: np.eye(10)[c], labels, new_axis=1, chunks=(labels.chunks[0], (10,)),
                              dtype=float).persist()
            client.wait_for_workers(workers)
            dist.value_and_grad(module, params, x, y, client=client)  # warm-up: Numba compiles on each worker
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                dist.value_and_grad(module, params, x, y, client=client)
                runs.append(time.perf_counter() - t)
            times[rows] = float(np.median(runs))
            del x, y
    return times


def task_overhead(tasks: int = 2000) -> float:
    """Seconds per task of Dask's own work: sine_cdb (1-16-16-1, microseconds per sample) on
    `tasks` chunks of one sample, minus the module's time for the same samples one by one."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from dbpgen import distributed as dist
    from dbpgen.compiler import compile_file, load_generated

    m = load_generated(compile_file(ROOT / "examples" / "sine_cdb.yaml", Path("generated")))
    params = m.init_params(seed=0)
    x = np.linspace(-3, 3, tasks).reshape(-1, 1)
    m.value_and_grad(params, x[:1], np.sin(x[:1]))  # compiles
    t = time.perf_counter()
    for i in range(tasks):
        m.value_and_grad(params, x[i:i + 1], np.sin(x[i:i + 1]))
    alone = time.perf_counter() - t
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=dict(dist.PINNED)) as cluster, Client(cluster) as client:
        xs = da.from_array(x, chunks=(1, 1)).persist()
        ys = da.sin(xs).persist()
        dist.value_and_grad(m, params, xs, ys, client=client)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            dist.value_and_grad(m, params, xs, ys, client=client)
            runs.append(time.perf_counter() - t)
    return (float(np.median(runs)) - alone) / tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[250, 1000, 4000, 16000])
    args = ap.parse_args()
    from dbpgen.compiler import compile_file, load_generated

    out = Path("generated")
    module = load_generated(compile_file(MODEL, out))
    n = args.samples
    alone = {"all cores": single(n, args.repeats, None, out), "BLAS on 1 thread": single(n, args.repeats, 1, out)}
    rows = {w: on_dask(module, n, w, args.chunks, args.repeats) for w in (1, 2)}
    overhead = task_overhead()
    print(f"mnist_cdb (784-256-256-10, float64), value_and_grad over N = {n} samples, "
          f"median of {args.repeats}; `python benchmarks/dask_scaling.py --samples {n}`\n")
    print("| run | chunk (samples) | tasks | seconds | vs one process on all cores |")
    print("|---|---|---|---|---|")
    base = alone["all cores"]
    for label, t in alone.items():
        print(f"| one process, {label} | – | – | {t:.2f} | {t / base:.2f} |")
    for w, times in rows.items():
        for size, t in times.items():
            print(f"| Dask, {w} worker{'s' if w > 1 else ''} | {size} | {-(-n // size)} | {t:.2f} | {t / base:.2f} |")
    print(f"\nDask's own time per task (one worker; sine_cdb on chunks of one sample, its compute "
          f"subtracted): {1e3 * overhead:.2f} ms")


if __name__ == "__main__":
    main()
