#!/usr/bin/env bash
# The kit end to end on a generated tiny DeepSeek V4 FP8 checkpoint: generate -> inspect -> convert -> verify.
# Bootstraps .venv (CPU torch unless a CUDA torch is already installed); logs land in demo/.
set -euo pipefail
cd "$(dirname "$0")"
py="$(scripts/bootstrap.sh .venv requirements-dev.txt)"
rm -rf demo && mkdir -p demo
set -x
"$py" -m nvfp4kit.synthetic --dst demo/src --preset tiny --seed 0
"$py" inspect_model.py demo/src --json demo/inspect.json 2>&1 | tee demo/inspect.log
"$py" fp8_to_nvfp4_streaming.py --src demo/src --dst demo/out --workers 2 --max-shard-size 10MB 2>&1 | tee demo/path_a.log
"$py" fp8_to_nvfp4_streaming.py --src demo/src --dst demo/out --workers 2 --max-shard-size 10MB 2>&1 | tee -a demo/path_a.log  # a rerun resumes: nothing left to do
"$py" verify_nvfp4.py demo/out --json demo/verify.json 2>&1 | tee demo/verify.log
