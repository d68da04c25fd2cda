"""Peak bytes of a program as it runs: liveness over its schedule's entry function.

Every array the entry function makes (an allocation, a statement's value, a kernel's
results) is live from where it is made to its last read; views of a workspace cost
nothing of their own. A loop is laid out once: what it makes dies at the end of an
iteration, and what it reads from outside stays live to its end. A whole-array statement
with more than one operation makes one unnamed temporary of its size while it runs (NumPy
evaluates a * b + c as t = a * b; t + c). A plain Python function frees an array where
the schedule says `del` (at its last read), a jitted one at its last read. An operator's
kernel adds what it holds while it runs (`workspace`: a convolution's im2col buffer and
padded copy, one chunk of the batch) to the statement that applies it. Inputs and parameters are not counted.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..functions import K, Kbox, KT
from ..ir import Model
from .common import B, LEAVES, operations
from .schedule import AddTo, Alloc, Call, For, Let, Shape, Store, View, _reads


def _size(shape, batch: int) -> int:
    n = 1
    for d in shape:
        if d == "B":
            n *= batch
        else:
            value = sp.sympify(d).xreplace({B: sp.Integer(batch)})
            if value.has(Shape) or not value.is_Number:
                return 0  # a size only known at run time inside a kernel
            n *= int(value)
    return n


KERNELS = {K: "K", KT: "KT", Kbox: "Kbox"}


def _workspace(value, layers: dict, batch: int) -> int:
    """The largest workspace (numbers) of the operator kernels a statement applies: they
    run one at a time, each freeing its buffers before it returns."""
    sizes = [0]
    for sub in sp.preorder_traversal(value):
        which = KERNELS.get(type(sub))
        if which is not None:
            layer = layers[sub.layer]
            sizes.append(layer.op.workspace(which, layer.in_shape, batch))
    return max(sizes)


def _events(nodes, shapes: dict, batch: int, itemsize: int, layers: dict):
    """(position, defined {name: bytes}, read names, extra bytes during it), in order."""
    events = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, For):
                start = len(events)
                events.append((start, {}, set(), 0))
                visit(node.body)
                inner = set().union(*(set(d) for _, d, _, _ in events[start:]))
                outer = set().union(*(r for _, _, r, _ in events[start:])) - inner
                events.append((len(events), {}, outer | _reads(node.stop), 0))
                continue
            defined, reads, extra = {}, set(), 0
            if isinstance(node, Alloc):
                defined[node.target] = _size(node.shape, batch) * itemsize
            elif isinstance(node, View):
                defined[node.target] = 0
                reads.add(node.base)
            elif isinstance(node, Let):
                size = _size(shapes.get(node.target, ()), batch) * itemsize
                defined[node.target] = size
                reads |= _reads(node.value)
                if operations(node.value) > 1 and not isinstance(node.value, LEAVES):
                    extra = size
                extra += _workspace(node.value, layers, batch) * itemsize
            elif isinstance(node, (Store, AddTo)):
                reads |= _reads(node.value) | _reads(node.target)
            elif isinstance(node, Call):
                for t in node.targets:
                    defined[t] = 0 if t in node.into else _size(shapes.get(t, ()), batch) * itemsize
                for a in node.args:
                    reads |= _reads(a)
            events.append((len(events), defined, reads, extra))

    visit(nodes)
    return events


def peak_bytes(model: Model, lowered, batch: int) -> int:
    """The largest number of bytes the entry function holds at once, at a batch size."""
    fn = lowered.entry
    shapes = fn.array_shapes()
    itemsize = np.dtype(model.dtype).itemsize
    events = _events(fn.body, shapes, batch, itemsize, {layer.index: layer for layer in model.layers})
    end = len(events)
    returned = set().union(*(_reads(r) for r in fn.returns)) if fn.returns else set()
    first, last, size = {}, {}, {}
    for pos, defined, reads, _ in events:
        for name_, nbytes in defined.items():
            if name_ not in first:
                first[name_], size[name_] = pos, nbytes
        for r in reads:
            last[r] = pos
    for r in returned:
        last[r] = end
    live = [0] * (end + 1)
    for name_, start in first.items():
        for pos in range(start, last.get(name_, start) + 1):
            live[pos] += size[name_]
    for pos, _, _, extra in events:
        live[pos] += extra
    return max(live, default=0)
