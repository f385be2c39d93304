#!/usr/bin/env bash
# One device call (about 400 s on one H100/H200) that decides the shard writer and records the hot figures:
#   GPU bytes == CPU bytes; one worker with pwrite (4 writers) against the mapped writer (8, 16 writers, 3 readers);
#   one conversion each way onto the machine's disk; bench_hot with 1, 2, 4 workers. Results go under $OUT.
# Run from the repository root:  OUT=/some/folder bash bench/writer_call.sh
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/writer_call}"; mkdir -p "$OUT"
nvidia-smi -L; nproc; free -g | head -2; df -T /dev/shm . | cat
(time timeout 150 bash bench/gpu_equals_cpu.sh) > "$OUT/gpu_eq.txt" 2>&1; cat "$OUT/gpu_eq.txt"
scratch=$(mktemp -d); cp -r bench nvfp4kit fp8_to_nvfp4_streaming.py "$scratch"
(cd "$scratch" && git apply bench/worker_variants.patch && timeout 270 python3 bench/bench_variants.py \
    --work /dev/shm/hot --layers 1 --experts 64 bench/worker_variants.json) 2>&1 | tee "$OUT/variants.jsonl"
disk=$(mktemp -d -p "$PWD/..")
for pw in 0 1 0; do  # onto the machine's disk: mapped, pwrite, mapped again
  t0=$(date +%s.%N)
  NVFP4KIT_PWRITE=$pw timeout 90 python3 fp8_to_nvfp4_streaming.py --src /dev/shm/hot/src --dst "$disk/o" \
      --workers 1 --max-shard-size 1GB > "$disk/log" 2>&1
  rc=$?
  echo "disk NVFP4KIT_PWRITE=$pw rc=$rc $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" \
       "$(cat "$disk"/o/*.safetensors | sha256sum | cut -c1-16)"
  rm -rf "$disk/o"
done 2>&1 | tee "$OUT/disk.txt"
rm -rf "$disk"
timeout 150 python3 bench/bench_hot.py --work /dev/shm/hot --layers 1 --experts 64 --workers 1,2,4 \
    --json "$OUT/hot.json" 2>&1 | tail -40
