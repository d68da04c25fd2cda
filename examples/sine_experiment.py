"""The paper's section 6.3: a 1-8-5-1 ReLU network fitted to sin(x), and its loss landscapes.

    pip install -e ".[examples]" && python examples/sine_experiment.py

trains the network with dbpgen's optimizer on the emitted value_and_grad of
examples/sine_mse.yaml (squared loss, as in the paper), then computes every curve of
Figures 2-7 with the emitted modules and writes examples/figures/*.png:

* s = d z_L / d x_0 from the emitted `vjp` (v = 1), R_cdb from sine_cdb's `penalty`;
* d R_node / d(w, b) from sine_node's `value_and_grad` (R_node = (d z_L / d x_0)^2);
* d R_cdb / d(w, b) from sine_cdb's `value_and_grad` as grads(weight=1) - grads(weight=0)
  (the loss gradient cancels: J is affine in the weight lambda).

No finite differences anywhere; only the affine-region boundaries are located from the
hidden pre-activations with NumPy. The functions below return the arrays (the tests in
tests/test_sine_experiment.py check the paper's claims on them); matplotlib is imported
only by `plot_all`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = HERE / "figures"
MODELS = {"mse": "sine_mse.yaml", "node": "sine_node.yaml", "cdb": "sine_cdb.yaml"}

N_SAMPLES = 1500          # paper: 1500 points x in [-pi, pi], y = sin(x)
BATCH = 256               # paper: M = 256 for Figures 6 and 7
X0 = 1.022                # paper: the single sample of Figures 3-5
DATA_SEED = 0
TRAIN = dict(optimizer="adam", lr=1e-2, epochs=200, batch_size=32, seed=0)  # about 0.6 s
GRID = 801                # points of each parameter sweep


# -- setup ------------------------------------------------------------------------------


def load_modules(compile: bool = False, out_dir: Path = ROOT / "generated") -> dict:
    """The emitted modules for the three model files (compiled first if asked or missing)."""
    from dbpgen.compiler import compile_file, load_generated

    modules = {}
    for key, name in MODELS.items():
        target = out_dir / (Path(name).stem + ".py")
        if compile or not target.exists():
            target = compile_file(HERE / name, out_dir)
        modules[key] = load_generated(target)
    return modules


def make_data(n: int = N_SAMPLES, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """x uniform on [-pi, pi], y = sin(x), both (n, 1)."""
    x = np.random.default_rng(seed).uniform(-np.pi, np.pi, (n, 1))
    return x, np.sin(x)


def train_network(modules: dict, x: np.ndarray, y: np.ndarray, progress: bool = True):
    """Fit sine_mse (squared loss) with Adam on mini-batches; returns dbpgen.train.TrainResult."""
    from dbpgen.train import train

    return train(modules["mse"], x, y, progress=progress, **TRAIN)


def pick_batch(x: np.ndarray, y: np.ndarray, m: int = BATCH, seed: int = 1):
    """A random batch of M training points (Figures 6 and 7)."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), m, replace=False))
    return x[idx], y[idx]


# -- the network's pieces, with NumPy (only for locating boundaries) ------------------------


def preactivations(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z1 = x @ params["W1"].T + params["b1"]
    z2 = np.maximum(z1, 0) @ params["W2"].T + params["b2"]
    return z1, z2


def region_boundaries(params: dict, lo: float = -np.pi, hi: float = np.pi) -> np.ndarray:
    """The x_0 in (lo, hi) where some hidden pre-activation z_1[k] or z_2[i] changes sign.

    Returns an (n, 3) array of rows (x, layer, neuron), sorted by x. Layer 1 switches at
    x = -b1[k] / W1[k]; z_2 is affine between those points, so each piece has at most one
    root per neuron.
    """
    W1, b1 = params["W1"][:, 0], params["b1"]
    rows = []
    knots = [lo, hi]
    for k in range(len(b1)):
        if W1[k] != 0:
            t = -b1[k] / W1[k]
            if lo < t < hi:
                rows.append((t, 1, k))
                knots.append(t)
    knots = np.unique(knots)
    for a, c in zip(knots[:-1], knots[1:]):
        mask = (W1 * (a + c) / 2 + b1 > 0).astype(float)  # active layer-1 neurons on this piece
        slope = params["W2"] @ (mask * W1)
        offset = params["W2"] @ (mask * b1) + params["b2"]
        for i in range(len(offset)):
            if slope[i] != 0:
                t = -offset[i] / slope[i]
                if a < t < c:
                    rows.append((t, 2, i))
    return np.array(sorted(rows)).reshape(-1, 3)


def choose_coordinates(params: dict, x0: float = X0) -> dict:
    """Pick w = W2[i, k] and b = b2[i] so that neuron i of layer 2 switches inside the sweep.

    For fixed x_0, z_2[i] = W2[i] x_1 + b2[i] is the only pre-activation that w and b move
    (affinely: slope x_1[k] in w, 1 in b), so s jumps exactly where z_2[i] = 0. Among the
    (i, k) with x_1[k] > 0 and a jump of s larger than a tenth of the largest possible, take
    the one whose switching point is closest to the trained w; the sweeps cover the trained
    value and the switching point with margin.
    """
    z1, z2 = preactivations(params, np.array([[x0]]))
    x1, z2 = np.maximum(z1[0], 0), z2[0]
    W1, W2, W3 = params["W1"][:, 0], params["W2"], params["W3"][0]
    jumps = np.abs(W3 * (W2 @ ((z1[0] > 0) * W1)))  # s with neuron i on minus off
    best = None
    for i in range(len(z2)):
        if jumps[i] < 0.1 * jumps.max():
            continue
        for k in np.flatnonzero(x1 > 0):
            distance = abs(z2[i] / x1[k])  # |w_switch - w|
            if best is None or distance < best[0]:
                best = (distance, i, int(k))
    _, i, k = best
    w, b = params["W2"][i, k], params["b2"][i]
    w_switch, b_switch = w - z2[i] / x1[k], b - z2[i]
    w_half = max(1.5 * abs(w_switch - w), 0.5)
    b_half = max(1.5 * abs(b_switch - b), 0.5)
    return {"i": i, "k": k, "w": w, "b": b, "w_switch": w_switch, "b_switch": b_switch,
            "w_grid": np.linspace(w - w_half, w + w_half, GRID),
            "b_grid": np.linspace(b - b_half, b + b_half, GRID)}


def switch_points(params: dict, x: np.ndarray, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the w = W2[i, k] and b = b2[i] where z_2[i] changes sign (nan if never)."""
    z1, z2 = preactivations(params, x)
    x1k = np.maximum(z1[:, k], 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(x1k > 0, params["W2"][i, k] - z2[:, i] / x1k, np.nan)
    return w, params["b2"][i] - z2[:, i]


# -- landscapes from the emitted modules --------------------------------------------------


def input_landscape(modules: dict, params: dict, n: int = 4001) -> dict:
    """Figure 2: x_L, s = d z_L / d x_0 and R_cdb over x_0 in [-pi, pi]."""
    x = np.linspace(-np.pi, np.pi, n).reshape(-1, 1)
    y = np.sin(x)
    out = modules["cdb"]
    return {
        "x": x[:, 0],
        "xL": out.forward(params, x)[:, 0],
        "s": modules["node"].vjp(params, x, np.ones((n, 1)))[:, 0],
        "R_cdb": out.penalty(params, x, y),
        "R_node": modules["node"].penalty(params, x),
        "boundaries": region_boundaries(params),
    }


def _penalty_gradients(modules: dict, params: dict, x: np.ndarray, y: np.ndarray, i: int, k: int) -> dict:
    """s, R_node, R_cdb (batch means) and their derivatives in W2[i, k] and b2[i]."""
    node, cdb = modules["node"], modules["cdb"]
    r_node, g_node = node.value_and_grad(params, x, weight=1.0)
    _, g_loss = cdb.value_and_grad(params, x, y, weight=0.0)
    j1, g_cdb = cdb.value_and_grad(params, x, y, weight=1.0)
    return {
        "s": node.vjp(params, x, np.ones((len(x), 1)))[:, 0].mean(),
        "R_node": r_node,
        "R_cdb": cdb.penalty(params, x, y).mean(),
        "dR_node_dw": g_node["W2"][i, k], "dR_node_db": g_node["b2"][i],
        "dR_cdb_dw": g_cdb["W2"][i, k] - g_loss["W2"][i, k],
        "dR_cdb_db": g_cdb["b2"][i] - g_loss["b2"][i],
    }


def parameter_sweep(modules: dict, params: dict, x: np.ndarray, y: np.ndarray, coords: dict,
                    progress: bool = True, label: str = "") -> dict:
    """Figures 3-7: every quantity of _penalty_gradients over the w grid and over the b grid.

    One value_and_grad call per grid point and model (about 30 us each for one sample):
    a plain loop over the jitted module, with a tqdm bar.
    """
    from tqdm.auto import tqdm

    i, k = coords["i"], coords["k"]
    out = {}
    for name, grid, key, index in (("w", coords["w_grid"], "W2", (i, k)), ("b", coords["b_grid"], "b2", (i,))):
        p = {n: a.copy() for n, a in params.items()}
        rows = []
        for value in tqdm(grid, desc=f"sweep {name} {label}".strip(), disable=not progress, leave=False):
            p[key][index] = value
            rows.append(_penalty_gradients(modules, p, x, y, i, k))
        for field in rows[0]:
            out[f"{field}_over_{name}"] = np.array([r[field] for r in rows])
    out["w_grid"], out["b_grid"] = coords["w_grid"], coords["b_grid"]
    return out


def compute_all(params: dict | None = None, progress: bool = True) -> dict:
    """Train (unless params are given) and compute every array the figures show."""
    modules = load_modules()
    x, y = make_data()
    result = None
    if params is None:
        result = train_network(modules, x, y, progress)
        params = result.params
    coords = choose_coordinates(params)
    xb, yb = pick_batch(x, y)
    x0 = np.array([[X0]])
    single = parameter_sweep(modules, params, x0, np.sin(x0), coords, progress, "(x0)")
    batch = parameter_sweep(modules, params, xb, yb, coords, progress, f"(M={BATCH})")
    w_sw, b_sw = switch_points(params, xb, coords["i"], coords["k"])
    return {"params": params, "train": result, "x": x, "y": y, "coords": coords,
            "inputs": input_landscape(modules, params), "single": single, "batch": batch,
            "batch_switch_w": w_sw, "batch_switch_b": b_sw}


def largest_jump(values: np.ndarray) -> float:
    """The largest difference between neighbouring grid points (the jump, on a fine grid)."""
    return float(np.max(np.abs(np.diff(values))))


def jump_ratios(arrays: dict) -> dict:
    """Largest jump of dR/dw, batch-averaged over single-sample, for R_node and R_cdb."""
    return {r: largest_jump(arrays["batch"][f"dR_{r}_dw_over_w"]) / largest_jump(arrays["single"][f"dR_{r}_dw_over_w"])
            for r in ("node", "cdb")}


# -- figures -------------------------------------------------------------------------------


def plot_all(arrays: dict, out_dir: Path = FIGURES) -> list[Path]:
    """Write fig2a ... fig7 as PNG files; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    inp, coords = arrays["inputs"], arrays["coords"]
    i, k = coords["i"], coords["k"]
    w_name, b_name = f"$w = W^{{(2)}}_{{{i + 1},{k + 1}}}$", f"$b = b^{{(2)}}_{{{i + 1}}}$"
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)

    def boundaries(ax):
        for t in inp["boundaries"][:, 0]:
            ax.axvline(t, color="0.75", lw=0.8, zorder=0)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    boundaries(ax)
    ax.plot(inp["x"], np.sin(inp["x"]), color="C1", lw=1.2, ls="--", label="sin(x)")
    ax.plot(inp["x"], inp["xL"], color="C0", lw=1.5, label="network $x_L$")
    ax.set(xlabel="$x_0$", title="Figure 2a: trained 1-8-5-1 ReLU network")
    ax.legend()
    save(fig, "fig2a_fit.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    boundaries(ax)
    ax.axvline(X0, color="C3", lw=0.8, ls=":", zorder=0)
    ax.plot(inp["x"], inp["s"], color="C0", lw=1.5)
    ax.set(xlabel="$x_0$", ylabel=r"$\partial_{x_0} z_L$", title=r"Figure 2b: $\partial_{x_0} z_L$ (emitted vjp)")
    save(fig, "fig2b_derivative.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    boundaries(ax)
    ax.axvline(X0, color="C3", lw=0.8, ls=":", zorder=0)
    ax.plot(inp["x"], inp["R_cdb"], ".", ms=1, color="C0")
    ax.set(xlabel="$x_0$", ylabel=r"$\mathcal{R}_{cdb}$", title=r"Figure 2c: $\mathcal{R}_{cdb} = \|\partial_{x_0}\ell\|^2$")
    save(fig, "fig2c_rcdb.png")

    def pair(data, top, title, name, switch=True, ylabels=("", "")):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, var, label, ylabel in zip(axes, ("w", "b"), (w_name, b_name), ylabels):
            if switch:
                ax.axvline(coords[f"{var}_switch"], color="0.75", lw=0.8, zorder=0)
            ax.axvline(coords[var], color="C3", lw=0.8, ls=":", zorder=0)
            ax.plot(data[f"{var}_grid"], data[f"{top}_over_{var}"], ".", ms=1.5, color="C0")
            ax.set(xlabel=label, ylabel=ylabel)
        fig.suptitle(title)
        save(fig, name)

    def grads(data, r, title, name, switch):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, var, label in zip(axes, ("w", "b"), (w_name, b_name)):
            if switch:
                ax.axvline(coords[f"{var}_switch"], color="0.75", lw=0.8, zorder=0)
            ax.axvline(coords[var], color="C3", lw=0.8, ls=":", zorder=0)
            ax.plot(data[f"{var}_grid"], data[f"dR_{r}_d{var}_over_{var}"], ".", ms=1.5, color="C0")
            ax.set(xlabel=label, ylabel=rf"$\partial_{var} \mathcal{{R}}_{{{r}}}$")
        fig.suptitle(title)
        save(fig, name)

    single, batch = arrays["single"], arrays["batch"]
    pair(single, "s", rf"Figure 3: $s = \partial_{{x_0}} z_L$ over $w$ and $b$ ($x_0 = {X0}$)", "fig3_s.png",
         ylabels=("$s$", "$s$"))
    grads(single, "node", rf"Figure 4: derivatives of $\mathcal{{R}}_{{node}}$ ($x_0 = {X0}$)", "fig4_rnode.png", True)
    grads(single, "cdb", rf"Figure 5: derivatives of $\mathcal{{R}}_{{cdb}}$ ($x_0 = {X0}$)", "fig5_rcdb.png", True)
    grads(batch, "node", rf"Figure 6: derivatives of $\mathcal{{R}}^{{B}}_{{node}}$ (batch mean, M = {BATCH})",
          "fig6_rnode_batch.png", False)
    grads(batch, "cdb", rf"Figure 7: derivatives of $\mathcal{{R}}^{{B}}_{{cdb}}$ (batch mean, M = {BATCH})",
          "fig7_rcdb_batch.png", False)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=FIGURES, help="folder for the PNGs and sine_params.npz")
    ap.add_argument("--params", type=Path, default=None, help="use these params (.npz) instead of training")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from dbpgen.train import load_params, save_params

    start = time.perf_counter()
    params = None
    if args.params:
        params = load_params(args.params, load_modules()["mse"])
    arrays = compute_all(params, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    if arrays["train"] is not None:
        t = arrays["train"]
        print(f"trained: {t.steps} Adam steps, final mean squared loss {t.loss:.3g}")
        save_params(args.out / "sine_params.npz", arrays["params"])
    c = arrays["coords"]
    print(f"w = W2[{c['i']},{c['k']}] = {c['w']:.4f} (switches at {c['w_switch']:.4f}), "
          f"b = b2[{c['i']}] = {c['b']:.4f} (switches at {c['b_switch']:.4f})")
    ratios = jump_ratios(arrays)
    print("largest jump of dR/dw, batch mean / single sample: "
          + ", ".join(f"R_{r} {v:.4f}" for r, v in ratios.items()))
    for path in plot_all(arrays, args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
