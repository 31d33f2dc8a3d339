#!/usr/bin/env bash
# The device check: on a GPU (a Mac's Metal, or an NVIDIA one through MLX's CUDA backend), install,
# run the parity tests there (`pytest -m kernels`: both sets of kernel branches, see
# mlx_trm/kernels.py), time benchmarks/tokens_per_second.py (train at 8 x 512 and 64 x 512,
# generate, moe) and write one markdown table naming the device. Meant to take under 8 minutes.
#   bash scripts/device_check.sh                # install, tests, benchmarks -> benchmarks/results/
#   bash scripts/device_check.sh --no-install   # with the packages already installed
#   bash scripts/device_check.sh --dry-run      # the same steps at tiny sizes, no install, on the
#                                               # default device (the CPU without a GPU; a test)
#   --out FILE                                  # the table (default benchmarks/results/device_check.md;
#                                               # a dry run's: $TMPDIR/device_check_dry_run.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0 INSTALL=1 OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 INSTALL=0 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT=$2; shift ;;
    *) echo "error: unknown option $1 (use --dry-run, --no-install, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
# a dry run's table is a check, not a result: it stays out of the repository
[ -n "$OUT" ] || { [ $DRY = 1 ] && OUT=${TMPDIR:-/tmp}/device_check_dry_run.md || OUT=benchmarks/results/device_check.md; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3  # MLX's Linux CPU backend only
if [ "$(uname -s)" = Linux ] && [ -f "$BLAS" ] && [ -z "${LD_PRELOAD:-}" ]; then
  export LD_PRELOAD=$BLAS
fi
START=$SECONDS
step() { printf '\n=== %s (%d s so far)\n' "$*" $((SECONDS - START)); }

if [ "$INSTALL" = 1 ]; then
  step "install"
  if [ "$(uname -s)" = Darwin ]; then
    $PY -m pip install -q -e ".[dev,torch]"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -m pip install -q -e ".[dev]" "mlx[cuda12]"
    # mlx-cpu (the Linux default) and mlx-cuda-12 both ship mlx/lib/libmlx.so: keep the CUDA one
    $PY -m pip uninstall -q -y mlx-cpu
    $PY -m pip install -q --force-reinstall --no-deps \
      "mlx-cuda-12==$($PY -c 'import importlib.metadata as m; print(m.version("mlx"))')"
    # the reference fixtures are read with torch; its CPU wheel is enough (and small)
    $PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch \
      --index-url https://download.pytorch.org/whl/cpu \
      || echo "warning: no torch: the reference-fixture tests will be skipped" >&2
  else
    echo "error: no GPU here (neither macOS nor nvidia-smi); run with --dry-run to try the" \
         "steps on the CPU" >&2
    exit 2
  fi
fi

step "device"
$PY - "$DRY" <<'PYEOF'
import sys
import mlx.core as mx
gpu = mx.default_device() == mx.gpu
print(f"MLX {mx.__version__}, default device {mx.default_device()}, {mx.device_info()}")
if not gpu and sys.argv[1] != "1":
    sys.exit("error: MLX's default device is the CPU: on Linux install mlx[cuda12] (and remove "
             "mlx-cpu), or use --dry-run for a CPU run")
PYEOF

step "parity tests (pytest -m kernels)"
TESTS=(-m kernels)
if [ "$DRY" = 1 ]; then  # one model family, Apple silicon's branches, two test files
  TESTS+=(-k "metal and flat" tests/test_generate.py tests/test_mlx_lm_batch.py)
fi
mkdir -p "$(dirname "$OUT")"
LOG=$(mktemp)
set +e
$PY -m pytest -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$LOG" | tail -n 15
TESTS_RC=${PIPESTATUS[0]}
set -e
SUMMARY=$(grep -E '(passed|failed|error)' "$LOG" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')
rm -f "$LOG"

step "benchmarks/tokens_per_second.py"
$PY - "$DRY" "$OUT" "$SUMMARY" "$TESTS_RC" <<'PYEOF'
import sys, time
sys.path.insert(0, "benchmarks")
import tokens_per_second as tps

dry, out, summary, rc = sys.argv[1] == "1", sys.argv[2], sys.argv[3], int(sys.argv[4])
timing = ["--repeats", "1", "--warmup", "0"] if dry else ["--repeats", "3", "--warmup", "1"]
train = ["--suite", "train", "--seq-len", "16" if dry else "512"]
one = ["--configs", "trm_tinystories_1m_flat"] if dry else []
runs = {  # label -> arguments; the dry run: one config, 2 and 4 rows of 16 tokens
    "train 8 x 512": train + one + ["--batch-size", "2" if dry else "8"],
    "train 64 x 512": train + one + ["--batch-size", "4" if dry else "64", "--uncompiled", "none"],
    "generate": ["--suite", "generate"] + one + (
        ["--prompt-tokens", "4", "--max-tokens", "3", "--max-tokens-uncached", "2"] if dry else []),
    "moe": ["--suite", "moe"] + (["--moe-sizes", "1M", "--batch-size", "2", "--seq-len", "16"]
                                 if dry else []),
}
records, start = [], time.perf_counter()
for label, args in runs.items():
    tic = time.perf_counter()
    records += tps.main(args + timing)
    print(f"--- {label}: {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
env = tps.environment()
title = f"Device check on {env['device']}" + (" (dry run: tiny sizes)" if dry else "")
with open(out, "w") as f:
    f.write(f"## {title}\n\nParity tests (`pytest -m kernels`): {summary or 'no summary'}"
            f"{'' if rc == 0 else f' (exit code {rc})'}; benchmarks "
            f"{time.perf_counter() - start:.0f} s.\n\n{tps.markdown_table(records, env)}\n")
print(f"wrote {out}", file=sys.stderr)
PYEOF
step "done: $OUT"
cat "$OUT"
exit "$TESTS_RC"
