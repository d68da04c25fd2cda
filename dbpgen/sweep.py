"""`dbpgen bench --sweep small|full|conv`: dbpgen against its peers on models generated here.

A point is a model spec (a dict, as a YAML file would hold it), a batch size and a dtype.
The grid varies one or two factors at a time around two base models:

    dense   input 32, 3 hidden layers of 64, tanh, 4 linear outputs, mse + classical
            double backpropagation (penalty v: loss_gradient), batch 128
    conv    conv2d (28 x 28 LeNet-like and 16 x 16 RGB) and conv1d models with
            avgpool / flatten / dense heads

`full` (FULL_POINTS) is every one-factor variation of the dense base in both dtypes,
a few two-factor combinations and the conv models in both dtypes; `small` (SMALL_POINTS)
is ten of them chosen to cover every width class, schedule and penalty in ~5 minutes;
`conv` (conv_points) varies a CIFAR-sized CNN one factor at a time, in both dtypes.

For each point `run_point` measures, each step in a fresh process with an empty Numba
cache directory (NUMBA_CACHE_DIR):
    cold  `dbpgen compile` of the model file (the whole process) + import + first call
    warm  import + first call again, Numba's cache now in place
    timed  value_and_grad against the peers, taking turns as `dbpgen bench` does
           (`bench.measure`), in a third fresh process with that cache
A sweep that timed every point in its own process measured some points up to 1.5x slower
than `dbpgen bench` on the same module (the 4-conv-layer CNN in float32: 39.5 ms after ten
other points, 26.1 ms alone): one point per process leaves nothing of the previous ones.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import bench
from .compiler import load_generated
from .model import model_from_dict

MISH = "z*tanh(log(1 + exp(z)))"
SOFTSIGN = "z/(1 + abs(z))"
ACT_SHORT = {"relu": "relu", "tanh": "tanh", "softplus": "softplus", MISH: "mish", SOFTSIGN: "softsign"}

# penalty name -> (loss, output layer, penalty), the output layer being the last one
PENALTIES = {
    "loss_gradient/mse": ("mse", {"dense": 4}, {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}),
    "loss_gradient/nll": ("nll", {"dense": 10, "act": "softmax"},
                          {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}),
    "output/mse": ("mse", {"dense": 4}, {"v": "output", "index": 0, "p": "squared_norm", "weight": 0.1}),
    "output/none": ("none", {"dense": 1}, {"v": "output", "index": 0, "p": "squared_norm", "weight": 1.0}),
    "jacobian": ("mse", {"dense": 4}, {"v": "jacobian", "p": "squared_norm", "weight": 0.1,
                                       "algorithm": "auto"}),
}

WIDTHS = (4, 16, 64, 256, 1024)
DEPTHS = (2, 3, 4, 6, 8)
ACTIVATIONS = ("relu", "tanh", "softplus", MISH, SOFTSIGN)
BATCHES = (32, 128, 512, 1024)
DTYPES = ("float64", "float32")
BASE = {"width": 64, "depth": 3, "act": "tanh", "penalty": "loss_gradient/mse", "batch": 128}


@dataclass
class Point:
    """One model (`spec`, without name and dtype), batch size and dtype; `factors` names
    what was varied (width, depth, act, penalty for dense models; kind for all)."""

    label: str
    spec: dict
    batch: int
    dtype: str
    factors: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "_" for c in self.label).strip("_")
        return f"sweep_{slug}_{self.dtype[-2:]}"

    def model_spec(self) -> dict:
        """The spec as a model file holds it: name and dtype first."""
        return {"name": self.name, "dtype": self.dtype, **self.spec}


def dense(width: int = 64, depth: int = 3, act: str = "tanh", penalty: str = "loss_gradient/mse",
          n_in: int = 32) -> dict:
    """A dense network: `depth` hidden layers of `width` with `act`, then the output layer
    and loss that `penalty` (a key of PENALTIES) goes with."""
    loss, last, pen = PENALTIES[penalty]
    layers = [{"dense": width, "act": act} for _ in range(depth)] + [dict(last)]
    return {"input": [n_in], "layers": layers, "loss": loss, "penalty": dict(pen)}


def dense_point(dtype: str, **changes) -> Point:
    f = {**BASE, **changes}
    label = f"dense {f['width']}x{f['depth']} {ACT_SHORT[f['act']]} {f['penalty']}"
    spec = dense(f["width"], f["depth"], f["act"], f["penalty"])
    return Point(label, spec, f["batch"], dtype,
                 {"kind": "dense", **{k: f[k] for k in ("width", "depth", "act", "penalty")}})


# The conv models: name -> (spec, batch)
CONV = {
    "conv2d lenet relu loss_gradient/nll": ({
        "input": [1, 28, 28],
        "layers": [{"conv2d": {"channels": 6, "kernel": 5}, "act": "relu"}, {"avgpool": 2},
                   {"conv2d": {"channels": 12, "kernel": 5}, "act": "relu"}, {"avgpool": 2},
                   "flatten", {"dense": 10, "act": "softmax"}],
        "loss": "nll", "penalty": {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}}, 64),
    "conv2d rgb16 tanh output/mse": ({
        "input": [3, 16, 16],
        "layers": [{"conv2d": {"channels": 8, "kernel": 3, "padding": 1}, "act": "tanh"}, {"avgpool": 2},
                   "flatten", {"dense": 64, "act": "tanh"}, {"dense": 4}],
        "loss": "mse", "penalty": {"v": "output", "index": 0, "p": "squared_norm", "weight": 0.1}}, 64),
    "conv1d seq64 relu softplus loss_gradient/mse": ({
        "input": [2, 64],
        "layers": [{"conv1d": {"channels": 8, "kernel": 5, "padding": 2}, "act": "relu"}, {"avgpool": 2},
                   {"conv1d": {"channels": 16, "kernel": 3, "padding": 1}, "act": "softplus"},
                   "flatten", {"dense": 4}],
        "loss": "mse", "penalty": {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}}, 128),
    "conv1d seq32 tanh jacobian": ({
        "input": [1, 32],
        "layers": [{"conv1d": {"channels": 4, "kernel": 3}, "act": "tanh"}, "flatten", {"dense": 3}],
        "loss": "none", "penalty": {"v": "jacobian", "p": "squared_norm", "weight": 0.1,
                                    "algorithm": "auto"}}, 128),
}


# The conv grid (`--sweep conv`): one-factor variations of a CIFAR-sized CNN
CONV_BASE = {"channels": 16, "kernel": 3, "stride": 1, "dilation": 1, "size": 32, "depth": 2,
             "penalty": "loss_gradient/nll", "batch": 64}


def cnn(channels: int = 16, kernel: int = 3, stride: int = 1, dilation: int = 1, size: int = 32,
        depth: int = 2, penalty: str = "loss_gradient/nll", in_channels: int = 3) -> dict:
    """`depth` conv2d layers (relu, zero padding that keeps the size at stride 1) on a
    `size` x `size` RGB image, channels doubling from `channels`, a 2 x 2 average pool
    after each of the first two, then flatten and the output layer of `penalty`."""
    loss, last, pen = PENALTIES[penalty]
    layers = []
    for i in range(depth):
        conv = {"channels": channels * 2 ** min(i, 1), "kernel": kernel,
                "padding": dilation * (kernel - 1) // 2}
        if stride != 1 and i == 0:
            conv["stride"] = stride
        if dilation != 1:
            conv["dilation"] = dilation
        layers.append({"conv2d": conv, "act": "relu"})
        if i < 2:
            layers.append({"avgpool": 2})
    layers += ["flatten", dict(last)]
    return {"input": [in_channels, size, size], "layers": layers, "loss": loss, "penalty": dict(pen)}


def cnn_point(dtype: str, **changes) -> Point:
    f = {**CONV_BASE, **changes}
    label = (f"cnn c{f['channels']} k{f['kernel']} s{f['stride']} d{f['dilation']} {f['size']}px "
             f"x{f['depth']} {f['penalty']}")
    spec = cnn(**{k: f[k] for k in ("channels", "kernel", "stride", "dilation", "size", "depth", "penalty")})
    return Point(label, spec, f["batch"], dtype,
                 {"kind": "conv2d", "act": "relu", "penalty": f["penalty"], "depth": f["depth"]})


def conv_points() -> list[Point]:
    """One-factor variations of the CIFAR-sized CNN (CONV_BASE) in both dtypes: channels
    8 to 128, kernels 1 and 5, stride 2, dilation 2, inputs 16 and 64 pixels, 4 and 6 conv
    layers, batch 16 and 256, output and Jacobian penalties, plus the conv1d models."""
    points = []
    for dtype in DTYPES:
        points.append(cnn_point(dtype))
        points += [cnn_point(dtype, channels=c) for c in (8, 32)]
        points.append(cnn_point(dtype, channels=128, size=16, batch=16))
        points += [cnn_point(dtype, kernel=k) for k in (1, 5)]
        points += [cnn_point(dtype, stride=2), cnn_point(dtype, dilation=2)]
        points += [cnn_point(dtype, size=16), cnn_point(dtype, size=64, batch=16)]
        points += [cnn_point(dtype, depth=d) for d in (4, 6)]
        points += [cnn_point(dtype, batch=b) for b in (16, 256)]
        points += [cnn_point(dtype, penalty=p) for p in ("output/mse", "jacobian")]
        points += [conv_point(label, dtype) for label in CONV if label.startswith("conv1d")]
    return points


def conv_point(label: str, dtype: str) -> Point:
    spec, batch = CONV[label]
    kind = "conv2d" if "conv2d" in spec["layers"][0] else "conv1d"
    return Point(label, json.loads(json.dumps(spec)), batch, dtype, {"kind": kind})


def full_points() -> list[Point]:
    """The one-factor variations of the dense base in both dtypes (20 each), eight
    two-factor combinations and the four conv models in both dtypes: 56 points."""
    points = []
    for dtype in DTYPES:
        points.append(dense_point(dtype))
        points += [dense_point(dtype, width=w) for w in WIDTHS if w != BASE["width"]]
        points += [dense_point(dtype, depth=d) for d in DEPTHS if d != BASE["depth"]]
        points += [dense_point(dtype, act=a) for a in ACTIVATIONS if a != BASE["act"]]
        points += [dense_point(dtype, penalty=p) for p in PENALTIES if p != BASE["penalty"]]
        points += [dense_point(dtype, batch=b) for b in BATCHES if b != BASE["batch"]]
    points += [
        dense_point("float32", width=1024, penalty="jacobian"),
        dense_point("float64", width=256, penalty="output/none"),
        dense_point("float64", width=4, batch=1024),
        dense_point("float32", width=1024, batch=32),
        dense_point("float64", width=256, depth=8, act="relu"),
        dense_point("float64", act=MISH, penalty="jacobian"),
        dense_point("float32", width=256, act="relu", penalty="loss_gradient/nll"),
        dense_point("float64", width=16, depth=8, act="softplus"),
    ]
    points += [conv_point(label, dtype) for dtype in DTYPES for label in CONV]
    return points


def small_points() -> list[Point]:
    """Ten points, about five minutes: the base, the extremes of width, depth and batch,
    every penalty, the lanes / jit / fused / kernels schedules, both dtypes."""
    return [
        dense_point("float64"),
        dense_point("float64", width=4, act="relu", batch=1024),
        dense_point("float32", width=1024),
        dense_point("float64", depth=8),
        dense_point("float32", width=256, act="relu", penalty="loss_gradient/nll"),
        dense_point("float64", act=MISH),
        dense_point("float64", penalty="output/none"),
        dense_point("float32", penalty="jacobian"),
        dense_point("float64", act="softplus", penalty="output/mse", batch=32),
        conv_point("conv1d seq64 relu softplus loss_gradient/mse", "float64"),
    ]


SIZES = {"small": small_points, "full": full_points, "conv": conv_points}


def sweep_points(size: str, dtype: str | None = None, only: tuple[str, ...] = ()) -> list[Point]:
    """The grid `dbpgen bench --sweep size [--dtype dtype] [--only TEXT ...]` runs (size:
    small | full | conv; dtype: only the points in it; only: the points whose
    "label dtype B=batch" contains one of the texts, e.g. "softplus" or "float32 B=32")."""
    points = SIZES[size]()
    points = [p for p in points if p.dtype == dtype] if dtype else points
    return [p for p in points if any(t in f"{p.label} {p.dtype} B={p.batch}" for t in only)] if only else points


def check_points(points: list[Point]) -> None:
    """Every point's spec is a valid model (raises ModelError otherwise)."""
    for point in points:
        model_from_dict(point.model_spec(), point.name)


# -- cold and warm starts, each in a fresh process ------------------------------------

COMPILE = "import sys; from dbpgen.cli import main; sys.exit(main(['compile', sys.argv[1], '-o', sys.argv[2]]))"

FIRST_CALL = """import time; start = time.perf_counter()
import importlib.util, json, sys, numpy as np
spec = importlib.util.spec_from_file_location("sweep_module", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
batch = int(sys.argv[2]); p = m.init_params(0); rng = np.random.default_rng(0)
x = rng.standard_normal((batch,) + m.INPUT_SHAPE).astype(m.DTYPE)
y = np.eye(m.N_OUTPUTS, dtype=m.DTYPE)[rng.integers(0, m.N_OUTPUTS, batch)]
m.value_and_grad(p, x, y)
print(json.dumps({"seconds": time.perf_counter() - start, "schedule": m.SCHEDULES["value_and_grad"]}))"""

# argv: model file, module, Numba cache, batch, peers (comma-separated), seconds
MEASURE = """import json, sys
from dbpgen import bench
from dbpgen.model import load_model
from dbpgen.sweep import import_cached
from pathlib import Path
model = load_model(sys.argv[1])
module = import_cached(Path(sys.argv[2]), Path(sys.argv[3]))
rows = bench.measure(model, module, int(sys.argv[4]), [p for p in sys.argv[5].split(",") if p], float(sys.argv[6]))
print(json.dumps(rows))"""


def _subprocess(args: list[str], env: dict) -> str:
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"exit {done.returncode}: {lines[-1]}")
    return done.stdout


def cold_warm(model_file: Path, batch: int, directory: Path) -> dict:
    """Compile `model_file` into `directory` and time the cold and warm first call, each
    in a fresh process; Numba's cache goes to directory/numba_cache, empty at the start.
    Returns {compile_s, cold_s, warm_s, schedule, module, cache}."""
    cache = directory / "numba_cache"
    cache.mkdir()
    out = directory / "generated"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    start = time.perf_counter()
    module = Path(_subprocess(["-c", COMPILE, str(model_file), str(out)], env).strip().splitlines()[-1])
    compile_s = time.perf_counter() - start
    cold = json.loads(_subprocess(["-c", FIRST_CALL, str(module), str(batch)], env).splitlines()[-1])
    warm = json.loads(_subprocess(["-c", FIRST_CALL, str(module), str(batch)], env).splitlines()[-1])
    return {"compile_s": compile_s, "cold_s": compile_s + cold["seconds"], "warm_s": warm["seconds"],
            "schedule": cold["schedule"], "module": module, "cache": cache}


def import_cached(module: Path, cache: Path):
    """Import the compiled module here, its kernels from the cache the subprocesses filled
    (Numba reads its cache directory when a module's functions are decorated)."""
    import numba

    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(cache)
    try:
        return load_generated(module)
    finally:
        numba.config.CACHE_DIR = previous


# -- one point, a sweep ---------------------------------------------------------------

def run_point(point: Point, against=("torch",), seconds: float = 1.0, workdir: Path | None = None) -> dict:
    """Cold and warm start, then dbpgen's and each peer's median ms; one row of the sweep.
    A point that fails is a row with `error`, so that one bad point never ends a sweep."""
    import yaml

    row = {"label": point.label, "name": point.name, "batch": point.batch, "dtype": point.dtype,
           **{k: point.factors.get(k) for k in ("kind", "width", "depth", "act", "penalty")}}
    directory = Path(tempfile.mkdtemp(prefix=f"{point.name}-", dir=workdir))
    model_file = directory / f"{point.name}.yaml"
    try:
        spec = point.model_spec()
        model_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        model = model_from_dict(spec, str(model_file))
        starts = cold_warm(model_file, point.batch, directory)
        row.update({k: starts[k] for k in ("schedule", "compile_s", "cold_s", "warm_s")})
        args = [str(model_file), str(starts["module"]), str(starts["cache"]), str(point.batch),
                ",".join(against), str(seconds)]
        env = dict(os.environ, NUMBA_CACHE_DIR=str(starts["cache"]))
        rows = json.loads(_subprocess(["-c", MEASURE, *args], env).splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    top = rows[0]
    row.update(dbpgen_ms=top["ms"], gflops=top["gflops"], roofline=top["roofline"],
               gemm_bound=bench.gemm_bound(model))
    peers = {r["name"]: r for r in rows[1:]}
    notes = []
    for peer in against:
        r = peers.get(peer, {"ms": None, "note": "not run"})
        row[f"{peer}_ms"] = r["ms"]
        if r["ms"] is None:
            notes.append(f"{peer}: {r['note']}")
    timed = {p: row[f"{p}_ms"] for p in against if row[f"{p}_ms"]}
    if timed:
        row["fastest_peer"] = min(timed, key=timed.get)
        row["ratio"] = top["ms"] / timed[row["fastest_peer"]]
    if notes:
        row["notes"] = "; ".join(notes)
    return row


def run_sweep(points: list[Point], against=("torch",), seconds: float = 1.0, progress=None) -> list[dict]:
    """One row per point (`run_point`), in order; `progress(i, n, row)` after each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dbpgen-sweep-") as workdir:
        for i, point in enumerate(points):
            rows.append(run_point(point, against, seconds, Path(workdir)))
            if progress:
                progress(i + 1, len(points), rows[-1])
    return rows


# -- the table ------------------------------------------------------------------------

CSV_COLUMNS = ("label", "name", "kind", "width", "depth", "act", "penalty", "batch", "dtype", "schedule",
               "compile_s", "cold_s", "warm_s", "dbpgen_ms", "torch_ms", "jax_ms", "pytensor_ms",
               "fastest_peer", "ratio", "gflops", "roofline", "gemm_bound", "notes", "error")


def _num(x, unit: str = "") -> str:
    if x is None:
        return "–"
    return (f"{x:.0f}" if abs(x) >= 100 else f"{x:#.3g}") + unit


def table(rows: list[dict], against=("torch",)) -> str:
    """The markdown table, one row per point."""
    head = (["point", "dtype", "batch", "schedule", "cold s", "warm s", "dbpgen ms"]
            + [f"{p} ms" for p in against] + ["dbpgen / fastest", "GEMM roofline"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["label"], r["dtype"], str(r["batch"]), f"error: {r['error']}"] + [""] * (len(head) - 4)
        else:
            roof = f"{100 * r['roofline']:.0f}%" if r.get("gemm_bound") else "–"
            ratio = f"**{r['ratio']:.2f}**" if r.get("ratio") is not None else "–"
            cells = ([r["label"], r["dtype"], str(r["batch"]), r["schedule"], _num(r["cold_s"]),
                      _num(r["warm_s"]), _num(r["dbpgen_ms"])]
                     + [_num(r.get(f"{p}_ms")) for p in against] + [ratio, roof])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """points, median and worst ratio, max cold start, the points with ratio >= 1."""
    ok = [r for r in rows if "error" not in r]
    ratios = [r for r in ok if r.get("ratio") is not None]
    parts = [f"{len(rows)} points"]
    if len(ok) < len(rows):
        parts.append(f"{len(rows) - len(ok)} failed")
    if ratios:
        worst = max(ratios, key=lambda r: r["ratio"])
        parts.append(f"median ratio {statistics.median(r['ratio'] for r in ratios):.2f}")
        parts.append(f"worst ratio {worst['ratio']:.2f} ({worst['label']}, {worst['dtype']}, B={worst['batch']})")
    else:
        parts.append("no peer timed")
    if ok:
        cold = max(ok, key=lambda r: r["cold_s"])
        parts.append(f"max cold start {cold['cold_s']:.1f} s ({cold['label']}, {cold['dtype']})")
    slow = [f"{r['label']} {r['dtype']} B={r['batch']} ({r['ratio']:.2f})" for r in ratios if r["ratio"] >= 1.0]
    parts.append("ratio >= 1.0: " + ("; ".join(slow) if slow else "none"))
    return ", ".join(parts[:-1]) + "; " + parts[-1]


def machine() -> str:
    """What the timings depend on: architecture, CPU model and vector extension, cores, the
    kernels NumPy's BLAS runs (an environment may pin them: OPENBLAS_CORETYPE), versions."""
    import numba
    import numpy

    versions = [f"numpy {numpy.__version__}", f"numba {numba.__version__}"]
    try:
        import torch
        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    cpu = [part for part in cpu_model() if part]
    kernels = bench.blas_kernels()
    blas = [f"NumPy's OpenBLAS runs its {kernels}"] if kernels else []
    return ", ".join([platform.machine()] + cpu + [f"{os.cpu_count()} cores"] + blas
                     + [f"Python {platform.python_version()}"] + versions)


def cpu_model() -> tuple[str, str]:
    """(model name, widest vector extension: AVX-512, AVX2 or ''), from /proc/cpuinfo
    (Linux); ('', '') where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return "", ""
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return fields.get("model name", ""), isa


def write(rows: list[dict], out: str | os.PathLike, command: str, against=("torch",)) -> list[Path]:
    """out (markdown: command, machine, table, summary) and, beside it, out.csv and out.json
    holding every measured field, for regenerating docs. Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = f"`{command}` on {machine()}\n\n{table(rows, against)}\n\n{summary(rows)}\n"
    out.write_text(md, encoding="utf-8")
    csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"command": command, "machine": machine(), "rows": rows}, indent=1),
                         encoding="utf-8")
    return [out, csv_path, json_path]
