#!/usr/bin/env bash
# Build (or reuse) the separate virtualenv in which SGLang's own DeepSeek V4 loader checks a converted checkpoint
# on CPU (nvfp4kit/sglang_dry_load.py). Prints the venv's python path last.
#   scripts/setup_sglang_cpu.sh [VENV_DIR]        default: .venv-sglang-cpu in the repository root
#
# Why a venv of its own: SGLang pins transformers 5.19 and compressed-tensors 0.18, which differ from both the
# kit's main venv and vLLM's.
# Why `--no-deps` for sglang: its declared dependencies pull the CUDA-only kernels (sglang-kernel, flashinfer,
# deep-gemm, flash-mla, tilelang, cutlass-dsl, ...), none of which the model construction and load_weights need on
# CPU; the list below is what those import (shared/reference/sglang-v4.md, "Running SGLang's loader on CPU").
# torch is held at the 2.13.0 CPU wheel by a constraints file, so no later install swaps in a CUDA torch:
# torch==2.13.0+cpu is a local-version wheel that PyPI does not serve; pip finds it through its find-links setting
# (a local wheel folder on the build machines; `pip config list` shows it).
# Idempotent: a stamp file records what was installed; a second run only prints the python path.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv-sglang-cpu}"
python="${PYTHON:-python3}"
sglang_spec="sglang==0.5.23"
torch_spec="torch==2.13.0+cpu"
deps=(
  "transformers==5.19.0" "compressed-tensors==0.18.0" triton "apache-tvm-ffi==0.1.11" numpy safetensors einops
  orjson pybase64 requests pillow starlette msgspec pyzmq ipython aiohttp dill "sentencepiece==0.2.1" gguf
  "openai==2.8.0" partial_json_parser
)

stamp="$venv/.installed"
want="$sglang_spec $torch_spec"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv/bin/python"
  exit 0
fi

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
constraints="$venv/constraints-sglang.txt"
echo "$torch_spec" >"$constraints"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints")
echo "setup_sglang_cpu: installing $sglang_spec (no deps) and its CPU dependencies into $venv (about a minute)" >&2
# (the filter drops pip's per-package notes about index folders that lack a package; pip's exit status stays)
"${pip[@]}" "$torch_spec" 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" "${deps[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" --no-deps "$sglang_spec" 2> >(grep -v "is ignored: it is neither" >&2)
# Fail here, not in a test, if the environment cannot import what the dry load needs.
"$venv/bin/python" -c 'import sglang, transformers, safetensors, torch; assert torch.version.cuda is None' >&2
echo "$want" >"$stamp"
echo "setup_sglang_cpu: done in $((SECONDS - start)) s" >&2
echo "$venv/bin/python"
