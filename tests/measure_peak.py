"""Measured peak bytes of one value_and_grad call: the resident-set high-water mark above what
the process held before it (Linux: /proc/self/status, reset through /proc/self/clear_refs).
Run as `python measure_peak.py MODULE.py BATCH`; prints the bytes."""
import sys

import numpy as np

from dbpgen.compiler import load_generated


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


m = load_generated(sys.argv[1])
batch = int(sys.argv[2])
rng = np.random.default_rng(0)
params = m.init_params()
x = rng.normal(size=(batch,) + m.INPUT_SHAPE)
y = np.eye(m.N_OUTPUTS)[rng.integers(0, m.N_OUTPUTS, batch)]
m.value_and_grad(params, x[:4], y[:4])  # compiled
m.value_and_grad(params, x, y)          # every page of the inputs touched
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
m.value_and_grad(params, x, y)
print(status("VmHWM") - before)
