"""Linear-operation counts of a program (paper section 5): K_j, K_j^T, K_j^box and flops."""
from __future__ import annotations

from .ir import Model
from .program import Program, count_ops


def op_counts(model: Model, program: Program) -> dict:
    """Applications of each operator in one call, and their flops for one sample.

    Gram-contraction products (passes/gram.py) add 2 N_1^2 flops per sample each; their
    once-per-call products (W_1 W_1^T, M W_1) are reported as flops_per_call.
    """
    counts = count_ops(program)
    flops = 0
    for kind in ("K", "KT", "Kbox"):
        for j in counts[kind]:
            layer = model.layers[j - 1]
            flops += layer.op.flops(layer.in_shape)
    out = {"K": len(counts["K"]), "KT": len(counts["KT"]), "Kbox": len(counts["Kbox"]), "flops": flops}
    if counts["gram_sample"] or counts["gram_call"]:
        n1, n0 = model.layers[0].op.out, model.layers[0].in_shape[0]
        out["flops"] += 2 * n1 * n1 * counts["gram_sample"]
        out["flops_per_call"] = 2 * n1 * n1 * n0 * counts["gram_call"]
    return out


def ops_table(model: Model, naive: Program, emitted: Program, power_steps: tuple = (None, None),
              iterations: int = 0) -> dict:
    """The counts of value_and_grad, naive and emitted. The `iterations` power iterations of
    `v: random` (power_steps: the naive and the emitted power_step program) run before the
    program in every call (section 4.1.3), and count with it."""
    table = {"naive": op_counts(model, naive), "emitted": op_counts(model, emitted)}
    for key, step in zip(("naive", "emitted"), power_steps):
        if step is not None and iterations:
            for kind, count in op_counts(model, step).items():
                table[key][kind] = table[key].get(kind, 0) + iterations * count
    return {"emitted": table["emitted"], "naive": table["naive"]}
