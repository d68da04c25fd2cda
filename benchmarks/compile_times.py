"""Cold and warm compile times of the shared benchmark models, each step a fresh process.

cold: `dbpgen compile` (the whole command) + import + first value_and_grad, with no Numba cache;
warm: import + first call again, from Numba's on-disk cache next to the module.
`import numpy, numba` is included, as a user sees it (the module is imported the way the
README shows, without importing dbpgen and SymPy); the interpreter's exit is not.

    python benchmarks/compile_times.py [FOLDER_OF_MODELS]   (default: benchmarks/)
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_CALL = """import time; start = time.perf_counter()
import importlib.util, sys, numpy as np
spec = importlib.util.spec_from_file_location("bench_module", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); p = m.init_params(0)
x = np.zeros((8,) + m.INPUT_SHAPE); y = np.eye(m.N_OUTPUTS)[np.zeros(8, int)]
m.value_and_grad(p, x, y)
print(time.perf_counter() - start)"""


def timed(*cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def first_call(module: Path) -> float:
    """Seconds from the script's first line to the first call's return: the imports, the
    module and the first value_and_grad (not the interpreter's exit, ~0.3 s with Numba)."""
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(module)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main(shared: Path) -> None:
    for name in ("sine_cdb", "mnist_cdb", "mnist_jac", "tanh_node"):
        with tempfile.TemporaryDirectory() as out:
            module = Path(out) / f"{name}.py"
            compile_s = timed("dbpgen", "compile", str(shared / f"{name}.yaml"), "-o", out)
            cold = compile_s + first_call(module)
            warm = first_call(module)
        print(f"{name:10} cold {cold:5.1f} s (compile {compile_s:4.1f} s)   warm {warm:4.2f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
