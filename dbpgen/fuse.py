"""Fused coordinate-wise loops for programs that run as Python over whole-batch arrays.

Between the GEMMs of a wide network (K, K^T, K^box: eq. 8, 16, 20, 30, 32), a program
evaluates coordinate-wise algebra: g_j, G'_j, G''_j (eq. 8-9), the M_j products (eq. 15,
21, 28) and the arguments of the weight adjoints (eq. 31-33). Printed as NumPy array
expressions, every operator makes a temporary the size of a layer and another pass over
memory. This schedule prints each run of consecutive coordinate-wise statements of the
same width as one jitted loop over (sample, unit): values that only that run reads stay
scalars, and only the ones later statements read are stored.

Nothing is derived here: the statements, their order and their operands are the simplified
program's. Two mechanical rewrites make runs longer: a reduction inside a coordinate-wise
right-hand side (K, K^T, <a, c>, softmax, ...) is evaluated first into a temporary, and a
coordinate-wise argument of a batch reduction (K^box, BSum) becomes its own statement,
printed once however often it is used. Transcendental functions stay NumPy statements:
NumPy's SIMD ufuncs beat Numba's scalar libm calls (see codegen.TRANSCENDENTAL).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from .functions import Bias
from .lanes import BATCH_OPS, ELEMENTWISE, LanePrinter
from .printer import CodegenError
from .program import Loop, Program, Stmt
from .shapes import BATCH_AXIS, shape_of

LOOP_NAMES = {"i", "k"}  # the fused loops' own indices
_LEAVES = (sp.Symbol, sp.Number, sp.NumberSymbol, sp.logic.boolalg.BooleanAtom)


def _coordinatewise(expr: sp.Expr, transcendental: tuple) -> bool:
    return all(isinstance(n, ELEMENTWISE) or n.is_Integer for n in sp.preorder_traversal(expr)) \
        and not expr.has(*transcendental)


def _operations(expr: sp.Expr) -> int:
    return sum(1 for n in sp.preorder_traversal(expr) if not isinstance(n, _LEAVES + (Bias,)))


class FusedPrinter(LanePrinter):
    """Scalar code for element (i, k) of a whole-batch (B, n) expression."""

    def __init__(self, model, shapes: dict):
        super().__init__(model, shapes, {})
        self.local: set[str] = set()  # values of this loop held in scalars

    def _print_Symbol(self, expr):
        name = expr.name
        if name in self.local:
            return name
        shape = self.shapes.get(name, ())
        if len(shape) == 2 and shape[0] == BATCH_AXIS:
            return f"{name}[i, {'0' if shape[1] == 1 else 'k'}]"
        if len(shape) == 1:
            return f"{name}[{'0' if shape[0] == 1 else 'k'}]"
        if shape:
            raise CodegenError(f"cannot index {expr} of shape {shape} per coordinate")
        return name


class _Fuser:
    def __init__(self, model, program: Program, shapes: dict, transcendental: tuple, registry: dict):
        self.model = model
        self.registry = registry  # (args, lines, returns) -> name, shared by a module's programs
        self.program = program
        self.shapes = dict(shapes)
        self.transcendental = transcendental
        self.temps = 0
        self.kernels: list[dict] = []
        self.operands: dict = {}    # hoisted operand of a batch reduction -> its temporary
        self.reductions: dict = {}  # hoisted reduction -> its temporary

    def width(self, shape) -> int | None:
        """n for a whole-batch (B, n) value with n > 1, else None."""
        if len(shape) == 2 and shape[0] == BATCH_AXIS and shape[1] != 1:
            return shape[1]
        return None

    def fusable(self, node) -> bool:
        if not isinstance(node, Stmt) or self.width(self.shapes[node.target.name]) is None:
            return False
        if not _coordinatewise(node.expr, self.transcendental):
            return False
        names = {s.name for s in node.expr.free_symbols}
        if names & LOOP_NAMES or not names <= set(self.shapes):  # e.g. Algorithm 4's index i
            return False
        shapes = [self.shapes[name] for name in names]
        return all(len(s) <= 1 or (len(s) == 2 and s[0] == BATCH_AXIS) for s in shapes)

    def temp(self, expr: sp.Expr, out: list, eq: str, phase: str) -> sp.Symbol:
        sym = sp.Symbol(f"t{self.temps}_")
        self.temps += 1
        self.shapes[sym.name] = shape_of(expr, self.shapes, self.model)
        out.append(Stmt(sym, expr, phase, eq))
        return sym

    # -- 1. hoisting ----------------------------------------------------------------
    def hoist(self, nodes) -> list:
        """Nodes with reductions and batch-reduction operands taken out into temporaries,
        each distinct one once in this list of nodes (a loop body is a list of its own)."""
        self.operands, self.reductions = {}, {}
        head: list = []   # up to the first gradient statement
        early: list = []  # operands of gradient statements that read no gradient: all first
        tail: list = []   # the gradient statements (section 4.4)
        first = next((i for i, n in enumerate(nodes) if n.phase == "gradients"), len(nodes))
        results = {n.target for n in nodes[first:] if isinstance(n, Stmt)} | \
            {a.target for n in nodes[first:] if isinstance(n, Loop) for a in n.accums + n.body}
        for index, node in enumerate(nodes):
            out = head if index < first else tail
            if isinstance(node, Loop):
                out.append(node)
                continue
            temps: list = []
            if self.width(self.shapes[node.target.name]) is not None:
                expr = self._hoist_reductions(node, temps)
            else:
                expr = self._hoist_arguments(node, temps)
            if index >= first:
                early += [t for t in temps if not t.expr.free_symbols & results]
                temps = [t for t in temps if t.expr.free_symbols & results]
            out += temps + [Stmt(node.target, expr, node.phase, node.eq)]
        return head + early + tail

    def _hoist_reductions(self, node: Stmt, out: list) -> sp.Expr:
        """K, K^T, <a, c>, ... inside a coordinate-wise right-hand side become temporaries."""
        expr = node.expr
        if not isinstance(expr, ELEMENTWISE):
            return expr  # the whole right-hand side is one reduction: nothing to fuse
        mapping = self.reductions

        def visit(e):
            if isinstance(e, ELEMENTWISE) or e.is_Number:
                for a in e.args:
                    visit(a)
            elif e not in mapping:
                mapping[e] = self.temp(e, out, f"{node.target} = {node.expr}", node.phase)

        visit(expr)
        return expr.xreplace(mapping)

    def _hoist_arguments(self, node: Stmt, out: list) -> sp.Expr:
        """Coordinate-wise whole-batch arguments of batch reductions (K^box, BSum: eq. 32-33)
        become statements, one per distinct expression: its first use puts it before
        every later one."""
        mapping = self.operands

        def visit(e):
            for a in e.args:
                if isinstance(e, BATCH_OPS) and not isinstance(a, _LEAVES) and a.free_symbols \
                        and self.width(shape_of(a, self.shapes, self.model)) is not None \
                        and _coordinatewise(a, self.transcendental):
                    if a not in mapping:
                        mapping[a] = self.temp(a, out, node.eq, node.phase)
                elif not isinstance(a, _LEAVES):
                    visit(a)

        visit(node.expr)
        return node.expr.xreplace(mapping)

    # -- 2. grouping and printing ------------------------------------------------------
    def run(self) -> list:
        nodes = self.hoist(self.program.stmts)
        return self.fuse(nodes, [e for _, e in self.program.outputs])

    def fuse(self, nodes: list, after: list) -> list:
        """nodes with each run of fusable statements replaced by one call; `after`: the
        expressions evaluated after these nodes (what decides which values are stored)."""
        used_later = self._readers(nodes, after)
        out, group = [], []
        for index, node in enumerate(nodes):
            if isinstance(node, Loop):  # Algorithm 4's loop over v_i: its body, fused alike
                later = [e for n in nodes[index + 1:] for e in self._exprs(n)] + after
                body = self.fuse(self.hoist(list(node.body)), [a.expr for a in node.accums] + later)
                node = replace(node, body=tuple(body))
            if self.fusable(node) and (not group or self.width(self.shapes[group[0][1].target.name])
                                       == self.width(self.shapes[node.target.name])):
                group.append((index, node))
                continue
            out += self.flush(group, used_later)
            group = [(index, node)] if self.fusable(node) else []
            if not group:
                out.append(node)
        out += self.flush(group, used_later)
        return out

    @staticmethod
    def _exprs(node) -> list:
        if isinstance(node, Stmt):
            return [node.expr]
        if isinstance(node, Loop):
            return [e for n in node.body for e in _Fuser._exprs(n)] + [a.expr for a in node.accums]
        return []  # a fused call: its operands were read before

    def _readers(self, nodes, after: list) -> dict[str, int]:
        """Symbol name -> index of the last node that reads it (len(nodes): read after)."""
        last = {}
        for index, node in enumerate(nodes):
            for e in self._exprs(node):
                for sym in sp.sympify(e).free_symbols:
                    last[sym.name] = index
        for e in after:
            for sym in sp.sympify(e).free_symbols:
                last[sym.name] = len(nodes)
        return last

    def flush(self, group: list, used_later: dict) -> list:
        if not group:
            return []
        stmts = [node for _, node in group]
        if len(stmts) == 1 and _operations(stmts[0].expr) < 2:
            return stmts  # one NumPy operator: nothing to fuse
        end = group[-1][0]
        defined = [s.target.name for s in stmts]
        stored = [name for name in defined if used_later.get(name, -1) > end]
        args = []
        for s in stmts:
            for sym in sorted(s.expr.free_symbols, key=lambda x: x.name):
                if sym.name not in defined and sym.name not in args:
                    args.append(sym.name)
        width = self.width(self.shapes[stmts[0].target.name])
        ref = next((a for a in args if self.width(self.shapes[a]) == width), None)
        if ref is None:
            return stmts  # no whole-batch operand to take the batch size from
        printer = FusedPrinter(self.model, self.shapes)
        lines = [(f"{n}_out = np.empty_like({ref})", None) for n in stored]
        lines.append((f"for i in range({ref}.shape[0]):", "samples"))
        lines.append((f"    for k in range({ref}.shape[1]):", "units"))
        for s in stmts:
            lines.append((f"        {s.target.name} = {printer.doprint(s.expr)}", f"{s.eq}"))
            printer.local.add(s.target.name)
            if s.target.name in stored:
                lines.append((f"        {s.target.name}_out[i, k] = {s.target.name}", None))
        returns = [f"{n}_out" for n in stored]
        key = (tuple(args), tuple(lines), tuple(returns))
        if key not in self.registry:  # programs share identical loops (forward, penalty, ...)
            self.registry[key] = f"_fused{len(self.registry)}"
            self.kernels.append({"name": self.registry[key], "args": args, "lines": lines,
                                 "returns": returns, "labels": stored})
        name = self.registry[key]
        eqs = "; ".join(dict.fromkeys(s.eq for s in stmts if s.eq))
        call = f"{name}({', '.join(args)})"
        return [Call(stored, call, f"fused loop: {', '.join(defined)}; {eqs}")]


@dataclass(frozen=True)
class Call:
    """A printed call of a fused kernel: targets = kernel(args)."""

    targets: list[str]
    call: str
    comment: str

    def code(self) -> str:
        if len(self.targets) == 1:
            return f"{self.targets[0]} = {self.call}[0]"
        return f"{', '.join(self.targets)} = {self.call}"


def schedule(model, program: Program, shapes: dict, transcendental: tuple, registry: dict):
    """(nodes, kernels, shapes): the program's top-level nodes with fused runs replaced by
    calls, the fused kernels (to be jitted) not already in `registry` (shared by the
    programs of one module), and shapes including the new temporaries."""
    fuser = _Fuser(model, program, shapes, transcendental, registry)
    nodes = fuser.run()
    return nodes, fuser.kernels, fuser.shapes
