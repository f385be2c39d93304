#!/usr/bin/env python3
"""Path A against the disk: copy floor, Path A end to end, and the reference quantizers, on one machine.

    python bench/bench_path_a.py --work /nvme/bench --layers 1 --experts 32 --workers 1,2,4 --json bench.json

1. Generates (or reuses) a ``pro-layers`` synthetic checkpoint with the real V4 Pro shapes under WORK/src.
2. Copy floor: reads every source byte and writes as many bytes as Path A's output (each shard's share, to the
   byte), with plain safetensors (``load_file`` / ``save_file``, then fsync), no quantization. Timed in this
   process, so it pays no interpreter or ``import torch`` start-up; Path A's rows do.
3. Path A end to end (the real script in a subprocess) for each worker count on CPU and, with CUDA, on GPU;
   checks that every run wrote the same bytes.
4. llm-compressor's data-free ``model_free_ptq`` end to end, where it is installed and can take the checkpoint.
5. Compute only, on the same expert tensors: the kit's quantizer, ModelOpt's ``NVFP4QTensor`` and
   compressed-tensors' NVFP4 quantization, on CPU and GPU.

Page cache: before every end-to-end contender the source and output files are synced and dropped with
``posix_fadvise(DONTNEED)`` (and ``/proc/sys/vm/drop_caches`` where writable), so each one starts cold.
Prints one table (GB/s of source, ratio to the copy floor, peak host RSS per worker, GPU memory peak) and
writes it as JSON. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from nvfp4kit.checkpoint import open_checkpoint  # noqa: E402
from nvfp4kit.fp8 import dequantize_fp8_blocks, infer_block_size  # noqa: E402
from nvfp4kit.nvfp4 import quantize_group  # noqa: E402
from nvfp4kit.plan import Options, build_plan  # noqa: E402
from nvfp4kit.safetensors_io import read_tensor  # noqa: E402


def drop_cache(*folders: str) -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def ensure_source(work: str, layers: int, experts: int) -> str:
    src = os.path.join(work, "src")
    if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        shutil.rmtree(src, ignore_errors=True)
        t = time.time()
        subprocess.run([sys.executable, "-m", "nvfp4kit.synthetic", "--dst", src, "--preset", "pro-layers",
                        "--layers", str(layers), "--experts", str(experts)], check=True, cwd=ROOT)
        print(f"generated {src} in {time.time() - t:.0f} s", flush=True)
    return src


def copy_floor(src: str, out: str, output_bytes: int) -> dict:
    """Read every source byte with safetensors and write ``output_bytes`` of it back with safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ckpt = open_checkpoint(src)
    ratio = output_bytes / ckpt.total_bytes
    drop_cache(src)
    t = time.time()
    written = 0
    for shard in ckpt.shards:
        tensors = load_file(os.path.join(src, shard))
        budget = ratio * sum(v.numel() * v.element_size() for v in tensors.values())
        keep, size = {}, 0
        for name, v in tensors.items():
            n = v.numel() * v.element_size()
            if size + n > budget:  # the last tensor cut to the byte, so the floor writes what Path A writes
                rest = int(budget - size)
                if rest > 0:
                    keep[name] = v.reshape(-1).view(torch.uint8)[:rest].clone()
                    size += rest
                break
            keep[name] = v
            size += n
        path = os.path.join(out, shard)
        save_file(keep, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        written += size
        del tensors, keep
    seconds = time.time() - t
    shutil.rmtree(out)
    return {"contender": "copy floor (safetensors read + write)", "seconds": seconds,
            "gbps": ckpt.total_bytes / seconds / 1e9, "written_bytes": written}


def path_a(src: str, out: str, workers: int, device: str, max_shard_size: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(src)
    cmd = [sys.executable, os.path.join(ROOT, "fp8_to_nvfp4_streaming.py"), "--src", src, "--dst", out,
           "--workers", str(workers), "--device", device, "--max-shard-size", max_shard_size]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t
    if proc.returncode != 0:
        raise RuntimeError(f"Path A failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "conversion_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, ".nvfp4kit", "manifest.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    digests = sorted((e["name"], e["xxh3_128"]) for e in entries)
    per_worker: dict[int, float] = {}
    busy: dict[str, float] = {}
    for e in entries:
        per_worker[e["worker"]] = per_worker.get(e["worker"], 0.0) + e["seconds"]
        for k, v in e.get("busy_seconds", {}).items():
            busy[k] = busy.get(k, 0.0) + v
    shard_seconds = max(per_worker.values())
    return {"contender": f"Path A, {device}, {workers} worker(s)", "seconds": seconds,
            "gbps": report["source_bytes"] / seconds / 1e9, "output_bytes": report["output_bytes"],
            # Without process start-up (imports, CUDA init, planning): what a 1.6 TB run sees.
            "steady_gbps": report["source_bytes"] / shard_seconds / 1e9, "busy_seconds": busy,
            "peak_rss_gb": report["peak_rss_bytes_per_worker"] / 1e9,
            "gpu_peak_gb": report["cuda_peak_bytes_per_worker"] / 1e9, "digests": digests,
            "peak_rss_gb_by_shard": [round(e["peak_rss_bytes"] / 1e9, 2) for e in entries]}


def model_free_ptq(src: str, out: str, device: str) -> dict:
    """llm-compressor's data-free ``model_free_ptq`` end to end on the same checkpoint and the same work: routed
    experts to NVFP4 weight-only (w1 and w3 share a global scale: its fused mapping knows DeepSeek's ``w1``/``w3``),
    everything else written as read. Its FP8 dequantizer looks for ``weight_scale_inv``, while V4 names the block
    scale ``.scale``; a subclass that reads ``.scale`` (its own dequantization code otherwise) is the only adapter.
    """
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from llmcompressor.entrypoints.model_free import model_free_ptq as run_model_free_ptq

    experts = r"re:.*\.experts\.\d+\.w[123]$"

    class V4ScaleDequantizer(FP8BlockDequantizer):
        def process(self, tensors: dict) -> dict:
            for name in [n for n in tensors if ".experts." in n and n.endswith(".scale")]:
                module = name[: -len(".scale")]
                tensors[module + ".weight"] = self._create_dequantized_weight(tensors[module + ".weight"], tensors.pop(name))
            return tensors

        def validate(self, tensors: dict) -> dict:
            return self.process(tensors)

        def get_dependencies(self, weight_name: str) -> set[str]:
            module, _, param = weight_name.rpartition(".")
            return {module + ".scale"} if ".experts." in module and param == "weight" else set()

    shutil.rmtree(out, ignore_errors=True)
    drop_cache(src)
    t = time.time()
    run_model_free_ptq(src, out, scheme=QuantizationScheme(targets=[experts], weights=NVFP4A16["weights"]),
                       ignore=[], max_workers=1, device=device,
                       converter=V4ScaleDequantizer(targets=[experts], dtype=torch.bfloat16))
    for root, _, files in os.walk(out):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.time() - t
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
    shutil.rmtree(out)
    return {"contender": f"llm-compressor model_free_ptq, {device}", "seconds": seconds,
            "gbps": open_checkpoint(src).total_bytes / seconds / 1e9, "output_bytes": total}


def expert_tensors(src: str, count: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]], int]:
    ckpt = open_checkpoint(src)
    names = sorted(n for n in ckpt.tensors if ".experts." in n and n.endswith(".weight"))[:count]
    out, nbytes = [], 0
    for n in names:
        w, s = read_tensor(ckpt.tensors[n]), read_tensor(ckpt.tensors[n[: -len("weight")] + "scale"])
        out.append((w, s, infer_block_size(w.shape, s.shape, (128, 128), n)))
        nbytes += ckpt.tensors[n].nbytes + ckpt.tensors[n[: -len("weight")] + "scale"].nbytes
    return out, nbytes


def timed(fn, device: str, repeat: int = 5) -> float:
    """Best time of ``repeat`` calls after a warm-up (kernels, allocator), the same for every contender."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def compute_only(src: str, device: str, count: int) -> list[dict]:
    """FP8 dequantize + NVFP4 quantize of the same expert tensors, each contender on ``device``."""
    tensors, nbytes = expert_tensors(src, count)
    on = [(w.to(device), s.to(device), b) for w, s, b in tensors]
    xs = [dequantize_fp8_blocks(w, s, b) for w, s, b in on]
    rows = []

    def kit(policy: str):
        return lambda: [quantize_group([dequantize_fp8_blocks(w, s, b)], policy) for w, s, b in on]

    contenders = {"kit, auto policy (exact here)": kit("auto"), "kit, reference policy": kit("reference")}
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        contenders["ModelOpt NVFP4QTensor"] = lambda: [
            NVFP4QTensor.quantize(dequantize_fp8_blocks(w, s, b), 16) for w, s, b in on]
    except Exception as e:  # noqa: BLE001 (report whatever stops the import)
        rows.append({"contender": "ModelOpt NVFP4QTensor", "device": device, "error": repr(e)[:200]})
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

        args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)

        def ct_one(x: torch.Tensor):
            gs = generate_gparam(x.min(), x.max())
            g = x.view(x.shape[0], -1, 16)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
            return quantize(x, scale, zp, args, global_scale=gs)

        contenders["compressed-tensors NVFP4"] = lambda: [ct_one(dequantize_fp8_blocks(w, s, b)) for w, s, b in on]
    except Exception as e:  # noqa: BLE001
        rows.append({"contender": "compressed-tensors NVFP4", "device": device, "error": repr(e)[:200]})
    for name, fn in contenders.items():
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(fn, device)
            rows.append({"contender": name, "device": device, "seconds": seconds, "gbps": nbytes / seconds / 1e9,
                         "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0})
        except Exception as e:  # noqa: BLE001
            rows.append({"contender": name, "device": device, "error": repr(e)[:200]})
    del xs
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder on the disk under test")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (0: no Path A rows)")
    p.add_argument("--devices", default="cuda,cpu" if torch.cuda.is_available() else "cpu",
                   help="devices for the end-to-end rows")
    p.add_argument("--compute-devices", help="devices for the compute-only rows (default: --devices)")
    p.add_argument("--max-shard-size", default="1GB",
                   help="Path A's output shards; small enough that workers get equal work, as the ~180 shards of the "
                        "real 0.9 TB output do (default 1GB)")
    p.add_argument("--compute-tensors", type=int, default=24, help="expert tensors for the compute-only rows")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    src = ensure_source(args.work, args.layers, args.experts)
    plan = build_plan(open_checkpoint(src), Options())
    t = time.time()
    subprocess.run([sys.executable, "-c", "import nvfp4kit.convert"], cwd=ROOT, check=True)
    startup = time.time() - t  # what every Path A run pays before its first read
    results = {"machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                           "torch": torch.__version__, "import_seconds": round(startup, 2)},
               "source_bytes": plan.source_bytes, "rows": []}
    floor = copy_floor(src, os.path.join(args.work, "copy"), plan.output_bytes)
    results["rows"].append(floor)
    print(f"copy floor: {floor['gbps']:.2f} GB/s", flush=True)
    digests = None
    for device in args.devices.split(","):
        for workers in [w for w in map(int, args.workers.split(",")) if w > 0]:
            row = path_a(src, os.path.join(args.work, "out"), workers, device, args.max_shard_size)
            same = digests is None or row["digests"] == digests
            digests = digests or row["digests"]
            row["same_bytes_as_first_run"] = same
            row["ratio_to_floor"] = row["seconds"] / floor["seconds"]
            del row["digests"]
            results["rows"].append(row)
            print(f"{row['contender']}: {row['gbps']:.2f} GB/s end to end ({row['ratio_to_floor']:.2f}x floor), "
                  f"{row['steady_gbps']:.2f} GB/s in shard writing, busy {row['busy_seconds']}, same bytes: {same}",
                  flush=True)
    shutil.rmtree(os.path.join(args.work, "out"), ignore_errors=True)
    for device in args.devices.split(","):
        try:
            row = model_free_ptq(src, os.path.join(args.work, "model_free"), device)
            row["ratio_to_floor"] = row["seconds"] / floor["seconds"]
        except Exception as e:  # noqa: BLE001 (a contender that cannot take the checkpoint is a result too)
            row = {"contender": f"llm-compressor model_free_ptq, {device}", "error": repr(e)[:300]}
        results["rows"].append(row)
        print(row, flush=True)
    for device in (args.compute_devices or args.devices).split(",") if args.compute_tensors else []:
        results["rows"] += compute_only(src, device, args.compute_tensors)
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def render(results: dict) -> str:
    lines = [f"source {results['source_bytes'] / 1e9:.2f} GB; {results['machine']}",
             f"{'contender':<44} {'device':<6} {'GB/s':>7} {'x floor':>8} {'steady':>7} {'RSS GB':>7} {'GPU GB':>7} "
             f"{'same bytes':>10}"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"{r['contender']:<44} {r.get('device', ''):<6} failed: {r['error']}")
            continue
        ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else ""
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else ""
        gpu = f"{r.get('gpu_peak_gb', 0):.2f}" if r.get("gpu_peak_gb") else ""
        same = str(r.get("same_bytes_as_first_run", ""))
        steady = f"{r['steady_gbps']:.2f}" if "steady_gbps" in r else ""
        lines.append(f"{r['contender']:<44} {r.get('device', ''):<6} {r['gbps']:>7.2f} {ratio:>8} {steady:>7} {rss:>7} "
                     f"{gpu:>7} {same:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
