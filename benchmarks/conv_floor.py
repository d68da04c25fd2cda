"""How fast can an im2col convolution in NumPy's BLAS be, against PyTorch's own?

    python benchmarks/conv_floor.py

For conv layers of the conv sweep's shapes (docs/sweep-conv.md), in float32 and float64:
the three GEMMs of K, K^T and K^box with their im2col columns already built, by NumPy's
matmul (the floor of any im2col kernel: it leaves out the gather, the scatter and every
copy), against torch's conv2d, conv2d_input and conv2d_weight on the same shapes (batch B,
zero padding that keeps the size). Prints both sums, their ratio and the GFLOP/s of each.
Needs torch (`pip install -e ".[bench]"`).
"""

import time

import numpy as np
import torch

# (in channels, out channels, image size, kernel, padding, batch)
LAYERS = [(3, 16, 32, 3, 1, 64), (16, 32, 16, 3, 1, 64), (32, 32, 8, 3, 1, 64), (8, 16, 16, 3, 1, 64),
          (32, 64, 16, 3, 1, 64), (3, 128, 16, 3, 1, 16), (128, 256, 8, 3, 1, 16), (3, 16, 32, 5, 2, 64),
          (16, 32, 16, 5, 2, 64), (16, 32, 32, 3, 1, 16), (3, 16, 64, 3, 1, 16), (16, 32, 32, 3, 1, 256)]


def median_ms(f, seconds=0.5):
    f()
    f()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    conv = torch.nn.functional.conv2d
    for dtype in (np.float32, np.float64):
        for cin, cout, size, k, pad, batch in LAYERS:
            x = torch.from_numpy(rng.standard_normal((batch, cin, size, size)).astype(dtype))
            w = torch.from_numpy(rng.standard_normal((cout, cin, k, k)).astype(dtype))
            y = conv(x, w, padding=pad)
            positions = batch * y.shape[2] * y.shape[3]
            filters = rng.standard_normal((cout, cin * k * k)).astype(dtype)
            cols = rng.standard_normal((cin * k * k, positions)).astype(dtype)
            ys = rng.standard_normal((cout, positions)).astype(dtype)
            numpy_ms = (median_ms(lambda: filters @ cols) + median_ms(lambda: filters.T @ ys)
                        + median_ms(lambda: ys @ cols.T))
            torch_ms = (median_ms(lambda: conv(x, w, padding=pad))
                        + median_ms(lambda: torch.nn.grad.conv2d_input(x.shape, w, y, padding=pad))
                        + median_ms(lambda: torch.nn.grad.conv2d_weight(x, w.shape, y, padding=pad)))
            mflop = 3 * 2 * cout * cin * k * k * positions / 1e6
            print(f"{dtype.__name__} {cin:3d}->{cout:3d} k{k} {size}px B{batch}: NumPy GEMMs {numpy_ms:.3f} ms "
                  f"({mflop / numpy_ms:.0f} GFLOP/s), torch {torch_ms:.3f} ms ({mflop / torch_ms:.0f} GFLOP/s), "
                  f"torch / NumPy {torch_ms / numpy_ms:.2f}")


if __name__ == "__main__":
    main()
