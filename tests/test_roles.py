"""Passes find statements by their role (program.Role), not by names or equation labels.

Renaming every symbol of a derived program changes nothing a pass does: simplifying the
renamed program gives the renamed simplified program, with the same notes. Matching
target names by prefix (`name.startswith("ddg")`, `int(name[5:])`) or equation labels
(`eq.startswith("(29)")`) fails these tests.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import sympy as sp

from conftest import write_model
from dbpgen.derive import derive_programs
from dbpgen.model import load_model
from dbpgen.passes import simplify
from dbpgen.program import QUANTITIES, Role, Stmt, rename, verify, walk
from test_gradients import CDB, NODE, mlp

MODELS = {
    # G''_j = 0 (eq. 34), q_0 = 2 xi_0 folded (Alg. 2), dead code
    "relu_cdb": mlp("relu_cdb", ["relu", "relu"], None, "mse", CDB),
    # eta_L = 0 for a constant v and its cascade (section 5.3, App. B.3)
    "node_cascade": mlp("node_cascade", ["relu", "leaky_relu"], None, "none", NODE),
    # eps_j = delta_j + lam eta_j (loss and penalty adjoints folded)
    "node_mse": mlp("node_mse", ["tanh", "relu"], "tanh", "mse", NODE),
    # Algorithm 4 and the Gram contraction of a wide input layer
    "jacobian_gram": dict(mlp("jacobian_gram", ["relu"], None, "none", {"v": "jacobian"}, widths=(4,),
                              n_in=40, C=3)),
    "softmax_nll": mlp("softmax_nll", ["relu", "tanh"], "softmax", "nll", CDB),
    # the naive loop over v_i (G'' != 0): invariant adjoints and the linear recursion leave it
    "jacobian_tanh": mlp("jacobian_tanh", ["tanh", "tanh"], None, "mse", {"v": "jacobian"}, widths=(4, 3), C=3),
}

# the name derive.py gives each quantity's target (the stem; the layer follows)
STEMS = {"gamma_out": "gamma", "eta_out": "eta", "grad_W": "dW", "grad_b": "db", "grad_W_R": "gW",
         "grad_b_R": "gb", "loss": "J", "R_i": "Ri"}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("roles")
    return {name: (load_model(write_model(spec, out)), derive_programs(load_model(write_model(spec, out))))
            for name, spec in MODELS.items()}


def opaque(program) -> dict:
    """Every assigned symbol -> a name that says nothing about the quantity."""
    return {item.target: sp.Symbol(f"r{n}_") for n, item in enumerate(walk(program.stmts))}


def test_the_derivation_gives_every_statement_its_role(programs):
    for model, derived in programs.values():
        for program in derived.values():
            for item in walk(program.stmts):
                role = item.role
                assert role.quantity in QUANTITIES
                stem = STEMS.get(role.quantity, role.quantity)
                assert item.target.name == stem + ("" if role.layer is None else str(role.layer)), item
                assert role.layer is None or 0 <= role.layer <= model.L


@pytest.mark.parametrize("name", sorted(MODELS))
def test_renaming_every_symbol_turns_no_pass_off(name, programs):
    model, derived = programs[name]
    program = derived["value_and_grad"]
    mapping = opaque(program)
    renamed = verify(rename(program, mapping))
    assert not {s.name for s in renamed.used_inputs()} & {s.name for s in mapping}
    plain, other = simplify(program, model=model), simplify(renamed, model=model)
    assert plain.fired  # something fired, so the comparison below means something
    assert rename(plain, mapping).stmts == other.stmts
    assert rename(plain, mapping).outputs == other.outputs
    # the same notes, up to the names they print
    assert len(plain.fired) == len(other.fired)
    words = lambda notes: [re.sub(r"\w+\d+_?|r\d+_", "NAME", n) for n in notes]
    assert [n.split(":")[0] for n in words(plain.fired)] == [n.split(":")[0] for n in words(other.fired)]


def test_a_renamed_second_derivative_still_vanishes(programs):
    """The statement of g''_2 named 'curvature' (no 'ddg' in it): eq. 34 still fires."""
    model, derived = programs["relu_cdb"]
    program = derived["value_and_grad"]
    ddg2 = next(s for s in program.stmts if isinstance(s, Stmt) and s.role == Role("ddg", 2))
    renamed = rename(program, {ddg2.target: sp.Symbol("curvature")})
    simplified = simplify(renamed, model=model)
    assert any(note.startswith("G''_2 = 0") for note in simplified.fired)
    assert not any(s.target.name == "curvature" for s in walk(simplified.stmts))


def test_a_renamed_constant_v_is_still_reported(programs):
    """gamma_L of eq. (29), renamed and relabelled: still reported as App. B's zero."""
    model, derived = programs["node_cascade"]
    program = derived["value_and_grad"]
    gamma = next(s for s in program.stmts if isinstance(s, Stmt) and s.role.quantity == "gamma_out")
    relabelled = program.with_(stmts=tuple(replace(s, eq="label") if s is gamma else s for s in program.stmts))
    renamed = rename(relabelled, {gamma.target: sp.Symbol("adjoint_out")})
    simplified = simplify(renamed, model=model)
    assert any("adjoint_out [v held constant, App. B]" in note for note in simplified.fired)


def test_a_statement_without_a_role_is_refused(programs):
    _, derived = programs["relu_cdb"]
    program = derived["forward"]
    first = program.stmts[0]
    bad = program.with_(stmts=(Stmt(first.target, first.expr, first.phase, first.eq),) + program.stmts[1:])
    with pytest.raises(AssertionError, match="has no role"):
        verify(bad)
    with pytest.raises(ValueError, match="unknown quantity"):
        Role("ddg2")
