#!/usr/bin/env bash
# Create (or reuse) the kit's virtualenv and install what it needs. Prints the venv's python path last.
#   scripts/bootstrap.sh [VENV_DIR] [REQUIREMENTS_FILE]
# On a machine whose python3 already has a CUDA torch, the venv sees the system packages and keeps that torch;
# elsewhere torch is pinned to the CPU build by constraints.txt (no multi-GB CUDA download).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
reqs="${2:-$here/requirements-dev.txt}"
python="${PYTHON:-python3}"

constraints="$here/constraints.txt"
venv_flags=()
if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  cuda_torch="$("$python" -c 'import torch; print(torch.__version__)')"
  echo "bootstrap: keeping the system's CUDA torch $cuda_torch" >&2
  venv_flags+=(--system-site-packages)
  constraints="$(mktemp)"
  echo "torch==$cuda_torch" >"$constraints"
fi

stamp="$venv/.installed"
want="$(cat "$reqs" "$here/requirements.txt" "$here/requirements-pathb.txt" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "${venv_flags[@]}" "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing $(basename "$reqs") into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -r "$reqs" >&2
  echo "$want" >"$stamp"
fi
echo "$venv/bin/python"
