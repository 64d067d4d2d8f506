#!/usr/bin/env bash
# Creates the project-local virtualenv (.venv) or reuses it when it is already complete.
# "Complete" means a stamp written after the last successful install matches the current
# dependency files, so a second run costs well under a second instead of minutes.
# Overrides: IMT_VENV (location), IMT_PYTHON (interpreter), IMT_TORCH (torch pins).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${IMT_VENV:-.venv}
PY=${IMT_PYTHON:-python3}
# torch 2.14.1 / torchvision 0.29.1 lie on this machine's disk for Python 3.11 (x86_64).
TORCH=${IMT_TORCH:-torch==2.14.1 torchvision==0.29.1}
stamp=$(cat setup.cfg pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.imt-complete" ] && [ "$(cat "$VENV/.imt-complete")" = "$stamp" ]; then
  exit 0
fi
echo "[env] setting up $VENV (first run takes several minutes: torch is large)" >&2
rm -f "$VENV/.imt-complete"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build from the registry.
"$VENV/bin/python" -m pip install -q $TORCH
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -c 'import torch, torchvision, nvidia.dali, webdataset; print("[env] torch", torch.__version__, "dali", nvidia.dali.__version__)' >&2
echo "$stamp" > "$VENV/.imt-complete"
