"""Shared fixtures: compile a model spec (a dict, as in a YAML file) and import the module."""
from __future__ import annotations

import os

# The suite checks what the emitted code computes, not how fast: Numba compiles it without
# LLVM's optimizations (NUMBA_OPT=0, about 40% less compile time), set before numba is
# imported and inherited by every worker and subprocess. tests/test_optimized.py runs
# each schedule once optimized (NUMBA_OPT=3, fastmath reassociation included).
os.environ.setdefault("NUMBA_OPT", "0")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings  # noqa: E402

from dbpgen.compiler import compile_file, load_generated  # noqa: E402

# CI (.ci/run sets CI=1) replays one fixed set of Hypothesis examples, so that a landing is not
# decided by a new draw; anywhere else every run draws new ones and keeps hunting.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"  # the shared benchmark models


def pytest_configure(config):
    config.addinivalue_line("markers", "optimized: a check of the code as users run it, optimized "
                            "(NUMBA_OPT=3); tests/test_optimized.py runs these, the unoptimized "
                            "session deselects them")
    if os.environ["NUMBA_OPT"] == "0":
        # unoptimized, Numba keeps a runtime address (the callee's environment) in every
        # jitted function that calls another and does not cache the caller; optimized, as
        # users run it, it does (tests/test_optimized.py)
        config.addinivalue_line("filterwarnings", "ignore:Cannot cache compiled function .* as it uses "
                                "dynamic globals:numba.core.errors.NumbaWarning")


OPTIMIZED = pytest.StashKey[list]()  # node ids of the deselected `optimized` tests


def pytest_collection_modifyitems(config, items):
    """Unoptimized, the `optimized` tests are deselected: tests/test_optimized.py runs them
    in a subprocess with NUMBA_OPT=3 (compiling them twice cost the suite 27 s)."""
    if os.environ["NUMBA_OPT"] != "0":
        return
    deselected = [item for item in items if item.get_closest_marker("optimized")]
    config.stash[OPTIMIZED] = [item.nodeid for item in deselected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite generated/ from a fresh compile of every example and benchmark "
                          "model instead of failing where they differ (tests/test_codegen.py)")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


def import_module(path: Path, jit: bool = True):
    return load_generated(path, jit=jit)


def load_example(name: str):
    """examples/<name>.py imported as a module (its main() not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_model(spec: dict, directory: Path) -> Path:
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compile_spec(spec: dict, directory: Path, jit: bool = True, simplified: bool = True,
                 schedule: str | None = None):
    path = write_model(spec, directory)
    out = compile_file(path, directory / "generated", simplified=simplified, schedule=schedule)
    return import_module(out, jit=jit)


@pytest.fixture(scope="module")
def shared_module(tmp_path_factory):
    """(spec, schedule=None) -> its module compiled and imported jitted, once per test file
    (lazily), for the tests of that file that check the same module."""
    out, loaded = tmp_path_factory.mktemp("shared"), {}

    def get(spec: dict, schedule: str | None = None):
        key = (spec["name"], schedule)
        if key not in loaded:
            folder = out / (schedule or "chosen")
            folder.mkdir(exist_ok=True)
            loaded[key] = compile_spec(spec, folder, schedule=schedule)
        return loaded[key]
    return get


def batch_for(spec: dict, rng: np.random.Generator, batch: int = 5):
    """Inputs x, labels y (one-hot for nll) and a direction v for a model spec."""
    C = spec["layers"][-1]["dense"]
    x = rng.normal(size=(batch, *spec["input"]))
    if spec.get("loss") == "nll":
        y = np.eye(C)[rng.integers(0, C, batch)]
    else:
        y = rng.normal(size=(batch, C))
    v = rng.normal(size=(batch, C))
    return x, y, v


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def wider_intermediates(module, call, dtype=np.float32) -> list[str]:
    """Run call() and return every array a Python-level function of `module` holds (its
    locals, line by line) whose floating dtype is not `dtype`: 'function:line name dtype'.
    Kernels called from there (jitted loops, BLAS) show up through the arrays they return."""
    import sys

    found = []

    def local_trace(frame, event, arg):
        if event in ("line", "return"):
            for name, value in frame.f_locals.items():
                if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != dtype:
                    found.append(f"{frame.f_code.co_name}:{frame.f_lineno} {name} {value.dtype}")
        return local_trace

    def global_trace(frame, event, arg):
        if frame.f_code.co_filename == module.__file__:
            return local_trace
        return None

    sys.settrace(global_trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return sorted(set(found))
