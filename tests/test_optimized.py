"""The suite compiles jitted code unoptimized (NUMBA_OPT=0, tests/conftest.py); here every
schedule runs once as users get it, optimized by LLVM (NUMBA_OPT=3, fastmath reassociation
and contraction included), against the autograd oracle. The tests marked `optimized` run
here only, in a subprocess with NUMBA_OPT=3 (the unoptimized session deselects them): the
forced-schedule tests of tests/test_schedule.py, and the vectorized functions' test, which
here also checks that LLVM vectorizes the loop around each."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import OPTIMIZED, ROOT

TESTS = ["tests/test_schedule.py::test_forced_schedules_match_the_oracle",
         "tests/test_functable.py::test_the_vectorized_functions_are_within_three_ulp_everywhere"]


def test_every_schedule_optimized_matches_the_oracle(tmp_path):
    env = dict(os.environ, NUMBA_OPT="3", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *TESTS, "-o", "addopts=", "--basetemp", str(tmp_path / "base")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "14 passed" in done.stdout, done.stdout[-500:]


def test_every_test_marked_optimized_runs_here(request):
    """A test marked `optimized` that TESTS does not list would run nowhere."""
    deselected = {nodeid.split("[")[0] for nodeid in request.config.stash.get(OPTIMIZED, [])}
    assert deselected <= set(TESTS), sorted(deselected - set(TESTS))
