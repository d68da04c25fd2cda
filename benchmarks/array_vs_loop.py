"""What a jitted function's first call pays for whole-array expressions against loops.

Each case is a fresh process that first compiles a one-line function (Numba's one-time
start-up), then times the first call of a function of N statements `c = a*b` over (4, 3)
arrays: as NumPy array expressions, or as loops over the elements. CPU seconds, as
Numba compiles with the NUMBA_OPT it is given (3, as users run it, by default).

    python benchmarks/array_vs_loop.py [N]   (default 12)
"""
import subprocess
import sys
import tempfile
from pathlib import Path

TIMER = """import sys, time, importlib, numpy as np, numba
sys.path.insert(0, sys.argv[1])
numba.njit(lambda a: a + 1)(np.ones(2))
m = importlib.import_module(sys.argv[2])
t = time.process_time()
m.f(np.ones((4, 3)), np.ones((4, 3)))
print(f"{time.process_time() - t:.2f}")"""


def source(n: int, loops: bool) -> str:
    lines = ["import numba, numpy as np", "", "", "@numba.njit", "def f(a, b):"]
    for j in range(n):
        if loops:
            lines += [f"    c{j} = np.empty((a.shape[0], a.shape[1]), dtype=np.float64)",
                      f"    for i in range(c{j}.shape[0]):",
                      f"        for k in range(c{j}.shape[1]):",
                      f"            c{j}[i, k] = a[i, k]*b[i, k]"]
        else:
            lines.append(f"    c{j} = a*b")
        lines.append(f"    a = c{j}")
    return "\n".join(lines + ["    return a", ""])


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("arrays", "loops"):
            Path(folder, f"{kind}.py").write_text(source(n, kind == "loops"))
        for run in range(3):
            for kind in ("arrays", "loops"):
                out = subprocess.run([sys.executable, "-c", TIMER, folder, kind], check=True,
                                     capture_output=True, text=True).stdout.strip()
                print(f"run {run + 1}: {n} statements as {kind}: first call {out} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
