#!/usr/bin/env bash
# Every number in docs/performance.md, in one run (about 20 minutes on 2 cores):
#   . .venv/bin/activate && pip install -e ".[bench]" && benchmarks/results.sh | tee benchmarks/results.txt
# Run it on an idle machine: anything else on a core distorts every thread pool involved.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=benchmarks
echo "# $(date -u +%F) $(python -c 'import platform; print(platform.processor() or platform.machine())'), $(nproc) cores"
python -c 'import numpy, numba, torch, jax, pytensor; print("# numpy", numpy.__version__, "numba", numba.__version__, "torch", torch.__version__, "jax", jax.__version__, "pytensor", pytensor.__version__)'
for dtype in float64 float32; do
  dbpgen bench "$MODELS/sine_cdb.yaml" --batch 256 --dtype $dtype
  for m in mnist_cdb mnist_jac tanh_node; do
    dbpgen bench "$MODELS/$m.yaml" --batch 128 --dtype $dtype
  done
done
echo "# scaling in the batch size (dbpgen alone)"
for m in sine_cdb mnist_cdb mnist_jac tanh_node; do
  dbpgen bench "$MODELS/$m.yaml" --batch 32 64 128 256 512 1024 --against "" --seconds 0.5
done
echo "# scaling in the number of outputs C (mnist_jac: one double backprop per output)"
dbpgen bench "$MODELS/mnist_jac.yaml" --batch 128 --outputs 10 20 50 100 --against jax
