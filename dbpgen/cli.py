"""Command line: dbpgen compile | equations | ops | check (SPEC section 3).

Bad input prints one line naming the file and the field and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from .errors import ModelError


def _compile(args) -> int:
    from .compiler import compile_file

    path = compile_file(args.model, args.output, simplified=not args.naive, count_ops=args.count_ops)
    print(path)
    return 0


def _equations(args) -> int:
    from .compiler import build
    from .equations import equations_latex, equations_text
    from .model import load_model

    model = load_model(args.model)
    compiled = build(model)
    if args.stages:
        for name, program in compiled.stages["value_and_grad"]:
            print(f"===== after {name} =====")
            print(equations_text(model, program))
        return 0
    program = compiled.programs["value_and_grad"]
    print(equations_latex(program) if args.latex else equations_text(model, program), end="")
    return 0


def _ops(args) -> int:
    from .compiler import build
    from .model import load_model

    compiled = build(load_model(args.model))
    table = compiled.ops
    memory = compiled.peak_bytes(args.batch)
    print(f"{'':10}{'K':>6}{'K^T':>6}{'K^box':>7}{'flops/sample':>16}{f'peak bytes (B={args.batch})':>24}")
    for column in ("naive", "emitted"):
        c = table[column]
        print(f"{column:10}{c['K']:>6}{c['KT']:>6}{c['Kbox']:>7}{c['flops']:>16,}{memory[column]:>24,}")
    for note in compiled.programs["value_and_grad"].fired:
        print(f"- {note}")
    return 0


def _check(args) -> int:
    from .check import check_model

    ok, report = check_model(args.model, batch=args.batch, seed=args.seed, rtol=args.rtol)
    print(report)
    return 0 if ok else 1


def _bench(args) -> int:
    from . import bench

    against = [p for p in args.against.split(",") if p] if args.against else []
    unknown = set(against) - set(bench.PEERS)
    if unknown:
        raise ModelError(args.model, "--against", f"unknown peer(s) {sorted(unknown)}; choose from {bench.PEERS}")
    for batch in args.batch:
        rows = bench.run(args.model, batch, against, args.dtype, args.naive, args.seconds)
        print(bench.report(args.model, batch, rows, args.dtype or "model's"))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbpgen", description="Double-backpropagation compiler.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="emit generated/<name>.py")
    c.add_argument("model")
    c.add_argument("-o", "--output", default="generated", help="output folder (default: generated)")
    c.add_argument("--naive", action="store_true", help="emit the unsimplified program (for comparison)")
    c.add_argument("--count-ops", action="store_true",
                   help="emit plain-Python kernels that count K, K^T, K^box calls in COUNTS")
    c.set_defaults(run=_compile)
    e = sub.add_parser("equations", help="print the derived, simplified recursions")
    e.add_argument("model")
    e.add_argument("--latex", action="store_true")
    e.add_argument("--stages", action="store_true", help="print the program after every pass")
    e.set_defaults(run=_equations)
    o = sub.add_parser("ops", help="linear-operation counts: naive vs emitted")
    o.add_argument("model")
    o.add_argument("--batch", type=int, default=128, help="batch size for the peak-memory column")
    o.set_defaults(run=_ops)
    k = sub.add_parser("check", help="emitted gradients vs central differences (float64)")
    k.add_argument("model")
    k.add_argument("--batch", type=int, default=4)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--rtol", type=float, default=1e-5)
    k.set_defaults(run=_check)
    n = sub.add_parser("bench", help="time value_and_grad against PyTorch, JAX, PyTensor")
    n.add_argument("model")
    n.add_argument("--batch", type=int, nargs="+", default=[128])
    n.add_argument("--against", default="torch,jax,pytensor", help="comma-separated peers")
    n.add_argument("--dtype", choices=["float32", "float64"], default=None)
    n.add_argument("--naive", action="store_true", help="also time the unsimplified program")
    n.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    n.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{getattr(exc, 'filename', None) or args.model}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
