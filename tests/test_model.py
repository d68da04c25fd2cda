"""The model loader (dbpgen.model) and the safe expression parser (dbpgen.expr)."""
from __future__ import annotations

import builtins
import copy
import hashlib
import pickle
from pathlib import Path

import pytest
import sympy as sp
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dbpgen import expr as expr_module
from dbpgen import functions
from dbpgen.errors import ModelError
from dbpgen.expr import parse_expression
from dbpgen.ir import S, Z, Activation, SoftmaxActivation
from dbpgen.model import load_model, model_from_dict
from dbpgen.operators._base import BUFFER_ELEMENTS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BASE = {
    "name": "net",
    "input": [3],
    "layers": [{"dense": 4, "act": "relu"}, {"dense": 2}],
    "loss": "mse",
}
DELETE = object()


def write(tmp_path: Path, data: dict | str | bytes) -> Path:
    path = tmp_path / "model.yaml"
    if isinstance(data, dict):
        data = yaml.safe_dump(data)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def variant(**top) -> dict:
    """BASE with some top-level keys replaced (DELETE removes one)."""
    data = copy.deepcopy(BASE)
    for key, value in top.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    return data


def load(tmp_path: Path, data: dict | str):
    return load_model(write(tmp_path, data))


def act_of(tmp_path: Path, act) -> Activation:
    return load(tmp_path, variant(layers=[{"dense": 2, "act": act}])).layers[0].act


# --- benchmarks ----------------------------------------------------------------------

BENCHMARK_EXPECTED = {
    "sine_cdb": ((1,), [(8,), (5,), (1,)], "mse", "loss_gradient", None),
    "tanh_node": ((64,), [(128,), (128,), (8,)], "mse", "output", 0),
    "mnist_cdb": ((784,), [(256,), (256,), (10,)], "nll", "loss_gradient", None),
    "mnist_jac": ((784,), [(256,), (256,), (10,)], "none", "jacobian", None),
}


@pytest.mark.parametrize("name", sorted(BENCHMARK_EXPECTED))
def test_benchmarks_load(name):
    path = BENCHMARKS / f"{name}.yaml"
    model = load_model(path)
    input_shape, out_shapes, loss, v, index = BENCHMARK_EXPECTED[name]
    assert (model.name, model.dtype, model.L, model.loss) == (name, "float64", 3, loss)
    assert model.input_shape == input_shape
    assert [layer.out_shape for layer in model.layers] == out_shapes
    assert [layer.in_shape for layer in model.layers] == [input_shape] + out_shapes[:-1]
    assert [layer.index for layer in model.layers] == [1, 2, 3]
    assert model.n_outputs == out_shapes[-1][0]
    penalty = model.penalty
    assert (penalty.v, penalty.p_name, penalty.p, penalty.weight) == (v, "squared_norm", S, 0.1)
    assert penalty.index == index and not penalty.on_logits
    assert model.source == str(path)
    assert model.source_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_defaults(tmp_path):
    model = load(tmp_path, variant(loss=DELETE, penalty={"v": "given"}))
    assert (model.dtype, model.loss) == ("float64", "none")
    pen = model.penalty
    assert (pen.p_name, pen.p, pen.weight, pen.on_logits) == ("squared_norm", S, 1.0, False)
    assert model.layers[1].act.name == "identity" and model.layers[1].act.expr == Z
    assert model.layers[0].op.bias is True


def test_model_from_dict_without_file():
    model = model_from_dict(variant(dtype="float32"), "memory")
    assert (model.source, model.source_hash, model.dtype) == ("memory", "", "float32")


def test_bias_false(tmp_path):
    model = load(tmp_path, variant(layers=[{"dense": 2, "bias": False}]))
    assert model.layers[0].op.bias is False


def test_conv1d_sequence_model(tmp_path):
    model = load(tmp_path, variant(input=[2, 17], layers=[
        {"conv1d": {"channels": 3, "kernel": 3, "stride": 2, "padding": 2, "dilation": 2}, "act": "relu"},
        {"conv1d": {"channels": 4, "kernel": 1}, "bias": False},
        {"avgpool": 3}, "flatten", {"dense": 2}]))
    conv, pointwise, pool, flat, dense = (layer.op for layer in model.layers)
    assert model.input_shape == (2, 17)
    # torch.nn.Conv1d: (17 + 2*2 - 2*(3-1) - 1) // 2 + 1 = 9
    assert [layer.out_shape for layer in model.layers] == [(3, 9), (4, 9), (4, 3), (12,), (2,)]
    assert (conv.kind, conv.out, conv.kernel, conv.stride, conv.padding, conv.dilation, conv.bias) == \
        ("conv1d", 3, 3, 2, 2, 2, True)
    assert conv.weight_shape((2, 17)) == (3, 2, 3) and conv.fan_in((2, 17)) == 6
    assert pointwise.bias is False and pointwise.weight_shape((3, 9)) == (4, 3, 1)
    chunk = BUFFER_ELEMENTS // (2 * 3 * 9)  # samples whose im2col buffers (2 * 3 rows, 9 columns) fit
    assert conv.kernel_args("K", (2, 17)) == (2, 2, 2, chunk)
    assert conv.kernel_args("KT", (2, 17)) == (2, 2, 2, 17, chunk)
    assert conv.kernel_args("Kbox", (2, 17)) == (2, 2, 2, 3, chunk)
    assert conv.flops((2, 17)) == 2 * 3 * 9 * 2 * 3
    assert pool.kernel_name("K", (4, 9)) == "_avgpool1d_K" and flat.kernel_name("KT", (4, 3)) == "_flatten1d_KT"
    assert conv.bias_shape((3, 9)) == (3, 1) and dense.bias_shape((2,)) == (2,)
    assert (conv.small_kernels, conv.gram, conv.lanes, conv.stacked_kbox) == (False, False, False, False)
    assert (dense.gram, dense.lanes, dense.stacked_kbox) == (True, True, True)


def test_operator_registry():
    from dbpgen import ir, operators
    from dbpgen.model import OPERATORS

    assert OPERATORS == operators.OPERATORS == ("dense", "conv2d", "conv1d", "avgpool", "downsample", "flatten")
    for kind in OPERATORS:
        module = operators.get(kind)
        assert module.KIND == kind and module.OP.kind == kind and module.TEMPLATE == f"ops/{kind}.py.j2"
        assert (Path(__file__).resolve().parent.parent / "templates" / module.TEMPLATE).is_file()
        assert getattr(ir, module.OP.__name__) is module.OP  # re-exported by dbpgen.ir
    assert [k for k in OPERATORS if operators.has_params(k)] == ["dense", "conv2d", "conv1d"]


# --- activations -----------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("identity", Z),
    ("relu", sp.Max(Z, 0)),
    ("leaky_relu", sp.Piecewise((Z, Z > 0), (sp.Float(0.01) * Z, True))),
    ("tanh", sp.tanh(Z)),
    ("sigmoid", functions.Sigmoid(Z)),
    ("softplus", functions.Softplus(Z)),
    ("elu", sp.Piecewise((Z, Z > 0), (sp.exp(Z) - 1, True))),
    ("silu", Z * functions.Sigmoid(Z)),
    ("sin", sp.sin(Z)),
])
def test_builtin_activations(tmp_path, name, expected):
    act = act_of(tmp_path, name)
    assert act == Activation(name, expected)


def test_softmax_last_layer(tmp_path):
    model = load(tmp_path, variant(layers=[{"dense": 4}, {"dense": 3, "act": "softmax"}],
                                   loss="nll"))
    assert model.layers[-1].act == SoftmaxActivation() and model.layers[-1].act.is_softmax


@pytest.mark.parametrize("alpha, name", [(0.2, "leaky_relu(0.2)"), (1, "leaky_relu(1.0)")])
def test_leaky_relu_alpha(tmp_path, alpha, name):
    act = act_of(tmp_path, {"leaky_relu": alpha})
    assert act.name == name
    assert act.expr == sp.Piecewise((Z, Z > 0), (sp.Float(alpha) * Z, True))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 1e-3 as the string "1e-3"
    text = ("name: net\ninput: [3]\nlayers:\n  - {dense: 2, act: {leaky_relu: 1e-3}}\n"
            "loss: mse\npenalty: {v: given, weight: 2e-1}\n")
    model = load(tmp_path, text)
    assert model.layers[0].act.name == "leaky_relu(0.001)"
    assert model.penalty.weight == 0.2


@pytest.mark.parametrize("text, expected", [
    ("z*tanh(log(1 + exp(z)))", Z * sp.tanh(sp.log(1 + sp.exp(Z)))),
    ("max(z, 0.1*z)", sp.Max(Z, sp.Float(0.1) * Z)),
    ("z * sigmoid(z) + softplus(-z)", Z * functions.Sigmoid(Z) + functions.Softplus(-Z)),
    ("Abs(z)**2 / 2 - pi + E", sp.Abs(Z) ** 2 / 2 - sp.pi + sp.E),
    ("z", Z),
])
def test_expression_activation(tmp_path, text, expected):
    assert act_of(tmp_path, text) == Activation(text, expected)


@pytest.mark.parametrize("text, expected", [
    ("squared_norm", S),
    ("norm", sp.sqrt(S)),
    ("(sqrt(s) - 1)**2", (sp.sqrt(S) - 1) ** 2),
])
def test_penalty_function(tmp_path, text, expected):
    model = load(tmp_path, variant(penalty={"v": "given", "p": text}))
    assert (model.penalty.p_name, model.penalty.p) == (text, expected)


# --- penalties -----------------------------------------------------------------------

@pytest.mark.parametrize("penalty, fields", [
    ({"v": "output", "index": 1}, {"index": 1}),
    ({"v": "output"}, {"index": 0}),
    ({"v": "given", "weight": 3}, {"weight": 3.0, "index": None}),
    ({"v": "jacobian", "algorithm": "naive"}, {"algorithm": "naive"}),
    ({"v": "random", "iterations": 5, "seed": 7}, {"iterations": 5, "seed": 7}),
    ({"v": "projections", "count": 4, "seed": 1}, {"count": 4, "seed": 1}),
    ({"v": "loss_gradient"}, {"weight": 1.0, "p_name": "squared_norm", "on_logits": False}),
])
def test_penalty_fields(tmp_path, penalty, fields):
    model = load(tmp_path, variant(penalty=penalty))
    for key, value in fields.items():
        assert getattr(model.penalty, key) == value


def test_penalty_on_logits_unquoted(tmp_path):
    # YAML 1.1 reads an unquoted `on` key as true
    text = "name: net\ninput: [3]\nlayers: [{dense: 2}]\npenalty: {v: given, on: logits}\n"
    assert load(tmp_path, text).penalty.on_logits is True
    assert load(tmp_path, variant(penalty={"v": "given", "on": "logits"})).penalty.on_logits


# --- errors --------------------------------------------------------------------------

L0 = "layers[0]"
ERRORS = [
    # top level
    (variant(name=DELETE), "name", "required key is missing"),
    (variant(nmae="x"), "nmae", "unknown key"),
    (variant(name="models/net"), "name", "identifier"),
    (variant(name="my.net"), "name", "identifier"),
    (variant(name="class"), "name", "cannot be the name"),
    (variant(name=3), "name", "identifier"),
    (variant(dtype="float16"), "dtype", "must be one of float64, float32"),
    (variant(input=DELETE), "input", "required key is missing"),
    (variant(input=[1, 28, 28]), "layers[0].dense", "dense needs a vector input"),
    (variant(input=[2, 3]), "layers[0].dense", "dense needs a vector input, got a sequence [2, 3]: put flatten"),
    (variant(input=[2, 3, 4, 5]), "input", "must be [n], [channels, length] or [channels, height, width]"),
    (variant(input=[]), "input", "must be a list"),
    (variant(input=3), "input", "must be a list"),
    (variant(input=[0]), "input[0]", "must be positive"),
    (variant(input=[True]), "input[0]", "must be an integer"),
    (variant(input=[2.0]), "input[0]", "must be an integer"),
    (variant(layers=[]), "layers", "non-empty list"),
    (variant(layers=DELETE), "layers", "required key is missing"),
    # layers
    (variant(layers=[{"dense": 4}, {"dense": 0}]), "layers[1].dense", "must be positive"),
    (variant(layers=[{"dense": 2.5}]), f"{L0}.dense", "must be an integer"),
    (variant(layers=[{"dense": True}]), f"{L0}.dense", "must be an integer"),
    (variant(layers=[{"dense": 2, "bias": "yes"}]), f"{L0}.bias", "true or false"),
    (variant(layers=[{"dense": 2, "acts": "relu"}]), f"{L0}.acts", "unknown key"),
    (variant(layers=[{"dens": 2}]), f"{L0}.dens", "unknown operator"),
    (variant(layers=["relu"]), L0, "unknown operator 'relu'"),
    (variant(layers=[5]), L0, "must be a mapping"),
    (variant(layers=[{"act": "relu"}]), L0, "exactly one operator"),
    (variant(layers=[{"dense": 2, "avgpool": 2}]), L0, "exactly one operator"),
    (variant(layers=[{"conv2d": {"channels": 4, "kernel": 3}}]), f"{L0}.conv2d", "needs an image input"),
    (variant(layers=[{"avgpool": 2}]), f"{L0}.avgpool", "needs an image input"),
    (variant(layers=[{"downsample": 2}]), f"{L0}.downsample", "needs an image input"),
    (variant(layers=["flatten"]), f"{L0}.flatten", "needs an image input"),
    (variant(layers=[{"flatten": None}]), f"{L0}.flatten", "needs an image input"),
    # image layers
    (variant(input=[1, 6, 6], layers=[{"conv2d": {"channels": 2, "kernel": 7}}, "flatten"]),
     f"{L0}.conv2d.kernel", "more than the padded input"),
    (variant(input=[1, 6, 6], layers=[{"conv2d": {"channels": 2, "kernel": 3, "dilation": 3}}, "flatten"]),
     f"{L0}.conv2d.kernel", "more than the padded input"),
    (variant(input=[1, 6, 6], layers=[{"conv2d": {"channels": 2}}, "flatten"]),
     f"{L0}.conv2d.kernel", "required key is missing"),
    (variant(input=[1, 6, 6], layers=[{"conv2d": {"channels": 2, "kernel": 3, "strides": 2}}, "flatten"]),
     f"{L0}.conv2d.strides", "unknown key"),
    (variant(input=[1, 6, 6], layers=[{"avgpool": 4}, "flatten"]), f"{L0}.avgpool", "not divisible by 4"),
    (variant(input=[1, 6, 6], layers=[{"downsample": 4}, "flatten"]), f"{L0}.downsample", "not divisible"),
    (variant(input=[1, 6, 6], layers=[{"avgpool": 2, "bias": False}, "flatten"]), f"{L0}.bias", "no parameters"),
    (variant(input=[1, 6, 6], layers=[{"avgpool": 2}]), L0, "must end in a vector"),
    (variant(input=[1, 6, 6], layers=["flatten", "flatten"]), "layers[1].flatten", "needs an image input"),
    # sequence layers (input [C, T])
    (variant(layers=[{"conv1d": {"channels": 4, "kernel": 3}}]), f"{L0}.conv1d",
     "conv1d needs a sequence input [channels, length], got a vector [3]"),
    (variant(input=[1, 6, 6], layers=[{"conv1d": {"channels": 2, "kernel": 3}}, "flatten"]), f"{L0}.conv1d",
     "got an image [1, 6, 6]: use conv2d"),
    (variant(input=[2, 8], layers=[{"conv2d": {"channels": 2, "kernel": 3}}, "flatten"]), f"{L0}.conv2d",
     "got a sequence [2, 8]: use conv1d"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 9}}, "flatten"]),
     f"{L0}.conv1d.kernel", "kernel spans 9 samples, more than the padded input length 8"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 4, "dilation": 3}}, "flatten"]),
     f"{L0}.conv1d.kernel", "kernel spans 10 samples"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 4, "dilation": 4, "padding": 1}},
                                   "flatten", {"dense": 2}]), f"{L0}.conv1d.kernel", "spans 13 samples, more than the padded input length 10"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2}}, "flatten"]),
     f"{L0}.conv1d.kernel", "required key is missing"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3, "strides": 2}}, "flatten"]),
     f"{L0}.conv1d.strides", "unknown key"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3, "stride": 0}}, "flatten"]),
     f"{L0}.conv1d.stride", "must be positive"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3, "padding": -1}}, "flatten"]),
     f"{L0}.conv1d.padding", "must be non-negative"),
    (variant(input=[2, 8], layers=[{"conv1d": 3}, "flatten"]), f"{L0}.conv1d", "must be a mapping"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3}, "bias": 0}, "flatten"]),
     f"{L0}.bias", "true or false"),
    (variant(input=[2, 8], layers=[{"avgpool": 3}, "flatten"]), f"{L0}.avgpool", "length 8 is not divisible by 3"),
    (variant(input=[2, 8], layers=[{"downsample": 2}, "flatten"]), f"{L0}.downsample",
     "downsample needs an image input [channels, height, width], got a sequence [2, 8]: downsample is 2-D only"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3}}]), L0,
     "must end in a vector, not a sequence of shape [2, 6]"),
    (variant(input=[2, 8], layers=["flatten", "flatten"]), "layers[1].flatten", "got a vector [16]"),
    # activations
    (variant(layers=[{"dense": 4, "act": "relux"}, {"dense": 1}]), f"{L0}.act",
     "unknown activation 'relux'"),
    (variant(layers=[{"dense": 4}, {"dense": 1, "act": "ReLU"}]), "layers[1].act",
     "unknown activation 'ReLU'"),
    (variant(layers=[{"dense": 4, "act": "softmax"}, {"dense": 1}]), f"{L0}.act",
     "last layer only"),
    (variant(layers=[{"dense": 4, "act": {"relu": 1}}]), f"{L0}.act", "only {leaky_relu"),
    (variant(layers=[{"dense": 4, "act": {"leaky_relu": "a"}}]), f"{L0}.act.leaky_relu",
     "must be a number"),
    (variant(layers=[{"dense": 4, "act": {"leaky_relu": True}}]), f"{L0}.act.leaky_relu",
     "must be a number"),
    (variant(layers=[{"dense": 4, "act": 3}]), f"{L0}.act", "must be an activation name"),
    (variant(layers=[{"dense": 4, "act": None}]), f"{L0}.act", "must be an activation name"),
    (variant(layers=[{"dense": 4, "act": "z +"}]), f"{L0}.act", "cannot parse expression"),
    (variant(layers=[{"dense": 4, "act": "x**2"}]), f"{L0}.act", "unknown name 'x'"),
    (variant(layers=[{"dense": 4, "act": "foo(z)"}]), f"{L0}.act", "unknown function 'foo'"),
    (variant(layers=[{"dense": 4, "act": "Piecewise((z, z > 0), (0.2*z, True))"}]), f"{L0}.act",
     "Piecewise is not supported: write the pieces with Heaviside, sign, Max or Min"),
    (variant(layers=[{"dense": 4, "act": "1/(z-z)"}]), f"{L0}.act", "not finite"),
    (variant(layers=[{"dense": 4, "act": "1 + 0*z"}, {"dense": 1}]), f"{L0}.act",
     "'1 + 0*z' is the constant 1: an activation must depend on z"),
    (variant(layers=[{"dense": 4, "act": "tanh"}, {"dense": 2, "act": "3"}]), "layers[1].act",
     "'3' is the constant 3"),
    (variant(input=[2, 8], layers=[{"conv1d": {"channels": 2, "kernel": 3}, "act": "exp(z - z)"}, "flatten",
                                   {"dense": 1}]), f"{L0}.act", "is the constant 1"),
    # loss
    (variant(loss="mae"), "loss", "must be one of mse, nll, none, not 'mae'"),
    (variant(loss="nll"), "loss", "softmax"),
    # penalty
    (variant(penalty="cdb"), "penalty", "must be a mapping"),
    (variant(penalty={}), "penalty.v", "required key is missing"),
    (variant(penalty={"v": "given", "wieght": 1}), "penalty.wieght", "unknown key"),
    (variant(penalty={"v": "fro"}), "penalty.v", "must be one of"),
    (variant(loss="none", penalty={"v": "loss_gradient"}), "penalty.v", "needs a loss"),
    (variant(penalty={"v": "given", "p": "foo"}), "penalty.p",
     "unknown penalty function 'foo'"),
    (variant(penalty={"v": "given", "p": "z**2"}), "penalty.p", "unknown name 'z'"),
    (variant(penalty={"v": "given", "p": 2}), "penalty.p", "must be squared_norm"),
    (variant(penalty={"v": "given", "weight": "heavy"}), "penalty.weight", "must be a number"),
    (variant(penalty={"v": "given", "weight": True}), "penalty.weight", "must be a number"),
    (variant(penalty={"v": "given", "weight": float("inf")}), "penalty.weight", "finite"),
    (variant(penalty={"v": "given", "on": "inputs"}), "penalty.on", "outputs, logits"),
    (variant(penalty={"v": "jacobian", "index": 0}), "penalty.index", "only used with v: output"),
    (variant(penalty={"v": "output", "index": 2}), "penalty.index", "must be in 0..1"),
    (variant(penalty={"v": "output", "index": -1}), "penalty.index", "must be in 0..1"),
    (variant(penalty={"v": "output", "index": "0"}), "penalty.index", "must be an integer"),
    (variant(penalty={"v": "output", "algorithm": "naive"}), "penalty.algorithm",
     "only used with v: jacobian or projections"),
    (variant(penalty={"v": "jacobian", "algorithm": "fast"}), "penalty.algorithm",
     "must be one of auto, naive, optimized"),
    (variant(penalty={"v": "given", "iterations": 2}), "penalty.iterations",
     "only used with v: random"),
    (variant(penalty={"v": "random", "iterations": -1}), "penalty.iterations", "non-negative"),
    (variant(penalty={"v": "projections", "count": 0}), "penalty.count", "must be positive"),
    (variant(penalty={"v": "projections", "count": 10 ** 11}), "penalty.count", "is 100,000,000,000; at most 1,000,000"),
    (variant(penalty={"v": "random", "iterations": 10 ** 12}), "penalty.iterations", "at most 1,000,000"),
    (variant(penalty={"v": "random", "seed": 2 ** 63}), "penalty.seed", "at most 9,223,372,036,854,775,807"),
    (variant(penalty={"v": "random", "count": 2}), "penalty.count",
     "only used with v: projections"),
    (variant(penalty={"v": "output", "seed": 1}), "penalty.seed",
     "only used with v: random or projections"),
    (variant(penalty={"v": "random", "seed": -1}), "penalty.seed", "non-negative"),
    # file level
    ([1, 2], "(top level)", "must be a mapping"),
    ("", "(top level)", "the file is empty"),
    ("name: net\ninput: [3\nlayers: []\n", "yaml", "at line 3"),
    ("name: net\n  input: [3]\n", "yaml", "at line 2"),
    ("!!python/object/apply:os.system ['true']\n", "yaml", "constructor"),
    ("name: " + "9" * 5000 + "\n", "yaml", "Exceeds the limit"),
    ("[" * 5000 + "]" * 5000, "yaml", "nested too deeply"),
    (b"name: \xff\n", "yaml", "not UTF-8"),
]


@pytest.mark.parametrize("data, field, fragment", ERRORS)
def test_errors_name_the_field(tmp_path, data, field, fragment):
    path = write(tmp_path, data if isinstance(data, (dict, str, bytes)) else yaml.safe_dump(data))
    with pytest.raises(ModelError) as info:
        load_model(path)
    error = info.value
    assert str(error).startswith(f"{path}: {field}: "), str(error)
    assert (error.source, error.field) == (str(path), field)
    assert fragment in error.message
    assert "\n" not in str(error)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ModelError, match="absent.yaml: file: no such file$"):
        load_model(path)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match=": file: "):
        load_model(tmp_path)


def test_model_error_format_and_pickle():
    error = ModelError("model.yaml", "layers[2].act", "unknown activation 'relux'")
    assert str(error) == "model.yaml: layers[2].act: unknown activation 'relux'"
    copy_ = pickle.loads(pickle.dumps(error))
    assert (copy_.source, copy_.field, copy_.message, str(copy_)) == (
        error.source, error.field, error.message, str(error))


# --- safety --------------------------------------------------------------------------

INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w')\")",
    "eval(\"open('{marker}', 'w')\")",
    "().__class__.__bases__",
    "z.__class__",
    "exec('1')",
    "lambda: 1",
    "[z]",
    "'a'",
    "__builtins__",
    "getattr(z, 'func')",
    "[c for c in ().__class__.__base__.__subclasses__()]",
    "exp(*[z])",
    "exp(z=1)",
    "Symbol('x')",
    "sympify('z')",
    "z if z else z",
    "(z := 1)",
    "z[0]",
    "{z: 1}",
    "f'{z}'",
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("where", ["act", "p"])
def test_code_injection_is_refused(tmp_path, payload, where):
    marker = tmp_path / "pwned"
    text = payload.replace("{marker}", str(marker))
    if where == "act":
        data = variant(layers=[{"dense": 2, "act": text}])
        field = f"{L0}.act"
    else:
        data = variant(penalty={"v": "given", "p": text.replace("z", "s")})
        field = "penalty.p"
    with pytest.raises(ModelError) as info:
        load(tmp_path, data)
    assert info.value.field == field
    assert not marker.exists()


def test_yaml_tags_do_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ModelError, match=": yaml: "):
        load(tmp_path, text)
    assert not marker.exists()


def test_parser_never_evaluates_text(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("user text was evaluated")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(sp, "sympify", refuse)
    monkeypatch.setattr("sympy.parsing.sympy_parser.parse_expr", refuse)
    text = ("z*tanh(log(1 + exp(z))) + max(z, 0.1*z) + sigmoid(z)*softplus(z) + Abs(z) + "
            "sign(z) + Heaviside(z) + erf(z) + atan(z) + asinh(z) + sqrt(z) + min(z, 1, 2)")
    assert parse_expression(text, Z, "m", "f").has(functions.Softplus)


@pytest.mark.parametrize("text, fragment", [
    ("z" + " " * 500, "longer than 500"),
    ("9**9**9", "exponent larger than 64"),
    ("z**65", "exponent larger than 64"),
    ("z**-65.0", "exponent larger than 64"),
    ("((2**64)**64)**64", "constant power is too large"),
    ("((z + 1)**64)**64", "exponent larger than 64"),
    ("z**40 * z**40", "exponent larger than 64"),
    ("-" * 60 + "z", "nested more than 50"),
    ("exp(" * 51 + "z" + ")" * 51, "nested more than 50"),
    ("(" * 240 + "z" + ")" * 240, "cannot parse"),
    ("1e999", "too large"),
    ("1e308 * 10.0", "too large"),
])
def test_denial_of_service_guards(text, fragment):
    with pytest.raises(ModelError, match=fragment):
        parse_expression(text, Z, "m", "f")


def test_slow_sympy_work_is_cut_off(monkeypatch):
    # tanh of a non-real argument makes SymPy's cost exponential in the nesting
    monkeypatch.setattr(expr_module, "TIME_LIMIT", 0.5)
    with pytest.raises(ModelError, match="SymPy needs more than 0.5 s"):
        parse_expression("tanh(" * 12 + "sqrt(z)" + ")" * 12, Z, "m", "f")
    assert parse_expression("tanh(tanh(z))", Z, "m", "f") == sp.tanh(sp.tanh(Z))


def test_long_flat_sums_are_not_nesting():
    assert parse_expression("z" + "+z" * 200, Z, "m", "f") == 201 * Z


def test_undifferentiable_expression(monkeypatch):
    monkeypatch.setitem(expr_module.FUNCTIONS, "f", (sp.Function("f"), 1, 1))
    with pytest.raises(ModelError, match="m: f: SymPy cannot differentiate"):
        parse_expression("f(z)", Z, "m", "f")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="zs0123456789+-*/().,_ eEpixamnqrtlgh", max_size=40))
def test_parser_raises_only_model_errors(text):
    try:
        result = parse_expression(text, Z, "m", "f")
    except ModelError as error:
        assert error.field == "f"
    else:
        assert result.free_symbols <= {Z}
