"""The Python API: dbpgen.derive and dbpgen.compile take a path, YAML text or a dict;
`python -m dbpgen` is the command line."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

import dbpgen
from dbpgen.errors import ModelError
from test_gradients import CDB, mlp

SPEC = mlp("api_cdb", ["tanh"], None, "mse", CDB, widths=(4,))


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "api_cdb.yaml"
    text = yaml.safe_dump(SPEC, sort_keys=False)
    path.write_text(text)
    return {"path": path, "str path": str(path), "text": text, "dict": SPEC}


@pytest.mark.parametrize("form", ["path", "str path", "text", "dict"])
def test_derive_and_compile_take_a_path_yaml_text_or_a_dict(form, forms, tmp_path):
    d = dbpgen.derive(forms[form])
    assert [str(e.lhs) for e in d["forward"]][:2] == ["z1", "x1"]
    m = dbpgen.compile(forms[form], tmp_path, jit=False)
    assert (tmp_path / "api_cdb.py").is_file()
    x, y = np.ones((2, 3)), np.zeros((2, 2))
    ref = dbpgen.compile(forms["path"], tmp_path / "ref", jit=False)
    params = m.init_params(seed=0)
    assert m.value_and_grad(params, x, y)[0] == ref.value_and_grad(params, x, y)[0]


def test_errors_name_where_the_model_came_from(tmp_path):
    with pytest.raises(ModelError, match=r"^<dict>: layers"):
        dbpgen.derive(dict(SPEC, layers=[]))
    with pytest.raises(ModelError, match=r"^<text>: "):
        dbpgen.compile("name: x\ninput: [2]\nlayers: nope\n", tmp_path)
    with pytest.raises(ModelError, match="no such file"):
        dbpgen.derive(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="path, YAML text or a dict"):
        dbpgen.derive(42)
    assert not list(tmp_path.iterdir())  # nothing written


def test_python_dash_m_dbpgen_is_the_command_line(forms, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dbpgen", "compile", str(forms["path"]), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "api_cdb.py")
    bad = subprocess.run([sys.executable, "-m", "dbpgen", "compile", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_a_derivation_shows_itself_in_a_notebook_and_as_text(forms):
    d = dbpgen.derive(forms["dict"])
    md = d._repr_markdown_()
    for phase in d.equations:
        assert f"*{phase}*" in md
    assert md.count("$$") == 2 * len(d.equations)
    assert r"\xi_{0} &= K^{T}_{1}\left(W_{1}, \zeta_{1}\right)" in md
    assert "*simplifications*" in md and all(note in md for note in d.simplifications)
    assert str(d).startswith("api_cdb: value_and_grad, L = 2, loss = mse")
