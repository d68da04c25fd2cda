"""Shape inference over programs: the IR's type checker.

Every symbol of a program is an array whose leading axis is the batch (written "B"),
except parameters and batch-reduced values (gradients). Shapes follow the rules of the
vocabulary in `dbpgen.functions` and NumPy broadcasting for coordinate-wise algebra; an
inconsistent program raises ShapeError.
"""
from __future__ import annotations

import sympy as sp

from .functions import Bias, BiasBox, Gram, GramBox, GramMul, GramOut, BSum, Dot, K, Kbox, KT, LogSumExp, OneHot, Row, RowSum, Softmax
from .ir import Model

BATCH_AXIS = "B"
Shape = tuple


class ShapeError(AssertionError):
    pass


def input_shapes(model: Model, n_vectors: int = 1) -> dict[str, Shape]:
    """Shapes of everything a program may take as input, by symbol name."""
    C = model.n_outputs
    shapes = {"x0": (BATCH_AXIS,) + tuple(model.input_shape), "u": (BATCH_AXIS,) + tuple(model.input_shape),
              "y": (BATCH_AXIS, C), "v": (BATCH_AXIS, C), "V": (n_vectors, BATCH_AXIS, C),
              "lam": (), "B": ()}
    for layer in model.layers:
        j = layer.index
        if layer.op.has_params:
            shapes[f"W{j}"] = layer.op.weight_shape(layer.in_shape)
        if layer.op.bias:
            shapes[f"b{j}"] = layer.op.bias_param_shape(layer.out_shape)
    return shapes


PER_SAMPLE = (BATCH_AXIS, 1)


def broadcast(*shapes: Shape) -> Shape:
    """NumPy broadcasting, except that a per-sample scalar (B, 1) aligns with the batch axis
    of an image (B, C, H, W); the printer reshapes it there."""
    ndim = max((len(s) for s in shapes), default=0)
    if ndim > 2:
        shapes = tuple((BATCH_AXIS,) + (1,) * (ndim - 1) if s == PER_SAMPLE else s for s in shapes)
    out = []
    for axis in range(ndim):
        dims = {s[len(s) - ndim + axis] for s in shapes if len(s) - ndim + axis >= 0} - {1}
        if len(dims) > 1:
            raise ShapeError(f"cannot broadcast shapes {shapes}")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def shape_of(expr: sp.Expr, known: dict[str, Shape], model: Model) -> Shape:
    """The shape of an expression, given the shapes of the symbols it uses."""
    if isinstance(expr, sp.Symbol):
        if expr.name not in known:
            raise ShapeError(f"no shape for {expr}")
        return known[expr.name]
    if expr.is_Number or isinstance(expr, (sp.logic.boolalg.BooleanAtom,)):
        return ()
    if isinstance(expr, (K, KT, Kbox)):  # the operator's own shapes (dbpgen.operators)
        layer = model.layers[expr.layer - 1]
        if isinstance(expr, Kbox):
            return layer.op.weight_shape(layer.in_shape)
        space = layer.out_shape if isinstance(expr, K) else layer.in_shape
        return (BATCH_AXIS,) + tuple(space)
    if isinstance(expr, (Dot, RowSum, LogSumExp)):
        return (BATCH_AXIS, 1)
    if isinstance(expr, Bias):  # b as it broadcasts over one sample (per channel)
        layer = model.layers[int(expr.args[0]) - 1]
        return layer.op.bias_shape(layer.out_shape)
    if isinstance(expr, BiasBox):  # b's own shape
        layer = model.layers[int(expr.args[0]) - 1]
        return layer.op.bias_param_shape(layer.out_shape)
    if isinstance(expr, BSum):
        return shape_of(expr.args[0], known, model)[1:]
    if isinstance(expr, (Gram, GramBox)):
        n = model.layers[0].op.out
        return (n, n)
    if isinstance(expr, GramMul):
        return shape_of(expr.args[0], known, model)
    if isinstance(expr, GramOut):
        return shape_of(expr.args[1], known, model)
    if isinstance(expr, OneHot):
        return (BATCH_AXIS, int(expr.args[1]))
    if isinstance(expr, Row):
        return shape_of(expr.args[0], known, model)[1:]
    if isinstance(expr, Softmax):
        return shape_of(expr.args[0], known, model)
    if isinstance(expr, sp.Piecewise):
        parts = [shape_of(e, known, model) for pair in expr.args for e in pair]
        return broadcast(*parts)
    return broadcast(*(shape_of(a, known, model) for a in expr.args))


def nbytes(shape: Shape, batch: int, itemsize: int) -> int:
    size = itemsize
    for d in shape:
        size *= batch if d == BATCH_AXIS else int(d)
    return size


# Quantities of the paper that live in layer j's space X_j (x_0's space for j = 0).
_SPACE_QUANTITIES = {"x", "z", "xi", "zeta", "q", "h", "eta", "gamma", "delta", "dg", "ddg", "gamma_out", "eta_out",
                     "etahat", "gammahat", "eps"}


def role_shape(role, model: Model) -> Shape | None:
    """Shape of a paper quantity from its role (xi_2 lives in X_2, grad_W2 is shaped like
    W2), for constant statements (a gradient or J that is 0 in the naive program)."""
    if role is not None and role.quantity == "loss":
        return (1,)
    if role is not None and role.quantity in ("grad_W", "grad_b") and role.layer is not None:
        layer = model.layers[role.layer - 1]
        if role.quantity == "grad_W":
            return tuple(layer.op.weight_shape(layer.in_shape))
        return tuple(layer.op.bias_param_shape(layer.out_shape))
    if role is None or role.quantity not in _SPACE_QUANTITIES or role.layer is None:
        return None
    j = role.layer
    space = model.input_shape if j == 0 else model.layers[j - 1].out_shape
    return (BATCH_AXIS,) + tuple(space)


def _target_shape(stmt, known: dict, model: Model) -> Shape:
    if stmt.expr.is_Number:
        return role_shape(stmt.role, model) or ()
    return shape_of(stmt.expr, known, model)


def program_shapes(model: Model, program, n_vectors: int = 1) -> dict[str, Shape]:
    """Shapes of every input and target of a program, loop bodies included."""
    from .program import Loop

    known = dict(input_shapes(model, n_vectors))
    for node in program.stmts:
        if isinstance(node, Loop):
            local = dict(known, **{node.index.name: ()})
            for stmt in node.body:
                local[stmt.target.name] = _target_shape(stmt, local, model)
            for acc in node.accums:
                known[acc.target.name] = shape_of(acc.expr, local, model)
            known.update({k: v for k, v in local.items() if k not in known})
        else:
            known[node.target.name] = _target_shape(node, known, model)
    for label, expr in program.outputs:  # an output proven 0 may have lost its statement
        if label not in known and expr == 0:
            known[label] = _output_shape(label, model)
    return known


def _output_shape(label: str, model: Model) -> Shape:
    """The shape of a program output by its API label (SPEC section 2)."""
    per_sample = {"out": (model.n_outputs,), "Ju": (model.n_outputs,), "R": (1,),
                  "xi0": tuple(model.input_shape)}
    if label == "value":
        return (1,)
    return (BATCH_AXIS,) + per_sample[label]
