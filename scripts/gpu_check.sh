#!/usr/bin/env bash
# scripts/gpu_check.py on a lent device machine: installs wheels carried in .whl (if any), writes into $OUT.
set -euo pipefail; cd "$(dirname "$0")/.."; if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi; PYTHONUNBUFFERED=1 exec python3 scripts/gpu_check.py --out "${OUT:-/tmp/gpu_check}" "$@"
