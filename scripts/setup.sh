# Sourced by scripts/demo and scripts/test: make .venv, install torch 2.13.0 (CPU wheel) only when no torch
# is importable, then adaptools itself (editable) with the extras named in $ADAPTOOLS_EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".${ADAPTOOLS_EXTRAS:+[$ADAPTOOLS_EXTRAS]}"
"$PY" -c "import adaptools, adaptools_cli"
