"""Interleaved A/B of two builds of the same modules, in one process.

    python benchmarks/ab.py OLD_DIR NEW_DIR sine_cdb,mnist_cdb [BATCH] [SECONDS]

OLD_DIR and NEW_DIR hold generated modules of the same models (e.g. `generated/` of two
checkouts). For each model both value_and_grad functions run in turns, after checking that
they agree; prints the medians and new/old.

The turns are bursts with a pause between them, as `dbpgen bench` takes them
(`bench.interleaved_ms`, max(5, 2 SECONDS) rounds; SECONDS defaults to 8): calls alternated one by one would
let one build's BLAS threads, still spinning, disturb the other build's call. SECONDS is
the time budget of the bursts (each at most 200 calls); the 0.3 s pauses come on top.
"""
import importlib.util
import sys

import numpy as np

from dbpgen.bench import interleaved_ms


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    old_dir, new_dir, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 8.0
    rng = np.random.default_rng(0)
    for name in names:
        a, b = load(f"{old_dir}/{name}.py", f"{name}_old"), load(f"{new_dir}/{name}.py", f"{name}_new")
        params = a.init_params()
        x = rng.normal(size=(batch,) + a.INPUT_SHAPE).astype(a.DTYPE)
        y = np.eye(a.N_OUTPUTS)[rng.integers(0, a.N_OUTPUTS, batch)].astype(a.DTYPE)
        va, vb = a.value_and_grad(params, x, y)[0], b.value_and_grad(params, x, y)[0]
        assert abs(va - vb) <= 1e-6 * abs(va) + 1e-9, (name, va, vb)
        ms = interleaved_ms({"old": lambda: a.value_and_grad(params, x, y),
                             "new": lambda: b.value_and_grad(params, x, y)}, seconds, rounds=max(5, int(seconds * 2)))
        old, new = ms["old"], ms["new"]
        print(f"{name:14s} B={batch}  old {old:9.3f} ms  new {new:9.3f} ms  new/old {new / old:.3f}", flush=True)


if __name__ == "__main__":
    main()
