"""Every fenced block that the README and docs/ mark runnable (a `<!-- runnable -->` line
right above it) runs as written: bash blocks one by one, a document's Python blocks as
one script in order (later blocks use the names earlier ones made), in a copy of the
repository's examples, so that nothing lands in the checkout."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

MARK = "<!-- runnable -->"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of the runnable blocks of a Markdown file, in order."""
    found = re.findall(r"^" + re.escape(MARK) + r"\n```(\w+)\n(.*?)^```$", path.read_text(), re.M | re.S)
    return [(lang, code) for lang, code in found]


MARKED = [p for p in DOCUMENTS if blocks(p)]


def test_the_readme_marks_its_examples_runnable():
    langs = [lang for lang, _ in blocks(ROOT / "README.md")]
    assert langs.count("python") >= 3 and langs.count("bash") >= 1
    text = (ROOT / "README.md").read_text()
    assert text.count(MARK) == len(langs)  # no mark without a block right under it
    assert len(text.splitlines()) <= 300


@pytest.mark.parametrize("path", MARKED, ids=[p.name for p in MARKED])
def test_runnable_blocks_run(path, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("figures"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), NUMBA_DISABLE_JIT="1")  # the same code as plain Python: no LLVM time
    script = []
    for lang, code in blocks(path):
        if lang == "bash":
            done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"{path.name}: bash block failed:\n{code}\n{done.stderr}"
        elif lang == "python":
            script.append(code)
        else:
            pytest.fail(f"{path.name}: a runnable block in {lang}, which this test cannot run")
    if script:
        (tmp_path / "blocks.py").write_text("\n".join(script))
        done = subprocess.run([sys.executable, "blocks.py"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{path.name}: Python blocks failed:\n{done.stderr[-3000:]}"
