#!/usr/bin/env bash
# Everything rnnlab measures on a GPU, in one prepared run sized for a short lease on a lent machine:
#
#   1. cuDNN LSTM in fp32 / TF32 / bf16 / fp16: dtype, error vs float64, speed (benchmarks/gpu_probe.py);
#   2. `rnnlab train JOB --preset smoke` for all three jobs in no / bf16 / fp16 on the GPU: which precision the
#      trainer actually used (the fall-back path), and that each run ends with a bundle;
#   3. training speed, chapter loop vs rnnlab, fp32, bf16 and fp16 autocast, and characters/s at a large batch
#      (benchmarks/train_speed.py);
#   4. charlm quality: the `chapter` and `default` presets (and one deeper variant) beside the n-gram baseline
#      (benchmarks/quality.py), run side by side on the one GPU until a deadline; a run cut off by the deadline
#      still reports its validation curve from metrics.jsonl.
#
# Usage, from the repository root, with the data mirror in RNNLAB_DATA_MIRROR and results written to OUT:
#     OUT=/tmp/gpu-results BUDGET_S=560 bash benchmarks/gpu_session.sh
# The machine needs torch with CUDA, accelerate, pandas, scikit-learn, safetensors, pyyaml, tqdm; W&B and Ray
# are not used (tracking.wandb=false).
set -u
OUT=${OUT:-/tmp/gpu-results}
BUDGET_S=${BUDGET_S:-560}          # wall seconds for the whole script; step 4 gets what is left
SPEED_SECONDS=${SPEED_SECONDS:-5}  # timed seconds per loop in step 3
PY=${PYTHON:-python3}
MIRROR=${RNNLAB_DATA_MIRROR:?set RNNLAB_DATA_MIRROR to the data mirror folder}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export RNNLAB_CACHE_DIR=${RNNLAB_CACHE_DIR:-/tmp/rnnlab-cache}
WORK=${WORK:-/tmp/gpu-session}
started=$(date +%s)
mkdir -p "$OUT" "$WORK/smoke" "$WORK/quality"
elapsed() { echo $(( $(date +%s) - started )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
NO_WANDB=(--set tracking.wandb=false --set train.progress=false)

step "1. machine and cuDNN LSTM precision probe"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -m benchmarks.gpu_probe --json "$OUT/probe.json"

step "2. smoke training, every job x precision, on the GPU (in parallel)"
for job in charlm stock sentiment; do
  for precision in no bf16 fp16; do
    ( $PY -m rnnlab.launch.cli --data-mirror "$MIRROR" train "$job" --preset smoke \
        --set "train.mixed_precision=$precision" "${NO_WANDB[@]}" --output "$WORK/smoke/$job-$precision" \
        >"$WORK/smoke/$job-$precision.log" 2>&1; echo $? >"$WORK/smoke/$job-$precision.rc" ) &
  done
done
wait
$PY - "$WORK/smoke" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print(f"{'job':<10} {'asked':<6} {'used':<6} {'rc':>3}  {'device':<8} test metrics / warning")
for job in ("charlm", "stock", "sentiment"):
    for asked in ("no", "bf16", "fp16"):
        run = root / f"{job}-{asked}"
        rc = (root / f"{job}-{asked}.rc").read_text().strip()
        used, test, device = "?", {}, "?"
        events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").exists() else []
        for event in events:
            if event["event"] == "config":
                used, device = event.get("precision", "?"), event.get("device", "?")
            if event["event"] == "test":
                test = {k: round(v, 4) for k, v in event.items() if isinstance(v, float) and k != "time"}
        log = (root / f"{job}-{asked}.log").read_text().splitlines()
        note = next((l.strip() for l in log if "instead" in l), log[-1] if rc != "0" and log else "")
        bundle = "bundle" if (run / "bundle" / "model.safetensors").exists() else "NO BUNDLE"
        print(f"{job:<10} {asked:<6} {used:<6} {rc:>3}  {device:<8} {bundle}; {test} {note[:160]}")
EOF
if [ "$(cat "$WORK/smoke/charlm-no.rc")" != 0 ]; then
  echo "charlm fp32 smoke failed; stopping here (nothing below can work):"; tail -30 "$WORK/smoke/charlm-no.log"
  tar czf "$OUT/details.tar.gz" -C "$WORK" smoke; exit 3
fi

step "3. training speed: chapter loop vs rnnlab, fp32, bf16 and fp16 autocast"
$PY -m benchmarks.train_speed --device cuda --precision fp32 bf16 fp16 --large-batch 1024 --large-seq 100 \
  --seconds "$SPEED_SECONDS" --skip-chapter-sampler --data-mirror "$MIRROR" --json "$OUT/train_speed_gpu.json" \
  >"$WORK/train_speed.log" 2>&1
sed -n '/^machine:/,$p' "$WORK/train_speed.log"; tail -3 "$WORK/train_speed.log" | grep -i error

left=$(( BUDGET_S - $(elapsed) - 25 ))
step "4. charlm quality, side by side until a deadline ${left} s from now"
quality() {  # name, then quality.py arguments
  local name=$1; shift
  timeout "$left" $PY -m benchmarks.quality --data-mirror "$MIRROR" --output "$WORK/quality/$name" \
    --set charlm:tracking.wandb=false --set charlm:train.progress=false "$@" \
    --json "$OUT/quality_$name.json" >"$WORK/quality/$name.log" 2>&1
}
quality chapter charlm:chapter &
quality default charlm:default &
quality deep3 charlm:default --set charlm:model.num_layers=3 --set charlm:model.dropout=0.25 &
wait
for name in chapter default deep3; do
  echo "--- $name"; sed -n '/^machine:/,$p' "$WORK/quality/$name.log" | grep -v "^machine"
done
$PY - "$WORK/quality" <<'EOF'
import json, sys
from pathlib import Path
for jsonl in sorted(Path(sys.argv[1]).glob("*/*/metrics.jsonl")):
    events = [json.loads(l) for l in jsonl.read_text().splitlines()]
    vals = [e for e in events if e["event"] == "val"]
    done = any(e["event"] == "test" for e in events)
    span = events[-1]["time"] - events[0]["time"]
    curve = " ".join(f"{e['loss']:.3f}" for e in vals)
    best = min((e["loss"] for e in vals), default=float("nan"))
    print(f"{jsonl.parent.parent.name}: {'finished' if done else 'CUT OFF'} after {span:.0f} s, "
          f"{len(vals)} validations, best val {best:.4f} nats/char; curve {curve}")
EOF
bundle="$WORK/quality/default/charlm-default/bundle"
if [ -f "$bundle/model.safetensors" ]; then
  echo "--- sample from charlm default (temperature 0.8, seed 0)"
  $PY -m rnnlab.launch.cli generate "$bundle" --prompt "the emperor" --length 300 --temperature 0.8 --seed 0 \
    | tee "$WORK/quality/default_sample.txt"
fi

step "done; packing logs"
tar czf "$OUT/details.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude=checkpoints smoke quality train_speed.log
ls -la "$OUT"
