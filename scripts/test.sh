#!/usr/bin/env bash
# The test command (README, .ci/run): sets up or reuses .venv, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh --slow` or `bash scripts/test.sh tests/tools -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -q -ra "$@"
