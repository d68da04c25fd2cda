"""PyTorch in and out: dbpgen.from_torch reads an nn.Sequential; dbpgen.torch.DoubleBackprop
puts an emitted module's gradients into .grad. References are torch itself: the net's own
forward, and torch.autograd.grad(create_graph=True) double backpropagation (float64)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import dbpgen

torch = pytest.importorskip("torch")
nn = torch.nn
from dbpgen.torch import DoubleBackprop  # noqa: E402
from dbpgen.train import params_from_state_dict  # noqa: E402



@pytest.fixture(autouse=True)
def float64():
    """Nets and tensors of these tests in float64; other tests' default left as it was."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def nets():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3),
                              nn.Softmax(dim=-1)), (5,)),
        "acts": (nn.Sequential(nn.Linear(4, 6, bias=False), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.Sigmoid(),
                               nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 5), nn.ELU(), nn.Linear(5, 4),
                               nn.Softplus(), nn.Linear(4, 2)), (4,)),
        "cnn2d": (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, bias=False), nn.Tanh(),
                                nn.PixelUnshuffle(2), nn.Flatten(), nn.Linear(16, 3)), (2, 8, 8)),
        "cnn1d": (nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.ELU(), nn.AvgPool1d(2),
                                nn.Conv1d(3, 3, 3, stride=2, dilation=2), nn.Flatten(), nn.Sigmoid(),
                                nn.Sequential(nn.Linear(12, 2))), (2, 24)),
    }


@pytest.mark.parametrize("kind", ["mlp", "acts", "cnn2d", "cnn1d"])
def test_the_emitted_forward_is_the_nets_output(kind, tmp_path):
    net, shape = nets()[kind]
    text = dbpgen.from_torch(net, shape, name=f"t_{kind}", loss="nll" if kind == "mlp" else "mse")
    m = dbpgen.compile(text, tmp_path, jit=False)
    params = params_from_state_dict(net.state_dict(), m)
    x = torch.randn(4, *shape)
    np.testing.assert_allclose(m.forward(params, x.numpy()), net(x).detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("net, message", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
     r"net\[1\] \(BatchNorm1d\): not supported; supported: Linear, Conv1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1), nn.Linear(4, 1)),
     r"net\[1\] \(Softmax\): Softmax must be the last module"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()), r"net\[2\] \(Tanh\): a second activation"),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), r"net\[0\] \(Conv2d\): groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, (3, 5))), r"net\[0\] \(Conv2d\): kernel_size=\(3, 5\) differs"),
    (lambda: nn.Sequential(nn.AvgPool2d(2, stride=1)), r"net\[0\] \(AvgPool2d\): stride 1 differs"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2)), r"net\[1\] \(Softplus\): beta=2"),
    (lambda: nn.Sequential(nn.ReLU()), r"net\[0\] \(ReLU\): an activation needs a layer before it"),
    (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Dropout())), r"net\[0.1\] \(Dropout\)"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softplus(threshold=1)), r"net\[1\] \(Softplus\): threshold=1"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(7, 2)),
     r"net\[2\] \(Linear\): in_features=7, but the modules before it give 4 per sample"),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 1)),
     r"net\[0\] \(Conv2d\): in_channels=2, but the modules before it give \(3, 6, 6\) per sample"),
    (lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AvgPool2d(3)),
     r"net\[2\] \(AvgPool2d\): .*4x4 are not divisible by 3"),
])
def test_what_cannot_be_read_is_one_error_naming_position_and_type(net, message):
    with pytest.raises(ValueError, match=message):
        dbpgen.from_torch(net(), (3, 6, 6) if "Conv" in message or "AvgPool" in message else (3,))


def test_the_defaults_give_a_module_of_the_net_alone(tmp_path):
    """loss none and no penalty: forward, vjp and jvp of the net; J = 0, every gradient 0."""
    net, shape = nets()["mlp"]
    m = dbpgen.compile(dbpgen.from_torch(net, shape, name="t_plain"), tmp_path, jit=False)
    params = params_from_state_dict(net.state_dict(), m)
    x = torch.randn(4, *shape, requires_grad=True)
    out = net(x)
    np.testing.assert_allclose(m.forward(params, x.detach().numpy()), out.detach().numpy(), rtol=1e-12)
    v = torch.randn(4, 3)
    (want,) = torch.autograd.grad(out, x, v)
    np.testing.assert_allclose(m.vjp(params, x.detach().numpy(), v.numpy()), want.numpy(), rtol=1e-10)
    value, grads = m.value_and_grad(params, x.detach().numpy())
    assert value == 0.0 and not any(g.any() for g in grads.values())
    with pytest.raises(ValueError, match="DoubleBackprop needs loss= or penalty="):
        DoubleBackprop(net, shape)  # there would be nothing to put into .grad


# -- PyTorch out against torch's own double backpropagation -------------------------------------

def torch_objective(net, x, y, loss, pen, v):
    """J = mean(l + weight R), R by torch.autograd.grad(create_graph=True)."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    if loss == "mse":
        l = ((out - y) ** 2).sum(1)
    elif loss == "nll":
        l = -(y * torch.log(out)).sum(1)
    else:
        l = torch.zeros(len(x))
    p = {"squared_norm": lambda s: s, "norm": torch.sqrt}[pen.get("p", "squared_norm")]

    def R_of(direction):  # p(||(dx_L/dx_0)^T direction||^2), direction held constant
        xi0 = torch.autograd.grad((out * direction).sum(), x, create_graph=True)[0]
        return p(xi0.pow(2).flatten(1).sum(1))

    C, kind = out.shape[1], pen["v"]
    if kind == "loss_gradient":
        xi0 = torch.autograd.grad(l.sum(), x, create_graph=True)[0]
        R = p(xi0.pow(2).flatten(1).sum(1))
    elif kind == "output":
        R = R_of(torch.eye(C)[pen.get("index", 0)].expand_as(out))
    elif kind == "given":
        R = R_of(v)
    elif kind == "jacobian":
        R = sum(R_of(torch.eye(C)[i].expand_as(out)) for i in range(C))
    elif kind == "projections":
        R = C / v.shape[1] * sum(R_of(v[:, k]) for k in range(v.shape[1]))
    else:  # random: the given start, normalised, `iterations` power iterations J J^T, constant
        u = v / v.norm(dim=1, keepdim=True)
        for _ in range(pen["iterations"]):
            jt = torch.autograd.grad((out * u).sum(), x, retain_graph=True)[0]
            u = torch.func.jvp(net, (x.detach(),), (jt,))[1]
            u = (u / u.norm(dim=1, keepdim=True)).detach()
        R = R_of(u)
    return (l + pen.get("weight", 1.0) * R).mean()


PENALTIES = {
    "loss_gradient": ("nll", {"v": "loss_gradient", "weight": 0.3}),
    "output": ("mse", {"v": "output", "index": 1, "weight": 0.5}),
    "given": ("mse", {"v": "given", "p": "norm", "weight": 0.2}),
    "jacobian": ("none", {"v": "jacobian", "weight": 0.4}),
    "projections": ("mse", {"v": "projections", "count": 2, "weight": 0.5}),
    "random": ("mse", {"v": "random", "iterations": 2, "p": "norm", "weight": 0.3}),
}


@pytest.mark.parametrize("kind", list(PENALTIES))
def test_adam_steps_equal_torchs_own_double_backpropagation(kind, tmp_path):
    loss, pen = PENALTIES[kind]
    torch.manual_seed(1)
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 3)]
    net = nn.Sequential(*layers, *([nn.Softmax(dim=-1)] if loss == "nll" else []))
    ref = copy.deepcopy(net)
    db = DoubleBackprop(net, (4,), loss=loss, penalty=pen, name=f"t_{kind}", out_dir=tmp_path, jit=False)
    opt, ref_opt = torch.optim.Adam(net.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(8, 4, generator=gen)
        y = torch.eye(3)[torch.randint(0, 3, (8,), generator=gen)] if loss == "nll" else torch.randn(8, 3, generator=gen)
        v = {"given": torch.randn(8, 3, generator=gen), "random": torch.randn(8, 3, generator=gen),
             "projections": torch.randn(8, 2, 3, generator=gen)}.get(pen["v"])
        opt.zero_grad()
        J = db.backward(x, y if loss != "none" else None, v)
        opt.step()
        ref_opt.zero_grad()
        J_ref = torch_objective(ref, x, y, loss, pen, v)
        J_ref.backward()
        ref_opt.step()
        assert J == pytest.approx(J_ref.item(), rel=1e-10)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_backward_adds_to_grad_as_autograd_does_and_views_need_no_copy(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    db = DoubleBackprop(net, (3,), loss="mse", penalty={"v": "loss_gradient"}, out_dir=tmp_path, jit=False)
    params = db.params()
    assert all(np.shares_memory(params[k], p.detach().numpy()) for k, p in db.parameters.items())
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    db.backward(x, y)
    once = [p.grad.clone() for p in net.parameters()]
    db.backward(x, y)
    for p, g in zip(net.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)
    # grad_x of each sample's loss, as torch computes it
    xr = x.clone().requires_grad_(True)
    ((net(xr) - y) ** 2).sum().backward()
    torch.testing.assert_close(db.input_grad(x, y), xr.grad)
