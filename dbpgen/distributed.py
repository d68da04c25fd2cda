"""Dataset-sized gradients on Dask: an emitted module's value_and_grad across workers.

    from dbpgen.distributed import value_and_grad
    J, grads = value_and_grad(m, params, x, y)      # x, y: Dask arrays chunked by samples

J = (1/N) sum_i [l_i + weight R_i] is a mean over samples, so N J and N dJ/dtheta are sums
of per-chunk sums: each chunk's task runs the module's own value_and_grad on its samples
and returns n_chunk * (J_chunk, grads_chunk) as one flat vector; Dask adds those vectors in
a tree (`sum(split_every=...)` of a Dask array, one row per chunk) and the client divides
by N. The result is the single-process one on the whole arrays, up to the rounding of a
different order of additions, whatever the chunking.

Directions of `random` and `projections` penalties are a function of (seed, sample index)
(`m.directions(batch, seed, first)`): each chunk draws those of its own samples, so
distributing never changes a value.

The module's file reaches the workers through Dask (`Client.upload_file`, kept for
workers that start later), under the module's own name (`_dbpgen_<name>_<digest>`), so
workers need no shared file system; each worker process imports it, and Numba compiles
its kernels, once. The workers need dbpgen's environment (numpy, numba, dbpgen).
"""
from __future__ import annotations

import importlib
import math
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

# one BLAS thread per worker process: Dask's processes are the parallelism
PINNED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPLIT_EVERY = 8  # chunks' sums added per task of the tree reduction

_UPLOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> module names sent
_LOADED: dict[str, object] = {}  # this process's imports of uploaded modules (worker side)
LOADS: dict[str, int] = {}       # how often each was imported in this process


def _import(name: str):
    """The uploaded module `name`, imported once per worker process."""
    module = _LOADED.get(name)
    if module is None:
        module = importlib.import_module(name)
        _LOADED[name] = module
        LOADS[name] = LOADS.get(name, 0) + 1
    return module


def _chunk_sums(x, y, v, first, params, *, module, seed, weight):
    """[n J, n dJ/dtheta_1, ...] of one chunk of n samples, as one row; first: a one-element
    array, the chunk's first sample in the data set."""
    m = _import(module)
    first = int(first[0])
    n = len(x)
    if v is None and hasattr(m, "directions"):  # random / projections: drawn per sample index
        v = m.directions(n, seed, first)
    value, grads = m.value_and_grad(params, x, y, v=v, weight=weight)
    parts = [np.array([value], dtype=np.float64)] + [np.asarray(grads[k], dtype=np.float64).ravel()
                                                     for k in m.PARAMS]
    return (n * np.concatenate(parts))[None, :]


def _module(m):
    """An emitted module, from itself or its path."""
    if isinstance(m, (str, os.PathLike)):
        from .compiler import load_generated

        return load_generated(m)
    if not all(hasattr(m, a) for a in ("value_and_grad", "PARAM_SHAPES", "INPUT_SHAPE", "__file__")):
        raise TypeError(f"m must be an emitted module or its path, not {type(m).__name__}")
    return m


def _check_params(m, params) -> dict:
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be a dict of arrays such as m.init_params() returns, not {type(params).__name__}")
    extra = sorted(set(params) - set(m.PARAM_SHAPES))
    if extra:
        raise ValueError(f"params has {extra[0]!r}, which the module {m.__name__} does not; it has {list(m.PARAM_SHAPES)}")
    out = {}
    for name, shape in m.PARAM_SHAPES.items():
        if name not in params:
            raise ValueError(f"params has no {name!r} (an array of shape {shape}) for the module {m.__name__}")
        a = np.asarray(params[name])
        if a.shape != tuple(shape) or a.dtype.kind not in "biuf":
            raise ValueError(f"params[{name!r}] must be real numbers of shape {tuple(shape)} for the module "
                             f"{m.__name__}, got {a.dtype} {a.shape}")
        out[name] = np.ascontiguousarray(a, dtype=m.DTYPE)
    return out


def _samples(name, a, rows, n, trailing=None):
    """a as a Dask array chunked like x along the batch axis only (NumPy arrays are chunked
    here); trailing: the shape it must have after the batch axis, if known."""
    import dask.array as da

    if isinstance(a, da.Array):
        if any(math.isnan(c) for c in a.chunks[0]):
            raise ValueError(f"{name} has chunks of unknown size; call {name}.compute_chunk_sizes() first")
        for axis, chunks in enumerate(a.chunks[1:], start=1):
            if len(chunks) > 1:
                raise ValueError(f"{name} is chunked along axis {axis} ({len(chunks)} chunks); chunk it along "
                                 f"the batch axis (0) only, e.g. {name}.rechunk({{{axis}: -1}})")
    else:
        a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] != n:
        raise ValueError(f"{name} must have {n} samples along axis 0 (as x), got shape {a.shape}")
    if trailing is not None and tuple(a.shape[1:]) != tuple(trailing):
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, trailing))}), got {a.shape}")
    if not isinstance(a, da.Array):
        return da.from_array(a, chunks=(rows,) + a.shape[1:])
    if a.chunks[0] != rows:
        raise ValueError(f"{name} is chunked along the batch axis as {a.chunks[0]}, x as {rows}; "
                         f"chunk them alike, e.g. {name}.rechunk({{0: x.chunks[0]}})")
    return a


def _inputs(m, x, y, v, chunks):
    """x, y, v as Dask arrays with the same chunks along the batch axis, checked."""
    import dask.array as da

    shape = tuple(m.INPUT_SHAPE)
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool) and chunks < 1:
        raise ValueError(f"chunks must be a positive number of samples, got {chunks}")
    if isinstance(x, da.Array):
        if chunks is not None:
            x = x.rechunk({0: chunks})
    else:
        x = np.asarray(x)
        if x.ndim != len(shape) + 1:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}), got {x.shape}")
        x = da.from_array(x, chunks=(chunks or "auto",) + x.shape[1:])
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x holds no samples")
    rows = x.chunks[0]
    _samples("x", x, rows, x.shape[0], shape)
    if chunks is not None:  # asked for: every array chunked so
        y, v = [a.rechunk({0: rows}) if isinstance(a, da.Array) else a for a in (y, v)]
    y = None if y is None else _samples("y", y, rows, x.shape[0])
    v = None if v is None else _samples("v", v, rows, x.shape[0])
    C = m.N_OUTPUTS
    if y is None and "input_grad" in m.SCHEDULES:  # a model with a loss
        raise ValueError(f"this model needs y, of shape (N, {C})")
    if y is not None and y.shape[1:] != (C,) and not (y.ndim == 1 and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"y must have shape (N, {C}) (or be N integer class indices), got {y.shape}")
    if v is not None and (v.ndim not in (2, 3) or v.shape[-1] != C):
        raise ValueError(f"v must have shape (N, {C}) (or (N, n, {C}) for projections), got {v.shape}")
    return x, y, v


def client_for(address=None, workers: int = 2):
    """A Dask client: `address` ("tcp://host:port", a scheduler's address; "local:N", a
    LocalCluster of N single-threaded worker processes with BLAS pinned to one thread),
    or, without one, the current client or a new local cluster of `workers` processes."""
    from distributed import Client, LocalCluster, get_client

    if address is None:
        try:
            return get_client()
        except ValueError:
            address = f"local:{workers}"
    if address.startswith("local:"):
        count = address.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"local:N needs a positive number of workers, got {address!r}")
        cluster = LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                               dashboard_address=None, env=dict(PINNED))
        return Client(cluster)
    return Client(address)


def upload(client, m) -> str:
    """Send m's file to every worker, present and future, under the module's own name;
    the name the workers import it by."""
    name = m.__name__
    uploaded = _UPLOADED.setdefault(client, set())
    if name not in uploaded:
        text = Path(m.__file__).read_text(encoding="utf-8")
        if f'__name__ = "{name}"' not in text:  # a later compile of the same name replaced the file
            raise ValueError(f"{m.__file__} no longer holds the module {name} (it was compiled again since "
                             f"it was imported); import it again")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.py"
            path.write_text(text, encoding="utf-8")
            client.upload_file(str(path), load=False)
        uploaded.add(name)
    return name


def sums(m, params, x, y=None, v=None, *, seed=None, weight=None, chunks=None, client=None,
         split_every: int = SPLIT_EVERY):
    """The lazy Dask array [N J, N dJ/dtheta flattened] of value_and_grad, after every check;
    uploads the module to `client`'s workers."""
    return _sums(m, params, x, y, v, seed, weight, chunks, client, split_every)[1]


def _sums(m, params, x, y, v, seed, weight, chunks, client, split_every):
    """(module, the lazy sums, the client): every check before a cluster is started or used."""
    import dask
    import dask.array as da

    m = _module(m)
    params = _check_params(m, params)
    x, y, v = _inputs(m, x, y, v, chunks)
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if weight is not None:
        weight = float(weight)
    client = client if client is not None else client_for()
    name = upload(client, m)
    width = 1 + sum(int(np.prod(s)) for s in m.PARAM_SHAPES.values())
    first = da.from_array(np.cumsum((0,) + x.chunks[0][:-1]), chunks=1)  # each chunk's first sample
    # explicit indices: axis 0 ("i") is the batch of every array, the others are each array's own
    # (map_blocks would line arrays of different ranks up by their last axes)
    rows = da.blockwise(_chunk_sums, "ij", x, _index(x, "abcdef"), y, _index(y, "klmn"), v, _index(v, "pqrs"),
                        first, "i", dask.delayed(params, pure=True), None,
                        new_axes={"j": width}, adjust_chunks={"i": 1}, concatenate=True, align_arrays=False,
                        module=name, seed=seed, weight=weight, dtype=np.float64,
                        meta=np.empty((0, 0), dtype=np.float64))
    return m, rows.sum(axis=0, split_every=split_every), client


def _index(a, letters: str):
    """a's blockwise index: "i" for the batch axis, a letter of its own for each other axis."""
    return None if a is None else "i" + letters[:a.ndim - 1]


def value_and_grad(m, params, x, y=None, v=None, *, seed=None, client=None, chunks=None, weight=None,
                   split_every: int = SPLIT_EVERY):
    """(J, grads) of an emitted module's objective over all samples of x, computed chunk by
    chunk on Dask workers; equal to m.value_and_grad(params, x, y, v, seed) on the whole
    arrays (to rounding). x, y, v: Dask arrays chunked along the batch axis only, alike, or
    NumPy arrays (chunked by `chunks`, default Dask's "auto"). client: a distributed.Client
    (default: the current one, or a new local cluster)."""
    m, total, client = _sums(m, params, x, y, v, seed, weight, chunks, client, split_every)
    n = x.shape[0] if hasattr(x, "shape") else len(x)
    flat = np.asarray(client.compute(total).result()) / n
    grads, start = {}, 1
    for k, shape in m.PARAM_SHAPES.items():
        size = int(np.prod(shape))
        grads[k] = flat[start:start + size].reshape(shape).astype(m.DTYPE)
        start += size
    return float(flat[0]), grads


def evaluate(m, params, x, y=None, v=None, *, weight=None, seed=None, client=None, chunks=None) -> float:
    """J over all samples, on Dask (value_and_grad's value)."""
    return value_and_grad(m, params, x, y, v, weight=weight, seed=seed, client=client, chunks=chunks)[0]

