"""The suite compiles jitted code unoptimized (NUMBA_OPT=0, tests/conftest.py); here every
schedule runs once as users get it, optimized by LLVM (NUMBA_OPT=3, fastmath reassociation
and contraction included), against the autograd oracle: the forced-schedule tests of
tests/test_schedule.py in a subprocess with NUMBA_OPT=3; and the vectorized functions'
test, which there also checks that LLVM vectorizes the loop around each."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_every_schedule_optimized_matches_the_oracle(tmp_path):
    env = dict(os.environ, NUMBA_OPT="3", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_schedule.py::test_forced_schedules_match_the_oracle",
                           "tests/test_functable.py::test_the_vectorized_functions_are_within_three_ulp_everywhere",
                           "-o", "addopts=", "--basetemp", str(tmp_path / "base")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "14 passed" in done.stdout, done.stdout[-500:]
