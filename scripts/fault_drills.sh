#!/usr/bin/env bash
# Fault drills for the trainer (issue 24), run the way a user would, through the CLI, on the
# quickstart config with a checkpoint every step. Each drill prints its command and the lines that
# matter, then PASS or FAIL. Runs live under $DRILLS (default /tmp/drills), wiped first.
#   bash scripts/fault_drills.sh            # all drills, ~5 minutes on 2 CPU cores
#   bash scripts/fault_drills.sh nan kill   # only some: nan kill lock errors small
# The full-disk drill mounts a 15 MB tmpfs and needs root; without it the drill is skipped.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
D=${DRILLS:-/tmp/drills}
PY=${PYTHON:-python}
Q="--config configs/quickstart.yaml train.checkpoint_interval_sequences=16 train.log_interval=1"
FAILS=0

say() { printf '\n=== %s\n' "$*"; }
show() { echo "\$ $*"; "$@" 2>&1 | tail -n "${TAIL:-4}"; return "${PIPESTATUS[0]}"; }
check() { if eval "$2"; then echo "PASS: $1"; else echo "FAIL: $1"; FAILS=$((FAILS + 1)); fi; }
train() { $PY -m mlx_trm.cli.train $Q "$@"; }
# every tensor of every .safetensors under $1 finite? prints "<n> tensors, <k> non-finite"
finite() {
  $PY - "$1" <<'PYEOF'
import sys, glob, mlx.core as mx
n = bad = 0
for f in glob.glob(sys.argv[1] + "/**/*.safetensors", recursive=True):
    for k, v in mx.load(f).items():
        n += 1
        bad += int(mx.issubdtype(v.dtype, mx.floating) and not mx.all(mx.isfinite(v)).item())
print(f"{n} tensors, {bad} non-finite")
sys.exit(bad > 0)
PYEOF
}
# largest |a - b| over the tensors of two model dirs (weights and optimizer state)
maxdiff() {
  $PY - "$1" "$2" <<'PYEOF'
import sys, mlx.core as mx
worst = 0.0
for f in ("model.safetensors", "train_state/optimizer.safetensors"):
    a, b = mx.load(f"{sys.argv[1]}/{f}"), mx.load(f"{sys.argv[2]}/{f}")
    assert a.keys() == b.keys(), f
    worst = max([worst] + [mx.max(mx.abs(a[k] - b[k])).item() for k in a])
print(f"max |diff| over weights and optimizer state: {worst}")
sys.exit(worst != 0.0)
PYEOF
}
# training records' steps strictly increasing (no step logged twice)?
increasing() {
  $PY - "$1" <<'PYEOF'
import sys, json
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r["step"] for r in recs if "loss" in r]
ok = all(a < b for a, b in zip(steps, steps[1:]))
print(f"{len(steps)} training records, steps {steps[0]}..{steps[-1]}, strictly increasing: {ok}")
sys.exit(not ok)
PYEOF
}
step_of() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]+'/model/train_state/state.json'))['step'])" "$1"; }

drill_nan() {
  say "1. NaN: a non-finite update stops the run before anything is written"
  rm -rf $D/nan
  show train train.lr=1e6 train.lr_warmup_percent=0 train.max_steps=20 out_dir=$D/nan; rc=$?
  check "exit code 2 (got $rc)" '[ $rc = 2 ]'
  echo "checkpoint left at step $(step_of $D/nan); its tensors: $(finite $D/nan/model)"
  check "checkpoint left is finite" 'finite $D/nan/model >/dev/null'
  echo "\$ python -c 'mlx_trm.load(\"$D/nan/model\")' and a finite forward pass"
  $PY -c "import mlx_trm, mlx.core as mx; m,t=mlx_trm.load('$D/nan/model'); print('loaded, step-%s weights finite' % '$(step_of $D/nan)')"
  say "1b. resume of the NaN run: same lr, hits the same update, stops again with the checkpoint intact"
  show train train.lr=1e6 train.lr_warmup_percent=0 train.max_steps=20 out_dir=$D/nan train.resume=true; rc=$?
  check "resume stops again in one line, exit 2, checkpoint still finite" '[ $rc = 2 ] && finite $D/nan/model >/dev/null'
  say "1c. evaluate / generate refuse a model with non-finite weights (one made by hand)"
  rm -rf $D/poison && cp -r $D/nan/model $D/poison
  $PY -c "
import mlx.core as mx; f='$D/poison/model.safetensors'; w=mx.load(f)
k=sorted(w)[0]; w[k]=w[k]*float('nan'); mx.save_safetensors(f,w); print('poisoned', k)"
  show $PY -m mlx_trm.cli.evaluate --model $D/poison --data tinystories-sample --max-stories 8; rc=$?
  check "evaluate refuses in one line, exit 2" '[ $rc = 2 ] && [ $($PY -m mlx_trm.cli.evaluate --model $D/poison --data tinystories-sample 2>&1 | wc -l) = 1 ]'
  show $PY -m mlx_trm.cli.generate --model $D/poison --prompt "Once upon a time" --max-tokens 5; rc=$?
  check "generate refuses in one line, exit 2" '[ $rc = 2 ] && [ $($PY -m mlx_trm.cli.generate --model $D/poison --prompt Hi 2>&1 | wc -l) = 1 ]'
}

logged() {  # training records in a run's metrics.jsonl (0 before it exists)
  local n; n=$(grep -sc '"loss"' "$1/metrics.jsonl"); echo "${n:-0}"
}

drill_kill() {
  say "2. kill -9 at random moments of a 40-step run that checkpoints every step; resume each time"
  rm -rf $D/ref $D/kill
  show train train.max_steps=40 out_dir=$D/ref --quiet
  for i in 1 2 3 4 5; do
    $PY -m mlx_trm.cli.train $Q train.max_steps=40 out_dir=$D/kill train.resume=true --quiet >$D/kill.log 2>&1 &
    pid=$!
    # start-up (imports, compilation) takes seconds and varies with the load: wait for the run's
    # first training record of this attempt, then kill at a random instant of the next ~3 s,
    # which has several steps and checkpoint writes in it
    n0=$(logged $D/kill)
    for _ in $(seq 600); do
      [ "$(logged $D/kill)" -gt "$n0" ] && break
      sleep 0.1
    done
    t=$($PY -c "import random; print(round(random.uniform(0, 3), 2))")
    sleep "$t"; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    echo "kill -9 ${t}s after a new step was logged: on disk $(ls -A $D/kill 2>/dev/null | tr '\n' ' ')| model step $(step_of $D/kill 2>/dev/null || echo none)"
  done
  TAIL=6 show train train.max_steps=40 out_dir=$D/kill train.resume=true; rc=$?
  check "resumed run finishes (exit $rc)" '[ $rc = 0 ]'
  maxdiff $D/ref/model $D/kill/model; r=$?
  check "bit-exact against the uninterrupted run of the same seed" '[ $r = 0 ]'
  increasing $D/kill; r=$?
  check "no metrics record duplicated by the resumes" '[ $r = 0 ]'
  echo "left in out_dir: $(ls -A $D/kill | tr '\n' ' ')"
  check "no .model.tmp-* / .model.old-* left" '[ -z "$(ls -A $D/kill | grep "^\.model\.")" ]'

  say "2b. kill -9 exactly between the two renames (model -> .model.old-*, then .model.tmp-* -> model)"
  rm -rf $D/between
  # a real SIGKILL from inside the process, at the second rename of the step-5 save
  $PY - $D/between <<'PYEOF' 2>&1 | tail -2
import os, signal, sys, pathlib
from mlx_trm import train
real = pathlib.Path.rename
saves = 0
def rename(self, target):
    global saves
    if self.name.startswith(".model.tmp-"):
        saves += 1
        if saves == 5:
            print("on disk at the kill:", sorted(p.name for p in self.parent.iterdir()), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, target)
pathlib.Path.rename = rename
train.main(["--config", "configs/quickstart.yaml", "--quiet", "train.checkpoint_interval_sequences=16",
            "train.max_steps=10", f"out_dir={sys.argv[1]}"])
PYEOF
  echo "after the kill: $(ls -A $D/between | tr '\n' ' ')"
  out=$(train train.max_steps=10 out_dir=$D/between train.resume=true 2>&1); rc=$?
  echo "\$ mlx_trm.train ... out_dir=$D/between train.resume=true"; echo "$out" | grep -v "^step " | head -4
  check "resume recovers the newest complete copy (not step 0) and finishes (exit $rc)" \
    '[ $rc = 0 ] && echo "$out" | grep -q "recovered" && ! echo "$out" | grep -q "starting a new run"'
  echo "left: $(ls -A $D/between | tr '\n' ' ')"
  check "leftovers cleaned" '[ -z "$(ls -A $D/between | grep "^\.model\.")" ]'

  say "2c. the fault-injection test: a kill at each file operation of a save, then resume"
  show $PY -m pytest tests/test_faults.py -q -x -k "kill_at_any or newest_complete" -p no:cacheprovider; rc=$?
  check "fault-injection tests pass" '[ $rc = 0 ]'
}

drill_lock() {
  say "3. two runs on one out_dir a few seconds apart"
  rm -rf $D/lock
  $PY -m mlx_trm.cli.train $Q train.max_steps=40 out_dir=$D/lock --quiet >$D/lockA.log 2>&1 &
  a=$!; sleep 6
  show train train.max_steps=40 train.seed=7 out_dir=$D/lock; rc=$?
  echo "(first run's pid: $a)"
  check "second run refused in one line naming pid $a, exit 2" '[ $rc = 2 ] && train train.max_steps=40 out_dir=$D/lock 2>&1 | grep -q "pid $a"'
  say "3b. a stale lock after kill -9 is detected"
  kill -9 $a; wait $a 2>/dev/null
  echo "train.lock after the kill: $(cat $D/lock/train.lock)"
  out=$(train train.max_steps=40 out_dir=$D/lock train.resume=true 2>&1); rc=$?
  echo "\$ mlx_trm.train ... out_dir=$D/lock train.resume=true"; echo "$out" | grep -v "^step " | head -4
  check "stale lock detected and taken over, run finishes (exit $rc)" '[ $rc = 0 ] && echo "$out" | grep -q "gone"'
}

drill_errors() {
  say "4. one line, exit code 2: a truncated model.safetensors"
  rm -rf $D/good $D/trunc
  show train train.max_steps=6 out_dir=$D/good --quiet
  cp -r $D/good $D/trunc && truncate -s 1000000 $D/trunc/model/model.safetensors
  echo "\$ python -c 'import mlx_trm; mlx_trm.load(\"$D/trunc/model\")'"
  $PY -c "
import mlx_trm
try: mlx_trm.load('$D/trunc/model')
except Exception as e: print(type(e).__name__ + ':', e)"
  for cmd in "$PY -m mlx_trm.cli.generate --model $D/trunc --prompt Hi" \
             "$PY -m mlx_trm.cli.evaluate --model $D/trunc --data tinystories-sample" \
             "$PY -m mlx_trm.cli.train $Q train.max_steps=6 out_dir=$D/trunc train.resume=true"; do
    out=$($cmd 2>&1); rc=$?
    echo "\$ $cmd"; echo "$out" | tail -2
    check "one line naming model.safetensors, exit 2 (rc $rc, $(echo "$out" | grep -vc '^resuming\|^step ') line(s))" '[ $rc = 2 ] && [ $(echo "$out" | grep -c "^error") = 1 ] && echo "$out" | grep "^error" | grep -q "model.safetensors" && ! echo "$out" | grep -q Traceback'
  done
  say "4b. garbage in train_state/ on resume"
  for f in state.json optimizer.safetensors carry.safetensors; do
    rm -rf $D/garbage && cp -r $D/good $D/garbage
    head -c 3000 /dev/urandom > $D/garbage/model/train_state/$f
    out=$(train train.max_steps=6 out_dir=$D/garbage train.resume=true 2>&1); rc=$?
    echo "\$ (random bytes in train_state/$f) mlx_trm.train ... train.resume=true"; echo "$out" | tail -1
    check "one line naming $f, exit 2" '[ $rc = 2 ] && echo "$out" | grep "^error" | grep -q "$f" && ! echo "$out" | grep -q Traceback'
  done
  say "4c. a full disk while saving (15 MB tmpfs: the first checkpoint fits, a second copy beside it does not)"
  mkdir -p $D/full && umount $D/full 2>/dev/null
  if mount -t tmpfs -o size=15M tmpfs $D/full 2>/dev/null; then
    show train train.max_steps=20 out_dir=$D/full/run; rc=$?
    echo "df: $(df -h $D/full | tail -1)"
    echo "left: $(ls -A $D/full/run | tr '\n' ' '); checkpoint step $(step_of $D/full/run); $(finite $D/full/run/model)"
    check "one line with the space needed, exit 2, previous checkpoint intact" \
      '[ $rc = 2 ] && [ -n "$(step_of $D/full/run)" ] && [ -z "$(ls -A $D/full/run | grep "^\.model\.")" ]'
    umount $D/full
  else echo "SKIP: cannot mount a tmpfs here (needs root)"; fi
  say "4d. Ctrl-C (SIGINT) right after set-up, during the first step"
  rm -rf $D/int
  # a non-interactive bash starts background jobs with SIGINT ignored (and python keeps it
  # so): restore the default, as a terminal's Ctrl-C would find it
  $PY -c "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])" \
    $PY -m mlx_trm.cli.train $Q train.max_steps=20 out_dir=$D/int >$D/int.log 2>&1 &
  p=$!
  # after set-up (the step-0 evaluation is printed), before the first step has finished
  for _ in $(seq 600); do grep -q "^step 0:" $D/int.log 2>/dev/null && break; sleep 0.05; done
  kill -INT $p; wait $p; rc=$?
  echo "\$ mlx_trm.train ... & (step-0 evaluation printed); kill -INT \$!  (exit $rc)"; tail -2 $D/int.log
  check "one line, no traceback, exit 130 (rc $rc)" '[ $rc = 130 ] && ! grep -q Traceback $D/int.log && grep -q "nothing to save\|holds step" $D/int.log'
}

drill_small() {
  say "5. changed data.* settings on resume; config.yaml stays truthful"
  sum=$(md5sum < $D/good/config.yaml)
  show train train.max_steps=6 out_dir=$D/good train.resume=true data.packing=false; rc=$?
  check "changed data.packing refused, exit 2" '[ $rc = 2 ]'
  show train train.max_steps=6 out_dir=$D/good train.resume=true train.log_interval=3; rc=$?
  check "config.yaml unchanged by the resumes" '[ "$(md5sum < $D/good/config.yaml)" = "$sum" ]'
  say "5b. SIGTERM mid-run saves like Ctrl-C, and the run resumes"
  rm -rf $D/term $D/term_ref
  $PY -m mlx_trm.cli.train $Q train.max_steps=40 train.checkpoint_interval_sequences=1600 out_dir=$D/term >$D/term.log 2>&1 &
  p=$!
  # kill once a few steps are logged (start-up varies with the load), well before step 40
  for _ in $(seq 600); do [ "$(logged $D/term)" -ge 3 ] && break; sleep 0.1; done
  kill -TERM $p; wait $p; rc=$?
  echo "\$ mlx_trm.train ... & (3 steps logged); kill -TERM \$!  (exit $rc)"; grep -v "^step " $D/term.log | tail -2
  check "saved on SIGTERM (step $(step_of $D/term))" '[ -n "$(step_of $D/term)" ] && [ "$(step_of $D/term)" != 0 ]'
  TAIL=3 show train train.max_steps=40 train.checkpoint_interval_sequences=1600 out_dir=$D/term train.resume=true; rc=$?
  train train.max_steps=40 train.checkpoint_interval_sequences=1600 out_dir=$D/term_ref --quiet >/dev/null 2>&1
  maxdiff $D/term_ref/model $D/term/model; r=$?
  check "resumed after SIGTERM, bit-exact with an uninterrupted run" '[ $rc = 0 ] && [ $r = 0 ]'
  increasing $D/term; r=$?
  check "no duplicated metrics records" '[ $r = 0 ]'
}

mkdir -p $D
for d in ${@:-nan kill lock errors small}; do "drill_$d"; done
say "failures: $FAILS"
exit $((FAILS > 0))
