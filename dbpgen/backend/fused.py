"""Lowerings `fused` and `jit`: whole-batch arrays, coordinate-wise runs in jitted loops.

`fused` prints the program as Python calling BLAS and the loops; `jit` prints the same
program as one @njit function (`lower(..., jit=True)`), where transcendental functions join
the loops as libm calls instead of staying NumPy ufuncs (NumPy is not at hand there), and
the loops are printed in the function itself (`inline`) unless they call a helper.

Between the GEMMs of a wide network (K, K^T, K^box: eq. 8, 16, 20, 30, 32), a program
evaluates coordinate-wise algebra: g_j, G'_j, G''_j (eq. 8-9), the M_j products (eq. 15,
21, 28) and the arguments of the weight adjoints (eq. 31-33). Printed as NumPy array
expressions, every operator makes a temporary the size of a layer and another pass over
memory. This schedule prints each run of consecutive coordinate-wise statements of the
same width as one jitted loop over (sample, unit): values that only that run reads stay
scalars, and only the ones later statements read are stored.

Nothing is derived here: the statements and their operands are the simplified program's.
Mechanical rewrites make runs longer: a reduction inside a coordinate-wise right-hand side
(K, K^T, <a, c>, softmax, ...) is evaluated first into a temporary; a coordinate-wise
argument of a batch reduction (K^box, BSum) becomes its own statement, printed once however
often it is used, right after the last value it reads (so it joins the loop that makes
that value); a batch sum (eq. 33, and the objective J) is accumulated inside the loop
instead of stored and summed. The two K^box of a dense layer become one GEMM over
batch-stacked operands, which the statements that make them write in place.
In `fused`, transcendental functions stay NumPy statements, each distinct application once
(`Lowering.share_transcendentals`): NumPy's SIMD ufuncs beat Numba's scalar libm calls
(see common.TRANSCENDENTAL). The vectorized ones (exp, log, tanh, ...) are shared the same
way and join the loops: mish's g'' repeats exp(z) eight times, its loop evaluates it once.
"""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import sympy as sp

from ..functable import helpers_needed
from ..functions import Bias, BSum, K, Kbox, KT
from ..program import Loop, Program, Stmt
from ..printer import CodegenError
from ..shapes import BATCH_AXIS, shape_of
from . import arrays
from .common import (B, BATCH_OPS, ELEMENTWISE, LEAVES as _LEAVES, PER_SAMPLE_OPS, Lowering, batch_sum_arg as _batch_sum,
                     Unsupported, columns as _columns, coordinatewise, elements, freeze,
                     operations as _operations)
from .schedule import OPEN, AddTo, Alloc, Call, For, Function, Int, Let, Rows, Shape, Store, elem, name, walk

LOOP_NAMES = {"i", "k", "c", "h", "w", "t"}  # the fused loops' own indices
i, k = name("i"), name("k")
SPACE_AXES = {1: ("t",), 2: ("h", "w")}  # an image's or a sequence's axes after the channel
# A loop over at most STACKED_VECTORS v_i (Jacobian rows, projections) runs as one pass over
# the batch stacked C times (`_Fuser.vectorize_loop`), or else stacks the operands of the
# weight adjoints it sums (`_Fuser.stack_loop`), as long as the stacked values hold at most
# STACKED_ELEMENTS numbers per sample (2^15: 256 KiB per sample in float64, about what a
# program of eight 1024-wide layers keeps per sample anyway).
STACKED_VECTORS = 16
STACK_ROWS = 1024
STACKED_ELEMENTS = 2 ** 15


def _coordinatewise(expr: sp.Expr, cheap_only: bool) -> bool:
    return coordinatewise(expr, cheap_only)


class _Fuser(Lowering):
    def __init__(self, model, program: Program, shapes: dict, registry: dict, jit: bool = False):
        super().__init__(model, program, shapes)
        self.registry = registry  # kernel (unnamed) -> name, shared by a module's programs
        self.jit = jit  # the program itself jitted (schedule `jit`)
        # Python's glue leaves transcendental functions to NumPy's SIMD ufuncs; in a jitted
        # program NumPy's ufuncs are not at hand, and they join the loops as libm calls
        self.transcendental = not jit
        self.kernels: list[Function] = []
        self.operands: dict = {}    # hoisted operand of a batch reduction -> its temporary
        self.reductions: dict = {}  # hoisted reduction -> its temporary
        self.placed: dict[str, sp.Expr] = {}  # value -> the half of a stacked buffer it is written to

    @staticmethod
    def width(shape):
        """What a fused loop over a whole-batch value runs over: n for a (B, n) value with
        n > 1, the non-batch shape (C, H, W) for an image (C, T for a sequence), else None."""
        if len(shape) - 2 in SPACE_AXES and shape[0] == BATCH_AXIS:
            return tuple(shape[1:])
        n = _columns(shape)
        return n if n != 1 else None

    def loop_width(self, node) -> int | None:
        """The width of the (sample, unit) loop a statement runs in: its target's, or for a
        batch sum t = BSum(a) (eq. 33), its argument's (the loop accumulates t[k]; a sum of
        per-sample scalars, such as the objective J, runs over (sample, 1))."""
        if _accumulates(node):  # an image's sums (over batch and space) stay whole-array helpers
            return _columns(shape_of(_batch_sum(node.expr), self.shapes, self.model))
        return self.width(self.shapes[node.target.name])

    def fusable(self, node) -> bool:
        if not isinstance(node, Stmt) or self.loop_width(node) is None:
            return False
        expr = _batch_sum(node.expr) if _accumulates(node) else node.expr
        if not _coordinatewise(expr, self.transcendental):
            return False
        names = {s.name for s in node.expr.free_symbols}
        if names & LOOP_NAMES or not names <= set(self.shapes):  # e.g. Algorithm 4's index i
            return False
        width = self.loop_width(node)
        if isinstance(width, tuple):  # an image: its own shape, per-sample scalars, biases per channel
            biases = {e.args[1].name for e in node.expr.atoms(Bias)}
            full = (BATCH_AXIS,) + width
            return all(self.shapes[n] in (full, (BATCH_AXIS, 1), (), (1,)) or n in biases for n in names)
        shapes = [self.shapes[name] for name in names]
        return all(len(s) <= 1 or (len(s) == 2 and s[0] == BATCH_AXIS) for s in shapes)

    def temp(self, expr: sp.Expr, out: list, eq: str, phase: str) -> sp.Symbol:
        sym = self.new_temp(expr)
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
            out += temps + [replace(node, expr=expr)]
        return self._interleave(head, early) + tail

    @staticmethod
    def _interleave(head: list, early: list) -> list:
        """Each early operand right after the last statement of head it reads: it then joins
        the loop that makes its operands (eta_j = G'_j gamma_j and the K^box and bias
        operands of layer j in one pass, eta_j not stored when nothing else reads it)."""
        defined = {}
        for index, node in enumerate(head):
            for target in ([a.target for a in node.accums] if isinstance(node, Loop) else [node.target]):
                defined[target] = index
        after: dict[int, list] = {}
        for temp in early:
            at = max((defined[s] for s in temp.expr.free_symbols if s in defined), default=-1)
            after.setdefault(at, []).append(temp)
        out = list(after.get(-1, []))
        for index, node in enumerate(head):
            out += [node] + after.get(index, [])
        return out

    def _hoist_reductions(self, node: Stmt, out: list) -> sp.Expr:
        """K, K^T, <a, c>, ... inside a coordinate-wise right-hand side become temporaries."""
        return self._reduced(node.expr, out, f"{node.target} = {node.expr}", node.phase)

    def _reduced(self, expr: sp.Expr, out: list, eq: str, phase: str) -> sp.Expr:
        if not isinstance(expr, ELEMENTWISE):
            return expr  # the whole right-hand side is one reduction: nothing to fuse
        return self.hoist_out(expr, lambda e: not (isinstance(e, ELEMENTWISE) or e.is_Number),
                          lambda e: self.temp(e, out, eq, phase), self.reductions)

    def _hoist_arguments(self, node: Stmt, out: list) -> sp.Expr:
        """Coordinate-wise whole-batch arguments of batch reductions (K^box, BSum: eq. 32-33)
        become statements, one per distinct expression: its first use puts it before
        every later one. A batch sum of one becomes a statement of its own, t = BSum(a),
        which a fused loop accumulates without storing a."""
        mapping = self.operands

        def operand(a) -> bool:
            return not isinstance(a, _LEAVES) and bool(a.free_symbols) \
                and self.width(shape_of(a, self.shapes, self.model)) is not None \
                and _coordinatewise(a, self.transcendental)

        def visit(e):
            for a in e.args:
                summed = _batch_sum(a)
                if summed is not None and isinstance(self.width(shape_of(summed, self.shapes, self.model)), tuple):
                    if operand(summed) and summed not in mapping:  # an image's sum: its operand only
                        mapping[summed] = self.temp(summed, out, node.eq, node.phase)
                elif summed is not None and (operand(summed) or isinstance(summed, sp.Symbol)
                                           and self.width(self.shapes[summed.name])) \
                        or isinstance(e, BATCH_OPS) and operand(a):
                    if a not in mapping:  # the whole batch sum, or an operand of K^box
                        mapping[a] = self.temp(a, out, node.eq, node.phase)
                elif isinstance(a, BSum) and a not in mapping and _columns(
                        shape_of(a.args[0], self.shapes, self.model)) == 1:
                    # a sum of per-sample scalars (J): their reductions first, then one loop
                    arg = self._reduced(a.args[0], out, f"{node.target} = {node.expr}", node.phase)
                    if _coordinatewise(arg, self.transcendental) and arg.free_symbols:
                        mapping[a] = self.temp(BSum(arg), out, node.eq, node.phase)
                elif not isinstance(a, _LEAVES):
                    visit(a)

        visit(node.expr)
        return node.expr.xreplace(mapping)

    def run(self) -> list:
        nodes = self.stack(self.hoist(self.share_transcendentals(self.program.stmts)))
        return self.fuse(nodes, [e for _, e in self.program.outputs])

    # -- 2. stacked weight adjoints ---------------------------------------------------------
    def stack(self, nodes: list) -> list:
        """dW = K^box(a, y) + K^box(c, u) of a dense layer (eq. 31-32) as one GEMM over the
        batch-stacked operands [a; c] and [y; u]: one product with twice the inner dimension
        instead of two and a pass over dW to add them. Each operand is written into its half
        where it is made (a fused loop, a K or K^T); anything else (an input) is copied.
        (The dense kernel splits the product again where the batch makes both halves small
        enough for BLAS's single-threaded kernels: chooser.SMALL_GEMM.)"""
        makers = {n.target.name: n for n in nodes if isinstance(n, Stmt)}
        inputs = {s.name for s in self.program.inputs}
        head, out = [], []
        for node in nodes:
            boxes = self._stackable(node, makers, inputs)
            if boxes is None:
                out.append(node)
                continue
            j = boxes[0].layer
            bufs = (f"S{j}x_", f"S{j}y_")
            for buf, operands in zip(bufs, ((boxes[0].args[1], boxes[1].args[1]),
                                            (boxes[0].args[2], boxes[1].args[2]))):
                width = self.shapes[operands[0].name][1]
                head.append(Alloc(buf, (2 * B, width), comment=f"[{operands[0]}; {operands[1]}] stacked over the batch"))
                for half, sym in zip((Rows(name(buf), OPEN, B), Rows(name(buf), B, OPEN)), operands):
                    self.placed[sym.name] = half
                    maker = makers.get(sym.name)
                    if maker is None or not self.fusable(maker) and not self.into_ok(maker):
                        out.append(self.copy(half, sym))
            out.append(Call((node.target.name,), "_dense_Kbox", (name(bufs[0]), name(bufs[1])), plain=True,
                            comment=f"{node.eq}, one GEMM over the stacked batch"))
        return head + out

    def vectorize_loop(self, loop: Loop, after: list) -> list | None:
        """The loop over the C vectors v_i (section 5.4: C double backpropagations, or
        Algorithm 4's backward and backward-backward passes per v_i) over blocks of c of
        them, each block one pass over the batch stacked c times: rows [i B, (i + 1) B) hold
        v_i's iteration. v_L = e_i becomes the block's stacked unit vectors (_onehots),
        given directions rows of their stack, and every per-sample value the body reads
        from before the loop is tiled c times once (_tile). Each K, K^T is then one product
        over c B rows instead of c products, each statement one call instead of c; what the
        loop sums, a weight adjoint K^box over the block's rows (the GEMM sums over its
        i) or the sum of its c blocks of rows (_blocksum_add). c = STACK_ROWS // B at run
        time, between 1 and C: stacked past about a thousand rows the passes leave the
        caches and cost more than the calls they save (64-wide layers, float64: 0.95 of
        the loop's time at 1024 rows, 1.25 at 2048). None where it does not apply: a jitted
        program, more than STACKED_VECTORS vectors or STACKED_ELEMENTS numbers per sample
        in the stacked values, or a body that reads the loop index or the batch size
        otherwise."""
        from ..functions import OneHot, Row
        from ..program import BATCH

        C, index = loop.count, loop.index
        if self.jit or C > STACKED_VECTORS or not all(isinstance(n, Stmt) for n in loop.body):
            return None
        head, inner, mapping, stacks = [], [], {}, {}
        block, first = name("c_"), name("i0_")
        rows = lambda a: Rows(a, first * B, (first + block) * B)  # noqa: E731  the block's rows
        for f in {f for n in loop.body for f in sp.preorder_traversal(n.expr) if isinstance(f, (OneHot, Row))}:
            if isinstance(f, OneHot) and f.args[0] == index:  # made per block: c B rows, not C B
                mapping[f] = self.new_temp(f)
                inner.append(Call((mapping[f].name,), "_onehots", (name("x0"), Int(sp.Integer(C)), first, block),
                                  plain=True, comment=f"{f} for the block's i, stacked"))
                stacks[mapping[f]] = None
                continue
            elif isinstance(f, Row) and f.args[1] == index and isinstance(f.args[0], sp.Symbol):
                whole = self.new_temp(f)
                head.append(Call((whole.name,), "_stack_rows", (f.args[0],), plain=True,
                                 comment=f"{f} for i = 0..{C - 1}, stacked"))
            else:
                return None
            mapping[f] = self.new_temp(f)
            stacks[mapping[f]] = whole
        if not stacks:
            return None
        defined = {n.target.name for n in loop.body}
        read = {x for n in loop.body for x in n.expr.free_symbols} | {x for a in loop.accums for x in a.expr.free_symbols}
        per_sample = lambda x: self.shapes.get(x.name, ())[:1] == (BATCH_AXIS,)  # noqa: E731
        tiles = {}
        for x in sorted(read, key=lambda x: x.name):
            if x.name not in defined and per_sample(x):
                tiles[x] = self.new_temp(x)
                mapping[x] = self.new_temp(x)
        numbers = lambda x: int(np.prod([d for d in self.shapes[x.name][1:]], dtype=np.int64))  # noqa: E731
        stacked = [n.target for n in loop.body if per_sample(n.target)] + list(mapping.values())
        if C * sum(numbers(x) for x in stacked) > STACKED_ELEMENTS:
            return None
        body = []
        for n in loop.body:
            expr = n.expr.xreplace(mapping)
            if expr.has(index) or expr.has(BATCH):
                return None
            body.append(replace(n, expr=expr))
        sums, boxes = [], []
        for acc in loop.accums:
            expr = acc.expr.xreplace(mapping)
            if expr.has(index) or expr.has(BATCH):
                return None
            if isinstance(expr, Kbox):  # summed over the block's rows by the product itself
                args = [a if isinstance(a, sp.Symbol) else self.temp(a, body, acc.eq, body[-1].phase)
                        for a in expr.args[1:]]
                boxes.append((acc, Kbox(expr.args[0], *args)))
            elif per_sample(acc.target):
                if not isinstance(expr, sp.Symbol):
                    expr = self.temp(expr, body, acc.eq, body[-1].phase)
                sums.append((acc, expr))
            else:
                return None
        head.append(Call((block.name,), "_blocks", (B, Int(sp.Integer(C)), Int(sp.Integer(STACK_ROWS))), plain=True,
                         comment=f"vectors per block: {STACK_ROWS} // B rows, at most {C}"))
        for x, whole in tiles.items():
            head.append(Call((whole.name,), "_tile", (x, block), plain=True, comment=f"{x}, c_ times"))
        head += [Alloc(acc.target.name, arrays.batch_dims(self.shapes[acc.target.name]), zero=True,
                       comment=f"sum over {index}") for acc in loop.accums]
        for sym, whole in stacks.items():
            if whole is not None:
                inner.append(Let(sym.name, rows(name(whole.name)), f"the block's rows of {whole}"))
        ref = name(next(iter(stacks)).name)
        for x, whole in tiles.items():
            inner.append(Let(mapping[x].name, Rows(name(whole.name), OPEN, Shape(ref, 0)), f"{x}, the block's copies"))
        later = [e for _, e in sums] + [e for _, e in boxes] + after
        inner += arrays.statements(self.fuse(self.hoist(body), later), self.shapes)
        inner += [AddTo(name(acc.target.name), box, f"{acc.eq}, one GEMM over the block's rows") for acc, box in boxes]
        inner += [Call((), "_blocksum_add", (value, B, name(acc.target.name)),
                       comment=f"{acc.eq}: the sum of the block's c blocks") for acc, value in sums]
        return head + [For(first.name, sp.Integer(C), tuple(inner), step=block, comment=f"{loop.eq}, c_ vectors at a time")]

    def accumulated_values(self, loop: Loop) -> tuple[Loop, list]:
        """A coordinate-wise sum over the loop, eta += x*(h*xi - ...) (App. B.1 summed over i),
        as a statement of the body, t = x*(h*xi - ...), that a fused loop computes with the
        body's other coordinate-wise statements (its reductions taken out first), and
        eta += t: one pass instead of a NumPy temporary per operation."""
        body, accums = list(loop.body), []
        for acc in loop.accums:
            if not isinstance(acc.expr, sp.Symbol) and isinstance(acc.expr, ELEMENTWISE) \
                    and self.width(self.shape(acc.expr)) is not None and body:
                acc = replace(acc, expr=self.temp(acc.expr, body, acc.eq, body[-1].phase))
            accums.append(acc)
        return replace(loop, accums=tuple(accums)), body

    def stack_loop(self, loop: Loop, body: list) -> tuple[list, list, list]:
        """A weight adjoint the loop over v_i sums, theta += K^box(a_i, y_i) (eq. 31 summed
        over i, section 5.4), as one GEMM after the loop over the operands of every i stacked
        in blocks of rows, [a_1; ...; a_C] and [y_1; ...; y_C]: each written into its block
        where it is made. C products of inner dimension B and C passes adding them to theta
        become one product of inner dimension C B: at batch 1 a product of rank C instead of
        C outer products. At most STACKED_VECTORS blocks, STACKED_ELEMENTS numbers per sample
        (the buffers hold C B rows of each operand). Returns (body, allocations before the
        loop, products after it)."""
        if self.jit or loop.count > STACKED_VECTORS:
            return body, [], []
        makers = {n.target.name: n for n in body if isinstance(n, Stmt)}
        head, tail, budget = [], [], STACKED_ELEMENTS
        for acc in loop.accums:
            box = acc.expr
            if not isinstance(box, Kbox) or not self.model.layers[box.layer - 1].op.stacked_kbox:
                continue
            operands = list(box.args[1:])
            if any(not {x.name for x in o.free_symbols} & set(makers) or loop.index in o.free_symbols
                   for o in operands):
                continue  # an operand the same for every i (summed once: hoist_invariant_adjoints)
            if any(isinstance(o, sp.Symbol) and (o.name in self.placed or o.name not in makers) for o in operands) \
                    or operands[0] == operands[1]:
                continue
            bufs = (f"V{box.layer}x_", f"V{box.layer}y_")  # one K^box per layer (merge_weight_adjoints)
            size = loop.count * sum(self.shape(o)[1] for o in operands)
            if any(isinstance(a, Alloc) and a.target == bufs[0] for a in head) or size > budget:
                continue
            budget -= size
            syms = []
            for o in operands:  # an expression (2 zeta_1) becomes a statement of the body
                syms.append(o if isinstance(o, sp.Symbol) else self.temp(o, body, acc.eq, body[-1].phase))
            makers.update({n.target.name: n for n in body if isinstance(n, Stmt)})
            for buf, sym in zip(bufs, syms):
                width = self.shapes[sym.name][1]
                head.append(Alloc(buf, (loop.count * B, width), comment=f"{sym} of every {loop.index}, stacked"))
                block = Rows(name(buf), loop.index * B, (loop.index + 1) * B)
                self.placed[sym.name] = block
                maker = makers[sym.name]
                if not self.fusable(maker) and not self.into_ok(maker):
                    body.insert(body.index(maker) + 1, self.copy(block, sym))
            tail.append(Call((acc.target.name,), "_dense_Kbox", (name(bufs[0]), name(bufs[1])), plain=True,
                             comment=f"{acc.eq}, one GEMM over the stacked {loop.index}"))
        return body, head, tail

    def _stackable(self, node, makers: dict, inputs: set):
        if not isinstance(node, Stmt) or node.phase != "gradients" or not node.expr.is_Add \
                or len(node.expr.args) != 2:
            return None
        boxes = node.expr.args
        if not all(isinstance(b, Kbox) for b in boxes) or boxes[0].layer != boxes[1].layer \
                or not self.model.layers[boxes[0].layer - 1].op.stacked_kbox:
            return None
        operands = [a for b in boxes for a in b.args[1:]]
        if not all(isinstance(a, sp.Symbol) and a.name not in self.placed
                   and (a.name in makers or a.name in inputs) for a in operands) \
                or len(set(operands)) != 4:
            return None
        return boxes

    # -- 3. grouping and printing ------------------------------------------------------
    def fuse(self, nodes: list, after: list) -> list:
        """nodes with each run of fusable statements replaced by one call; `after`: the
        expressions evaluated after these nodes (what decides which values are stored)."""
        used_later = self._readers(nodes, after)
        out, group = [], []
        for index, node in enumerate(nodes):
            if isinstance(node, Loop):  # Algorithm 4's loop over v_i: its body, fused alike
                later = [e for n in nodes[index + 1:] for e in self._exprs(n)] + after
                blocks = self.vectorize_loop(node, later)
                if blocks is not None:  # the C iterations in blocks of stacked rows
                    out += self.flush(group, used_later) + blocks
                    group = []
                    continue
                node, body = self.accumulated_values(node)
                body, head, tail = self.stack_loop(node, self.hoist(body))
                stacked = {t.targets[0] for t in tail}
                node = replace(node, accums=tuple(a for a in node.accums if a.target.name not in stacked))
                body = self.fuse(body, [a.expr for a in node.accums] + later)
                node = replace(node, body=tuple(body))
                if head:
                    out += self.flush(group, used_later) + head + [node] + tail
                    group = []
                    continue
            if self.fusable(node) and (not group or (
                    self.loop_width(group[0][1]) == self.loop_width(node)
                    and not node.expr.free_symbols & {n.target for _, n in group if _accumulates(n)})):
                group.append((index, node))
                continue
            out += self.flush(group, used_later)
            group = [(index, node)] if self.fusable(node) else []
            if not group:
                out.append(self.into(node) if isinstance(node, Stmt) and node.target.name in self.placed
                           and self.into_ok(node) else node)
        out += self.flush(group, used_later)
        return out

    @staticmethod
    def _exprs(node) -> list:
        if isinstance(node, Stmt):
            return [node.expr]
        if isinstance(node, Store):
            return [node.value]
        if isinstance(node, Call):
            return list(node.args)
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

    def copy(self, half, value):
        """value copied into its half of a stacked buffer: a slice assignment in Python, a
        jitted loop in a jitted program (Numba's slice assignment compiles its shape-mismatch
        message, seconds of LLVM)."""
        if self.jit:
            return Call((), "_copy_into", (value, half), comment="copied into its half")
        return Store(half, value, "copied into its half")

    def into_ok(self, node: Stmt) -> bool:
        """A dense K or K^T, which BLAS can write into a given array (_dense_K*_into)."""
        return isinstance(node.expr, (K, KT)) and len(node.expr.args) == 3 \
            and self.model.layers[node.expr.layer - 1].op.stacked_kbox

    def into(self, node: Stmt) -> Call:
        """A K or K^T whose value goes into a stacked buffer, written there by BLAS."""
        theta, array = node.expr.args[1:]
        helper = "_dense_K_into" if isinstance(node.expr, K) else "_dense_KT_into"
        return Call((node.target.name,), helper, (theta, array, self.placed[node.target.name]), plain=True,
                    comment=node.eq, into=(node.target.name,))

    def flush(self, group: list, used_later: dict) -> list:
        if not group:
            return []
        stmts = [node for _, node in group]
        if len(stmts) == 1 and _operations(stmts[0].expr) < 2 \
                and stmts[0].target.name not in self.placed:
            return stmts  # one NumPy operator: nothing to fuse
        end = group[-1][0]
        defined = [s.target.name for s in stmts]
        sums = {s.target.name for s in stmts if _accumulates(s)}
        stored = [name for name in defined
                  if name in sums or name in self.placed or used_later.get(name, -1) > end]
        if not stored:  # nothing of it is read again (an unsimplified program's dead g''): no loop
            return []
        args = []
        for s in stmts:
            for sym in sorted(s.expr.free_symbols, key=lambda x: x.name):
                if sym.name not in defined and sym.name not in args:
                    args.append(sym.name)
        width = self.loop_width(stmts[0])
        ref = next((a for a in args if self.shapes[a][:1] == (BATCH_AXIS,)
                    and (self.width(self.shapes[a]) or _columns(self.shapes[a])) == width), None)
        if ref is None:  # no whole-batch operand to take the batch size from
            return stmts + [self.copy(self.placed[s.target.name], s.target)
                            for s in stmts if s.target.name in self.placed]
        given = [n for n in stored if n in self.placed]  # written into a stacked buffer
        values = [name(a) for a in args] + [self.placed[n] for n in given]  # what the call passes
        # the kernel's own names carry no layer index, so that the loops of layers of one
        # shape print alike and share one kernel: LLVM work bounded by distinct loops, not depth
        image = isinstance(width, tuple)  # loops over (sample, channel, space) instead of (sample, unit)
        axes = ("i", "c") + SPACE_AXES[len(width) - 1] if image else ("i", "k")
        local = _local_names(args + defined, axes)
        shapes = {local[n]: self.shapes[n] for n in local if n in self.shapes}
        renamed = {sym: sp.Symbol(local[sym.name]) for st in stmts for sym in st.expr.free_symbols
                   if local.get(sym.name, sym.name) != sym.name}
        params = [local[a] for a in args] + [f"{local[n]}_out" for n in given]
        ref = name(local[ref])
        scalars: set[str] = set()  # values of this loop held in scalars
        biases = {local[e.args[1].name] for st in stmts for e in st.expr.atoms(Bias)}

        def element(sym):
            if sym.name in scalars:
                return None
            shape = shapes.get(sym.name, ())
            if image and sym.name in biases:  # b_j of a conv layer, one number per channel
                return elem(sym.name, name("c"))
            if image and len(shape) == len(axes):
                return elem(sym.name, *map(name, axes))
            if len(shape) == 2 and shape[0] == BATCH_AXIS:
                return elem(sym.name, i, 0 if shape[1] == 1 else k)
            if len(shape) == 1:
                return elem(sym.name, 0 if shape[0] == 1 else k)
            if shape:
                raise CodegenError(f"cannot index {sym} of shape {shape} per coordinate")
            return None

        body = [Alloc(f"{local[n]}_out", (Shape(ref, 1),), zero=True) if n in sums
                else Alloc(f"{local[n]}_out", tuple(Shape(ref, a) for a in range(len(axes))))
                for n in stored if n not in given]
        inner = []
        for st in stmts:
            target, expr = local[st.target.name], st.expr.xreplace(renamed)
            if st.target.name in sums:  # a batch sum (eq. 33): accumulated, never stored per sample
                inner.append(AddTo(elem(f"{target}_out", k), elements(_batch_sum(expr), element), st.eq))
                continue
            inner.append(Let(target, elements(expr, element), st.eq))
            scalars.add(target)
            if st.target.name in stored:
                inner.append(Store(elem(f"{target}_out", *map(name, axes)), name(target)))
        comments = {"i": "samples", "k": "units", "c": "channels"}
        for axis in reversed(axes):
            inner = [For(axis, Shape(ref, axes.index(axis)), inner, scalar=axis == "i",
                         comment=comments.get(axis, ""))]
        body += inner
        returns = tuple(name(f"{local[n]}_out") for n in stored)
        kernel = freeze(Function("", tuple(params), body, returns, tuple(local[n] for n in stored), decorator="njit"))
        if kernel not in self.registry:  # programs share identical loops (forward, penalty, ...)
            self.registry[kernel] = _next_name(self.registry)
            self.kernels.append(replace(kernel, name=self.registry[kernel]))
        eqs = "; ".join(dict.fromkeys(s.eq for s in stmts if s.eq))
        return [Call(tuple(stored), self.registry[kernel], tuple(values),
                     comment=f"fused loop: {', '.join(defined)}; {eqs}", into=tuple(given))]


def _next_name(registry: dict) -> str:
    """A kernel name no kernel of the registry has (names of kernels a jitted program
    printed inline and took out of the registry may be given again)."""
    used = {int(n[len("_fused"):]) for n in registry.values()}
    return f"_fused{max(used, default=-1) + 1}"


def _local_names(names: list[str], axes) -> dict[str, str]:
    """Names inside a fused kernel: the program's without digits (z3 -> z, t12_ -> t),
    numbered where two would meet (x2, x3 -> x, x_1); the loop's variables stay free."""
    out, taken = {}, set(axes) | {"math"}
    for given in names:
        stem = re.sub(r"\d+", "", given).rstrip("_") or "a"
        new, n = stem, 0
        while new in taken:
            n += 1
            new = f"{stem}_{n}"
        taken.add(new)
        out[given] = new
    return out


def _accumulates(node) -> bool:
    """t = BSum(a): a batch sum of a (B, n) value that a fused loop accumulates."""
    return isinstance(node, Stmt) and _batch_sum(node.expr) is not None


def lower(model, program: Program, shapes: dict, registry: dict, jit: bool = False) -> tuple[Function, list[Function]]:
    """(entry, kernels): the program over whole-batch arrays with fused runs as calls, and
    the fused kernels not already in `registry` (shared by a module's programs). The entry
    is plain Python (schedule `fused`), or with `jit` one jitted function (schedule `jit`):
    no interpreter between its statements, every transcendental function in the loops."""
    fuser = _Fuser(model, program, shapes, registry, jit)
    nodes = fuser.run()
    zeros, values = arrays.returns(program, fuser.shapes)
    body = arrays.statements(nodes, fuser.shapes)
    entry = arrays.function(program, body, fuser.shapes, "njit" if jit else "", zeros, values)
    if not jit:
        return entry, fuser.kernels
    # loops that call a vectorized helper (_tanh1, ...) stay functions of their own: with the
    # helper called from several loops of one function LLVM no longer inlines it, and the
    # loop is not vectorized (measured: a tanh network's call 1.8 times slower)
    inlined = {n: replace(k, name=n) for k, n in registry.items() if not _calls_helpers(k)}
    for kernel in fuser.kernels:
        if kernel.name in inlined:  # printed inline only: a later program prints it anew
            del registry[replace(kernel, name="")]
    kept = [k for k in fuser.kernels if k.name not in inlined]
    shapes = dict(fuser.shapes)
    body = array_loops(inline(entry.body, inlined), shapes, model)
    return replace(entry, body=tuple(body), shapes=tuple(shapes.items())), kept


def _calls_helpers(kernel: Function) -> bool:
    """Whether a kernel's loop calls a module helper (a vectorized polynomial, _erf, ...)."""
    return any(helpers_needed(sp.sympify(v), True) for node in walk(kernel.body)
               for v in (getattr(node, "value", None),) if v is not None)


# -- jit: the fused loops printed in the program itself -------------------------------------
# Numba compiles every jitted function on its own and then links and optimises it again
# into each jitted caller: a jitted program calling ten fused loops compiles each loop
# twice, and pays Numba's fixed cost per function ten times more. Printed inline, each loop
# is compiled once, in the program: measured, a 3-layer ReLU value_and_grad's first call
# took 7.0 s instead of 10.4 s, and a call was no slower. A kernel that cannot be printed
# inline raises Unsupported: the chooser then takes another schedule.


def inline(nodes, kernels: dict, sites: list | None = None, taken: set | None = None) -> list:
    """nodes with each call of one of `kernels` replaced by the kernel's body: its
    parameters are the call's arguments (a view of a stacked buffer bound to a name first),
    its own names numbered per call site, and the call's targets its returned arrays."""
    sites = [] if sites is None else sites
    taken = _defined(nodes, calls=True) if taken is None else taken
    out = []
    for node in nodes:
        if isinstance(node, For):
            out.append(replace(node, body=tuple(inline(node.body, kernels, sites, taken))))
            continue
        kernel = kernels.get(node.function) if isinstance(node, Call) else None
        if kernel is None:
            out.append(node)
            continue
        sites.append(node)
        suffix = f"_{len(sites)}"
        # the arrays the loop returns are the call's targets; its scalars are numbered
        mapping = {str(r): t for r, t in zip(kernel.returns, node.targets)}
        bound = []
        for param, arg in zip(kernel.params, node.args):
            if isinstance(arg, sp.Symbol):
                if param in mapping:
                    raise Unsupported(f"{node.function} returns its argument {arg}: cannot inline it")
                mapping[param] = arg.name
            else:  # a block of rows of a stacked buffer, which the loop writes
                mapping.setdefault(param, param + suffix)
                bound.append(Let(mapping[param], arg, "its half of a stacked buffer"))
        for local in sorted(_defined(kernel.body)):
            if local not in mapping:
                mapping[local] = local + suffix
                while mapping[local] in taken:
                    mapping[local] += "_"
                taken.add(mapping[local])
        body = bound + [_renamed(n, mapping) for n in kernel.body]
        body[0] = _commented(body[0], node.comment)
        out += body
    return out


def _defined(nodes, calls: bool = False) -> set[str]:
    """The names nodes define (arrays and scalars; not loop variables), with `calls` the
    targets of calls too."""
    names = set()
    for node in nodes:
        if isinstance(node, (Alloc, Let)):
            names.add(node.target)
        elif isinstance(node, For):
            names |= _defined(node.body, calls)
        elif calls and isinstance(node, Call):
            names |= set(node.targets)
    return names


def _rename_expr(expr, mapping: dict):
    expr = sp.sympify(expr)
    bases = {b: sp.IndexedBase(mapping[str(b.label)], real=True) for b in expr.atoms(sp.IndexedBase)
             if str(b.label) in mapping}
    expr = expr.xreplace(bases) if bases else expr
    return expr.replace(lambda e: isinstance(e, sp.Symbol) and e.name in mapping,
                        lambda e: name(mapping[e.name]))


def _renamed(node, mapping: dict):
    if isinstance(node, Alloc):
        return replace(node, target=mapping.get(node.target, node.target),
                       shape=tuple(_rename_expr(d, mapping) for d in node.shape))
    if isinstance(node, Let):
        return replace(node, target=mapping.get(node.target, node.target), value=_rename_expr(node.value, mapping))
    if isinstance(node, (Store, AddTo)):
        return replace(node, target=_rename_expr(node.target, mapping), value=_rename_expr(node.value, mapping))
    if isinstance(node, For):
        return replace(node, stop=_rename_expr(node.stop, mapping), start=_rename_expr(node.start, mapping),
                       body=tuple(_renamed(n, mapping) for n in node.body))
    raise Unsupported(f"cannot inline {node!r}")


def _commented(node, comment: str):
    return replace(node, comment=f"{comment}; {node.comment}" if node.comment else comment)


# -- jit: array statements left over as loops -------------------------------------------------
# Numba compiles every whole-array expression of a jitted function ((x4 - y)**2, dg3*xi3) as
# a kernel of its own, with broadcasting over any strides: about 0.25 s each on the first
# call, optimized, where a loop over the same elements takes 0.1 s. The coordinate-wise
# statements no fused loop took (one operator, a statement in Algorithm 4's loop, an
# accumulation over its rows, an operand of a reduction) are printed as loops instead.
REDUCTIONS = PER_SAMPLE_OPS + BATCH_OPS


def array_loops(nodes, shapes: dict, model, taken: set | None = None, outer: frozenset = frozenset()) -> list:
    """nodes with each coordinate-wise statement or accumulation over whole arrays a loop
    over their elements, and each coordinate-wise operand of a reduction (RowSum, K^box, ...)
    a loop of its own first; `shapes` gets the operands' temporaries."""
    taken = _defined(nodes, calls=True) | set(shapes) if taken is None else taken
    out = []
    for node in nodes:
        if isinstance(node, For):
            out.append(replace(node, body=tuple(array_loops(node.body, shapes, model, taken, outer | {node.var}))))
            continue
        if isinstance(node, (Let, AddTo)):
            node = _operands_first(node, shapes, model, taken, outer, out)
            loop = _reductions_out(node, shapes, model, taken, outer)
            if loop is not None:
                out += loop
                continue
        out.append(node)
    return out


def _reductions_out(node, shapes: dict, model, taken: set, outer: frozenset) -> list | None:
    """node as a loop, with each reduction in its value (K^box, K, ...) a statement of its own
    first (a whole reduction assigned stays a statement), or None where it is not one."""
    target = node.target if isinstance(node, Let) else getattr(node.target, "name", None)
    value = sp.sympify(node.value)
    reductions = [e for e in sp.preorder_traversal(value) if isinstance(e, REDUCTIONS)]
    if isinstance(node, Let) and isinstance(value, REDUCTIONS) \
            or any(r.has(*REDUCTIONS) for e in reductions for r in e.args):
        return None
    temps, first = {}, []
    for e in dict.fromkeys(reductions):
        shape = _shape(e, shapes, model)
        if shape is None:
            return None
        temps[e] = _fresh(f"{target}r", taken)
        first.append((temps[e], e, shape))
    local = dict(shapes, **{t: shape for t, _, shape in first})
    loop = _loop(target, value.xreplace({e: name(t) for e, t in temps.items()}), shapes.get(target), local,
                 outer, isinstance(node, AddTo))
    if loop is None:
        return None
    shapes.update(local)
    return [Let(t, e) for t, e, _ in first] + [replace(loop[0], comment=node.comment)] + loop[1:]


def _operands_first(node, shapes: dict, model, taken: set, outer: frozenset, out: list):
    """node with each coordinate-wise operand of a reduction in its value computed by a loop
    appended to out first."""
    value = sp.sympify(node.value)
    if not value.has(*REDUCTIONS):
        return node

    def operands(e):
        args = []
        for arg in e.args:
            if not isinstance(arg, _LEAVES) and arg.free_symbols and coordinatewise(arg):
                shape = _shape(arg, shapes, model)
                temp = _fresh(f"{node.target}a", taken)
                loop = _loop(temp, arg, shape, shapes, outer)
                if loop is not None:
                    shapes[temp] = shape
                    out.extend(loop)
                    args.append(name(temp))
                    continue
            args.append(arg)
        return e.func(*args)

    return replace(node, value=value.replace(lambda e: isinstance(e, REDUCTIONS), operands))


def _fresh(stem: str, taken: set) -> str:
    new = re.sub(r"\W", "", stem)
    while new in taken:
        new += "_"
    taken.add(new)
    return new


def _shape(expr, shapes: dict, model):
    try:
        return shape_of(expr, shapes, model)
    except Exception:  # noqa: BLE001 - a shape the rules do not know: no loop
        return None


def _loop(target: str | None, expr: sp.Expr, shape, shapes: dict, outer: frozenset, add: bool = False) -> list | None:
    """[Alloc, For] computing target = expr element by element (with add: [For] adding expr
    to target), or None where expr is not a coordinate-wise function of arrays of target's
    shape, broadcast columns and rows (of a (B, n) target), and scalars. Any rank up to
    (B, C, H, W): a whole-array product of two 4-d arrays alone takes Numba 9 s to compile."""
    if target is None or shape is None or not 1 <= len(shape) <= 4 or not add and isinstance(expr, _LEAVES) \
            or not coordinatewise(expr) or expr.atoms(Bias) or not add and name(target) in expr.free_symbols:
        return None
    axes = [a for a in ("i", "k", "i_", "k_", "i__", "k__") if a not in outer][:len(shape)]
    index = [name(a) for a in axes]
    whole = None  # an operand of target's own shape, whose sizes a new target takes
    mapping = {}
    for sym in sorted(expr.free_symbols, key=lambda s: s.name, reverse=True):  # whole: the first by name
        if sym.name in outer:
            continue  # an index of an enclosing loop
        if sym.name not in shapes and sym.name != "B":
            return None
        s = tuple(shapes.get(sym.name, ()))
        if not s:
            continue  # a scalar
        if s == tuple(shape):
            mapping[sym] = elem(sym.name, *index)
            whole = sym
        elif s == (1,):
            mapping[sym] = elem(sym.name, 0)
        elif len(shape) == 2 and shape[0] == BATCH_AXIS and s == (BATCH_AXIS, 1):
            mapping[sym] = elem(sym.name, index[0], 0)
        elif len(shape) == 2 and len(s) == 1 and s[0] == shape[1]:
            mapping[sym] = elem(sym.name, index[1])
        else:
            return None
    if whole is None:
        return None
    value = expr.xreplace(mapping)
    body = [AddTo(elem(target, *index), value) if add else Store(elem(target, *index), value)]
    for axis in reversed(range(len(shape))):
        body = [For(axes[axis], Shape(name(target), axis), tuple(body), scalar=axis == 0)]
    if add:
        return body
    return [Alloc(target, tuple(Shape(name(whole.name), a) for a in range(len(shape))))] + body
