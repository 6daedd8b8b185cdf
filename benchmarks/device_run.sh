#!/usr/bin/env bash
# One command for a GPU or TPU machine (see benchmarks/README.md), under 8 minutes by default:
#   1. installs the prepared ml-collections wheel if the environment lacks it;
#   2. the throughput table of the three frameworks (ResNet-18, bf16, batch 128–1024 for SimCo,
#      MoCo v2 with a 65,536-key queue and SimMoCo at 256, bare fwd/bwd baseline at 256);
#   3. a short real-accuracy run: SimCo on the prepared CIFAR-100 subset via launch.py.
# Results land in $OUT (at most 8 files): device_run.log, env.txt, throughput.{json,txt},
# accuracy_metrics.jsonl, accuracy_config.json, summary.json.
#
#   prepare:   python benchmarks/prepare_device_payload.py --source=/path/to/cifar100.npz
#   check:     bash benchmarks/device_run.sh --cpu-dry-run   (tiny settings, same code paths)
#   run:       OUT=runs/device_run bash benchmarks/device_run.sh
#
# Time limits (seconds, overridable): BENCH_TIMEOUT=250, ACC_TIMEOUT=170; ACC_EPOCHS=30.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
OUT="${OUT:-$PWD/runs/device_dry_run}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PAYLOAD="device_payload"
NPZ="$PAYLOAD/cifar100_subset.npz"
export PYTHONUNBUFFERED=1

main() {
  local start=$SECONDS
  echo "== device_run.sh $(date -u +%FT%TZ) dry_run=$DRY"
  [[ -f "$NPZ" ]] || { echo "missing $NPZ: run python benchmarks/prepare_device_payload.py"; return 2; }

  # -------------------------------------------------------------- 1. dependencies
  if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    echo "installing the prepared wheels: $(ls $PAYLOAD/wheels)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/simco_site "$PAYLOAD"/wheels/*.whl || return 3
    export PYTHONPATH="/tmp/simco_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import ml_collections, absl, flax, optax, orbax.checkpoint" || return 3
  {
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__); print(jax.devices())"
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"

  # -------------------------------------------------------------- 2. throughput table
  local bench_args
  if (( DRY )); then
    bench_args=(--rows=simco:32,mocov2:32:64,simmoco:32 --width=4 --image_size=16
      --num_train=512 --steps_per_dispatch=2 --chunks=1 --baseline=32)
  else
    # Priority order: a timeout keeps the rows already written to the JSON.
    bench_args=(--rows=simco:256,mocov2:256:65536,simmoco:256,simco:128,simco:512,simco:1024
      --width=64 --dtype=auto --steps_per_dispatch=8 --warmup_chunks=1 --chunks=10
      --baseline=256)
  fi
  echo "== throughput (timeout ${BENCH_TIMEOUT:-250}s, t=$((SECONDS - start))s)"
  timeout -s INT "${BENCH_TIMEOUT:-250}" "$PY" benchmarks/throughput.py "${bench_args[@]}" \
    --json="$OUT/throughput.json" | tee "$OUT/throughput.txt"
  echo "throughput exit ${PIPESTATUS[0]}"

  # -------------------------------------------------------------- 3. real accuracy, short
  local workdir=/tmp/simco_accuracy acc_args
  rm -rf "$workdir"
  if (( DRY )); then
    acc_args=(--config=configs/simco_cifar.py:smoke --config.max_steps=12
      --config.eval_every_epochs=1 --config.knn_k=20)
  else
    acc_args=(--config=configs/simco_cifar.py --config.max_epochs="${ACC_EPOCHS:-30}"
      --config.warmup_epochs=3 --config.eval_every_epochs=5 --config.knn_every_epochs=10
      --config.log_every_steps=39 --config.checkpoint_every_steps=100000)
  fi
  echo "== accuracy run (timeout ${ACC_TIMEOUT:-170}s, t=$((SECONDS - start))s)"
  # SIGTERM on timeout: the trainer checkpoints and stops; its metrics so far are kept.
  timeout -s TERM -k 20 "${ACC_TIMEOUT:-170}" "$PY" launch.py "${acc_args[@]}" \
    --config.dataset=npz --config.data_path="$NPZ" --workdir="$workdir"
  echo "accuracy exit $?"
  cp "$workdir/metrics.jsonl" "$OUT/accuracy_metrics.jsonl" 2>/dev/null
  cp "$workdir/config.json" "$OUT/accuracy_config.json" 2>/dev/null

  # -------------------------------------------------------------- summary
  "$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
summary = {}
try:
    with open(os.path.join(out, "throughput.json")) as f:
        report = json.load(f)
    summary["device"] = report["device"]["device_kind"]
    summary["throughput"] = {
        f"{r['framework']}:{r['batch_size']}:{r.get('queue_size')}": r.get("images_per_s")
        for r in report["rows"]
    }
except (OSError, ValueError, KeyError) as error:
    summary["throughput_error"] = repr(error)
try:
    with open(os.path.join(out, "accuracy_metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in records if "probe_top1" in r]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    summary["accuracy"] = dict(
        last_step=records[-1]["step"] if records else None,
        last_eval=evals[-1] if evals else None,
        median_train_images_per_s=sorted(speeds)[len(speeds) // 2] if speeds else None,
    )
except (OSError, ValueError) as error:
    summary["accuracy_error"] = repr(error)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
EOF
  echo "== done in $((SECONDS - start))s"
}

main 2>&1 | tee "$OUT/device_run.log"
exit "${PIPESTATUS[0]}"
