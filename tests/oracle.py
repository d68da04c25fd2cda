"""Independent reference implementation of a dbpgen model, built on HIPS autograd.

Written from the contract (the model-file format and the emitted-module API) only; it
never imports dbpgen, so that the code dbpgen generates can be tested against it.  Everything is float64 numpy.

Double backpropagation here is literal: the penalty calls ``autograd.grad`` to get
xi_0 = (d out / d x_0)^T v, and ``value_and_grad`` differentiates through that.

Supported models: every layer of SPEC section 1 (``dense``, ``conv2d``, ``conv1d``,
``avgpool``, ``downsample``, ``flatten``) on vector, sequence (C, T) or image inputs, every activation, losses
mse / nll / none, and penalties with v in loss_gradient / output / given (plus
jacobian, projections and random, the last two only with an explicit v; see
``_xi0_list``).  The image layers are plain slicing / reshaping / einsum code, so
autograd differentiates through them as often as needed (double backprop).
"""

import ast
import functools

import numpy as np
import yaml
import autograd
import autograd.numpy as anp
from autograd.scipy.special import erf as _erf, logsumexp as _logsumexp
from autograd.tracer import getval


# --------------------------------------------------------------------------
# Safe expression evaluator (SymPy-style strings in one variable)
# --------------------------------------------------------------------------

def _sigmoid(z):
    return 0.5 * (anp.tanh(0.5 * z) + 1.0)


def _softplus(z):
    return anp.logaddexp(0.0, z)


def _heaviside(z, h0=0.5):
    # SymPy's default Heaviside(0) is 1/2; derivative is zero everywhere.
    z = anp.asarray(getval(z))
    return anp.where(z > 0, 1.0, anp.where(z < 0, 0.0, h0))


def _fold(op):
    return lambda *args: functools.reduce(op, args)


_FUNCTIONS = {
    "exp": anp.exp, "log": anp.log, "sqrt": anp.sqrt,
    "tanh": anp.tanh, "sinh": anp.sinh, "cosh": anp.cosh,
    "sin": anp.sin, "cos": anp.cos, "tan": anp.tan,
    "atan": anp.arctan, "asin": anp.arcsin, "acos": anp.arccos,
    "asinh": anp.arcsinh, "acosh": anp.arccosh, "atanh": anp.arctanh,
    "Abs": anp.abs, "abs": anp.abs, "sign": anp.sign,
    "Max": _fold(anp.maximum), "max": _fold(anp.maximum),
    "Min": _fold(anp.minimum), "min": _fold(anp.minimum),
    "sigmoid": _sigmoid, "softplus": _softplus,
    "Heaviside": _heaviside, "erf": _erf,
}
_CONSTANTS = {"pi": np.pi, "E": np.e}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a ** b,
}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


def _compile_node(node, var):
    """Turn one AST node into a closure ``value -> result``; reject anything else."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"unsupported constant {node.value!r}")
        number = float(node.value)
        return lambda value: number
    if isinstance(node, ast.Name):
        if node.id == var:
            return lambda value: value
        if node.id in _CONSTANTS:
            const = _CONSTANTS[node.id]
            return lambda value: const
        raise ValueError(f"unknown name {node.id!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op = _BINOPS[type(node.op)]
        left, right = _compile_node(node.left, var), _compile_node(node.right, var)
        return lambda value: op(left(value), right(value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        op, operand = _UNARY[type(node.op)], _compile_node(node.operand, var)
        return lambda value: op(operand(value))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise ValueError(f"unknown function in {ast.dump(node.func)}")
        if node.keywords or not node.args:
            raise ValueError("functions take positional arguments only")
        fn = _FUNCTIONS[node.func.id]
        args = [_compile_node(arg, var) for arg in node.args]
        return lambda value: fn(*[arg(value) for arg in args])
    raise ValueError(f"unsupported syntax {type(node).__name__}")


def compile_expression(text, var):
    """Compile a SymPy-style expression string in ``var`` to an autograd function."""
    # like sympify(convert_xor=True): ^ means power, with power's precedence
    tree = ast.parse(str(text).strip().replace("^", "**"), mode="eval")
    body = _compile_node(tree.body, var)

    def fn(value):
        return body(value) + 0.0 * value  # constants broadcast to value's shape

    return fn


# --------------------------------------------------------------------------
# Activations, losses, penalty functions p
# --------------------------------------------------------------------------

def log_softmax(z):
    return z - _logsumexp(z, axis=-1, keepdims=True)


def softmax(z):
    return anp.exp(log_softmax(z))


def _leaky_relu(alpha):
    return lambda z: anp.where(z > 0, z, alpha * z)


_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": lambda z: anp.where(z > 0, z, 0.0 * z),
    "leaky_relu": _leaky_relu(0.01),
    "tanh": anp.tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    # exp of min(z, 0) so the unused branch can never overflow into a NaN gradient
    "elu": lambda z: anp.where(z > 0, z, anp.exp(anp.minimum(z, 0.0)) - 1.0),
    "silu": lambda z: z * _sigmoid(z),
    "sin": anp.sin,
    "softmax": softmax,
}


def activation(act):
    """Map a layer's ``act`` field (None, name, {leaky_relu: a}, expression) to a function."""
    if act is None:
        return _ACTIVATIONS["identity"]
    if isinstance(act, dict):
        (name, alpha), = act.items()
        if name != "leaky_relu":
            raise ValueError(f"unknown parametrised activation {act!r}")
        return _leaky_relu(0.01 if alpha is None else float(alpha))
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    return compile_expression(act, "z")


def penalty_function(p):
    """Map the penalty's ``p`` field to a function of s = ||xi_0||^2."""
    if p is None or p == "squared_norm":
        return lambda s: s
    if p == "norm":
        return anp.sqrt
    return compile_expression(p, "s")


def mse_of_output(x_L, y):
    return anp.sum((x_L - y) ** 2, axis=-1)


def nll_of_output(x_L, y):
    return -anp.sum(y * anp.log(x_L), axis=-1)


def nll_of_logits(z_L, y):
    return -anp.sum(y * log_softmax(z_L), axis=-1)


# --------------------------------------------------------------------------
# Image layers (batch-first, NCHW), written with differentiable autograd.numpy
# --------------------------------------------------------------------------

def conv_output_size(n, kernel, stride=1, padding=0, dilation=1):
    """Output length of torch.nn.Conv2d along one spatial axis."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(x, W, b=None, stride=1, padding=0, dilation=1):
    """Cross-correlation of x (B, Cin, H, W) with W (Cout, Cin, k, k) like torch's Conv2d.

    im2col by slicing: one strided slice of the zero-padded input per kernel offset,
    stacked to (B, Cin, k*k, Ho, Wo) and contracted with W by einsum.  No in-place
    writes, so the tape stays differentiable to any order.
    """
    B, Cin, H, Wd = x.shape
    Cout, Cin_w, k, k2 = W.shape
    assert Cin == Cin_w and k == k2, "conv2d weight does not match the input"
    if padding:
        x = anp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), "constant")
    Ho = conv_output_size(H, k, stride, padding, dilation)
    Wo = conv_output_size(Wd, k, stride, padding, dilation)
    patches = [x[:, :, di * dilation: di * dilation + stride * (Ho - 1) + 1: stride,
                 dj * dilation: dj * dilation + stride * (Wo - 1) + 1: stride]
               for di in range(k) for dj in range(k)]
    cols = anp.stack(patches, axis=2)                       # (B, Cin, k*k, Ho, Wo)
    z = anp.einsum("bcphw,ocp->bohw", cols, anp.reshape(W, (Cout, Cin, k * k)))
    if b is not None:
        z = z + anp.reshape(b, (1, Cout, 1, 1))
    return z


def conv1d(x, W, b=None, stride=1, padding=0, dilation=1):
    """Cross-correlation of x (B, Cin, T) with W (Cout, Cin, k) like torch's Conv1d:
    one strided slice of the zero-padded input per kernel tap, contracted by einsum."""
    B, Cin, T = x.shape
    Cout, Cin_w, k = W.shape
    assert Cin == Cin_w, "conv1d weight does not match the input"
    if padding:
        x = anp.pad(x, ((0, 0), (0, 0), (padding, padding)), "constant")
    To = conv_output_size(T, k, stride, padding, dilation)
    taps = [x[:, :, i * dilation: i * dilation + stride * (To - 1) + 1: stride] for i in range(k)]
    cols = anp.stack(taps, axis=2)                          # (B, Cin, k, To)
    z = anp.einsum("bcpt,ocp->bot", cols, W)
    if b is not None:
        z = z + anp.reshape(b, (1, Cout, 1))
    return z


def avgpool1d(x, k):
    """k-wide mean with stride k; T divisible by k."""
    B, C, T = x.shape
    return anp.mean(anp.reshape(x, (B, C, T // k, k)), axis=3)


def avgpool2d(x, k):
    """k-by-k mean with stride k; H and W divisible by k."""
    B, C, H, Wd = x.shape
    return anp.mean(anp.reshape(x, (B, C, H // k, k, Wd // k, k)), axis=(3, 5))


def space_to_depth(x, k):
    """torch.nn.PixelUnshuffle(k): out[c*k*k + i*k + j, h, w] = x[c, h*k + i, w*k + j]."""
    B, C, H, Wd = x.shape
    blocks = anp.reshape(x, (B, C, H // k, k, Wd // k, k))        # b c h i w j
    blocks = anp.transpose(blocks, (0, 1, 3, 5, 2, 4))            # b c i j h w
    return anp.reshape(blocks, (B, C * k * k, H // k, Wd // k))


_IMAGE_KINDS = ("conv2d", "conv1d", "avgpool", "downsample")
_LAYER_KINDS = ("dense", "flatten") + _IMAGE_KINDS


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------

def _f64(a):
    """Caller data (x, y, v, u) as float64 arrays; None stays None."""
    return None if a is None else np.asarray(a, dtype=np.float64)


_V_KINDS = ("loss_gradient", "output", "given", "jacobian", "projections", "random")


class Oracle:
    """Reference math of one model description (the raw ``yaml.safe_load`` dict)."""

    def __init__(self, spec):
        self.spec = spec
        self.input_shape = tuple(int(n) for n in spec["input"])
        self.layers = self._parse_layers(spec["layers"])
        self.loss_kind = spec.get("loss", "none")
        self.n_out = self.layers[-1]["n_out"]
        self._parse_penalty(spec.get("penalty"))
        self._validate()

    @classmethod
    def from_yaml(cls, path):
        with open(path) as fh:
            return cls(yaml.safe_load(fh))

    # ---- construction -------------------------------------------------

    @staticmethod
    def _normalise_entry(j, entry):
        """A layer list item as a dict; a bare string names a parameter-free layer."""
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict):
            raise ValueError(f"layers[{j - 1}]: expected a mapping, got {entry!r}")
        entry = dict(entry)
        kinds = [key for key in entry if key in _LAYER_KINDS]
        unknown = [key for key in entry if key not in _LAYER_KINDS + ("act", "bias")]
        if len(kinds) != 1 or unknown:
            raise ValueError(f"layers[{j - 1}]: cannot read layer {entry!r}")
        return kinds[0], entry

    def _parse_layers(self, entries):
        layers, shape = [], self.input_shape
        if len(shape) not in (1, 2, 3):
            raise ValueError(f"input must be [n], [C, T] or [C, H, W], got {list(shape)}")
        for j, raw in enumerate(entries, start=1):
            kind, entry = self._normalise_entry(j, raw)
            act_field = entry.get("act")
            layer = {"j": j, "kind": kind, "act": activation(act_field),
                     "softmax": act_field == "softmax", "in_shape": shape,
                     "n_in": int(np.prod(shape)), "bias": False, "params": False}
            where = f"layers[{j - 1}].{kind}"
            if kind == "dense":
                if len(shape) != 1:
                    raise ValueError(f"{where}: input must be a vector, got shape {shape}")
                out_shape = (int(entry["dense"]),)
                layer.update(params=True, bias=bool(entry.get("bias", True)),
                             fan_in=shape[0], W_shape=(out_shape[0], shape[0]))
            elif kind == "flatten":
                if entry["flatten"] not in (None, {}):
                    raise ValueError(f"{where}: takes no arguments")
                out_shape = (int(np.prod(shape)),)
            elif len(shape) == 2 and kind != "downsample" and kind != "conv2d":
                C, T = shape
                if kind == "conv1d":
                    cfg = dict(entry["conv1d"])
                    extra = set(cfg) - {"channels", "kernel", "stride", "padding", "dilation"}
                    if extra:
                        raise ValueError(f"{where}: unknown keys {sorted(extra)}")
                    k = int(cfg["kernel"])
                    geometry = {"stride": int(cfg.get("stride", 1)), "padding": int(cfg.get("padding", 0)),
                                "dilation": int(cfg.get("dilation", 1))}
                    if min(k, int(cfg["channels"]), geometry["stride"], geometry["dilation"]) < 1 \
                            or geometry["padding"] < 0:
                        raise ValueError(f"{where}: invalid configuration {cfg!r}")
                    To = conv_output_size(T, k, **geometry)
                    if To < 1:
                        raise ValueError(f"{where}: kernel larger than its input {shape}")
                    out_shape = (int(cfg["channels"]), To)
                    layer.update(params=True, bias=bool(entry.get("bias", True)), conv=geometry,
                                 fan_in=C * k, W_shape=(int(cfg["channels"]), C, k))
                else:  # avgpool on a sequence
                    k = int(entry[kind])
                    if k < 1 or T % k:
                        raise ValueError(f"{where}: {k} does not divide {T}")
                    layer["k"] = k
                    out_shape = (C, T // k)
            else:
                if len(shape) != 3 or kind == "conv1d":
                    raise ValueError(f"{where}: input must be an image, got shape {shape}")
                C, H, Wd = shape
                if kind == "conv2d":
                    cfg = dict(entry["conv2d"])
                    extra = set(cfg) - {"channels", "kernel", "stride", "padding", "dilation"}
                    if extra:
                        raise ValueError(f"{where}: unknown keys {sorted(extra)}")
                    conv = {"channels": int(cfg["channels"]), "kernel": int(cfg["kernel"]),
                            "stride": int(cfg.get("stride", 1)),
                            "padding": int(cfg.get("padding", 0)),
                            "dilation": int(cfg.get("dilation", 1))}
                    positive = ("channels", "kernel", "stride", "dilation")
                    if min(conv[key] for key in positive) < 1 or conv["padding"] < 0:
                        raise ValueError(f"{where}: invalid configuration {cfg!r}")
                    geometry = {key: conv[key] for key in ("stride", "padding", "dilation")}
                    Ho = conv_output_size(H, conv["kernel"], **geometry)
                    Wo = conv_output_size(Wd, conv["kernel"], **geometry)
                    if Ho < 1 or Wo < 1:
                        raise ValueError(f"{where}: kernel larger than its input {shape}")
                    k = conv["kernel"]
                    out_shape = (conv["channels"], Ho, Wo)
                    layer.update(params=True, bias=bool(entry.get("bias", True)), conv=geometry,
                                 fan_in=C * k * k, W_shape=(conv["channels"], C, k, k))
                else:
                    k = int(entry[kind])
                    if k < 1 or H % k or Wd % k:
                        raise ValueError(f"{where}: {k} does not divide {H}x{Wd}")
                    layer["k"] = k
                    out_shape = ((C, H // k, Wd // k) if kind == "avgpool"
                                 else (C * k * k, H // k, Wd // k))
            if "bias" in entry and not layer["params"]:
                raise ValueError(f"layers[{j - 1}]: {kind} has no bias")
            layer.update(out_shape=out_shape, n_out=int(np.prod(out_shape)))
            layers.append(layer)
            shape = out_shape
        if len(shape) != 1:
            raise ValueError(f"the last layer must output a vector, got shape {shape}")
        return layers

    def _parse_penalty(self, pen):
        self.has_penalty = pen is not None
        pen = pen or {}
        self.v_kind = pen.get("v", "loss_gradient")
        self.v_index = int(pen.get("index", 0))
        self.p = penalty_function(pen.get("p", "squared_norm"))
        self.weight = float(pen.get("weight", 1.0))
        self.on_logits = pen.get("on", "output") == "logits"
        self.iterations = int(pen.get("iterations", 0))

    def _validate(self):
        if self.loss_kind not in ("mse", "nll", "none"):
            raise ValueError(f"unknown loss {self.loss_kind!r}")
        if self.v_kind not in _V_KINDS:
            raise ValueError(f"unknown penalty v {self.v_kind!r}")
        if self.loss_kind == "nll" and not self.layers[-1]["softmax"]:
            raise ValueError("nll requires a softmax output layer")
        if any(layer["softmax"] for layer in self.layers[:-1]):
            raise ValueError("softmax is allowed on the last layer only")

    def init_params(self, seed=0):
        """PyTorch-style uniform(-k, k), k = 1/sqrt(fan_in); W then b per parametrised layer.

        fan_in is n_in for dense (nn.Linear), Cin*kernel*kernel for conv2d (nn.Conv2d) and
        Cin*kernel for conv1d (nn.Conv1d); parameter-free layers draw nothing.
        """
        rng, params = np.random.default_rng(seed), {}
        for layer in self.layers:
            if not layer["params"]:
                continue
            j, W_shape = layer["j"], layer["W_shape"]
            k = 1.0 / np.sqrt(layer["fan_in"])
            params[f"W{j}"] = rng.uniform(-k, k, W_shape)
            if layer["bias"]:
                params[f"b{j}"] = rng.uniform(-k, k, W_shape[0])
        return params

    # ---- forward and loss ---------------------------------------------

    def _forward_both(self, params, x):
        """Return (z_L, x_L) for a batch x of shape (B, *input)."""
        h = x
        for layer in self.layers:
            z = self._pre_activation(layer, params, h)
            h = layer["act"](z)
        return z, h

    @staticmethod
    def _pre_activation(layer, params, h):
        j, kind = layer["j"], layer["kind"]
        if kind == "flatten":
            return anp.reshape(h, (h.shape[0], -1))
        if kind == "avgpool":
            return avgpool1d(h, layer["k"]) if len(layer["in_shape"]) == 2 else avgpool2d(h, layer["k"])
        if kind == "downsample":
            return space_to_depth(h, layer["k"])
        bias = params[f"b{j}"] if layer["bias"] else None
        if kind == "conv2d":
            return conv2d(h, params[f"W{j}"], bias, **layer["conv"])
        if kind == "conv1d":
            return conv1d(h, params[f"W{j}"], bias, **layer["conv"])
        z = anp.dot(h, params[f"W{j}"].T)
        if bias is not None:
            z = z + bias
        return z

    def _x_L(self, params, x):
        return self._forward_both(params, x)[1]

    def forward(self, params, x):
        return self._x_L(params, _f64(x))

    def _penalised_output(self, params, x):
        """The `out` of the penalty: z_L for `on: logits`, otherwise x_L."""
        z_L, x_L = self._forward_both(params, x)
        return z_L if self.on_logits else x_L

    def _loss_of_xL(self, x_L, y):
        if self.loss_kind == "mse":
            return mse_of_output(x_L, y)
        if self.loss_kind == "nll":
            return nll_of_output(x_L, y)
        return 0.0 * anp.sum(x_L, axis=-1)

    def _loss_of_zL(self, z_L, y):
        if self.loss_kind == "nll":
            return nll_of_logits(z_L, y)  # stable log-softmax
        return self._loss_of_xL(self.layers[-1]["act"](z_L), y)

    def _loss_of_out(self, out, y):
        return self._loss_of_zL(out, y) if self.on_logits else self._loss_of_xL(out, y)

    def loss(self, params, x, y=None):
        x, y = _f64(x), _f64(y)
        z_L, _ = self._forward_both(params, x)
        return self._loss_of_zL(z_L, y)

    def input_grad(self, params, x, y):
        """grad_x of each sample's own loss l(x_L, y), (B, *input)."""
        x, y = _f64(x), _f64(y)
        return autograd.grad(lambda x0: anp.sum(self._loss_of_zL(self._forward_both(params, x0)[0], y)))(x)

    # ---- xi_0 and the penalty -----------------------------------------

    def _vjp_of(self, out_fn, params, x, v):
        """Per-sample (d out/d x_0)^T v; v may itself depend on params (not held constant)."""
        return autograd.grad(lambda x0: anp.sum(out_fn(params, x0) * v))(x)

    def _xi0(self, params, x, v):
        return self._vjp_of(self._penalised_output, params, x, v)

    def _loss_gradient_v(self, params, x, y):
        """v = grad_out l(out, y), still a function of the network (classical DBP)."""
        out = self._penalised_output(params, x)
        return autograd.grad(lambda o: anp.sum(self._loss_of_out(o, y)))(out)

    def _unit(self, i, batch):
        v = np.zeros((batch, self.n_out))
        v[:, i] = 1.0
        return v

    def _power_iterated(self, params, x, v):
        """`random` with a caller-supplied start: normalise, k power iterations, constant."""
        params = {k: getval(p) for k, p in params.items()}
        x, v = getval(x), np.asarray(getval(v), dtype=np.float64)
        v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        for _ in range(self.iterations):
            v = self._jvp_of(self._penalised_output, params, x, self._xi0(params, x, v))
            v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        return v

    def _xi0_list(self, params, x, y, v):
        """List of (factor, xi_0) pairs with R = sum factor * p(||xi_0||^2)."""
        batch = x.shape[0]
        if self.v_kind == "loss_gradient":
            return [(1.0, self._xi0(params, x, self._loss_gradient_v(params, x, y)))]
        if self.v_kind == "output":
            return [(1.0, self._xi0(params, x, self._unit(self.v_index, batch)))]
        if self.v_kind == "jacobian":
            return [(1.0, self._xi0(params, x, self._unit(i, batch))) for i in range(self.n_out)]
        if v is None:
            raise ValueError(f"v: {self.v_kind} needs an explicit v in the oracle")
        if self.v_kind == "given":
            return [(1.0, self._xi0(params, x, v))]
        if self.v_kind == "projections":  # v: (B, n, C)
            n = v.shape[1]
            return [(self.n_out / n, self._xi0(params, x, v[:, k])) for k in range(n)]
        return [(1.0, self._xi0(params, x, self._power_iterated(params, x, v)))]

    def penalty(self, params, x, y=None, v=None):
        """Per-sample R = p(||xi_0||^2), shape (B,); zeros when the model has no penalty."""
        x, y, v = _f64(x), _f64(y), _f64(v)
        if not self.has_penalty:
            return np.zeros(x.shape[0])
        total = 0.0
        for factor, xi0 in self._xi0_list(params, x, y, v):
            s = anp.sum(anp.reshape(xi0 ** 2, (x.shape[0], -1)), axis=1)
            total = total + factor * self.p(s)
        return total

    def xi0(self, params, x, y=None, v=None):
        """xi_0 of a single-vector penalty (loss_gradient / output / given), (B, *input)."""
        pairs = self._xi0_list(params, _f64(x), _f64(y), _f64(v))
        assert len(pairs) == 1, "xi0() is defined for single-vector penalties"
        return pairs[0][1]

    # ---- objective and gradients --------------------------------------

    def objective(self, params, x, y=None, v=None):
        x, y, v = _f64(x), _f64(y), _f64(v)
        per_sample = self.loss(params, x, y)
        if self.has_penalty:
            per_sample = per_sample + self.weight * self.penalty(params, x, y, v)
        return anp.mean(per_sample)

    def value_and_grad(self, params, x, y=None, v=None):
        params = {k: _f64(p) for k, p in params.items()}
        value, grads = autograd.value_and_grad(
            lambda p: self.objective(p, x, y, v))(params)
        return float(value), {k: np.asarray(g) for k, g in grads.items()}

    # ---- Jacobian products of x_L (regardless of `on`) -----------------

    def _jvp_of(self, out_fn, params, x, u):
        """(d out/d x_0) u per sample, as the gradient of the linear map w -> <J^T w, u>."""
        w0 = np.zeros((x.shape[0], self.n_out))
        return autograd.grad(
            lambda w: anp.sum(self._vjp_of(out_fn, params, x, w) * u))(w0)

    def vjp(self, params, x, v):
        return self._vjp_of(self._x_L, params, _f64(x), _f64(v))

    def jvp(self, params, x, u):
        return self._jvp_of(self._x_L, params, _f64(x), _f64(u))


# --------------------------------------------------------------------------
# Numerical gradient helpers
# --------------------------------------------------------------------------

def _shifted(params, direction, step):
    return {k: params[k] + step * direction[k] for k in params}


def central_difference_grad(f, params, eps=1e-6):
    """Numerical gradient of a scalar f(params) by central differences, element by element."""
    grads = {}
    for name, value in params.items():
        g = np.zeros_like(value, dtype=np.float64)
        for idx in np.ndindex(value.shape):
            basis = {k: np.zeros_like(p, dtype=np.float64) for k, p in params.items()}
            basis[name][idx] = 1.0
            g[idx] = (float(f(_shifted(params, basis, eps)))
                      - float(f(_shifted(params, basis, -eps)))) / (2 * eps)
        grads[name] = g
    return grads


def directional_check(f, grads, params, rng, eps=1e-6):
    """(analytic <grads, d>, numeric central difference of f along d) for a random d."""
    direction = {k: rng.standard_normal(np.shape(p)) for k, p in params.items()}
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in params)
    numeric = (float(f(_shifted(params, direction, eps)))
               - float(f(_shifted(params, direction, -eps)))) / (2 * eps)
    return analytic, numeric
