#!/usr/bin/env bash
# The main job on the embedded default dataset, end to end on a CPU-only machine:
# set up .venv -> generate the synthetic dataset -> shard it -> train + evaluate -> summary.
# Re-running reuses the venv, the dataset and the finished shards (make_shards resumes), and
# trains a fresh run. Pass extra imt-train options through, e.g. `bash scripts/demo.sh --epochs 2`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
PY=.venv/bin/python
$PY -m imt.tools.make_synthetic --out work/synthetic
$PY -m imt.tools.make_shards --src work/synthetic --out work/shards --workers 2
$PY -m imt.train.run --recipe synthetic_quick --data work/shards --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
