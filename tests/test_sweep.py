"""`dbpgen bench --sweep`: the grid's definition and the pipeline (no timing assertions)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dbpgen import sweep
from dbpgen.cli import main
from dbpgen.model import model_from_dict

FULL = sweep.sweep_points("full")
SMALL = sweep.sweep_points("small")
CONV = sweep.sweep_points("conv")


def values(points, key):
    return {p.factors.get(key) for p in points}


def test_full_grid_covers_every_required_value():
    dense = [p for p in FULL if p.factors["kind"] == "dense"]
    assert {4, 16, 64, 256, 1024} <= values(dense, "width")
    assert {2, 3, 4, 6, 8} <= values(dense, "depth")
    assert {"relu", "tanh", "softplus", sweep.MISH, sweep.SOFTSIGN} <= values(dense, "act")
    assert set(sweep.PENALTIES) <= values(dense, "penalty")
    assert {32, 128, 512, 1024} <= {p.batch for p in dense}
    assert {"float32", "float64"} == {p.dtype for p in FULL}
    assert {"conv1d", "conv2d"} <= values(FULL, "kind")
    assert 40 <= len(FULL) <= 80


def test_small_grid_is_a_quick_cross_section():
    assert 8 <= len(SMALL) <= 12
    assert {"float32", "float64"} == {p.dtype for p in SMALL}
    assert set(sweep.PENALTIES) <= values(SMALL, "penalty")
    assert {4, 1024} <= values(SMALL, "width")
    assert {32, 1024} <= {p.batch for p in SMALL}
    assert values(SMALL, "kind") >= {"dense", "conv1d"}


def test_conv_grid_covers_the_conv_factors():
    cnn = [p for p in CONV if p.factors["kind"] == "conv2d"]
    convs = [[layer["conv2d"] for layer in p.spec["layers"] if "conv2d" in layer] for p in cnn]
    assert {8, 16, 32, 128} <= {c[0]["channels"] for c in convs}
    assert {1, 3, 5} <= {c[0]["kernel"] for c in convs}
    assert {1, 2} <= {c[0].get("stride", 1) for c in convs} and {1, 2} <= {c[0].get("dilation", 1) for c in convs}
    assert {16, 32, 64} <= {p.spec["input"][1] for p in cnn}
    assert {2, 4, 6} <= {len(c) for c in convs}
    assert {16, 64, 256} <= {p.batch for p in cnn}
    assert {"loss_gradient/nll", "output/mse", "jacobian"} <= values(cnn, "penalty")
    assert {"float32", "float64"} == {p.dtype for p in CONV} and "conv1d" in values(CONV, "kind")


@pytest.mark.parametrize("point", FULL + SMALL + CONV, ids=lambda p: f"{p.name}-B{p.batch}")
def test_every_point_is_a_valid_model(point):
    model = model_from_dict(point.model_spec(), point.name)
    assert model.name == point.name and model.dtype == point.dtype
    penalty = point.factors.get("penalty")
    if penalty:
        loss, _, pen = sweep.PENALTIES[penalty]
        assert model.loss == loss and model.penalty.v == pen["v"]
        assert sum(1 for layer in model.layers if layer.act.name == point.factors["act"]) == point.factors["depth"]


def test_a_dtype_selects_its_half_of_the_grid():
    half = sweep.sweep_points("conv", "float32")
    assert half and {p.dtype for p in half} == {"float32"}
    assert [p.label for p in half] == [p.label for p in CONV if p.dtype == "float32"]


def test_only_selects_the_points_whose_label_dtype_and_batch_contain_a_text(capsys):
    softplus = sweep.sweep_points("full", only=("softplus",))
    assert softplus and all("softplus" in p.label for p in softplus)
    assert len(softplus) == sum("softplus" in p.label for p in FULL)
    small32 = sweep.sweep_points("full", "float64", only=("B=32", "mish"))
    assert {p.dtype for p in small32} == {"float64"}
    assert {p.batch == 32 or "mish" in p.label for p in small32} == {True} and len(small32) >= 2
    assert main(["bench", "--sweep", "small", "--only", "no such point"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only" in err and "Traceback" not in err
    assert main(["bench", "m.yaml", "--only", "softplus"]) == 2
    assert "only with --sweep" in capsys.readouterr().err


def test_points_are_distinct():
    for grid in (FULL, CONV):
        keys = [(p.name, p.batch) for p in grid]
        assert len(keys) == len(set(keys))
    assert all(p.model_spec()["penalty"].get("algorithm") == "auto"
               for p in FULL if p.factors.get("penalty") == "jacobian")


def test_neither_model_nor_sweep_is_a_clear_error(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sweep" in err and "Traceback" not in err
    assert main(["bench", "m.yaml", "--sweep", "small"]) == 2
    assert "not both" in capsys.readouterr().err


def test_summary_lists_points_at_or_above_parity():
    timed = {"schedule": "jit", "warm_s": 0.5, "dbpgen_ms": 1.0, "torch_ms": 2.0, "gemm_bound": False}
    rows = [{"label": "a", "dtype": "float64", "batch": 8, "ratio": 0.5, "cold_s": 3.0, **timed},
            {"label": "b", "dtype": "float32", "batch": 8, "ratio": 1.2, "cold_s": 9.0, **timed},
            {"label": "c", "dtype": "float64", "batch": 8, "error": "RuntimeError: boom"}]
    line = sweep.summary(rows)
    assert line.startswith("3 points, 1 failed, median ratio 0.85, worst ratio 1.20 (b")
    assert "max cold start 9.0 s (b" in line and line.endswith("ratio >= 1.0: b float32 B=8 (1.20)")
    assert "error: RuntimeError: boom" in sweep.table(rows, ["torch"])


TORCH = importlib.util.find_spec("torch") is not None


def test_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """One tiny point through the CLI: compile and cold/warm first calls in fresh
    processes, timing against torch, the table and its CSV and JSON."""
    tiny = sweep.dense_point("float64", width=4, depth=2, act="relu", batch=16)
    monkeypatch.setitem(sweep.SIZES, "small", lambda: [tiny])
    against = "torch" if TORCH else ""
    out = tmp_path / "sweep.md"
    assert main(["bench", "--sweep", "small", "--against", against, "--seconds", "0.05", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| dense 4x2 relu loss_gradient/mse | float64 | 16 |" in stdout
    assert stdout.strip().splitlines()[-1].startswith("1 points, ")
    assert out.read_text().count("| dense 4x2 relu") == 1
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["cold_s"] > row["compile_s"] > 0 and row["warm_s"] > 0 and row["dbpgen_ms"] > 0
    assert row["schedule"] in ("lanes", "jit", "fused", "kernels")
    if TORCH:
        assert row["torch_ms"] > 0 and row["ratio"] == pytest.approx(row["dbpgen_ms"] / row["torch_ms"])
    with open(out.with_suffix(".csv"), newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert csv_row["label"] == tiny.label and float(csv_row["cold_s"]) == pytest.approx(row["cold_s"])


def _machine_line(env: dict) -> str:
    code = "from dbpgen import sweep; print(sweep.machine())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or "openblas" not in
                    str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]).lower(),
                    reason="reads the kernels from NumPy's OpenBLAS through /proc/self/maps (Linux)")
def test_the_machine_line_names_the_blas_kernels_that_run():
    """A sweep's tables depend on which kernels NumPy's OpenBLAS runs, which an environment
    can pin (OPENBLAS_CORETYPE): the machine line reads them off the library, so a forced
    core shows up as itself, with the variable that forced it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    line = _machine_line({**env, "OPENBLAS_CORETYPE": "Sandybridge"})
    assert "NumPy's OpenBLAS runs its Sandybridge kernels (OPENBLAS_CORETYPE=Sandybridge)" in line
    assert "OPENBLAS_CORETYPE" not in _machine_line(env)
    model, isa = sweep.cpu_model()
    assert f"{os.cpu_count()} cores" in line and (not isa or isa in line)
