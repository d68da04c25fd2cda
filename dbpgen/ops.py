"""Linear-operation counts of a program (paper section 5): K_j, K_j^T, K_j^box and flops."""
from __future__ import annotations

from .ir import Model
from .program import Program, count_ops


def op_counts(model: Model, program: Program) -> dict:
    """Applications of each operator in one call, and their flops for one sample."""
    counts = count_ops(program)
    flops = 0
    for layers in counts.values():
        for j in layers:
            layer = model.layers[j - 1]
            flops += layer.op.flops(layer.in_shape)
    return {"K": len(counts["K"]), "KT": len(counts["KT"]), "Kbox": len(counts["Kbox"]), "flops": flops}


def ops_table(model: Model, naive: Program, emitted: Program) -> dict:
    return {"emitted": op_counts(model, emitted), "naive": op_counts(model, naive)}
