"""Mini-batch training with an emitted module's value_and_grad; data and params as .npz.

    m = dbpgen.compiler.load_generated(dbpgen.compiler.compile_file("examples/sine_cdb.yaml"))
    result = train(m, x, y, optimizer="adam", lr=1e-2, epochs=200, batch_size=64, seed=0)
    save_params("params.npz", result.params)

Lazy regularization (StyleGAN2, Karras et al. 2020, section 3.1): with `lazy=k`, steps
0, k, 2k, ... (counted over the whole run) take the gradient of l + k * lambda * R, the
other steps the gradient of l alone: from `loss_module` (the same network compiled
without its penalty, see `loss_only_module`; plain backpropagation) or, without one,
from value_and_grad with weight=0 (the same numbers at the cost of a double
backpropagation). Over k steps the penalty's expected gradient is the same as with
lazy=1, at a k-th of the double backpropagations. Unlike StyleGAN2 the penalty step is
combined with that step's loss step rather than a separate optimizer step, and Adam's
betas and lr are not rescaled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelError
from .optim import OPTIMIZERS, Optimizer


@dataclass
class TrainResult:
    params: dict                       # the trained parameters (a copy; the input is untouched)
    losses: list = field(default_factory=list)  # per epoch: mean of the steps' values
    steps: int = 0                     # optimizer steps taken
    regularized_steps: int = 0         # steps whose gradient included the penalty
    objective: float = float("nan")    # J on the whole data set, the model's weight
    loss: float = float("nan")         # J with weight 0 (the loss alone) on the whole data set


def _param_shapes(module) -> dict:
    return {k: a.shape for k, a in module.init_params(seed=0).items()}


def evaluate(module, params: dict, x, y=None, v=None, batch_size: int = 1024, weight=None,
             client=None) -> float:
    """J = mean over all samples of [l + weight R], computed in chunks of batch_size (on the
    Dask cluster of `client`, if given)."""
    if client is not None:
        from . import distributed

        return distributed.evaluate(module, params, x, y, v, weight=weight, client=client,
                                    chunks=batch_size)
    n = len(x)
    total = 0.0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        vb = _local(v[sl]) if v is not None else (
            module.directions(len(x[sl]), None, start) if hasattr(module, "directions") else None)
        value, _ = module.value_and_grad(params, _local(x[sl]), None if y is None else _local(y[sl]),
                                         v=vb, weight=weight)
        total += value * len(x[sl])
    return total / n


def _local(a):
    """A NumPy array of a (a Dask array's values)."""
    return np.asarray(a.compute() if hasattr(a, "compute") else a)


def _step(module, params, x, y, v, seed, weight, client, parts):
    """One step's value_and_grad: in this process, or split in `parts` chunks on Dask."""
    if client is None:
        return module.value_and_grad(params, _local(x), None if y is None else _local(y),
                                     v=None if v is None else _local(v), seed=seed, weight=weight)
    from . import distributed

    return distributed.value_and_grad(module, params, x, y, v, seed=seed, weight=weight, client=client,
                                      chunks=-(-len(x) // parts))


def train(module, x, y=None, params: dict | None = None, *, optimizer: str | Optimizer = "adam",
          lr: float | None = None, epochs: int = 100, batch_size: int = 64, seed: int = 0,
          lazy: int = 1, weight: float | None = None, v=None, shuffle: bool = True,
          progress: bool = True, loss_module=None, client=None, **optimizer_options) -> TrainResult:
    """Train `module`'s objective J = mean [l + weight R] with mini-batches.

    params: initial parameters (default module.init_params(seed)); they are copied.
    optimizer: "adam" | "sgd" (with lr and optimizer_options such as momentum, nesterov,
    weight_decay, betas, eps) or an Optimizer built on a params dict you own (trained in place).
    lr: the optimizer's default (1e-3, as in torch.optim) when None.
    seed: initial parameters, the shuffling, and the directions of random/projections penalties.
    lazy: apply the penalty every `lazy` steps, scaled by `lazy` (see the module docstring).
    weight: the penalty weight lambda (default: the model's WEIGHT).
    v: per-sample directions (N, C) for `v: given` models, batched with x.
    progress: a tqdm bar over epochs showing the running objective.
    loss_module: the same network without its penalty (loss_only_module), for the loss-only
    steps of lazy regularization.
    client: a distributed.Client: each step's gradient is dbpgen.distributed.value_and_grad
    of the step's batch, split among the cluster's workers (synchronous data parallelism);
    x, y, v may then be Dask arrays (e.g. da.from_npy_stack) that never leave the workers
    whole. The same numbers as without a client, to the rounding of the sums' order.
    """
    x, y, v = (a if a is None or hasattr(a, "compute") else np.asarray(a) for a in (x, y, v))
    n = len(x)
    if y is not None and len(y) != n or v is not None and len(v) != n:
        raise ValueError(f"x, y and v must have the same number of samples ({n})")
    if int(lazy) != lazy or lazy < 1:
        raise ValueError(f"lazy must be a positive integer, got {lazy}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs}")
    lam = float(module.WEIGHT if weight is None else weight)
    rng = np.random.default_rng(seed)
    if isinstance(optimizer, Optimizer):
        if params is not None and params is not optimizer.params:
            raise ValueError("pass either params or an optimizer built on them, not both")
        opt = optimizer
        params = opt.params
    else:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        start = module.init_params(seed=seed) if params is None else params
        params = {k: np.array(a, dtype=module.DTYPE) for k, a in start.items()}
        options = dict(optimizer_options)
        if lr is not None:
            options["lr"] = lr
        opt = OPTIMIZERS[optimizer](params, **options)

    parts = max(1, len(client.nthreads())) if client is not None else 1  # a chunk per worker
    result = TrainResult(params=params)
    if progress:  # tqdm.auto: a widget in Jupyter, text elsewhere
        from tqdm.auto import tqdm

        bar = tqdm(range(epochs), unit="epoch", leave=False,
                   desc=os.path.splitext(os.path.basename(getattr(module, "__file__", None) or "train"))[0])
    else:
        bar = _Quiet(range(epochs))
    for _ in bar:
        order = rng.permutation(n) if shuffle else np.arange(n)
        values = []
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            regularize = result.steps % lazy == 0
            yb, vb, step_seed = None if y is None else y[idx], None if v is None else v[idx], int(rng.integers(2 ** 31))
            if regularize or loss_module is None:
                value, grads = _step(module, params, x[idx], yb, vb, step_seed,
                                     lam * lazy if regularize else 0.0, client, parts)
            else:
                value, grads = _step(loss_module, params, x[idx], yb, None, None, None, client, parts)
            opt.step(grads)
            values.append(value)
            result.steps += 1
            result.regularized_steps += regularize
        result.losses.append(float(np.mean(values)))
        bar.set_postfix(J=f"{result.losses[-1]:.4g}", refresh=False)
    bar.close()
    result.objective = evaluate(module, params, x, y, v, weight=lam, client=client)
    result.loss = evaluate(module, params, x, y, v, weight=0.0, client=client)
    return result


class _Quiet:
    """What train uses of a tqdm bar, doing nothing (progress=False)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def loss_only_module(model_path, out_dir="generated"):
    """Compile and load <name>_loss: the model file's network and loss without its penalty."""
    from dataclasses import replace

    from .compiler import compile_model, load_generated
    from .model import load_model

    model = load_model(model_path)
    if model.loss == "none":
        raise ModelError(str(model_path), "loss", "a model without a loss has no loss-only steps")
    return load_generated(compile_model(replace(model, name=f"{model.name}_loss", penalty=None), out_dir))


# -- files ----------------------------------------------------------------------------


def _load_npz(path) -> dict:
    """The arrays of a .npz archive, or one ModelError naming the file."""
    if not os.path.isfile(path):
        raise ModelError(str(path), "file", "no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # not numpy's format, pickled data, a truncated archive
        raise ModelError(str(path), "file", f"not a .npz archive ({type(exc).__name__})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ModelError(str(path), "file", "a single .npy array, not a .npz archive of named arrays")
    try:
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # object arrays (need pickle), corrupt members
        raise ModelError(str(path), "file", f"unreadable .npz archive ({type(exc).__name__}: {exc})") from None


def _load_stacks(path) -> dict:
    """Dask arrays x, y, v of a folder of .npy stacks (dask.array.to_npy_stack(folder/x, x));
    read chunk by chunk where they are used, never whole."""
    import dask.array as da

    names = sorted(p.name for p in os.scandir(path) if p.is_dir())
    arrays = {}
    for name in names:
        try:
            arrays[name] = da.from_npy_stack(os.path.join(path, name))
        except Exception as exc:  # no info file, a pickled or truncated chunk
            raise ModelError(str(path), name, f"not a .npy stack written by dask.array.to_npy_stack "
                                              f"({type(exc).__name__})") from None
    return arrays


def load_data(path, module) -> tuple:
    """x (N, *input), y (N, C) or (N,) (C = 1, or class indices), optional v (N, C) from a .npz,
    or, from a folder holding the .npy stacks x/, y/, v/ (dask.array.to_npy_stack), as Dask
    arrays (their labels are checked chunk by chunk where they are read)."""
    stacked = os.path.isdir(path)
    arrays = _load_stacks(path) if stacked else _load_npz(path)
    if "x" not in arrays:
        raise ModelError(str(path), "x", f"missing array (the archive holds {sorted(arrays) or 'nothing'})")
    extra = set(arrays) - {"x", "y", "v"}
    if extra:
        raise ModelError(str(path), sorted(extra)[0], "unexpected array; a data file holds x, y and optionally v")
    x = arrays["x"]
    shape = tuple(module.INPUT_SHAPE)
    if not np.issubdtype(x.dtype, np.number) or x.ndim != len(shape) + 1 or x.shape[1:] != shape or len(x) == 0:
        raise ModelError(str(path), "x", f"expected a numeric array of shape (N, {', '.join(map(str, shape))}), "
                                         f"got {x.dtype} {x.shape}")
    n, c = len(x), module.N_OUTPUTS
    y = arrays.get("y")
    if y is not None:
        if y.ndim == 1 and c == 1 and not np.issubdtype(y.dtype, np.integer):
            y = y.reshape(-1, 1)
        ok = np.issubdtype(y.dtype, np.number) and len(y) == n and (
            y.shape == (n, c) or (y.ndim == 1 and np.issubdtype(y.dtype, np.integer)))
        if not ok:
            raise ModelError(str(path), "y", f"expected shape ({n}, {c}) (or ({n},) class indices), got "
                                             f"{y.dtype} {y.shape}")
        if y.ndim == 1 and not stacked and (y.min() < 0 or y.max() >= c):
            raise ModelError(str(path), "y", f"class indices must lie in [0, {c}), got {y.min()}..{y.max()}")
    v = arrays.get("v")
    if v is not None and (not np.issubdtype(v.dtype, np.number) or v.shape != (n, c)):
        raise ModelError(str(path), "v", f"expected shape ({n}, {c}), got {v.dtype} {v.shape}")
    return x, y, v


def save_params(path, params: dict) -> None:
    """Write params as a .npz with one array per key ("W1", "b1", ...)."""
    np.savez(path, **{k: np.asarray(a) for k, a in params.items()})


def load_params(path, module) -> dict:
    """Read a .npz written by save_params (or np.savez(path, W1=..., b1=..., ...)), checked
    against the module's parameter names and shapes, converted to its dtype."""
    arrays = _load_npz(path)
    return check_params(arrays, module, str(path))


def check_params(arrays: dict, module, source: str = "params") -> dict:
    shapes = _param_shapes(module)
    for name in arrays:
        if name not in shapes:
            raise ModelError(source, name, f"unexpected array; the model has {list(shapes)}")
    out = {}
    for name, shape in shapes.items():
        if name not in arrays:
            raise ModelError(source, name, "missing array")
        a = np.asarray(arrays[name])
        if a.shape != shape or not np.issubdtype(a.dtype, np.number):
            raise ModelError(source, name, f"expected shape {shape}, got {a.dtype} {a.shape}")
        out[name] = np.ascontiguousarray(a, dtype=module.DTYPE)
    return out


def params_from_state_dict(state_dict, module) -> dict:
    """Map a PyTorch state_dict onto the module's params, in order.

    The parametrised layers must appear in the same order as in the model file: the k-th
    `*.weight` / `*.bias` entry becomes the k-th name of module.PARAMS ("W1", "b1", "W2", ...).
    nn.Linear.weight is (out, in) and nn.Conv2d.weight (out, in, k, k), exactly W{j}'s layout,
    so no transpose is needed.
    """
    arrays = {}
    tensors = [(k, t) for k, t in state_dict.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")]
    if len(tensors) != len(module.PARAMS):
        raise ValueError(f"state_dict has {len(tensors)} weight/bias entries, the model {len(module.PARAMS)} "
                         f"({module.PARAMS})")
    for name, (key, t) in zip(module.PARAMS, tensors):
        if (key.endswith(".weight")) != name.startswith("W"):
            raise ValueError(f"state_dict entry {key!r} does not match {name!r}: are the layers in order?")
        arrays[name] = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return check_params(arrays, module, "state_dict")
