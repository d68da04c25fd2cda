"""Command line: dbpgen compile | equations | ops | check | bench | train (SPEC section 3).

Bad input prints one line naming the file and the field and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

from .errors import ModelError


def _compile(args) -> int:
    from .compiler import compile_file

    if args.batch is not None and not args.tune:
        raise ModelError(args.model, "--batch", "is the batch size --tune measures at: give --tune too")
    if args.batch is not None and args.batch < 1:
        raise ModelError(args.model, "--batch", f"must be a positive integer, got {args.batch}")
    path = compile_file(args.model, args.output, simplified=not args.naive, count_ops=args.count_ops,
                        schedule=args.schedule, tune_batch=(args.batch or 128) if args.tune else None)
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

    if args.batch < 1:
        raise ModelError(args.model, "--batch", f"must be a positive integer, got {args.batch}")
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
        raise ModelError(args.model or "dbpgen bench", "--against",
                         f"unknown peer(s) {sorted(unknown)}; choose from {bench.PEERS}")
    if args.sweep:
        if args.model:
            raise ModelError(args.model, "--sweep", "give either MODEL or --sweep, not both")
        return _sweep(args, against)
    if not args.model:
        raise ModelError("dbpgen bench", "MODEL", "give a model file or --sweep small|full|conv")
    if args.out:
        raise ModelError(args.model, "--out", "only with --sweep")
    if args.only:
        raise ModelError(args.model, "--only", "only with --sweep")
    models = [args.model]
    if args.outputs:
        tmp = tempfile.mkdtemp(prefix="dbpgen-bench-")
        models = [bench.with_outputs(args.model, C, tmp) for C in args.outputs]
    for model in models:
        for batch in args.batch:
            rows = bench.run(model, batch, against, args.dtype, args.naive, args.seconds)
            print(bench.report(model, batch, rows, args.dtype or "model's"), flush=True)
    return 0


def _sweep(args, against) -> int:
    from . import sweep

    points = sweep.sweep_points(args.sweep, args.dtype, tuple(args.only or ()))
    if not points:
        raise ModelError("dbpgen bench", "--only", f"no point of --sweep {args.sweep}"
                         + (f" --dtype {args.dtype}" if args.dtype else "") + " contains "
                         + " or ".join(repr(t) for t in args.only))

    def progress(i, n, row):
        done = row.get("error") or f"{row['schedule']}, cold {row['cold_s']:.1f} s, {row['dbpgen_ms']:.3g} ms"
        print(f"[{i}/{n}] {row['label']} {row['dtype']} B={row['batch']}: {done}", file=sys.stderr, flush=True)

    rows = sweep.run_sweep(points, against, args.seconds, progress)
    print(sweep.table(rows, against))
    print()
    print(sweep.summary(rows))
    if args.out:
        command = (f"dbpgen bench --sweep {args.sweep}" + (f" --dtype {args.dtype}" if args.dtype else "")
                   + "".join(f" --only {t!r}" for t in args.only or ())
                   + f" --against {','.join(against)} --seconds {args.seconds:g}")
        for path in sweep.write(rows, args.out, command, against):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _train(args) -> int:
    import time

    from .compiler import compile_file, load_generated
    from .model import load_model
    from .train import load_data, load_params, loss_only_module, save_params, train

    model = load_model(args.model)
    if not model.has_objective:
        raise ModelError(args.model, "loss", "no loss and no penalty: J is 0, there is nothing to train")
    checks = (("--epochs", args.epochs, args.epochs >= 0, "a non-negative integer"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, "a positive integer"),
              ("--lazy", args.lazy, args.lazy >= 1, "a positive integer"),
              ("--lr", args.lr, args.lr is None or args.lr > 0, "a positive number"),
              ("--momentum", args.momentum, args.momentum >= 0, "a non-negative number"),
              ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "a non-negative number"),
              ("--weight", args.weight, args.weight is None or args.weight >= 0, "a non-negative number"))
    for flag, value, ok, wanted in checks:
        if not ok:
            raise ModelError(args.model, flag, f"must be {wanted}, got {value}")
    if args.dask and not (args.dask.startswith("tcp://") or re.fullmatch(r"local:[1-9][0-9]*", args.dask)):
        raise ModelError(args.model, "--dask", f"expected local:N (N worker processes) or tcp://HOST:PORT, "
                                               f"got {args.dask!r}")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum <= 0):
        raise ModelError(args.model, "--nesterov", "needs --optimizer sgd and a --momentum > 0")
    if args.momentum and args.optimizer != "sgd":
        raise ModelError(args.model, "--momentum", "only --optimizer sgd takes a momentum")
    if args.lazy > 1 and (model.penalty is None or model.loss == "none"):
        raise ModelError(args.model, "--lazy", "lazy regularization needs both a loss and a penalty")
    module = load_generated(compile_file(args.model, args.module_dir))
    loss_module = loss_only_module(args.model, args.module_dir) if args.lazy > 1 else None
    x, y, v = load_data(args.data, module)
    if y is None and model.loss != "none":
        raise ModelError(args.data, "y", f"missing array (loss: {model.loss} needs labels)")
    if v is None and model.penalty is not None and model.penalty.v == "given":
        raise ModelError(args.data, "v", "missing array (penalty v: given needs one direction per sample)")
    params = load_params(args.init, module) if args.init else None
    options = {"weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        options.update(momentum=args.momentum, nesterov=args.nesterov)
    out = args.output or f"{model.name}_params.npz"
    client = None
    if args.dask:
        from .distributed import client_for

        try:
            client = client_for(args.dask)
        except (ValueError, OSError) as exc:
            raise ModelError(args.model, "--dask", f"no Dask cluster at {args.dask!r}: {exc}") from None
    start = time.perf_counter()
    try:
        result = train(module, x, y, params, optimizer=args.optimizer, lr=args.lr, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, lazy=args.lazy, weight=args.weight, v=v,
                       progress=not args.quiet, loss_module=loss_module, client=client, **options)
    finally:
        if client is not None and args.dask.startswith("local:"):
            client.cluster.close()
            client.close()
    save_params(out, result.params)
    print(f"{model.name}: {args.epochs} epochs, {result.steps} steps ({result.regularized_steps} with the penalty), "
          f"{time.perf_counter() - start:.1f} s; J = {result.objective:.6g}, loss = {result.loss:.6g} -> {out}")
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
    c.add_argument("--schedule", metavar="NAME", default=None,
                   help="force how every program runs: lanes, jit, fused, kernels (default: chosen "
                        "per program, the reason printed in the module's header)")
    c.add_argument("--tune", action="store_true",
                   help="time value_and_grad in every schedule that applies on this machine and keep "
                        "the fastest (the times go in the module's header)")
    c.add_argument("--batch", type=int, default=None, metavar="B", help="the batch size --tune measures at (128)")
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
    n.add_argument("model", nargs="?", default=None, help="model file (or --sweep)")
    n.add_argument("--sweep", choices=["small", "full", "conv"], default=None,
                   help="instead of MODEL, a grid of generated dense and conv models (dbpgen/sweep.py): "
                        "cold/warm start, schedule, ms against the peers, one table row per point")
    n.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="with --sweep: only the points whose 'label dtype B=batch' contains TEXT; "
                        "repeated, the points that contain any of them, e.g. --only softplus "
                        "--only 'float32 B=32'")
    n.add_argument("--out", default=None, help="with --sweep: write the table here (markdown) and "
                                               "the rows beside it as .csv and .json")
    n.add_argument("--batch", type=int, nargs="+", default=[128])
    n.add_argument("--against", default="torch,jax,pytensor", help="comma-separated peers")
    n.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="the model's dtype instead of its own; with --sweep: only the grid's points in it")
    n.add_argument("--naive", action="store_true", help="also time the unsimplified program")
    n.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    n.add_argument("--outputs", type=int, nargs="+", default=None,
                   help="also vary the output width C (the last dense layer), e.g. 10 20 50 100")
    n.set_defaults(run=_bench)
    t = sub.add_parser("train", help="train with the emitted value_and_grad; save params as .npz")
    t.add_argument("model")
    t.add_argument("--data", required=True, help=".npz with x (N, *input), y (N, C) and, for v: given, v; or a "
                                                 "folder with the .npy stacks x/, y/, v/ (dask.array.to_npy_stack)")
    t.add_argument("-o", "--output", default=None, help="params .npz to write (default: <name>_params.npz)")
    t.add_argument("--init", default=None, help="start from these params (.npz, e.g. from save_params)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3, as torch.optim)")
    t.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    t.add_argument("--nesterov", action="store_true", help="SGD Nesterov momentum")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 term added to the gradient, as torch.optim")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0, help="initial params, shuffling, random directions")
    t.add_argument("--lazy", type=int, default=1,
                   help="apply the penalty every k-th step, weighted k * lambda (lazy regularization); "
                        "the other steps run <name>_loss, the network compiled without its penalty")
    t.add_argument("--weight", type=float, default=None, help="penalty weight lambda (default: the model's)")
    t.add_argument("--module-dir", default="generated", help="where to compile the module (default: generated)")
    t.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="data-parallel steps on Dask: local:N (a local cluster of N worker processes) or "
                        "tcp://HOST:PORT (a running scheduler); --data may then be a folder of .npy stacks")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`dbpgen equations m.yaml | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:
        print(f"{getattr(exc, 'filename', None) or args.model}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
