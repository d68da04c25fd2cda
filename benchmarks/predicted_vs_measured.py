"""The chooser's cost model against measurements: every schedule of value_and_grad that
applies, predicted (dbpgen/backend/cost.py) and measured, on a set of models.

    python benchmarks/predicted_vs_measured.py [BATCH] [SECONDS] [NAME,NAME,...]

Prints a markdown table: model, schedule, predicted ms, measured ms, measured/predicted;
`*` marks the chooser's pick, `!` the measured fastest when it is another one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from dbpgen.backend import chooser, cost
from dbpgen.compiler import build, measure_schedules
from dbpgen.model import load_model, model_from_dict

ROOT = Path(__file__).resolve().parent.parent


def dense(name, widths, act, loss, penalty, n_in=16, C=4, dtype="float64"):
    layers = [{"dense": w, "act": act} for w in widths] + [{"dense": C, "act": "softmax" if loss == "nll" else "identity"}]
    return {"name": name, "input": [n_in], "layers": layers, "loss": loss, "penalty": penalty, "dtype": dtype}


CDB = {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}
NODE = {"v": "output", "index": 0, "p": "squared_norm", "weight": 0.1}
JAC = {"v": "jacobian", "p": "squared_norm", "weight": 0.1}
MODELS = [
    ROOT / "benchmarks" / "sine_cdb.yaml", ROOT / "benchmarks" / "tanh_node.yaml",
    ROOT / "benchmarks" / "mnist_cdb.yaml", ROOT / "benchmarks" / "mnist_jac.yaml",
    ROOT / "examples" / "lenet_cdb.yaml", ROOT / "examples" / "conv1d_cdb.yaml",
    dense("pm_relu16x5", [16] * 5, "relu", "mse", CDB),
    dense("pm_tanh64x3", [64] * 3, "tanh", "mse", CDB),
    dense("pm_relu256", [256, 256], "relu", "nll", CDB, n_in=128, C=10),
    dense("pm_tanh512_node", [512, 512], "tanh", "none", NODE, n_in=128, C=1),
    dense("pm_softplus48_jac", [48, 48], "softplus", "nll", JAC, C=10),
    dense("pm_mish32", [32, 32], "z*tanh(log(1 + exp(z)))", "mse", CDB),
    dense("pm_tanh16x3", [16] * 3, "tanh", "mse", CDB),
    dense("pm_softplus8x3", [8] * 3, "softplus", "mse", CDB),
    dense("pm_tanh64x3_f32", [64] * 3, "tanh", "mse", CDB, n_in=32, dtype="float32"),
    dense("pm_tanh64x8_f32", [64] * 8, "tanh", "mse", CDB, n_in=32, dtype="float32"),
    dense("pm_mish64x3_f32", [64] * 3, "z*tanh(log(1 + exp(z)))", "mse", CDB, n_in=32, dtype="float32"),
    dense("pm_softplus64x3_f32", [64] * 3, "softplus", "mse", CDB, n_in=32, dtype="float32"),
    dense("pm_relu256_f32", [256, 256], "relu", "nll", CDB, n_in=128, C=10, dtype="float32"),
]


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    print("| model | schedule | predicted ms | measured ms | measured / predicted |")
    print("|---|---|---:|---:|---:|")
    for source in MODELS:
        model = load_model(source) if isinstance(source, Path) else model_from_dict(source, source["name"] + ".yaml")
        if only and model.name not in only:
            continue
        compiled = build(model)
        program = compiled.programs["value_and_grad"]
        measured = measure_schedules(compiled, batch, seconds)
        picked = chooser.choose(model, program, _shapes(model, program)).kind
        fastest = min(measured, key=measured.get)
        for kind, t in measured.items():
            p = cost.predict(kind, model, program, batch)
            mark = ("*" if kind == picked else "") + ("!" if kind == fastest and kind != picked else "")
            print(f"| {model.name} | {kind}{mark} | {1e3 * p:.3g} | {1e3 * t:.3g} | {t / p:.2f} |", flush=True)


def _shapes(model, program):
    from dbpgen.derive import n_vectors
    from dbpgen.shapes import program_shapes

    return program_shapes(model, program, n_vectors(model))


if __name__ == "__main__":
    main()
