"""The command line as a user runs it: `python -m dbpgen.cli ...` in a fresh folder."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import import_module

VALID = """\
name: {name}
input: [2]
layers:
  - {{dense: 4, act: relu}}
  - {{dense: 3, act: tanh}}
  - {{dense: 1}}
loss: mse
penalty: {{v: loss_gradient, p: squared_norm, weight: 0.1}}
"""

SMOOTH = """\
name: smooth
input: [2]
layers:
  - {dense: 3, act: tanh}
  - {dense: 2, act: sigmoid}
loss: mse
penalty: {v: output, index: 1, p: "(sqrt(s) - 1)**2", weight: 0.5}
"""

PHASES = ["[forward]", "[backward]", "[backward-backward]", "[forward-backward]",
          "[gradients]", "[simplifications]"]


def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbpgen.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a generated module"
            modules.add(node.module.split(".")[0])
    return modules


# --- compile ---------------------------------------------------------------------------

def test_compile_prints_path_imports_only_numpy_numba_and_is_deterministic(tmp_path):
    model = write(tmp_path / "net.yaml", VALID.format(name="net"))
    first = run(tmp_path, "compile", model, "-o", tmp_path / "out")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    printed = Path(first.stdout.strip())
    target = tmp_path / "out" / "net.py"
    assert (tmp_path / printed).resolve() == target.resolve()  # absolute or cwd-relative
    assert target.is_file()
    text = target.read_bytes()
    assert imported_modules(text.decode("utf-8")) - {"ctypes", "math", "os", "sys"} == {"numpy", "numba"}  # + stdlib

    again = run(tmp_path, "compile", model, "-o", tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert target.read_bytes() == text
    elsewhere = run(tmp_path, "compile", model, "-o", tmp_path / "other")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (tmp_path / "other" / "net.py").read_bytes() == text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["net.py"]


def test_compile_default_output_folder_is_generated(tmp_path):
    write(tmp_path / "net.yaml", VALID.format(name="net"))
    result = run(tmp_path, "compile", "net.yaml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "generated" / "net.py").is_file()
    assert (tmp_path / Path(result.stdout.strip())).resolve() == \
        (tmp_path / "generated" / "net.py").resolve()


# --- bad input: one line naming file and field, status 2, no traceback -------------------

INJECTION = "__import__('os').system('touch MARKER')"


def _model(layers="  - {dense: 2}", extra="loss: mse", name="bad", head=""):
    return f"name: {name}\n{head}input: [3]\nlayers:\n{layers}\n{extra}\n"


ERRORS = {
    # id: (file text or None for a missing file, expected field after "<path>: ")
    "unknown_key": (_model(extra="losss: mse"), "losss"),
    "unknown_layer_key": (_model(layers="  - {dense: 2, activation: relu}"),
                          "layers[0].activation"),
    "unknown_activation": (_model(layers="  - {dense: 4, act: relu}\n  - {dense: 2, act: relux}"),
                           "layers[1].act: unknown activation 'relux'"),
    "bad_dtype": (_model(head="dtype: float16\n"), "dtype"),
    "softmax_not_last": (_model(layers="  - {dense: 4, act: softmax}\n  - {dense: 2}"),
                         "layers[0].act"),
    "nll_without_softmax": (_model(layers="  - {dense: 2, act: tanh}", extra="loss: nll"),
                            "loss"),
    "loss_gradient_without_loss": (_model(extra="loss: none\npenalty: {v: loss_gradient}"),
                                   "penalty.v"),
    "bad_output_index": (_model(extra="penalty: {v: output, index: 2}"), "penalty.index"),
    "negative_output_index": (_model(extra="penalty: {v: output, index: -1}"), "penalty.index"),
    "p_unparseable": (_model(extra='penalty: {v: given, p: "(s +"}'), "penalty.p"),
    "p_unknown_name": (_model(extra='penalty: {v: given, p: "s + t"}'), "penalty.p"),
    "p_unknown_function": (_model(extra='penalty: {v: given, p: "foo(s)"}'), "penalty.p"),
    "p_code_injection": (_model(extra=f'penalty: {{v: given, p: "{INJECTION}"}}'), "penalty.p"),
    "p_dunder_escape": (_model(extra='penalty: {v: given, p: "().__class__.__bases__"}'),
                        "penalty.p"),
    "act_code_injection": (_model(layers=f'  - {{dense: 2, act: "{INJECTION}"}}'),
                           "layers[0].act"),
    "non_identifier_name": (_model(name="../evil"), "name"),
    "missing_file": (None, None),
    "yaml_syntax_error": ("name: bad\ninput: [3\nlayers:\n  - {dense: 2}\n", None),
    "empty_layers": ("name: bad\ninput: [3]\nlayers: []\nloss: mse\n", "layers"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_status_2(tmp_path, case):
    text, field = ERRORS[case]
    model = tmp_path / "model.yaml"
    if text is not None:
        model.write_text(text)
    out = tmp_path / "out"
    result = run(tmp_path, "compile", model, "-o", out)

    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    line = lines[0]
    assert line.startswith(f"{model}: "), line
    if field is not None:
        assert line.startswith(f"{model}: {field}"), line
    if case == "yaml_syntax_error":
        assert "line 2" in line or "line 3" in line, line
    assert not (tmp_path / "MARKER").exists(), "user text was executed"
    assert not out.exists() or not any(out.iterdir()), "a failed compile wrote files"


def test_code_injection_never_runs_in_any_subcommand(tmp_path):
    model = write(tmp_path / "model.yaml", ERRORS["p_code_injection"][0])
    for command in ("equations", "ops", "check"):
        result = run(tmp_path, command, model)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "MARKER").exists()


# --- a failed compile leaves the previous module untouched -------------------------------

@pytest.mark.parametrize("broken", [
    VALID.format(name="keep").replace("act: tanh", "act: relux"),
    VALID.format(name="keep").replace("input: [2]", "input: [2"),
    VALID.format(name="keep").replace("p: squared_norm", 'p: "(sqrt(s) - 1"'),
], ids=["activation", "yaml", "penalty_p"])
def test_failed_compile_keeps_previous_module(tmp_path, broken):
    model = write(tmp_path / "keep.yaml", VALID.format(name="keep"))
    out = tmp_path / "out"
    first = run(tmp_path, "compile", model, "-o", out)
    assert first.returncode == 0, first.stderr
    target = out / "keep.py"
    before_bytes, before = target.read_bytes(), target.stat()

    model.write_text(broken)
    result = run(tmp_path, "compile", model, "-o", out)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    after = target.stat()
    assert target.read_bytes() == before_bytes
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert sorted(p.name for p in out.iterdir()) == ["keep.py"], "leftover temporary files"


# --- equations, ops, check ---------------------------------------------------------------

def test_equations_prints_phases_and_simplifications(tmp_path):
    model = write(tmp_path / "net.yaml", VALID.format(name="net"))
    result = run(tmp_path, "equations", model)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    positions = [text.find(phase) for phase in PHASES]
    assert all(p >= 0 for p in positions), [ph for ph, p in zip(PHASES, positions) if p < 0]
    assert positions == sorted(positions), "phases out of order"
    simplifications = text[positions[-1]:].splitlines()[1:]
    # a ReLU network: at least G'' = 0 must have fired
    assert any(line.strip().startswith("-") for line in simplifications), text
    assert "G''" in text[positions[-1]:]
    assert "xi0" in text and "W1" in text


def test_equations_latex(tmp_path):
    model = write(tmp_path / "net.yaml", VALID.format(name="net"))
    result = run(tmp_path, "equations", model, "--latex")
    assert result.returncode == 0, result.stderr
    assert "\\xi" in result.stdout or "K" in result.stdout
    assert "\\" in result.stdout  # some LaTeX command, not the plain-text form
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("act", ["silu", "sigmoid(z)**2"])
def test_equations_latex_prints_a_power_of_a_function(tmp_path, act, capsys):
    """SymPy prints Sigmoid(z)**2 (silu's g'') through the function's _latex with exp=."""
    from dbpgen import cli

    model = write(tmp_path / "net.yaml", VALID.format(name="net").replace("act: tanh", f"act: \"{act}\""))
    assert cli.main(["equations", str(model), "--latex"]) == 0
    assert r"\left(\sigma\left(z_{2}\right)\right)^{2}" in capsys.readouterr().out


def test_ops_prints_naive_and_emitted_rows(tmp_path):
    model = write(tmp_path / "net.yaml", VALID.format(name="net"))
    result = run(tmp_path, "ops", model)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if words and words[0] in ("naive", "emitted"):
            # K, K^T, K^box, flops/sample first; further columns may follow
            assert all(re.fullmatch(r"\d[\d,]*", w) for w in words[1:5]), line
            rows[words[0]] = [int(w.replace(",", "")) for w in words[1:5]]
    assert set(rows) == {"naive", "emitted"}, result.stdout

    # the printed table is the module's OPS
    compiled = run(tmp_path, "compile", model, "-o", tmp_path / "out")
    assert compiled.returncode == 0, compiled.stderr
    ops = import_module(tmp_path / "out" / "net.py", jit=False).OPS
    for column in ("naive", "emitted"):
        assert rows[column] == [ops[column][k] for k in ("K", "KT", "Kbox", "flops")]
    assert rows["emitted"][3] <= rows["naive"][3]


def test_check_smooth_model_ok(tmp_path):
    model = write(tmp_path / "smooth.yaml", SMOOTH)
    result = run(tmp_path, "check", model, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "MISMATCH" not in result.stdout
    assert "Traceback" not in result.stderr
    assert "input_grad relative error" in result.stdout


class StandIn:
    """A module whose J (`objective`, of parameters {"w": ...}) and gradient (`gradient`)
    the test gives, with forward = the sum of a 2-wide input; checked as a loss-free model."""

    def __init__(self, w, objective, gradient):
        self.w, self.objective, self.gradient = np.asarray(w, dtype=float), objective, gradient

    def init_params(self, seed):
        return {"w": self.w.copy()}

    def value_and_grad(self, p, x, y=None, v=None, weight=None):
        return float(self.objective(p["w"])), {"w": np.asarray(self.gradient, dtype=float)}

    def forward(self, p, x):
        return x.sum(axis=1, keepdims=True)

    def jvp(self, p, x, u):
        return u.sum(axis=1, keepdims=True)

    def vjp(self, p, x, v):
        return np.repeat(v, 2, axis=1)

    def check(self, path):
        from types import SimpleNamespace

        from dbpgen import check

        model = SimpleNamespace(n_outputs=1, input_shape=(2,), loss="none", penalty=None)
        return check._check_module(path, model, self, batch=3, seed=0, rtol=1e-5)


@pytest.mark.parametrize("error,verdict", [(0.0, True), (0.1, False)])
def test_check_judges_tiny_derivatives_of_a_large_objective_by_what_differences_resolve(error, verdict):
    """J = 1000 + 1e-4 (w1 + w2): each difference is off by ~1e-7 from rounding J alone,
    5e-4 of the 1e-4 derivative. A right gradient passes; one 10% off is still caught."""
    slope = 1e-4
    module = StandIn([0.3, -0.2], lambda w: 1000.0 + slope * np.sum(w), np.full(2, slope * (1 + error)))
    ok, report = module.check("j.yaml")
    assert ok is verdict, report
    assert report.startswith("j.yaml: " + ("OK" if verdict else "MISMATCH"))


@pytest.mark.parametrize("slope,verdict", [(1.0, True), (0.5, False)])
def test_check_takes_a_kink_within_eps_by_its_one_sided_difference(slope, verdict):
    """J = |w - c| with its kink 0.3 eps below w: the central difference averages the two
    sides (0.3), while the emitted derivative is the slope on w's side (1), which the
    forward difference measures. A derivative that matches neither side is reported."""
    from dbpgen import check

    c = -0.3 * check.EPS
    ok, report = StandIn([0.0], lambda w: abs(w[0] - c), [slope]).check("k.yaml")
    assert ok is verdict, report
    assert ("1 agreed with a one-sided difference only" in report) is verdict


def test_check_holds_the_power_iterated_direction_constant(tmp_path):
    """`v: random` with power iterations: v is held constant in J's gradient (SPEC), so the
    differences hold it too instead of differentiating the iterations."""
    from dbpgen import check

    model = write(tmp_path / "power.yaml", "\n".join([
        "name: power", "input: [3]", "loss: none",
        "layers: [{dense: 4, act: tanh}, {dense: 3, act: sigmoid}]",
        "penalty: {v: random, iterations: 2, weight: 0.5}"]) + "\n")
    ok, report = check.check_model(model)
    assert ok, report


def test_check_reports_a_module_that_fails_at_run_time_in_one_line(tmp_path, monkeypatch, capsys):
    """Such a module is a compiler bug; were one to slip through, check says so in one line."""
    from dbpgen import check, cli

    model = write(tmp_path / "smooth.yaml", SMOOTH)
    real = check.load_generated

    def broken(path, jit=True):
        m = real(path, jit=False)
        m.value_and_grad = lambda *a, **k: np.empty(0)[5]  # an IndexError from inside the module
        return m

    monkeypatch.setattr(check, "load_generated", broken)
    assert cli.main(["check", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the emitted module fails at run time: IndexError" in err
    assert err.startswith(str(model)) and "Traceback" not in err


def test_a_closed_pipe_ends_the_output_quietly(tmp_path):
    """`dbpgen equations model.yaml --stages | head -1`: the rest is not wanted; no error
    line. 30 layers after each of the passes: far more than a pipe's buffer holds."""
    deep = "\n".join(["name: deep", "input: [2]", "loss: mse", "layers:"]
                     + ["  - {dense: 3, act: tanh}"] * 30 + ["  - {dense: 1}"]) + "\n"
    model = write(tmp_path / "deep.yaml", deep)
    done = subprocess.run(f"{sys.executable} -m dbpgen equations {model} --stages | head -1", shell=True,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.count("\n") == 1 and done.stderr == "", done.stderr


@pytest.mark.parametrize("command", ["bench", "train"])
def test_a_model_without_objective_is_refused_where_there_is_nothing_to_do(tmp_path, command, capsys):
    """loss none and no penalty compiles (forward, vjp, jvp); timing or training J = 0 is refused."""
    from dbpgen import cli

    model = write(tmp_path / "plain.yaml", "name: plain\ninput: [3]\nlayers:\n  - {dense: 4, act: tanh}\n"
                                           "  - {dense: 2}\n")
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3)), y=np.zeros((4, 2)))
    extra = ["--against", "torch"] if command == "bench" else ["--data", str(tmp_path / "data.npz"), "--quiet"]
    assert cli.main([command, str(model), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"{model}: loss: no loss and no penalty: J is 0, there is nothing to " \
                  f"{'time' if command == 'bench' else 'train'}\n"


def test_bench_refuses_a_model_without_weights_in_one_line(tmp_path, capsys):
    """Pooling and flatten only: the peers' autograd has no parameter to differentiate."""
    from dbpgen import cli

    model = write(tmp_path / "pool.yaml", "name: pool\ninput: [1, 4, 4]\nlayers:\n  - {avgpool: 2, act: tanh}\n"
                                          "  - flatten\nloss: mse\npenalty: {v: loss_gradient}\n")
    assert cli.main(["bench", str(model), "--against", "torch"]) == 2
    assert capsys.readouterr().err == f"{model}: layers: no layer has weights: value_and_grad has no gradient to time\n"
