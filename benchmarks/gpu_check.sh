#!/usr/bin/env bash
# benchmarks.gpu_check on the GPU machine we are lent (one H100/H200, 16 cores, torch 2.11 cu130, no DALI, no
# network; ../shared/gpu/README.md). Six `run` calls, back to back (the machine stays warm ~30 s between them):
#
#   here, once:  bash ../shared/gpu/prepare_dali.sh && mkdir -p .gpu && cp -r ../shared/data/imagenet-sample .gpu/
#   run 1-4:     carry [".gpu/partN"]   command: mkdir -p /tmp/dali-parts && cp .gpu/partN /tmp/dali-parts/
#                (N = 0, 1, 2, 3: one part per call)
#   run 5:       carry [".gpu/install_dali.sh", ".gpu/imagenet-sample"]   timeout_s 560
#                command: bash benchmarks/gpu_check.sh
#
# It installs DALI from the parts, replicates the 400 real JPEGs to 10,000 samples, shards them and runs every
# check within 450 s (--budget; checks that would start later are listed as skipped). Results: gpu_check.json
# under $OUT (it comes back with the call) and a PASS/FAIL line per check in the output; copy the figures into
# benchmarks/RESULTS.md as a dated section.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .gpu/install_dali.sh
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m imt.benchmarks.gpu_check --images .gpu/imagenet-sample --cache /tmp/imt-gpu-check \
    --json "${OUT:-.}/gpu_check.json" --budget "${BUDGET:-450}" "$@"
