"""The model file (SPEC section 1) -> `dbpgen.ir.Model`, or one ModelError naming the field.

The file is read with `yaml.safe_load` only; expressions go through `dbpgen.expr`, which
never evaluates user text. Field paths are YAML keys with 0-based list indices, e.g.
`layers[2].act` is the third item of `layers` (the paper's layer j = 3).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import keyword
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import sympy as sp
import yaml

from . import functions
from . import operators as registry
from .errors import ModelError
from .expr import parse_expression
from .ir import IDENTITY, Activation, Layer, Model, Penalty, S, SoftmaxActivation, Z

TOP_KEYS = ("name", "dtype", "input", "layers", "loss", "penalty")
DTYPES = ("float64", "float32")
LOSSES = ("mse", "nll", "none")
OPERATORS = registry.OPERATORS  # the registry's kinds, in order
LAYER_KEYS = ("act", "bias")
PENALTY_KEYS = ("v", "p", "weight", "on", "index", "algorithm", "iterations", "count", "seed")
V_KINDS = ("loss_gradient", "output", "given", "jacobian", "random", "projections")
V_ONLY = {  # keys that only some kinds of v take
    "index": ("output",),
    "algorithm": ("jacobian", "projections"),
    "iterations": ("random",),
    "count": ("projections",),
    "seed": ("random", "projections"),
}
ALGORITHMS = ("auto", "naive", "optimized")
RESERVED_NAMES = ("numpy", "numba", "dbpgen")  # a generated <name>.py would shadow them
MAX_NAME = 100  # characters of a model name (a file name has at most 255 bytes)
MAX_FILE_BYTES = 1 << 18  # a model file is a few hundred bytes (200 layers: 6 KB)
MAX_ALIASED_NODES = 100_000  # values that aliases may stand for (200 layers: about 2,000)
MAX_LAYERS = 200  # deeper networks: an error, not minutes of compiling (see the README)
# power iterations of `random`, vectors of `projections`: each one a pass over the network
# per call; 10^11 made the operation counts of the compile fill memory, 10^12 a call hang
MAX_REPEATS = 1_000_000
DEFAULT_LEAKY_ALPHA = 0.01


def leaky_relu(alpha: float) -> sp.Expr:
    """z for z > 0, alpha * z otherwise."""
    return sp.Piecewise((Z, Z > 0), (sp.Float(alpha) * Z, True))


ACTIVATIONS = {
    "identity": Z,
    "relu": sp.Max(Z, 0),
    "leaky_relu": leaky_relu(DEFAULT_LEAKY_ALPHA),
    "tanh": sp.tanh(Z),
    "sigmoid": functions.Sigmoid(Z),
    "softplus": functions.Softplus(Z),
    "elu": sp.Piecewise((Z, Z > 0), (sp.exp(Z) - 1, True)),
    "silu": Z * functions.Sigmoid(Z),
    "sin": sp.sin(Z),
}
PENALTY_FUNCTIONS = {"squared_norm": S, "norm": sp.sqrt(S)}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# PyYAML (YAML 1.1) reads 1e-3 as a string: only 1.0e-3 is a float to it.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_model(path: str | Path) -> Model:
    """Read and check the model file at `path` (raises ModelError on any problem)."""
    source = str(path)
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode) or stat.S_ISSOCK(os.stat(path).st_mode):
            raise ModelError(source, "file", "is a pipe or socket, not a file")  # open() would wait for a writer
        with open(path, "rb") as f:  # at most one byte past the limit: /dev/zero never ends
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ModelError(source, "file", "no such file") from None
    except IsADirectoryError:
        raise ModelError(source, "file", "is a directory") from None
    except OSError as exc:
        raise ModelError(source, "file", exc.strerror or "cannot read") from None
    return model_from_dict(_parse_yaml(raw, source), source, hashlib.sha256(raw).hexdigest())


def as_model(model) -> Model:
    """A Model from a Model, a path to a model file, YAML text, or a dict as YAML gives it
    (the Python API's `model` argument); errors name "<text>" or "<dict>" for the last two."""
    if isinstance(model, Model):
        return model
    if isinstance(model, dict):
        try:  # checked as the same model in a file would be
            text = yaml.safe_dump(model, sort_keys=False).encode()
        except yaml.YAMLError as exc:
            raise ModelError("<dict>", "file", f"holds a value YAML cannot write ({exc})") from None
        return model_from_dict(_parse_yaml(text, "<dict>"), "<dict>", hashlib.sha256(text).hexdigest())
    if isinstance(model, str) and "\n" in model:
        raw = model.encode()
        return model_from_dict(_parse_yaml(raw, "<text>"), "<text>", hashlib.sha256(raw).hexdigest())
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"model must be a path, YAML text or a dict, not {type(model).__name__}")


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that bounds what aliases expand to. yaml.safe_dump writes aliases for
    repeated layers, so they are allowed; but a few nested ones (a "billion laughs") stand
    for gigabytes, which the checks below would walk, so their expanded size is counted
    as they are read."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.expanded = 0
        self.sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                self.expanded += _node_count(node, self.sizes)
                if self.expanded > MAX_ALIASED_NODES:
                    raise ModelError(self.name, "yaml", f"aliases (*{_excerpt(event.anchor)}) expand to more "
                                     f"than {MAX_ALIASED_NODES:,} values, at line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)

    def compose_mapping_node(self, anchor):
        """A key given twice in one mapping is an error (YAML says keys are unique; PyYAML
        would keep the last one silently): two `act:` or `on:` lines are a mistake. Checked
        as each mapping is read, before merge keys (<<) rewrite any of them."""
        node = super().compose_mapping_node(anchor)
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in lines:
                    raise ModelError(self.name, "yaml", f"key '{_excerpt(key.value)}' given twice, at lines "
                                     f"{lines[key.value]} and {key.start_mark.line + 1}")
                lines[key.value] = key.start_mark.line + 1
        return node


def _node_count(node, sizes: dict[int, int]) -> int:
    """Values under a YAML node with aliases expanded (memoized: linear in distinct nodes)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(_node_count(child, sizes) for child in children)
    return sizes[id(node)]


def _parse_yaml(raw: bytes, source: str) -> Any:
    if len(raw) > MAX_FILE_BYTES:
        raise ModelError(source, "file", f"holds more than {MAX_FILE_BYTES:,} bytes, the most a model file may hold")
    loader = None
    try:
        loader = _Loader(raw)
        loader.name = source
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ModelError(source, "yaml", f"{exc.problem or exc.context}{where}") from None
    except yaml.reader.ReaderError:
        raise ModelError(source, "yaml", "not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ModelError(source, "yaml", str(exc).splitlines()[0]) from None
    except RecursionError:
        raise ModelError(source, "yaml", "nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ModelError(source, "yaml", str(exc).split(":")[0]) from None
    finally:
        if loader is not None:
            loader.dispose()


def model_from_dict(data: Any, source: str, source_hash: str = "") -> Model:
    """Check the parsed YAML `data` and build the Model; `source` names it in errors."""
    check = _Checker(source)
    if data is None:
        raise check.fail("(top level)", "the file is empty")
    check.mapping(data, "(top level)")
    check.keys(data, "", TOP_KEYS, required=("name", "input", "layers"))
    name = _name(check, data["name"])
    dtype = check.choice(data.get("dtype", "float64"), "dtype", DTYPES)
    input_shape = _input_shape(check, data["input"])
    layers = _layers(check, data["layers"], input_shape)
    loss = check.choice(data.get("loss", "none"), "loss", LOSSES)
    if loss == "nll" and not layers[-1].act.is_softmax:
        raise check.fail("loss", "nll needs act: softmax on the last layer")
    penalty = None
    if "penalty" in data:
        n_outputs = math.prod(layers[-1].out_shape)
        penalty = _penalty(check, data["penalty"], loss, n_outputs)
    return Model(name=name, dtype=dtype, input_shape=input_shape, layers=layers, loss=loss,
                 penalty=penalty, source=source, source_hash=source_hash)


def _name(check: _Checker, value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise check.fail("name", "must be an identifier such as sine_mlp (letters, digits, _)")
    if len(value) > MAX_NAME:
        raise check.fail("name", f"is {len(value):,} characters long; at most {MAX_NAME}")
    if keyword.iskeyword(value) or value in RESERVED_NAMES or value.startswith("__") and value.endswith("__"):
        raise check.fail("name", f"'{value}' cannot be the name of a Python module")  # __init__: a package
    if _shadows_a_module(value):
        raise check.fail("name", f"'{value}' is the name of a standard or installed module; "
                         f"generated/{value}.py would shadow it wherever it is imported from")
    return value


def _memory_bytes() -> int:
    """Physical memory of this machine (64 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def _shadows_a_module(name: str) -> bool:
    """Whether `name` is a standard module or an installed distribution's top-level one.
    Most names are importable as nothing at all, which find_spec (it runs no code) says in
    microseconds; only for the others is the list of installed distributions read (0.4 s
    in an environment with torch and jax)."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return True
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        pass
    return name in _installed_module_names()


@functools.lru_cache(maxsize=1)
def _installed_module_names() -> frozenset[str]:
    """Top-level module names of the installed distributions."""
    return frozenset(importlib.metadata.packages_distributions())


def _input_shape(check: _Checker, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise check.fail("input", "must be a list: [n], [channels, length] or [channels, height, width]")
    shape = tuple(check.integer(n, f"input[{k}]", minimum=1) for k, n in enumerate(value))
    if len(shape) not in (1, 2, 3):
        raise check.fail("input", "must be [n], [channels, length] or [channels, height, width]")
    return shape


def _layers(check: _Checker, items: Any, in_shape: tuple[int, ...]) -> tuple[Layer, ...]:
    if not isinstance(items, list) or not items:
        raise check.fail("layers", "must be a non-empty list of layers")
    if len(items) > MAX_LAYERS:
        raise check.fail("layers", f"{len(items):,} layers; dbpgen compiles at most {MAX_LAYERS}")
    layers = []
    param_bytes, sample_bytes = 0, 8 * math.prod(in_shape)
    memory = _memory_bytes()
    for i, item in enumerate(items):
        layer = _layer(check, item, f"layers[{i}]", i + 1, in_shape, i == len(items) - 1)
        layers.append(layer)
        in_shape = layer.out_shape
        # float64 parameters with their gradient and an optimizer's two moments, and a dozen
        # per-sample vectors of the recursions per layer (x, z, g', xi, zeta, q, h, eta, ...)
        if layer.op.has_params:
            param_bytes += 4 * 8 * (math.prod(layer.op.weight_shape(layer.in_shape)) + layer.out_shape[0])
        sample_bytes += 12 * 8 * math.prod(layer.out_shape)
        if param_bytes > memory // 2 or sample_bytes > memory // 64:
            what = "parameters" if param_bytes > memory // 2 else "values per sample"
            raise check.fail(f"layers[{i}]", f"too large for this machine: its {what} would need "
                             f"more than its {memory / 2**30:.0f} GiB of memory")
    if len(in_shape) != 1:
        what = "an image" if len(in_shape) == 3 else "a sequence"
        raise check.fail(f"layers[{len(items) - 1}]", f"the network must end in a vector, not {what} "
                         f"of shape {list(in_shape)}: add flatten (and dense)")
    return tuple(layers)


def _layer(check: _Checker, item: Any, field: str, index: int,
           in_shape: tuple[int, ...], is_last: bool) -> Layer:
    if isinstance(item, str):
        if item not in OPERATORS:
            raise check.fail(field, f"unknown operator {item!r}")
        item = {item: None}
    check.mapping(item, field, example="{dense: 8, act: relu}")
    operators = [key for key in item if key in OPERATORS]
    for key in item:
        if key not in OPERATORS and key not in LAYER_KEYS:
            message = "unknown key" if operators else f"unknown operator (supported: {', '.join(OPERATORS)})"
            raise check.fail(f"{field}.{key}", message)
    if len(operators) != 1:
        found = ", ".join(operators) or "none"
        raise check.fail(field, f"needs exactly one operator such as dense: N (found {found})")
    kind = operators[0]
    if "bias" in item and not registry.has_params(kind):
        raise check.fail(f"{field}.bias", f"{kind} has no parameters")
    op = registry.get(kind).parse(check, item[kind], f"{field}.{kind}", in_shape, item)
    act = _activation(check, item["act"], f"{field}.act", is_last) if "act" in item else IDENTITY
    return Layer(index=index, op=op, act=act, in_shape=in_shape, out_shape=op.out_shape(in_shape))


def _activation(check: _Checker, value: Any, field: str,
                is_last: bool) -> Activation | SoftmaxActivation:
    if isinstance(value, dict):
        return _parametrised_activation(check, value, field)
    if not isinstance(value, str):
        raise check.fail(field, "must be an activation name, an expression in z "
                                "or {leaky_relu: alpha}")
    if value == "softmax":
        if not is_last:
            raise check.fail(field, "softmax is allowed on the last layer only")
        return SoftmaxActivation()
    if value in ACTIVATIONS:
        return Activation(value, ACTIVATIONS[value])
    expr = _expression(check, value, Z, field, "activation")
    if Z not in expr.free_symbols:
        # x_j would be one number for every sample: nothing after it sees the input
        raise check.fail(field, f"{value!r} is the constant {expr}: an activation must depend on z")
    return Activation(value, expr)


def _parametrised_activation(check: _Checker, value: dict, field: str) -> Activation:
    if len(value) != 1 or "leaky_relu" not in value:
        raise check.fail(field, "only {leaky_relu: alpha} takes a parameter")
    alpha = check.number(value["leaky_relu"], f"{field}.leaky_relu")
    return Activation(f"leaky_relu({alpha!r})", leaky_relu(alpha))


def _expression(check: _Checker, text: str, variable: sp.Symbol, field: str,
                what: str) -> sp.Expr:
    """Parse an expression; a bare unknown identifier reads as a misspelt built-in."""
    try:
        return parse_expression(text, variable, check.source, field)
    except ModelError:
        if text.strip().isidentifier():
            raise check.fail(field, f"unknown {what} {text.strip()!r}") from None
        raise


def _penalty(check: _Checker, data: Any, loss: str, n_outputs: int) -> Penalty:
    check.mapping(data, "penalty", example="{v: loss_gradient, weight: 0.1}")
    # PyYAML (YAML 1.1) reads the key `on` as the boolean True.
    data = {"on" if key is True else key: value for key, value in data.items()}
    check.keys(data, "penalty", PENALTY_KEYS, required=("v",))
    v = check.choice(data["v"], "penalty.v", V_KINDS)
    for key, kinds in V_ONLY.items():
        if key in data and v not in kinds:
            raise check.fail(f"penalty.{key}", f"only used with v: {' or '.join(kinds)}")
    if v == "loss_gradient" and loss == "none":
        raise check.fail("penalty.v", "loss_gradient needs a loss, but loss is none")
    p_name, p = _penalty_function(check, data.get("p", "squared_norm"))
    return Penalty(
        v=v,
        p_name=p_name,
        p=p,
        weight=check.number(data.get("weight", 1.0), "penalty.weight"),
        on_logits=check.choice(data.get("on", "outputs"), "penalty.on",
                               ("outputs", "logits")) == "logits",
        index=_output_index(check, data.get("index", 0), n_outputs) if v == "output" else None,
        algorithm=check.choice(data.get("algorithm", "auto"), "penalty.algorithm", ALGORITHMS),
        iterations=check.integer(data.get("iterations", 0), "penalty.iterations", minimum=0, maximum=MAX_REPEATS),
        count=check.integer(data.get("count", 1), "penalty.count", minimum=1, maximum=MAX_REPEATS),
        seed=check.integer(data.get("seed", 0), "penalty.seed", minimum=0, maximum=2 ** 63 - 1),
    )


def _penalty_function(check: _Checker, value: Any) -> tuple[str, sp.Expr]:
    if not isinstance(value, str):
        raise check.fail("penalty.p", "must be squared_norm, norm or an expression in s")
    if value in PENALTY_FUNCTIONS:
        return value, PENALTY_FUNCTIONS[value]
    return value, _expression(check, value, S, "penalty.p", "penalty function")


def _output_index(check: _Checker, value: Any, n_outputs: int) -> int:
    index = check.integer(value, "penalty.index")
    if not 0 <= index < n_outputs:
        raise check.fail("penalty.index",
                         f"must be in 0..{n_outputs - 1} (the network has {n_outputs} outputs)")
    return index


class _Checker:
    """Strict type checks of YAML values; each failure is a ModelError at a field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> ModelError:
        return ModelError(self.source, field, message)

    def mapping(self, value: Any, field: str, example: str = "") -> None:
        if not isinstance(value, dict):
            hint = f" such as {example}" if example else ""
            raise self.fail(field, f"must be a mapping{hint}")

    def keys(self, data: dict, prefix: str, allowed: tuple[str, ...],
             required: tuple[str, ...]) -> None:
        path = f"{prefix}." if prefix else ""
        for key in data:
            if key not in allowed:
                raise self.fail(f"{path}{key}", "unknown key")
        for key in required:
            if key not in data:
                raise self.fail(f"{path}{key}", "required key is missing")

    def integer(self, value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
        # bool is a subclass of int; `true` is not a size
        if type(value) is not int:
            raise self.fail(field, f"must be an integer, not {_show(value)}")
        if minimum is not None and value < minimum:
            wanted = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
            raise self.fail(field, f"must be {wanted}, not {value}")
        if maximum is not None and value > maximum:
            raise self.fail(field, f"is {value:,}; at most {maximum:,}")
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            value = float(value)
        if type(value) not in (int, float):
            raise self.fail(field, f"must be a number, not {_show(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(field, f"must be a finite number, not {_show(value)}")
        return number

    def boolean(self, value: Any, field: str) -> bool:
        if type(value) is not bool:
            raise self.fail(field, f"must be true or false, not {_show(value)}")
        return value

    def choice(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(field, f"must be one of {', '.join(choices)}, not {_show(value)}")
        return value


def _show(value: Any) -> str:
    """A short rendering of a user value for messages."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, dict)):  # never repr a whole (possibly huge) structure
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value):,} items"
    return _excerpt(repr(value))


def _excerpt(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
