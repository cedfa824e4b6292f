#!/usr/bin/env bash
# One GPU session's checks (run from the repository root on a CUDA machine that has torch,
# lightning, timm, torchmetrics, pluggy, scikit-learn and matplotlib but no network):
#   1. install paperhooks, the plugins and the benchmark peers from wheels built beforehand
#      into .whl/ (pip wheel --no-deps -w .whl . plugins/<each>; plus omegaconf, antlr4,
#      tensorboardX, torchjd, LibMTL);
#   2. a 3-step CUDA fit of every recipe in recipes/ (plugins must not leave tensors on the CPU);
#   3. benchmarks/run_all.py --device cuda, its page written under $OUT (or ./gpu-out).
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-out}
RUNS=/tmp/gpu-runs
mkdir -p "$OUT" "$RUNS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/fits.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/fits.txt"
fails=0
run_recipe() {
  local r=$1 name
  name=$(basename "$r" .yaml)
  if python3 -m paperhooks.cli fit "$r" trainer.accelerator=gpu trainer.max_steps=3 trainer.limit_val_batches=2 \
      trainer.enable_progress_bar=false "run_dir=$RUNS" "name=$name" > "$RUNS/$name.log" 2>&1; then
    echo "cuda fit ok: $name" | tee -a "$OUT/fits.txt"
  else
    { echo "cuda fit FAILED: $name"; tail -25 "$RUNS/$name.log"; } | tee -a "$OUT/fits.txt"; return 1
  fi
}
recipes=${RECIPES:-$(ls recipes/*.yaml)}
for r in $recipes; do
  name=$(basename "$r" .yaml)
  python3 -c "import sys, yaml; d = yaml.safe_load(open('$r')); sys.exit(0 if all(__import__('importlib.metadata').metadata.entry_points(group='paperhooks', name=p['name']) for p in d.get('plugins') or []) else 1)" 2>/dev/null \
    || { echo "skip (plugin not installed here): $name"; continue; }
  run_recipe "$r" &
  while [ "$(jobs -r | wc -l)" -ge 6 ]; do sleep 1; done
done
wait
fails=$(grep -c "cuda fit FAILED" "$OUT/fits.txt")
echo "cuda fits failed: $fails" | tee -a "$OUT/fits.txt"
[ "${SKIP_BENCH:-0}" = 1 ] && exit "$fails"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/run_all.py --device cuda --out "$OUT/docs" 2>&1 | grep -v USDT | tail -60
exit $fails
