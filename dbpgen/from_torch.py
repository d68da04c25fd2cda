"""PyTorch in: the model file of an `nn.Sequential`, read from its modules' attributes.

    text = dbpgen.from_torch(net, (1, 28, 28), name="lenet", loss="nll",
                             penalty={"v": "loss_gradient", "weight": 0.1})
    m = dbpgen.compile(text)
    params = dbpgen.train.params_from_state_dict(net.state_dict(), m)

dbpgen never imports torch: modules are recognised by their class name and read through
their public attributes (`out_features`, `kernel_size`, ...). Each operator may be followed
by one activation, which becomes its `act:`; Flatten between them commutes with a
coordinate-wise activation. Anything else is one ValueError naming the module's position
and type, and what is supported.
"""
from __future__ import annotations

import re

import yaml

OPERATORS = ("Linear", "Conv1d", "Conv2d", "AvgPool1d", "AvgPool2d", "PixelUnshuffle", "Flatten")
ACTIVATIONS = ("ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softplus", "ELU", "SiLU", "Softmax")
SUPPORTED = (f"supported: {', '.join(OPERATORS)} and the activations {', '.join(ACTIVATIONS[:-1])}, "
             f"Softmax(dim=-1) last")


def _modules(net, prefix=""):
    """(position, module) of net's layers in order; nested Sequentials are opened."""
    if type(net).__name__ != "Sequential":
        raise ValueError(f"from_torch takes an nn.Sequential, not {type(net).__name__}")
    for index, module in enumerate(net):
        position = f"{prefix}{index}"
        if type(module).__name__ == "Sequential":
            yield from _modules(module, position + ".")
        else:
            yield position, module


def _single(position, module, attr):
    """A torch size attribute that must be the same along every spatial axis, as an int."""
    value = getattr(module, attr)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(set(values)) != 1:
        raise ValueError(f"net[{position}] ({type(module).__name__}): {attr}={value} differs between axes; "
                         f"dbpgen's layers take one {attr} for every axis")
    return int(values[0])


def _fail(position, module, why):
    raise ValueError(f"net[{position}] ({type(module).__name__}): {why}")


def _conv(position, module):
    kind = type(module).__name__.lower()
    if module.groups != 1:
        _fail(position, module, f"groups={module.groups}; only groups=1")
    if module.padding_mode != "zeros":
        _fail(position, module, f"padding_mode={module.padding_mode!r}; only zero padding")
    padding = module.padding
    if isinstance(padding, str):  # "valid" or "same"
        if padding == "valid":
            padding = 0
        else:
            _fail(position, module, f"padding={padding!r}; give the padding as a number")
    spec = {"channels": int(module.out_channels), "kernel": _single(position, module, "kernel_size")}
    for attr, default, value in (("stride", 1, _single(position, module, "stride")),
                                 ("padding", 0, _single(position, module, "padding") if padding else 0),
                                 ("dilation", 1, _single(position, module, "dilation"))):
        if value != default:
            spec[attr] = value
    layer = {kind: spec}
    if module.bias is None:
        layer["bias"] = False
    return layer


def _pool(position, module):
    kernel = _single(position, module, "kernel_size")
    stride = kernel if module.stride in (None, ()) else _single(position, module, "stride")
    if stride != kernel:
        _fail(position, module, f"stride {stride} differs from kernel_size {kernel}; only stride = kernel")
    if _single(position, module, "padding") != 0 or module.ceil_mode:
        _fail(position, module, "padding or ceil_mode; only unpadded pools whose size divides the input")
    if getattr(module, "divisor_override", None):
        _fail(position, module, "divisor_override; only the mean")
    return {"avgpool": kernel}


def _activation(position, module, last: bool):
    kind = type(module).__name__
    if kind == "LeakyReLU":
        return {"leaky_relu": float(module.negative_slope)}
    if kind == "Softplus" and float(module.beta) != 1:
        _fail(position, module, f"beta={module.beta}; only beta=1")
    if kind == "Softplus" and float(module.threshold) < 20:  # linear past it; exp(-20) away at 20
        _fail(position, module, f"threshold={module.threshold}; only threshold >= 20 (softplus itself)")
    if kind == "ELU" and float(module.alpha) != 1:
        _fail(position, module, f"alpha={module.alpha}; only alpha=1")
    if kind == "Softmax":
        if not last:
            _fail(position, module, "Softmax must be the last module")
        if module.dim not in (-1, 1):
            _fail(position, module, f"dim={module.dim}; only dim=-1 (over the outputs)")
    return {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus", "ELU": "elu",
            "SiLU": "silu", "Softmax": "softmax"}[kind]


def _dtype(net) -> str:
    for p in net.parameters():
        name = str(p.dtype).replace("torch.", "")
        if name not in ("float32", "float64"):
            raise ValueError(f"the net's parameters are {name}; dbpgen emits float32 or float64")
        return name
    return "float64"


def from_torch(net, input_shape, *, name: str = "m", loss: str = "none", penalty: dict | None = None,
               dtype: str | None = None) -> str:
    """The model file (YAML text) of `net`, an nn.Sequential, for one sample of shape
    `input_shape` (no batch axis). loss and penalty are the model file's fields; dtype
    defaults to that of the net's parameters."""
    modules = list(_modules(net))
    layers: list = []
    sources: list = []  # the (position, module) each of layers comes from
    for n, (position, module) in enumerate(modules):
        kind = type(module).__name__
        last = n == len(modules) - 1
        if kind in OPERATORS:
            sources.append((position, module))
        if kind == "Linear":
            layer = {"dense": int(module.out_features)}
            if module.bias is None:
                layer["bias"] = False
            layers.append(layer)
        elif kind in ("Conv1d", "Conv2d"):
            layers.append(_conv(position, module))
        elif kind in ("AvgPool1d", "AvgPool2d"):
            layers.append(_pool(position, module))
        elif kind == "PixelUnshuffle":
            layers.append({"downsample": int(module.downscale_factor)})
        elif kind == "Flatten":
            if module.start_dim != 1 or module.end_dim != -1:
                _fail(position, module, f"start_dim={module.start_dim}, end_dim={module.end_dim}; only the "
                                        f"default (1, -1): all but the batch axis")
            layers.append("flatten")
        elif kind in ACTIVATIONS:
            act = _activation(position, module, last)
            # the layer this activation follows; a Flatten in between commutes with it
            target = next((layer for layer in reversed(layers) if layer != "flatten"), None)
            if target is None:
                _fail(position, module, "an activation needs a layer before it")
            if "act" in target:
                _fail(position, module, f"a second activation after {target['act']!r}; dbpgen takes one per layer")
            if act == "softmax" and layers[-1] == "flatten":
                _fail(position, module, "Softmax must follow the last Linear directly")
            target["act"] = act
        else:
            _fail(position, module, f"not supported; {SUPPORTED}")
    if not layers:
        raise ValueError("the net has no layers")
    spec = {"name": name, "dtype": dtype or _dtype(net), "input": [int(d) for d in input_shape],
            "layers": layers, "loss": loss}
    if penalty is not None:
        spec["penalty"] = dict(penalty)
    text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)
    _check(text, sources)
    return text


def _check(text: str, sources: list) -> None:
    """The loader's checks (shapes, names, fields) now, as one ValueError naming the net's
    module where the field is a layer's; and each Linear's and Conv's input size against
    the shape the layers before it give, which the model file does not record."""
    from .errors import ModelError
    from .model import as_model

    try:
        model = as_model(text)
    except ModelError as e:
        match = re.match(r"layers\[(\d+)\]", e.field)
        if match and int(match.group(1)) < len(sources):
            position, module = sources[int(match.group(1))]
            _fail(position, module, e.message)
        raise ValueError(f"{e.field}: {e.message}") from None
    for layer, (position, module) in zip(model.layers, sources):
        kind = type(module).__name__
        if kind == "Linear" and layer.in_shape != (module.in_features,):
            _fail(position, module, f"in_features={module.in_features}, but the modules before it give "
                                    f"{_shape(layer.in_shape)} per sample")
        if kind in ("Conv1d", "Conv2d") and layer.in_shape[0] != module.in_channels:
            _fail(position, module, f"in_channels={module.in_channels}, but the modules before it give "
                                    f"{_shape(layer.in_shape)} per sample")


def _shape(shape: tuple) -> str:
    return str(shape[0]) if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"
