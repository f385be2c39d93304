set -e
python3 -m nvfp4kit.synthetic --dst /tmp/tiny --preset tiny --seed 0 >/dev/null
for pol in auto reference; do
  for dev in cpu cuda; do
    python3 fp8_to_nvfp4_streaming.py --src /tmp/tiny --dst /tmp/o-$pol-$dev --device $dev --workers 1 --scale-policy $pol --max-shard-size 5MB 2>/dev/null
  done
  a=$(cat /tmp/o-$pol-cpu/*.safetensors | sha256sum); b=$(cat /tmp/o-$pol-cuda/*.safetensors | sha256sum)
  echo "policy $pol: cpu $a cuda $b"; [ "$a" = "$b" ] && echo "  GPU bytes == CPU bytes" || echo "  DIFFERENT"
done
