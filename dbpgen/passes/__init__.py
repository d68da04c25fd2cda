"""The simplification pipeline: pure functions Program -> Program, run in this order."""
from __future__ import annotations

from ..program import Program, verify
from .adjoint import fold_loss_adjoint
from .constants import propagate_constants
from .dead_code import eliminate_dead_code
from .gram import contract_input_gram
from .merge import hoist_invariant_adjoints, hoist_linear_recursion, merge_weight_adjoints
from .scale import fold_constant_scale
from .second_derivative import vanish_second_derivatives

PIPELINE = (
    # G''_j = 0 where SymPy proves it a.e. (eq. 34)
    vanish_second_derivatives,
    # eta_L = 0 and its cascade, g' = 1 of identities (section 5.3, App. B.3)
    propagate_constants,
    # K_1 K_1^T through W_1 W_1^T inside per-vector loops, where it saves flops
    contract_input_gram,
    # sum_i K^box(x, a_i) = K^box(x, sum_i a_i) over the loop on v_i (eq. 31, section 5.4)
    hoist_invariant_adjoints,
    # sum_i eta_j^(i): the forward-backward recursion once, on summed sources (eq. 28, 30, section 5.4)
    hoist_linear_recursion,
    # K^box(x, a) + lam K^box(x, b) = K^box(x, a + lam b) (eq. 31-32)
    merge_weight_adjoints,
    # eps_j = delta_j + lam eta_j: one K^T per layer for loss and penalty ((28) + (15)-(16))
    fold_loss_adjoint,
    # q_0 = 2 xi_0: the factor moves into K_1 and K^box_1 (eq. 20, 32), q_0 is not formed
    fold_constant_scale,
    # statements no output needs (the forward-backward pass after the cascade)
    eliminate_dead_code,
)
NEEDS_MODEL = (contract_input_gram,)


def simplify(program: Program, stages: list | None = None, model=None) -> Program:
    """Run PIPELINE; if `stages` is a list, append (pass name, program) after each pass."""
    for step in PIPELINE:
        program = verify(step(program, model) if step in NEEDS_MODEL else step(program))
        if stages is not None:
            stages.append((step.__name__, program))
    return program
