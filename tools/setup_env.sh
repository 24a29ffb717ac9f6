#!/usr/bin/env bash
# Create .venv with megatron_moe's pinned dependencies (CPU torch wheel) and the package itself.
#   bash tools/setup_env.sh            # runtime + test dependencies
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# torch first and pinned on its own, so no other requirement can pull a different (CUDA) build.
.venv/bin/python -m pip install -q --disable-pip-version-check "$(grep '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "[setup] ready: $(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)')"
