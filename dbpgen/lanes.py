"""Batch-minor fused kernels for narrow dense networks: one pass over chunks of samples.

For layers a few units wide, a GEMM call per K, K^T and K^box costs more in call overhead,
allocation and memory traffic than in arithmetic (the paper's sine network is 1-8-5-1).
This lowering prints the same program as one loop over chunks of CHUNK samples. Every
per-sample quantity lives in an (n, CHUNK) buffer with the batch in the contiguous axis, so
each statement becomes a loop nest whose innermost loop runs over samples and vectorizes;
coordinate-wise algebra is fused into the row that produces it, K and K^T are row-by-row
sums of `w * column`, and the batch reductions (K^box, eq. 32; BSum, eq. 33) accumulate
over chunks into the gradient arrays. Nothing is derived here: the statements, their order
and their operands are the simplified program's; only their schedule changes.

`eligible` decides when to use it (dense layers no wider than MAX_WIDTH, coordinate-wise
functions only, no loops over Jacobian rows); everything else keeps the array lowering.
"""
from __future__ import annotations

import re

import sympy as sp

from .functable import ELEMENTWISE_TYPES as ELEMENTWISE
from .functions import Bias, BiasBox, BSum, Dot, K, Kbox, KT, RowSum, Sigmoid, Softplus, linear_terms
from .ir import Dense, Model
from .printer import CodegenError, NumbaPrinter, zeros_code
from .program import BATCH, Loop, Program
from .shapes import BATCH_AXIS, shape_of

CHUNK = 64       # samples per chunk: every buffer of the sine network stays in L1
MAX_WIDTH = 32   # wider layers: a GEMM call is worth its overhead (measured, see README)
MAX_DEPTH = 4    # the kernel unrolls every layer: at 5 layers its first call takes 8 s (fused: 3 s)
FASTMATH = '{"reassoc", "contract", "nsz", "arcp"}'  # sums over samples vectorize; NaN and inf kept

LOOP_NAMES = {"i", "k", "b", "c0", "nb", "w", "acc", "DTYPE", "np", "numba", "min", "max", "abs"} | {
    f"kr{n}" for n in range(8)}
_PER_SAMPLE_OPS = (K, KT, Dot, RowSum)
BATCH_OPS = (Kbox, BSum, BiasBox)


def _is_per_sample(shape) -> bool:
    return len(shape) >= 1 and shape[0] == BATCH_AXIS


def eligible(model: Model, program: Program, shapes: dict) -> bool:
    """Narrow dense layers, no Jacobian loops, only coordinate-wise functions and the
    reductions above, per-sample values at most vectors."""
    if not all(isinstance(l.op, Dense) for l in model.layers) or len(model.layers) > MAX_DEPTH:
        return False
    widths = [model.input_shape[0]] + [l.out_shape[0] for l in model.layers]
    if len(model.input_shape) != 1 or max(widths) > MAX_WIDTH:
        return False
    if any(isinstance(node, Loop) for node in program.stmts):
        return False
    names = {s.name for s in program.inputs} | set(shapes)
    if names & LOOP_NAMES or any(re.fullmatch(r"n\d+_", name) for name in names):
        return False
    if any(_is_per_sample(s) and len(s) != 2 for s in shapes.values()):
        return False
    for node in program.stmts:
        for sub in sp.preorder_traversal(node.expr):
            if not isinstance(sub, ELEMENTWISE + _PER_SAMPLE_OPS + BATCH_OPS) and not sub.is_Integer:
                return False
    return True


class Unsupported(CodegenError):
    """A program this schedule does not cover: the array lowering prints it instead."""


class LanePrinter(NumbaPrinter):
    """Scalar code for one element (row `row`, sample b) of a coordinate-wise expression."""

    def __init__(self, model, shapes: dict, buffers: dict):
        super().__init__(model)
        self.shapes = shapes
        self.buffers = buffers  # per-sample symbol -> its (n, CHUNK) buffer
        self.row = "i"

    def _print_Symbol(self, expr):
        if expr == BATCH:
            return self._batch_size()
        if expr.name.startswith("kr"):  # a row of K inside a larger expression
            return expr.name
        shape = self.shapes.get(expr.name, ())
        row = "0" if len(shape) >= 1 and shape[-1] == 1 else self.row
        if _is_per_sample(shape):
            return f"{self.buffers[expr.name]}[{row}, b]"
        if len(shape) == 1:
            return f"{expr.name}[{row}]"
        if shape:
            raise CodegenError(f"cannot index {expr} of shape {shape} per coordinate")
        return expr.name

    def _print_Bias(self, expr):
        return self._print(expr.args[1])


    def _select(self, cond: str, value: str, other: str) -> str:
        return f"({value} if {cond} else {other})"

    def _print_Heaviside(self, expr):
        return self._select(f"{self._print(expr.args[0])} > 0", self._literal(1), self._literal(0))

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Sigmoid(self, expr):
        return self._call("_sigmoid1", expr)

    def _print_erf(self, expr):
        return f"math.erf({self._print(expr.args[0])})"

    def _print_Softplus(self, expr):
        return self._call("_softplus1", expr)

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and 0 < exp <= 4:
            return f"{self.parenthesize(base, sp.printing.precedence.PRECEDENCE['Pow'])}**{int(exp)}"
        return super()._print_Pow(expr, rational=rational)


class _Emitter:
    def __init__(self, model: Model, program: Program, shapes: dict):
        self.model = model
        self.program = program
        self.shapes = dict(shapes)
        self.buffers: dict[str, str] = {}
        self.allocs: list[tuple[str, str]] = []
        self.inputs: list[tuple[str, str]] = []   # chunk transposes
        self.body: list[tuple[str, str]] = []
        self.temps = 0
        self.rows = 0  # rows of the workspace handed out so far
        self.scratch = 0  # row buffers kr0, kr1, ... for K rows inside larger expressions
        self.open_rows, self.b_open = None, False
        self.printer = LanePrinter(model, self.shapes, self.buffers)
        self.array_printer = NumbaPrinter(model, lambda e: shape_of(e, self.shapes, model))
        args = {s.name for s in program.inputs}
        self.widths: dict[int, str] = {}  # width -> a weight's shape entry that holds it
        for layer in model.layers:
            W = f"W{layer.index}"
            if layer.op.has_params and W in args:
                self.widths.setdefault(layer.out_shape[0], f"{W}.shape[0]")
                self.widths.setdefault(layer.in_shape[0], f"{W}.shape[1]")
        self.sizes: dict[int, str] = {}  # the widths the kernel reads at run time

    # -- helpers ------------------------------------------------------------------
    def size(self, n: int) -> str:
        """A layer width as a run-time value (read from a weight's shape) where one is at
        hand: LLVM then vectorizes the loops over samples without also unrolling every loop
        over units, which halves the time to compile the kernel and costs no speed here."""
        if n > 1 and n in self.widths:
            self.sizes[n] = self.widths[n]
            return f"n{n}_"
        return str(n)

    def lit(self, value) -> str:
        return self.printer._literal(value)

    def emit(self, depth: int, code: str, comment: str = "") -> None:
        self.body.append(("    " * depth + code, comment))

    def buffer(self, name: str, rows: int, comment: str = "") -> str:
        # one allocation per call: every buffer is a block of rows of the workspace
        self.allocs.append((f"{name} = ws[{self.rows}:{self.rows + rows}]", comment))
        self.rows += rows
        return name

    def temp(self, expr: sp.Expr) -> sp.Symbol:
        """Hoist a per-sample operand into its own statement (evaluated once, read many times)."""
        sym = sp.Symbol(f"t{self.temps}_")
        self.temps += 1
        self.shapes[sym.name] = shape_of(expr, self.shapes, self.model)
        self.per_sample(sym, expr, "operand, computed once")
        return sym

    def operand(self, expr: sp.Expr) -> sp.Symbol:
        return expr if isinstance(expr, sp.Symbol) else self.temp(expr)

    def at(self, expr: sp.Expr, row: str) -> str:
        self.printer.row = row
        return self.printer.doprint(expr)

    def elementwise(self, expr: sp.Expr, rows: bool = False) -> sp.Expr:
        """Hoist every reduction inside expr into a buffer computed first. With rows, K and
        K^T of plain buffers stay (computed row by row where expr is); their operands are
        still hoisted."""
        def visit(e):
            if rows and isinstance(e, (K, KT)):
                return e.func(e.args[0], e.args[1], self.operand(self.elementwise(e.args[2])))
            if isinstance(e, _PER_SAMPLE_OPS):
                return self.temp(e.func(*[visit(a) for a in e.args]))
            if isinstance(e, BATCH_OPS):
                raise Unsupported(f"batch reduction inside a per-sample expression: {e}")
            if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
                return e
            return e.func(*[visit(a) for a in e.args])
        return visit(expr)

    # -- per-sample statements -----------------------------------------------------
    def per_sample(self, target: sp.Symbol, expr: sp.Expr, eq: str) -> None:
        """One statement of per-sample values; coordinate-wise statements of the same width
        join the loop nest before them (fused: one pass over the rows and samples)."""
        rows = self.shapes[target.name][1]
        if isinstance(expr, sp.Symbol) and self.shapes[expr.name] == self.shapes[target.name]:
            self.buffers[target.name] = self.buffers[expr.name]  # an alias, no copy
            self.allocs.append((f"{target.name} = {self.buffers[expr.name]}", eq))
            return
        if isinstance(expr, (Dot, RowSum)):
            args = [self.elementwise(a) for a in expr.args]
            self.buffers[target.name] = self.buffer(target.name, rows)
            self.row_reduction(expr.func(*args), target.name, eq)
            return
        expr = self.elementwise(expr, rows=True)
        name = self.buffers[target.name] = self.buffer(target.name, rows)
        ops = [n for n in sp.preorder_traversal(expr) if isinstance(n, (K, KT))]
        comment = f"{target} = {expr}, {eq}"
        if not ops and self.open_rows == rows:
            self.open_b_loop()
            self.emit(2, f"{name}[i, b] = {self.at(expr, 'i')}", comment)
            return
        self.emit(0, f"for i in range({self.size(rows)}):", comment)
        if expr in ops:  # the whole right-hand side is one K or K^T: accumulate in place
            self.layer_row(expr, f"{name}[i, b]")
        else:
            direct = {}
            for n, op in enumerate(dict.fromkeys(ops)):
                self.layer_row(op, f"kr{n}[b]")
                self.scratch = max(self.scratch, n + 1)
                direct[op] = sp.Symbol(f"kr{n}[b]")
            self.emit(1, "for b in range(nb):")
            self.emit(2, f"{name}[i, b] = {self.at(expr.xreplace(direct), 'i')}")
            self.b_open = True
        self.open_rows = rows

    def open_b_loop(self) -> None:
        if not self.b_open:
            self.emit(1, "for b in range(nb):")
            self.b_open = True

    def close(self) -> None:
        self.open_rows, self.b_open = None, False

    def layer_row(self, expr, out: str) -> None:
        """Row i of K (eq. 8, 20) or K^T (eq. 16, 30) of a dense layer: sum_k w_ik col_k."""
        W, src = expr.args[1], expr.args[2]
        inner = self.shapes[src.name][1]
        weight = f"{W}[i, k]" if isinstance(expr, K) else f"{W}[k, i]"
        self.close()
        self.emit(1, "for b in range(nb):")
        self.emit(2, f"{out} = {self.lit(0)}")
        self.emit(1, f"for k in range({self.size(inner)}):")
        self.emit(2, f"w = {weight}")
        self.emit(2, "for b in range(nb):")
        self.emit(3, f"{out} += w * {self.buffers[src.name]}[k, b]")

    def row_reduction(self, expr, out: str, eq: str) -> None:
        """<a, c> or sum_i a_i per sample, into row 0 of a (1, CHUNK) buffer."""
        args = expr.args
        inner = shape_of(args[0], self.shapes, self.model)[1]
        term = sp.Mul(*args) if isinstance(expr, Dot) else args[0]
        self.close()
        self.emit(0, "for b in range(nb):", f"{out} = {expr}, {eq}")
        self.emit(1, f"{out}[0, b] = {self.lit(0)}")
        self.emit(0, f"for k in range({self.size(inner)}):")
        self.emit(1, "for b in range(nb):")
        self.emit(2, f"{out}[0, b] += {self.at(term, 'k')}")

    # -- batch reductions ------------------------------------------------------------
    def batch_sum(self, target: sp.Symbol, expr: sp.Expr, eq: str) -> None:
        """target = sum_t c_t Op_t(...) with batch-invariant c_t: accumulated over chunks."""
        terms = linear_terms(expr, BATCH_OPS)
        for coeff, op in terms:
            if op is None:
                raise Unsupported(f"not a sum of batch reductions: {expr}")
            if any(self.shapes.get(s.name) != () for s in coeff.free_symbols):
                raise Unsupported(f"a per-sample coefficient of a batch reduction: {expr}")
        shape = self.shapes[target.name]
        self.allocs.append((f"{target.name} = {zeros_code(shape)}", f"sum over the batch, {eq}"))
        if isinstance(terms[0][1], Kbox):
            parts = []
            for coeff, op in terms:
                if not isinstance(op, Kbox):
                    raise Unsupported(f"mixed batch reductions: {expr}")
                x, y = self.operand(self.elementwise(op.args[1])), self.operand(self.elementwise(op.args[2]))
                parts.append(self.mul(coeff, f"{self.buffers[y.name]}[i, b] * {self.buffers[x.name]}[k, b]"))
            self.close()
            self.emit(0, f"for i in range({self.size(shape[0])}):", f"{target} += {expr}, {eq}")
            self.emit(1, f"for k in range({self.size(shape[1])}):")
            self.emit(2, f"acc = {self.lit(0)}")
            self.emit(2, "for b in range(nb):")
            self.emit(3, f"acc += {' + '.join(parts)}")
            self.emit(2, f"{target}[i, k] += acc")
            return
        parts = []
        for coeff, op in terms:
            if isinstance(op, Kbox):
                raise Unsupported(f"mixed batch reductions: {expr}")
            parts.append(self.mul(coeff, self.at(self.elementwise(op.args[-1]), "i")))
        self.close()
        self.emit(0, f"for i in range({self.size(shape[0])}):", f"{target} += {expr}, {eq}")
        self.emit(1, f"acc = {self.lit(0)}")
        self.emit(1, "for b in range(nb):")
        self.emit(2, f"acc += {' + '.join(parts)}")
        self.emit(1, f"{target}[i] += acc")

    def mul(self, coeff: sp.Expr, code: str) -> str:
        if coeff == 1:
            return code
        return f"{self.printer.parenthesize(coeff, 50)} * ({code})"

    # -- the kernel -------------------------------------------------------------------
    def run(self) -> dict:
        program = self.program
        used = program.used_inputs()
        for sym in program.inputs:
            shape = self.shapes.get(sym.name, ())
            if sym not in used:
                continue
            if _is_per_sample(shape):
                name = self.buffer(f"{sym.name}_t", shape[1], f"{sym} by chunk, samples last")
                self.buffers[sym.name] = name
                self.inputs.append((f"for i in range({self.size(shape[1])}):", f"chunk of {sym}, transposed"))
                self.inputs.append(("    for b in range(nb):", ""))
                self.inputs.append((f"        {name}[i, b] = {sym}[c0 + b, i]", ""))
        for stmt in program.stmts:
            shape = self.shapes[stmt.target.name]
            if _is_per_sample(shape):
                self.per_sample(stmt.target, stmt.expr, stmt.eq)
            elif any(isinstance(n, BATCH_OPS) for n in sp.preorder_traversal(stmt.expr)):
                self.batch_sum(stmt.target, stmt.expr, stmt.eq)
            else:
                raise Unsupported(f"no per-chunk schedule for {stmt.target} = {stmt.expr}")
        returns, scatter = [], []
        for label, expr in program.outputs:
            expr = sp.sympify(expr)
            shape = shape_of(expr, self.shapes, self.model) if expr != 0 else ()
            if expr == 0:
                returns.append(zeros_code(self.shapes[label]))
            elif _is_per_sample(shape):
                sym = self.operand(expr)
                out = f"{label}_out"
                self.allocs.append((f"{out} = np.empty((B, {shape[1]}), dtype=DTYPE)", f"{label}, samples first"))
                scatter += [(f"for i in range({self.size(shape[1])}):", f"{label} back to samples first"),
                            ("    for b in range(nb):", ""),
                            (f"        {out}[c0 + b, i] = {self.buffers[sym.name]}[i, b]", "")]
                returns.append(out)
            else:
                returns.append(self.array_printer.doprint(expr))
        args = program.call_args()
        rows = [(f"kr{n} = np.empty({CHUNK}, dtype=DTYPE)", "a row of K or K^T") for n in range(self.scratch)]
        lines = [("B = x0.shape[0]", "batch size"),
                 (f"ws = np.empty(({self.rows}, {CHUNK}), dtype=DTYPE)", "workspace: one chunk of every per-sample value")]
        lines += [(f"n{n}_ = {code}", "a width, read at run time") for n, code in sorted(self.sizes.items())]
        lines += self.allocs + rows
        lines.append((f"for c0 in range(0, B, {CHUNK}):", f"chunks of {CHUNK} samples"))
        lines.append((f"    nb = min({CHUNK}, B - c0)", "samples in this chunk"))
        for code, comment in self.inputs + self.body + scatter:
            lines.append(("    " + code, comment))
        return {"name": f"_{program.name}", "args": args, "lines": lines, "returns": returns,
                "labels": [label for label, _ in program.outputs],
                "jit": f"@numba.njit(cache=True, fastmath={FASTMATH})"}


def kernel(model: Model, program: Program, shapes: dict) -> dict:
    """The fused kernel of one program (see the module docstring)."""
    return _Emitter(model, program, shapes).run()
