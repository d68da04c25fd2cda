"""Cold compile and first-call cost against depth (docs/robustness.md), each point in fresh
processes with an empty Numba cache:

    python benchmarks/depth_curve.py [--width 4] [--acts relu tanh] [--depths 2 5 10 25 50 100 200]

Prints a Markdown table: `dbpgen compile` wall time, import + first value_and_grad call
(batch 64) and that process's peak resident memory, and the schedule that ran.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_CALL = """
import resource, sys, time
import numpy as np
start = time.monotonic()
from dbpgen.compiler import load_generated
m = load_generated(sys.argv[1])
x = np.random.default_rng(0).normal(size=(64, m.INPUT_SHAPE[0]))
m.value_and_grad(m.init_params(), x, np.zeros((64, 1)))
print(time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, m.SCHEDULES["value_and_grad"])
"""


def model(depth: int, width: int, act: str) -> str:
    layers = "".join(f"  - {{dense: {width}, act: {act}}}\n" for _ in range(depth - 1))
    return (f"name: deep_{act}_{depth}\ninput: [{width}]\nlayers:\n{layers}  - {{dense: 1}}\n"
            "loss: mse\npenalty: {v: loss_gradient, weight: 0.1}\n")


def point(depth: int, width: int, act: str, folder: Path) -> str:
    path = folder / f"deep_{act}_{depth}.yaml"
    path.write_text(model(depth, width, act))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(folder / f"cache_{act}_{depth}"))
    start = time.monotonic()
    subprocess.run(["dbpgen", "compile", str(path), "-o", str(folder)], check=True, capture_output=True, env=env)
    compile_s = time.monotonic() - start
    done = subprocess.run([sys.executable, "-c", FIRST_CALL, str(folder / f"deep_{act}_{depth}.py")],
                          check=True, capture_output=True, text=True, env=env)
    first_s, rss_mb, schedule = done.stdout.split()
    return f"| {act} | {depth} | {compile_s:.1f} | {float(first_s):.1f} | {float(rss_mb):.0f} | {schedule} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--acts", nargs="+", default=["relu", "tanh"])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 5, 10, 25, 50, 100, 200])
    args = parser.parse_args()
    print(f"width {args.width}, batch 64, cold Numba cache")
    print("| activation | layers | compile (s) | import + first call (s) | peak RSS (MB) | schedule |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for act in args.acts:
            for depth in args.depths:
                print(point(depth, args.width, act, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
