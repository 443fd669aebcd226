#!/usr/bin/env bash
# Training throughput of each parallel layout through `moedit train` itself (docs/SCALING.md, "Measured on CPU"):
# the quickstart model, 30 steps of train.batch_size 32 per rank, no checkpoint or grid until the end,
# one thread per process. Prints one line per (world, layout): img/s over the whole world, ms per step
# (train_wall_s / steps, from RUN/summary.json). Usage: bash studies/scaling_cpu_train.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/moedit_scaling}
rm -rf "$out"; mkdir -p "$out"
common="train.steps=30 train.batch_size=32 train.ckpt_every=0 train.sample_every=0 train.log_every=10 sample.steps=2 sample.per_class=1 diagnostics.probe_every=0"
for world in 2 4; do
  for layout in "ddp 1" "fsdp 1" "fsdp 2" "fsdp 4"; do
    set -- $layout
    [ "$world" -lt "$2" ] && continue
    run="$out/w${world}_$1_ep$2"
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=$world -m moedit.cli.main train \
      -c configs/quickstart.yaml --no-progress --set $common train.threads=1 train.out_dir=$run parallel.data=$1 parallel.ep=$2 \
      > "$run.log" 2>&1
    python - "$run" "$world" "$1" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
print(f"world {sys.argv[2]} {sys.argv[3]:5s} ep {sys.argv[4]}: {s['img_per_s']:7.1f} img/s, {1000 * s['train_wall_s'] / s['steps']:6.1f} ms/step")
PY
  done
done
