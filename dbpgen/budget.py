"""CPU-time budgets for SymPy work, so that no model file can hang the compiler.

SymPy's cost can grow exponentially with an expression's nesting (exp(exp(...(z))) in
`is_constant`, sigmoid(sigmoid(...)) in `simplify`), which no syntactic limit catches.
Every SymPy step that can blow up runs inside `deadline(seconds)`:

    with deadline(5.0):          # raises BudgetExceeded when the time is up
        ...
    value = attempt(1.0, work, fallback)   # an optional rewrite: fallback when out of time

Deadlines nest: an inner one never outlives the outer one, and when the outer one expires
inside the inner block, the exception belongs to the outer block and passes through.
The budgets count the main thread's CPU time (time.thread_time), not wall time: an optional
rewrite that fits its budget on an idle machine fits it beside other processes too, so what
the compiler prints does not depend on what else the machine runs (it still may on a much
slower CPU). The wake-up is ITIMER_PROF (SIGPROF; POSIX, main thread), which counts the
whole process's CPU time and so fires early, never late, when other threads of the process
run (BLAS workers after a product): the handler then waits for the rest. In another thread,
or where an outer profiling timer already runs, there is no limit and the blocks run to
completion.
"""
from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_stack: list[tuple[int, float]] = []  # (token, absolute deadline) of the open blocks
_tokens = itertools.count(1)
_foreign_timer = False


class BudgetExceeded(BaseException):
    """Time is up for the block with this token. A BaseException, so that SymPy's own
    `except Exception` handlers cannot swallow it."""

    def __init__(self, token: int, seconds: float) -> None:
        super().__init__(token, seconds)
        self.token = token
        self.seconds = seconds


def _usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


# After raising, the handler fires again this often until the block is closed: an exception
# raised from a signal handler can be lost (one raised while the interpreter runs a
# finalizer during garbage collection is printed and ignored), and a lost one would leave
# the block running with no timer armed.
_RETRY = 0.01


def _expire(signum, frame) -> None:
    now = time.thread_time()
    for token, end in _stack:  # the outermost expired block owns the exception
        if end <= now:
            signal.setitimer(signal.ITIMER_PROF, _RETRY)
            raise BudgetExceeded(token, 0.0)
    _arm()  # woken early (timer granularity, other threads' CPU time): wait for the rest


def _arm() -> None:
    if _stack:
        remaining = min(end for _, end in _stack) - time.thread_time()
        signal.setitimer(signal.ITIMER_PROF, max(remaining, 1e-3))
    else:
        signal.setitimer(signal.ITIMER_PROF, 0)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise BudgetExceeded (with `.seconds`) out of the block after `seconds` of CPU time."""
    global _foreign_timer
    if not _usable():
        yield
        return
    if not _stack:
        _foreign_timer = signal.getitimer(signal.ITIMER_PROF)[0] > 0
    if _foreign_timer:
        yield
        return
    token = next(_tokens)
    previous = signal.signal(signal.SIGPROF, _expire) if not _stack else None
    entry = (token, time.thread_time() + seconds)
    try:
        _stack.append(entry)
        _arm()
        yield
    except BudgetExceeded as exc:
        if exc.token == token:
            raise BudgetExceeded(token, seconds) from None
        raise
    finally:
        _close(entry, previous)


def _close(entry, previous) -> None:
    """Take a block off the stack and re-arm the timer for the blocks around it (or restore
    the handler found at the outermost one). The handler can run between any two of these
    steps: it may raise for this block until it is off the stack (ignored: the block is
    closing) or for an outer one (raised once the stack is consistent)."""
    late = None
    while True:
        try:
            if entry in _stack:
                _stack.remove(entry)
            _arm()
            if not _stack and previous is not None:  # None: a handler installed from C
                signal.signal(signal.SIGPROF, previous)
            break
        except BudgetExceeded as exc:
            if exc.token != entry[0]:
                late = exc
    if late is not None:
        raise late


def attempt(seconds: float, work: Callable[[], T], fallback: T) -> T:
    """work() if it finishes within `seconds`, else `fallback` (for optional rewrites)."""
    try:
        with deadline(seconds):
            return work()
    except BudgetExceeded as exc:
        if not _owns(exc):
            raise
        return fallback


def _owns(exc: BudgetExceeded) -> bool:
    # after the block closed its token is gone from the stack; an outer block's is not
    return all(token != exc.token for token, _ in _stack)
