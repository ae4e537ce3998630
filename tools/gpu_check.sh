#!/usr/bin/env bash
# The one-GPU check (tools/gpu_check.py) from the repository root, where it finds glmc even
# when glmc is not pip-installed. Relative --report paths are taken from the repository root.
#   tools/gpu_check.sh --report gpu-check.json            # --device cuda is the default
#   PYTHON=/opt/venv/bin/python tools/gpu_check.sh --report gpu-check.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
