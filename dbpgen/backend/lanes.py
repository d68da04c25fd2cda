"""Lowering `lanes`: narrow dense networks as one jitted pass over chunks of samples.

For layers a few units wide, a GEMM call per K, K^T and K^box costs more in call overhead,
allocation and memory traffic than in arithmetic (the paper's sine network is 1-8-5-1).
This lowering runs a program as one loop over chunks of CHUNK samples. Every per-sample
quantity lives in an (n, CHUNK) block of one workspace with the batch in the contiguous
axis, so each statement becomes a loop nest whose innermost loop runs over samples and
vectorizes; coordinate-wise algebra joins the loop nest before it when it has the same
width; K and K^T (eq. 8, 16, 20, 30) are row-by-row sums of `w * column`, and the batch
reductions (K^box, eq. 32; BSum, eq. 33) accumulate over chunks into the gradient arrays.

`applies` says when it can run a program (dense layers no wider than MAX_WIDTH, at most
MAX_DEPTH of them, coordinate-wise functions only, no loops over Jacobian rows); the
chooser (`dbpgen.backend.chooser`) decides whether it should.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Dot, K, Kbox, KT, RowSum
from ..ir import Model
from ..program import Loop, Program
from ..shapes import shape_of
from .common import (B, BATCH_OPS, ELEMENTWISE, PER_SAMPLE_OPS, Lowering, Unsupported, batch_terms,
                     elements, freeze, is_per_sample)
from .schedule import OPEN, AddTo, Alloc, Call, For, Function, Int, Let, Shape, Store, View, elem, name

CHUNK = 64       # samples per chunk: every buffer of the sine network stays in L1
MAX_WIDTH = 32   # wider layers: a GEMM call is worth its overhead (docs/performance.md)
MAX_DEPTH = 4    # the kernel unrolls every layer: at 5 layers its first call takes 8 s

i, k, b, c0, nb = (name(s) for s in ("i", "k", "b", "c0", "nb"))
ZERO = sp.Float(0.0)  # a float literal in the model's dtype: an accumulator's type from the start
LOOP_NAMES = {"i", "k", "b", "c0", "nb", "w", "acc", "ws", "DTYPE", "np", "numba", "math", "min", "max", "abs"}


def applies(model: Model, program: Program, shapes: dict) -> str | None:
    """None if this lowering can run the program, else why not."""
    if not all(layer.op.lanes for layer in model.layers):
        kind = next(layer.op.kind for layer in model.layers if not layer.op.lanes)
        return f"it cannot run {kind} layers row by row"
    if len(model.layers) > MAX_DEPTH:
        return f"more than {MAX_DEPTH} layers (compile time grows with its unrolled depth)"
    widths = [model.input_shape[0]] + [layer.out_shape[0] for layer in model.layers]
    if len(model.input_shape) != 1 or max(widths) > MAX_WIDTH:
        return f"a layer wider than {MAX_WIDTH} units"
    if any(isinstance(node, Loop) for node in program.stmts):
        return "it has no loop over Jacobian rows"
    names = {s.name for s in program.inputs} | set(shapes)
    if names & LOOP_NAMES or any(n.startswith(("kr", "t")) and n.endswith("_") for n in names):
        return "a program name collides with the kernel's own"
    if any(is_per_sample(s) and len(s) != 2 for s in shapes.values()):
        return "per-sample values of rank > 1"
    for node in program.stmts:
        for sub in sp.preorder_traversal(node.expr):
            if not isinstance(sub, ELEMENTWISE + PER_SAMPLE_OPS + BATCH_OPS) and not sub.is_Integer:
                return f"no scalar form of {type(sub).__name__}"
    return None


class _Lanes(Lowering):
    def __init__(self, model: Model, program: Program, shapes: dict):
        super().__init__(model, program, shapes)
        self.buffers: dict[str, str] = {}  # per-sample symbol -> its (n, CHUNK) block
        self.allocs: list = []    # before the chunk loop
        self.inputs: list = []    # chunk transposes
        self.body: list = []      # inside the chunk loop
        self.rows = 0             # rows of the workspace handed out so far
        self.scratch = 0          # row buffers kr0, kr1, ... for K rows inside larger expressions
        self.open_rows = None     # width of the open loop over rows, and its body
        self.row_body: list | None = None
        self.sample_body: list | None = None  # the open loop over samples in it
        args = set(program.call_args())  # a weight the program never reads is not passed in
        self.widths: dict[int, tuple[str, int]] = {}  # width -> a weight's axis that holds it
        for layer in model.layers:
            W = f"W{layer.index}"
            if layer.op.has_params and W in args:
                self.widths.setdefault(layer.out_shape[0], (W, 0))
                self.widths.setdefault(layer.in_shape[0], (W, 1))
        self.sizes: dict[int, tuple[str, int]] = {}  # the widths read at run time

    # -- helpers -------------------------------------------------------------------
    def size(self, n: int):
        """A layer width as a run-time value (read from a weight's shape) where one is at
        hand: LLVM then vectorizes the loops over samples without also unrolling every loop
        over units, which halves the time to compile the kernel and costs no speed."""
        if n > 1 and n in self.widths:
            self.sizes[n] = self.widths[n]
            return name(f"n{n}_")
        return n

    def buffer(self, target: str, rows: int, comment: str = "") -> str:
        # one allocation per call: every buffer is a block of rows of the workspace
        self.allocs.append(View(target, "ws", self.rows, self.rows + rows, comment))
        self.rows += rows
        return target

    def temp(self, expr: sp.Expr) -> sp.Symbol:
        """Hoist a per-sample operand into its own statement (evaluated once, read many times)."""
        sym = self.new_temp(expr)
        self.per_sample(sym, expr, "operand, computed once")
        return sym

    def operand(self, expr: sp.Expr) -> sp.Symbol:
        return expr if isinstance(expr, sp.Symbol) else self.temp(expr)

    def at(self, expr: sp.Expr, row) -> sp.Expr:
        """Element (row, sample b) of a coordinate-wise expression."""
        def index(sym):
            if sym.name.startswith("kr"):
                return None
            shape = self.shapes.get(sym.name, ())
            r = 0 if len(shape) >= 1 and shape[-1] == 1 else row
            if is_per_sample(shape):
                return elem(self.buffers[sym.name], r, b)
            if len(shape) == 1:
                return elem(sym.name, r)
            if shape:
                raise Unsupported(f"cannot index {sym} of shape {shape} per coordinate")
            return None
        return elements(expr, index)

    def elementwise(self, expr: sp.Expr, rows: bool = False) -> sp.Expr:
        """Hoist every reduction inside expr into a buffer computed first. With rows, K and
        K^T of plain buffers stay (computed row by row where expr is); their operands are
        still hoisted."""
        def visit(e):
            if rows and isinstance(e, (K, KT)):
                return e.func(e.args[0], e.args[1], self.operand(self.elementwise(e.args[2])))
            if isinstance(e, PER_SAMPLE_OPS):
                return self.temp(e.func(*[visit(a) for a in e.args]))
            if isinstance(e, BATCH_OPS):
                raise Unsupported(f"batch reduction inside a per-sample expression: {e}")
            if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
                return e
            return e.func(*[visit(a) for a in e.args])
        return visit(expr)

    def close(self) -> None:
        self.open_rows, self.row_body, self.sample_body = None, None, None

    def row_loop(self, rows, comment: str) -> list:
        body: list = []
        self.body.append(For("i", self.size(rows), body, scalar=True, comment=comment))
        self.row_body, self.sample_body = body, None
        return body

    def sample_loop(self, into: list) -> list:
        body: list = []
        into.append(For("b", nb, body))
        return body

    # -- per-sample statements -----------------------------------------------------
    def per_sample(self, target: sp.Symbol, expr: sp.Expr, eq: str) -> None:
        """One statement of per-sample values; coordinate-wise statements of the same width
        join the loop nest before them (fused: one pass over the rows and samples)."""
        rows = self.shapes[target.name][1]
        if isinstance(expr, sp.Symbol) and self.shapes[expr.name] == self.shapes[target.name]:
            self.buffers[target.name] = self.buffers[expr.name]  # an alias, no copy
            self.allocs.append(Let(target.name, name(self.buffers[expr.name]), eq))
            return
        if isinstance(expr, (Dot, RowSum)):
            args = [self.elementwise(a) for a in expr.args]
            self.buffers[target.name] = self.buffer(target.name, rows)
            self.row_reduction(expr.func(*args), target.name, eq)
            return
        expr = self.elementwise(expr, rows=True)
        buf = self.buffers[target.name] = self.buffer(target.name, rows)
        ops = list(dict.fromkeys(n for n in sp.preorder_traversal(expr) if isinstance(n, (K, KT))))
        comment = f"{target} = {expr}, {eq}"
        if not ops and self.open_rows == rows:
            if self.sample_body is None:
                self.sample_body = self.sample_loop(self.row_body)
            self.sample_body.append(Store(elem(buf, i, b), self.at(expr, i), comment))
            return
        body = self.row_loop(rows, comment)
        if expr in ops:  # the whole right-hand side is one K or K^T: accumulate in place
            self.layer_row(expr, elem(buf, i), body)
            self.sample_body = None
        else:
            direct = {}
            for n, op in enumerate(ops):
                self.layer_row(op, name(f"kr{n}"), body)
                self.scratch = max(self.scratch, n + 1)
                direct[op] = elem(f"kr{n}", b)
            self.sample_body = self.sample_loop(body)
            self.sample_body.append(Store(elem(buf, i, b), self.at(expr.xreplace(direct), i)))
        self.open_rows = rows

    def layer_row(self, expr, out, body: list) -> None:
        """Row i of K (eq. 8, 20) or K^T (eq. 16, 30) of a dense layer, sum_k w_ik col_k,
        into `out` (a row of a buffer, or a scratch row kr0, ...): a call of one helper per
        direction, so that Numba types and lowers the loops once, not at every product."""
        W, src = expr.args[1], expr.args[2]
        inner = self.shapes[src.name][1]
        helper = "_row_K" if isinstance(expr, K) else "_row_KT"
        body.append(Call((), helper, (name(W.name), i, name(self.buffers[src.name]), Int(self.size(inner)), nb, out)))

    def row_reduction(self, expr, out: str, eq: str) -> None:
        """<a, c> or sum_i a_i per sample, into row 0 of a (1, CHUNK) buffer."""
        args = expr.args
        inner = shape_of(args[0], self.shapes, self.model)[1]
        term = sp.Mul(*args) if isinstance(expr, Dot) else args[0]
        self.close()
        self.body.append(For("b", nb, [Store(elem(out, 0, b), ZERO)], scalar=True,
                             comment=f"{out} = {expr}, {eq}"))
        self.body.append(For("k", self.size(inner), [
            For("b", nb, [AddTo(elem(out, 0, b), self.at(term, k))])], scalar=True))

    # -- batch reductions ------------------------------------------------------------
    def batch_sum(self, target: sp.Symbol, expr: sp.Expr, eq: str) -> None:
        """target = sum_t c_t Op_t(...) with batch-invariant c_t: accumulated over chunks."""
        terms = batch_terms(expr)
        for coeff, op in terms:
            if op is None:
                raise Unsupported(f"not a sum of batch reductions: {expr}")
            if any(self.shapes.get(s.name) != () for s in coeff.free_symbols):
                raise Unsupported(f"a per-sample coefficient of a batch reduction: {expr}")
        shape = self.shapes[target.name]
        self.allocs.append(Alloc(target.name, shape, zero=True, comment=f"sum over the batch, {eq}"))
        acc = name("acc")
        self.close()
        if isinstance(terms[0][1], Kbox):  # one call of a shared helper per term
            for n, (coeff, op) in enumerate(terms):
                if not isinstance(op, Kbox):
                    raise Unsupported(f"mixed batch reductions: {expr}")
                x = self.operand(self.elementwise(op.args[1]))
                y = self.operand(self.elementwise(op.args[2]))
                self.body.append(Call((), "_box_add", (
                    name(target.name), name(self.buffers[y.name]), name(self.buffers[x.name]),
                    sp.Float(coeff) if coeff.is_Number else coeff, Int(self.size(shape[0])), Int(self.size(shape[1])), nb,
                    ZERO),
                    comment="" if n else f"{target} += {expr}, {eq}"))
            return
        parts = []
        for coeff, op in terms:
            if isinstance(op, Kbox):
                raise Unsupported(f"mixed batch reductions: {expr}")
            parts.append(self.at(coeff, i) * self.at(self.elementwise(op.args[-1]), i))
        self.body.append(For("i", self.size(shape[0]), [
            Let("acc", ZERO),
            For("b", nb, [AddTo(acc, sp.Add(*parts))]),
            AddTo(elem(target.name, i), acc)], scalar=True, comment=f"{target} += {expr}, {eq}"))

    # -- the kernel -------------------------------------------------------------------
    def run(self) -> Function:
        program = self.program
        used = program.used_inputs()
        for sym in program.inputs:
            shape = self.shapes.get(sym.name, ())
            if sym in used and is_per_sample(shape):
                buf = self.buffer(f"{sym.name}_t", shape[1], f"{sym} by chunk, samples last")
                self.buffers[sym.name] = buf
                self.inputs.append(For("i", self.size(shape[1]), [For("b", nb, [
                    Store(elem(buf, i, b), elem(sym.name, c0 + b, i))])], scalar=True,
                    comment=f"chunk of {sym}, transposed"))
        for stmt in program.stmts:
            shape = self.shapes[stmt.target.name]
            if is_per_sample(shape):
                self.per_sample(stmt.target, stmt.expr, stmt.eq)
            elif any(isinstance(n, BATCH_OPS) for n in sp.preorder_traversal(stmt.expr)):
                self.batch_sum(stmt.target, stmt.expr, stmt.eq)
            else:
                raise Unsupported(f"no per-chunk schedule for {stmt.target} = {stmt.expr}")
        returns, scatter, zeros = [], [], []
        for label, expr in program.outputs:
            expr = sp.sympify(expr)
            shape = shape_of(expr, self.shapes, self.model) if expr != 0 else ()
            if expr == 0:  # proven zero (section 5.3): the API's shape all the same
                zeros.append(Alloc(f"{label}_out", self._batch_dims(self.shapes[label]), zero=True,
                                   comment=f"{label} = 0"))
                returns.append(name(f"{label}_out"))
            elif is_per_sample(shape):
                sym = self.operand(expr)
                out = f"{label}_out"
                self.allocs.append(Alloc(out, (B, shape[1]), comment=f"{label}, samples first"))
                scatter.append(For("i", self.size(shape[1]), [For("b", nb, [
                    Store(elem(out, c0 + b, i), elem(self.buffers[sym.name], i, b))])], scalar=True,
                    comment=f"{label} back to samples first"))
                returns.append(name(out))
            else:
                returns.append(expr)
        head = [Let("B", Shape(name("x0"), 0), "batch size"),
                Alloc("ws", (self.rows, CHUNK), comment="workspace: one chunk of every per-sample value")]
        head += [Let(f"n{n}_", Shape(name(W), axis), "a width, read at run time")
                 for n, (W, axis) in sorted(self.sizes.items())]
        head += self.allocs + zeros
        head += [Alloc(f"kr{n}", (CHUNK,), comment="a row of K or K^T") for n in range(self.scratch)]
        chunk = [Let("nb", Int(sp.Min(CHUNK, B - c0)), "samples in this chunk")] + self.inputs + self.body + scatter
        head.append(For("c0", B, chunk, step=CHUNK, comment=f"chunks of {CHUNK} samples"))
        return freeze(Function(f"_{program.name}", tuple(program.call_args()), head, tuple(returns),
                               tuple(label for label, _ in program.outputs), decorator="lanes",
                               shapes=tuple(self.shapes.items())))

    @staticmethod
    def _batch_dims(shape):
        return tuple(B if d == "B" else d for d in shape)


def lower(model: Model, program: Program, shapes: dict) -> Function:
    """The program as one jitted pass over chunks (see the module docstring)."""
    reason = applies(model, program, shapes)
    if reason:
        raise Unsupported(reason)
    return _Lanes(model, program, shapes).run()


__all__ = ["CHUNK", "MAX_DEPTH", "MAX_WIDTH", "OPEN", "applies", "lower"]
