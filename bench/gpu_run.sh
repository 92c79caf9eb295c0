#!/usr/bin/env bash
# Runs on a lent GPU machine (the device tool): GPU kernel checks, then the kernel benchmark.
# The project is not pip-installed there (no registry): `beluga.<folder>` is laid out by links, and the
# few pure-Python packages the GPU image lacks come as wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/beluga-gpu-out}
mkdir -p "$OUT" /tmp/pkg/beluga
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
cp beluga/*.py /tmp/pkg/beluga/
for d in cxlpool kernels workers router loadgen; do ln -sfn "$PWD/$d" "/tmp/pkg/beluga/$d"; done
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/card.txt"
python3 -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
python3 tests/gpu_checks.py 2>&1 | tee "$OUT/gpu_checks.log"
python3 bench/kernels.py --json > "$OUT/kernels.json" 2> "$OUT/kernels.log"
python3 - "$OUT/kernels.json" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from kernels import table
res = json.load(open(sys.argv[1]))
print(table(res))
print(json.dumps(res.get("multi_gpu")))
PY
