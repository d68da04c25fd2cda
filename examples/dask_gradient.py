"""The gradient of sine_cdb's objective over 20 000 samples on a local Dask cluster of two
worker processes, against the module on all samples at once in this process.

    python examples/dask_gradient.py
"""
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import dbpgen
from dbpgen.distributed import value_and_grad

if __name__ == "__main__":  # worker processes import this file again: only the imports above run
    m = dbpgen.compile("examples/sine_cdb.yaml")
    params = m.init_params(seed=0)
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        x = da.random.default_rng(0).uniform(-3, 3, (20_000, 1), chunks=(5_000, 1))
        J, grads = value_and_grad(m, params, x, da.sin(x), client=client)
        xs = x.compute()
    J1, grads1 = m.value_and_grad(params, xs, np.sin(xs))
    print(f"J on 2 workers {J:.12g}, in one process {J1:.12g}; "
          f"largest gradient difference {max(np.abs(grads[k] - grads1[k]).max() for k in grads):.1e}")
