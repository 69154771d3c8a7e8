#!/usr/bin/env bash
# The GPU benchmark and the GPU tests in one device run, in under ~9 minutes of command time:
#   1. install the wheels the GPU image lacks (hydra-core, optuna, mlflow, mlxtend and their dependencies) from
#      .whl/, carried from this checkout: nothing can be downloaded on the device;       ~30 s
#   2. bench/gpu_sweep.py --json $OUT/gpu_sweep.json: measurements most important first, none started after
#      --deadline-s, each sweep stopped at its share of the deadline (hard stop: timeout 420 s);   <= 7 min
#   3. python -m pytest -m gpu -q (hard stop: timeout 100 s).
# Before the run, on the CPU machine, from the project root: ../shared/tools/device-wheels.sh (fills .whl/), then
# run this with carry [".whl"]:   bash bench/gpu_run.sh
# Everything it measures lands in $OUT: gpu_sweep.json, gpu_sweep.log, pytest_gpu.log, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pitsearch-gpu-out}
mkdir -p "$OUT"
started=$SECONDS

ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run ../shared/tools/device-wheels.sh here and carry .whl"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD   # pip install -e . cannot fetch its build backend there; the tree imports as is
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import torch, timm, optuna, hydra, mlflow, mlxtend
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| timm", timm.__version__, "| optuna",
      optuna.__version__, "| hydra", hydra.__version__, "| mlflow", mlflow.__version__)'; } 2>&1 | tee "$OUT/env.txt"
echo "setup: $((SECONDS - started)) s"

timeout 420 python3 bench/gpu_sweep.py --json "$OUT/gpu_sweep.json" --deadline-s 330 2>&1 | tee "$OUT/gpu_sweep.log"
bench_rc=${PIPESTATUS[0]}
echo "bench: exit $bench_rc after $((SECONDS - started)) s"

timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_rc; total $((SECONDS - started)) s"
exit $(( bench_rc != 0 || tests_rc != 0 ))
