# The tiny checkpoint converted on the CPU and on the GPU must give the same bytes, for both scale policies and
# for the modelopt layout (whose global scale is written as is, where compressed-tensors writes its inverse).
set -e
python3 -m nvfp4kit.synthetic --dst /tmp/tiny --preset tiny --seed 0 >/dev/null
for run in "auto" "reference" "reference --format modelopt"; do
  set -- $run
  pol=$1; shift
  tag=$(echo "$run" | tr -c 'a-z0-9\n' '_')
  for dev in cpu cuda; do
    python3 fp8_to_nvfp4_streaming.py --src /tmp/tiny --dst /tmp/o-$tag-$dev --device $dev --workers 1 --scale-policy $pol --max-shard-size 5MB "$@" 2>/dev/null
  done
  a=$(cat /tmp/o-$tag-cpu/*.safetensors | sha256sum); b=$(cat /tmp/o-$tag-cuda/*.safetensors | sha256sum)
  echo "policy $run: cpu $a cuda $b"; [ "$a" = "$b" ] && echo "  GPU bytes == CPU bytes" || echo "  DIFFERENT"
done
